"""
bench.py -- speed and memory figures, measured side by side in one run (`python train.py bench`).

Machines are noisy (other processes, frequency scaling), so a figure is never one timing against a number
taken on another day: every comparison is a ratio of two things timed in the same run, interleaved round
by round (A, B, C, A, B, C, ...), each taken as the median over rounds.

Figures, all on the "cpu" preset (weights at random init; speed does not depend on their values):
  - fp32 matmul FLOP/s (2048 x 2048 x 2048): the machine's practical peak, the yardstick.
  - achieved FLOP/s of a pretraining step and a full fine-tuning step (matmul FLOPs counted by
    model.training_flops: 3 x forward, forward = 24 d^2 L + 4 T d L (+ 2 d V for the LM head) per token).
  - step time of each adapter method / full fine-tuning, and of each dynamic variant / static LoRA.
  - peak memory of LoRA training / full fine-tuning (peak resident memory, VmHWM, of a fresh process, minus
    what it held before building the model: weights, gradients, optimizer state and activations).
  - merged-model inference time / base-model inference time.
  - the FLOPs of the rank gates as a fraction of the model's forward FLOPs (counted, not timed).
Results go to results/bench.json, which `python train.py report` renders into the README.
"""

import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch

import dynlora
import runs
from model import GPT, GPTClassifier, matmul_flops_per_token, preset, training_flops



