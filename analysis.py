"""
analysis.py -- what the gates do: recorders of gate values, their statistics, and the gate metrics of the
known-answer benchmark and of `python cli.py gates`.

What this file holds, in order:
  1. Recording   -- recording (a context that hands every live gate's values to a collector, through the
                    gate's `recorder`), GateStats / gate_statistics (effective rank per token, mean gates),
                    GateValues / gate_values (every gate value per token).
  2. Metrics     -- mutual_information_bits, open_pattern, gate_variances (tokens against layers).
  3. Runs        -- inference_forms (a finished run's gate statistics and merged score), and the `gates`
                    command: record_gates, gate_dependence, gates_command.

dynlora.py only keeps what training and merging need of a gate (its penalty record, freeze_gates).
"""

import json
import math
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import data
import dynlora
import plots
import runs
from model import GPTClassifier


# ---------------------------------------------------------------------------------------------------------
# 1. Recording
# ---------------------------------------------------------------------------------------------------------

def _kept_positions(g: torch.Tensor, position_mask: torch.Tensor | None) -> torch.Tensor:
    """g (..., r) as rows (N, r), keeping the positions where position_mask (the leading shape of g) is True."""
    g2d = g.reshape(-1, g.shape[-1])                                     # (..., r) -> (N, r)
    if position_mask is None:
        return g2d
    if tuple(position_mask.shape) != tuple(g.shape[:-1]):
        raise ValueError(f"gate recording: position mask of shape {tuple(position_mask.shape)} does not match the "
                         f"layer's positions {tuple(g.shape[:-1])}")
    return g2d[position_mask.reshape(-1)]                                # (N, r) -> (N_kept, r)


class GateStats:
    """Gate statistics of each gated layer, accumulated over forward passes (see gate_statistics()).

    Per layer: the number of positions seen, the sum of g (to average the gates), and a histogram of the
    effective rank per position (counts of positions with 0, 1, ..., r components open, i.e. m_i g_i above
    the threshold).
    """

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self.position_mask = None     # (B, T) bool, True at positions to count; None counts every position
        self.layers = {}              # name -> {"positions": int, "gate_sum": (r,), "histogram": (r+1,)}

    @torch.no_grad()
    def add(self, name: str, g: torch.Tensor, mask: torch.Tensor | None):
        r = g.shape[-1]
        g2d = _kept_positions(g, self.position_mask)                     # (..., r) -> (N_kept, r)
        open_ = (g2d if mask is None else g2d * mask) > self.threshold   # (N_kept, r) bool
        entry = self.layers.setdefault(name, {"positions": 0, "gate_sum": torch.zeros(r, dtype=torch.float64),
                                              "histogram": torch.zeros(r + 1, dtype=torch.long)})
        entry["positions"] += g2d.shape[0]
        entry["gate_sum"] += g2d.sum(0).double().cpu()                   # (N_kept, r) -> (r,)
        entry["histogram"] += torch.bincount(open_.sum(-1), minlength=r + 1).cpu()  # (N_kept,) -> (r+1,)

    def mean_gate(self) -> dict[str, torch.Tensor]:
        """name -> E[g] (r,), averaged over the positions seen (unmasked: the raw gate values)."""
        return {n: (e["gate_sum"] / max(e["positions"], 1)).float() for n, e in self.layers.items()}

    def histogram(self) -> dict[str, list[int]]:
        """name -> [number of positions with k open components for k = 0..r]."""
        return {n: e["histogram"].tolist() for n, e in self.layers.items()}

    def mean_effective_rank(self) -> dict[str, float]:
        """name -> the average number of open components per position."""
        out = {}
        for n, e in self.layers.items():
            h = e["histogram"].double()
            out[n] = (h * torch.arange(len(h), dtype=torch.float64)).sum().item() / max(e["positions"], 1)
        return out

    def per_token_rank(self) -> dict[str, torch.Tensor]:
        """name -> 1-D tensor with one effective rank per position seen (in sorted order), for histograms."""
        return {n: torch.repeat_interleave(torch.arange(len(e["histogram"])), e["histogram"])
                for n, e in self.layers.items()}

    def summary(self) -> dict:
        """A JSON-ready dict per layer: positions, mean effective rank, histogram, mean gate."""
        ranks, hist, mean = self.mean_effective_rank(), self.histogram(), self.mean_gate()
        return {n: {"positions": e["positions"], "mean_effective_rank": ranks[n], "histogram": hist[n],
                    "mean_gate": [round(v, 6) for v in mean[n].tolist()]} for n, e in self.layers.items()}


