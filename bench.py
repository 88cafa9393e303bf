"""
bench.py -- speed and memory figures, measured side by side in one run (`python cli.py bench`).

Machines are noisy (other processes, frequency scaling), so a figure is never one timing against a number
taken on another day: every comparison is a ratio of two things timed in the same run, interleaved round
by round (A, B, C, A, B, C, ...). A ratio is reported as its median over the rounds with the range of the
per-round ratios, [lowest, highest]: a target counts as met only when the whole range meets it.

What this file holds, in order:
  1. Timing          -- the matmul yardstick (per dtype), interleaved rounds, ratios with their range.
  2. Models and steps -- a classifier with each method's adapters, one training step of it (eager, compiled,
                        under autocast).
  3. Memory          -- the peak resident memory of a fresh process training one method.
  4. FLOP counting   -- the matmul FLOPs of a training step with frozen weights (the adapter methods).
  5. run             -- the figures of the "cpu" preset (the from-scratch backbone) and, unless quick, of the
                        pretrained backbone's shape (SmolLM2-135M), the padding of the suite's batches and
                        whole fine-tuning runs, written to results/bench.json, which `python cli.py report`
                        renders into RESULTS.md.

Figures (weights at random init; speed does not depend on their values):
  - the CPU, its vector ISA, whether it computes bf16 natively, and what --precision auto picks there.
  - fp32 (and, with native bf16, bf16) matmul FLOP/s (2048 x 2048 x 2048): the practical peak, the yardstick.
  - achieved FLOP/s of a pretraining step and a full fine-tuning step (model.training_flops: 3 x forward),
    and of a LoRA step of SmolLM2-135M (lora_training_flops: the frozen matmuls cost forward + input
    gradient, 2 x forward; the attention products, the adapters and the head 3 x forward) in fp32 eager, bf16
    eager (native bf16 only) and under torch.compile (inductor fuses the elementwise work of RMSNorm,
    rotary and SwiGLU, which does not scale with threads the way the matmuls do), each against the matmul
    of its own dtype, with its range over the rounds.
  - step time of each adapter method / full fine-tuning, and of each dynamic variant / static LoRA, at r = 8
    and in the configuration the GLUE grid trains (alloc and dynlora from r = 12 to 8, against LoRA at 8).
  - peak memory of LoRA training / full fine-tuning (peak resident memory, VmHWM, of a fresh process, minus
    what it held before building the model: weights, gradients, optimizer state and activations).
  - merged-model inference time / base-model inference time.
  - the FLOPs of the rank gates as a fraction of the model's forward FLOPs (counted, not timed).
  - the padding share of the training batches per task, and whole fine-tuning runs (a fresh process from
    start to result) in fp32 eager against --precision auto and --compile, with compile time and graphs.
"""

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import data
import dynlora
import runs
import runtime
from model import GPT, GPTClassifier, GPTConfig, matmul_flops_per_token, preset, training_flops


# ---------------------------------------------------------------------------------------------------------
# 1. Timing
# ---------------------------------------------------------------------------------------------------------

