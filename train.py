"""
train.py -- the command line: pretrain a GPT, fine-tune it on GLUE, evaluate, report, benchmark.

    python train.py                      # the main job: pretrain (once, cached), fine-tune SST-2, print results
    python train.py pretrain  [options]  # causal-LM pretraining on the unlabeled GLUE train text (+ --corpus)
    python train.py finetune --task T --method M [options]   # M: full | lora | alloc | gate | dynlora | adalora
    python train.py eval --run runs/<run>                   # score a saved fine-tuned model on the dev split(s)
    python train.py report                                  # render the README's result tables from results/
    python train.py bench                                   # speed and memory figures, side by side
    python train.py import-gpt2 --gpt2-dir D --out-dir O    # turn Hugging Face GPT-2 files into a backbone folder

    torchrun --nproc_per_node=N train.py finetune ...       # the same command on N processes (DDP)
    python train.py finetune ... --resume                   # continue a killed run from its checkpoint.pt

Every option of a subcommand is a field of its config dataclass below (PretrainConfig, FinetuneConfig,
dynlora.AdapterConfig, and SystemConfig for how to run); the argparse flags are generated from them, with
each field's help text.

What this file holds, in order:
  1. Configs and the flag generator
  2. Small utilities: seeding, atomic saves, machine and git description
  3. The training step (devices, mixed precision, DDP, gradient accumulation) and checkpoints (resume)
  4. Pretraining
  5. Fine-tuning and evaluation
  6. Results: the results/ files and the README report
  7. The main job and the command line
"""

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field, fields, asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import data
import dynlora
import model as gptmodel
import runtime
from model import GPT, GPTClassifier, GPTConfig

REPO = Path(__file__).resolve().parent
RESULTS_DIR = REPO / "results"


# ---------------------------------------------------------------------------------------------------------
# 1. Configs and the flag generator
#
# A config is a plain dataclass with a comment on each field; add_config_args turns the fields into --flags
# and the comments into their --help. No exec, no globals: a run's whole configuration is one object,
# saved with the run as JSON.
#
# PretrainConfig and FinetuneConfig say WHAT to train: a resumed run must repeat them exactly. SystemConfig
# says HOW to run it -- device, precision, processes, checkpoints -- and may change between the attempts of
# one run (resume a CPU run on a GPU, or on more processes). Fields of the first kind that only say where
# things are or where results go may change too (RESUME_MAY_CHANGE).
# ---------------------------------------------------------------------------------------------------------

@dataclass
class PretrainConfig:
    out_dir: str = "runs/backbone"                      # folder for the backbone checkpoint, its tokenizer and curves
    data_dir: str | None = None                         # GLUE folder (default: $GLUE_DIR, else ./data/glue)
    tasks: str = "CoLA,SST-2,MRPC,STS-B,RTE"            # GLUE tasks whose unlabeled TRAIN text is the corpus
    corpus: list = field(default_factory=list)          # extra plain-text files, one document per line
    init: str = ""                                      # backbone folder to start from (its weights, shape, tokenizer); '' = a new model
    preset: str = "cpu"                                 # model size: nano | cpu | gpt2 (see model.PRESETS)
    n_layer: int = 0                                    # transformer blocks (0 = the preset's)
    n_head: int = 0                                     # attention heads; must divide the width (0 = the preset's)
    n_embd: int = 0                                     # width of the residual stream (0 = the preset's)
    vocab_size: int = 8192                              # BPE vocabulary size, special tokens included
    block_size: int = 128                               # context length in tokens
    batch_size: int = 32                                # sequences per step
    max_steps: int = 400                                # optimizer steps
    lr: float = 1e-3                                    # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1                           # final learning rate as a fraction of the peak (cosine decay)
    warmup_steps: int = 40                              # linear warm-up steps
    weight_decay: float = 0.1                           # AdamW weight decay on matrices (not on biases or LayerNorm)
    grad_clip: float = 1.0                              # clip the global gradient norm to this (0 = off)
    dropout: float = 0.0                                # dropout probability
    holdout: float = 0.02                               # fraction of the token stream held out to measure validation loss
    eval_every: int = 100                               # steps between validation-loss measurements
    seed: int = 1337                                    # random seed
    threads: int = 0                                    # CPU threads (0 = PyTorch's default)


@dataclass
class FinetuneConfig:
    task: str = "SST-2"                                 # GLUE task: CoLA SST-2 MRPC STS-B QQP MNLI QNLI RTE WNLI
    method: str = "full"                                # full | lora | alloc | gate | dynlora | adalora
    backbone: str = "runs/backbone"                     # pretrained backbone folder ('' = random init, with a warning)
    data_dir: str | None = None                         # GLUE folder (default: $GLUE_DIR, else ./data/glue)
    out_dir: str = ""                                   # run folder (default: runs/<task>-<method>-s<seed>)
    epochs: int = 3                                     # passes over the training set
    batch_size: int = 32                                # examples per step
    lr: float = 0.0                                     # peak learning rate (0 = the method's default: 2e-4 full, 1e-3 adapters)
    min_lr_ratio: float = 0.1                           # final learning rate as a fraction of the peak (cosine decay)
    warmup_ratio: float = 0.06                          # fraction of the steps spent in linear warm-up
    weight_decay: float = 0.01                          # AdamW weight decay on matrices
    grad_clip: float = 1.0                              # clip the global gradient norm to this (0 = off)
    max_len: int = 128                                  # longest input in tokens; longer pairs are truncated, longest text first
    max_train: int = 0                                  # use only the first N training examples (0 = all), for quick trials
    seed: int = 0                                       # random seed (initialisation of new weights, dropout, batch order)
    threads: int = 0                                    # CPU threads (0 = PyTorch's default)
    suite: str = ""                                     # label stored with the result, to group runs in the report
    results_dir: str = "results"                        # folder whose finetune.jsonl gets this run's final metrics appended


@dataclass
class SystemConfig:
    device: str = "auto"                                # auto | cpu | cuda | mps (auto: cuda if present, else mps, else cpu)
    precision: str = "auto"                             # auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp16 without bf16, fp32 on CPU)
    compile: bool = False                               # torch.compile the training step (slow start, faster steps on a GPU)
    grad_accum: int = 1                                 # micro-steps per optimizer step; --batch-size stays the global batch
    save_every: int = 0                                 # also checkpoint every N optimizer steps (0 = only at epoch ends / evaluations)
    resume: bool = False                                # continue the run in the run folder from its checkpoint.pt
    dist_timeout: float = 300                           # seconds to wait for the other processes (start-up and each exchange)


# FinetuneConfig / PretrainConfig fields that may differ when a run is resumed: where things are, where the
# result goes, how many threads. Every other field shapes the training and must match the checkpoint's.
RESUME_MAY_CHANGE = {"data_dir", "out_dir", "threads", "suite", "results_dir"}