class GateValues:
    """The effective gate values themselves (see gate_values()), for figures that need every token: how much a
    gate varies across tokens against across layers, which components a token opens, what that pattern says
    about the token's label or kind (`cli.py gates`, the known-answer benchmark's gate columns).

    Per layer, one (N_b, k) tensor per forward pass: the gates m_i g_i(x) of the layer's k active components
    (those its allocation mask keeps; all r without allocation) at the N_b positions kept.
    """

    def __init__(self):
        self.position_mask = None     # (B, T) bool, True at positions to keep; None keeps every position
        self.parts = {}               # name -> [(N_b, k) per forward pass]

    @torch.no_grad()
    def add(self, name: str, g: torch.Tensor, mask: torch.Tensor | None):
        g2d = _kept_positions(g, self.position_mask)                     # (..., r) -> (N_b, r)
        if mask is not None:
            g2d = g2d[:, mask.bool()]                                    # (N_b, r) -> (N_b, k): m_i = 1 only
        self.parts.setdefault(name, []).append(g2d.cpu())

    def values(self) -> dict[str, torch.Tensor]:
        """name -> (N, k): every position seen, in the order the forward passes ran."""
        return {n: torch.cat(p) for n, p in self.parts.items()}


@contextmanager
def recording(model: nn.Module, collector, pad_id: int | None, who: str):
    """Hand every live gate's values to collector.add(name, g, mask) for the forward passes run inside the
    block; with pad_id, set collector.position_mask from the model's first forward argument (the token ids)
    by a hook that exists only inside the block."""
    layers = dynlora.live_gates(model)
    if not layers:
        raise ValueError(f"{who}: the model has no input-driven gates (method without gating, or gates already "
                         f"frozen)")
    hook = None
    if pad_id is not None:
        def set_positions(module, args, kwargs):
            idx = args[0] if args else kwargs["idx"]
            collector.position_mask = idx != pad_id                   # (B, T) bool
        hook = model.register_forward_pre_hook(set_positions, with_kwargs=True)
    for name, layer in layers:
        layer.gate.recorder = partial(collector.add, name)          # called as recorder(g, mask)
    try:
        yield collector
    finally:
        for _, layer in layers:
            layer.gate.recorder = None
        if hook is not None:
            hook.remove()


@contextmanager
def gate_statistics(model: nn.Module, threshold: float = 0.5, pad_id: int | None = None):
    """Collect GateStats over the forward passes run inside the `with` block.

        with gate_statistics(model, pad_id=config.pad_id) as stats:
            for idx, y in dev_batches: model(idx)
        stats.mean_effective_rank()   # {layer: float}

    With pad_id, positions whose input token is pad_id are left out (the token ids are read from the
    model's first forward argument by a hook that exists only inside the block). The block changes nothing
    else: run it under torch.no_grad() and model.eval() as you would any evaluation.
    """
    with recording(model, GateStats(threshold), pad_id, "gate_statistics") as stats:
        yield stats


@contextmanager
def gate_values(model: nn.Module, pad_id: int | None = None):
    """Collect GateValues over the forward passes run inside the `with` block:

        with gate_values(model, pad_id=config.pad_id) as values:
            for idx, y in dev_batches: model(idx)
        values.values()               # {layer: (N, k) effective gates at the real positions}

    pad_id leaves padding positions out, as in gate_statistics(); run it under torch.no_grad() and model.eval().
    """
    with recording(model, GateValues(), pad_id, "gate_values") as values:
        yield values


# ---------------------------------------------------------------------------------------------------------
# 2. Metrics (also the known-answer benchmark's: planted.score_student)
#
#   mutual_information I(P; K) in bits between a gate's open pattern P (which active components have gate
#                      m_i g_i(x) > 0.5, as one discrete symbol) and a token's kind or label K, per layer,
#                      from the empirical joint distribution; at most H(K) = 1 bit for balanced kinds.
#   gate_variances     the gate's variance across tokens (mean over layers and active components of Var_t g)
#                      against its variance across layers (Var over layers of the layer's mean gate) and across
#                      components (Var over layers and components of E_t g: how much of the gate is a static
#                      switch). By the law of total variance the last two plus the first are the whole.
# ---------------------------------------------------------------------------------------------------------

