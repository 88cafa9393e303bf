"""
runs.py -- what a run leaves on disk, and how it is read back; its settings checked, its setup and its end.

A run of train.py writes a folder (runs/<task>-<method>-s<seed>/, or the --out-dir of pretraining) and one
line in a results file. Everything that writes or reads those files lives here, so that every writer in the
project is atomic in the same way and every model file is read with the same checks; so does the plumbing
of a run's start and end (the range check of its settings, its data and folders, its result record), which
train.py calls around the training.

What this file holds, in order:
  1. File names, atomic writes    -- atomic_write (the one helper: a temporary file in the same folder, then
     and careful reads               a rename), atomic_write_text, atomic_torch_save, SaveError;
                                     read_torch_file (the one reader of every model file and checkpoint);
                                     check_output_folder (can a run write where it is told to?).
  2. Describing a run             -- file_sha256, machine_description, memory_bytes, git_commit.
  3. Checkpoints                  -- the RNG state of a process, save_checkpoint / read_checkpoint,
                                     check_resume (does this invocation repeat the checkpoint's run?),
                                     restore_training (optimizer, scaler, random streams, the run's state);
                                     allocator_state / load_allocator_state (the RankAllocator's EMAs);
                                     what pretraining's and fine-tuning's checkpoints hold (save_*_checkpoint)
                                     and a run's starting state, fresh or resumed (resume_pretrain/_finetune).
  4. The run log                  -- RunLog: metrics.jsonl and the state a checkpoint carries, shared by
                                     pretraining and fine-tuning.
  5. Backbones and models         -- save_backbone / load_backbone (what pretrain and the importers write),
                                     build_classifier; adapter files (ADAPTER_FORMAT, adapter_config_from_dict,
                                     adapter_state_dict, backbone_fingerprint, save_adapter / load_adapter);
                                     save_finetuned / load_finetuned / restore_best.
  5b. A run's inputs and its     -- read_corpus_files, pretrain_tokens, finetune_backbone; RunData, build_run_data
      deployed form                  (the one place a run's data is built), saved_run_data; the figures
                                     (plot_pretrain, plot_finetune); calibration_batches, export_merged.
  6. Results files                -- check_results_folder; append_jsonl / load_jsonl (one JSON line per record,
                                     appended in one write); append_result (never a non-finite number) and
                                     load_results (finetune.jsonl).
  7. Comparing runs               -- the one t interval: t_quantile_95, paired_ci (mean and 95% t interval
                                     of paired differences), for the report and the known-answer benchmark.
  8. Settings                     -- bounds (a field's range), check_config (the one range check of every
                                     config), flag / FLAG_NAMES / flag_name (the --flag of a setting),
                                     RESUME_MAY_CHANGE, adapter_config_of (a method's defaults and the flags).
  9. A run's setup and end        -- check_pretrain / check_finetune (every setting and output folder, before
                                     any work), finetune_inputs, start_finetune, save_best, diverged_message,
                                     finish_pretrain (the backbone folder), write_finetune_result (the result record).

Nothing here trains: train.py decides what to write and when; this file decides how.
"""

import copy
import hashlib
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import data
import dynlora
import plots
import readout as readout_mod
import runtime
from model import GPTClassifier, GPTConfig, preset

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
GATES_FILE = "gates.jsonl"          # `cli.py gates`: how much each gated run's gates depend on the input
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
        # RESULTS.md's tables and the README's headline) do not count, or every run after the first would
        # be "dirty".
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results", ":(exclude)README.md", ":(exclude)RESULTS.md"], cwd=REPO,
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
        raise ValueError(f"{path} is a {ckpt['kind']} checkpoint; "
                         f"resume it with `python cli.py {ckpt['kind']} --resume`")
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


def allocator_state(allocator: dynlora.RankAllocator) -> dict:
    """Everything a RankAllocator needs to resume: its EMAs, last step and history (the masks are model
    buffers, saved with the weights)."""
    return {"last_step": allocator.last_step, "total_steps": allocator.total_steps,
            "layers": [name for name, _ in allocator.layers],
            "ipt": {n: {k: v.clone() for k, v in d.items()} for n, d in allocator.ipt.items()},
            "unc": {n: {k: v.clone() for k, v in d.items()} for n, d in allocator.unc.items()},
            "history": copy.deepcopy(allocator.history)}


def load_allocator_state(allocator: dynlora.RankAllocator, state: dict):
    """Load allocator_state's dict into an allocator of the same layers and total steps."""
    names = [name for name, _ in allocator.layers]
    if state["layers"] != names:
        raise ValueError(f"load_allocator_state: the state is for layers {state['layers'][:3]}..., "
                         f"this model has {names[:3]}...")
    if state["total_steps"] != allocator.total_steps:
        raise ValueError(f"load_allocator_state: the state was made for {state['total_steps']} total "
                         f"steps, this allocator for {allocator.total_steps}")
    for which in ("ipt", "unc"):
        for n in names:
            for k, v in state[which][n].items():
                getattr(allocator, which)[n][k].copy_(v)
    allocator.last_step = state["last_step"]
    allocator.history = copy.deepcopy(state["history"])


# What pretraining's and fine-tuning's checkpoints hold, and how a run starts: fresh, or from its checkpoint.
# `run` is train.py's PretrainRun / FinetuneRun.