def field_comments(cls) -> dict:
    """{field name: its end-of-line comment} read from the class's source: the comments are the --help."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for line in inspect.getsource(klass).splitlines():
                match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
                if match:
                    comments[match.group(1)] = match.group(2).strip()
    return comments


def add_config_args(parser: argparse.ArgumentParser, cls, rename: dict | None = None, only_if_given: bool = False):
    """Add one --flag per dataclass field: its name, type and default come from the field, its help from
    the field's comment.

    With only_if_given, a flag the user does not pass is left out of the parsed namespace, so that a preset
    (such as a method's adapter settings) can supply its own value for it.
    """
    rename = rename or {}
    comments = field_comments(cls)
    for f in fields(cls):
        flag = "--" + rename.get(f.name, f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = comments.get(f.name, "") + f" (default: {default})"
        kw = dict(dest=f.name, help=help_text, default=argparse.SUPPRESS if only_if_given else default)
        kind = type(default) if default is not None else str
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind is list:                                  # e.g. --corpus a.txt b.txt
            parser.add_argument(flag, nargs="*", type=str, **kw)
        elif kind is tuple:                                 # e.g. --lora-targets q_proj,v_proj
            parser.add_argument(flag, type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()), **kw)
        else:
            parser.add_argument(flag, type=kind, **kw)


def config_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


# ---------------------------------------------------------------------------------------------------------
# 2. Small utilities
# ---------------------------------------------------------------------------------------------------------

def seed_everything(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def set_threads(n: int):
    if n > 0:
        torch.set_num_threads(n)


class SaveError(OSError):
    """A file could not be written (e.g. the disk is full); the previous version of the file is intact."""


def atomic_torch_save(obj, path: Path):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written file.

    os.replace is atomic on POSIX and Windows: readers see the old file or the new one, never a mix. When
    the write fails (a full disk), the temporary file is removed and the old file is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise SaveError(f"could not write {path} ({err.strerror or err}); {kept}; free some disk space and run "
                        f"again (with --resume to continue from the last checkpoint)") from None


def atomic_write_text(path: Path, text: str):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


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


def cosine_schedule(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices are decayed, vectors (biases, LayerNorm, gates) not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


class Throughput:
    """Tokens per second over the recent steps, for the progress bar."""

    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, n: int) -> float:
        self.tokens += n
        return self.tokens / max(1e-9, time.perf_counter() - self.t0)


# ---------------------------------------------------------------------------------------------------------
# 3. The training step and checkpoints
#
# One optimizer step, whatever the machine (train_step): the global batch (--batch-size rows) is split over
# the processes and the gradient-accumulation micro-steps (runtime.split_batch); each part runs forward
# under autocast and backward; DDP all-reduces the gradients during the last micro-step only; then the
# gradients are unscaled (fp16), clipped, and the optimizer steps. With one process, one micro-step and fp32
# this is exactly the plain loop: forward, backward, clip, step.
#
# Checkpoints. A run folder's checkpoint.pt holds everything the rest of the run depends on: the weights
# that train, the optimizer's moments, the gradient scaler, the allocator's EMAs (its masks are model
# buffers, saved with the weights), the step and the position in the data, the best score so far, the
# metrics log, and every process's random-number generators. The data needs no more than a position:
# the batchers are deterministic functions of (seed, epoch), so the position is the number of batches
# consumed in the current epoch. The learning rate is a pure function of the step. --resume rebuilds the
# run from its settings, checks them against the checkpoint's, loads it and continues: the resumed run
# takes exactly the steps the uninterrupted run would have taken (tests/test_scale.py kills a run with
# SIGKILL and checks that the resumed one ends bit for bit where the uninterrupted one does).
#
# Only rank 0 writes; checkpoints are written atomically (atomic_torch_save), so a crash during a save
# leaves the previous checkpoint in place.
# ---------------------------------------------------------------------------------------------------------

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "dynlora-checkpoint/1"


def check_system(system: SystemConfig, batch_size: int, rt: runtime.Runtime):
    """Fail fast, naming the flag, on settings of how to run that cannot work."""
    if system.grad_accum < 1 or system.save_every < 0:
        raise ValueError(f"--grad-accum must be >= 1 (got {system.grad_accum}) and --save-every >= 0 "
                         f"(got {system.save_every})")
    parts = rt.world_size * system.grad_accum
    if batch_size < parts:
        raise ValueError(f"--batch-size {batch_size} is the global batch, shared by {rt.world_size} process(es) x "
                         f"--grad-accum {system.grad_accum}; it must be at least {parts}")


def train_step(model: nn.Module, batch, rt: runtime.Runtime, grad_accum: int, optimizer, scaler, params: list,
               grad_clip: float, extra_loss=None) -> tuple[float, bool]:
    """One optimizer step on one global batch (idx (B, T), targets): forward and backward of this process's
    parts, clipping, the optimizer step. The caller sets the learning rate before and zeroes the gradients
    after (the rank allocator reads them in between).

    model is the module to call (wrapped by DDP and/or torch.compile); extra_loss, when given, returns a
    penalty added to each part's loss right after its forward pass (the adapters' regularisation).
    Returns (the global batch's mean loss over all processes, whether the optimizer stepped: False when
    fp16 gradients overflowed and the scaler skipped the step).
    """
    idx, targets = batch
    parts = runtime.split_batch(len(idx), rt.rank, rt.world_size, grad_accum)
    loss_sum = torch.zeros((), device=rt.device)
    for m, (rows, weight) in enumerate(parts):
        # Only the last backward pass all-reduces; the earlier ones accumulate into .grad locally.
        with contextlib.nullcontext() if m == len(parts) - 1 else runtime.no_sync(model):
            with rt.autocast():
                _, loss = model(idx[rows].to(rt.device), targets[rows].to(rt.device))   # (n_i, T) -> scalar
                objective = loss + extra_loss() if extra_loss is not None else loss
            scaler.scale(objective * weight).backward()
        loss_sum += loss.detach().float() * (weight / rt.world_size)   # this part's share of the global mean
    scaler.unscale_(optimizer)                 # in place: clipping and the allocator see the true gradients
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scale = scaler.get_scale()
    scaler.step(optimizer)                     # optimizer.step(), unless fp16 gradients are inf/nan
    scaler.update()
    stepped = scaler.get_scale() >= scale      # the scaler lowers its scale exactly when it skipped the step
    return rt.sum([loss_sum.item()])[0], stepped


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


def save_checkpoint(out: Path, rt: runtime.Runtime, payload: dict):
    """Write <out>/checkpoint.pt. Every rank must call it (their RNG states are gathered); rank 0 writes."""
    rngs = rt.gather(rng_state())
    if rt.is_main:
        atomic_torch_save({"format": CHECKPOINT_FORMAT, **payload, "rng": rngs}, out / CHECKPOINT_FILE)


def read_checkpoint(out: Path, kind: str) -> dict:
    """The checkpoint of the run in `out` (for --resume), checked to be a readable `kind` checkpoint."""
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT_FILE} in {out}, so there is nothing to resume; start "
                                f"the run without --resume, or give the run's --out-dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:                # torch.load raises RuntimeError, EOFError, UnpicklingError, ...
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path} is damaged and cannot be read ({detail}); checkpoints are only ever replaced "
                         f"whole, so the file was cut or changed afterwards (a copy?): restore it, or start the "
                         f"run again without --resume") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dynlora training checkpoint (format {CHECKPOINT_FORMAT!r})")
    if ckpt["kind"] != kind:
        raise ValueError(f"{path} is a {ckpt['kind']} checkpoint; resume it with `train.py {ckpt['kind']} --resume`")
    return ckpt


def flag_name(section: str, key: str) -> str:
    """How the user sets a field of a saved run config: its --flag, or its place in the backbone."""
    if section == "adapter":
        return "--" + dynlora.FLAG_NAMES.get(key, key).replace("_", "-")
    if section == "model":
        return f"the backbone's {key}"
    return "--" + key.replace("_", "-")


def check_resume(ckpt: dict, run_config: dict, source: str, out: Path):
    """Raise ValueError naming the settings in which this invocation differs from the checkpoint's run."""
    saved = ckpt["config"]
    diffs = []
    for section in ("pretrain", "finetune", "adapter", "model"):
        before, now = saved.get(section) or {}, run_config.get(section) or {}
        for key in sorted(set(before) | set(now)):
            if key not in RESUME_MAY_CHANGE and before.get(key) != now.get(key):
                diffs.append(f"{flag_name(section, key)} {before.get(key)!r} then, {now.get(key)!r} now")
    if diffs:
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise ValueError(f"--resume: the run in {out} was started with other settings ({'; '.join(diffs[:3])}{more}); "
                         f"resume with the run's settings (see {out / 'config.json'}), or start a new run "
                         f"without --resume")
    if ckpt["source"] != source:
        raise ValueError(f"--resume: the backbone or tokenizer files of the run in {out} changed since it started "
                         f"(their hash differs); restore them, or start a new run without --resume")