def mutual_information_bits(x, y) -> float:
    """I(X; Y) in bits of two discrete variables from their paired samples (plug-in estimate)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"mutual_information_bits needs two 1-D arrays of one length, got {x.shape} and {y.shape}")
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    joint = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(joint, (xi, yi), 1.0)
    joint /= joint.sum()
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (px @ py)[nz])).sum())


def open_pattern(g: torch.Tensor, threshold: float = 0.5) -> np.ndarray:
    """(N, r) effective gates -> (N,) one integer per token coding which components are open."""
    bits = (g > threshold).long()
    return (bits * (2 ** torch.arange(g.shape[1]))).sum(1).numpy()


def gate_variances(gates: dict[str, torch.Tensor]) -> dict:
    """gates: layer -> (N, k) effective gates of its active components, the same N tokens in every layer.
    A layer whose components were all switched off by allocation (k = 0) has no gate to vary: left out."""
    gates = {n: g for n, g in gates.items() if g.shape[1] > 0}
    per_layer_mean = torch.stack([g.mean() for g in gates.values()])             # (L,)
    comp_means = torch.cat([g.mean(0) for g in gates.values()])                  # (sum k,)
    token_var = torch.cat([g.var(0, unbiased=False) for g in gates.values()])    # (sum k,)
    return {"gate_var_tokens": float(token_var.mean()),
            "gate_var_layers": float(per_layer_mean.var(unbiased=False)) if len(per_layer_mean) > 1 else 0.0,
            "gate_var_components": float(comp_means.var(unbiased=False))}


# ---------------------------------------------------------------------------------------------------------
# 3. Runs: a finished run's gates, and the `gates` command
# ---------------------------------------------------------------------------------------------------------

def sum_gate_statistics(stats: GateStats, model: nn.Module, rt):
    """Add up the gate statistics of all processes (each saw a share of the dev batches), in place."""
    layers = {}
    for name, layer in dynlora.live_gates(model):
        entry = stats.layers.get(name) or {"positions": 0, "gate_sum": torch.zeros(layer.r, dtype=torch.float64),
                                           "histogram": torch.zeros(layer.r + 1, dtype=torch.long)}
        entry["positions"] = int(rt.sum([entry["positions"]])[0])
        # clone: tensors made under predict's inference_mode cannot be updated in place outside it
        entry["gate_sum"] = rt.sum_tensor_(entry["gate_sum"].clone())
        entry["histogram"] = rt.sum_tensor_(entry["histogram"].clone())
        layers[name] = entry
    stats.layers = layers


def inference_forms(model: GPTClassifier, adapter_cfg, run_data: runs.RunData, pad_id: int, out: Path, rt,
                    evaluate) -> dict:
    """How an adapter model is deployed, and what that costs: the merged model's dev score, and for gated
    models the effective rank the gates use on dev (written to gates.json and effective_rank.png).
    evaluate(model) -> the dev metrics of a model (train.evaluate on the run's dev batches).

    A gated update depends on the input, so it cannot be merged into W0 as it is. freeze_gates replaces each
    gate by its mean over calibration data (runs.calibration_batches); the merged score then measures the
    accuracy
    cost of that static approximation. Allocation-only models merge exactly.
    """
    result = {}
    if adapter_cfg.gating:
        with gate_statistics(model, pad_id=pad_id) as stats:
            evaluate(model)
        sum_gate_statistics(stats, model, rt)
        summary = stats.summary()
        result["mean_effective_rank"] = float(np.mean([v["mean_effective_rank"] for v in summary.values()]))
        if rt.is_main:
            runs.atomic_write_text(out / "gates.json", json.dumps(summary, indent=2))
            plots.effective_rank_hist({n: t.numpy() for n, t in stats.per_token_rank().items()}, adapter_cfg.r,
                                      out / "effective_rank.png")
        dynlora.freeze_gates(model, runs.calibration_batches(run_data, rt), pad_id=pad_id)
    merged = dynlora.merge_and_unload(model)
    result["merged_score"] = evaluate(merged)["score"]
    return result


GATE_EXAMPLES = 400     # dev examples `cli.py gates` reads per run (every k-th length-sorted batch)


def _strided_batches(batcher: data.BucketBatcher, max_examples: int) -> list:
    """Every k-th batch of a length-sorted dev batcher, k chosen so that about max_examples examples are
    kept: a subsample that keeps the split's spread of lengths."""
    batches = list(batcher.epoch(0))
    per_batch = max(1, len(batches[0][1])) if batches else 1
    stride = max(1, math.ceil(len(batches) * per_batch / max_examples))
    return batches[::stride]


@torch.no_grad()
def record_gates(model: GPTClassifier, batches: list, pad_id: int) -> tuple[dict, np.ndarray]:
    """Run the batches and keep every gate value at every real (non-pad) position: (layer -> (N, k) effective
    gates m * g of its k active components, (N,) the label of each position's sentence)."""
    if not dynlora.live_gates(model):
        raise ValueError("gates: this run has no input-driven gates (its method is not gate or dynlora)")
    labels = []
    with gate_values(model, pad_id=pad_id) as values:
        for idx, y in batches:
            model(idx)
            real = (idx != pad_id).reshape(-1)                                    # (B T,)
            labels.append(y.repeat_interleave(idx.shape[1])[real].numpy())         # (B,) -> (N_b,)
    return values.values(), np.concatenate(labels)


def gate_dependence(run_dir: str, data_dir: str | None = None, backbone: str | None = None,
                    max_examples: int = GATE_EXAMPLES) -> dict:
    """How much a gated run's gates depend on their input, on (a subsample of) its dev split -- the figures
    the known-answer benchmark reports (planted.score_student), measured on GLUE:

      gate_var_tokens / gate_var_layers: the variance of an effective gate across tokens (per component,
        averaged) against the variance of the per-layer mean gate across layers; token_share = var_tokens /
        (var_tokens + var_layers) is near 0 for a static per-layer switch and near 1 when tokens choose;
      effective rank per token (components above 0.5): its mean and its standard deviation across tokens,
        averaged over the layers that keep at least one component (an allocating run's emptied layers have
        no gate values; the result line's mean_effective_rank counts them as 0);
      gate_mi_label_bits: the mutual information between a token's open-gate pattern and its sentence's
        label (classification tasks), averaged over layers;
      value_histogram: 20 bins of the effective gate values on [0, 1], all layers pooled.
    (What freezing the gates to their means costs is the run's merged_score, in its result line.)
    """
    model, tok, meta = runs.load_finetuned(run_dir, backbone)
    task = data.get_task(meta["task"])
    run_data = runs.saved_run_data(Path(run_dir), meta, data_dir, backbone, tok)
    batches = [b for batcher in run_data.dev.values() for b in _strided_batches(batcher, max_examples)]
    gates, labels = record_gates(model, batches, model.gpt.config.pad_id)
    gates = {n: g for n, g in gates.items() if g.shape[1] > 0}
    ranks = torch.stack([(g > 0.5).sum(1).float() for g in gates.values()])      # (L, N)
    pooled = torch.cat([g.reshape(-1) for g in gates.values()]).numpy()
    out = {**gate_variances(gates), "mean_effective_rank": float(ranks.mean()),
           "effective_rank_sd_tokens": float(ranks.std(1, unbiased=False).mean()),
           "value_histogram": np.histogram(pooled, bins=20, range=(0.0, 1.0))[0].tolist()}
    var_t, var_l = out["gate_var_tokens"], out["gate_var_layers"]
    out["token_share"] = var_t / (var_t + var_l) if var_t + var_l > 0 else None
    out["gate_mi_label_bits"] = (float(np.mean([mutual_information_bits(open_pattern(g), labels)
                                                for g in gates.values()])) if not task.is_regression else None)
    final = json.loads((Path(run_dir) / "final.json").read_text()) if (Path(run_dir) / "final.json").is_file() else {}
    cfg = runs.read_run_config(run_dir)["finetune"]
    return {"run_id": f"{cfg.get('suite') or 'adhoc'}/{Path(run_dir).name}", "suite": cfg.get("suite", ""),
            "task": task.name, "method": meta.get("method", cfg["method"]), "seed": cfg["seed"],
            "backbone_sha256": final.get("backbone_sha256"), "dev_examples": int(sum(len(y) for _, y in batches)),
            "tokens": int(len(labels)), "layers": len(gates), **out}


def gates_command(run_dirs: list, data_dir: str | None, backbone: str | None, max_examples: int):
    """`cli.py gates`: gate_dependence of each run, appended to gates.jsonl beside the runs' results."""
    for run in run_dirs:
        record = gate_dependence(run, data_dir, backbone, max_examples)
        cfg = runs.read_run_config(run)["finetune"]
        path = runs.results_folder(cfg.get("results_dir", ""), cfg.get("suite", "")) / runs.GATES_FILE
        written = runs.append_jsonl(path, record)
        print(f"gates: {record['run_id']}: token share of the gate variance {record['token_share']:.3f}, "
              f"effective rank {record['mean_effective_rank']:.2f} +- {record['effective_rank_sd_tokens']:.2f} "
              f"across tokens -> {path}{'' if written else ' (already there)'}")
