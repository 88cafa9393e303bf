"""
dynlora.py -- LoRA, then two ways to make it dynamic, written to be read top to bottom.

The project follows "Dynamic Adaptation of LoRA Fine-Tuning for Efficient and Task-Specific Optimization of
Large Language Models" (Liao et al., arXiv 2501.14859). The paper names two mechanisms on top of LoRA -- "an
adaptive weight allocation mechanism coupled with an input feature-based adaptive strategy" -- and claims they
cost "only 0.1% more resources than standard LoRA", but gives no equations. This file makes each mechanism
concrete in the form of the nearest published method (docs/design.md: the measurements behind our choices).

  Methods    METHODS (lora / alloc / gate / dynlora / adalora), AdapterConfig, config_for_method
  Chapter 1  LoRA: LoRALinear, apply_lora, merging
  Chapter 2  input-driven rank gating: the Gate contract, RankGate, GATES, the sparsity penalty, freeze_gates
  Chapter 3  importance-based rank allocation: the budget schedule, sensitivity, importance_score, RankAllocator

Notation. A layer maps x in R^{d_in} to h in R^{d_out}; W0 (d_out x d_in) and b are the frozen pretrained
weight and bias; A (r x d_in) and B (d_out x r) are the adapter; z = A x in R^r are the adapter's r "rank
components" for one token; s is the scale. A FLOP is one multiply or one add.

How train.py uses it (the call order matters):

    config = config_for_method("dynlora", r=8, target_r=4)
    apply_lora(model, config)                          # wraps layers, freezes the backbone
    allocator = RankAllocator(model, config, total_steps) if config.allocation else None
    for t in range(1, total_steps + 1):               # t counts optimizer steps from 1
        _, loss = model(idx, targets)
        (loss + regularization_loss(model)).backward()
        optimizer.step()
        if allocator: allocator.step(t)               # reads the gradients: before zero_grad
        optimizer.zero_grad()
    runs.save_adapter("adapter.pt", model, config, extra={...})

Adapter files and the allocator's checkpoint state are in runs.py, gate recorders in analysis.py.
"""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F


# The nn.Linear layers of model.py that can be adapted, by their attribute name in a block: attention's four
# projections, the GELU MLP's two and the SwiGLU MLP's three (Llama's names).
ADAPTABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------------
# The methods and their configuration (cli.py turns each config field into a --flag)
# ---------------------------------------------------------------------------------------------------------
#
# All methods share the rank and budget settings (r is the initial rank, target_r the final average); only
# the switches differ. "gate" keeps rank r everywhere and lets each token choose; "alloc" moves a shrinking
# budget between layers; "dynlora" does both -- the paper's method as we read it; "adalora" is the published
# baseline for allocation. An entry may also name its gate (a key of GATES); a new method is one more entry.

METHODS = {
    "lora":    dict(form="plain", allocation=False, gating=False),   # static LoRA (Hu et al. 2021)
    "alloc":   dict(form="plain", allocation=True,  gating=False),   # importance-based allocation only
    "gate":    dict(form="plain", allocation=False, gating=True),    # input-driven gating only
    "dynlora": dict(form="plain", allocation=True,  gating=True),    # both: "dynamic LoRA"
    "adalora": dict(form="svd",   allocation=True,  gating=False),   # AdaLoRA (Zhang et al. 2023)
}
SWITCHES = ("form", "allocation", "gating", "gate")   # the AdapterConfig fields a METHODS entry may set
FULL = "full"                                          # full fine-tuning: trains every weight, no AdapterConfig


def method_names() -> tuple[str, ...]:
    """Every trainable method: FULL, then METHODS in order (also those registered after import)."""
    return (FULL, *METHODS)


