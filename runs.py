"""
runs.py -- what a run leaves on disk, and how it is read back.

A run of train.py writes a folder (runs/<task>-<method>-s<seed>/, or the --out-dir of pretraining) and one
line in a results file. Everything that writes or reads those files lives here, so that every writer in the
project is atomic in the same way and every model file is read with the same checks.

What this file holds, in order:
  1. File names, atomic writes    -- atomic_write (the one helper: a temporary file in the same folder, then
     and careful reads               a rename), atomic_write_text, atomic_torch_save, SaveError;
                                     read_torch_file (the one reader of every model file and checkpoint);
                                     check_output_folder (can a run write where it is told to?).
  2. Describing a run             -- file_sha256, machine_description, memory_bytes, git_commit.
  3. Checkpoints                  -- the RNG state of a process, save_checkpoint / read_checkpoint,
                                     check_resume (does this invocation repeat the checkpoint's run?),
                                     restore_training (optimizer, scaler, random streams, the run's state).
  4. The run log                  -- RunLog: metrics.jsonl and the state a checkpoint carries, shared by
                                     pretraining and fine-tuning.
  5. Backbones and models         -- save_backbone / load_backbone (what pretrain and the importers write),
                                     build_classifier, save_finetuned / load_finetuned / restore_best.
  6. Results files                -- check_results_folder; append_jsonl / load_jsonl (one JSON line per record,
                                     appended in one write); append_result (never a non-finite number) and
                                     load_results (finetune.jsonl).

Nothing here trains or evaluates: train.py decides what to write and when; this file decides how.
"""

import hashlib
import json
import math
import os
import platform
import random
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import data
import dynlora
import readout as readout_mod
import runtime
from model import GPTClassifier, GPTConfig

REPO = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------
# 1. File names and atomic writes
# ---------------------------------------------------------------------------------------------------------

BACKBONE_FILE = "backbone.pt"        # a pretrained GPT: {"config", "model", "tokenizer_sha256", ...}
TOKENIZER_FILE = "tokenizer.json"    # the backbone's tokenizer (data.load_tokenizer reads it)
CHECKPOINT_FILE = "checkpoint.pt"    # the last training state of a run, for --resume
CHECKPOINT_FORMAT = "dynlora-checkpoint/2"   # /2: the adapter's gate keys of dynlora-adapter/2
METRICS_FILE = "metrics.jsonl"       # one JSON record per logged step / evaluation
FINAL_FILE = "final.json"            # a finished fine-tuning run's result record; marks the run finished
RESULTS_FILE = "finetune.jsonl"      # in a results folder: one line per finished fine-tuning run
GATES_FILE = "gates.jsonl"          # `train.py gates`: how much each gated run's gates depend on the input
RESULTS_DIR = REPO / "results"       # the results of record, rendered into the README
SCRATCH_RESULTS_DIR = REPO / "runs" / "results"   # where ad-hoc runs (no --suite) put their result lines


class SaveError(OSError):
    """A file could not be written (e.g. the disk is full); the previous version of the file is intact."""


