"""
train.py -- what a run does: pretrain a GPT, fine-tune it on a GLUE task, evaluate it.

    train.pretrain(PretrainConfig(...))                       # causal-LM pretraining -> a backbone folder
    train.finetune(FinetuneConfig(task="SST-2", method="dynlora"), {"r": 12, "target_r": 8})   # -> result record

The rest of a run lives off this path: the command line in cli.py; the range check of the settings, run
folders, checkpoints, resume and the result record in runs.py (this file decides what a run writes and when,
runs.py how); the device, precision and processes in runtime.py; a finished run's gate statistics in
analysis.py.

What this file holds, in order:
  1. Configs
  2. The optimizer, the learning-rate schedule, seeding
  3. The training step (devices, mixed precision, DDP, gradient accumulation) and the finite-loss guard
  4. Pretraining: setup, the step loop
  5. Fine-tuning: setup, the epoch loop (with the rank allocator's step), the result
  6. Evaluation: predictions and metrics
"""

import contextlib
import dataclasses
import itertools
import math
import random
import time
from dataclasses import dataclass, field, asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import analysis
import data
import dynlora
import runs
import runtime
from model import GPT, GPTClassifier, GPTConfig, preset
from runs import bounds


# ---------------------------------------------------------------------------------------------------------
# 1. Configs
#
# A config is a plain dataclass with a comment on each field: cli.py turns the fields into --flags and the
# comments into their --help, and runs.check_config checks every number against the bounds in its field's
# metadata when the run starts. No exec, no globals: a run's whole configuration is one object, saved with
# the run as JSON.
#
# PretrainConfig and FinetuneConfig say WHAT to train: a resumed run must repeat them exactly, but for the
# fields that only say where things are or where results go (runs.RESUME_MAY_CHANGE). SystemConfig says HOW
# to run it -- device, precision, processes, checkpoints -- and may change between the attempts of one run
# (resume a CPU run on a GPU, or on more processes).
# ---------------------------------------------------------------------------------------------------------

SEED_MAX = 2**32 - 1          # the largest seed numpy accepts


@dataclass
class PretrainConfig:
    out_dir: str = "runs/backbone"                      # folder for the backbone checkpoint, its tokenizer and curves
    data_dir: str | None = None                         # GLUE folder (default: $GLUE_DIR, else ./data/glue)
    tasks: str = "CoLA,SST-2,MRPC,STS-B,RTE"            # GLUE tasks whose unlabeled TRAIN text is the corpus
    corpus: list = field(default_factory=list)          # extra plain-text files, one document per line
    init: str = ""                                      # backbone folder to start from (its weights, shape, tokenizer);
                                                        # '' = a new model
    preset: str = "cpu"                                 # model size: nano | cpu | gpt2 (see model.PRESETS)
    n_layer: int = field(default=0, metadata=bounds(0))   # transformer blocks (0 = the preset's)
    n_head: int = field(default=0, metadata=bounds(0))    # attention heads; must divide the width (0 = the preset's)
    n_embd: int = field(default=0, metadata=bounds(0))    # width of the residual stream (0 = the preset's)
    vocab_size: int = field(default=8192, metadata=bounds(0, low_open=True))   # BPE vocabulary size, special tokens
                                                                               # included
    block_size: int = field(default=128, metadata=bounds(0, low_open=True))    # context length in tokens
    batch_size: int = field(default=32, metadata=bounds(0, low_open=True))     # sequences per step
    max_steps: int = field(default=400, metadata=bounds(0, low_open=True))     # optimizer steps
    lr: float = field(default=1e-3, metadata=bounds(0, low_open=True))         # peak learning rate (AdamW)
    min_lr_ratio: float = field(default=0.1, metadata=bounds(0, 1))            # final learning rate as a fraction of
                                                                               # the peak (cosine decay)
    warmup_steps: int = field(default=40, metadata=bounds(0))                  # linear warm-up steps
    weight_decay: float = field(default=0.1, metadata=bounds(0))               # AdamW weight decay on matrices (not on
                                                                               # biases or LayerNorm)
    grad_clip: float = field(default=1.0, metadata=bounds(0))                  # clip the global gradient norm to this
                                                                               # (0 = off)
    dropout: float = field(default=0.0, metadata=bounds(0, 1, high_open=True))  # dropout probability
    holdout: float = field(default=0.02, metadata=bounds(0, 0.5, high_open=True))  # fraction of the token stream held
                                                                                   # out to measure validation loss
    eval_every: int = field(default=100, metadata=bounds(0, low_open=True))    # steps between validation-loss
                                                                               # measurements
    seed: int = field(default=1337, metadata=bounds(0, SEED_MAX))              # random seed
    threads: int = field(default=0, metadata=bounds(0))                        # CPU threads (0 = PyTorch's default)