@dataclass
class AdapterConfig:
    """Every setting of every method; a method ignores the fields it does not use. The comments are the --help
    of cli.py's flags; the LoRA fields use peft's vocabulary. Build one with config_for_method(name), which
    sets the SWITCHES."""
    # --- Chapter 1: LoRA ---
    r: int = 8                        # rank of each adapter (the initial rank when allocating)
    alpha: float = 16.0               # scale numerator: s = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0              # dropout on the adapter's input (the frozen path sees the plain x)
    targets: tuple = ("q_proj", "v_proj")  # layers: q/k/v/o_proj (attention), fc_in/fc_out or gate/up/down_proj (MLP)
    use_rslora: bool = False          # rank-stabilised scale s = alpha / sqrt(r) (Kalajdzievski 2023)
    bias: str = "none"                # biases that train: none | all | lora_only (of adapted layers)
    modules_to_save: tuple = ("head",)  # modules trained in full and stored in the adapter file
    # --- which method (set by config_for_method) ---
    form: str = "plain"               # plain: dW = s B diag(m) A; svd: s B diag(lambda * m) A (AdaLoRA)
    allocation: bool = False          # move rank components between layers by importance (chapter 3)
    gating: bool = False              # per-token input-driven gates on the rank components (chapter 2)
    gate: str = "rank"                # the gate class of a gating method, by its name in dynlora.GATES
    # --- Chapter 2: gating ---
    gate_init: float = 1.0            # initial gate bias c: every gate starts at sigmoid(c) (0.73 for 1)
    gate_penalty: float = 0.01        # lambda_g: weight of the mean-gate sparsity penalty in the loss
    gate_x_dims: int = 1              # p: learned projections P x of the input the gate reads besides z (0 = z only)
    gate_lr_mult: float = 1.0         # the gates' learning rate (W_g, c, P) as a multiple of the run's
    # --- Chapter 3: allocation ---
    target_r: int = 4                 # final average rank per adapted layer (budget = target_r x layers)
    t_init: int | float = 50          # warm-up optimizer steps, all components on (0 < x < 1: that fraction of the run)
    t_final: int | float = 50         # last steps at the target budget, masks frozen (0 < x < 1: a fraction of the run)
    delta_t: int = 10                 # optimizer steps between two reallocations
    beta1: float = 0.85               # EMA factor of the smoothed sensitivity I_bar
    beta2: float = 0.85               # EMA factor of the uncertainty U_bar
    ortho_gamma: float = 0.1          # weight of the orthogonality penalty on A and B (form svd only)

    def __post_init__(self):
        for name in ("targets", "modules_to_save"):   # lists (JSON, torch.load) and "a,b" strings become tuples
            value = getattr(self, name)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            setattr(self, name, tuple(value))
        unknown = [t for t in self.targets if t not in ADAPTABLE]

        def rule(name, ok, allowed):                  # (ok, "<name> must be <allowed>, got <its value>")
            return ok, f"{name} must be {allowed}, got {getattr(self, name)!r}"
        rules = [
            rule("r", isinstance(self.r, int) and self.r > 0, "a positive integer"),
            rule("alpha", self.alpha > 0, "> 0"),
            rule("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
            (len(self.targets) > 0, f"targets is empty; choose some of {list(ADAPTABLE)}"),
            (not unknown, f"unknown target(s) {unknown}; valid targets are {list(ADAPTABLE)}"),
            rule("bias", self.bias in ("none", "all", "lora_only"), "none | all | lora_only"),
            rule("form", self.form in ("plain", "svd"), "plain | svd"),
            rule("gate", self.gate in GATES, f"one of {list(GATES)} (dynlora.GATES)"),
            rule("gate_init", math.isfinite(self.gate_init), "a finite number"),
            rule("gate_penalty", self.gate_penalty >= 0, ">= 0 (it is a penalty)"),
            rule("gate_x_dims", isinstance(self.gate_x_dims, int) and self.gate_x_dims >= 0, "an integer >= 0"),
            rule("gate_lr_mult", math.isfinite(self.gate_lr_mult) and self.gate_lr_mult > 0, "a finite number > 0"),
            rule("ortho_gamma", self.ortho_gamma >= 0, ">= 0 (it is a penalty)"),
            rule("beta1", 0.0 <= self.beta1 < 1.0, "in [0, 1)"),
            rule("beta2", 0.0 <= self.beta2 < 1.0, "in [0, 1)"),
        ]
        if self.allocation:   # the schedule's own numbers; its fit to the training length is checked later
            rules += [
                rule("target_r", isinstance(self.target_r, int) and self.target_r >= 1, "an integer >= 1"),
                (self.target_r <= self.r, f"target_r ({self.target_r}) is above the initial rank r ({self.r}): "
                 f"allocation only removes rank components, so the target budget cannot exceed the initial one; "
                 f"lower target_r or raise r"),
                rule("t_init", is_steps(self.t_init), "whole steps >= 0 or a fraction of the run in (0, 1)"),
                rule("t_final", is_steps(self.t_final), "whole steps >= 0 or a fraction of the run in (0, 1)"),
                rule("delta_t", self.delta_t >= 1, ">= 1"),
            ]
        for ok, message in rules:
            if not ok:
                raise ValueError(f"AdapterConfig: {message}")

    @property
    def method(self) -> str:
        """The name in METHODS whose switches this config has, or "custom"."""
        mine = {k: getattr(self, k) for k in SWITCHES}
        return next((name for name in METHODS if method_switches(name) == mine), "custom")


def method_switches(name: str) -> dict:
    """All SWITCHES of method `name`: its METHODS entry, with AdapterConfig's defaults for those it leaves out."""
    if name not in METHODS:
        raise ValueError(f"unknown adapter method {name!r}; choose one of {list(METHODS)}")
    return {**{f.name: f.default for f in fields(AdapterConfig) if f.name in SWITCHES}, **METHODS[name]}


def config_for_method(name: str, **overrides) -> AdapterConfig:
    """An AdapterConfig for one of METHODS, with any other fields overridden (e.g. r=16, target_r=8).
    The method's own SWITCHES may be passed only with the method's value."""
    preset = method_switches(name)
    clash = {k: v for k, v in overrides.items() if k in preset and v != preset[k]}
    if clash:
        raise ValueError(f"method {name!r} sets {', '.join(f'{k}={preset[k]!r}' for k in clash)}; {clash} would make "
                         f"it another method -- choose that method by name instead")
    known = {f.name for f in fields(AdapterConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown adapter option(s) {unknown}; known options are {sorted(known)}")
    return AdapterConfig(**{**overrides, **preset})


# ---------------------------------------------------------------------------------------------------------
# Chapter 1. LoRA
# ---------------------------------------------------------------------------------------------------------
#
# LoRA (Hu et al. 2021) freezes a pretrained weight W0 and learns a low-rank update:
#
#     h = W0 x + b + s * B A x,          A: r x d_in,  B: d_out x r,  r << min(d_in, d_out).
#
# Only A and B train: r (d_in + d_out) parameters instead of d_in d_out. After training, W0 + s B A is an
# ordinary weight of the same shape, so the adapted model runs at exactly the base model's speed. The same
# module carries the dynamic mechanisms of chapters 2 and 3: both enter only through an r-vector that scales
# z = A x component-wise.

class LoRALinear(nn.Module):
    """A frozen nn.Linear (`self.base`) plus a low-rank update: h = W0 x + b + s * B diag(c * g(x)) A dropout(x),
    where c in R^r is static (the allocation mask m, times lambda in AdaLoRA's form, times a frozen gate) and
    g(x) in [0,1]^r is the per-token gate (chapter 2). Plain LoRA has neither, and no extra op.

    Init: A ~ Kaiming-uniform, nn.Linear's default, so each z_i = A_i x has the same size whatever d_in; A must
    be random, since B's gradient s delta z^T (delta = dL/dh) would stay zero otherwise. B = 0, so training
    starts exactly at the pretrained function. s = alpha / r, or alpha / sqrt(r) with use_rslora, which keeps
    the update's scale stable in r (Kalajdzievski 2023). The update is computed as (x A^T) B^T, never as B A:
    2 r (d_in + d_out) FLOPs per token. form="svd" adds lambda (`lora_E`), masked=True the 0/1 buffer `mask`.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 form: str = "plain", masked: bool = False, gate: "Gate | None" = None, name: str = ""):
        super().__init__()
        d_in, d_out = base.in_features, base.out_features
        label = name or "layer"
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"{label}: rank r must be a positive integer, got {r!r}")
        if r > min(d_in, d_out):
            raise ValueError(f"{label} ({d_in} -> {d_out}): rank r={r} exceeds min(d_in, d_out)={min(d_in, d_out)}, "
                             f"so B A would not be low-rank; use r <= {min(d_in, d_out)}")
        if form not in ("plain", "svd"):
            raise ValueError(f"{label}: form must be plain | svd, got {form!r}")
        if gate is not None and gate.r != r:
            raise ValueError(f"{label}: the gate has rank {gate.r} but the layer has rank r={r}")
        self.name = name
        self.base = base
        self.base.requires_grad_(False)
        self.d_in, self.d_out, self.r = d_in, d_out, r
        self.form, self.masked = form, masked
        # s keeps the initial rank when allocation switches components off, as AdaLoRA's does.
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(d_out, r, **factory))
        if form == "plain":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        else:   # AdaLoRA's init: dW = 0 through lambda = 0; A, B random so that lambda's gradient is nonzero
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
            self.lora_E = nn.Parameter(torch.zeros(r, **factory))
        if masked:
            self.register_buffer("mask", torch.ones(r, **factory))   # all active; RankAllocator rewrites it
        self.gate = gate                                     # a submodule: its tensors are saved as gate.*
        self.merged = False

    def static_coefficients(self) -> torch.Tensor | None:
        """The static r-vector c of dW = s B diag(c) A (m, lambda, a frozen gate, their product), or None."""
        coef = None
        if self.form == "svd":
            coef = self.lora_E
        if self.masked:
            coef = self.mask if coef is None else coef * self.mask
        if self.gate is not None and self.gate.is_frozen:
            coef = self.gate.frozen_mean if coef is None else coef * self.gate.frozen_mean
        return coef

    def scaled_A(self) -> torch.Tensor:
        """diag(c) A: scaling row i of A by c_i equals scaling z_i, at a cost independent of the batch, and a
        switched-off component is then exactly 0 (also as an input of the gate)."""
        coef = self.static_coefficients()
        return self.lora_A if coef is None else self.lora_A * coef[:, None]   # (r, d_in) * (r, 1) -> (r, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)                                   # (..., d_in) @ (d_in, d_out) -> (..., d_out)
        if self.merged:
            return out                                       # the update already lives in base.weight
        x = self.dropout(x)
        gate = self.gate if self.gate is not None and not self.gate.is_frozen else None
        if gate is None:
            z = F.linear(x, self.scaled_A())                 # (..., d_in) @ (d_in, r) -> (..., r)
        else:   # one GEMM gives z and what the gate reads of x: u = [diag(c) A; P] x
            u = F.linear(x, gate.rows(self.scaled_A()))      # (..., d_in) @ (d_in, r + p) -> (..., r + p)
            z = u[..., :self.r] * gate(u, self.mask if self.masked else None)  # (..., r) * (..., r): g_i(x) z_i
        # out + s * z B^T as one GEMM (addmm, alpha = s): no separate pass over the (..., d_out) output.
        out2d = out.reshape(-1, self.d_out)                  # (..., d_out) -> (N, d_out), a view
        z2d = z.reshape(-1, self.r)                          # (..., r) -> (N, r), a view
        y = torch.addmm(out2d, z2d, self.lora_B.t(), alpha=self.scaling)  # (N, r) @ (r, d_out) + (N, d_out)
        return y.view(out.shape)                             # (N, d_out) -> (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        """The update dW = s B diag(c) A as a (d_out x d_in) matrix (for merging; not used in forward)."""
        if self.gate is not None and not self.gate.is_frozen:
            raise RuntimeError(f"{self.name or 'layer'}: a gated layer's update s B diag(g(x)) A depends on the "
                               f"input x, so it has no single weight to merge; call freeze_gates(model, batches) "
                               f"first to replace each gate by its average")
        A = self.scaled_A()
        with torch.autocast(A.device.type, enabled=False):   # in the weights' own precision, also under autocast
            return self.scaling * (self.lora_B @ A)          # (d_out, r) @ (r, d_in) -> (d_out, d_in)

    @torch.no_grad()
    def merge(self):
        """W0 <- W0 + dW. Afterwards forward() is the base layer alone (zero overhead). Raises if merged."""
        if self.merged:
            raise RuntimeError(f"{self.name or 'layer'} is already merged; merging twice would add the update "
                               f"twice (call unmerge() first)")
        self.base.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W0 <- W0 - dW (up to float rounding): A, B, the mask and the gate must not change while merged."""
        if not self.merged:
            raise RuntimeError(f"{self.name or 'layer'} is not merged; unmerging would subtract an update that "
                               f"was never added")
        self.base.weight -= self.delta_weight()
        self.merged = False

    def orthogonality_penalty(self) -> torch.Tensor:
        """AdaLoRA's regulariser (||A A^T - I||_F^2 + ||B^T B - I||_F^2) / r (the / r is ours: the same weight
        per component for every r). Near-orthonormal A rows and B columns make B diag(lambda) A close to an
        SVD: lambda_i alone sizes component i, and switching one off leaves the others' directions intact."""
        eye = torch.eye(self.r, device=self.lora_A.device, dtype=self.lora_A.dtype)
        AAt = self.lora_A @ self.lora_A.t()                  # (r, d_in) @ (d_in, r) -> (r, r)
        BtB = self.lora_B.t() @ self.lora_B                  # (r, d_out) @ (d_out, r) -> (r, r)
        return ((AAt - eye).square().sum() + (BtB - eye).square().sum()) / self.r

    def active_components(self) -> int:
        return int(self.mask.sum().item()) if self.masked else self.r

    def extra_repr(self) -> str:
        flags = [f for f, on in (("form=svd", self.form == "svd"), ("masked", self.masked), ("merged", self.merged))
                 if on]
        return ", ".join([f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scaling={self.scaling:g}", *flags])


def adapter_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model with its module name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def config_of(model: nn.Module) -> AdapterConfig:
    """The AdapterConfig apply_lora applied to the model (model.adapter_config)."""
    config = getattr(model, "adapter_config", None)
    if config is None:
        raise ValueError("this model has no adapters; call apply_lora(model, config) first")
    return config


def trained_in_full(plain_name: str, config: AdapterConfig) -> bool:
    """Whether a parameter (named as in the un-adapted model) trains outside the adapters: it lies in one of
    config.modules_to_save (matched by module name), or config.bias makes it a trained bias."""
    parts = plain_name.split(".")
    if any(part in config.modules_to_save for part in parts[:-1]):
        return True
    if parts[-1] != "bias":
        return False
    return config.bias == "all" or (config.bias == "lora_only" and len(parts) > 1 and parts[-2] in config.targets)


def apply_lora(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap the target projections of every block in LoRALinear and freeze everything else (in place).

    Trainable afterwards: the adapters (A, B, and lambda / gate parameters where the method has them), the
    modules in config.modules_to_save (the classification head: it is new, so it must train), and the biases
    selected by config.bias. The config is kept as model.adapter_config. With config.gating each layer gets its
    own gate, GATES[config.gate](r, gate_init, d_in=, x_dims=, device=, dtype=). Returns the model.
    """
    if adapter_layers(model):
        raise ValueError("this model already has adapters; apply_lora expects the plain backbone")
    targets = [(name, m) for name, m in model.named_modules()
               if name.rsplit(".", 1)[-1] in config.targets and isinstance(m, nn.Linear)]
    missing = [t for t in config.targets if not any(name.rsplit(".", 1)[-1] == t for name, _ in targets)]
    if missing:
        raise ValueError(f"target(s) {missing} match no nn.Linear in {type(model).__name__}")
    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [n for n in config.modules_to_save if n not in module_names]
    if absent:
        raise ValueError(f"modules_to_save: no module named {absent} in {type(model).__name__}; for a language "
                         f"model without a new head use modules_to_save=()")
    gate_class = GATES[config.gate]                          # chapter 2's registry, read at call time
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        gate = None
        if config.gating:
            gate = gate_class(config.r, config.gate_init, d_in=linear.in_features, x_dims=config.gate_x_dims,
                              device=linear.weight.device, dtype=linear.weight.dtype)
        layer = LoRALinear(linear, config.r, config.alpha, config.dropout, config.use_rslora, form=config.form,
                           masked=config.allocation, gate=gate, name=name)
        setattr(model.get_submodule(parent_name), attr, layer)
    for _, layer in adapter_layers(model):
        for key, p in layer.named_parameters():            # A, B (lambda, gate.*): not the frozen base
            if not key.startswith("base."):
                p.requires_grad_(True)
    for name, p in model.named_parameters():
        if trained_in_full(name.replace(".base.", "."), config):
            p.requires_grad_(True)
    model.adapter_config = config
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight is counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_adapters(model: nn.Module):
    """merge() every adapter in place."""
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge_adapters(model: nn.Module):
    """unmerge() every adapter in place."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """A plain copy of the model (the input is not modified): every adapter replaced by an nn.Linear holding
    W0 + dW, every parameter trainable as in a fresh model. A live gate must be frozen first (freeze_gates)."""
    for name, layer in adapter_layers(model):
        if layer.gate is not None and not layer.gate.is_frozen:
            layer.delta_weight()        # raises the explanatory error
    plain = copy.deepcopy(model)
    for name, layer in adapter_layers(plain):
        linear = nn.Linear(layer.d_in, layer.d_out, bias=layer.base.bias is not None,
                           device=layer.base.weight.device, dtype=layer.base.weight.dtype)
        with torch.no_grad():
            weight = layer.base.weight if layer.merged else layer.base.weight + layer.delta_weight()
            linear.weight.copy_(weight)
            if layer.base.bias is not None:
                linear.bias.copy_(layer.base.bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(plain.get_submodule(parent_name), attr, linear)
    if "adapter_config" in plain.__dict__:
        del plain.adapter_config
    plain.requires_grad_(True)
    return plain


# ---------------------------------------------------------------------------------------------------------
# Chapter 2. Input-driven rank gating
# ---------------------------------------------------------------------------------------------------------
#
# The paper: "Another gain in flexibility arises from the consideration of the input feature distribution,
# which helps the model generalize better when faced with complicated and diverse datasets." It does not say
# how. Ours gives each of the r rank components a gate that depends on the token:
#
#     z = A x in R^r                                  (already computed by LoRA)
#     q = P x in R^p                                  (P: p x d_in, p = gate_x_dims, 1 by default; [z; q] = [A; P] x)
#     g(x) = sigmoid(W_g [z; q] + c) in [0,1]^r       (W_g: r x (r + p), c: r)
#     dW x = s * B diag(m * g(x)) A x                 (m: the allocation mask of chapter 3, 1 without allocation)
#
# so a token uses as many components as its gates open: its "effective rank" is #{i : m_i g_i > 0.5}. This
# is SMoRA's per-token choice of ranks (Zhao et al. 2025, top-k routing) made soft and trained by
# backpropagation; SoRA (Ding et al. 2023) gates the rank with one vector for all inputs. Per token, because
# in a causal model a per-sequence gate would read the future. P x besides z, because the feature that decides
# WHICH components a token needs need not be among those the update reads (planted.py's scenario "input").
# c = 1, so the gates start open (0.73) where the sigmoid is steep; Adam moves c by about lr per step, so a
# gate can close within a run (gate_lr_mult is for runs too short for that).
#
# Sparsity. Nothing else asks a gate to close, so the loss gets lambda_g * mean of m_i g_i(x) over positions,
# components and gated layers: the L1 norm of the (non-negative) gates. Keep lambda_g small: the update is
# unchanged when g shrinks and B grows by the same factor, but the penalty is not, so a strong one pushes the
# gates into the flat end of the sigmoid, where they learn slowly. Pads count too (the layer cannot tell them
# apart); with right padding in a causal model they only dilute the penalty.
#
# Inference. A gated update depends on x, so freeze_gates() replaces each gate by its mean g_bar over
# calibration data, and dW = s B diag(m g_bar) A merges like LoRA. Cost per token and layer:
# 2 p d_in + 2 r (r + p) + 6 r FLOPs (gate_flops_per_token), against 2 r (d_in + d_out) for LoRA.

class Gate(Protocol):
    """What the rest of the code uses of a gate: the contract a new gate class keeps (RankGate is one).

    A gate is an nn.Module (its parameters train, its tensors are saved as gate.*) built by apply_lora as
    cls(r, init, d_in=, x_dims=, device=, dtype=) from config.r, gate_init, the layer's d_in, gate_x_dims. A
    new gate subclasses RankGate, overrides forward (keeping its call to record), and registers itself:
    GATES["name"] = cls; a METHODS entry with gate="name" then uses it, and adapter files reload it.
    """
    r: int                              # rank: one gate per rank component
    is_frozen: bool                     # True once freeze() ran (LoRALinear then uses frozen_mean, not forward)
    frozen_mean: torch.Tensor           # (r,) the static gate g_bar of a frozen gate
    last_mean: torch.Tensor | None      # mean of m * g over the last forward pass; regularization_loss takes it
    recorder: Callable | None           # while set (analysis.py), called as recorder(g, mask) on every forward

    def rows(self, A: torch.Tensor) -> torch.Tensor:
        """The rows of the layer's one GEMM u = rows x: A (r, d_in), the layer's diag(c) A, then any of the
        gate's own rows (P for RankGate), so that u = [z; P x] (..., r + p) costs one pass over x."""

    def forward(self, u: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """g (..., r) in [0, 1] from u = rows(A) x (..., r + p), whose first r entries are the components z;
        mask (r,) or None."""

    def freeze(self, mean_gate: torch.Tensor) -> None:
        """From now on use the static vector mean_gate (r,) instead of g(x)."""

    def active_parameter_count(self, k: int) -> int:
        """The gate's parameters that serve k active components (for the equal-budget count)."""


class RankGate(nn.Module):
    """The input-driven gate of one adapted layer: g = sigmoid(W_g [z; P x] + c) in [0,1]^r, per token.

    Parameters: `weight` W_g (r x (r + p)) = 0, `bias` c (r,) = init, and for p = x_dims > 0 `proj` P
    (p x d_in), Kaiming-uniform like A. As with LoRA's A and B, every token starts at the same gates
    sigmoid(init), and W_g's first gradient is nonzero. x_dims = 0 is the z-only gate sigmoid(W_g z + c).
    Frozen state: the buffers `frozen_mean` and `frozen` (saved); `is_frozen` is the Python flag the forward
    pass reads (no device sync), set from the buffer again after load_state_dict.
    """

    def __init__(self, r: int, init: float = 1.0, *, d_in: int, x_dims: int = 1, device=None, dtype=None):
        super().__init__()
        if x_dims and d_in < 1:
            raise ValueError(f"RankGate: a gate reading x_dims={x_dims} projections of x needs the layer's d_in")
        factory = dict(device=device, dtype=dtype)
        self.r, self.x_dims = r, x_dims
        self.weight = nn.Parameter(torch.zeros(r, r + x_dims, **factory))       # W_g over [z; P x]
        self.bias = nn.Parameter(torch.full((r,), float(init), **factory))      # c
        if x_dims:
            # Drawn aside, so that A and everything drawn after the gate are the same numbers as in a LoRA
            # model of the same seed: a fresh generator seeded from a copy of the global one, which is left as
            # it was (the copy gives one number, so its stream does not repeat the numbers A is drawn from).
            rng = torch.Generator().set_state(torch.get_rng_state())
            aside = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=rng)) ^ 0x5DEECE66D)
            proj = torch.empty(x_dims, d_in)
            nn.init.kaiming_uniform_(proj, a=math.sqrt(5), generator=aside)
            self.proj = nn.Parameter(proj.to(**factory))                         # P
        self.register_buffer("frozen_mean", torch.ones(r, **factory))
        self.register_buffer("frozen", torch.tensor(False, device=device))
        self.register_load_state_dict_post_hook(RankGate._after_load)
        self.is_frozen = False
        self.last_mean = None
        self.recorder = None

    def rows(self, A: torch.Tensor) -> torch.Tensor:
        """[A; P] (r + p, d_in): the layer's one GEMM then gives u = [z; P x]. Fused rather than a second
        GEMM P x, because the backward pass of a separate one writes and adds a whole (..., d_in) gradient
        of x for p numbers per token: a memory cost out of all proportion to the gate's few FLOPs."""
        return torch.cat([A, self.proj]) if self.x_dims else A    # (r, d_in) ++ (p, d_in) -> (r + p, d_in)

    def forward(self, u: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.sigmoid(F.linear(u, self.weight, self.bias))    # (..., r + p) @ (r + p, r) + (r,) -> (..., r)
        self.record(g, mask)
        return g

    def record(self, g: torch.Tensor, mask: torch.Tensor | None):
        """Keep `last_mean`, the mean over positions and components of m * g (m = 1 without allocation), a 0-d
        tensor in the autograd graph for the penalty; and hand g to the recorder, if one is set."""
        per_component = g.reshape(-1, self.r).float().mean(0)    # (..., r) -> (N, r) -> (r,), fp32 under autocast
        if mask is not None:
            # A switched-off component does nothing, so its gate is neither penalised nor counted.
            self.last_mean = (per_component * mask).sum() / self.r
        else:
            self.last_mean = per_component.mean()
        if self.recorder is not None:
            self.recorder(g.detach(), mask)

    @torch.no_grad()
    def freeze(self, mean_gate: torch.Tensor):
        """Replace the input-driven gate by the static vector mean_gate (r,): dW becomes s B diag(m * g_bar) A."""
        self.frozen_mean.copy_(mean_gate)
        self.frozen.fill_(True)
        self._sync_frozen_flag()
        self.last_mean = None

    @staticmethod
    def _after_load(module: "RankGate", incompatible_keys):
        module._sync_frozen_flag()

    def _sync_frozen_flag(self):
        self.is_frozen = bool(self.frozen)
        if self.is_frozen:
            self.requires_grad_(False)       # W_g and c are no longer used by the forward pass

    def active_parameter_count(self, k: int) -> int:
        """k (k + p) entries of W_g (the active rows, their z columns and all p columns of P x), k of c, and P."""
        return k * (k + self.x_dims) + k + (self.proj.numel() if self.x_dims else 0)

    @staticmethod
    def flops_per_token(r: int, d_in: int = 0, x_dims: int = 0) -> int:
        """P x (2 p d_in), W_g [z; P x] (2 r (r + p)), + c (r), the sigmoid (4 r) and z * g (r)."""
        return 2 * x_dims * d_in + 2 * r * (r + x_dims) + 6 * r

    def extra_repr(self) -> str:
        frozen = ", frozen" if self.is_frozen else ""
        return f"r={self.r}" + (f", x_dims={self.x_dims}" if self.x_dims else "") + frozen


GATES: dict[str, type] = {"rank": RankGate}   # gate classes by name (AdapterConfig.gate); add one: GATES["name"] = cls


def gate_flops_per_token(r: int, d_in: int = 0, x_dims: int = 0) -> int:
    """FLOPs of a RankGate for one token: 2 p d_in + 2 r (r + p) + 6 r (176 for r = 8, p = 0)."""
    return RankGate.flops_per_token(r, d_in, x_dims)


def live_gates(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The adapted layers whose gate is live (input-driven, not frozen), with their names, in module order."""
    return [(n, m) for n, m in adapter_layers(model) if m.gate is not None and not m.gate.is_frozen]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the live gates, in module order (train.make_optimizer's gate_lr_mult group)."""
    return [p for _, m in live_gates(model) for p in m.gate.parameters() if p.requires_grad]


@torch.no_grad()
def freeze_gates(model: nn.Module, batches, pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """Freeze every live gate to its mean g_bar over calibration data, so the model can be merged.

    batches: token-id tensors (B, T), or tuples whose first element is one (e.g. (idx, y)), run in eval mode
    (the mode is restored afterwards); positions holding pad_id are left out of the mean. Returns
    {layer: g_bar (r,)}. Afterwards dW = s B diag(m * g_bar) A, and merge() / merge_and_unload() work.
    """
    layers = live_gates(model)
    if not layers:
        raise ValueError("freeze_gates: the model has no input-driven gates to freeze")
    sums = {name: torch.zeros(layer.r, dtype=torch.float64) for name, layer in layers}
    counts = dict.fromkeys(sums, 0)
    keep = None                                                   # (B T,) bool of the current batch, or None

    def add(name, g, mask):
        g2d = g.reshape(-1, g.shape[-1])                          # (..., r) -> (N, r)
        g2d = g2d if keep is None else g2d[keep]                  # (N, r) -> (N_kept, r)
        sums[name] += g2d.sum(0).double().cpu()
        counts[name] += g2d.shape[0]

    was_training = model.training
    model.eval()
    for name, layer in layers:
        layer.gate.recorder = lambda g, mask, name=name: add(name, g, mask)
    try:
        for batch in batches:
            idx = batch[0] if isinstance(batch, (tuple, list)) else batch
            keep = (idx != pad_id).reshape(-1) if pad_id is not None else None
            model(idx)
    finally:
        for _, layer in layers:
            layer.gate.recorder = None
        model.train(was_training)
    means = {}
    for name, layer in layers:
        if counts[name] == 0:
            raise ValueError(f"freeze_gates: no calibration positions reached {name}; pass at least one batch")
        means[name] = (sums[name] / counts[name]).float()
        layer.gate.freeze(means[name].to(layer.gate.frozen_mean))
    return means


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """The method's penalties, to add to the task loss: gate sparsity (chapter 2) + orthogonality (chapter 3).

        lambda_g * mean over live gates of gate.last_mean       (gating methods; see RankGate.record)
      + gamma * mean over adapted layers of orthogonality_penalty()   (form "svd")

    Returns a 0-d tensor (zero for plain LoRA and allocation in the plain form). It reads and clears each
    gated layer's record of the last forward pass, so it must follow a forward pass of the model, once.
    """
    config = config_of(model)
    layers = adapter_layers(model)
    total = torch.zeros((), device=layers[0][1].lora_A.device)
    gates = [m.gate for _, m in live_gates(model)]
    if gates:
        records = [gate.last_mean for gate in gates]
        if any(r is None for r in records):
            raise RuntimeError("regularization_loss: a gated layer has no record of a forward pass; call it once "
                               "after each forward pass (it consumes the records)")
        for gate in gates:
            gate.last_mean = None
        if config.gate_penalty > 0:
            total = total + config.gate_penalty * torch.stack(records).mean()
    if config.form == "svd" and config.ortho_gamma > 0:
        total = total + config.ortho_gamma * torch.stack([m.orthogonality_penalty() for _, m in layers]).mean()
    return total


# ---------------------------------------------------------------------------------------------------------
# Chapter 3. Importance-based rank allocation
# ---------------------------------------------------------------------------------------------------------
#
# The paper: "Traditional LoRA methods use static adapter settings, not considering the different importance
# of model layers. In contrast, dynamic LoRA introduces a mechanism that dynamically evaluates the layer's
# importance during fine-tuning. This evaluation enables the reallocation of adapter parameters to fit the
# unique demands of each individual task". Our concrete form is AdaLoRA's (Zhang et al. 2023).
#
# Components and masks. Each adapted layer has r rank components (row i of A, column i of B, and lambda_i in
# the svd form) and a 0/1 mask m: dW = s B diag(m) A ("plain") or s B diag(lambda * m) A ("svd"). The plain
# form keeps LoRA's init, so that alloc-vs-lora isolates the effect of allocation; the svd form is AdaLoRA's
# (lambda plays the singular values, kept meaningful by the orthogonality penalty). Masking never zeroes A, B
# or lambda, so a switched-off component keeps its weights and can come back.
#
# Importance. A parameter's sensitivity I = |theta * dL/dtheta| is noisy from batch to batch, so AdaLoRA
# smooths it and weighs it by its uncertainty, and scores each component from I_bar * U_bar of its
# parameters (importance_score):
#
#     I_bar <- beta1 I_bar + (1 - beta1) I              (smoothed sensitivity)
#     U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|     (uncertainty, with the I_bar just updated)
#
# A switched-off component has gradient exactly 0, so its sensitivity is unobservable: we freeze its EMAs.
# Updated with I = 0, its score would shrink geometrically and it could practically never return; frozen, it
# returns as soon as an active component's score drops below it. (peft's AdaLoRA instead zeroes lambda_i at
# each reallocation and lets it train again in between.)
#
# Budget. b(t) counts the active components over ALL adapted layers; it falls from r to target_r per layer
# on a cubic schedule (budget_schedule). A reallocation keeps the b(t) components with the highest scores over
# all layers -- ties going to the earlier layer and component -- so rank moves to the layers that need it.

def is_steps(x) -> bool:
    """A schedule length: a whole number of optimizer steps (>= 0), or a fraction of the run in (0, 1)."""
    return (isinstance(x, int) and not isinstance(x, bool) and x >= 0) or (isinstance(x, float) and 0 < x < 1)


def schedule_steps(x: int | float, total_steps: int) -> int:
    """t_init or t_final in optimizer steps: a whole number as it is, a fraction x of the run as round(x T).
    Fractions let one schedule fit tasks of any length (AdaLoRA's authors advise a budget-reduction phase of
    about half the run)."""
    return x if isinstance(x, int) else round(x * total_steps)


def check_schedule(total_steps: int, t_init: int, t_final: int, delta_t: int,
                   initial_budget: int, target_budget: int):
    """Raise ValueError, saying which numbers and how to fix, if the allocation schedule cannot run."""
    if total_steps < 1:
        raise ValueError(f"rank schedule: total_steps must be >= 1, got {total_steps}")
    if t_init < 0 or t_final < 0 or delta_t < 1:
        raise ValueError(f"rank schedule: need t_init >= 0, t_final >= 0, delta_t >= 1; "
                         f"got t_init={t_init}, t_final={t_final}, delta_t={delta_t}")
    if target_budget > initial_budget or target_budget < 0:
        raise ValueError(f"rank schedule: the target budget ({target_budget}) must be between 0 and the initial "
                         f"budget ({initial_budget}); lower target_r")
    if t_init + t_final >= total_steps:
        raise ValueError(f"rank schedule does not fit in {total_steps} training steps: t_init ({t_init}) + t_final "
                         f"({t_final}) = {t_init + t_final} must be < the total steps, to leave steps in which the "
                         f"budget decreases; lower --t-init / --t-final or train longer (total steps = batches per "
                         f"epoch x epochs)")


def budget_schedule(step: int, total_steps: int, initial_budget: int, target_budget: int,
                    t_init: int, t_final: int, delta_t: int) -> tuple[int, bool]:
    """(b(t), whether to reallocate at step t); t counts optimizer steps from 1. With b0 = initial_budget
    (r n for n adapted layers), b_T = target_budget (target_r n) and T = total_steps:

        t <= t_init:                 b0, no masking (warm-up: scores form, nothing is switched off)
        t_init < t <= T - t_final:   b_T + (b0 - b_T) (1 - (t - t_init) / (T - t_final - t_init))^3, rounded down;
                                     reallocate when (t - t_init) is a multiple of delta_t, and at t = T - t_final
        t > T - t_final:             b_T, masks frozen (the final components fine-tune undisturbed)

    The cubic (Zhu & Gupta's gradual pruning, adopted by AdaLoRA) removes most components early, while the
    survivors still have many steps to adapt. It is exact integer arithmetic: (b0 - b_T) (D - k)^3 // D^3,
    D = T - t_final - t_init, k = t - t_init.
    """
    check_schedule(total_steps, t_init, t_final, delta_t, initial_budget, target_budget)
    end = total_steps - t_final
    if step <= t_init:
        return initial_budget, False
    if step > end:
        return target_budget, False
    span, done = end - t_init, step - t_init
    budget = target_budget + (initial_budget - target_budget) * (span - done) ** 3 // span ** 3
    return budget, (done % delta_t == 0 or step == end)


def sensitivity(p: nn.Parameter) -> torch.Tensor:
    """I = |theta * dL/dtheta| per entry of p (0 where p took no part in the loss): the first-order change of
    the loss if the entry were set to zero. A new tensor, of p's shape."""
    return (p * p.grad).abs_() if p.grad is not None else torch.zeros_like(p)


def importance_score(ipt: dict[str, torch.Tensor], unc: dict[str, torch.Tensor]) -> torch.Tensor:
    """One layer's component scores S_i = mean_j s(A_ij) + mean_j s(B_ji) (+ s(lambda_i)), s = I_bar * U_bar,
    from its EMAs per parameter: "A" (r, d_in), "B" (d_out, r), "E" (r,) for lambda. RankAllocator ranks
    components by this score and nothing else: the one function to change to try another score."""
    s = {k: ipt[k] * unc[k] for k in ipt}                  # per parameter, same shapes as the EMAs
    scores = s["A"].mean(1) + s["B"].mean(0)               # (r, d_in) -> (r,) and (d_out, r) -> (r,)
    if "E" in s:
        scores = scores + s["E"]                           # (r,)
    return scores


class RankAllocator:
    """Importance scores and the rank budget for the masked layers of a model. Construct it after moving the
    model to its device; call step(t) once per optimizer step t = 1, 2, ..., total_steps, after
    optimizer.step() and before zero_grad (it reads the gradients). It raises on the mistakes it can see (no
    gradients, t not increasing, merged adapters). Its checkpoint state: runs.allocator_state.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, total_steps: int):
        if not config.allocation:
            raise ValueError(f"RankAllocator: method {config.method!r} does not allocate rank (allocation=False)")
        if getattr(model, "adapter_config", None) != config:
            raise ValueError("RankAllocator: the config differs from the one applied to the model "
                             "(call apply_lora(model, config) with the same config)")
        self.layers = [(name, m) for name, m in adapter_layers(model) if m.masked]
        if not self.layers:
            raise ValueError("RankAllocator: the model has no masked adapter layers")
        self.config, self.total_steps = config, total_steps
        self.t_init, self.t_final = (schedule_steps(x, total_steps) for x in (config.t_init, config.t_final))
        self.initial_budget = sum(m.r for _, m in self.layers)
        self.target_budget = config.target_r * len(self.layers)
        check_schedule(total_steps, self.t_init, self.t_final, config.delta_t, self.initial_budget, self.target_budget)
        # The EMAs I_bar and U_bar per layer and parameter ("A", "B", "E" for lambda), of the parameter's shape.
        self.ipt = {name: {k: torch.zeros_like(p) for k, p in self._params(m).items()} for name, m in self.layers}
        self.unc = {name: {k: torch.zeros_like(p) for k, p in self._params(m).items()} for name, m in self.layers}
        self.last_step = 0
        self.history = []     # one dict per reallocation: step, budget, ranks {layer: int}, importance {layer: float}

    @staticmethod
    def _params(m: LoRALinear) -> dict[str, nn.Parameter]:
        params = {"A": m.lora_A, "B": m.lora_B}
        if m.form == "svd":
            params["E"] = m.lora_E
        return params

    @staticmethod
    def _per_component(mask: torch.Tensor, key: str) -> torch.Tensor:
        """The mask shaped to broadcast over a parameter: rows of A, columns of B, entries of lambda."""
        return {"A": mask[:, None], "B": mask[None, :], "E": mask}[key]   # (r,) -> (r, 1) | (1, r) | (r,)

    def step(self, t: int) -> int:
        """Update the importance EMAs and, on reallocation steps, the masks. Returns the budget b(t)."""
        if not isinstance(t, int) or t < 1:
            raise ValueError(f"RankAllocator.step: t counts optimizer steps from 1 (the step just taken), got {t!r}")
        if t <= self.last_step:
            raise RuntimeError(f"RankAllocator.step({t}) called after step({self.last_step}); call it exactly once "
                               f"per optimizer step, with t increasing")
        if any(m.merged for _, m in self.layers):
            raise RuntimeError("RankAllocator.step: adapters are merged; unmerge before training")
        budget, reallocate = budget_schedule(t, self.total_steps, self.initial_budget, self.target_budget,
                                             self.t_init, self.t_final, self.config.delta_t)
        if t <= self.total_steps - self.t_final:   # masks can still move: keep the scores current
            self._update_importance()
        if reallocate:
            self._reallocate(budget, t)
        self.last_step = t
        return budget

    @torch.no_grad()
    def _update_importance(self):
        grads = [p.grad for _, m in self.layers for p in self._params(m).values()]
        if all(g is None for g in grads):
            raise RuntimeError("RankAllocator.step: no adapter parameter has a gradient. Call order: loss.backward() "
                               "-> optimizer.step() -> allocator.step(t) -> optimizer.zero_grad(): it reads the "
                               "gradients, so call allocator.step before zero_grad")
        if not any(bool(g.any()) for g in grads if g is not None):
            raise RuntimeError("RankAllocator.step: every adapter gradient is zero; call allocator.step before "
                               "optimizer.zero_grad() (zero_grad(set_to_none=False) zeroes them)")
        b1, b2 = self.config.beta1, self.config.beta2
        for name, m in self.layers:
            # x.lerp_(y, w) = (1 - w) x + w y: the EMA update with w = 1 - beta on active components, no
            # change with w = 0 on switched-off ones (see above). In place: this runs at every optimizer step.
            w1, w2 = (1 - b1) * m.mask, (1 - b2) * m.mask                    # (r,) each; the mask is 0/1
            for key, p in self._params(m).items():
                ipt, unc = self.ipt[name][key], self.unc[name][key]
                sens = sensitivity(p)                                    # I, same shape as p
                ipt.lerp_(sens, self._per_component(w1, key))            # I_bar <- b1 I_bar + (1 - b1) I
                unc.lerp_(sens.sub_(ipt).abs_(), self._per_component(w2, key))  # U_bar <- ... |I - I_bar|

    @torch.no_grad()
    def component_scores(self) -> dict[str, torch.Tensor]:
        """layer -> S (r,), the importance_score of its components."""
        return {name: importance_score(self.ipt[name], self.unc[name]) for name, _ in self.layers}

    @torch.no_grad()
    def _reallocate(self, budget: int, t: int):
        scores = self.component_scores()
        flat = torch.cat([scores[name] for name, _ in self.layers])          # n x (r,) -> (n r,)
        # Stable sort: among equal scores the earlier layer / component comes first, so ties are deterministic.
        order = torch.sort(flat, descending=True, stable=True).indices
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        keep[order[:budget]] = True
        start = 0
        for _, m in self.layers:
            m.mask.copy_(keep[start:start + m.r])
            start += m.r
        self.history.append({"step": t, "budget": budget, "ranks": self.rank_pattern(),
                             "importance": self.layer_importance(scores)})

    def rank_pattern(self) -> dict[str, int]:
        """layer -> number of active components."""
        return {name: m.active_components() for name, m in self.layers}

    def layer_importance(self, scores: dict | None = None) -> dict[str, float]:
        """layer -> sum of its components' scores (including switched-off ones, whose scores are frozen)."""
        scores = scores if scores is not None else self.component_scores()
        return {name: float(scores[name].sum()) for name, _ in self.layers}


def active_parameter_count(model: nn.Module) -> int:
    """Adapter parameters of the active components: the "same final trainable budget" count.

    Every parameter of a LoRALinear outside its base and gate has one axis over the r rank components (A's
    rows, B's columns, lambda), so k active components own k / r of it; a live gate adds its own
    active_parameter_count(k). The head and trainable biases are the same for every method: not counted.
    """
    total = 0
    for _, m in adapter_layers(model):
        k = m.active_components()
        own = [p for name, p in m.named_parameters() if not name.startswith(("base.", "gate."))]
        total += sum(p.numel() // m.r * k for p in own)                  # k (d_in + d_out) (+ k for lambda)
        if m.gate is not None and not m.gate.is_frozen:
            total += m.gate.active_parameter_count(k)
    return total
