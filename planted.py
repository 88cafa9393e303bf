"""
planted.py -- a known-answer benchmark for the dynamic parts of dynlora.py.

On GLUE a tie between LoRA and a dynamic method cannot tell "the mechanism does not help" from "the mechanism
is broken". Here the answer is known because we plant it: a TEACHER is a frozen backbone plus adapter updates
of known structure on some of its layers, and STUDENTS -- one per method, all at the same final budget of
rank components -- learn to reproduce the teacher by distillation on unlabeled GLUE text. Each scenario is
built so that one mechanism should win, or none:

    heterogeneous   the planted rank differs across layers (most of it in a few layers, none elsewhere):
                    allocation should move the budget there.
    input           every layer has k planted components, half of them switched on for one kind of token and
                    half for the other (the teacher's own hard gate on a planted direction of the layer's
                    input): no static update fits, a per-token gate can -- gating should win.
    homogeneous     every layer has k static planted components: static LoRA with r = k is already optimal,
                    nothing should win.

What this file holds, in order:
  1. PlantedConfig -- every setting of `python cli.py planted` (each field's comment is its --help).
  2. The teacher   -- PlantedLinear (a frozen layer plus a planted update, optionally gated by token kind),
                      plant() which builds and calibrates a teacher for one scenario and seed.
  3. Data          -- the backbone (pretrained, or the preset at random init with a BPE trained on the text),
                      windows of GLUE train text for distillation and of dev text for scoring.
  4. Students      -- train_student: one method's adapters distilled from the teacher's last hidden states.
  5. Metrics       -- relative_error, budget_share, rank_correlation; the gate metrics are analysis.py's
                      (mutual_information_bits, gate_variances); the paired interval to LoRA is runs.paired_ci.
  6. The benchmark -- run_benchmark: every (scenario, method, seed), one JSON line each in
                      results/planted.jsonl as it finishes, a plot per scenario, a summary table.

Notation as in dynlora.py: a layer maps x in R^{d_in} to h in R^{d_out}, W0 is its frozen weight, k is the
budget of rank components per adapted layer at the end of training, L the number of adapted layers.
"""

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import analysis
import data
import dynlora
import plots
import runs
import runtime
import train
from model import GPT, preset
from runs import bounds, check_config


# ---------------------------------------------------------------------------------------------------------
# 1. The configuration
# ---------------------------------------------------------------------------------------------------------

SCENARIOS = ("heterogeneous", "input", "homogeneous")
RESULTS_FILE = "planted.jsonl"