def restore_rng(ckpt: dict, rt: runtime.Runtime):
    """Every process continues its own random streams, when the number of processes is unchanged."""
    if len(ckpt["rng"]) == rt.world_size:
        set_rng_state(ckpt["rng"][rt.rank])
    else:
        rt.print(f"note: the run had {len(ckpt['rng'])} process(es), now {rt.world_size}: random streams (dropout) "
                 f"restart from the seed, so the result will differ slightly from an uninterrupted run")


# ---------------------------------------------------------------------------------------------------------
# 4. Pretraining
# ---------------------------------------------------------------------------------------------------------

BACKBONE_FILE = "backbone.pt"
TOKENIZER_FILE = "tokenizer.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def read_corpus_files(paths: list) -> list:
    texts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise data.DataError(f"--corpus {p}: no such file; give plain-text files, one document per line")
        texts.extend(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return texts


def lm_batches(batcher: data.LMBatcher, start: int):
    """The batcher's batches in order, epoch after epoch, from the start-th on (start > 0 when resuming)."""
    first_epoch, skip = divmod(start, len(batcher))
    for epoch in itertools.count(first_epoch):
        yield from itertools.islice(batcher.epoch(epoch), skip if epoch == first_epoch else 0, None)


def pretrain(cfg: PretrainConfig, system: SystemConfig | None = None) -> Path:
    """Causal-LM pretraining on unlabeled text; saves <out_dir>/backbone.pt and tokenizer.json.

    The model starts from GPT-2's random initialisation with a tokenizer trained here, or, with cfg.init,
    from a backbone folder's weights, shape and tokenizer (continued pretraining, e.g. of GPT-2 converted
    by `train.py import-gpt2`). system says how to run: device, precision, processes, checkpoints.
    """
    system = system or SystemConfig()
    for name in ("max_steps", "batch_size", "block_size", "vocab_size", "eval_every"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or not 0 <= cfg.holdout < 0.5 or not 0 <= cfg.warmup_steps < cfg.max_steps:
        raise ValueError(f"need --lr > 0 (got {cfg.lr}), --holdout in [0, 0.5) (got {cfg.holdout}) and "
                         f"0 <= --warmup-steps < --max-steps (got {cfg.warmup_steps}, {cfg.max_steps})")
    shape = {k: v for k, v in [("n_layer", cfg.n_layer), ("n_head", cfg.n_head), ("n_embd", cfg.n_embd)] if v}
    gptmodel.preset(cfg.preset, block_size=cfg.block_size, dropout=cfg.dropout, **shape)   # fail fast on the shape
    set_threads(cfg.threads)
    rt = runtime.start(system.device, system.precision, system.dist_timeout)
    check_system(system, cfg.batch_size, rt)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    ckpt = read_checkpoint(out, "pretrain") if system.resume else None
    data_dir = data.resolve_data_dir(cfg.data_dir)
    tasks = [data.get_task(name) for name in cfg.tasks.split(",") if name.strip()]
    with rt.main_first():                                                # rank 0 downloads what is missing
        for task in tasks:
            data.ensure_task(data_dir, task)
    texts = data.pretrain_texts(data_dir, tasks) + read_corpus_files(cfg.corpus)
    if not texts:
        raise data.DataError("pretrain: the corpus is empty; give --tasks with train files or --corpus files")

    # The tokenizer: the --init backbone's, or one trained on the same unlabeled training text (never on dev).
    # Rank 0 writes it into the run folder first; every rank then reads that file.
    tok_path = out / TOKENIZER_FILE
    init_state = None
    if cfg.init:
        config, init_state, _, init_tok_path = load_backbone(cfg.init)
        if cfg.block_size > config.block_size:
            raise ValueError(f"--block-size {cfg.block_size} exceeds the block_size {config.block_size} of "
                             f"--init {cfg.init}; use --block-size {config.block_size} or less")
    if rt.is_main and ckpt is None:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.init:
            shutil.copyfile(init_tok_path, tok_path)
        else:
            print(f"pretrain: {len(texts):,} texts; training a {cfg.vocab_size}-token BPE tokenizer")
            data.save_tokenizer(data.train_tokenizer(texts, vocab_size=cfg.vocab_size), tok_path)
    rt.barrier()
    tok = data.load_tokenizer(tok_path)
    stream = data.lm_stream(tok, texts)                                  # (N,) int32, <eos> after each text
    n_hold = int(len(stream) * cfg.holdout)
    train_stream, val_stream = stream[: len(stream) - n_hold], stream[len(stream) - n_hold:]
    if len(train_stream) <= cfg.block_size * cfg.batch_size:
        raise data.DataError(f"pretrain: the corpus has {len(train_stream):,} training tokens, fewer than one batch "
                             f"(--batch-size {cfg.batch_size} x --block-size {cfg.block_size}); "
                             f"add text (--corpus, --tasks) or lower --block-size/--batch-size")

    if cfg.init:
        config = dataclasses.replace(config, dropout=cfg.dropout)
    else:
        config = gptmodel.preset(cfg.preset, vocab_size=tok.get_vocab_size(), block_size=cfg.block_size,
                                 dropout=cfg.dropout, pad_id=tok.token_to_id(data.PAD), **shape)
    model = GPT(config)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(rt.device)
    rt.print(f"pretrain: {len(train_stream):,} train / {len(val_stream):,} held-out tokens; model "
             f"{model.num_params():,} parameters ({cfg.init or cfg.preset}); {rt.world_size} process(es) on "
             f"{rt.device.type}, {rt.precision}")
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scaler = rt.grad_scaler()
    # Global batches: every process builds the same ones and computes its share of each (train_step).
    batcher = data.LMBatcher(train_stream, cfg.block_size, cfg.batch_size, seed=cfg.seed)

    # The run's state outside the tensors; a checkpoint carries it over to a resumed run.
    run_config = {"model": config.to_dict(), "pretrain": asdict(cfg)}
    source = file_sha256(tok_path)
    state = {"step": 0, "log": [], "wall_s": 0.0, "tokens": 0, "run_id": uuid.uuid4().hex, "resumed": 0}
    if ckpt is not None:
        check_resume(ckpt, run_config, source, out)
        saved = out / BACKBONE_FILE
        if ckpt["state"]["step"] == cfg.max_steps and saved.is_file() and \
                torch.load(saved, map_location="cpu", weights_only=True).get("run_id") == ckpt["state"]["run_id"]:
            raise ValueError(f"--resume: the run in {out} has finished ({BACKBONE_FILE} is saved); nothing to resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt, rt)
        state = {**ckpt["state"], "resumed": ckpt["state"]["resumed"] + 1}
        rt.print(f"pretrain: resuming {out} at step {state['step']} of {cfg.max_steps}")
    metrics_path = out / "metrics.jsonl"
    if rt.is_main:
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in state["log"]))

    # The held-out windows are the same at every measurement (epoch 0 of a fixed-seed batcher); each process
    # scores every world_size-th batch and the sums are added up.
    val_batcher = data.LMBatcher(val_stream, cfg.block_size, min(cfg.batch_size, len(val_stream) // cfg.block_size - 1),
                                 seed=0) if len(val_stream) > 2 * cfg.block_size else None

    def validation_loss() -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in itertools.islice(val_batcher.epoch(0), rt.rank, None, rt.world_size):
                with rt.autocast():
                    total += model(x.to(rt.device), y.to(rt.device))[1].item()
                count += 1
        model.train()
        total, count = rt.sum([total, count])
        return total / count

    def checkpoint():
        state["wall_s"] = time.time() - t_start
        save_checkpoint(out, rt, {"kind": "pretrain", "config": run_config, "source": source,
                                  "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scaler": scaler.state_dict(), "state": state})

    train_model = runtime.wrap(model, rt, system.compile)
    params = list(model.parameters())
    t_start = time.time() - state["wall_s"]
    speed = Throughput()
    batches = lm_batches(batcher, state["step"])
    bar = tqdm(range(state["step"], cfg.max_steps), initial=state["step"], total=cfg.max_steps, desc="pretrain",
               dynamic_ncols=True, mininterval=1.0, disable=not rt.is_main)
    train_model.train()
    for step in bar:
        lr = cfg.lr * cosine_schedule(step, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = next(batches)                                             # (B, T), (B, T): the global batch
        loss, _ = train_step(train_model, (x, y), rt, system.grad_accum, optimizer, scaler, params, cfg.grad_clip)
        optimizer.zero_grad(set_to_none=True)
        tps = speed.add(x.numel())
        state["tokens"] += x.numel()
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}")
        record = {"step": step + 1, "train_loss": loss, "lr": lr}
        evaluation = (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps
        if val_batcher is not None and evaluation:
            record["val_loss"] = validation_loss()
            if rt.is_main:
                tqdm.write(f"step {step + 1}: train loss {loss:.3f}, held-out loss {record['val_loss']:.3f}")
        state["log"].append(record)
        state["step"] = step + 1
        if rt.is_main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if evaluation or (system.save_every and (step + 1) % system.save_every == 0):
            checkpoint()

    wall = time.time() - t_start
    log = state["log"]
    if rt.is_main:
        atomic_torch_save({"config": config.to_dict(), "model": model.state_dict(),
                           "tokenizer_sha256": file_sha256(tok_path), "pretrain": asdict(cfg), "wall_s": wall,
                           "run_id": state["run_id"]}, out / BACKBONE_FILE)
        atomic_write_text(out / "config.json", json.dumps(run_config, indent=2))
        import plots
        plots.pretrain_curves(log, out / "curves.png")
        held_out = [r["val_loss"] for r in log if "val_loss" in r]
        print(f"pretrain: done in {wall / 60:.1f} min; final train loss {log[-1]['train_loss']:.3f}"
              + (f", held-out loss {held_out[-1]:.3f}" if held_out else "") + f"; saved {out / BACKBONE_FILE}")
    rt.barrier()
    return out


def load_backbone(folder: str):
    """(GPTConfig, state_dict, tokenizer, tokenizer_path) of a pretrained backbone folder, checked."""
    folder = Path(folder)
    ckpt_path, tok_path = folder / BACKBONE_FILE, folder / TOKENIZER_FILE
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"--backbone {folder}: no {BACKBONE_FILE} there; run `python train.py pretrain "
                                f"--out-dir {folder}` first, or pass --backbone '' for a random init")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    config = GPTConfig.from_dict(ckpt["config"])
    tok = data.load_tokenizer(tok_path)
    if file_sha256(tok_path) != ckpt["tokenizer_sha256"]:
        raise ValueError(f"{tok_path} is not the tokenizer {ckpt_path} was trained with (its hash differs); "
                         f"restore the tokenizer.json saved with the backbone or pretrain again")
    if tok.get_vocab_size() != config.vocab_size:
        raise ValueError(f"{tok_path} has {tok.get_vocab_size()} tokens but {ckpt_path} expects "
                         f"{config.vocab_size}; use the tokenizer saved with the backbone")
    return config, ckpt["model"], tok, tok_path


# ---------------------------------------------------------------------------------------------------------
# 5. Fine-tuning and evaluation
# ---------------------------------------------------------------------------------------------------------

def build_classifier(config: GPTConfig, backbone_state: dict | None, num_outputs: int) -> GPTClassifier:
    """A GPTClassifier whose body is the pretrained GPT (when given) and whose head is new."""
    clf = GPTClassifier(config, num_outputs)
    if backbone_state is not None:
        try:
            clf.gpt.load_state_dict(backbone_state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[1:2] or [str(err)]
            raise ValueError(f"the backbone checkpoint does not fit its config ({first[0].strip()}); "
                             f"was it saved by another version of model.py?") from None
    return clf


@torch.no_grad()
def predict(model: nn.Module, batcher, rt: runtime.Runtime | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(predictions, labels, mean loss) over one pass of an eval batcher.

    With several processes, each one scores every world_size-th batch and the results are gathered, so
    every process returns the predictions of the whole split (in another order, which no metric minds).
    """
    rt = rt or runtime.Runtime(next(model.parameters()).device, "fp32")
    was_training = model.training
    model.eval()
    preds, labels, losses = [], [], []
    for idx, y in itertools.islice(batcher.epoch(0), rt.rank, None, rt.world_size):
        with rt.autocast():
            logits, loss = model(idx.to(rt.device), y.to(rt.device))
        logits = logits.float().cpu()
        preds.append(logits.numpy() if logits.dim() == 1 else logits.argmax(-1).numpy())
        labels.append(y.numpy())
        losses.append(loss.item() * len(y))
    model.train(was_training)
    gathered = rt.gather((preds, labels, losses))
    preds, labels, losses = ([a for part in gathered for a in part[i]] for i in range(3))
    preds, labels = np.concatenate(preds), np.concatenate(labels)
    return preds, labels, float(np.sum(losses) / len(labels))


def evaluate(model: nn.Module, task: data.TaskSpec, dev_batchers: dict, rt: runtime.Runtime | None = None) -> dict:
    """Metrics on every dev split of the task, and the task's GLUE score (their mean for MNLI)."""
    out, scores = {}, []
    for split, batcher in dev_batchers.items():
        preds, labels, loss = predict(model, batcher, rt)
        metrics = data.compute_metrics(task, preds, labels)
        metrics["loss"] = loss
        out[split] = metrics
        scores.append(data.task_score(task, metrics))
    out["score"] = float(np.mean(scores))
    return out


def default_lr(method: str) -> float:
    return 2e-4 if method == "full" else 1e-3


def run_name(cfg: FinetuneConfig) -> str:
    return f"{data.get_task(cfg.task).name}-{cfg.method}-s{cfg.seed}"


def finetune(cfg: FinetuneConfig, adapter_overrides: dict | None = None, system: SystemConfig | None = None) -> dict:
    """Fine-tune on one GLUE task; returns the final result record (also appended to results/).

    adapter_overrides: AdapterConfig fields that replace the defaults of cfg.method (e.g. {"r": 4}).
    system: how to run (device, precision, processes, checkpoints, --resume); SystemConfig() by default.

    With several processes (torchrun), the dynamic parts stay identical on every process without extra
    communication: the rank allocator scores importance from the gradients after DDP has all-reduced them,
    which are the same everywhere, so every process computes the same masks; the gates are parameters,
    trained like the others. The gate statistics of the dev set, which each process measures on its share
    of the batches, are summed over the processes (sum_gate_statistics).
    """
    system = system or SystemConfig()
    set_threads(cfg.threads)
    task = data.get_task(cfg.task)
    methods = ["full", *dynlora.METHODS]
    if cfg.method not in methods:
        raise ValueError(f"--method {cfg.method!r} is not known; choose one of {methods}")
    if cfg.method == "full" and adapter_overrides:
        raise ValueError(f"adapter options ({', '.join(sorted(adapter_overrides))}) need an adapter --method, "
                         f"not 'full'")
    adapter_cfg = dynlora.config_for_method(cfg.method, **(adapter_overrides or {})) if cfg.method != "full" else None
    for name, value in [("epochs", cfg.epochs), ("batch_size", cfg.batch_size), ("max_len", cfg.max_len)]:
        if value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if cfg.lr < 0 or not 0 <= cfg.warmup_ratio < 1 or cfg.weight_decay < 0 or cfg.grad_clip < 0:
        raise ValueError("--lr, --weight-decay and --grad-clip must be >= 0 and --warmup-ratio in [0, 1)")
    rt = runtime.start(system.device, system.precision, system.dist_timeout)
    check_system(system, cfg.batch_size, rt)
    seed_everything(cfg.seed)
    lr = cfg.lr or default_lr(cfg.method)
    out = Path(cfg.out_dir or REPO / "runs" / run_name(cfg))
    ckpt = read_checkpoint(out, "finetune") if system.resume else None
    out.mkdir(parents=True, exist_ok=True)

    data_dir = data.resolve_data_dir(cfg.data_dir)
    with rt.main_first():                                                # rank 0 downloads what is missing
        data.ensure_task(data_dir, task)

    # The backbone and its tokenizer.
    if cfg.backbone:
        config, backbone_state, tok, tok_path = load_backbone(cfg.backbone)
        source = file_sha256(Path(cfg.backbone) / BACKBONE_FILE)
    else:
        if rt.is_main:
            warnings.warn("fine-tuning from a RANDOM initialisation (--backbone ''): expect much lower scores; "
                          "run `python train.py pretrain` for a backbone", stacklevel=2)
        backbone_state = None
        tok_path = out / TOKENIZER_FILE
        if rt.is_main and ckpt is None:
            data.save_tokenizer(data.train_tokenizer(data.pretrain_texts(data_dir, [task]), vocab_size=8192), tok_path)
        rt.barrier()
        tok = data.load_tokenizer(tok_path)
        source = file_sha256(tok_path)
        config = gptmodel.preset("cpu", vocab_size=tok.get_vocab_size(), pad_id=tok.token_to_id(data.PAD))
    if cfg.max_len > config.block_size:
        raise ValueError(f"--max-len {cfg.max_len} exceeds the backbone's block_size {config.block_size}; "
                         f"use --max-len {config.block_size} or less")
    if tok_path != out / TOKENIZER_FILE and rt.is_main:
        shutil.copyfile(tok_path, out / TOKENIZER_FILE)

    # The data: tokenized once and cached beside the tokenizer (the ids depend on it), batched by length.
    # The training batches are global batches: every process builds the same ones and computes its share
    # of each (train_step); evaluation shares out whole batches (predict).
    cache = Path(tok_path).parent / "cache"
    with rt.main_first():                                                # rank 0 fills the cache
        train_examples = data.read_split(data_dir, task, "train")
        train_ids, train_labels = data.cached_encode(tok, tok_path, task, "train", train_examples, cfg.max_len, cache)
        dev_data = {split: data.cached_encode(tok, tok_path, task, split, data.read_split(data_dir, task, split),
                                              cfg.max_len, cache) for split in task.dev_files}
    if cfg.max_train:
        train_ids, train_labels = train_ids[: cfg.max_train], train_labels[: cfg.max_train]
    train_batcher = make_train_batcher(train_ids, train_labels, cfg.batch_size, cfg.seed)
    dev_batchers = {split: data.BucketBatcher(ids, labels, 2 * cfg.batch_size, shuffle=False)
                    for split, (ids, labels) in dev_data.items()}

    # The model: the pretrained body, a new head, and (for adapter methods) the adapters.
    model = build_classifier(config, backbone_state, task.num_outputs)
    allocator = None
    total_steps = cfg.epochs * len(train_batcher)
    if adapter_cfg is not None:
        dynlora.apply_lora(model, adapter_cfg)
    model.to(rt.device)
    if adapter_cfg is not None and adapter_cfg.allocation:
        allocator = dynlora.RankAllocator(model, adapter_cfg, total_steps)
    trainable, total = dynlora.count_parameters(model)
    rt.print(f"finetune {task.name} ({cfg.method}): {len(train_ids):,} train examples, {total_steps} steps; "
             f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); "
             f"{rt.world_size} process(es) on {rt.device.type}, {rt.precision}")

    optimizer = make_optimizer(model, lr, cfg.weight_decay)
    scaler = rt.grad_scaler()
    warmup = int(cfg.warmup_ratio * total_steps)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    run_config = {"finetune": asdict(cfg), "lr": lr, "model": config.to_dict(), "task": task.name,
                  "adapter": asdict(adapter_cfg) if adapter_cfg else None}
    metrics_path = out / "metrics.jsonl"

    # The run's state outside the tensors; a checkpoint carries it over to a resumed run. `epoch` is the
    # epoch in progress (0-based) and `batch` the number of its batches consumed.
    state = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0, "wall_s": 0.0, "best": {"score": -float("inf")},
             "history": [], "log": [], "run_id": uuid.uuid4().hex, "commit": git_commit() if rt.is_main else "",
             "resumed": 0}
    if ckpt is None:
        if rt.is_main and (out / CHECKPOINT_FILE).is_file():
            print(f"finetune: starting over in {out}; its previous {CHECKPOINT_FILE} will be replaced "
                  f"(pass --resume to continue a run instead)")
        if rt.is_main:
            atomic_write_text(out / "config.json", json.dumps(run_config, indent=2))
    else:
        check_resume(ckpt, run_config, source, out)
        final = out / "final.json"
        if final.is_file() and json.loads(final.read_text()).get("run_id") == ckpt["state"]["run_id"]:
            raise ValueError(f"--resume: the run in {out} has finished (final.json); nothing to resume")
        load_training_weights(model, ckpt["model"], cfg.method, out / CHECKPOINT_FILE)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if allocator is not None:
            allocator.load_state_dict(ckpt["allocator"])
        restore_rng(ckpt, rt)
        state = {**ckpt["state"], "resumed": ckpt["state"]["resumed"] + 1}
        rt.print(f"finetune: resuming {out} at step {state['step']} of {total_steps} (epoch {state['epoch'] + 1}, "
                 f"batch {state['batch']})")
    if rt.is_main:
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in state["log"]))

    def log(record: dict):
        state["log"].append(record)
        if rt.is_main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def checkpoint():
        state["wall_s"] = time.time() - t_start
        weights = model.state_dict() if cfg.method == "full" else dynlora.adapter_state_dict(model)
        save_checkpoint(out, rt, {"kind": "finetune", "config": run_config, "source": source, "model": weights,
                                  "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                  "allocator": allocator.state_dict() if allocator is not None else None,
                                  "state": state})

    regularization = (lambda: dynlora.regularization_loss(model)) if cfg.method != "full" else None
    train_model = runtime.wrap(model, rt, system.compile)
    t_start = time.time() - state["wall_s"]
    speed = Throughput()
    train_model.train()
    for epoch in range(state["epoch"], cfg.epochs):
        batches = itertools.islice(train_batcher.epoch(epoch), state["batch"], None)
        bar = tqdm(batches, initial=state["batch"], total=len(train_batcher), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   dynamic_ncols=True, mininterval=1.0, disable=not rt.is_main)
        for idx, y in bar:
            step = state["step"]
            lr_now = lr * cosine_schedule(step, total_steps, warmup, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            loss, stepped = train_step(train_model, (idx, y), rt, system.grad_accum, optimizer, scaler,
                                       trainable_params, cfg.grad_clip, regularization)
            step = state["step"] = step + 1           # optimizer steps taken, counted from 1
            state["batch"] += 1
            state["tokens"] += idx.numel()
            # After optimizer.step(), before zero_grad(): the allocator reads the gradients. Under DDP they
            # are the all-reduced gradients, the same on every process, so every process computes the same
            # importance scores and the same masks (DDP does not broadcast them: see runtime.wrap). A step
            # the fp16 scaler skipped has inf/nan gradients, which would poison the importance averages:
            # the allocator sits that step out.
            if allocator is not None and stepped:
                n_before = len(allocator.history)
                allocator.step(step)
                if len(allocator.history) > n_before:           # a reallocation: log the new rank pattern
                    log({"epoch": epoch + 1, **allocator.history[-1]})
            optimizer.zero_grad(set_to_none=True)
            tps = speed.add(idx.numel())
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr_now:.1e}", tok_s=f"{tps:,.0f}")
            if step % 50 == 0:
                record = {"step": step, "epoch": epoch + 1, "train_loss": loss, "lr": lr_now}
                log(record)
                state["history"].append(record)
            if system.save_every and step % system.save_every == 0 and state["batch"] < len(train_batcher):
                checkpoint()                      # (the epoch's last batch is followed by the epoch-end one)
        dev = evaluate(model, task, dev_batchers, rt)
        record = {"step": state["step"], "epoch": epoch + 1, "dev": dev, "score": dev["score"],
                  "wall_s": time.time() - t_start}
        log(record)
        state["history"].append(record)
        if rt.is_main:
            tqdm.write(f"epoch {epoch + 1}: dev {task.name} score {100 * dev['score']:.2f}  "
                       + "  ".join(f"{s}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
                                   for s, m in dev.items() if s != "score"))
        if dev["score"] > state["best"]["score"]:
            state["best"] = {"score": dev["score"], "epoch": epoch + 1, "dev": dev}
            if rt.is_main:
                save_finetuned(out, model, cfg, adapter_cfg, config, task, allocator)
        state["epoch"], state["batch"] = epoch + 1, 0
        checkpoint()
    wall = time.time() - t_start
    # The model at the end of training, whose last-epoch dev score is `last_score`: the number the report
    # compares (for an allocating method it is also the model at the target budget).
    final_active = dynlora.active_parameter_count(model) if cfg.method != "full" else None
    rt.barrier()                              # rank 0 has written the best model
    restore_best(model, out, cfg.method)      # the saved model is the best epoch's
    inference = inference_forms(model, adapter_cfg, task, dev_batchers, train_batcher, config.pad_id, out, rt) \
        if adapter_cfg is not None else {}

    best, history = state["best"], state["history"]
    result = {
        "task": task.name, "method": cfg.method, "seed": cfg.seed, "suite": cfg.suite,
        "score": best["score"], "best_epoch": best["epoch"], "dev": best["dev"],
        "last_score": history[-1]["score"], "epochs": cfg.epochs, "lr": lr,
        "trainable_params": trainable, "total_params": total,
        "active_adapter_params": dynlora.active_parameter_count(model) if cfg.method != "full" else None,
        "final_active_adapter_params": final_active,
        **inference,
        "train_examples": len(train_ids), "wall_s": round(wall, 1),
        "tokens_per_s": round(state["tokens"] / max(1e-9, wall), 1),
        "device": rt.device.type, "precision": rt.precision, "processes": rt.world_size,
        "resumed": state["resumed"], "run_id": state["run_id"],
        "backbone": cfg.backbone, "machine": machine_description(), "commit": state["commit"],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "run_dir": str(out),
    }
    if rt.is_main:
        import plots
        plots.finetune_curves(history, task.name, out / "curves.png")
        if allocator is not None:
            plots.allocation_plots(allocator.history, out)
        # The results line first, final.json last: final.json marks the run finished, and a run resumed after
        # a crash between the two appends nothing twice (append_result skips a run_id it already holds).
        append_result(result, Path(cfg.results_dir))
        atomic_write_text(out / "final.json", json.dumps(result, indent=2))
        print(f"finetune {task.name} ({cfg.method}): best dev score {100 * best['score']:.2f} at epoch "
              f"{best['epoch']}, {wall / 60:.1f} min; run folder {out}")
    rt.barrier()
    return result