def save_pretrain_checkpoint(run, t_start: float):
    run.log.state["wall_s"] = time.time() - t_start
    save_checkpoint(run.out, run.rt, {"kind": "pretrain", "config": run.run_config, "source": run.source,
                                      "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                                      "scaler": run.scaler.state_dict(), "state": run.log.state})
    run.saved_step = run.log.state["step"]


def save_finetune_checkpoint(run, t_start: float):
    """(The caller checks the weights are finite first: train.check_weights.)"""
    run.log.state["wall_s"] = time.time() - t_start
    save_checkpoint(run.out, run.rt, {
        "kind": "finetune", "config": run.run_config, "source": run.source,
        "model": training_weights(run.model, run.cfg.method), "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(), "state": run.log.state,
        "allocator": allocator_state(run.allocator) if run.allocator is not None else None})
    run.saved_step = run.log.state["step"]


def resume_pretrain(run, ckpt: dict | None) -> dict:
    """A pretraining run's starting state: fresh, or the checkpoint's, loaded into the run."""
    if ckpt is None:
        return {"step": 0, "log": [], "wall_s": 0.0, "tokens": 0, "run_id": uuid.uuid4().hex, "resumed": 0}
    saved = run.out / BACKBONE_FILE
    finished = ckpt["state"]["step"] == run.cfg.max_steps and saved.is_file() and \
        read_torch_file(saved, "delete it and --resume to write it again").get("run_id") == ckpt["state"]["run_id"]
    check_resume(ckpt, run.run_config, run.source, run.out, RESUME_MAY_CHANGE, flag_name, finished)
    run.model.load_state_dict(ckpt["model"])
    state = restore_training(ckpt, run.optimizer, run.scaler, run.rt)
    run.saved_step = state["step"]
    run.rt.print(f"pretrain: resuming {run.out} at step {state['step']} of {run.cfg.max_steps}")
    return state


def resume_finetune(run, ckpt: dict | None) -> dict:
    """A fine-tuning run's starting state: fresh (and config.json written), or the checkpoint's, loaded into
    the run. `epoch` is the epoch in progress (0-based) and `batch` the number of its batches consumed.
    """
    rt, out = run.rt, run.out
    if ckpt is None:
        if rt.is_main and (out / CHECKPOINT_FILE).is_file():
            print(f"finetune: starting over in {out}; its previous {CHECKPOINT_FILE} will be replaced "
                  f"(pass --resume to continue a run instead)")
        if rt.is_main:
            atomic_write_text(out / "config.json", json.dumps(run.run_config, indent=2))
        return {"step": 0, "epoch": 0, "batch": 0, "tokens": 0, "wall_s": 0.0, "best": {"score": -float("inf")},
                "history": [], "log": [], "run_id": uuid.uuid4().hex,
                "commit": git_commit() if rt.is_main else "", "resumed": 0}
    final = out / FINAL_FILE
    finished = final.is_file() and json.loads(final.read_text()).get("run_id") == ckpt["state"]["run_id"]
    # The effective learning rate is compared (run_config["lr"]), not the flag: --lr 0 means the default.
    settings = {**run.run_config, "finetune": {**run.run_config["finetune"], "lr": None}}
    # A checkpoint written before --readout existed read its prediction at <cls>.
    before = {"readout": "cls", "val_fraction": 0.0, "from_tune": "", "tuned_on": ""}   # fields added since
    saved = {**ckpt, "config": {**ckpt["config"], "finetune": {**before, **ckpt["config"]["finetune"], "lr": None}}}
    check_resume(saved, settings, run.source, out, RESUME_MAY_CHANGE, flag_name, finished)
    load_training_weights(run.model, ckpt["model"], run.cfg.method, out / CHECKPOINT_FILE)
    if run.allocator is not None:
        load_allocator_state(run.allocator, ckpt["allocator"])
    state = restore_training(ckpt, run.optimizer, run.scaler, rt)
    rt.print(f"finetune: resuming {out} at step {state['step']} of {run.total_steps} (epoch {state['epoch'] + 1}, "
             f"batch {state['batch']})")
    return state


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
# adapter file of save_adapter, applied to the backbone named in it), and the run's tokenizer.json.
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
        raise FileNotFoundError(f"--backbone {folder}: no {BACKBONE_FILE} there; run `python cli.py pretrain "
                                f"--out-dir {folder}` first, or pass --backbone '' for a random init")
    ckpt = read_torch_file(ckpt_path, f"restore it, or pretrain it again (`python cli.py pretrain --out-dir "
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
    return model.state_dict() if method == dynlora.FULL else adapter_state_dict(model)


def load_training_weights(model: GPTClassifier, weights: dict, method: str, path: Path):
    """Load a checkpoint's weights: the whole state dict (full) or the adapter tensors (adapter methods)."""
    odd = sorted(set(weights) ^ set(training_weights(model, method)))
    if odd:
        raise ValueError(f"{path} does not fit this model: tensor names differ (e.g. {odd[0]})")
    model.load_state_dict(weights, strict=method == dynlora.FULL)


# -- Adapter files -------------------------------------------------------------------------------------------
#
# An adapter file holds what fine-tuning changed -- a few hundred KB -- and a fingerprint of the backbone it
# was trained on, so that it cannot be silently applied to another one: per frozen tensor, its shape and two
# checksums (sum of |w| and of w^2, in float64). Comparing per tensor (rather than one hash) lets the error
# say what differs; comparing checksums with a tolerance (1e-4 relative) lets the same weights pass on
# another device, where float sums round differently. The file's config names its gate (AdapterConfig.gate),
# so it reloads with its own gate class from dynlora.GATES.

ADAPTER_FORMAT = "dynlora-adapter/2"   # written into every adapter file, checked on load


def adapter_config_from_dict(d: dict) -> dynlora.AdapterConfig:
    """The AdapterConfig saved in an adapter file, naming any key this version does not know. A dict saved
    before gate_x_dims existed reads as 0, the z-only gate it was trained with; one saved before `gate`, as
    "rank" (the field's default)."""
    known = {f.name for f in fields(dynlora.AdapterConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"AdapterConfig: unknown keys {unknown}; known keys are {sorted(known)}")
    return dynlora.AdapterConfig(**{"gate_x_dims": 0, **d})


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file stores: every tensor fine-tuning owns or changed.

    That is each LoRALinear's own parameters and buffers (A, B, lambda, mask, and the gate's: gate.*),
    the modules_to_save (the head), and the biases config.bias trains. The frozen backbone is left out.
    """
    config = dynlora.config_of(model)
    prefixes = [name + "." for name, _ in dynlora.adapter_layers(model)]
    state = {}
    for key, value in model.state_dict().items():
        owner = next((p for p in prefixes if key.startswith(p)), None)
        in_adapter = owner is not None and not key.startswith(owner + "base.")
        plain = key.replace(".base.", ".") if owner is not None else key
        if in_adapter or dynlora.trained_in_full(plain, config):
            state[key] = value
    return state


def backbone_fingerprint(model: nn.Module, config: dynlora.AdapterConfig) -> dict:
    """{parameter name: (shape, sum |w|, sum w^2)} over the frozen backbone, named as in the plain model.

    Works on the plain model and on the adapted one (where W0 lives at '<layer>.base.weight'), so a file's
    fingerprint can be checked before the adapters are applied.
    """
    layers = dynlora.adapter_layers(model)
    prefixes = [name + "." for name, _ in layers]
    if any(layer.merged for _, layer in layers):
        raise ValueError("the adapters are merged into the backbone weights; call unmerge_adapters(model) first")
    out = {}
    for name, p in model.named_parameters():
        owner = next((pre for pre in prefixes if name.startswith(pre)), None)
        if owner is not None and not name.startswith(owner + "base."):
            continue                                            # an adapter parameter
        plain = name.replace(".base.", ".") if owner is not None else name
        if dynlora.trained_in_full(plain, config):
            continue                                            # trained, stored in the file itself
        w = p.detach().double()
        out[plain] = (tuple(p.shape), w.abs().sum().item(), w.square().sum().item())
    return out


def _fingerprint_difference(saved: dict, here: dict) -> str | None:
    """One line saying how two backbone fingerprints differ, or None if they match."""
    only_saved, only_here = sorted(set(saved) - set(here)), sorted(set(here) - set(saved))
    if only_saved or only_here:
        bits = []
        if only_saved:
            bits.append(f"{len(only_saved)} tensor(s) of the file's backbone are missing here (e.g. {only_saved[0]})")
        if only_here:
            bits.append(f"this model has {len(only_here)} tensor(s) the file's backbone lacks (e.g. {only_here[0]})")
        return "; ".join(bits) + " -- a different architecture (n_layer?)"
    for name in saved:
        if tuple(saved[name][0]) != tuple(here[name][0]):
            return (f"{name} has shape {tuple(saved[name][0])} in the file's backbone but {tuple(here[name][0])} "
                    f"here -- a different architecture (n_embd, vocab_size?)")
    for name in saved:
        for (a, b), what in zip(zip(saved[name][1:], here[name][1:]), ("sum |w|", "sum w^2")):
            if abs(a - b) > 1e-4 * max(abs(a), abs(b), 1e-12):
                return (f"{name} has the same shape but different values ({what} {a:.6g} in the file, {b:.6g} "
                        f"here) -- a different pretrained checkpoint?")
    return None


def save_adapter(path, model: nn.Module, config: dynlora.AdapterConfig | None = None,
                 extra: dict | None = None) -> Path:
    """Write {"format", "config", "state", "backbone", "extra"} to path with torch.save, atomically
    (atomic_torch_save). `extra` is any small dict of plain values (numbers, strings, lists, dicts, tensors):
    metrics, the task, the allocator's state. Adapters must be unmerged.
    """
    config = config or dynlora.config_of(model)
    if config != dynlora.config_of(model):
        raise ValueError("save_adapter: the config given differs from the one the adapters were built with "
                         "(model.adapter_config)")
    payload = {
        "format": ADAPTER_FORMAT,
        "config": asdict(config),
        "state": {k: v.detach().cpu().clone() for k, v in adapter_state_dict(model).items()},
        "backbone": backbone_fingerprint(model, config),
        "extra": extra or {},
    }
    return atomic_torch_save(payload, path)


def load_adapter(path, model: nn.Module, payload: dict | None = None
                 ) -> tuple[nn.Module, dynlora.AdapterConfig, dict]:
    """Apply an adapter file to a plain model with the same backbone: returns (model, config, extra).

    The model is adapted in place (apply_lora with the file's config, so its gate is GATES[config.gate]), then
    the file's tensors are loaded, so the result computes exactly what the model that was saved computed. A
    file that does not fit the backbone -- other shapes, other n_layer, or the same shapes with other weights
    -- raises ValueError naming the file and the first difference; so does a file of an older format.

    payload: the file's contents, already read by the caller (read_torch_file, which names a damaged file);
    path then only names the file in messages. Without it the file is read here (weights_only).
    """
    path = Path(path)
    if payload is None:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(payload, dict) and payload.get("format") == "dynlora-adapter/1":
        raise ValueError(f"adapter file {path} was written by an older version of dynlora.py (format 1, whose gate "
                         f"tensors have other names: gate_weight, gate_bias, frozen_gate, gate_frozen); re-run the "
                         f"fine-tuning to write it in format 2, or check out the older commit to use it")
    if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: not a dynlora adapter file (expected format {ADAPTER_FORMAT!r})")
    if dynlora.adapter_layers(model):
        raise ValueError(f"{path}: load_adapter expects the plain backbone, but this model already has adapters")
    config = adapter_config_from_dict(payload["config"])
    difference = _fingerprint_difference(payload["backbone"], backbone_fingerprint(model, config))
    if difference:
        raise ValueError(f"adapter file {path} does not fit this model: {difference}")
    dynlora.apply_lora(model, config)
    expected = adapter_state_dict(model)
    state = payload["state"]
    if set(state) != set(expected):
        odd = sorted(set(state) ^ set(expected))
        raise ValueError(f"adapter file {path} does not fit this model: tensor names differ (e.g. {odd[0]})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"adapter file {path} does not fit this model: {key} has shape {tuple(value.shape)} "
                             f"in the file but {tuple(expected[key].shape)} here")
    model.load_state_dict(state, strict=False)
    return model, config, payload["extra"]


def save_finetuned(out: Path, model: GPTClassifier, method: str, adapter_cfg, meta: dict, allocator=None):
    """A fine-tuned model: the whole state dict in model.pt (full) or the adapter file adapter.pt.

    meta: task, method, num_outputs, backbone (the folder it was trained on), tokenizer_sha256, readout.
    """
    out = Path(out)
    if method == dynlora.FULL:
        atomic_torch_save({"config": model.config.to_dict(), "model": model.state_dict(), **meta}, out / "model.pt")
    else:
        extra = {**meta, "allocator": allocator_state(allocator) if allocator is not None else None}
        save_adapter(out / "adapter.pt", model, adapter_cfg, extra=extra)


FINETUNED_FIX = "restore it, or fine-tune the run again"


def restore_best(model: GPTClassifier, out: Path, method: str):
    """Load the best epoch's weights back from the file save_finetuned wrote (model.pt or adapter.pt)."""
    name, key = ("model.pt", "model") if method == dynlora.FULL else ("adapter.pt", "state")
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
        load_adapter(path, model, payload=payload)
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
# 5b. A run's inputs and its deployed form
#
# What train.py's setup reads before the first step -- the pretraining corpus and tokenizer, a fine-tuning
# run's backbone and its tokenized, batched data -- and what is derived from a trained adapter model: its
# figures, the deployed (merged) form and its score, the merged export. build_run_data is the one place
# finetune, eval, export and the gate analysis build a run's data, so a saved run's data is exactly its own.
# ---------------------------------------------------------------------------------------------------------

def read_corpus_files(paths: list) -> list:
    """The documents of --corpus files: one per non-empty line."""
    texts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise data.DataError(f"--corpus {p}: no such file; give plain-text files, one document per line")
        texts.extend(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return texts


def pretrain_tokens(cfg, rt, out: Path, fresh: bool):
    """(tokenizer path, train stream, held-out stream, init config, init weights) of a pretraining run
    (cfg: train.PretrainConfig).

    The tokenizer is the --init backbone's, or one trained on the same unlabeled training text (never on
    dev); rank 0 writes it into the run folder first, every rank then reads that file.
    """
    data_dir = data.resolve_data_dir(cfg.data_dir)
    tasks = [data.get_task(name) for name in cfg.tasks.split(",") if name.strip()]
    with rt.main_first():                                                # rank 0 downloads what is missing
        for task in tasks:
            data.ensure_task(data_dir, task)
    texts = data.pretrain_texts(data_dir, tasks) + read_corpus_files(cfg.corpus)
    if not texts:
        raise data.DataError("pretrain: the corpus is empty; give --tasks with train files or --corpus files")
    tok_path, init_config, init_state = out / TOKENIZER_FILE, None, None
    if cfg.init:
        init_config, init_state, _, init_tok_path = load_backbone(cfg.init)
        if cfg.block_size > init_config.block_size:
            raise ValueError(f"--block-size {cfg.block_size} exceeds the block_size {init_config.block_size} of "
                             f"--init {cfg.init}; use --block-size {init_config.block_size} or less")
    if rt.is_main and fresh:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.init:
            shutil.copyfile(init_tok_path, tok_path)
        else:
            print(f"pretrain: {len(texts):,} texts; training a {cfg.vocab_size}-token BPE tokenizer")
            data.save_tokenizer(data.train_tokenizer(texts, vocab_size=cfg.vocab_size), tok_path)
    rt.barrier()
    stream = data.lm_stream(data.load_tokenizer(tok_path), texts)        # (N,) int32, <eos> after each text
    n_hold = int(len(stream) * cfg.holdout)
    train_stream, val_stream = stream[: len(stream) - n_hold], stream[len(stream) - n_hold:]
    if len(train_stream) <= cfg.block_size * cfg.batch_size:
        raise data.DataError(f"pretrain: the corpus has {len(train_stream):,} training tokens, fewer than one batch "
                             f"(--batch-size {cfg.batch_size} x --block-size {cfg.block_size}); "
                             f"add text (--corpus, --tasks) or lower --block-size/--batch-size")
    return tok_path, train_stream, val_stream, init_config, init_state


def finetune_backbone(cfg, out: Path, data_dir: Path, task: data.TaskSpec, rt, fresh: bool):
    """(GPTConfig, backbone weights or None, tokenizer, tokenizer path, source hash) of a fine-tuning run
    (cfg: train.FinetuneConfig); the run folder gets a copy of the tokenizer."""
    if cfg.backbone:
        config, backbone_state, tok, tok_path = load_backbone(cfg.backbone)
        source = file_sha256(Path(cfg.backbone) / BACKBONE_FILE)
        if rt.is_main and tok_path.resolve() != (out / TOKENIZER_FILE).resolve():
            shutil.copyfile(tok_path, out / TOKENIZER_FILE)
        return config, backbone_state, tok, tok_path, source
    if rt.is_main:
        warnings.warn("fine-tuning from a RANDOM initialisation (--backbone ''): expect much lower scores; "
                      "run `python cli.py pretrain` for a backbone", stacklevel=3)
    tok_path = out / TOKENIZER_FILE
    if rt.is_main and fresh:
        data.save_tokenizer(data.train_tokenizer(data.pretrain_texts(data_dir, [task]), vocab_size=8192), tok_path)
    rt.barrier()
    tok = data.load_tokenizer(tok_path)
    config = preset("cpu", vocab_size=tok.get_vocab_size(), pad_id=tok.token_to_id(data.PAD))
    return config, None, tok, tok_path, file_sha256(tok_path)


@dataclass
class RunData:
    """A fine-tuning run's data, tokenized and batched."""
    train_examples: int                     # training examples used (after --max-train)
    train: data.BucketBatcher               # the training batches, shuffled by the run's seed
    dev: dict                               # split name -> BucketBatcher, sorted by length ("validation" if held out)
    held_out: int = 0                       # training examples held out as the validation set (--val-fraction)


def cache_dir(backbone: str, run_dir: Path) -> Path:
    """Where a run's tokenized splits are cached: beside the backbone's tokenizer, so that every run on one
    backbone tokenizes a split once; in the run folder when there is no backbone (its own tokenizer)."""
    return (Path(backbone) if backbone else Path(run_dir)) / "cache"


def build_run_data(task: data.TaskSpec, data_dir: Path, tok, tok_path: Path, cache: Path, max_len: int,
                   batch_size: int, seed: int, max_train: int, rt, readout_name: str = "cls",
                   val_fraction: float = 0.0) -> RunData:
    """Tokenize (through the cache) and batch a run's train and dev splits: the one place finetune, eval and
    export build their data, so the calibration batches of a merged export are exactly finetune's.

    With val_fraction > 0 a fixed part of the TRAIN split (data.validation_split: the same for every seed and
    method) is scored in place of dev, whose files are then never read; --max-train applies to the rest.
    The training batches are global batches: every process builds the same ones and computes its share of
    each (train.train_step); evaluation shares out whole batches (train.predict).
    """
    splits = ("train",) if val_fraction else ("train", *task.dev_files)
    with rt.main_first():                                                # rank 0 fills the cache
        encoded = {split: data.cached_encode(tok, tok_path, task, split, data.read_split(data_dir, task, split),
                                             max_len, cache, readout_name, readout_mod.template_of(task, readout_name))
                   for split in splits}
    train_ids, train_labels = encoded.pop("train")
    held = []
    if val_fraction:
        keep, held = data.validation_split(len(train_ids), val_fraction, batch_size, task.name)
        encoded = {data.VALIDATION: ([train_ids[i] for i in held], train_labels[held])}
        train_ids, train_labels = [train_ids[i] for i in keep], train_labels[keep]
    if max_train:
        train_ids, train_labels = train_ids[:max_train], train_labels[:max_train]
    return RunData(len(train_ids), data.BucketBatcher(train_ids, train_labels, batch_size, shuffle=True, seed=seed),
                   {split: data.BucketBatcher(ids, labels, 2 * batch_size, shuffle=False)
                    for split, (ids, labels) in encoded.items()}, held_out=len(held))


def saved_run_data(run: Path, meta: dict, data_dir: str | None, backbone: str | None, tok) -> RunData:
    """A saved run's data, rebuilt from its config.json exactly as finetune built it."""
    cfg = read_run_config(run)["finetune"]
    task = data.get_task(meta["task"])
    ddir = data.resolve_data_dir(data_dir)
    data.ensure_task(ddir, task)
    rt = runtime.Runtime(torch.device("cpu"), "fp32")
    return build_run_data(task, ddir, tok, run / TOKENIZER_FILE, cache_dir(backbone or cfg["backbone"], run),
                          cfg["max_len"], cfg["batch_size"], cfg["seed"], cfg["max_train"], rt,
                          cfg.get("readout", "cls"), cfg.get("val_fraction", 0.0))


def plot_pretrain(out: Path, log: list):
    """A pretraining run's curves.png."""
    plots.pretrain_curves(log, Path(out) / "curves.png")


def plot_finetune(out: Path, history: list, task: str, allocator=None):
    """A fine-tuning run's curves.png, and an allocating run's rank plots."""
    plots.finetune_curves(history, task, Path(out) / "curves.png")
    if allocator is not None:
        plots.allocation_plots(allocator.history, Path(out), total_steps=allocator.total_steps,
                               initial_ranks={name: m.r for name, m in allocator.layers})


CALIBRATION_BATCHES = 20     # training batches whose mean gate replaces a gated layer's gate for merging


def calibration_batches(run_data: RunData, rt):
    """The first CALIBRATION_BATCHES training batches of epoch 0, the same on every process."""
    return ((idx.to(rt.device), y) for idx, y in itertools.islice(run_data.train.epoch(0), CALIBRATION_BATCHES))


def export_merged(run_dir: str, out_dir: str | None = None, data_dir: str | None = None,
                  backbone: str | None = None) -> Path:
    """Write an adapter run's model with the adapter merged into the weights: a plain model.pt, as full
    fine-tuning writes, which runs at the base model's speed and which `eval` scores like any run.

    LoRA and allocation-only adapters merge exactly (masks enter dW). A gated adapter's update depends on
    the input, so, as finetune does for its `merged_score`, each gate is first frozen to its mean over the
    run's calibration batches: the export is that static approximation, and scores exactly the run's
    `merged_score`. Returns the folder written (default: the run folder + "-merged").
    """
    run = Path(run_dir)
    if not (run / "adapter.pt").is_file():
        raise FileNotFoundError(f"--run {run}: no adapter.pt there; export merges an adapter run (lora, alloc, "
                                f"gate, dynlora, adalora); a full fine-tuning run's model.pt is already plain")
    model, tok, meta = load_finetuned(run, backbone)
    if model.adapter_config.gating:
        run_data = saved_run_data(run, meta, data_dir, backbone, tok)
        dynlora.freeze_gates(model, calibration_batches(run_data, runtime.Runtime(torch.device("cpu"), "fp32")),
                             pad_id=model.gpt.config.pad_id)
    merged = dynlora.merge_and_unload(model)
    out = Path(out_dir) if out_dir else run.with_name(run.name + "-merged")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / TOKENIZER_FILE, out / TOKENIZER_FILE)
    atomic_write_text(out / "config.json", (run / "config.json").read_text())
    atomic_torch_save({"config": merged.gpt.config.to_dict(), "model": merged.state_dict(),
                       **{k: meta[k] for k in ("task", "num_outputs", "tokenizer_sha256", "backbone")},
                       "method": meta["method"], "readout": meta.get("readout", "cls"), "merged_from": str(run)},
                      out / "model.pt")
    return out


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


# ---------------------------------------------------------------------------------------------------------
# 7. Comparing runs: the one t interval (the report's paired tables, the known-answer benchmark's summary)
#
# Runs with the same seed share their batch order (and initialisation where shapes agree) across methods,
# so a method is compared with a reference seed by seed: d_s = score(method, s) - score(reference, s). With
# n pairs, the 95% interval of the mean difference is mean(d) +- t(n - 1) sd(d) / sqrt(n), t the two-sided
# 95% quantile of Student's t with n - 1 degrees of freedom.

T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,      # df 1..10
       2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,       # df 11..20
       2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]       # df 21..30
Z95 = 1.960                                                     # the normal quantile, for df > 30
EQUAL_POINTS = 1e-9      # paired differences closer than this are equal (in points: the same dev examples apart)


def t_quantile_95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with df degrees of freedom (t(2) = 4.303)."""
    if df < 1:
        raise ValueError(f"t_quantile_95 needs df >= 1, got {df}")
    return T95[df - 1] if df <= len(T95) else Z95


def paired_ci(diffs) -> tuple[float, float | None, int]:
    """(mean, half-width of the 95% t interval, n) of paired differences; half-width None when n < 2, and
    when the n differences are all equal: a spread of 0 is no estimate of the variance (with a metric counted
    in whole dev examples, two seeds can differ by the same example count by chance), and the t interval it
    would give, of width 0, would exclude 0 whatever n."""
    diffs = np.asarray(list(diffs), dtype=np.float64)
    n = len(diffs)
    if n < 2 or np.ptp(diffs) < EQUAL_POINTS:
        return (float(diffs.mean()) if n else math.nan), None, n
    half = t_quantile_95(n - 1) * diffs.std(ddof=1) / math.sqrt(n)
    return float(diffs.mean()), float(half), n


def verdict(low, high, higher_is_better: bool) -> str:
    """A method against a reference from the 95% interval [low, high] of their paired difference: "better" or
    "worse" when the interval excludes 0 (on the side `higher_is_better` says), else "tie" (also with no
    interval: None or NaN bounds)."""
    if low is None or high is None or math.isnan(low) or math.isnan(high) or (low <= 0 <= high):
        return "tie"
    return "better" if (low > 0) == higher_is_better else "worse"


# ---------------------------------------------------------------------------------------------------------
# 8. Settings: the one range check, and the --flag of every setting
#
# A config is a dataclass whose number fields declare their allowed range in metadata (bounds()). cli.py
# makes a --flag of every field; check_config checks every number against its field's range, and that it is
# finite, naming the flag: the one range check of every config (train's, the adapter's, tune's, planted's).
# ---------------------------------------------------------------------------------------------------------

def bounds(low=None, high=None, low_open=False, high_open=False) -> dict:
    """Field metadata: the allowed range of a number (None = unbounded; *_open = the bound itself excluded)."""
    return {"bounds": (low, high, low_open, high_open)}


# Flag names of dynlora.AdapterConfig's fields: the five LoRA fields whose bare names would be ambiguous next
# to the fine-tuning flags get a "lora-" prefix (--lora-r, --lora-alpha, --lora-dropout, --lora-targets,
# --lora-bias); every other field keeps its name (--target-r, --gate-penalty, ...).
FLAG_NAMES = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "lora_targets",
              "bias": "lora_bias"}

# train.FinetuneConfig / PretrainConfig fields that may differ when a run is resumed: where things are, where
# the result goes, how many threads. Every other field shapes the training and must match the checkpoint's.
RESUME_MAY_CHANGE = {"data_dir", "out_dir", "threads", "suite", "results_dir", "from_tune", "tuned_on"}


def flag(name: str, rename: dict | None = None) -> str:
    """The --flag of a config field."""
    return "--" + (rename or {}).get(name, name).replace("_", "-")


def parse_number(text: str) -> int | float:
    """A value of a field typed int | float, as typed: "50" -> 50, "0.1" -> 0.1 (t_init: steps or a fraction)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def check_config(cfg, rename: dict | None = None):
    """Raise ValueError, naming the --flag, for a number that is not finite or outside its field's bounds."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise ValueError(f"{flag(f.name, rename)} must be a finite number, got {value}")
        low, high, low_open, high_open = f.metadata.get("bounds", (None, None, False, False))
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {number(low)}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {number(high)}"
            raise ValueError(f"{flag(f.name, rename)} must be {' and '.join(x for x in (lo, hi) if x)}, "
                             f"got {number(value)}")


def number(x) -> str:
    """A bound or a value as the user would type it: an int whole (a seed of 4294967295), a float short."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def flag_name(section: str, key: str) -> str:
    """How the user sets a field of a saved run config: its --flag, or its place in the backbone."""
    if section == "adapter":
        return flag(key, FLAG_NAMES)
    if section == "model":
        return f"the backbone's {key}"
    return flag(key or section)


def adapter_config_of(cfg, overrides: dict) -> dynlora.AdapterConfig | None:
    """The adapter settings of a fine-tuning run (cfg: train.FinetuneConfig): the method's defaults with the
    flags given (overrides); None for full fine-tuning."""
    methods = list(dynlora.method_names())
    if cfg.method not in methods:
        raise ValueError(f"--method {cfg.method!r} is not known; choose one of {methods}")
    if cfg.method == dynlora.FULL:
        if overrides:
            raise ValueError(f"adapter options ({', '.join(sorted(overrides))}) need an adapter --method, "
                             f"not {dynlora.FULL!r}")
        return None
    try:
        adapter_cfg = dynlora.config_for_method(cfg.method, **overrides)
    except ValueError as err:            # AdapterConfig names its field; the user typed the field's flag
        names = {f.name for f in fields(dynlora.AdapterConfig)}
        raise ValueError(re.sub(r"^AdapterConfig: (\w+)", lambda m: flag(m.group(1), FLAG_NAMES)
                                if m.group(1) in names else m.group(0), str(err))) from None
    check_config(adapter_cfg, FLAG_NAMES)
    return adapter_cfg


# ---------------------------------------------------------------------------------------------------------
# 9. A run's setup and end, besides the training (train.py's pretrain and finetune call these)
#
# Before the first step every setting and every place the run writes is checked, so that a typo fails in
# seconds rather than after an epoch; then the data is found (rank 0 downloads what is missing), tokenized
# and batched. After the last step: the backbone folder, or the result record -- appended to the results
# file, then final.json, which marks the run finished. `run` is train.py's PretrainRun / FinetuneRun.
# ---------------------------------------------------------------------------------------------------------

def check_pretrain(cfg, shape: dict, system) -> Path:
    """Check a pretraining run's settings (cfg: train.PretrainConfig; shape: the model-shape fields it sets;
    system: train.SystemConfig) and its output folder; return the folder."""
    check_config(cfg)
    if cfg.warmup_steps >= cfg.max_steps:
        raise ValueError(f"need --warmup-steps < --max-steps (got {cfg.warmup_steps}, {cfg.max_steps})")
    preset(cfg.preset, block_size=cfg.block_size, dropout=cfg.dropout, **shape)   # fail fast on the shape
    out = Path(cfg.out_dir)
    check_output_folder(out, "--out-dir")
    check_config(system)
    return out


def finish_pretrain(run, wall: float):
    """Write the backbone folder (rank 0) and say what was trained."""
    log = run.log.state["log"]
    if run.rt.is_main:
        save_backbone(run.out, run.config, run.model.state_dict(), run.run_config,
                      pretrain=asdict(run.cfg), wall_s=wall, run_id=run.log.state["run_id"])
        plot_pretrain(run.out, log)
        held_out = [r["val_loss"] for r in log if "val_loss" in r]
        print(f"pretrain: done in {wall / 60:.1f} min; final train loss {log[-1]['train_loss']:.3f}"
              + (f", held-out loss {held_out[-1]:.3f}" if held_out else "") + f"; saved {run.out / BACKBONE_FILE}")
    run.rt.barrier()


def run_name(cfg) -> str:
    """A fine-tuning run's default folder name: <task>-<method>-s<seed>."""
    return f"{data.get_task(cfg.task).name}-{cfg.method}-s{cfg.seed}"


def check_finetune(cfg, overrides: dict, system) -> tuple:
    """(task, adapter config or None, run folder) of a fine-tuning run (cfg: train.FinetuneConfig; overrides:
    the adapter settings given; system: train.SystemConfig), with every setting and output folder checked."""
    check_config(cfg)
    task = data.get_task(cfg.task)
    readout_mod.check(cfg.readout, task)
    adapter_cfg = readout_mod.adapter_config(adapter_config_of(cfg, overrides), cfg.readout)
    out = Path(cfg.out_dir or REPO / "runs" / run_name(cfg))
    check_output_folder(out, "--out-dir")
    check_results_folder(results_folder(cfg.results_dir, cfg.suite))
    check_config(system)
    return task, adapter_cfg, out


def finetune_inputs(cfg, task: data.TaskSpec, out: Path, rt, fresh: bool) -> tuple:
    """(backbone config, backbone weights, tokenizer, RunData, source hash) of a fine-tuning run: the run
    folder made, the task's files found, the backbone read, the splits tokenized (through the cache) and
    batched."""
    out.mkdir(parents=True, exist_ok=True)
    data_dir = data.resolve_data_dir(cfg.data_dir)
    with rt.main_first():                                                # rank 0 downloads what is missing
        data.ensure_task(data_dir, task)
    config, backbone_state, tok, tok_path, source = finetune_backbone(cfg, out, data_dir, task, rt, fresh)
    if cfg.max_len > config.block_size:
        raise ValueError(f"--max-len {cfg.max_len} exceeds the backbone's block_size {config.block_size}; "
                         f"use --max-len {config.block_size} or less")
    run_data = build_run_data(task, data_dir, tok, tok_path, cache_dir(cfg.backbone, out), cfg.max_len,
                              cfg.batch_size, cfg.seed, cfg.max_train, rt, cfg.readout, cfg.val_fraction)
    return config, backbone_state, tok, run_data, source


def start_finetune(run, ckpt: dict | None):
    """Say what a fine-tuning run trains and start its log: fresh (config.json written), or resumed from
    the checkpoint (loaded into the run)."""
    cfg, rt, task = run.cfg, run.rt, run.task
    run.counts = dynlora.count_parameters(run.model)
    trainable, total = run.counts
    rt.print(f"finetune {task.name} ({cfg.method}): {run.data.train_examples:,} train examples, {run.total_steps} "
             f"steps; trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); "
             f"{rt.world_size} process(es) on {rt.device.type}, {rt.precision}")
    run.run_config = {"finetune": asdict(cfg), "lr": run.lr, "model": run.config.to_dict(), "task": task.name,
                      "adapter": asdict(run.adapter_cfg) if run.adapter_cfg else None}
    run.log = RunLog(run.out, resume_finetune(run, ckpt), rt.is_main)
    run.saved_step = run.log.state["step"] if ckpt is not None else None


def save_best(run):
    """Save a fine-tuning run's model as its best so far (rank 0), with what the file says about itself."""
    meta = {"task": run.task.name, "method": run.cfg.method, "num_outputs": run.task.num_outputs,
            "tokenizer_sha256": file_sha256(run.out / TOKENIZER_FILE), "backbone": run.cfg.backbone,
            "readout": run.cfg.readout}
    save_finetuned(run.out, run.model, run.cfg.method, run.adapter_cfg, meta, run.allocator)


def diverged_message(run, what: str, step: int, epoch: int | None) -> str:
    """What a run says when it stops on a non-finite loss or weights (train.DivergedError)."""
    ckpt = run.out / CHECKPOINT_FILE
    last = f"the last good checkpoint is {ckpt} (step {run.saved_step})" if run.saved_step is not None else \
        "no checkpoint of this run was written yet"
    fp16 = ", or use --precision bf16 or fp32" if run.rt.precision == "fp16" else ""
    return (f"{what} at step {step}{'' if epoch is None else f' (epoch {epoch + 1})'}; the run stopped, nothing "
            f"from it was saved, and {last}; lower --lr (it was {run.lr:g}){fp16}, or check the data, and start "
            f"the run again")


def write_finetune_result(run, wall: float, final: dict, inference: dict) -> dict:
    """The result record of a fine-tuning run whose best model is restored: the best epoch's and the last
    epoch's scores, final (the trained model's adapter size and ranks), inference (the deployed forms), the
    costs; appended to the results file, then final.json, then the plots (rank 0)."""
    cfg, rt, state, method = run.cfg, run.rt, run.log.state, run.cfg.method
    best, history = state["best"], state["history"]
    result = {
        "task": run.task.name, "method": method, "seed": cfg.seed, "suite": cfg.suite,
        "score": best["score"], "best_epoch": best["epoch"], "dev": best["dev"],
        "last_score": history[-1]["score"], "epochs": cfg.epochs, "lr": run.lr, "readout": cfg.readout,
        "trainable_params": run.counts[0], "total_params": run.counts[1],
        "active_adapter_params": dynlora.active_parameter_count(run.model) if run.adapter_cfg is not None else None,
        "final_active_adapter_params": final["final_active_adapter_params"], **inference,
        "final_ranks": final["final_ranks"],
        "train_examples": run.data.train_examples, "wall_s": round(wall, 1),
        **({"split": data.VALIDATION, "val_fraction": cfg.val_fraction, "val_examples": run.data.held_out}
           if cfg.val_fraction else {}),
        **({"from_tune": cfg.from_tune, "tuned_on": data.get_task(cfg.tuned_on or cfg.task).name}
           if cfg.from_tune else {}),
        "tokens_per_s": round(state["tokens"] / max(1e-9, wall), 1), "train_tokens": state["tokens"],
        "padding_fraction": round(run.data.train.padding_fraction(cfg.epochs), 4),
        "compiled": run.compiled,
        "device": rt.device.type, "precision": rt.precision, "processes": rt.world_size,
        "resumed": state["resumed"], "run_id": state["run_id"],
        "backbone": cfg.backbone, "backbone_sha256": run.source if cfg.backbone else None,
        "machine": machine_description(), "commit": state["commit"],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "run_dir": str(run.out),
    }
    if rt.is_main:
        # The results line first, then final.json, which marks the run finished: a run whose writing failed
        # in between is resumed from its last checkpoint (the finished training) and appends nothing twice
        # (append_result skips a run_id it already holds). The plots come last: a failure there loses nothing.
        append_result(result, results_folder(cfg.results_dir, cfg.suite))
        atomic_write_text(run.out / FINAL_FILE, json.dumps(result, indent=2))
        plot_finetune(run.out, history, run.task.name, run.allocator)
        print(f"finetune {run.task.name} ({method}): best {'validation' if cfg.val_fraction else 'dev'} score "
              f"{100 * best['score']:.2f} at epoch {best['epoch']}, {wall / 60:.1f} min; run folder {run.out}")
    rt.barrier()
    return result