def atomic_write(path, write) -> Path:
    """Call write(tmp_path) on a temporary file in path's folder, then rename it to path.

    os.replace is atomic on POSIX and Windows: a reader sees the old file or the new one, never a mix, and a
    crash never leaves a half-written file. When writing fails (a full disk), the temporary file is removed,
    the old file is left as it was, and SaveError says so. Every file the project writes goes through here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise SaveError(f"could not write {path} ({err.strerror or err}); {kept}; free some disk space and run "
                        f"again (with --resume to continue from the last checkpoint)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_torch_save(obj, path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_torch_file(path, fix: str, keys: tuple = ()) -> dict:
    """The dict saved in a model file or checkpoint, read safely (weights_only=True: tensors and plain values,
    never code), with keys checked to be there. A file that cannot be read raises ValueError naming it, with
    `fix` (what to do about it); a missing one, FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {fix}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:                # torch.load raises RuntimeError, EOFError, UnpicklingError, OSError...
        detail = (str(getattr(err, "strerror", None) or err).strip().splitlines() or [type(err).__name__])[0]
        detail = detail.split(". ")[0]      # torch's miniz message goes on for four sentences
        raise ValueError(f"{path} is damaged and cannot be read ({detail}); files are only ever replaced whole, "
                         f"so it was cut or changed afterwards (a copy?): {fix}") from None
    missing = [key for key in keys if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise ValueError(f"{path} is not the file expected here (no {missing[0]!r} in it); {fix}")
    return payload


def check_output_folder(folder, flag: str):
    """Before any work: raise ValueError, naming the flag, if a run could not write into folder (created
    later, when needed): it, or the nearest of its parents that exists, is a file or is not writable."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        where = f"{flag} {folder}" if existing == folder else f"{flag} {folder}: {existing}"
        raise ValueError(f"{where} is a file, not a folder; give a folder (it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder}: {existing} is not writable; give a folder you may write to")


# ---------------------------------------------------------------------------------------------------------
# 2. Describing a run
# ---------------------------------------------------------------------------------------------------------

def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = "native bf16" if runtime.cpu_native_bf16() else "no native bf16"
    return f"{cpu} ({torch.backends.cpu.get_cpu_capability()}, {bf16}), {torch.get_num_threads()} threads, " \
           f"torch {torch.__version__}"


def memory_bytes(key: str = "VmHWM") -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes: VmHWM the peak resident
    memory so far, VmRSS the resident memory now."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}; the memory figure needs Linux")


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        # "-dirty": the code differs from the commit. The files runs write into the repository (results/,
        # and the README's tables) do not count, or every run after the first would be "dirty".
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results", ":(exclude)README.md"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------------
# 3. Checkpoints
#
# A run folder's checkpoint.pt holds everything the rest of the run depends on: the weights that train, the
# optimizer's moments, the gradient scaler, the allocator's EMAs (its masks are model buffers, saved with the
# weights), the step and the position in the data, the best score so far, the metrics log, and every
# process's random-number generators. The data needs no more than a position: the batchers are
# deterministic functions of (seed, epoch), so the position is the number of batches consumed in the current
# epoch. The learning rate is a pure function of the step. --resume rebuilds the run from its settings,
# checks them against the checkpoint's (check_resume), loads it and continues: the resumed run takes exactly
# the steps the uninterrupted run would have taken (tests/test_scale.py kills a run with SIGKILL and checks
# that the resumed one ends bit for bit where the uninterrupted one does). Only rank 0 writes.
# ---------------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's random-number generators, in a form torch.load(weights_only=True) accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "gauss": gauss},
            "python": random.getstate()}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])


def save_checkpoint(out: Path, rt, payload: dict):
    """Write <out>/checkpoint.pt. Every rank must call it (their RNG states are gathered); rank 0 writes.

    payload: kind ("pretrain" | "finetune"), config (the run's settings), source (the hash of the files it
    started from), model, optimizer, scaler, state, and what else the kind needs (the allocator's state).
    """
    rngs = rt.gather(rng_state())
    if rt.is_main:
        atomic_torch_save({"format": CHECKPOINT_FORMAT, **payload, "rng": rngs}, Path(out) / CHECKPOINT_FILE)


def read_checkpoint(out: Path, kind: str) -> dict:
    """The checkpoint of the run in `out` (for --resume), checked to be a readable `kind` checkpoint."""
    path = Path(out) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT_FILE} in {out}, so there is nothing to resume; start "
                                f"the run without --resume, or give the run's --out-dir")
    ckpt = read_torch_file(path, "restore it, or start the run again without --resume")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dynlora training checkpoint of this version (format "
                         f"{CHECKPOINT_FORMAT!r}); start the run again without --resume")
    if ckpt["kind"] != kind:
        raise ValueError(f"{path} is a {ckpt['kind']} checkpoint; resume it with `train.py {ckpt['kind']} --resume`")
    return ckpt


def check_resume(ckpt: dict, run_config: dict, source: str, out: Path, may_change: set, flag_name,
                 finished: bool):
    """Raise ValueError if this invocation does not continue the checkpoint's run.

    run_config: {section: {key: value}} of this invocation (sections pretrain / finetune / adapter / model /
    lr), compared key by key with the checkpoint's, except the keys in may_change (where things are, where
    results go). flag_name(section, key) says how the user sets a key. source: the hash of the backbone or
    tokenizer the run started from. finished: the run's final file is already written.
    """
    saved, now = _settings(ckpt["config"]), _settings(run_config)
    diffs = [f"{flag_name(section, key)} {saved.get((section, key))!r} then, {now.get((section, key))!r} now"
             for section, key in sorted(set(saved) | set(now))
             if key not in may_change and saved.get((section, key)) != now.get((section, key))]
    if diffs:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise ValueError(f"--resume: the run in {out} was started with other settings ({'; '.join(diffs[:3])}{more}); "
                         f"resume with the run's settings (see {Path(out) / 'config.json'}), or start a new run "
                         f"without --resume")
    if ckpt["source"] != source:
        raise ValueError(f"--resume: the backbone or tokenizer files of the run in {out} changed since it started "
                         f"(their hash differs); restore them, or start a new run without --resume")
    if finished:
        raise ValueError(f"--resume: the run in {out} has finished; nothing to resume")


def _settings(run_config: dict) -> dict:
    """{(section, key): value} of a run config; a value that is not a dict is its own section (key '')."""
    out = {}
    for section, value in run_config.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        out.update({(section, key): v for key, v in items})
    return out


def restore_training(ckpt: dict, optimizer, scaler, rt) -> dict:
    """Load the optimizer, the gradient scaler and the random streams of a checkpoint; return the run's state
    (a resumed run counts one more resumption). The caller loads the weights (they differ by kind)."""
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == rt.world_size:       # every process continues its own random streams
        set_rng_state(ckpt["rng"][rt.rank])
    else:
        rt.print(f"note: the run had {len(ckpt['rng'])} process(es), now {rt.world_size}: random streams (dropout) "
                 f"restart from the seed, so the result will differ slightly from an uninterrupted run")
    return {**ckpt["state"], "resumed": ckpt["state"]["resumed"] + 1}


# ---------------------------------------------------------------------------------------------------------
# 4. The run log
# ---------------------------------------------------------------------------------------------------------

class RunLog:
    """The state of a run outside its tensors, and its metrics.jsonl.

    state is a plain dict that a checkpoint carries over to a resumed run (step, position in the data, wall
    time, the log of records, ...). Creating a RunLog rewrites metrics.jsonl from state["log"], so that after
    a resume the file holds exactly the records of the steps the checkpoint had taken (a run killed after
    its last checkpoint may have logged more); add() appends one record to both.
    """

    def __init__(self, out: Path, state: dict, is_main: bool):
        self.path, self.state, self.is_main = Path(out) / METRICS_FILE, state, is_main
        if is_main:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in state["log"]))

    def add(self, record: dict):
        self.state["log"].append(record)
        if self.is_main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------------
# 5. Backbones and fine-tuned models
#
# A backbone folder: backbone.pt ({"config": GPTConfig dict, "model": state dict, "tokenizer_sha256", and
# where it came from}), tokenizer.json, config.json. pretrain writes one; so do the importers. A fine-tuning
# run folder holds model.pt (full fine-tuning: the whole classifier) or adapter.pt (adapter methods: the
# adapter file of dynlora.save_adapter, applied to the backbone named in it), and the run's tokenizer.json.
# ---------------------------------------------------------------------------------------------------------

def save_backbone(out: Path, config: GPTConfig, state: dict, run_config: dict, **meta) -> Path:
    """Write a backbone folder: backbone.pt and config.json; the tokenizer.json must be in `out` already
    (its hash is stored, so that a backbone is never used with another tokenizer). meta: where the weights
    came from, the run id, ... (plain values)."""
    out = Path(out)
    tok_path = out / TOKENIZER_FILE
    atomic_torch_save({"config": config.to_dict(), "model": state, "tokenizer_sha256": file_sha256(tok_path),
                       **meta}, out / BACKBONE_FILE)
    atomic_write_text(out / "config.json", json.dumps(run_config, indent=2))
    return out / BACKBONE_FILE


def load_backbone(folder) -> tuple[GPTConfig, dict, "data.Tokenizer", Path]:
    """(GPTConfig, state_dict, tokenizer, tokenizer_path) of a pretrained backbone folder, checked."""
    folder = Path(folder)
    ckpt_path, tok_path = folder / BACKBONE_FILE, folder / TOKENIZER_FILE
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--backbone {folder}: no {BACKBONE_FILE} there; run `python train.py pretrain "
                                f"--out-dir {folder}` first, or pass --backbone '' for a random init")
    ckpt = read_torch_file(ckpt_path, f"restore it, or pretrain it again (`python train.py pretrain --out-dir "
                                      f"{folder}`)", keys=("config", "model", "tokenizer_sha256"))
    config = GPTConfig.from_dict(ckpt["config"])
    tok = data.load_tokenizer(tok_path)
    if file_sha256(tok_path) != ckpt["tokenizer_sha256"]:
        raise ValueError(f"{tok_path} is not the tokenizer {ckpt_path} was trained with (its hash differs); "
                         f"restore the tokenizer.json saved with the backbone or pretrain again")
    if tok.get_vocab_size() != config.vocab_size:
        raise ValueError(f"{tok_path} has {tok.get_vocab_size()} tokens but {ckpt_path} expects "
                         f"{config.vocab_size}; use the tokenizer saved with the backbone")
    return config, ckpt["model"], tok, tok_path


def build_classifier(config: GPTConfig, backbone_state: dict | None, num_outputs: int, readout: str = "cls",
                     task=None, tok=None) -> GPTClassifier:
    """A GPTClassifier whose body is the pretrained GPT (when given) and whose head is new, with what its
    readout needs (readout.attach: the trainable <cls> row; for `prompt` the head from the label words,
    which needs the task and the tokenizer)."""
    clf = GPTClassifier(config, num_outputs)
    if backbone_state is not None:
        try:
            clf.gpt.load_state_dict(backbone_state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[1:2] or [str(err)]
            raise ValueError(f"the backbone checkpoint does not fit its config ({first[0].strip()}); "
                             f"was it saved by another version of model.py?") from None
    return readout_mod.attach(clf, readout, task, tok)


def training_weights(model: GPTClassifier, method: str) -> dict:
    """The tensors a run trains and a checkpoint stores: all of them (full) or the adapter's."""
    return model.state_dict() if method == "full" else dynlora.adapter_state_dict(model)


def load_training_weights(model: GPTClassifier, weights: dict, method: str, path: Path):
    """Load a checkpoint's weights: the whole state dict (full) or the adapter tensors (adapter methods)."""
    odd = sorted(set(weights) ^ set(training_weights(model, method)))
    if odd:
        raise ValueError(f"{path} does not fit this model: tensor names differ (e.g. {odd[0]})")
    model.load_state_dict(weights, strict=method == "full")


def save_finetuned(out: Path, model: GPTClassifier, method: str, adapter_cfg, meta: dict, allocator=None):
    """A fine-tuned model: the whole state dict in model.pt (full) or the adapter file adapter.pt.

    meta: task, method, num_outputs, backbone (the folder it was trained on), tokenizer_sha256, readout.
    """
    out = Path(out)
    if method == "full":
        atomic_torch_save({"config": model.config.to_dict(), "model": model.state_dict(), **meta}, out / "model.pt")
    else:
        extra = {**meta, "allocator": allocator.state_dict() if allocator is not None else None}
        dynlora.save_adapter(out / "adapter.pt", model, adapter_cfg, extra=extra)


FINETUNED_FIX = "restore it, or fine-tune the run again"


def restore_best(model: GPTClassifier, out: Path, method: str):
    """Load the best epoch's weights back from the file save_finetuned wrote (model.pt or adapter.pt)."""
    name, key = ("model.pt", "model") if method == "full" else ("adapter.pt", "state")
    weights = read_torch_file(Path(out) / name, FINETUNED_FIX, keys=(key,))[key]
    load_training_weights(model, weights, method, out)


def read_run_config(run) -> dict:
    """A fine-tuning run folder's config.json (what the run is: its task, settings, model)."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--run {run}: no config.json there; is it a folder written by finetune?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore the file finetune wrote") from None
    if not isinstance(config, dict) or "task" not in config or "finetune" not in config:
        raise ValueError(f"{path} is not a fine-tuning run's config.json (no 'task' or 'finetune'); restore "
                         f"the file finetune wrote")
    return config


def load_finetuned(run_dir, backbone: str | None = None) -> tuple[GPTClassifier, "data.Tokenizer", dict]:
    """(model, tokenizer, meta) of a run folder written by finetune; the model in eval mode.

    Every file is read once, safely (read_torch_file). The run is what its config.json says: meta["task"] is
    config.json's task, and a model file that names another task (files of two runs mixed) is an error. So is
    its readout (config.json's finetune.readout; a run saved before --readout existed read `cls`).
    """
    run = Path(run_dir)
    tok_path = run / TOKENIZER_FILE
    run_config = read_run_config(run)
    task, readout = run_config["task"], run_config["finetune"].get("readout", "cls")
    readout_mod.check(readout)
    meta_keys = ("task", "num_outputs", "tokenizer_sha256")
    if (run / "model.pt").is_file():
        path = run / "model.pt"
        meta = read_torch_file(path, FINETUNED_FIX, keys=("config", "model", *meta_keys))
        model = readout_mod.attach(GPTClassifier(GPTConfig.from_dict(meta["config"]), meta["num_outputs"]),
                                   "cls" if readout == "prompt" else readout)   # the head is loaded below
        model.load_state_dict(meta["model"])
    elif (run / "adapter.pt").is_file():
        path = run / "adapter.pt"
        payload = read_torch_file(path, FINETUNED_FIX, keys=("extra",))
        meta = payload["extra"]
        config, backbone_state, _, _ = load_backbone(backbone or meta["backbone"])
        model = build_classifier(config, backbone_state, meta["num_outputs"],
                                 "cls" if readout == "prompt" else readout)     # the adapter file holds the head
        dynlora.load_adapter(path, model, payload=payload)
    else:
        raise FileNotFoundError(f"--run {run}: neither model.pt nor adapter.pt there; is it a finetune run folder?")
    if meta["task"] != task:
        raise ValueError(f"{path} is a model for {meta['task']}, but {run / 'config.json'} says the run is "
                         f"{task}: the files of two runs were mixed; put the run's own model file back")
    if meta.get("readout", readout) != readout:
        raise ValueError(f"{path} is a model with readout {meta['readout']}, but {run / 'config.json'} says "
                         f"{readout}: the files of two runs were mixed; put the run's own model file back")
    tok = data.load_tokenizer(tok_path)
    if file_sha256(tok_path) != meta["tokenizer_sha256"]:
        raise ValueError(f"{tok_path} is not the tokenizer this model was trained with; restore the run's "
                         f"tokenizer.json")
    model.eval()
    return model, tok, meta


# ---------------------------------------------------------------------------------------------------------
# 6. Results files
# ---------------------------------------------------------------------------------------------------------

def results_folder(results_dir: str, suite: str) -> Path:
    """The folder a fine-tuning run appends its result to: --results-dir if given; else results/ (the tables
    of record) for a run of a named --suite, and runs/results/ for an ad-hoc run, so that trying things out
    (the main job, a quick run) never adds rows to the committed tables."""
    if results_dir:
        return Path(results_dir)
    return RESULTS_DIR if suite else SCRATCH_RESULTS_DIR


def results_path(results_dir) -> Path:
    """<results_dir>/finetune.jsonl; a relative results_dir is taken from the repository root."""
    results_dir = Path(results_dir)
    return (results_dir if results_dir.is_absolute() else REPO / results_dir) / RESULTS_FILE


def check_results_folder(results_dir):
    """Before any work: can a run append its result line to results_dir's finetune.jsonl?"""
    path = results_path(results_dir)
    check_output_folder(path.parent, "--results-dir")
    if path.exists() and not path.is_file():
        raise ValueError(f"--results-dir {results_dir}: {path} is a folder, not a file; remove it or give "
                         f"another --results-dir")


def nonfinite_entry(record, prefix: str = "") -> tuple[str, float] | None:
    """(dotted key, value) of the first number in a nested record that is nan or inf; None if there is none."""
    items = record.items() if isinstance(record, dict) else enumerate(record) if isinstance(record, list) else ()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, float) and not math.isfinite(value):
            return name, value
        found = nonfinite_entry(value, name + ".")
        if found:
            return found
    return None


def append_jsonl(path, record: dict, key: str = "run_id") -> bool:
    """Append one record to a JSON-lines file as a single write, once: when `record` has `key` and a line with
    the same value is already there, nothing is written (a resumed run may repeat the end of a run that crashed
    after appending). Returns whether the line was written.

    The line goes out in one os.write on a file opened with O_APPEND, so two writers never interleave within a
    line and a reader sees whole lines (a crash in the middle of the call can at worst cut the last line, which
    load_jsonl then names).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if key in record and any(r.get(key) == record[key] for r in load_jsonl(path)):
        return False
    line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, line) != len(line):
            raise SaveError(f"could not append to {path}: short write (disk full?)")
    finally:
        os.close(fd)
    return True


def load_jsonl(path) -> list:
    """The records of a JSON-lines file ([] if it does not exist); a line that is not JSON raises ValueError
    naming file:line."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON line ({err.msg}); remove or repair that line") from None
    return out


def append_result(result: dict, results_dir):
    """Append one run's result line to <results_dir>/finetune.jsonl, once per run_id (see append_jsonl). A
    record holding a number that is not finite is refused (ValueError naming the key): a results file holds
    real scores only."""
    bad = nonfinite_entry(result)
    if bad is not None:
        raise ValueError(f"refusing to record a result whose {bad[0]} is {bad[1]}, not a finite number: the run "
                         f"diverged or its evaluation is broken; no result line was written")
    path = results_path(results_dir)
    try:
        append_jsonl(path, result)
    except OSError as err:
        raise SaveError(f"could not append the result to {path} ({err.strerror or err}); the finished training "
                        f"is kept in the run's {CHECKPOINT_FILE}: make --results-dir a writable folder and run "
                        f"the same command with --resume to record it") from None


def load_results(results_dir=RESULTS_DIR) -> list:
    return load_jsonl(results_path(results_dir))