def load_training_weights(model: GPTClassifier, weights: dict, method: str, path: Path):
    """Load a checkpoint's weights: the whole state dict (full) or the adapter tensors (adapter methods)."""
    expected = model.state_dict() if method == "full" else dynlora.adapter_state_dict(model)
    odd = sorted(set(weights) ^ set(expected))
    if odd:
        raise ValueError(f"{path} does not fit this model: tensor names differ (e.g. {odd[0]})")
    model.load_state_dict(weights, strict=method == "full")


def restore_best(model: GPTClassifier, out: Path, method: str):
    """Load the best epoch's weights back from the file save_finetuned wrote (model.pt or adapter.pt)."""
    if method == "full":
        weights = torch.load(out / "model.pt", map_location="cpu", weights_only=True)["model"]
    else:
        weights = torch.load(out / "adapter.pt", map_location="cpu", weights_only=True)["state"]
    load_training_weights(model, weights, method, out)


def sum_gate_statistics(stats: dynlora.GateStats, model: nn.Module, rt: runtime.Runtime):
    """Add up the gate statistics of all processes (each saw a share of the dev batches), in place."""
    layers = {}
    for name, layer in dynlora.adapter_layers(model):
        if layer.gated and not layer.gate_is_frozen:
            entry = stats.layers.get(name) or {"positions": 0, "gate_sum": torch.zeros(layer.r, dtype=torch.float64),
                                               "histogram": torch.zeros(layer.r + 1, dtype=torch.long)}
            entry["positions"] = int(rt.sum([entry["positions"]])[0])
            rt.sum_tensor_(entry["gate_sum"])
            rt.sum_tensor_(entry["histogram"])
            layers[name] = entry
    stats.layers = layers