def matmul_flops_per_s(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def make_step(model: torch.nn.Module, idx: torch.Tensor, y: torch.Tensor, method: str, total_steps: int):
    """A closure running one full training step (forward, backward, AdamW, allocator) of `model`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    allocator = None
    if method not in ("full", "base"):
        cfg = model.adapter_config
        if cfg.allocation:
            allocator = dynlora.RankAllocator(model, cfg, total_steps)
    state = {"t": 0}

    def step():
        _, loss = model(idx, y)
        if method != "full":
            loss = loss + dynlora.regularization_loss(model)
        loss.backward()
        opt.step()
        state["t"] += 1
        if allocator is not None:
            allocator.step(state["t"])
        opt.zero_grad(set_to_none=True)
    return step


def classifier(method: str, config, r: int) -> GPTClassifier:
    torch.manual_seed(0)
    model = GPTClassifier(config, num_outputs=2)
    if method != "full":
        # The default reallocation interval delta_t, with the warm-up cut to 2 steps so that the timed steps
        # include reallocations (with the default t_init they would all fall in the warm-up).
        cfg = dynlora.config_for_method(method, r=r, target_r=max(1, r * 2 // 3), t_init=2, t_final=2)
        dynlora.apply_lora(model, cfg)
        model.adapter_config = cfg
    return model


def interleaved_median(fns: dict, rounds: int, steps_per_round: int) -> dict:
    """Median seconds per call of each function, timed in interleaved rounds."""
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
    return {name: statistics.median(ts) for name, ts in times.items()}


def _peak_memory_child(method: str, config_dict: dict, B: int, T: int, r: int, queue):
    torch.manual_seed(0)
    from model import GPTConfig
    config = GPTConfig(**config_dict)
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    model = classifier(method, config, r)
    idx = torch.randint(4, config.vocab_size, (B, T))
    y = torch.randint(0, 2, (B,))
    step = make_step(model, idx, y, method, total_steps=100)
    for _ in range(3):
        step()
    queue.put(_status_bytes("VmHWM") - before)


def _status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: the peak), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}; the memory figure needs Linux")


def _reset_peak_rss():
    """Start VmHWM afresh. A spawned child can inherit the parent's peak (ru_maxrss does, across exec), which
    would make every method report the parent's memory; writing 5 to clear_refs resets it (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_training_memory(method: str, config, B: int, T: int, r: int) -> int:
    """Bytes: peak resident memory of a fresh process training `method`, minus its memory before the model."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(method, config.to_dict(), B, T, r, queue))
    proc.start()
    value = queue.get(timeout=600)
    proc.join()
    return value


def run(quick: bool = False, out_path: Path | None = None) -> dict:
    config = preset("nano") if quick else preset("cpu")
    B, T, r = (4, 16, 4) if quick else (32, 64, 8)
    rounds, per_round = (2, 1) if quick else (11, 3)
    rows = []

    peak = matmul_flops_per_s(256 if quick else 2048, 3 if quick else 10)
    rows.append(dict(name="fp32 matmul 2048^3 (GFLOP/s)", value=f"{peak / 1e9:.1f}"))

    # Pretraining step (LM head included).
    torch.manual_seed(0)
    lm = GPT(config)
    lm_idx = torch.randint(4, config.vocab_size, (B, config.block_size if not quick else T))
    lm_opt = torch.optim.AdamW(lm.parameters(), lr=1e-4)

    def lm_step():
        _, loss = lm(lm_idx, lm_idx)
        loss.backward()
        lm_opt.step()
        lm_opt.zero_grad(set_to_none=True)

    # Fine-tuning steps of every method on the same batch.
    idx = torch.randint(4, config.vocab_size, (B, T))
    y = torch.randint(0, 2, (B,))
    methods = ["full", *dynlora.METHODS]
    models = {m: classifier(m, config, r) for m in methods}
    steps = {m: make_step(models[m], idx, y, m, total_steps=1000) for m in methods}
    timed = interleaved_median({"pretrain": lm_step, **steps}, rounds, per_round)
    peak_again = matmul_flops_per_s(256 if quick else 2048, 3 if quick else 10)
    peak = max(peak, peak_again)

    lm_flops = training_flops(config, lm_idx.numel(), lm_idx.shape[1], lm_head=True) / timed["pretrain"]
    ft_flops = training_flops(config, idx.numel(), T, lm_head=False) / timed["full"]
    rows.append(dict(name=f"pretraining step, B={B} T={lm_idx.shape[1]} (GFLOP/s, % of matmul)",
                     value=f"{lm_flops / 1e9:.1f} ({100 * lm_flops / peak:.0f}%)", target=">= 70%"))
    rows.append(dict(name=f"full fine-tuning step, B={B} T={T} (GFLOP/s, % of matmul)",
                     value=f"{ft_flops / 1e9:.1f} ({100 * ft_flops / peak:.0f}%)", target=">= 70%"))
    for m in dynlora.METHODS:
        rows.append(dict(name=f"step time {m} / full (r={r})", value=f"{timed[m] / timed['full']:.3f}",
                         target="<= 0.72" if m == "lora" else ""))
    for m in dynlora.METHODS:
        if m != "lora":
            rows.append(dict(name=f"step time {m} / lora (r={r})", value=f"{timed[m] / timed['lora']:.3f}",
                             target="<= 1.02"))

    # Peak memory, each in a fresh process.
    mem = {m: peak_training_memory(m, config, B, T, r) for m in ("full", "lora")}
    rows.append(dict(name="peak training memory lora / full", value=f"{mem['lora'] / mem['full']:.2f} "
                     f"({mem['lora'] / 2**20:.0f} / {mem['full'] / 2**20:.0f} MiB)", target="<= 0.6"))

    # Inference: the base model against the LoRA model merged back into plain Linear layers.
    base = models["full"].eval()
    merged = dynlora.merge_and_unload(models["lora"]).eval()
    infer_idx = torch.randint(4, config.vocab_size, (2 * B, T))
    with torch.no_grad():
        inf = interleaved_median({"base": lambda: base(infer_idx), "merged": lambda: merged(infer_idx)},
                                 rounds=2 * rounds, steps_per_round=per_round * 2)
    rows.append(dict(name="inference merged lora / base", value=f"{inf['merged'] / inf['base']:.3f}",
                     target="<= 1.01"))

    # Gate FLOPs: counted per token against the model's forward matmul FLOPs.
    gate_cfg = dynlora.config_for_method("dynlora", r=r)
    n_gated = len(gate_cfg.targets) * config.n_layer
    gate = n_gated * dynlora.gate_flops_per_token(r, config.n_embd, gate_cfg.gate_x_dims)
    model_fwd = matmul_flops_per_token(config, T, lm_head=False)
    rows.append(dict(name=f"gate FLOPs / model forward FLOPs (r={r}, {n_gated} gated layers)",
                     value=f"{100 * gate / model_fwd:.3f}%"))

    for name, sec in timed.items():
        rows.append(dict(name=f"median step time {name} (ms)", value=f"{1000 * sec:.1f}"))
    result = {"machine": runs.machine_description(), "commit": runs.git_commit(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "quick": quick, "rows": rows}
    for row in rows:
        print(f"{row['name']:<62} {row['value']:>22}   {row.get('target', '')}")
    if not quick or out_path is not None:
        runs.atomic_write_text(out_path or runs.RESULTS_DIR / "bench.json", json.dumps(result, indent=2))
    return result