@dataclass
class PlantedConfig:
    scenarios: str = "heterogeneous,input,homogeneous"  # comma-separated scenarios to run
    methods: str = field(default_factory=lambda: ",".join(dynlora.METHODS))  # comma-separated methods (default: every
                                                                             # dynlora.METHODS entry; lora first: the
                                                                             # others are paired to it)
    seeds: int = field(default=5, metadata=bounds(1))   # seeds 0..N-1; a seed fixes the teacher, the data windows and
                                                        # the students' init
    backbone: str = "auto"                              # backbone folder; 'auto' = runs/backbone if present, else
                                                        # '' = the preset at random init
    preset: str = "cpu"                                 # model shape when the backbone is random (see model.PRESETS)
    n_layer: int = field(default=0, metadata=bounds(0))  # random backbone: transformer blocks (0 = the preset's)
    n_embd: int = field(default=0, metadata=bounds(0))   # random backbone: width (0 = the preset's)
    n_head: int = field(default=0, metadata=bounds(0))   # random backbone: attention heads (0 = the preset's)
    vocab_size: int = field(default=8192, metadata=bounds(0, low_open=True))  # random backbone: BPE vocabulary
                                                                              # trained on the text
    data_dir: str | None = None                         # GLUE folder (default: $GLUE_DIR, else ./data/glue)
    tasks: str = "SST-2,CoLA,MRPC,STS-B,RTE"            # GLUE tasks whose train text distils and whose dev text scores
    max_len: int = field(default=32, metadata=bounds(2))          # tokens per window of text
    train_windows: int = field(default=1536, metadata=bounds(1))  # windows of train text the students learn from
    heldout_windows: int = field(default=256, metadata=bounds(1))  # windows of dev text the students are scored on
    targets: str = "q_proj,v_proj"                      # adapted (and planted) projections per block (the GLUE grid's)
    rank: int = field(default=4, metadata=bounds(1))    # k: the final budget, rank components per adapted layer
                                                        # (lora and gate: r = k)
    alloc_rank: int = field(default=6, metadata=bounds(1))  # initial rank r of the allocating methods
                                                            # (alloc, dynlora, adalora), pruned to k
    heterogeneous_ranks: str = "6,0,6,0,2,6,0,6"        # heterogeneous: planted rank per adapted layer (module order)
    effect: float = field(default=0.1, metadata=bounds(0, low_open=True))  # RMS change of the final hidden state by
                                                                           # one planted component, relative to its RMS
    steps: int = field(default=300, metadata=bounds(1))  # optimizer steps per student
    batch_size: int = field(default=16, metadata=bounds(1))  # windows per step
    lr: float = field(default=1e-2, metadata=bounds(0, low_open=True))  # peak learning rate (AdamW, no weight decay,
                                                                        # cosine decay to a tenth)
    t_init: int = field(default=50, metadata=bounds(0))    # allocation: warm-up steps with all components active
    t_final: int = field(default=100, metadata=bounds(0))  # allocation: last steps at the final budget, masks frozen
    delta_t: int = field(default=10, metadata=bounds(1))   # allocation: steps between reallocations
    adapter: str = ""                                   # extra AdapterConfig settings for every student,
                                                        # e.g. 'gate_penalty=0.02,gate_init=2'
    out_dir: str = "runs/planted"                       # folder for the tokenizer cache, the plots and the summary
    results_dir: str = "results"                        # folder of planted.jsonl: one line per (scenario, method, seed)
    threads: int = field(default=1, metadata=bounds(0))  # CPU threads (0 = PyTorch's default)
    precision: str = "fp32"                             # the students' training forward passes: fp32 | bf16
                                                        # (autocast) | auto (runtime.select_precision); scoring fp32

    def __post_init__(self):
        check_config(self)                               # the bounds in each field's metadata, and finiteness
        bad = [s for s in self.scenario_list if s not in SCENARIOS]
        if bad or not self.scenario_list:
            raise ValueError(f"--scenarios: unknown {bad}; choose from {list(SCENARIOS)}")
        bad = [m for m in self.method_list if m not in dynlora.METHODS]
        if bad or not self.method_list:
            raise ValueError(f"--methods: unknown {bad}; choose from {list(dynlora.METHODS)}")
        if self.alloc_rank < self.rank:
            raise ValueError(f"--alloc-rank ({self.alloc_rank}) must be >= --rank ({self.rank}): allocation prunes "
                             f"from alloc_rank down to rank")
        if any(dynlora.METHODS[m]["allocation"] for m in self.method_list) and self.t_init + self.t_final >= self.steps:
            raise ValueError(f"--t-init ({self.t_init}) + --t-final ({self.t_final}) must be < --steps ({self.steps})")
        if "input" in self.scenario_list and self.rank % 2:
            raise ValueError(f"scenario input splits the k = --rank components into two halves; use an even --rank, "
                             f"got {self.rank}")
        self.adapter_overrides()                         # raises on a malformed --adapter
        self.resolved_precision = runtime.select_precision(self.precision, torch.device("cpu"))   # fp16: one line

    @property
    def scenario_list(self) -> list[str]:
        return [s.strip() for s in self.scenarios.split(",") if s.strip()]

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def adapter_overrides(self) -> dict:
        """--adapter 'key=value,...' as AdapterConfig keyword arguments, each value of its field's type."""
        kinds = {f.name: type(f.default) for f in fields(dynlora.AdapterConfig)}
        out = {}
        for item in filter(None, (s.strip() for s in self.adapter.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in kinds:
                raise ValueError(f"--adapter: {item!r} is not key=value with a key of AdapterConfig "
                                 f"({sorted(kinds)})")
            if key in ("r", "target_r", "targets", "modules_to_save", *dynlora.SWITCHES):
                raise ValueError(f"--adapter: {key} is set by the benchmark "
                                 f"(--rank, --alloc-rank, --targets, --methods)")
            kind = kinds[key]
            out[key] = (value.strip().lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        return out

    def result_settings(self) -> dict:
        """The settings a result depends on (not which scenarios, methods or seeds are run, nor where to)."""
        skip = {"scenarios", "methods", "seeds", "out_dir", "results_dir", "threads", "precision"}
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        if self.resolved_precision != "fp32":    # fp32 results, made before the setting existed, keep their ids
            settings["precision"] = self.resolved_precision
        return settings


def planted_ranks(cfg: PlantedConfig, scenario: str, n_layers: int) -> list[int]:
    """The planted rank of each adapted layer (module order): the known answer of the allocation."""
    if scenario != "heterogeneous":
        return [cfg.rank] * n_layers
    ranks = [int(v) for v in cfg.heterogeneous_ranks.split(",") if v.strip()]
    if len(ranks) != n_layers:
        raise ValueError(f"--heterogeneous-ranks has {len(ranks)} values but the model has {n_layers} adapted layers "
                         f"({len(cfg.target_list)} targets per block); give one rank per layer")
    if max(ranks) > cfg.alloc_rank or min(ranks) < 0:
        raise ValueError(f"--heterogeneous-ranks must lie in 0..--alloc-rank ({cfg.alloc_rank}), got {ranks}: a "
                         f"student cannot hold more components in a layer than its initial rank")
    if sum(ranks) > cfg.rank * n_layers:
        raise ValueError(f"--heterogeneous-ranks sum to {sum(ranks)}, above the budget k L = {cfg.rank * n_layers}")
    return ranks


# ---------------------------------------------------------------------------------------------------------
# 2. The teacher
#
# A planted layer computes
#
#     h = W0 x + b + sum_i sigma * o_i (a_i . x) * g_i(x)
#
# with k components (a_i in R^{d_in}, o_i in R^{d_out}). The o_i are orthonormal. The a_i are orthonormal
# with respect to the second moment Sigma = E[x x^T] of the layer's actual input on calibration text, so that
# every a_i . x has mean square 1 and the k read-outs are uncorrelated: within a layer the components are
# equally strong and none is a combination of the others. One sigma per layer is calibrated so that one
# component changes the teacher's final hidden state by `effect` (RMS, relative to the RMS of the base
# model's hidden state), measured with a small probe and scaled linearly: every planted component matters
# about as much as every other, wherever it sits, and the known best allocation is the planted ranks.
#
# g_i(x) = 1 in the static scenarios. In scenario "input" the teacher's own hard gate decides per token:
#
#     kind(x) = 1[u . x > tau]      (u: a planted direction, tau: its median on calibration text)
#     g_i(x)  = 1[kind(x) = kind_i] (kind_i = 0 for components 1..k/2, 1 for components k/2+1..k)
#
# u is drawn Sigma-orthonormal to the a_i as well: the read-outs z_i = a_i . x carry no linear information
# about the kind. A gate that reads only what the update reads cannot tell the kinds apart; it has to look
# at x itself. This is the strict version of "different inputs need different components": the feature that
# decides which components a token needs is not one of the features the update itself reads.
#
# Without a gate the best static rank-k update is E[update], half of each component: it leaves half of the
# change undone (relative error 0.5 at the layer); a gate that knows the kind leaves none.
# ---------------------------------------------------------------------------------------------------------

class PlantedLinear(nn.Module):
    """A frozen nn.Linear plus a planted update: h = W0 x + b + sigma O diag(g(x)) (A x)  (see above)."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, O: torch.Tensor, sigma: float,
                 kinds: torch.Tensor | None = None, direction: torch.Tensor | None = None, threshold: float = 0.0):
        super().__init__()
        self.base = base
        self.register_buffer("A", A)                        # (k, d_in)
        self.register_buffer("O", O)                        # (d_out, k), orthonormal columns
        self.sigma = float(sigma)
        self.gated = kinds is not None
        if self.gated:
            self.register_buffer("kinds", kinds)            # (k,) 0 or 1: the kind that switches component i on
            self.register_buffer("direction", direction)    # (d_in,) u
            self.threshold = float(threshold)
        self.use_gate = True                                # False while plant() calibrates sigma
        self.recorder = None                                # called with kind (...,) during scoring

    def kind(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (...,) long: 1 where u . x > tau."""
        return (x @ self.direction > self.threshold).long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.A) * self.sigma               # (..., d_in) @ (d_in, k) -> (..., k)
        if self.gated:
            kind = self.kind(x)                            # (...,)
            if self.recorder is not None:
                self.recorder(kind)
            if self.use_gate:
                z = z * (self.kinds == kind[..., None])      # (..., k): component i on iff kind_i = kind(x)
        return self.base(x) + F.linear(z, self.O)          # (..., k) @ (k, d_out) -> (..., d_out)


def target_layers(model: nn.Module, targets: tuple) -> list[str]:
    """The names of the nn.Linear layers a student adapts, in module order (apply_lora's order)."""
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"--targets {','.join(targets)} match no nn.Linear of the backbone")
    return names


def _replace(model: nn.Module, name: str, module: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


@torch.no_grad()
def layer_input(model: nn.Module, name: str, idx: torch.Tensor) -> torch.Tensor:
    """The input x of layer `name` at every position of idx, (N, d_in)."""
    seen = []
    hook = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        model.hidden_states(idx)
    finally:
        hook.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def _sigma_orthonormal(G: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """Columns of G made orthonormal in the inner product <a, b> = a^T Sigma b (Cholesky of G^T Sigma G)."""
    M = G.t() @ second_moment @ G                          # (m, m)
    M = M + 1e-6 * M.diagonal().mean() * torch.eye(len(M), dtype=M.dtype)
    L = torch.linalg.cholesky(M)
    return torch.linalg.solve_triangular(L, G.t(), upper=False).t()   # G L^{-T}: V^T Sigma V = I


@torch.no_grad()
def plant(base: GPT, cfg: PlantedConfig, scenario: str, seed: int, calib: torch.Tensor) -> tuple[GPT, dict]:
    """The teacher of one scenario and seed: a copy of the frozen backbone with planted layers, calibrated on
    the windows `calib` (B, T). Returns (teacher, info) with info = planted ranks and the layers' sigmas."""
    teacher = copy.deepcopy(base).eval()
    names = target_layers(teacher, cfg.target_list)
    ranks = planted_ranks(cfg, scenario, len(names))
    g = torch.Generator().manual_seed(1_000_003 * seed + SCENARIOS.index(scenario))
    h_base = teacher.hidden_states(calib)
    base_energy = h_base.square().sum(-1).mean()            # E ||h_base||^2
    sigmas = []
    for name, k in zip(names, ranks):
        if k == 0:
            sigmas.append(0.0)
            continue
        linear = teacher.get_submodule(name)
        x = layer_input(teacher, name, calib).double()      # (N, d_in): the input with earlier layers planted
        second = x.t() @ x / len(x)                         # Sigma (d_in, d_in)
        V = _sigma_orthonormal(torch.randn(linear.in_features, k + 1, generator=g, dtype=torch.float64), second)
        A, u = V[:, :k].t().float(), V[:, k].float()        # (k, d_in), (d_in,)
        O = torch.linalg.qr(torch.randn(linear.out_features, k, generator=g, dtype=torch.float64))[0].float()
        kinds = threshold = None
        if scenario == "input":
            kinds = (torch.arange(k) >= k // 2).long()       # components 1..k/2: kind 0; the rest: kind 1
            threshold = float((x.float() @ u).median())
        # Probe: the same components at a small sigma, all of them on, against the teacher without them.
        probe = 0.05 * float(F.linear(x.float(), linear.weight).square().sum(-1).mean().sqrt())  # 5% of |W0 x|
        h_before = teacher.hidden_states(calib)
        layer = PlantedLinear(linear, A, O, probe, kinds, u if kinds is not None else None, threshold or 0.0)
        layer.use_gate = False
        _replace(teacher, name, layer)
        per_component = (teacher.hidden_states(calib) - h_before).square().sum(-1).mean() / k
        layer.sigma = probe * cfg.effect * math.sqrt(float(base_energy / per_component))
        layer.use_gate = True
        sigmas.append(layer.sigma)
    h_teacher = teacher.hidden_states(calib)
    change = float((h_teacher - h_base).square().sum(-1).mean() / base_energy)
    return teacher, {"layers": names, "planted_ranks": ranks, "sigmas": sigmas, "teacher_change": change}


def planted_layers(teacher: nn.Module) -> list[tuple[str, PlantedLinear]]:
    return [(n, m) for n, m in teacher.named_modules() if isinstance(m, PlantedLinear)]


# ---------------------------------------------------------------------------------------------------------
# 3. Data: the backbone, the tokenizer, windows of text
# ---------------------------------------------------------------------------------------------------------

def _cached_tokenizer(texts: list[str], vocab_size: int, out_dir: Path, key: dict):
    """A BPE trained on `texts`, cached in out_dir/tokenizer.json (retrained when `key` changes)."""
    tok_path, key_path = out_dir / runs.TOKENIZER_FILE, out_dir / "tokenizer.key.json"
    if tok_path.is_file() and key_path.is_file() and json.loads(key_path.read_text()) == key:
        return data.load_tokenizer(tok_path), tok_path
    tok = data.train_tokenizer(texts, vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs.atomic_write(tok_path, lambda tmp: tok.save(str(tmp)))
    runs.atomic_write_text(key_path, json.dumps(key))
    return data.load_tokenizer(tok_path), tok_path


def backbone_folder(cfg: PlantedConfig) -> str:
    """The pretrained backbone folder --backbone resolves to, or '' for the preset at random init."""
    if cfg.backbone == "auto":
        folder = runs.REPO / "runs" / "backbone"
        return str(folder) if (folder / runs.BACKBONE_FILE).is_file() else ""
    return cfg.backbone


def load_backbone(cfg: PlantedConfig, train_texts: list[str]) -> tuple[GPT, object, str]:
    """(frozen GPT in eval mode, tokenizer, description) for --backbone."""
    folder = backbone_folder(cfg)
    if folder:
        config, state, tok, tok_path = runs.load_backbone(folder)
        if config.block_size < cfg.max_len:
            raise ValueError(f"--max-len {cfg.max_len} exceeds the backbone's block_size {config.block_size}")
        model = GPT(config)
        model.load_state_dict(state)
        desc = f"pretrained {folder} (sha256 {runs.file_sha256(Path(folder) / runs.BACKBONE_FILE)[:12]})"
    else:
        key = {"tasks": cfg.tasks, "vocab_size": cfg.vocab_size, "n_texts": len(train_texts),
               "first": train_texts[0], "last": train_texts[-1]}
        tok, _ = _cached_tokenizer(train_texts, cfg.vocab_size, Path(cfg.out_dir), key)
        overrides = {k: v for k, v in (("n_layer", cfg.n_layer), ("n_embd", cfg.n_embd), ("n_head", cfg.n_head)) if v}
        config = preset(cfg.preset, vocab_size=tok.get_vocab_size(), block_size=max(cfg.max_len, 8), **overrides)
        torch.manual_seed(0)                                # one random backbone for every seed
        model = GPT(config)
        desc = (f"random init, preset {cfg.preset} ({config.n_layer} blocks, width {config.n_embd}, "
                f"vocab {config.vocab_size})")
    model.eval().requires_grad_(False)
    return model, tok, desc


def read_texts(cfg: PlantedConfig) -> tuple[list[str], list[str]]:
    """(train texts, dev texts) of --tasks, deduplicated; the dev texts never overlap the train texts."""
    data_dir = data.resolve_data_dir(cfg.data_dir)
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    train = data.pretrain_texts(data_dir, tasks)
    seen, dev = set(train), {}
    for task in tasks:
        spec = data.get_task(task)
        for split in spec.dev_files:
            for ex in data.read_split(data_dir, spec, split):
                for text in (ex.text_a, ex.text_b):
                    if text is not None and text not in seen:
                        dev[text] = None
    if not dev:
        raise ValueError(f"--tasks {cfg.tasks}: no dev text that is not also train text")
    return train, list(dev)


def windows(stream: np.ndarray, n: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """n windows of `length` tokens at random offsets of the token stream, (n, length) int64."""
    if len(stream) < length + 1:
        raise ValueError(f"the text has {len(stream)} tokens, fewer than one window of --max-len {length}")
    starts = rng.integers(0, len(stream) - length + 1, size=n)
    return torch.from_numpy(stream[starts[:, None] + np.arange(length)].astype(np.int64))


@torch.no_grad()
def hidden(model: nn.Module, idx: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The model's final hidden states for every window, computed in chunks: (N, T) -> (N, T, d)."""
    return torch.cat([model.hidden_states(idx[i:i + chunk]) for i in range(0, len(idx), chunk)])


# ---------------------------------------------------------------------------------------------------------
# 4. Students
#
# A student is the frozen backbone with one method's adapters on --targets, trained to minimise
#
#     loss = sum_tokens ||h_student - h_teacher||^2 / sum_tokens ||h_teacher - h_base||^2  (+ the method's penalties)
#
# over batches of train windows, where the denominator is computed once over all train windows. The loss is
# the relative distillation error itself: 1 at the start (the student is the base model), 0 when the
# teacher's change is reproduced exactly -- a scale of order 1, like a classification loss, so the gate
# penalty's weight means what it means on GLUE.
#
# The budget. Every method ends with k components per adapted layer on average: lora and gate have r = k
# everywhere; alloc, dynlora and adalora start at r = alloc_rank and the allocator prunes the global budget
# to k L. A gate may close components per token on top (its effective rank can only be lower).
# ---------------------------------------------------------------------------------------------------------

def student_config(cfg: PlantedConfig, method: str) -> dynlora.AdapterConfig:
    allocating = dynlora.METHODS[method]["allocation"]
    return dynlora.config_for_method(
        method, **{"r": cfg.alloc_rank if allocating else cfg.rank, "target_r": cfg.rank,
                   "targets": cfg.target_list, "modules_to_save": (), "t_init": cfg.t_init,
                   "t_final": cfg.t_final, "delta_t": cfg.delta_t, **cfg.adapter_overrides()})


def train_student(base: GPT, method: str, cfg: PlantedConfig, seed: int, train_idx: torch.Tensor,
                  train_target: torch.Tensor, denominator: float, after_apply=None):
    """Distil one student; returns (student in eval mode, its allocator or None, the loss curve).

    after_apply(student), if given, runs after the adapters are applied (the tests use it to break a
    mechanism on purpose)."""
    student = copy.deepcopy(base)
    acfg = student_config(cfg, method)
    rt = runtime.Runtime(torch.device("cpu"), cfg.resolved_precision)
    torch.manual_seed(7919 * seed + 1)
    dynlora.apply_lora(student, acfg)
    if after_apply is not None:
        after_apply(student)
    allocator = dynlora.RankAllocator(student, acfg, cfg.steps) if acfg.allocation else None
    params = [p for p in student.parameters() if p.requires_grad]
    opt = train.make_optimizer(student, cfg.lr, weight_decay=0.0, gate_lr_mult=acfg.gate_lr_mult)
    rng = np.random.default_rng([seed, 11])                 # the same batches for every method of a seed
    warmup = max(1, cfg.steps // 20)
    curve = []
    student.train()
    for t in range(1, cfg.steps + 1):                        # t: the steps taken, this one included
        # train.cosine_schedule counts steps from 0: the warm-up is read at t - 1, the decay at t, so that a
        # student's decay ends at a tenth of the peak on its last step (as the committed results were made).
        train.set_lr(opt, cfg.lr * train.cosine_schedule(t - 1 if t <= warmup else t, cfg.steps, warmup, 0.1))
        b = torch.from_numpy(rng.choice(len(train_idx), size=min(cfg.batch_size, len(train_idx)), replace=False))
        with rt.autocast():                                  # matmuls in bf16 with --precision bf16
            h = student.hidden_states(train_idx[b])
            reg = dynlora.regularization_loss(student)
        distil = (h.float() - train_target[b]).square().sum(-1).mean() / denominator    # the loss in fp32
        loss = distil + reg
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if allocator is not None:
            allocator.step(t)
        opt.zero_grad(set_to_none=True)
        if t % 10 == 0 or t == cfg.steps:
            curve.append((t, round(distil.item(), 5)))
    student.eval()
    return student, allocator, curve


# ---------------------------------------------------------------------------------------------------------
# 5. Metrics
#
#   relative_error     sum ||h_s - h_t||^2 / sum ||h_t - h_b||^2 over held-out tokens: 1 = learned nothing (the
#                      student is the base model), 0 = reproduces the teacher exactly.
#   budget_share       the share of the final budget (active components) on layers with a planted rank > 0.
#   rank_correlation   Spearman correlation between the planted and the final ranks over layers (None when
#                      either is constant: then it is undefined).
#   mutual_information I(P; K) in bits between a gate's open pattern P (which active components have gate
#                      m_i g_i(x) > 0.5, as one discrete symbol) and the planted kind K of the token, per layer,
#                      from the empirical joint distribution; at most H(K) = 1 bit for balanced kinds.
#   gate_variances     the gate's variance across tokens (mean over layers and active components of Var_t g)
#                      against its variance across layers (Var over layers of the layer's mean gate) and across
#                      components (Var over layers and components of E_t g: how much of the gate is a static
#                      switch). By the law of total variance the last two plus the first are the whole.
# ---------------------------------------------------------------------------------------------------------

def relative_error(h_student: torch.Tensor, h_teacher: torch.Tensor, h_base: torch.Tensor) -> float:
    """||h_s - h_t||^2 / ||h_t - h_b||^2, summed over every position: 1.0 for a student that learned nothing."""
    return float((h_student - h_teacher).double().square().sum() / (h_teacher - h_base).double().square().sum())


def budget_share(final_ranks: list[int], planted: list[int]) -> float | None:
    """Share of the final active components that sit on planted layers; None when every layer is planted."""
    if all(p > 0 for p in planted) or sum(final_ranks) == 0:
        return None
    return sum(r for r, p in zip(final_ranks, planted) if p > 0) / sum(final_ranks)


def rank_correlation(final_ranks: list[int], planted: list[int]) -> float | None:
    """Spearman correlation of planted and final ranks over layers; None if either is constant."""
    if len(set(final_ranks)) < 2 or len(set(planted)) < 2:
        return None
    return data.spearman(np.array(final_ranks, dtype=float), np.array(planted, dtype=float))


@torch.no_grad()
def score_student(student: nn.Module, heldout: torch.Tensor, h_teacher: torch.Tensor, h_base: torch.Tensor,
                  kinds: dict[str, torch.Tensor] | None) -> dict:
    """The held-out metrics of one student: relative error, and for a gated student the gates' statistics
    (kinds: layer -> (N,) planted kind per held-out token, in scenario input)."""
    if not dynlora.live_gates(student):
        return {"rel_error": relative_error(hidden(student, heldout), h_teacher, h_base)}
    with analysis.gate_values(student) as values:
        h = hidden(student, heldout)
    out = {"rel_error": relative_error(h, h_teacher, h_base)}
    gates = values.values()                                    # layer -> (N, k) gates of its active components
    out.update(analysis.gate_variances(gates))
    out["mean_effective_rank"] = float(np.mean([(g > 0.5).sum(1).float().mean() for g in gates.values()]))
    if kinds is not None:
        mi, gap = [], []
        for name, g in gates.items():
            k = kinds[name].numpy()
            mi.append(analysis.mutual_information_bits(analysis.open_pattern(g), k))
            if g.shape[1]:
                gap.append(float((g[k == 1].mean(0) - g[k == 0].mean(0)).abs().mean()))
        out["gate_mi_bits"] = float(np.mean(mi))
        out["gate_mi_bits_per_layer"] = [round(v, 4) for v in mi]
        out["gate_kind_gap"] = float(np.mean(gap)) if gap else 0.0
    return out


# ---------------------------------------------------------------------------------------------------------
# 6. The benchmark
# ---------------------------------------------------------------------------------------------------------

def results_file(cfg: PlantedConfig) -> Path:
    d = Path(cfg.results_dir)
    return (d if d.is_absolute() else runs.REPO / d) / RESULTS_FILE


@dataclass
class Setting:
    """What every method of one (scenario, seed) shares: the teacher, the data and its targets."""
    teacher: GPT
    info: dict
    train_idx: torch.Tensor
    train_target: torch.Tensor
    denominator: float
    heldout: torch.Tensor
    h_teacher: torch.Tensor
    h_base: torch.Tensor
    kinds: dict | None


def make_setting(base: GPT, streams: tuple[np.ndarray, np.ndarray], cfg: PlantedConfig, scenario: str,
                 seed: int) -> Setting:
    """streams: the train and dev text as token streams (data.lm_stream)."""
    train_stream, dev_stream = streams
    rng = np.random.default_rng([seed, 3])
    train_idx = windows(train_stream, cfg.train_windows, cfg.max_len, rng)
    heldout = windows(dev_stream, cfg.heldout_windows, cfg.max_len, np.random.default_rng([0, 5]))
    calib = train_idx[:min(64, len(train_idx))]
    teacher, info = plant(base, cfg, scenario, seed, calib)
    train_target = hidden(teacher, train_idx)
    denominator = float((train_target - hidden(base, train_idx)).square().sum(-1).mean())
    h_base = hidden(base, heldout)
    kinds = None
    layers = planted_layers(teacher)
    if any(m.gated for _, m in layers):
        seen = {name: [] for name, m in layers if m.gated}
        for name, m in layers:
            if m.gated:
                m.recorder = lambda kind, name=name: seen[name].append(kind.reshape(-1))
        h_teacher = hidden(teacher, heldout)
        for _, m in layers:
            m.recorder = None
        kinds = {name: torch.cat(v) for name, v in seen.items()}
    else:
        h_teacher = hidden(teacher, heldout)
    return Setting(teacher, info, train_idx, train_target, denominator, heldout, h_teacher, h_base, kinds)


def run_one(base: GPT, setting: Setting, cfg: PlantedConfig, scenario: str, method: str, seed: int,
            after_apply=None) -> dict:
    """Train and score one student; the metrics as a dict (no file is written)."""
    t0 = time.time()
    student, allocator, curve = train_student(base, method, cfg, seed, setting.train_idx, setting.train_target,
                                              setting.denominator, after_apply)
    scores = score_student(student, setting.heldout, setting.h_teacher, setting.h_base, setting.kinds)
    layers = dynlora.adapter_layers(student)
    final = [m.active_components() for _, m in layers]
    planted = setting.info["planted_ranks"]
    out = {"scenario": scenario, "method": method, "seed": seed, **scores,
           "final_ranks": final, "planted_ranks": planted,
           "budget_share": budget_share(final, planted), "rank_spearman": rank_correlation(final, planted),
           "active_adapter_params": dynlora.active_parameter_count(student),
           "adapter_config": asdict(student.adapter_config),
           "train_loss_curve": curve}
    if dynlora.live_gates(student):
        # The same student with every gate replaced by its mean over the train windows: what the input
        # dependence of the gates is worth on held-out text.
        calibration = setting.train_idx[:256]
        dynlora.freeze_gates(student, [calibration[i:i + 64] for i in range(0, len(calibration), 64)])
        out["rel_error_frozen_gates"] = relative_error(hidden(student, setting.heldout), setting.h_teacher,
                                                       setting.h_base)
    out["train_s"] = round(time.time() - t0, 2)
    return out


def run_id(cfg: PlantedConfig, scenario: str, method: str, seed: int, backbone_sha: str = "") -> str:
    """A name for one result: the scenario, method and seed, and a hash of every setting it depends on --
    the benchmark's, the student's whole AdapterConfig (so a new default in dynlora.py is a new result) and,
    for a pretrained backbone, the hash of its file (backbone_sha; '' for a random backbone)."""
    adapter = asdict(student_config(cfg, method))
    if adapter["gate"] == "rank":         # the only gate before AdapterConfig.gate: earlier results keep their ids
        del adapter["gate"]
    settings = {"planted": cfg.result_settings(), "adapter": adapter}
    if backbone_sha:
        settings["backbone_sha256"] = backbone_sha
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:10]
    return f"planted-{scenario}-{method}-s{seed}-{digest}"


def run_benchmark(cfg: PlantedConfig) -> list[dict]:
    """Every (scenario, method, seed) of cfg: one line in <results_dir>/planted.jsonl each, appended as it
    finishes (a line already there, same settings, is not run again), then a plot per scenario and a summary
    table in out_dir. Returns the result lines of this configuration."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    print("planted: students train in " + runtime.precision_note(cfg.precision, cfg.resolved_precision,
                                                                 torch.device("cpu")))
    path = results_file(cfg)
    done = {r.get("run_id") for r in runs.load_jsonl(path)}
    folder = backbone_folder(cfg)
    sha = runs.file_sha256(Path(folder) / runs.BACKBONE_FILE) if folder else ""
    ids = {(s, m, seed): run_id(cfg, s, m, seed, sha)
           for s in cfg.scenario_list for m in cfg.method_list for seed in range(cfg.seeds)}
    texts = read_texts(cfg)
    base, tok, backbone_desc = load_backbone(cfg, texts[0])
    streams = (data.lm_stream(tok, texts[0]), data.lm_stream(tok, texts[1]))
    machine, commit = runs.machine_description(), runs.git_commit()
    t_all = time.time()
    for scenario in cfg.scenario_list:
        for seed in range(cfg.seeds):
            todo = [m for m in cfg.method_list if ids[scenario, m, seed] not in done]
            if not todo:
                continue
            t0 = time.time()
            setting = make_setting(base, streams, cfg, scenario, seed)
            setup_s = time.time() - t0
            for method in todo:
                t1 = time.time()
                result = run_one(base, setting, cfg, scenario, method, seed)
                record = {"run_id": ids[scenario, method, seed], **result,
                          "layers": setting.info["layers"], "sigmas": [round(s, 5) for s in setting.info["sigmas"]],
                          "teacher_change": setting.info["teacher_change"], "setup_s": round(setup_s, 2),
                          "wall_s": round(time.time() - t1, 2), "backbone": backbone_desc, "machine": machine,
                          "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "config": cfg.result_settings()}
                runs.append_jsonl(path, record)
                print(f"planted {scenario:<13} {method:<8} seed {seed}: rel. error {result['rel_error']:.4f}"
                      + (f", MI {result['gate_mi_bits']:.3f} bit" if "gate_mi_bits" in result else "")
                      + (f", share {result['budget_share']:.2f}" if result["budget_share"] is not None else "")
                      + f"  ({record['wall_s']:.0f} s)", flush=True)
    wanted = set(ids.values())
    rows = [r for r in runs.load_jsonl(path) if r.get("run_id") in wanted]
    out, copies = Path(cfg.out_dir), path.parent / "planted"
    out.mkdir(parents=True, exist_ok=True)
    copies.mkdir(parents=True, exist_ok=True)
    table = summary_table(rows)
    runs.atomic_write_text(out / "summary.md", table)
    written = [out / "summary.md"]
    for scenario in cfg.scenario_list:
        these = [r for r in rows if r["scenario"] == scenario]
        if these:
            written.append(plots.planted_scenario(these, scenario, out / f"planted_{scenario}.png"))
    for f in written:                                       # the figures of record sit next to planted.jsonl
        if f.resolve().parent != copies.resolve():
            shutil.copyfile(f, copies / f.name)
    print(f"\n{table}\nplanted: {len(rows)} results in {path}; plots and summary in {out} and {copies} "
          f"({(time.time() - t_all) / 60:.1f} min)")
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (scenario, method): means over seeds and the paired difference of the relative error to lora."""
    out = []
    for scenario in SCENARIOS:
        here = [r for r in rows if r["scenario"] == scenario]
        lora = {r["seed"]: r["rel_error"] for r in here if r["method"] == "lora"}
        for method in dynlora.METHODS:
            mine = sorted((r for r in here if r["method"] == method), key=lambda r: r["seed"])
            if not mine:
                continue

            def mean(key):
                values = [r[key] for r in mine if r.get(key) is not None]
                return float(np.mean(values)) if values else None
            row = {"scenario": scenario, "method": method, "n": len(mine), "rel_error": mean("rel_error"),
                   "rel_error_sd": float(np.std([r["rel_error"] for r in mine], ddof=1)) if len(mine) > 1 else None,
                   "budget_share": mean("budget_share"), "rank_spearman": mean("rank_spearman"),
                   "gate_mi_bits": mean("gate_mi_bits"), "gate_var_tokens": mean("gate_var_tokens"),
                   "gate_var_layers": mean("gate_var_layers"), "rel_error_frozen_gates": mean("rel_error_frozen_gates"),
                   "wall_s": mean("wall_s")}
            diffs = [r["rel_error"] - lora[r["seed"]] for r in mine if r["seed"] in lora]
            if method != "lora" and diffs:
                m, half, _ = runs.paired_ci(diffs)            # no interval from one pair or equal differences
                row["diff_to_lora"] = (m, math.nan, math.nan) if half is None else (m, m - half, m + half)
                row["n_pairs"] = len(diffs)
            out.append(row)
    return out


def summary_table(rows: list[dict]) -> str:
    """A markdown table of summarize(rows)."""
    def f(v, spec=".3f"):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
    lines = ["| scenario | method | n | rel. error (mean ± sd) | minus lora [95% CI] | budget share | Spearman "
             "| gate MI (bit) | gate var tokens / layers | frozen-gate error | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summarize(rows):
        diff = s.get("diff_to_lora")
        d = f"{diff[0]:+.3f} [{f(diff[1], '+.3f')}, {f(diff[2], '+.3f')}]" if diff else "—"
        var = (f"{f(s['gate_var_tokens'], '.4f')} / {f(s['gate_var_layers'], '.4f')}"
               if s["gate_var_tokens"] is not None else "—")
        lines.append(f"| {s['scenario']} | {s['method']} | {s['n']} | {f(s['rel_error'])} ± {f(s['rel_error_sd'])} "
                     f"| {d} | {f(s['budget_share'], '.2f')} | {f(s['rank_spearman'], '.2f')} "
                     f"| {f(s['gate_mi_bits'])} | {var} | {f(s['rel_error_frozen_gates'])} | {f(s['wall_s'], '.0f')} |")
    return "\n".join(lines) + "\n"


def precision_table(reference: list[dict], other: list[dict], names: tuple = ("fp32", "bf16")) -> str:
    """Whether a lower precision changes the benchmark's answers: two runs of it that differ only in
    --precision (same code, seeds, machine), paired by (scenario, method, seed).

    Per (scenario, method): each precision's relative error (mean ± sd over seeds), the paired difference
    other - reference with its 95% t interval, whether that interval stays within the reference seeds' own
    spread (it does not exclude 0 by more than their sd: a change smaller than seed-to-seed variation changes
    no conclusion), and the verdict against LoRA in each precision (summarize's interval: better / tie /
    worse). A markdown table and, under it, how many rows keep their verdict and stay within the spread."""
    ref = {(s["scenario"], s["method"]): s for s in summarize(reference)}
    oth = {(s["scenario"], s["method"]): s for s in summarize(other)}
    errors = {(r["scenario"], r["method"], r["seed"]): r["rel_error"] for r in reference}
    a, b = names
    lines = [f"| scenario | method | n | {a} error (mean ± sd) | {b} error (mean ± sd) | {b} − {a} [95% CI] "
             f"| within the {a} seeds' sd | verdict vs lora, {a} → {b} |", "|---|---|---|---|---|---|---|---|"]
    kept = compared = within = rows = 0
    for key in [k for k in ref if k in oth]:
        diffs = [r["rel_error"] - errors[key + (r["seed"],)] for r in other
                 if (r["scenario"], r["method"]) == key and key + (r["seed"],) in errors]
        if not diffs:
            continue
        mean, half, n = runs.paired_ci(diffs)
        sd = ref[key]["rel_error_sd"] or 0.0
        low, high = (mean, mean) if half is None else (mean - half, mean + half)
        ok = not (low > sd or high < -sd)
        va, vb = (("—", "—") if key[1] == "lora" else       # diff_to_lora: (mean, low, high); a lower error is better
                  [runs.verdict(*(s[key].get("diff_to_lora") or (None,) * 3)[1:], False) for s in (ref, oth)])
        rows, within = rows + 1, within + ok
        compared, kept = compared + (key[1] != "lora"), kept + (key[1] != "lora" and va == vb)
        ci = f"{mean:+.4f}" + ("" if half is None else f" [{low:+.4f}, {high:+.4f}]")
        sds = [f"{s['rel_error']:.4f} ± " + ("—" if s["rel_error_sd"] is None else f"{s['rel_error_sd']:.4f}")
               for s in (ref[key], oth[key])]
        lines.append(f"| {key[0]} | {key[1]} | {n} | {sds[0]} | {sds[1]} | {ci} | {'yes' if ok else '**no**'} "
                     f"| {va if va == vb else f'**{va} → {vb}**'} |")
    lines.append(f"\n{within} of {rows} (scenario, method) rows within the {a} seeds' spread; the verdict against "
                 f"LoRA the same in {kept} of {compared}.")
    return "\n".join(lines) + "\n"