CALIBRATION_BATCHES = 20     # training batches whose mean gate replaces a gated layer's gate for merging


def make_train_batcher(ids, labels, batch_size: int, seed: int) -> data.BucketBatcher:
    """The training batches of a run, shuffled by its seed: finetune trains on them, and export_merged
    rebuilds them to freeze the gates on exactly the calibration batches finetune used."""
    return data.BucketBatcher(ids, labels, batch_size, shuffle=True, seed=seed)


def inference_forms(model: GPTClassifier, adapter_cfg, task: data.TaskSpec, dev_batchers: dict,
                    train_batcher, pad_id: int, out: Path, rt: runtime.Runtime | None = None) -> dict:
    """How an adapter model is deployed, and what that costs: the merged model's dev score, and for gated
    models the effective rank the gates use on dev.

    A gated update depends on the input, so it cannot be merged into W0 as it is. freeze_gates replaces each
    gate by its mean over calibration data (the first 20 training batches, the same on every process, so
    every process freezes the same gates); the merged score then measures the accuracy cost of that static
    approximation. Allocation-only models merge exactly.
    """
    rt = rt or runtime.Runtime(next(model.parameters()).device, "fp32")
    result = {}
    if adapter_cfg.gating:
        with dynlora.gate_statistics(model, pad_id=pad_id) as stats:
            evaluate(model, task, dev_batchers, rt)
        sum_gate_statistics(stats, model, rt)
        summary = stats.summary()
        result["mean_effective_rank"] = float(np.mean([v["mean_effective_rank"] for v in summary.values()]))
        if rt.is_main:
            atomic_write_text(out / "gates.json", json.dumps(summary, indent=2))
            import plots
            plots.effective_rank_hist({n: t.numpy() for n, t in stats.per_token_rank().items()}, adapter_cfg.r,
                                      out / "effective_rank.png")
        calibration = ((idx.to(rt.device), y) for idx, y in itertools.islice(train_batcher.epoch(0),
                                                                              CALIBRATION_BATCHES))
        dynlora.freeze_gates(model, calibration, pad_id=pad_id)
    merged = dynlora.merge_and_unload(model)
    result["merged_score"] = evaluate(merged, task, dev_batchers, rt)["score"]
    return result