def matmul_flops_per_s(n: int, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`: the practical peak a step in that dtype is measured against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def interleaved_times(fns: dict, rounds: int, steps_per_round: int) -> dict:
    """Seconds per call of each function in each round: {name: [round 1, round 2, ...]}, timed interleaved."""
    times = {name: [] for name in fns}
    for fn in fns.values():          # warm-up: first calls allocate and pick kernels
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(steps_per_round):
                fn()
            times[name].append((time.perf_counter() - t) / steps_per_round)
    return times


def ratio(times: dict, a: str, b: str) -> tuple[float, float, float]:
    """(median, lowest, highest) over the rounds of time[a] / time[b], each round's pair timed back to back."""
    per_round = [x / y for x, y in zip(times[a], times[b])]
    return statistics.median(per_round), min(per_round), max(per_round)


def ratio_row(name: str, times: dict, a: str, b: str, target: str = "") -> dict:
    mid, lo, hi = ratio(times, a, b)
    return dict(name=name, value=f"{mid:.3f} [{lo:.3f}–{hi:.3f}]", low=lo, high=hi, target=target)


def flops_row(name: str, flops: float, seconds: list, peak: float, target: str = "") -> dict:
    """Achieved GFLOP/s of a step (`flops` per call) at its median time, as a % of the matmul yardstick `peak`
    (FLOP/s), with the range of the per-round percentages: a ">= x%" target is met only by the lowest round."""
    per_round = [100 * flops / s / peak for s in seconds]
    mid = flops / statistics.median(seconds)
    value = f"{mid / 1e9:.1f} ({100 * mid / peak:.0f}%) [{min(per_round):.0f}–{max(per_round):.0f}%]"
    return dict(name=name, value=value, low=min(per_round), high=max(per_round), target=target)


def median(times: dict, name: str) -> float:
    return statistics.median(times[name])


# ---------------------------------------------------------------------------------------------------------
# 2. Models and steps
# ---------------------------------------------------------------------------------------------------------

def pruned_methods() -> list:
    """The methods the grid trains from r = 12 down to 8 (alloc, dynlora): those of the plain form that
    allocate. AdaLoRA, of the svd form, is timed at r only."""
    return [m for m, preset in dynlora.METHODS.items() if preset["allocation"] and preset["form"] == "plain"]


def classifier(method: str, config: GPTConfig, r: int, target_r: int | None = None,
               targets: tuple | None = None) -> GPTClassifier:
    """A 2-class classifier with `method`'s adapters (none for full) at rank r (allocating: r -> target_r) on
    the layers named by targets (None: the adapters' default targets)."""
    torch.manual_seed(0)
    model = GPTClassifier(config, num_outputs=2)
    if method != dynlora.FULL:
        # The default reallocation interval delta_t, with the warm-up cut to 2 steps so that the timed steps
        # include reallocations (with the default t_init they would all fall in the warm-up).
        targets = dynlora.AdapterConfig.targets if targets is None else tuple(targets)
        cfg = dynlora.config_for_method(method, r=r, target_r=target_r or max(1, r * 2 // 3), t_init=2, t_final=2,
                                        targets=targets)
        dynlora.apply_lora(model, cfg)
    return model


def make_step(model: torch.nn.Module, idx: torch.Tensor, y: torch.Tensor, method: str, total_steps: int,
              precision: str = "fp32"):
    """A closure running one full training step (forward, backward, AdamW, allocator) of `model`, its forward
    pass under the autocast of `precision` (fp32: none), as train.train_step runs it."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    raw = runtime.unwrap(model)
    cfg = getattr(raw, "adapter_config", None)
    allocator = dynlora.RankAllocator(raw, cfg, total_steps) if cfg is not None and cfg.allocation else None
    rt = runtime.Runtime(torch.device("cpu"), precision)
    state = {"t": 0}

    def step():
        with rt.autocast():
            _, loss = model(idx, y)
            if cfg is not None:
                loss = loss + dynlora.regularization_loss(raw)
        loss.backward()
        opt.step()
        state["t"] += 1
        if allocator is not None:
            allocator.step(state["t"])
        opt.zero_grad(set_to_none=True)
    return step


def compiled_step(model: torch.nn.Module, idx: torch.Tensor, y: torch.Tensor, method: str,
                  precision: str = "fp32") -> tuple:
    """(make_step of torch.compile(model), "") after its first call has compiled it (a minute or more for
    SmolLM2-135M on 2 CPU cores), or (None, the reason) where torch.compile cannot run here (inductor
    needs a C++ compiler on the CPU)."""
    why_not = runtime.compile_unavailable(torch.device("cpu"))
    if why_not:
        return None, why_not
    step = make_step(torch.compile(model), idx, y, method, total_steps=1000, precision=precision)
    try:
        step()
    except Exception as err:                   # torch._dynamo / inductor errors have no common public base
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}"
    return step, ""


# ---------------------------------------------------------------------------------------------------------
# 3. Memory
# ---------------------------------------------------------------------------------------------------------

def _peak_memory_child(method: str, config_dict: dict, B: int, T: int, r: int, queue):
    torch.manual_seed(0)
    config = GPTConfig(**config_dict)
    _reset_peak_rss()
    before = runs.memory_bytes("VmRSS")
    model = classifier(method, config, r)
    idx = torch.randint(4, config.vocab_size, (B, T))
    y = torch.randint(0, 2, (B,))
    step = make_step(model, idx, y, method, total_steps=100)
    for _ in range(3):
        step()
    queue.put(runs.memory_bytes("VmHWM") - before)


def _reset_peak_rss():
    """Start VmHWM afresh. A spawned child can inherit the parent's peak (ru_maxrss does, across exec), which
    would make every method report the parent's memory; writing 5 to clear_refs resets it (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_training_memory(method: str, config: GPTConfig, B: int, T: int, r: int) -> int:
    """Bytes: peak resident memory of a fresh process training `method`, minus its memory before the model."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(method, config.to_dict(), B, T, r, queue))
    proc.start()
    value = queue.get(timeout=1800)
    proc.join()
    return value


def memory_row(config: GPTConfig, B: int, T: int, r: int, target: str = "") -> dict:
    mem = {m: peak_training_memory(m, config, B, T, r) for m in (dynlora.FULL, "lora")}
    return dict(name="peak training memory lora / full", value=f"{mem['lora'] / mem[dynlora.FULL]:.2f} "
                f"({mem['lora'] / 2**20:.0f} / {mem[dynlora.FULL] / 2**20:.0f} MiB)", target=target)


# ---------------------------------------------------------------------------------------------------------
# 4. FLOP counting
# ---------------------------------------------------------------------------------------------------------

def lora_training_flops(config: GPTConfig, adapter_cfg: dynlora.AdapterConfig, n_tokens: int, seq_len: int) -> int:
    """Matmul FLOPs of one training step of an adapter method (frozen backbone), over n_tokens.

    A frozen weight needs no weight gradient, so its matmuls cost the forward product and the gradient with
    respect to their input: 2 x forward. The attention products (q k^T and the weighted sum of v) have no
    weights: both of their inputs need gradients, 3 x forward. The adapters (2 r (d_in + d_out) per token
    and adapted layer) and the head train: 3 x forward. The first block's input needs no gradient (nothing
    before it trains), a saving not subtracted here; the head's 2 d k is negligible and not counted.
    """
    forward = matmul_flops_per_token(config, seq_len, lm_head=False)
    attention = 4 * seq_len * config.n_embd * config.n_layer
    widths = {"q_proj": (config.n_embd, config.n_embd), "o_proj": (config.n_embd, config.n_embd),
              "k_proj": (config.n_embd, config.kv_heads * config.head_dim),
              "v_proj": (config.n_embd, config.kv_heads * config.head_dim),
              "fc_in": (config.n_embd, config.hidden), "gate_proj": (config.n_embd, config.hidden),
              "up_proj": (config.n_embd, config.hidden), "fc_out": (config.hidden, config.n_embd),
              "down_proj": (config.hidden, config.n_embd)}
    adapters = config.n_layer * sum(2 * adapter_cfg.r * sum(widths[t]) for t in adapter_cfg.targets)
    return n_tokens * (2 * (forward - attention) + 3 * attention + 3 * adapters)


# ---------------------------------------------------------------------------------------------------------
# 5. run
# ---------------------------------------------------------------------------------------------------------

def cpu_preset_rows(quick: bool) -> list:
    """The figures of the from-scratch backbone (the "cpu" preset; "nano" when quick)."""
    config = preset("nano") if quick else preset("cpu")
    B, T, r = (4, 16, 4) if quick else (32, 64, 8)
    rounds, per_round = (2, 1) if quick else (11, 3)
    peak = matmul_flops_per_s(256 if quick else 2048, 3 if quick else 10)
    rows = [dict(name="fp32 matmul 2048^3 (GFLOP/s)", value=f"{peak / 1e9:.1f}")]

    torch.manual_seed(0)
    lm = GPT(config)
    lm_idx = torch.randint(4, config.vocab_size, (B, config.block_size if not quick else T))
    lm_opt = torch.optim.AdamW(lm.parameters(), lr=1e-4)

    def lm_step():
        _, loss = lm(lm_idx, lm_idx)
        loss.backward()
        lm_opt.step()
        lm_opt.zero_grad(set_to_none=True)

    # Fine-tuning steps of every method on the same batch; "alloc 12->8" and "dynlora 12->8" are the grid's.
    idx, y = torch.randint(4, config.vocab_size, (B, T)), torch.randint(0, 2, (B,))
    grid_r = (6, 4) if quick else (12, 8)
    models = {m: classifier(m, config, r) for m in dynlora.method_names()}
    models |= {f"{m} {grid_r[0]}->{grid_r[1]}": classifier(m, config, grid_r[0], grid_r[1]) for m in pruned_methods()}
    steps = {name: make_step(m, idx, y, name.split()[0], total_steps=1000) for name, m in models.items()}
    times = interleaved_times({"pretrain": lm_step, **steps}, rounds, per_round)
    peak = max(peak, matmul_flops_per_s(256 if quick else 2048, 3 if quick else 10))

    lm_flops = training_flops(config, lm_idx.numel(), lm_idx.shape[1], lm_head=True) / median(times, "pretrain")
    ft_flops = training_flops(config, idx.numel(), T, lm_head=False) / median(times, dynlora.FULL)
    rows.append(dict(name=f"pretraining step, B={B} T={lm_idx.shape[1]} (GFLOP/s, % of matmul)",
                     value=f"{lm_flops / 1e9:.1f} ({100 * lm_flops / peak:.0f}%)", target=">= 70%"))
    rows.append(dict(name=f"full fine-tuning step, B={B} T={T} (GFLOP/s, % of matmul)",
                     value=f"{ft_flops / 1e9:.1f} ({100 * ft_flops / peak:.0f}%)", target=">= 70%"))
    for m in dynlora.METHODS:
        rows.append(ratio_row(f"step time {m} / full (r={r})", times, m, dynlora.FULL,
                              "<= 0.72" if m == "lora" else ""))
    for m in dynlora.METHODS:
        if m != "lora":
            rows.append(ratio_row(f"step time {m} / lora (r={r})", times, m, "lora", "<= 1.02"))
    for m in pruned_methods():
        name = f"{m} {grid_r[0]}->{grid_r[1]}"
        rows.append(ratio_row(f"step time {name} / lora (r={r}), the grid's configuration", times, name, "lora",
                              "<= 1.02"))
    rows.append(memory_row(config, B, T, r, "<= 0.6"))

    # Inference: the base model against the LoRA model merged back into plain Linear layers.
    base = models[dynlora.FULL].eval()
    merged = dynlora.merge_and_unload(models["lora"]).eval()
    infer_idx = torch.randint(4, config.vocab_size, (2 * B, T))
    with torch.no_grad():
        inf = interleaved_times({"base": lambda: base(infer_idx), "merged": lambda: merged(infer_idx)},
                                rounds=2 * rounds, steps_per_round=per_round * 2)
    rows.append(ratio_row("inference merged lora / base", inf, "merged", "base", "<= 1.01"))

    # Gate FLOPs: counted per token against the model's forward matmul FLOPs.
    gate_cfg = dynlora.config_for_method("dynlora", r=r)
    n_gated = len(gate_cfg.targets) * config.n_layer
    gate = n_gated * dynlora.gate_flops_per_token(r, config.n_embd, gate_cfg.gate_x_dims)
    rows.append(dict(name=f"gate FLOPs / model forward FLOPs (r={r}, {n_gated} gated layers)",
                     value=f"{100 * gate / matmul_flops_per_token(config, T, lm_head=False):.3f}%"))
    rows += [dict(name=f"median step time {name} (ms)", value=f"{1000 * median(times, name):.1f}") for name in times]
    return rows


def smollm2_rows(B: int = 16, T: int = 64, rounds: int = 7) -> list:
    """The SmolLM2-135M shape at the `smollm2` suite's batch (16 x 64 tokens).

    The LoRA step (r = 8 on q, v) in fp32 eager and, on a CPU that computes bf16 natively, bf16 eager and bf16
    under torch.compile (elsewhere fp32 under torch.compile: emulated bf16 is many times slower than fp32 and is
    not timed); each as tokens/s and as FLOP/s against the same run's matmul FLOP/s in the same dtype. Then, at
    the recipe's precision (--precision auto on this machine, eager: see whole_run_rows for compile), full
    fine-tuning's step and the dynamic methods' steps in the configuration the suite trains (gate at r = 8,
    alloc and dynlora 12 -> 8) against LoRA's, and the peak memory."""
    config = preset("smollm2-135m", vocab_size=49152 + 3)      # the imported vocabulary: 3 tokens added
    cpu = torch.device("cpu")
    auto = runtime.select_precision("auto", cpu)
    idx, y = torch.randint(4, config.vocab_size, (B, T)), torch.randint(0, 2, (B,))
    models = {m: classifier(m, config, 8) for m in dynlora.method_names()
              if m == dynlora.FULL or not dynlora.METHODS[m]["allocation"]}         # full, lora, gate
    models |= {f"{m} 12->8": classifier(m, config, 12, 8) for m in pruned_methods()}
    steps = {m: make_step(model, idx, y, m.split()[0], total_steps=1000, precision=auto)
             for m, model in models.items()}
    # On a CPU, auto is bf16 exactly where bf16 is native: then "lora" is the bf16 step and fp32 is timed apart.
    steps[f"lora {auto}"] = steps["lora"]
    if auto != "fp32":
        steps["lora fp32"] = make_step(models["lora"], idx, y, "lora", 1000)
    compiled, why_not = compiled_step(classifier("lora", config, 8), idx, y, "lora", precision=auto)
    if compiled is not None:
        steps[f"lora {auto} compiled"] = compiled
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peak = {p: matmul_flops_per_s(2048, 10, dtypes[p]) for p in {"fp32", auto}}
    distinct = {}                                 # time each closure once per round, under all of its names
    for name, fn in steps.items():
        distinct.setdefault(id(fn), (name, fn))
    timed = interleaved_times({name: fn for name, fn in distinct.values()}, rounds, 1)
    times = {name: timed[distinct[id(fn)][0]] for name, fn in steps.items()}
    peak = {p: max(v, matmul_flops_per_s(2048, 10, dtypes[p])) for p, v in peak.items()}
    lora_flops = lora_training_flops(config, models["lora"].adapter_config, idx.numel(), T)
    full_flops = training_flops(config, idx.numel(), T, lm_head=False)
    tag = f"SmolLM2-135M, B={B} T={T}"
    rows = [dict(name="CPU", value=f"{runs.machine_description()}; --precision auto -> {auto}")]
    rows += [dict(name=f"{tag}: {p} matmul 2048^3 (GFLOP/s), same run", value=f"{v / 1e9:.1f}")
             for p, v in peak.items()]
    variants = ["lora fp32"] + (["lora bf16"] if "lora bf16" in steps else []) + \
        ([f"lora {auto} compiled"] if compiled is not None else [])
    for name in variants:
        p = "bf16" if "bf16" in name else "fp32"
        label = name.replace("lora ", "LoRA step, ").replace(" compiled", ", torch.compile")
        target = ">= 75%" if p == "bf16" and name == f"lora {auto} compiled" else ">= 70%" if p == "fp32" else ""
        rows += [flops_row(f"{tag}: {label} (GFLOP/s, % of {p} matmul)", lora_flops, times[name], peak[p], target),
                 dict(name=f"{tag}: {label} tokens/s", value=f"{idx.numel() / median(times, name):.0f}")]
    if compiled is None:
        rows.append(dict(name=f"{tag}: LoRA step, torch.compile", value=f"not measured: {why_not}"))
    if auto == "fp32":
        rows.append(dict(name=f"{tag}: LoRA step, bf16", value=f"not measured: no native bf16 on this CPU "
                         f"({torch.backends.cpu.get_cpu_capability()}), where bf16 is emulated (many times slower)"))
    for name in variants[1:]:
        rows.append(ratio_row(f"{tag}: step time {name} / lora fp32", times, name, "lora fp32"))
    rows += [flops_row(f"{tag}: full fine-tuning step, {auto} (GFLOP/s, % of {auto} matmul)", full_flops,
                       times[dynlora.FULL], peak[auto]),
             ratio_row(f"{tag}: step time lora / full, {auto}", times, "lora", dynlora.FULL)]
    mem = memory_row(config, B, T, 8)
    return rows + [{**mem, "name": f"{tag}: " + mem["name"]}]


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")   # a Llama block's


def dynamic_cost_rows(quick: bool = False, B: int = 16, lengths: tuple = (64, 11)) -> list:
    """The dynamic methods' own cost: each one's SmolLM2-135M training step against LoRA's at the same final
    budget (gate and AdaLoRA at r = 8, alloc and dynlora 12 -> 8), with the adapters on q, v (the short recipe)
    and on all seven linear projections (the tuned recipe's LoRA), eager, in fp32 (the precision the tuned
    suite pins, docs/reproduce.md), at each batch length T of `lengths`: 64 (the short recipe's cap) and 11
    (CoLA's mean padded batch length, the tuning task's short sentences). The gates add a fixed number of small
    operations per adapted layer and tensor, whatever T, while LoRA's own work grows with T, so the shorter T
    is the harder test of "cheap".

    Each round times several steps of each method back to back, so that a round's ratio is not one step's
    jitter; a "<= 1.02" target is met only if every round's ratio meets it. quick: a 2-layer model of the
    same architecture."""
    config = preset("smollm2-135m", vocab_size=49152 + 3) if not quick else \
        preset("smollm2-135m", vocab_size=512, n_layer=2, n_embd=72, mlp_hidden=96)
    rounds, per_round = (2, 1) if quick else (9, 3)
    precision = "fp32"
    rows = []
    for T in lengths:
        idx, y = torch.randint(4, config.vocab_size, (B, T)), torch.randint(0, 2, (B,))
        for where, targets in (("q,v", ("q_proj", "v_proj")), ("all seven projections", ALL_LINEAR)):
            models = {m: classifier(m, config, 8, targets=targets) for m in dynlora.method_names()
                      if m != dynlora.FULL and m not in pruned_methods()}                   # lora, gate, adalora
            models |= {f"{m} 12->8": classifier(m, config, 12, 8, targets=targets) for m in pruned_methods()}
            steps = {m: make_step(model, idx, y, m.split()[0], total_steps=1000, precision=precision)
                     for m, model in models.items()}
            times = interleaved_times(steps, rounds, per_round)
            rows += [ratio_row(f"SmolLM2-135M, B={B} T={T}, adapters on {where}: step time {m} / lora, {precision}, "
                               f"{per_round} steps a round", times, m, "lora", "<= 1.02")
                     for m in models if m != "lora"]
            rows += [dict(name=f"SmolLM2-135M, B={B} T={T}, adapters on {where}: median step time lora (ms)",
                          value=f"{1000 * median(times, 'lora'):.1f}")]
            del models, steps
    return rows


SUITE_RECIPE = ["--task", "SST-2", "--method", "lora", "--lora-r", "8", "--max-train", "1000", "--epochs", "1",
                "--max-len", "64", "--batch-size", "16"]


def whole_run_rows(rounds: int = 2, backbone: str = "runs/smollm2-135m", data_dir=None,
                   variants: dict | None = None) -> list:
    """Whole fine-tuning runs, each a fresh `python cli.py finetune` process timed from its start to its
    result (data, training, evaluation, the merged model's score): the `smollm2` suite's recipe (LoRA r = 8 on
    SST-2, batch 16, length <= 64, one epoch) on 1,000 examples, in fp32 eager, at --precision auto where that
    differs, and under --compile, interleaved round by round. tokens/s = training tokens / the process's wall
    time. The compiled run's record gives its compile seconds and graphs (one per new shape until the varying
    length is marked dynamic); the inductor cache is off, so every round compiles from scratch, as a first run
    does. Needs the imported backbone and the GLUE files; says so otherwise. variants: {name: extra flags},
    the first one the reference (the tests pass their own)."""
    ddir = data_dir or data.find_data_dir("SST-2")
    if not (Path(backbone) / runs.BACKBONE_FILE).is_file() or ddir is None:
        return [dict(name="whole fine-tuning run", value=f"not measured: needs {backbone} (`python cli.py "
                     f"import`) and the GLUE files ($GLUE_DIR)")]
    auto = runtime.select_precision("auto", torch.device("cpu"))
    if variants is None:
        variants = {"fp32 eager": ["--precision", "fp32"], f"{auto} compiled": ["--precision", auto, "--compile"]}
        if auto != "fp32":
            variants["auto eager"] = ["--precision", auto]
    reference = next(iter(variants))
    records = {name: [] for name in variants}
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, flags in variants.items():
                out = Path(tmp) / f"{name.replace(' ', '-')}-{r}"
                cmd = [sys.executable, str(runs.REPO / "cli.py"), "finetune", *SUITE_RECIPE, "--backbone", backbone,
                       "--data-dir", str(ddir), "--out-dir", str(out), "--results-dir", str(out), *flags]
                t = time.perf_counter()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t
                if done.returncode != 0:
                    tail = (done.stderr.strip().splitlines() or ["?"])[-1]
                    return [dict(name="whole fine-tuning run", value=f"failed ({name}): {tail[:150]}")]
                record = json.loads((out / runs.FINAL_FILE).read_text())
                records[name].append({"wall": wall, "tokens": record["train_tokens"], "compiled": record["compiled"]})
    speed = {name: [r["tokens"] / r["wall"] for r in rs] for name, rs in records.items()}
    tag = "whole run (SST-2, 1,000 examples, LoRA, from start to result)"
    rows = [dict(name=f"{tag}: {name} tokens/s", value=f"{statistics.median(v):.0f} [{min(v):.0f}–{max(v):.0f}], "
                 f"{statistics.median(r['wall'] for r in records[name]):.0f} s") for name, v in speed.items()]
    seconds_per_token = {name: [1 / v for v in values] for name, values in speed.items()}
    for name in speed:
        if name != reference:       # a tokens/s ratio is the inverse ratio of seconds per token, round by round
            target = ">= 1.8" if auto == "bf16" and name == "auto eager" else ""
            rows.append(ratio_row(f"{tag}: tokens/s {name} / {reference}", seconds_per_token, reference, name, target))
    compiled = [r["compiled"] for rs in records.values() for r in rs if r["compiled"]]
    if compiled:
        rows.append(dict(name=f"{tag}: compile seconds / graphs compiled per run",
                         value=", ".join(f"{c['compile_s']:.0f} s / {c['graphs']}" for c in compiled)))
    return rows