@dataclass
class FinetuneConfig:
    task: str = "SST-2"                                 # GLUE task: CoLA SST-2 MRPC STS-B QQP MNLI QNLI RTE WNLI
    method: str = dynlora.FULL                          # full | lora | alloc | gate | dynlora | adalora
    backbone: str = "runs/backbone"                     # pretrained backbone folder ('' = random init, with a warning)
    data_dir: str | None = None                         # GLUE folder (default: $GLUE_DIR, else ./data/glue)
    out_dir: str = ""                                   # run folder (default: runs/<task>-<method>-s<seed>)
    epochs: int = field(default=3, metadata=bounds(0, low_open=True))          # passes over the training set
    batch_size: int = field(default=32, metadata=bounds(0, low_open=True))     # examples per step
    lr: float = field(default=0.0, metadata=bounds(0))                         # peak learning rate (0 = the method's
                                                                               # default: 2e-4 full, 1e-3 adapters)
    min_lr_ratio: float = field(default=0.1, metadata=bounds(0, 1))            # final learning rate as a fraction of
                                                                               # the peak (cosine decay)
    warmup_ratio: float = field(default=0.06, metadata=bounds(0, 1, high_open=True))  # fraction of the steps spent in
                                                                                      # linear warm-up
    weight_decay: float = field(default=0.01, metadata=bounds(0))              # AdamW weight decay on matrices
    grad_clip: float = field(default=1.0, metadata=bounds(0))                  # clip the global gradient norm to this
                                                                               # (0 = off)
    max_len: int = field(default=128, metadata=bounds(0, low_open=True))       # longest input in tokens; longer pairs
                                                                               # are truncated, longest text first
    max_train: int = field(default=0, metadata=bounds(0))                      # use only the first N training examples
                                                                               # (0 = all), for quick trials
    readout: str = "cls"                                # where the prediction is read: cls | last | cls-train | prompt
                                                        # (readout.py)
    seed: int = field(default=0, metadata=bounds(0, SEED_MAX))                 # random seed (initialisation of new
                                                                               # weights, dropout, batch order)
    threads: int = field(default=0, metadata=bounds(0))                        # CPU threads (0 = PyTorch's default)
    suite: str = ""                                     # the suite of record this run belongs to (a table in
                                                        # RESULTS.md); '' = an ad-hoc run
    results_dir: str = ""                               # folder whose finetune.jsonl gets the run's result ('' =
                                                        # results/ for a --suite, else runs/results/)
    val_fraction: float = field(default=0.0, metadata=bounds(0, 1, high_open=True))   # hold out this fixed part of the
                                                                                      # TRAIN split and score it instead
                                                                                      # of dev, which is then never read
                                                                                      # (0 = off; tune.py)
    from_tune: str = ""                                 # a tune.jsonl: apply its chosen setting for this task, method
                                                        # and backbone (tune.py; cli.py applies it)
    tuned_on: str = ""                                  # with --from-tune: the choice made on this task instead (e.g.
                                                        # CoLA's for every task of a suite); '' = the run's own task


@dataclass
class SystemConfig:
    device: str = "auto"                                # auto | cpu | cuda | mps (auto: cuda if present, else mps, else
                                                        # cpu)
    precision: str = "auto"                             # auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA and on CPUs with
                                                        # native bf16, fp16 on GPUs without bf16, else fp32)
    compile: bool = False                               # torch.compile the training step (minutes to compile; eager
                                                        # where the compiler cannot run)
    grad_accum: int = field(default=1, metadata=bounds(1))                     # micro-steps per optimizer step;
                                                                               # --batch-size stays the global batch
    save_every: int = field(default=0, metadata=bounds(0))                     # also checkpoint every N optimizer steps
                                                                               # (0 = only at epoch ends / evaluations)
    resume: bool = False                                # continue the run in the run folder from its checkpoint.pt
    dist_timeout: float = field(default=300, metadata=bounds(0, low_open=True))  # seconds to wait for the other
                                                                                 # processes (start-up and each
                                                                                 # exchange)