def save_finetuned(out: Path, model: GPTClassifier, cfg: FinetuneConfig, adapter_cfg, config: GPTConfig,
                   task: data.TaskSpec, allocator):
    """The best model so far: the whole state dict (full) or the adapter file (adapter methods)."""
    meta = {"task": task.name, "method": cfg.method, "num_outputs": task.num_outputs,
            "tokenizer_sha256": file_sha256(out / TOKENIZER_FILE), "backbone": cfg.backbone}
    if cfg.method == "full":
        atomic_torch_save({"config": config.to_dict(), "model": model.state_dict(), **meta}, out / "model.pt")
    else:
        extra = {**meta, "allocator": allocator.state_dict() if allocator is not None else None}
        dynlora.save_adapter(out / "adapter.pt", model, adapter_cfg, extra=extra)


def load_finetuned(run_dir: str, backbone: str | None = None) -> tuple[GPTClassifier, "data.Tokenizer", dict]:
    """(model, tokenizer, meta) of a run folder written by finetune()."""
    run = Path(run_dir)
    tok_path = run / TOKENIZER_FILE
    if (run / "model.pt").is_file():
        ckpt = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
        config = GPTConfig.from_dict(ckpt["config"])
        model = GPTClassifier(config, ckpt["num_outputs"])
        model.load_state_dict(ckpt["model"])
        meta = ckpt
    elif (run / "adapter.pt").is_file():
        meta = torch.load(run / "adapter.pt", map_location="cpu", weights_only=False)["extra"]
        config, backbone_state, _, _ = load_backbone(backbone or meta["backbone"])
        model = build_classifier(config, backbone_state, meta["num_outputs"])
        dynlora.load_adapter(run / "adapter.pt", model)
    else:
        raise FileNotFoundError(f"--run {run}: neither model.pt nor adapter.pt there; is it a finetune run folder?")
    tok = data.load_tokenizer(tok_path)
    if file_sha256(tok_path) != meta["tokenizer_sha256"]:
        raise ValueError(f"{tok_path} is not the tokenizer this model was trained with; restore the run's "
                         f"tokenizer.json")
    model.eval()
    return model, tok, meta