def padding_rows(backbone: str = "runs/smollm2-135m") -> list:
    """The share of the training batches' slots that are padding, per task, at the suite's recipe (batch 16,
    length <= 64, the first 2,000 examples) and with all the training examples at a length that truncates at
    most 5% of them: padding is compute spent on nothing, and the length-bucketed batches keep it small."""
    ddir = data.find_data_dir()
    tok_path = Path(backbone) / runs.TOKENIZER_FILE
    if ddir is None or not tok_path.is_file():
        return [dict(name="padding of the training batches", value="not measured: needs the GLUE files and "
                     f"{tok_path}")]
    tok = data.load_tokenizer(tok_path)
    rows = []
    for name in ("CoLA", "SST-2", "MRPC", "STS-B", "RTE"):
        task = data.get_task(name)
        ids, labels = data.encode_examples(tok, data.read_split(ddir, task, "train"), 10 ** 6)
        lengths = np.array([len(x) for x in ids])
        fit = int(np.percentile(lengths, 95))           # the length that truncates at most 5%
        suite = data.BucketBatcher([x[:64] for x in ids[:2000]], labels[:2000], 16, shuffle=True)
        whole = data.BucketBatcher([x[:fit] for x in ids], labels, 16, shuffle=True)
        rows.append(dict(name=f"padding of the training batches, {name}: suite recipe / all examples at length {fit}",
                         value=f"{100 * suite.padding_fraction():.1f}% / {100 * whole.padding_fraction():.1f}% "
                               f"({100 * np.mean(lengths[:2000] > 64):.0f}% truncated at 64)", target=""))
    return rows


def run(quick: bool = False, out_path: Path | None = None, only: str | None = None) -> dict:
    """Every figure, written to results/bench.json; only="dynamic": dynamic_cost_rows alone, written to
    results/bench-dynamic.json (a run of its own, which the report shows as its own table). quick: tiny sizes,
    written only to out_path, if given."""
    t0 = time.time()
    if only == "dynamic":
        rows = dynamic_cost_rows(quick)
    elif quick:
        rows = cpu_preset_rows(quick) + dynamic_cost_rows(quick)
    else:
        rows = cpu_preset_rows(quick) + smollm2_rows() + dynamic_cost_rows() + padding_rows() + whole_run_rows()
    result = {"machine": runs.machine_description(), "commit": runs.git_commit(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "quick": quick, "wall_s": round(time.time() - t0),
              "rows": rows}
    for row in rows:
        print(f"{row['name']:<72} {row['value']:>26}   {row.get('target', '')}")
    if not quick or out_path is not None:
        name = f"bench-{only}.json" if only else "bench.json"
        runs.atomic_write_text(out_path or runs.RESULTS_DIR / name, json.dumps(result, indent=2))
    return result