# ---------------------------------------------------------------------------------------------------------
# 2. The optimizer, the learning-rate schedule, seeding
# ---------------------------------------------------------------------------------------------------------

def seed_everything(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def cosine_schedule(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, gate_lr_mult: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices are decayed, vectors (biases, norms, gate biases) not.

    With gate_lr_mult != 1 the live gates' parameters (dynlora.gate_parameters: W_g, c, P) get two groups of
    their own at gate_lr_mult x lr (docs/design.md says why). Each group keeps its factor as "lr_mult", which
    set_lr applies to every new learning rate of the schedule.
    """
    gate_ids = {id(p) for p in dynlora.gate_parameters(model)} if gate_lr_mult != 1.0 else set()
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    gates = [p for p in model.parameters() if id(p) in gate_ids]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr_mult": 1.0},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_mult": 1.0}]
    if gates:                                   # W_g and P are matrices (decayed), c a vector (not)
        groups += [{"params": [p for p in gates if p.dim() >= 2], "weight_decay": weight_decay,
                    "lr_mult": gate_lr_mult},
                   {"params": [p for p in gates if p.dim() < 2], "weight_decay": 0.0, "lr_mult": gate_lr_mult}]
    for group in groups:
        group["lr"] = lr * group["lr_mult"]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    """Set the schedule's learning rate, times each group's lr_mult (1 in an optimizer state saved before it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


# ---------------------------------------------------------------------------------------------------------
# 3. The training step
#
# One optimizer step, whatever the machine (train_step): the global batch (--batch-size rows) is split over
# the processes and the gradient-accumulation micro-steps (runtime.split_batch); each part runs forward
# under autocast and backward; DDP all-reduces the gradients during the last micro-step only; then the
# gradients are unscaled (fp16), clipped, and the optimizer steps. With one process, one micro-step and fp32
# this is exactly the plain loop: forward, backward, clip, step.
# ---------------------------------------------------------------------------------------------------------

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


# The finite-loss guard: nothing non-finite becomes a result. A loss of nan or inf (too high a learning rate,
# broken data) makes the weights garbage from then on, so the run stops at once, naming the step, and saves
# nothing from those weights: no best model, final.json or result line (a classifier of NaN weights would
# otherwise be scored, and recorded, as a real 50%); the last good checkpoint stays. check_loss runs after
# every step; check_weights before the weights are evaluated or saved, since a step can report a finite loss
# while its update makes them non-finite. The loss is the mean over all processes and the weights are the
# same on every process, so every process stops at the same step.

class DivergedError(ValueError):
    """The training loss or the weights stopped being finite numbers; the run stopped without saving them."""


def check_loss(run, loss: float, step: int, epoch: int | None = None):
    if not math.isfinite(loss):
        raise DivergedError(runs.diverged_message(run, f"the training loss became {loss}", step, epoch))


def check_weights(run, step: int, epoch: int | None = None):
    params = [(name, p) for name, p in run.model.named_parameters() if p.requires_grad]
    if not torch.stack([torch.isfinite(p).all() for _, p in params]).all():
        name = next(name for name, p in params if not torch.isfinite(p).all())
        raise DivergedError(runs.diverged_message(run, f"the weights became non-finite (nan or inf in {name})",
                                                  step, epoch))


# ---------------------------------------------------------------------------------------------------------
# 4. Pretraining
# ---------------------------------------------------------------------------------------------------------

def lm_batches(batcher: data.LMBatcher, start: int):
    """The batcher's batches in order, epoch after epoch, from the start-th on (start > 0 when resuming)."""
    first_epoch, skip = divmod(start, len(batcher))
    for epoch in itertools.count(first_epoch):
        yield from itertools.islice(batcher.epoch(epoch), skip if epoch == first_epoch else 0, None)


@dataclass
class PretrainRun:
    """Everything a pretraining run holds between its setup, its steps and its end."""
    cfg: PretrainConfig
    rt: runtime.Runtime
    out: Path
    config: GPTConfig
    model: GPT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batcher: data.LMBatcher                 # the training windows (global batches)
    val_batcher: data.LMBatcher | None      # the held-out windows, the same at every measurement
    run_config: dict                        # what the run is, as saved in config.json and the checkpoint
    source: str                             # hash of the tokenizer it trains with
    log: runs.RunLog                        # the run's state and metrics.jsonl
    saved_step: int | None = None           # the step of the last checkpoint written or resumed from

    @property
    def lr(self) -> float:
        return self.cfg.lr


def pretrain(cfg: PretrainConfig, system: SystemConfig | None = None) -> Path:
    """Causal-LM pretraining on unlabeled text; saves <out_dir>/backbone.pt and tokenizer.json.

    The model starts from GPT-2's random initialisation with a tokenizer trained here, or, with cfg.init,
    from a backbone folder's weights, shape and tokenizer (continued pretraining, e.g. of GPT-2 converted
    by `cli.py import`). system says how to run: device, precision, processes, checkpoints.
    """
    system = system or SystemConfig()
    run = setup_pretrain(cfg, system)
    wall = pretrain_steps(run, system)
    runs.finish_pretrain(run, wall)                      # the backbone folder and the curves (rank 0)
    return run.out


def setup_pretrain(cfg: PretrainConfig, system: SystemConfig) -> PretrainRun:
    """The tokenizer, the token streams, the model and the optimizer; with --resume, the checkpoint's state."""
    shape = {k: v for k, v in [("n_layer", cfg.n_layer), ("n_head", cfg.n_head), ("n_embd", cfg.n_embd)] if v}
    out = runs.check_pretrain(cfg, shape, system)                 # every setting and the output folder
    rt = runtime.start_run(system, cfg.batch_size, cfg.threads)  # threads, device, precision, processes
    seed_everything(cfg.seed)
    ckpt = runs.read_checkpoint(out, "pretrain") if system.resume else None
    tok_path, train_stream, val_stream, init_config, init_state = runs.pretrain_tokens(cfg, rt, out, ckpt is None)
    tok = data.load_tokenizer(tok_path)
    if init_config is not None:
        config = dataclasses.replace(init_config, dropout=cfg.dropout)
    else:
        config = preset(cfg.preset, vocab_size=tok.get_vocab_size(), block_size=cfg.block_size,
                        dropout=cfg.dropout, pad_id=tok.token_to_id(data.PAD), **shape)
    model = GPT(config)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(rt.device)
    rt.print(f"pretrain: {len(train_stream):,} train / {len(val_stream):,} held-out tokens; model "
             f"{model.num_params():,} parameters ({cfg.init or cfg.preset}); {rt.world_size} process(es) on "
             f"{rt.device.type}, {rt.precision}")
    optimizer, scaler = make_optimizer(model, cfg.lr, cfg.weight_decay), rt.grad_scaler()
    val_batch = min(cfg.batch_size, len(val_stream) // cfg.block_size - 1)
    run = PretrainRun(cfg, rt, out, config, model, optimizer, scaler,
                      batcher=data.LMBatcher(train_stream, cfg.block_size, cfg.batch_size, seed=cfg.seed),
                      val_batcher=data.LMBatcher(val_stream, cfg.block_size, val_batch, seed=0)
                      if len(val_stream) > 2 * cfg.block_size else None,
                      run_config={"model": config.to_dict(), "pretrain": asdict(cfg)},
                      source=runs.file_sha256(tok_path), log=None)
    run.log = runs.RunLog(out, runs.resume_pretrain(run, ckpt), rt.is_main)
    return run


def validation_loss(run: PretrainRun) -> float:
    """Mean next-token loss on the held-out windows; each process scores every world_size-th batch."""
    run.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in runtime.share(run.val_batcher.epoch(0), run.rt):
            with run.rt.autocast():
                total += run.model(x.to(run.rt.device), y.to(run.rt.device))[1].item()
            count += 1
    run.model.train()
    total, count = run.rt.sum([total, count])
    return total / count


def pretrain_steps(run: PretrainRun, system: SystemConfig) -> float:
    """The optimizer steps from the run's current step to max_steps; returns the run's wall time."""
    cfg, rt, state = run.cfg, run.rt, run.log.state
    train_model = runtime.wrap(run.model, rt, system.compile)
    params = list(run.model.parameters())
    t_start = time.time() - state["wall_s"]
    speed = runtime.Throughput()
    batches = lm_batches(run.batcher, state["step"])
    bar = tqdm(range(state["step"], cfg.max_steps), initial=state["step"], total=cfg.max_steps, desc="pretrain",
               dynamic_ncols=True, mininterval=1.0, disable=not rt.is_main)
    train_model.train()
    for step in bar:
        lr = cfg.lr * cosine_schedule(step, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        set_lr(run.optimizer, lr)
        x, y = next(batches)                                             # (B, T), (B, T): the global batch
        loss, _ = train_step(train_model, (x, y), rt, system.grad_accum, run.optimizer, run.scaler, params,
                             cfg.grad_clip)
        run.optimizer.zero_grad(set_to_none=True)
        check_loss(run, loss, step + 1)
        state["tokens"] += x.numel()
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{speed.add(x.numel()):,.0f}")
        record = {"step": step + 1, "train_loss": loss, "lr": lr}
        evaluation = (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps
        saving = evaluation or (system.save_every and (step + 1) % system.save_every == 0)
        if saving:
            check_weights(run, step + 1)
        if run.val_batcher is not None and evaluation:
            record["val_loss"] = validation_loss(run)
            if rt.is_main:
                tqdm.write(f"step {step + 1}: train loss {loss:.3f}, held-out loss {record['val_loss']:.3f}")
        state["step"] = step + 1
        run.log.add(record)
        if saving:
            runs.save_pretrain_checkpoint(run, t_start)
    return time.time() - t_start


# ---------------------------------------------------------------------------------------------------------
# 5. Fine-tuning
# ---------------------------------------------------------------------------------------------------------

def default_lr(method: str) -> float:
    return 2e-4 if method == dynlora.FULL else 1e-3


@dataclass
class FinetuneRun:
    """Everything a fine-tuning run holds between its setup, its epochs and its end."""
    cfg: FinetuneConfig
    task: data.TaskSpec
    adapter_cfg: dynlora.AdapterConfig | None   # None for full fine-tuning
    rt: runtime.Runtime
    out: Path
    config: GPTConfig                       # the backbone's
    data: runs.RunData
    model: GPTClassifier
    allocator: dynlora.RankAllocator | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr: float                               # the peak learning rate in effect
    total_steps: int
    source: str                             # hash of the backbone (or tokenizer) it started from
    run_config: dict | None = None          # what the run is, as saved in config.json and the checkpoint
    log: runs.RunLog | None = None          # the run's state and metrics.jsonl
    counts: tuple | None = None             # (trainable, total) parameters
    saved_step: int | None = None           # the step of the last checkpoint written or resumed from
    compiled: dict | None = None            # torch.compile's graphs and compile seconds in this attempt (None: eager)


def finetune(cfg: FinetuneConfig, adapter_overrides: dict | None = None, system: SystemConfig | None = None) -> dict:
    """Fine-tune on one GLUE task; returns the final result record (also appended to results/).

    adapter_overrides: AdapterConfig fields that replace the defaults of cfg.method (e.g. {"r": 4}).
    system: how to run (device, precision, processes, checkpoints, --resume); SystemConfig() by default.

    With several processes (torchrun) the dynamic parts need no communication of their own: the allocator
    reads the all-reduced gradients (allocation_step), the gates are parameters like the others, and the dev
    set's gate statistics are summed over the processes (analysis.sum_gate_statistics).
    """
    system = system or SystemConfig()
    run = setup_finetune(cfg, adapter_overrides or {}, system)
    wall = finetune_epochs(run, system)
    return finish_finetune(run, wall)


def setup_finetune(cfg: FinetuneConfig, overrides: dict, system: SystemConfig) -> FinetuneRun:
    """The data, the model (pretrained body, new head, the method's adapters), the optimizer and the
    allocator; with --resume, the checkpoint's state."""
    task, adapter_cfg, out = runs.check_finetune(cfg, overrides, system)   # every setting and output folder
    rt = runtime.start_run(system, cfg.batch_size, cfg.threads)          # threads, device, precision, processes
    seed_everything(cfg.seed)
    ckpt = runs.read_checkpoint(out, "finetune") if system.resume else None
    config, backbone_state, tok, run_data, source = runs.finetune_inputs(cfg, task, out, rt, ckpt is None)
    model = runs.build_classifier(config, backbone_state, task.num_outputs, cfg.readout, task, tok)
    if adapter_cfg is not None:
        dynlora.apply_lora(model, adapter_cfg)
    model.to(rt.device)
    total_steps = cfg.epochs * len(run_data.train)
    allocator = dynlora.RankAllocator(model, adapter_cfg, total_steps) \
        if adapter_cfg is not None and adapter_cfg.allocation else None
    lr = cfg.lr or default_lr(cfg.method)
    optimizer = make_optimizer(model, lr, cfg.weight_decay, adapter_cfg.gate_lr_mult if adapter_cfg else 1.0)
    run = FinetuneRun(cfg, task, adapter_cfg, rt, out, config, run_data, model, allocator, optimizer,
                      rt.grad_scaler(), lr, total_steps, source)
    runs.start_finetune(run, ckpt)          # says what it trains; config.json, or the checkpoint loaded
    return run


def finetune_epochs(run: FinetuneRun, system: SystemConfig) -> float:
    """The epochs from the run's current position to the end: steps, dev evaluations, the best model saved,
    a checkpoint after every epoch (and every --save-every steps). Returns the run's wall time."""
    cfg, rt, state = run.cfg, run.rt, run.log.state
    regularization = (lambda: dynlora.regularization_loss(run.model)) if run.adapter_cfg is not None else None
    params = [p for p in run.model.parameters() if p.requires_grad]
    warmup = int(cfg.warmup_ratio * run.total_steps)
    train_model = runtime.wrap(run.model, rt, system.compile)
    compiled_before = runtime.compile_stats() if train_model is not run.model else None
    t_start, speed = time.time() - state["wall_s"], runtime.Throughput()
    train_model.train()
    for epoch in range(state["epoch"], cfg.epochs):
        batches = itertools.islice(run.data.train.epoch(epoch), state["batch"], None)
        bar = tqdm(batches, initial=state["batch"], total=len(run.data.train), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   dynamic_ncols=True, mininterval=1.0, disable=not rt.is_main)
        for idx, y in bar:
            lr_now = run.lr * cosine_schedule(state["step"], run.total_steps, warmup, cfg.min_lr_ratio)
            set_lr(run.optimizer, lr_now)
            loss, stepped = train_step(train_model, (idx, y), rt, system.grad_accum, run.optimizer, run.scaler,
                                       params, cfg.grad_clip, regularization)
            step = state["step"] = state["step"] + 1          # optimizer steps taken, counted from 1
            check_loss(run, loss, step, epoch)
            state["batch"] += 1
            state["tokens"] += idx.numel()
            allocation_step(run, step, stepped, epoch)
            run.optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr_now:.1e}", tok_s=f"{speed.add(idx.numel()):,.0f}")
            if step % 50 == 0:
                record = {"step": step, "epoch": epoch + 1, "train_loss": loss, "lr": lr_now}
                run.log.add(record)
                state["history"].append(record)
            if system.save_every and step % system.save_every == 0 and state["batch"] < len(run.data.train):
                check_weights(run, step, epoch)  # (the epoch's last batch is followed by the epoch-end checkpoint)
                runs.save_finetune_checkpoint(run, t_start)
        end_of_epoch(run, epoch, time.time() - t_start)                   # checks the weights first
        runs.save_finetune_checkpoint(run, t_start)
    if compiled_before is not None and hasattr(train_model, "_orig_mod"):
        run.compiled = {k: round(v - compiled_before[k], 1) for k, v in runtime.compile_stats().items()}
    return time.time() - t_start


def allocation_step(run: FinetuneRun, step: int, stepped: bool, epoch: int):
    """After optimizer.step(), before zero_grad(): the allocator reads the gradients.

    Under DDP they are the all-reduced gradients, the same on every process, so every process computes the
    same importance scores and the same masks (DDP does not broadcast them: see runtime.wrap). A step the
    fp16 scaler skipped has inf/nan gradients, which would poison the importance averages: the allocator sits
    that step out. A reallocation logs the new rank pattern.
    """
    if run.allocator is None or not stepped:
        return
    n_before = len(run.allocator.history)
    run.allocator.step(step)
    if len(run.allocator.history) > n_before:
        run.log.add({"epoch": epoch + 1, **run.allocator.history[-1]})


def end_of_epoch(run: FinetuneRun, epoch: int, wall_s: float):
    """Score the dev set, log it, and save the model if it is the best so far."""
    state = run.log.state
    check_weights(run, state["step"], epoch)
    dev = evaluate(run.model, run.task, run.data.dev, run.rt)
    record = {"step": state["step"], "epoch": epoch + 1, "dev": dev, "score": dev["score"], "wall_s": wall_s}
    run.log.add(record)
    state["history"].append(record)
    if run.rt.is_main:
        tqdm.write(f"epoch {epoch + 1}: {'validation' if run.cfg.val_fraction else 'dev'} {run.task.name} score "
                   f"{100 * dev['score']:.2f}  "
                   + "  ".join(f"{s}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
                               for s, m in dev.items() if s != "score"))
    if dev["score"] > state["best"]["score"]:
        state["best"] = {"score": dev["score"], "epoch": epoch + 1, "dev": dev}
        if run.rt.is_main:
            runs.save_best(run)
    state["epoch"], state["batch"] = epoch + 1, 0


def finish_finetune(run: FinetuneRun, wall: float) -> dict:
    """The result record (runs.write_finetune_result writes it): the best and the last epoch's dev scores, and the
    best model restored and scored as it is deployed (merged, gates frozen to their mean)."""
    # The model at the end of training, whose last-epoch dev score is `last_score`: the number the report
    # compares (for an allocating method it is also the model at the target budget).
    adapters = run.adapter_cfg is not None
    final = {"final_active_adapter_params": dynlora.active_parameter_count(run.model) if adapters else None,
             "final_ranks": run.allocator.rank_pattern() if run.allocator is not None else None}  # layer -> rank
    run.rt.barrier()                                                 # rank 0 has written the best model
    runs.restore_best(run.model, run.out, run.cfg.method)            # the saved model is the best epoch's
    inference = analysis.inference_forms(run.model, run.adapter_cfg, run.data, run.config.pad_id, run.out, run.rt,
                                         lambda m: evaluate(m, run.task, run.data.dev, run.rt)) if adapters else {}
    return runs.write_finetune_result(run, wall, final, inference)


# ---------------------------------------------------------------------------------------------------------
# 6. Evaluation
# ---------------------------------------------------------------------------------------------------------

@torch.inference_mode()
def predict(model: nn.Module, batcher, rt: runtime.Runtime | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """(predictions, labels, mean loss) over one pass of an eval batcher.

    With several processes, each one scores its share of the batches (runtime.share) and the results are
    gathered, so every process returns the predictions of the whole split (in another order, which no
    metric minds). Runs in the run's precision under torch.inference_mode, which, unlike no_grad, also skips
    autograd's version counters and view tracking: nothing computed here is ever differentiated.
    """
    rt = rt or runtime.Runtime(next(model.parameters()).device, "fp32")
    was_training = model.training
    model.eval()
    preds, labels, losses = [], [], []
    for idx, y in runtime.share(batcher.epoch(0), rt):
        with rt.autocast():
            logits, loss = model(idx.to(rt.device), y.to(rt.device))
        logits = logits.float().cpu()
        preds.append(logits.numpy() if logits.dim() == 1 else classes(logits))
        labels.append(y.numpy())
        losses.append(loss.item() * len(y))
    model.train(was_training)
    gathered = rt.gather((preds, labels, losses))
    preds, labels, losses = ([a for part in gathered for a in part[i]] for i in range(3))
    preds, labels = np.concatenate(preds), np.concatenate(labels)
    return preds, labels, float(np.sum(losses) / len(labels))


def classes(logits: torch.Tensor) -> np.ndarray:
    """The predicted class of each row of (B, C) logits; nan for a row that is not finite, which the metrics
    report as an error (argmax would quietly call it a class, and score a model of NaN weights)."""
    pred = logits.argmax(-1).numpy()
    finite = torch.isfinite(logits).all(-1).numpy()
    return pred if finite.all() else np.where(finite, pred, np.nan)


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


if __name__ == "__main__":
    raise SystemExit("train.py holds what a run does; the command line is cli.py: python cli.py --help")