def evaluate_run(run_dir: str, data_dir: str | None = None, backbone: str | None = None,
                 batch_size: int = 64) -> dict:
    """Score a saved fine-tuned model on its task's dev split(s)."""
    model, tok, meta = load_finetuned(run_dir, backbone)
    task = data.get_task(meta["task"])
    ddir = data.resolve_data_dir(data_dir)
    data.ensure_task(ddir, task)
    max_len = json.loads((Path(run_dir) / "config.json").read_text())["finetune"]["max_len"]
    tok_path = Path(run_dir) / TOKENIZER_FILE
    batchers = {}
    for split in task.dev_files:
        ids, labels = data.cached_encode(tok, tok_path, task, split, data.read_split(ddir, task, split),
                                         max_len, tok_path.parent / "cache")
        batchers[split] = data.BucketBatcher(ids, labels, batch_size, shuffle=False)
    return evaluate(model, task, batchers)


def export_merged(run_dir: str, out_dir: str | None = None, data_dir: str | None = None,
                  backbone: str | None = None) -> Path:
    """Write an adapter run's model with the adapter merged into the weights: a plain model.pt, as full
    fine-tuning writes, which runs at the base model's speed and which `eval` scores like any run.

    LoRA and allocation-only adapters merge exactly (masks enter dW). A gated adapter's update depends on
    the input, so, as finetune does for its `merged_score`, each gate is first frozen to its mean over the
    run's first CALIBRATION_BATCHES training batches: the export is that static approximation, and scores
    exactly the run's `merged_score`. Returns the folder written (default: the run folder + "-merged").
    """
    run = Path(run_dir)
    if not (run / "adapter.pt").is_file():
        raise FileNotFoundError(f"--run {run}: no adapter.pt there; export merges an adapter run (lora, alloc, "
                                f"gate, dynlora, adalora); a full fine-tuning run's model.pt is already plain")
    model, tok, meta = load_finetuned(run, backbone)
    adapter_cfg = model.adapter_config
    if adapter_cfg.gating:
        cfg = json.loads((run / "config.json").read_text())["finetune"]
        task = data.get_task(meta["task"])
        ddir = data.resolve_data_dir(data_dir)
        data.ensure_task(ddir, task)
        tok_path = run / TOKENIZER_FILE
        ids, labels = data.cached_encode(tok, tok_path, task, "train", data.read_split(ddir, task, "train"),
                                         cfg["max_len"], run / "cache")
        n = cfg["max_train"] or None
        batcher = make_train_batcher(ids[:n], labels[:n], cfg["batch_size"], cfg["seed"])   # finetune's batches
        dynlora.freeze_gates(model, itertools.islice(batcher.epoch(0), CALIBRATION_BATCHES),
                             pad_id=model.gpt.config.pad_id)
    merged = dynlora.merge_and_unload(model)
    out = Path(out_dir) if out_dir else run.with_name(run.name + "-merged")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / TOKENIZER_FILE, out / TOKENIZER_FILE)
    atomic_write_text(out / "config.json", (run / "config.json").read_text())
    atomic_torch_save({"config": merged.gpt.config.to_dict(), "model": merged.state_dict(),
                       **{k: meta[k] for k in ("task", "num_outputs", "tokenizer_sha256", "backbone")},
                       "method": meta["method"], "merged_from": str(run)}, out / "model.pt")
    return out


# ---------------------------------------------------------------------------------------------------------
# 6. Results: the results/ files and the README report
# ---------------------------------------------------------------------------------------------------------

RESULTS_FILE = "finetune.jsonl"
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def append_result(result: dict, results_dir: Path):
    """Append one run's result line, once: a line with the same run_id already there is not written again
    (a resumed run may repeat the end of a run that crashed after appending)."""
    results_dir = REPO / results_dir if not results_dir.is_absolute() else results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    if "run_id" in result and any(r.get("run_id") == result["run_id"] for r in load_results(results_dir)):
        return
    with open(results_dir / RESULTS_FILE, "a") as fh:
        fh.write(json.dumps(result) + "\n")


def load_results(results_dir: Path = RESULTS_DIR) -> list:
    path = Path(results_dir) / RESULTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


TASK_ORDER = ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"]
METHOD_ORDER = ["full", "lora", "alloc", "gate", "dynlora", "adalora"]


def _count_range(values) -> str:
    """'49,152', '49,537–49,922' (min–max over runs), or '—' when no run has the count (None)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return "—"
    return f"{values[0]:,}" if values[0] == values[-1] else f"{values[0]:,}–{values[-1]:,}"


def render_report(results: list, bench: dict | None = None) -> str:
    """Markdown tables of the results: one per suite, methods x tasks, mean +- std over seeds.

    A cell is the dev score of the model at the end of training (`last_score`), not of the best epoch: GLUE's
    test labels are hidden, so the dev set is our test set, and picking the best of several epochs on it
    would flatter every method by its own noise; and an allocating method's best epoch can come before its
    budget has shrunk to the target, which would compare it to LoRA at a larger budget.
    """
    lines = []
    suites = sorted({r.get("suite", "") for r in results})
    for suite in suites:
        rows = [r for r in results if r.get("suite", "") == suite]
        tasks = [t for t in TASK_ORDER if any(r["task"] == t for r in rows)]
        methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
        lines.append(f"**Suite `{suite or 'default'}`** — GLUE dev score x 100 of the model at the end of training "
                     f"(mean ± std over seeds, n = seeds), trainable parameters, wall time per run.\n")
        lines.append("| method | " + " | ".join(tasks) + " | avg | trainable params | active adapter params (final model) "
                     "| wall (min, mean) |")
        lines.append("|---" * (len(tasks) + 5) + "|")
        for m in methods:
            cells, means, params, active, walls = [], [], set(), set(), []
            for t in tasks:
                scores = [100 * r["last_score"] for r in rows if r["task"] == t and r["method"] == m]
                params |= {r["trainable_params"] for r in rows if r["task"] == t and r["method"] == m}
                active |= {r.get("final_active_adapter_params") for r in rows if r["task"] == t and r["method"] == m}
                walls += [r["wall_s"] for r in rows if r["task"] == t and r["method"] == m]
                if not scores:
                    cells.append("—")
                    continue
                means.append(np.mean(scores))
                sd = f" ± {np.std(scores, ddof=1):.1f}" if len(scores) > 1 else ""
                cells.append(f"{np.mean(scores):.1f}{sd} (n={len(scores)})")
            avg = f"{np.mean(means):.1f}" if len(means) == len(tasks) else "—"
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} | {_count_range(params)} "
                         f"| {_count_range(active)} | {np.mean(walls) / 60:.1f} |")
        gated = [m for m in methods
                 if any(r["method"] == m and r.get("mean_effective_rank") is not None for r in rows)]
        if gated:
            lines.append("\nGated methods: mean effective rank per dev token (components whose gate m_i g_i(x) > 0.5, "
                         "averaged over tokens and adapted layers, of the saved model; mean over seeds).\n")
            lines.append("| method | " + " | ".join(tasks) + " |")
            lines.append("|---" * (len(tasks) + 1) + "|")
            for m in gated:
                cells = []
                for t in tasks:
                    ranks = [r["mean_effective_rank"] for r in rows if r["task"] == t and r["method"] == m
                             and r.get("mean_effective_rank") is not None]
                    cells.append(f"{np.mean(ranks):.1f}" if ranks else "—")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        machines = sorted({r["machine"] for r in rows})
        commits = sorted({r["commit"] for r in rows})
        lines.append(f"\nMachine: {'; '.join(machines)}. Commits: {', '.join(commits)}.\n")
    if bench:
        lines.append(render_bench(bench))
    return "\n".join(lines)


def render_bench(bench: dict) -> str:
    lines = [f"**Benchmark** (`python train.py bench`, {bench['machine']}, commit {bench['commit']}, "
             f"{bench['date']}):\n", "| figure | value | target |", "|---|---|---|"]
    for row in bench["rows"]:
        lines.append(f"| {row['name']} | {row['value']} | {row.get('target', '')} |")
    if bench.get("note"):
        lines.append(f"\nNote: {bench['note']}")
    return "\n".join(lines) + "\n"


def write_report(readme: Path = REPO / "README.md", results_dir: Path = RESULTS_DIR) -> str:
    """Replace the text between the README's result markers with freshly rendered tables."""
    bench_path = Path(results_dir) / "bench.json"
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    report = render_report(load_results(results_dir), bench)
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} markers; add them where the tables go")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    atomic_write_text(readme, head + README_START + "\n" + report + "\n" + README_END + tail)
    return report


# ---------------------------------------------------------------------------------------------------------
# 7. The main job and the command line
# ---------------------------------------------------------------------------------------------------------

def main_job(data_dir: str | None = None):
    """For a newcomer: pretrain once (cached in runs/backbone), fine-tune SST-2, print the results."""
    t0 = time.time()
    backbone = REPO / "runs" / "backbone"
    if not (backbone / BACKBONE_FILE).is_file():
        pretrain(PretrainConfig(out_dir=str(backbone), data_dir=data_dir))
    else:
        print(f"main: using the cached backbone in {backbone} (delete it to pretrain again)")
    result = finetune(FinetuneConfig(task="SST-2", method="full", backbone=str(backbone), data_dir=data_dir))
    print(f"\nmain: SST-2 dev accuracy {100 * result['dev']['dev']['accuracy']:.2f}% "
          f"(full fine-tuning, epoch {result['best_epoch']}); total wall time {(time.time() - t0) / 60:.1f} min\n")
    print(render_report([result]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="GLUE folder for the main job")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("pretrain", help="causal-LM pretraining of the backbone")
    add_config_args(p, PretrainConfig)
    add_config_args(p, SystemConfig)
    p = sub.add_parser("finetune", help="fine-tune on a GLUE task")
    add_config_args(p, FinetuneConfig)
    add_config_args(p, dynlora.AdapterConfig, rename=dynlora.FLAG_NAMES, only_if_given=True)
    add_config_args(p, SystemConfig)
    p = sub.add_parser("eval", help="score a saved fine-tuned run on its dev split(s)")
    p.add_argument("--run", required=True, help="run folder written by finetune")
    p.add_argument("--data-dir", default=None, help="GLUE folder (default: $GLUE_DIR, else ./data/glue)")
    p.add_argument("--backbone", default=None, help="backbone folder for adapter runs (default: the one trained with)")
    p = sub.add_parser("export", help="merge an adapter run into a plain model.pt (gates frozen to their mean)")
    p.add_argument("--run", required=True, help="adapter run folder written by finetune")
    p.add_argument("--out-dir", default=None, help="folder to write (default: the run folder + '-merged')")
    p.add_argument("--data-dir", default=None, help="GLUE folder, for a gated run's calibration batches "
                                                    "(default: $GLUE_DIR, else ./data/glue)")
    p.add_argument("--backbone", default=None, help="backbone folder (default: the one trained with)")
    sub.add_parser("report", help="render the README's result tables from results/")
    p = sub.add_parser("bench", help="speed and memory figures (writes results/bench.json)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p = sub.add_parser("import-gpt2", help="convert a local Hugging Face GPT-2 folder into a backbone folder")
    p.add_argument("--gpt2-dir", required=True, help="folder with config.json, model.safetensors (or "
                                                     "pytorch_model.bin) and tokenizer.json")
    p.add_argument("--out-dir", default="runs/gpt2", help="backbone folder to write (default: runs/gpt2)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command is None:
            main_job(args.data_dir)
        elif args.command == "pretrain":
            pretrain(config_from_args(PretrainConfig, args), config_from_args(SystemConfig, args))
        elif args.command == "finetune":
            cfg = config_from_args(FinetuneConfig, args)
            given = {f.name: getattr(args, f.name) for f in fields(dynlora.AdapterConfig) if hasattr(args, f.name)}
            finetune(cfg, given, config_from_args(SystemConfig, args))
        elif args.command == "eval":
            res = evaluate_run(args.run, args.data_dir, args.backbone)
            print(json.dumps(res, indent=2))
        elif args.command == "export":
            out = export_merged(args.run, args.out_dir, args.data_dir, args.backbone)
            print(f"export: merged model written to {out / 'model.pt'}; score it with "
                  f"`python train.py eval --run {out}`")
        elif args.command == "report":
            print(write_report())
        elif args.command == "bench":
            import bench
            bench.run(quick=args.quick)
        elif args.command == "import-gpt2":
            import gpt2
            gpt2.import_gpt2(args.gpt2_dir, args.out_dir)
    except (ValueError, OSError, runtime.DistributedError) as err:    # DataError is a ValueError, SaveError an OSError
        sys.exit(f"error: {err}")
    finally:
        runtime.finish()


if __name__ == "__main__":
    main()
