"""
dynlora.py -- LoRA, then two ways to make it dynamic, written to be read top to bottom.

The project follows "Dynamic Adaptation of LoRA Fine-Tuning for Efficient and Task-Specific Optimization
of Large Language Models" (Liao et al., arXiv 2501.14859). The paper names two mechanisms on top of LoRA --
"an adaptive weight allocation mechanism coupled with an input feature-based adaptive strategy" -- and
claims they cost "only 0.1% more resources than standard LoRA", but it gives no equations. This file makes
each mechanism concrete, borrows the form from the nearest published method, and says which choices are
ours.

In order, the file holds:

  Methods.   The method table METHODS (lora / alloc / gate / dynlora / adalora), AdapterConfig (every
             setting of every method) and config_for_method, which builds the one from the other.
  Chapter 1. LoRA (Hu et al. 2021), complete as people use it: the adapted layer, merging, applying adapters
             to a GPT by name, freezing, adapter-only files.
  Chapter 2. Input-driven rank gating -- the "input feature-based adaptive strategy": a per-token gate on
             each of the r rank components, reading z = A x and one learned projection of x (nearest
             relatives: SoRA's gate, SMoRA's per-token rank routing; the design was chosen on planted.py's
             known-answer benchmark).
             The gate is one module, RankGate; a new gate is a new module passed to apply_lora. What the
             gates do is measured through two recorders: gate_statistics (effective rank per token, mean
             gates) and gate_values (every gate value per token, for the variance across tokens).
  Chapter 3. Importance-based rank allocation -- the "adaptive weight allocation": a global budget of rank
             components that moves between layers according to a smoothed sensitivity score (AdaLoRA's),
             computed by one function, importance_score.

Notation used throughout. A layer maps x in R^{d_in} to h in R^{d_out}; W0 (d_out x d_in) and b are the
frozen pretrained weight and bias; A (r x d_in) and B (d_out x r) are the adapter; z = A x in R^r are the
adapter's r "rank components" for one token; s is the scale. A FLOP is one multiply or one add, so a
matrix-vector product with an m x n matrix costs 2 m n FLOPs.

How train.py uses it (the call order matters; each function's docstring has the details):

    config = config_for_method("dynlora", r=8, target_r=4)
    apply_lora(model, config)                          # wraps layers, freezes the backbone
    allocator = RankAllocator(model, config, total_steps) if config.allocation else None
    for t in range(1, total_steps + 1):               # t counts optimizer steps from 1
        _, loss = model(idx, targets)
        (loss + regularization_loss(model)).backward()
        optimizer.step()
        if allocator: allocator.step(t)               # reads the gradients: before zero_grad
        optimizer.zero_grad()
    save_adapter("adapter.pt", model, config, extra={...})
"""

import copy
import math
import os
import tempfile
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, asdict, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# The nn.Linear layers of model.py that can be adapted, by their attribute name in a block: attention's four
# projections, the GELU MLP's two and the SwiGLU MLP's three (Llama's names).
ADAPTABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out", "gate_proj", "up_proj", "down_proj")

ADAPTER_FORMAT = "dynlora-adapter/2"   # written into every adapter file, checked on load


# ---------------------------------------------------------------------------------------------------------
# The methods and their configuration (train.py turns each config field into a --flag)
# ---------------------------------------------------------------------------------------------------------
#
# Every method shares the same rank and budget settings (r is the initial rank, target_r the final average);
# only these three switches differ. "gate" keeps rank r everywhere and lets each token choose; "alloc"
# moves a shrinking budget between layers; "dynlora" does both -- the paper's method as we read it;
# "adalora" is the published baseline for allocation (svd form, orthogonality penalty, no gate).

METHODS = {
    "lora":    dict(form="plain", allocation=False, gating=False),   # static LoRA (Hu et al. 2021)
    "alloc":   dict(form="plain", allocation=True,  gating=False),   # importance-based allocation only
    "gate":    dict(form="plain", allocation=False, gating=True),    # input-driven gating only
    "dynlora": dict(form="plain", allocation=True,  gating=True),    # both: "dynamic LoRA"
    "adalora": dict(form="svd",   allocation=True,  gating=False),   # AdaLoRA (Zhang et al. 2023)
}


@dataclass
class AdapterConfig:
    """Every setting of every method. Fields a method does not use are ignored by it (see the comments,
    which train.py also shows as each flag's --help).

    The LoRA fields use peft's vocabulary (r, alpha, dropout, target modules, use_rslora, bias,
    modules_to_save). The three fields `form`, `allocation` and `gating` say which method this is; build a
    config with config_for_method(name) rather than setting them by hand.
    """
    # --- Chapter 1: LoRA ---
    r: int = 8                            # rank of each adapter (the initial rank when allocating)
    alpha: float = 16.0                   # scale numerator: s = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0                  # dropout on the adapter's input (the frozen path sees the plain x)
    targets: tuple = ("q_proj", "v_proj")  # per block: q/k/v/o_proj (attention), fc_in/fc_out or gate/up/down_proj (MLP)
    use_rslora: bool = False              # rank-stabilised scale s = alpha / sqrt(r) (Kalajdzievski 2023)
    bias: str = "none"                    # biases that train: none | all | lora_only (of adapted layers)
    modules_to_save: tuple = ("head",)    # modules trained in full and stored in the adapter file
    # --- which method (set by config_for_method) ---
    form: str = "plain"                   # plain: dW = s B diag(m) A; svd: s B diag(lambda * m) A (AdaLoRA)
    allocation: bool = False              # move rank components between layers by importance (chapter 3)
    gating: bool = False                  # per-token input-driven gates on the rank components (chapter 2)
    # --- Chapter 2: gating ---
    gate_init: float = 1.0                # initial gate bias c: every gate starts at sigmoid(c) (0.73 for 1)
    gate_penalty: float = 0.01            # lambda_g: weight of the mean-gate sparsity penalty in the loss
    gate_x_dims: int = 1                  # p: learned projections P x of the layer input the gate reads besides z = A x (0 = z only)
    gate_lr_mult: float = 1.0             # the gates' learning rate (W_g, c, P) as a multiple of the run's (train.make_optimizer)
    # --- Chapter 3: allocation ---
    target_r: int = 4                     # final average rank per adapted layer (budget = target_r x layers)
    t_init: int = 50                      # warm-up optimizer steps with all components active
    t_final: int = 50                     # last optimizer steps with the budget at its target, masks frozen
    delta_t: int = 10                     # optimizer steps between two reallocations
    beta1: float = 0.85                   # EMA factor of the smoothed sensitivity I_bar
    beta2: float = 0.85                   # EMA factor of the uncertainty U_bar
    ortho_gamma: float = 0.1              # weight of the orthogonality penalty on A and B (form svd only)

    def __post_init__(self):
        # Accept lists (from JSON or torch.load) and comma-separated strings for the tuple fields.
        for name in ("targets", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            setattr(self, name, tuple(value))
        unknown = [t for t in self.targets if t not in ADAPTABLE]
        checks = [
            (isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}"),
            (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (len(self.targets) > 0, f"targets is empty; choose some of {list(ADAPTABLE)}"),
            (not unknown, f"unknown target(s) {unknown}; valid targets are {list(ADAPTABLE)}"),
            (self.bias in ("none", "all", "lora_only"), f"bias must be none | all | lora_only, got {self.bias!r}"),
            (self.form in ("plain", "svd"), f"form must be plain | svd, got {self.form!r}"),
            (math.isfinite(self.gate_init), f"gate_init must be a finite number, got {self.gate_init}"),
            (self.gate_penalty >= 0, f"gate_penalty must be >= 0 (it is a penalty), got {self.gate_penalty}"),
            (isinstance(self.gate_x_dims, int) and self.gate_x_dims >= 0,
             f"gate_x_dims must be an integer >= 0, got {self.gate_x_dims!r}"),
            (math.isfinite(self.gate_lr_mult) and self.gate_lr_mult > 0,
             f"gate_lr_mult must be a finite number > 0, got {self.gate_lr_mult}"),
            (self.ortho_gamma >= 0, f"ortho_gamma must be >= 0 (it is a penalty), got {self.ortho_gamma}"),
            (0.0 <= self.beta1 < 1.0, f"beta1 must be in [0, 1), got {self.beta1}"),
            (0.0 <= self.beta2 < 1.0, f"beta2 must be in [0, 1), got {self.beta2}"),
        ]
        if self.allocation:   # the schedule's own numbers; the fit to the training length is checked later
            checks += [
                (isinstance(self.target_r, int) and self.target_r >= 1,
                 f"target_r must be an integer >= 1, got {self.target_r!r}"),
                (self.target_r <= self.r,
                 f"target_r ({self.target_r}) is above the initial rank r ({self.r}): allocation only removes "
                 f"rank components, so the target budget cannot exceed the initial one; lower target_r or raise r"),
                (self.t_init >= 0, f"t_init must be >= 0, got {self.t_init}"),
                (self.t_final >= 0, f"t_final must be >= 0, got {self.t_final}"),
                (self.delta_t >= 1, f"delta_t must be >= 1, got {self.delta_t}"),
            ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"AdapterConfig: {message}")

    @property
    def method(self) -> str:
        """The name in METHODS that these three fields spell, or "custom"."""
        key = dict(form=self.form, allocation=self.allocation, gating=self.gating)
        return next((name for name, preset in METHODS.items() if preset == key), "custom")

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        """Build a config from a saved dict, naming any key this version does not know.

        A dict saved before gate_x_dims existed reads as gate_x_dims = 0, the gate it was trained with
        (z only), not as today's default.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"AdapterConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**{"gate_x_dims": 0, **d})


def config_for_method(name: str, **overrides) -> AdapterConfig:
    """An AdapterConfig for one of METHODS, with any other fields overridden (e.g. r=16, target_r=8).

    The method's own switches (form, allocation, gating) may be passed only with the method's value.
    """
    if name not in METHODS:
        raise ValueError(f"unknown adapter method {name!r}; choose one of {list(METHODS)}")
    preset = METHODS[name]
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
# ordinary weight of the same shape, so the adapted model runs at exactly the base model's speed.
#
# The same module also carries the two dynamic mechanisms of chapters 2 and 3. They enter the forward pass
# only through an r-vector that multiplies z = A x component-wise, so the general form computed here is
#
#     h = W0 x + b + s * B diag(c * g(x)) A x,
#
# where c in R^r is static (the allocation mask m, times lambda in AdaLoRA's form, times a frozen gate) and
# g(x) in [0,1]^r is the per-token gate, computed by a separate module (chapter 2's RankGate, which apply_lora
# builds and hands to the layer). Plain LoRA has neither, and its forward pass contains no extra op.

class LoRALinear(nn.Module):
    """A frozen nn.Linear (`self.base`) plus a low-rank update: h = W0 x + b + s * B diag(c * g(x)) A dropout(x).

    Plain LoRA (form="plain", masked=False, gate=None) is h = W0 x + b + s * B A dropout(x), with

      - A (r x d_in) ~ Kaiming-uniform(a = sqrt(5)), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)): nn.Linear's own
        default, which keeps each z_i = A_i x of the same size whatever d_in is. A must be random: the
        gradient of B is s * delta z^T (delta = dL/dh), which would be zero forever if A were zero too.
      - B (d_out x r) = 0, so that s B A = 0 at step 0: training starts exactly at the pretrained function,
        and the first update of B is the steepest direction of the loss through the (random) subspace A.
      - s = alpha / r, or alpha / sqrt(r) with use_rslora. With 1/r the update's size shrinks as r grows
        (LoRA tuned alpha once and kept it for every r); Kalajdzievski (2023, rsLoRA) shows 1/sqrt(r) is the
        factor that keeps the update's scale stable in r, so that larger ranks actually learn more.

    The adapter is computed as (x A^T) B^T, never by materialising B A (d_out x d_in) in the forward pass.
    Cost per token: 2 r (d_in + d_out) FLOPs, against 2 d_in d_out for W0 -- for r = 8 and d_in = d_out = 384,
    12,288 against 294,912 FLOPs, 4.2%.

    The dynamic parts (chapters 2 and 3), present only when asked for:
      - form="svd" (AdaLoRA): a vector lambda (`lora_E`, peft's name) with dW = s B diag(lambda) A.
      - masked=True: a 0/1 buffer `mask` m; rank component i is switched off by m_i = 0.
      - gate: a module (`self.gate`, None when not gated) mapping z = A x (..., r) and the adapter's input x
        (..., d_in) to per-token gates g(x) (..., r) -- RankGate of chapter 2, or any module with its interface. Once frozen, its static
        vector `gate.frozen_mean` joins the coefficients c instead.

    merge() / unmerge() fold the update into W0 and back; they must be called explicitly (nothing happens
    in train() or eval()).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 form: str = "plain", masked: bool = False, gate: nn.Module | None = None, name: str = ""):
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
        if gate is not None and getattr(gate, "r", r) != r:
            raise ValueError(f"{label}: the gate has rank {gate.r} but the layer has rank r={r}")
        self.name = name
        self.base = base
        self.base.requires_grad_(False)
        self.d_in, self.d_out, self.r = d_in, d_out, r
        self.form, self.masked = form, masked
        # s uses the initial rank and never changes, also when allocation switches components off: the
        # surviving components keep the scale they were trained with (AdaLoRA does the same).
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(d_out, r, **factory))
        if form == "plain":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # random: B's gradient s delta z^T is nonzero
            nn.init.zeros_(self.lora_B)                             # dW = 0: start at the pretrained function
        else:
            # AdaLoRA's init: A and B ~ N(0, 0.02), lambda = 0. dW = 0 through lambda; A and B must be random
            # so that lambda's gradient, s (B_i . delta)(A_i . x) summed over tokens (delta = dL/dh), is nonzero.
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
            self.lora_E = nn.Parameter(torch.zeros(r, **factory))
        if masked:
            # All components start active; RankAllocator rewrites the mask. Persistent: saved with the adapter.
            self.register_buffer("mask", torch.ones(r, **factory))
        self.gate = gate                                     # a submodule: its tensors are saved as gate.*
        self.merged = False

    # -- the forward pass --------------------------------------------------------------------------------

    def static_coefficients(self) -> torch.Tensor | None:
        """The input-independent r-vector c of dW = s B diag(c) A: m, lambda, a frozen gate, or their product.

        None for plain LoRA (and for an unmasked layer with a live gate), whose forward pass then has no
        extra op.
        """
        coef = None
        if self.form == "svd":
            coef = self.lora_E
        if self.masked:
            coef = self.mask if coef is None else coef * self.mask
        if self.gate is not None and self.gate.is_frozen:
            coef = self.gate.frozen_mean if coef is None else coef * self.gate.frozen_mean
        return coef

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)                                   # (..., d_in) @ (d_in, d_out) -> (..., d_out)
        if self.merged:
            return out                                       # the update already lives in base.weight
        A = self.lora_A
        coef = self.static_coefficients()
        if coef is not None:
            # Scaling row i of A by c_i equals scaling z_i: the r x d_in multiply costs the same whatever the
            # batch size, and z then arrives already masked, so a switched-off component is exactly 0 below
            # (also as an input of the gate).
            A = A * coef[:, None]                            # (r, d_in) * (r, 1) -> (r, d_in)
        x = self.dropout(x)
        z = F.linear(x, A)                                   # (..., d_in) @ (d_in, r) -> (..., r)
        if self.gate is not None and not self.gate.is_frozen:
            z = z * self.gate(z, self.mask if self.masked else None, x)  # (..., r) * (..., r): z_i scaled by g_i(x)
        # out + s * z B^T as a single GEMM (addmm with beta = 1, alpha = s): the adapter adds no separate
        # scaling or addition pass over the (..., d_out) output.
        out2d = out.reshape(-1, self.d_out)                  # (..., d_out) -> (N, d_out), a view
        z2d = z.reshape(-1, self.r)                          # (..., r) -> (N, r), a view
        y = torch.addmm(out2d, z2d, self.lora_B.t(), alpha=self.scaling)  # (N, r) @ (r, d_out) + (N, d_out)
        return y.view(out.shape)                             # (N, d_out) -> (..., d_out)

    # -- merging -------------------------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """The update dW = s B diag(c) A as a (d_out x d_in) matrix (for merging; not used in forward)."""
        if self.gate is not None and not self.gate.is_frozen:
            raise RuntimeError(f"{self.name or 'layer'}: a gated layer's update s B diag(g(x)) A depends on the "
                               f"input x, so it has no single weight to merge; call freeze_gates(model, batches) "
                               f"first to replace each gate by its average")
        A = self.lora_A
        coef = self.static_coefficients()
        if coef is not None:
            A = A * coef[:, None]                            # (r, d_in) * (r, 1) -> (r, d_in)
        # In the weights' own precision even inside a bf16 autocast block: a merged weight must not depend on
        # the precision the forward passes happened to run in.
        with torch.autocast(A.device.type, enabled=False):
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
        """W0 <- W0 - dW: back to the separate form (W0 is restored up to float rounding). Raises if not merged.

        The same dW must be subtracted as was added, so A, B, the mask and the gate must not change while
        merged: train only unmerged layers (RankAllocator.step refuses merged ones).
        """
        if not self.merged:
            raise RuntimeError(f"{self.name or 'layer'} is not merged; unmerging would subtract an update that "
                               f"was never added")
        self.base.weight -= self.delta_weight()
        self.merged = False

    # -- helpers for chapter 3 ----------------------------------------------------------------------------

    def orthogonality_penalty(self) -> torch.Tensor:
        """AdaLoRA's regulariser (||A A^T - I||_F^2 + ||B^T B - I||_F^2) / r, over all r components.

        The squared norms are AdaLoRA's; the division by r is ours, so that ortho_gamma weighs the penalty
        per component the same way for every r. Keeping A's rows and B's columns near orthonormal makes
        B diag(lambda) A close to a singular value decomposition: the components are independent
        directions, lambda_i alone carries the size of component i, and switching one off removes one
        direction without disturbing the others.
        """
        eye = torch.eye(self.r, device=self.lora_A.device, dtype=self.lora_A.dtype)
        AAt = self.lora_A @ self.lora_A.t()                  # (r, d_in) @ (d_in, r) -> (r, r)
        BtB = self.lora_B.t() @ self.lora_B                  # (r, d_out) @ (d_out, r) -> (r, r)
        return ((AAt - eye).square().sum() + (BtB - eye).square().sum()) / self.r

    def active_components(self) -> int:
        return int(self.mask.sum().item()) if self.masked else self.r

    def extra_repr(self) -> str:
        parts = [f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scaling={self.scaling:g}"]
        if self.form == "svd":
            parts.append("form=svd")
        if self.masked:
            parts.append("masked")
        if self.merged:
            parts.append("merged")
        return ", ".join(parts)


def adapter_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model with its module name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _config_of(model: nn.Module) -> AdapterConfig:
    config = getattr(model, "adapter_config", None)
    if config is None:
        raise ValueError("this model has no adapters; call apply_lora(model, config) first")
    return config


def _is_saved_module(name: str, config: AdapterConfig) -> bool:
    """Whether a parameter name lies inside one of config.modules_to_save (matched by module name)."""
    return any(part in config.modules_to_save for part in name.split(".")[:-1])


def _is_trained_bias(plain_name: str, config: AdapterConfig) -> bool:
    """Whether config.bias makes this parameter (named as in the un-adapted model) trainable."""
    parts = plain_name.split(".")
    if parts[-1] != "bias":
        return False
    return config.bias == "all" or (config.bias == "lora_only" and len(parts) > 1 and parts[-2] in config.targets)


def apply_lora(model: nn.Module, config: AdapterConfig, gate_class: type[nn.Module] | None = None) -> nn.Module:
    """Wrap the target projections of every block in LoRALinear and freeze everything else (in place).

    Trainable afterwards: the adapters (A, B, and lambda / gate parameters where the method has them), the
    modules named in config.modules_to_save (the classification head: it is new, so it must train), and the
    biases selected by config.bias. Returns the model; count_parameters(model) gives (trainable, total).
    The config is kept as model.adapter_config (regularization_loss and save_adapter read it).

    With config.gating, each layer gets its own gate, gate_class(r, config.gate_init, device=, dtype=):
    RankGate (chapter 2) unless another gate module is given.
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
    gate_class = gate_class or RankGate                      # chapter 2's class, looked up at call time
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        gate = None
        if config.gating:
            gate = gate_class(config.r, config.gate_init, d_in=linear.in_features, x_dims=config.gate_x_dims,
                              device=linear.weight.device, dtype=linear.weight.dtype)
        layer = LoRALinear(linear, config.r, config.alpha, config.dropout, config.use_rslora, form=config.form,
                           masked=config.allocation, gate=gate, name=name)
        setattr(parent, attr, layer)
    for _, layer in adapter_layers(model):
        for key, p in layer.named_parameters():            # A, B (lambda, gate.*): not the frozen base
            if not key.startswith("base."):
                p.requires_grad_(True)
    for name, p in model.named_parameters():
        plain = name.replace(".base.", ".")
        if _is_saved_module(name, config) or _is_trained_bias(plain, config):
            p.requires_grad_(True)
    model.adapter_config = config
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight is counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_adapters(model: nn.Module):
    """merge() every adapter in place (see LoRALinear.merge)."""
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge_adapters(model: nn.Module):
    """unmerge() every adapter in place (see LoRALinear.unmerge)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """A plain copy of the model: every adapter replaced by an nn.Linear holding W0 + dW.

    The input model is not modified. The copy has no adapters, no masks, no frozen flags (every parameter
    has requires_grad=True, as in a freshly built model) and runs at the base model's speed. Masks and
    lambda enter dW; a gated layer must first get a static gate from freeze_gates(), else this raises.
    """
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


# -- Adapter-only files --------------------------------------------------------------------------------------
#
# An adapter file holds what fine-tuning changed -- a few hundred KB -- and a fingerprint of the backbone it
# was trained on, so that it cannot be silently applied to another one: per frozen tensor, its shape and two
# checksums (sum of |w| and of w^2, in float64). Comparing per tensor (rather than one hash) lets the error
# say what differs; comparing checksums with a tolerance (1e-4 relative) lets the same weights pass on
# another device, where float sums round differently.

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file stores: every tensor fine-tuning owns or changed.

    That is each LoRALinear's own parameters and buffers (A, B, lambda, mask, and the gate's: gate.*),
    the modules_to_save (the head), and the biases config.bias trains. The frozen backbone is left out.
    """
    config = _config_of(model)
    prefixes = [name + "." for name, _ in adapter_layers(model)]
    state = {}
    for key, value in model.state_dict().items():
        owner = next((p for p in prefixes if key.startswith(p)), None)
        in_adapter = owner is not None and not key.startswith(owner + "base.")
        plain = key.replace(".base.", ".") if owner is not None else key
        if in_adapter or _is_saved_module(key, config) or _is_trained_bias(plain, config):
            state[key] = value
    return state


def backbone_fingerprint(model: nn.Module, config: AdapterConfig) -> dict:
    """{parameter name: (shape, sum |w|, sum w^2)} over the frozen backbone, named as in the plain model.

    Works on the plain model and on the adapted one (where W0 lives at '<layer>.base.weight'), so a file's
    fingerprint can be checked before the adapters are applied.
    """
    prefixes = [name + "." for name, _ in adapter_layers(model)]
    if any(layer.merged for _, layer in adapter_layers(model)):
        raise ValueError("the adapters are merged into the backbone weights; call unmerge_adapters(model) first")
    out = {}
    for name, p in model.named_parameters():
        owner = next((pre for pre in prefixes if name.startswith(pre)), None)
        if owner is not None and not name.startswith(owner + "base."):
            continue                                            # an adapter parameter
        plain = name.replace(".base.", ".") if owner is not None else name
        if _is_saved_module(plain, config) or _is_trained_bias(plain, config):
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


def save_adapter(path, model: nn.Module, config: AdapterConfig | None = None, extra: dict | None = None) -> Path:
    """Write {"format", "config", "state", "backbone", "extra"} to path with torch.save, atomically.

    The file is first written to a temporary file in the same folder and then renamed over path, so a crash
    never leaves a half-written adapter. `extra` is any small dict of plain values (numbers, strings, lists,
    dicts, tensors): metrics, the task, the allocator's state. Adapters must be unmerged.
    """
    path = Path(path)
    config = config or _config_of(model)
    if config != _config_of(model):
        raise ValueError("save_adapter: the config given differs from the one the adapters were built with "
                         "(model.adapter_config)")
    payload = {
        "format": ADAPTER_FORMAT,
        "config": asdict(config),
        "state": {k: v.detach().cpu().clone() for k, v in adapter_state_dict(model).items()},
        "backbone": backbone_fingerprint(model, config),
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_adapter(path, model: nn.Module, gate_class: type[nn.Module] | None = None, payload: dict | None = None
                 ) -> tuple[nn.Module, AdapterConfig, dict]:
    """Apply an adapter file to a plain model with the same backbone: returns (model, config, extra).

    The model is adapted in place (apply_lora with the file's config and gate_class), then the file's
    tensors are loaded, so the result computes exactly what the model that was saved computed. A file that
    does not fit the backbone -- other shapes, other n_layer, or the same shapes with other weights -- raises
    ValueError naming the file and the first difference; so does a file of an older format.

    payload: the file's contents, already read by the caller (runs.read_torch_file, which names a damaged
    file); path then only names the file in messages. Without it the file is read here (weights_only).
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
    if adapter_layers(model):
        raise ValueError(f"{path}: load_adapter expects the plain backbone, but this model already has adapters")
    config = AdapterConfig.from_dict(payload["config"])
    difference = _fingerprint_difference(payload["backbone"], backbone_fingerprint(model, config))
    if difference:
        raise ValueError(f"adapter file {path} does not fit this model: {difference}")
    apply_lora(model, config, gate_class)
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


# ---------------------------------------------------------------------------------------------------------
# Chapter 2. Input-driven rank gating
# ---------------------------------------------------------------------------------------------------------
#
# The paper: "Another gain in flexibility arises from the consideration of the input feature distribution,
# which helps the model generalize better when faced with complicated and diverse datasets." It does not say
# how. Our concrete form gives each of the r rank components a gate that depends on the token:
#
#     z = A x in R^r                                  (already computed by LoRA)
#     q = P x in R^p                                  (P: p x d_in, p = gate_x_dims, 1 by default)
#     g(x) = sigmoid(W_g [z; q] + c) in [0,1]^r       (W_g: r x (r + p), c: r)
#     dW x = s * B diag(m * g(x)) A x                 (m: the allocation mask of chapter 3, 1 without allocation)
#
# so a token uses as many components as its gates open: its "effective rank" is #{i : m_i g_i > 0.5}.
# Nearest relatives: SoRA (Ding et al. 2023) puts a gate vector between A and B and drives it to exact
# zeros with a proximal L1 step, but its gate is one vector for all inputs; SMoRA (Zhao et al. 2025) treats
# each rank as an expert and routes every token to its top-k ranks. Ours sits between them: SMoRA's per-token
# choice, with a soft sigmoid gate trained by plain backpropagation plus an L1-style penalty as in SoRA.
#
# Why per token rather than per sequence. The LoRA update is already applied token by token, so a per-token
# gate needs no pooling; and in a causal model no position has seen the whole sequence before the last
# token, so a per-sequence gate would have to be computed from the future (or from the first tokens only).
#
# Why the gate reads x through its own projection, not only z. The first version read z alone,
# g = sigmoid(W_g z + c): z is computed anyway and W_g z costs only 2 r^2 FLOPs. But z holds only what the
# update reads, and the feature that decides WHICH components a token needs need not be among those. The
# known-answer benchmark (planted.py, scenario "input") plants exactly that case: a teacher whose k
# components are switched on for one kind of token or the other, the kind being a direction of x that
# the components do not read. Measured there (cpu preset at random init, q_proj and v_proj, r = k = 4,
# 300 steps, seeds 0-2; held-out relative distillation error, 1 = learned nothing, static LoRA 0.488; the
# mutual information between the open-gate pattern and the kind, out of 1 bit; the lines are in
# results/planted.jsonl and results/planted_studies/, the table in results/planted_studies/summary.md),
# the z-only gate stays close to a static switch:
#
#     gate                                         error    MI (bit)   error with gates frozen to their mean
#     z only, penalty 0.05 (the former default)    0.429    0.20       0.558
#     z only, penalty 0                            0.416    0.23       0.535
#     [z; P x], p = 1, penalty 0.05                0.392    0.28       0.593
#     [z; P x], p = 2, penalty 0.05                0.367    0.32       0.573
#     [z; P x], p = 1, penalty 0                   0.313    0.33       0.584
#     [z; P x], p = 2, penalty 0.01                0.297    0.34       0.562
#     [z; P x], p = 1, penalty 0.01 (the default)  0.319    0.33       0.583   (5 seeds: 0.341, 0.32 bit)
#
# Reading x is what the gate lacked; the penalty (below) is what kept it from using it. p = 1 and p = 2 are
# within the seed-to-seed spread (sd 0.03) of each other, so the default is the cheaper, p = 1. The same
# gate trained 900 steps instead of 300 reaches 0.200 against LoRA's 0.478 (one seed): it is still learning
# at 300 steps, static LoRA is at its optimum. Where the data asks for no input dependence it costs little:
# +0.007 to LoRA's error in the homogeneous scenario (the former gate +0.048) and +0.012 in the
# heterogeneous one (+0.004). Tried and dropped in exploratory runs (2 seeds each, not kept): a full r x d_in
# map V x started at 0 (0.555: at width 384 its per-entry Adam steps make V x noisy and the gates shut),
# P = 0 with W_g's columns random (0.509), hard 0/1 gates with a straight-through gradient as in SMoRA
# (0.508 reading z, 0.474 reading [z; P x]), and p = 4 without penalty (0.283, like p = 1 and 2). P starts
# random (Kaiming-uniform, as A) and W_g at 0, like LoRA's A and B: at step 0 the gate is the constant
# sigmoid(c) and the layer is LoRA times a constant, and W_g's first gradient, delta q^T, is nonzero.
# gate_x_dims = 0 is the z-only gate (and what an adapter file from before this field loads as).
#
# Why c = gate_init = 1 at the start. c = 1 opens the gates to 0.73, above the 0.5 at which a component
# counts as used, at a point where the sigmoid's slope g (1 - g) = 0.20 is near its maximum 0.25, so the
# gradient reaches c almost undamped. A larger c would keep the gates open through a whole run: Adam moves a
# parameter by about the learning rate per step, whatever the size of its gradient, so a bias started at
# c = 3 (0.95) needs some 3,000 steps at lr 1e-3 to reach 0 -- several times the 250-800 optimizer steps of
# a small GLUE task here -- while from c = 1 a gate can close within a run. (At c = 10 the slope would be
# 4.5e-5: the gate could hardly learn at all.)
#
# Why the gates may need their own learning rate (gate_lr_mult). The same arithmetic bounds a short run: in
# T steps at learning rate lr the bias moves by about T x lr, so the 125 steps of the smollm2 suite at 1e-3 can
# take c from 1 to 0.875 at most (a gate of 0.71), and W_g, started at 0, grows no faster. There the gates
# stayed a constant of about 0.73 (the README's gates table), which says nothing about whether input-driven
# rank helps: the gates could not move. gate_lr_mult gives W_g, c and P their own learning rate. Notebook 3
# measures it on SmolLM2-135M (SST-2, 1,000 sentences, 63 steps, one seed): at 30 x lr the gates move within
# the run, to a per-layer pattern with some per-token variation, and the penalty then sets the rank. The
# default stays 1 (the method as the suites ran it) until a grid measures the multiplier.
#
# Cost per token and layer (gate_flops_per_token): 2 p d_in for P x, 2 r (r + p) for W_g [z; q], r for + c,
# 4 r for the sigmoid (negate, exp, add 1, divide) and r for z * g, in all 2 p d_in + 2 r (r + p) + 6 r,
# against 2 r (d_in + d_out) for LoRA and 2 d_in d_out for W0. For r = 8, p = 1 and d = 384: 768 + 144 + 48
# = 960 FLOPs, 7.8% of LoRA's 12,288 and 0.33% of W0's 294,912 (the z-only gate: 176). Adapting q and v of
# the 4-layer 384-wide GPT, the gates add about 0.05% to the model's forward matmul FLOPs (LoRA itself adds
# 0.7%), within the paper's "0.1% more resources than standard LoRA".
#
# Sparsity pressure. Without it nothing asks a gate to close, so the loss gets a penalty
#
#     lambda_g * mean of m_i g_i(x) over positions, components and gated layers,
#
# the L1 norm of the (non-negative) gates, averaged. Each forward pass records its layer's mean in
# RankGate.last_mean; regularization_loss() collects them. The mean runs over all positions of the
# batch, padding included (the layer cannot tell pads apart); with right padding and a causal model the
# pads never influence the real tokens, so this only dilutes the penalty by the share of pads.
#
# Why lambda_g = 0.01 (it was 0.05). The update s B diag(g) A z is unchanged when g shrinks by a factor and
# B grows by it, but the penalty is not: it can always be lowered at no cost to the fit, so it keeps pushing
# the gates down into the flat lower end of the sigmoid (slope g (1 - g) ~ g), where a gate learns slowly,
# while its component still acts through a larger B. On the benchmark, 0.05 cost the x-reading gates most
# of their gain (error 0.392 and 0.367 at p = 1, 2 against 0.319 and 0.297 at 0.01) and cost the former gate
# 0.048 against LoRA where every component is needed (homogeneous scenario); 0.01 is as good as no penalty
# there (0.313 at p = 1) and keeps some pressure towards closing what the data does not use.
#
# Inference. A gated update depends on x, so it cannot be merged into W0. freeze_gates() measures each
# gate's average g_bar = E[g(x)] on calibration data and uses it as a static vector: dW = s B diag(m g_bar) A
# merges like LoRA. Whether that costs accuracy is an empirical question: evaluate before and after
# freeze_gates().
#
# All of the gate lives in one module, RankGate: its parameters, the function g, the penalty's record, the
# hook of the statistics and the frozen vector. LoRALinear only calls it. Another gate is another module --
# a subclass of RankGate with its own forward -- passed to apply_lora(model, config, gate_class=...).

def _aside_generator() -> torch.Generator:
    """A CPU generator seeded from the global random stream without advancing it: what is drawn from it leaves
    every later draw of the global stream as it would have been. (A copy of the global generator gives one
    number, the seed of a fresh generator, so its stream does not repeat the numbers A will be drawn from.)"""
    copy = torch.Generator().set_state(torch.get_rng_state())
    return torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=copy)) ^ 0x5DEECE66D)


class RankGate(nn.Module):
    """The input-driven gate of one adapted layer: g = sigmoid(W_g [z; P x] + c) in [0,1]^r, per token, with
    z = A x the layer's rank components and P x (p = x_dims learned directions of the input) what the gate
    reads of x beyond them.

    Parameters: `weight` W_g (r x (r + p)) = 0, `bias` c (r,) = init (config.gate_init), and, when p > 0,
    `proj` P (p x d_in), Kaiming-uniform like A; so every token starts with the same gates sigmoid(init).
    With x_dims = 0 it is the z-only gate sigmoid(W_g z + c). LoRALinear calls gate(z, mask, x) -> g (..., r)
    and scales z by it; the rest of the gate is kept here:

      - the penalty's record: each forward pass leaves `last_mean`, the mean of m * g (see record());
      - the statistics hook: `recorder`, a callable (g, mask) that gate_statistics() and gate_values() set
        while they run;
      - the static form: freeze(mean_gate) stores g_bar in the buffer `frozen_mean` and sets the 0-d bool
        buffer `frozen`. LoRALinear then skips the gate and multiplies A by frozen_mean. The buffers are
        what gets saved; the Python flag `is_frozen` is what LoRALinear reads on every forward pass (no
        device sync), set from the buffer again after load_state_dict.

    Another gate function: subclass, override forward(z, mask=None, x=None) (keeping its call to
    record(g, mask)), and pass the class to apply_lora(..., gate_class=...); it is built as
    gate_class(r, init, d_in=, x_dims=, device=, dtype=). If its parameters differ, override
    active_parameter_count and flops_per_token too.
    """

    def __init__(self, r: int, init: float = 1.0, d_in: int = 0, x_dims: int = 0, device=None, dtype=None):
        super().__init__()
        if x_dims and d_in < 1:
            raise ValueError(f"RankGate: a gate reading x_dims={x_dims} projections of x needs the layer's d_in")
        factory = dict(device=device, dtype=dtype)
        self.r, self.x_dims = r, x_dims
        self.weight = nn.Parameter(torch.zeros(r, r + x_dims, **factory))       # W_g over [z; P x]
        self.bias = nn.Parameter(torch.full((r,), float(init), **factory))      # c
        if x_dims:
            # P is random, as A is, so that W_g has something to learn from. It is drawn from a generator of
            # its own (_aside_generator), so that A and everything drawn after the gate are the same numbers
            # as in a LoRA model of the same seed: "same seed, same initialisation" holds for gate vs lora.
            proj = torch.empty(x_dims, d_in)
            nn.init.kaiming_uniform_(proj, a=math.sqrt(5), generator=_aside_generator())
            self.proj = nn.Parameter(proj.to(**factory))                         # P
        self.register_buffer("frozen_mean", torch.ones(r, **factory))
        self.register_buffer("frozen", torch.tensor(False, device=device))
        self.register_load_state_dict_post_hook(RankGate._after_load)
        self.is_frozen = False
        self.last_mean = None      # written by record(), read and cleared by regularization_loss()
        self.recorder = None       # set by gate_statistics() / gate_values() while their block runs

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        """g (..., r) for the rank components z (..., r) of the layer input x (..., d_in); mask (r,) is the
        layer's allocation mask, or None."""
        if self.x_dims:
            z = torch.cat([z, F.linear(x, self.proj)], dim=-1)    # (..., r) ++ (..., p) -> (..., r + p)
        g = torch.sigmoid(F.linear(z, self.weight, self.bias))    # (..., r + p) @ (r + p, r) + (r,) -> (..., r)
        self.record(g, mask)
        return g

    def record(self, g: torch.Tensor, mask: torch.Tensor | None):
        """Keep what the gate penalty and the gate statistics need from this forward pass.

        `last_mean` = mean over positions and components of m * g (m = 1 without allocation), a 0-d tensor
        attached to the autograd graph; regularization_loss() reads and clears it. Each forward pass
        overwrites it, so call regularization_loss after each forward pass whose loss you backpropagate.
        """
        per_component = g.reshape(-1, self.r).float().mean(0)    # (..., r) -> (N, r) -> (r,), in fp32 under autocast
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
        """After load_state_dict: copy the saved `frozen` buffer into the Python flag LoRALinear reads."""
        module._sync_frozen_flag()

    def _sync_frozen_flag(self):
        self.is_frozen = bool(self.frozen)
        if self.is_frozen:
            self.requires_grad_(False)       # W_g and c are no longer used by the forward pass

    def active_parameter_count(self, k: int) -> int:
        """The gate's parameters that touch k active components: k (k + p) entries of W_g (its rows of the
        active components, their columns of z and all p columns of P x), k of c, and all p d_in of P."""
        return k * (k + self.x_dims) + k + (self.proj.numel() if self.x_dims else 0)

    @staticmethod
    def flops_per_token(r: int, d_in: int = 0, x_dims: int = 0) -> int:
        """FLOPs of one gate for one token: P x (2 p d_in), W_g [z; P x] (2 r (r + p)), + c (r), the sigmoid
        (4 r: negate, exp, add 1, divide) and z * g (r)."""
        return 2 * x_dims * d_in + 2 * r * (r + x_dims) + 6 * r

    def extra_repr(self) -> str:
        return f"r={self.r}" + (f", x_dims={self.x_dims}" if self.x_dims else "") + (", frozen" if self.is_frozen else "")


def gate_flops_per_token(r: int, d_in: int = 0, x_dims: int = 0) -> int:
    """FLOPs of a RankGate of rank r for one token (RankGate.flops_per_token): 2 p d_in + 2 r (r + p) + 6 r;
    176 for r = 8 reading z only (p = 0)."""
    return RankGate.flops_per_token(r, d_in, x_dims)


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
    about the token's label or kind (`train.py gates`, the known-answer benchmark's gate columns).

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


def live_gates(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The adapted layers whose gate is live (input-driven, not frozen), with their names, in module order.

    These are the layers that regularization_loss() penalises, gate_statistics() records and freeze_gates()
    freezes; each one's rank is layer.r and its gate layer.gate.
    """
    return [(n, m) for n, m in adapter_layers(model) if m.gate is not None and not m.gate.is_frozen]


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the live gates (W_g, c and P of every RankGate), in module order: the ones
    train.make_optimizer gives the learning rate gate_lr_mult x lr."""
    return [p for _, m in live_gates(model) for p in m.gate.parameters() if p.requires_grad]


@contextmanager
def _recording(model: nn.Module, collector, pad_id: int | None, who: str):
    """Hand every live gate's values to collector.add(name, g, mask) for the forward passes run inside the
    block; with pad_id, set collector.position_mask from the model's first forward argument (the token ids)
    by a hook that exists only inside the block."""
    layers = live_gates(model)
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
    with _recording(model, GateStats(threshold), pad_id, "gate_statistics") as stats:
        yield stats


@contextmanager
def gate_values(model: nn.Module, pad_id: int | None = None):
    """Collect GateValues over the forward passes run inside the `with` block:

        with gate_values(model, pad_id=config.pad_id) as values:
            for idx, y in dev_batches: model(idx)
        values.values()               # {layer: (N, k) effective gates at the real positions}

    pad_id leaves padding positions out, as in gate_statistics(); run it under torch.no_grad() and model.eval().
    """
    with _recording(model, GateValues(), pad_id, "gate_values") as values:
        yield values


def freeze_gates(model: nn.Module, batches, pad_id: int | None = None) -> GateStats:
    """Replace every input-driven gate by its average over calibration data, so the model can be merged.

    batches: an iterable of token-id tensors (B, T), or of tuples whose first element is one (e.g. a loader
    of (idx, y)). They are run in eval mode under torch.no_grad(); the model's train/eval mode is restored
    afterwards. With pad_id, padding positions are left out of the average. Returns the GateStats measured
    (train.py can log them). Afterwards dW = s B diag(m * g_bar) A and merge()/merge_and_unload() work.
    """
    layers = live_gates(model)
    if not layers:
        raise ValueError("freeze_gates: the model has no input-driven gates to freeze")
    was_training = model.training
    model.eval()
    try:
        with gate_statistics(model, pad_id=pad_id) as stats, torch.no_grad():
            for batch in batches:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        model.train(was_training)
    means = stats.mean_gate()
    for name, layer in layers:
        if name not in means or stats.layers[name]["positions"] == 0:
            raise ValueError(f"freeze_gates: no calibration positions reached {name}; pass at least one batch")
        layer.gate.freeze(means[name].to(layer.gate.frozen_mean))
    return stats


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """The method's penalties, to add to the task loss: gate sparsity (chapter 2) + orthogonality (chapter 3).

        lambda_g * mean over live gates of gate.last_mean       (gating methods; see RankGate.record)
      + gamma * mean over adapted layers of orthogonality_penalty()   (form "svd")

    Returns a 0-d tensor (zero for plain LoRA and allocation in the plain form). It reads and clears each
    gated layer's record of the last forward pass, so it must follow a forward pass of the model, once.
    """
    config = _config_of(model)
    layers = adapter_layers(model)
    device = layers[0][1].lora_A.device
    total = torch.zeros((), device=device)
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
# unique demands of each individual task". Our concrete form is AdaLoRA's (Zhang et al. 2023):
#
# Components and masks. Each adapted layer has r rank components (row i of A, column i of B, and lambda_i in
# the svd form) and a 0/1 mask m: dW = s B diag(m) A ("plain") or s B diag(lambda * m) A ("svd"). The plain
# form keeps LoRA's init and exact starting point, so that alloc-vs-lora isolates the effect of allocation;
# the svd form is AdaLoRA's (lambda plays the singular values, kept meaningful by the orthogonality penalty).
# Masking never zeroes A, B or lambda, so a switched-off component keeps its weights and can come back.
#
# Importance. Per parameter, the sensitivity I = |theta * dL/dtheta| is the first-order change of the loss
# if theta were set to zero. It is noisy from batch to batch, so AdaLoRA smooths it and weighs it by its
# uncertainty:
#
#     I_bar <- beta1 I_bar + (1 - beta1) I              (smoothed sensitivity)
#     U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|     (uncertainty, with the I_bar just updated)
#     score = I_bar * U_bar
#
# and a component's score is S_i = mean_j score(A_ij) + mean_j score(B_ji) (+ score(lambda_i) in the svd
# form), computed by importance_score(), the one function to change to try another score. A layer's
# importance, for plots, is sum_i S_i.
#
# A switched-off component has gradient exactly 0 (it does not act), so its sensitivity is unobservable.
# peft's AdaLoRA meets this differently: it zeroes lambda_i only at reallocation steps, and in between
# lambda_i trains again from zero (so between reallocations more than b(t) components act). We keep the
# mask in place, so exactly b(t) components act at all times, and our choice is: the EMAs of a switched-off
# component stay frozen at their values when it was switched off. If they kept updating with I = 0, its
# score would shrink geometrically (I_bar by 0.85 per step) and it could practically never return;
# frozen, it returns as soon as an active component's score drops below it. (A switched-off component's A and B receive zero
# gradients; only AdamW's fading momentum and its weight decay -- a factor 1 - lr x wd per step, 1 - 1e-5 at
# lr 1e-3, wd 0.01 -- still move them.)
#
# Budget. The budget b(t) counts active components over ALL adapted layers. With b0 = r n, b_T = target_r n
# (n adapted layers) and T optimizer steps:
#
#     t <= t_init:                 b0, no masking (warm-up: scores form, nothing is switched off)
#     t_init < t <= T - t_final:   b_T + (b0 - b_T) (1 - (t - t_init) / (T - t_final - t_init))^3, rounded
#                                  down (exact integer arithmetic); reallocate when (t - t_init) is a
#                                  multiple of delta_t, and at t = T - t_final, where the budget reaches b_T
#     t > T - t_final:             b_T, masks frozen (the final components fine-tune undisturbed)
#
# A reallocation keeps the b(t) components with the highest scores over all layers -- exactly b(t), ties
# going to the earlier layer and component -- so rank moves from layers whose components matter little to
# layers whose components matter much. The cubic (from Zhu & Gupta's gradual pruning, adopted by AdaLoRA)
# removes most components early, while the survivors still have many steps to adapt, and changes little
# near the end.

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
    """(b(t), whether to reallocate at step t) for the cubic schedule above; t counts optimizer steps from 1.

    A pure function of its arguments. The cubic term is computed in integers,
    (b0 - b_T) (D - k)^3 // D^3 with D = T - t_final - t_init and k = t - t_init, so the rounding is exact.
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


def importance_score(ipt: dict[str, torch.Tensor], unc: dict[str, torch.Tensor]) -> torch.Tensor:
    """One layer's component scores S (r,) from its EMAs:

        S_i = mean_j s(A_ij) + mean_j s(B_ji) (+ s(lambda_i) in the svd form),   s = I_bar * U_bar.

    ipt and unc hold the layer's EMAs I_bar and U_bar per parameter: "A" (r, d_in), "B" (d_out, r), and "E"
    (r,) for lambda in the svd form. RankAllocator ranks components by this score and nothing else.
    """
    s = {k: ipt[k] * unc[k] for k in ipt}                  # per parameter, same shapes as the EMAs
    scores = s["A"].mean(1) + s["B"].mean(0)               # (r, d_in) -> (r,) and (d_out, r) -> (r,)
    if "E" in s:
        scores = scores + s["E"]                           # (r,)
    return scores


class RankAllocator:
    """Importance scores and the rank budget for the masked layers of a model (chapter 3).

    Call order, once per optimizer step t = 1, 2, ..., total_steps:

        loss.backward(); optimizer.step(); allocator.step(t); optimizer.zero_grad()

    step(t) reads each adapter parameter and its .grad, so it must come before zero_grad. It checks the
    mistakes it can see: no adapter parameter has a gradient (called after zero_grad, or before backward),
    t not increasing (called twice for one step), and merged adapters. A parameter whose .grad is None (it did not take part
    in the loss) counts as sensitivity 0. Construct it after moving the model to its device.
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
        self.initial_budget = sum(m.r for _, m in self.layers)
        self.target_budget = config.target_r * len(self.layers)
        check_schedule(total_steps, config.t_init, config.t_final, config.delta_t,
                       self.initial_budget, self.target_budget)
        # Per layer and parameter ("A", "B", and "E" for lambda): the EMAs, same shape as the parameter.
        self.ipt = {name: {k: torch.zeros_like(p) for k, p in self._params(m).items()} for name, m in self.layers}
        self.unc = {name: {k: torch.zeros_like(p) for k, p in self._params(m).items()} for name, m in self.layers}
        self.last_step = 0
        # One dict per reallocation: step, budget, ranks {layer: int}, importance {layer: float}.
        self.history = []

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
        c = self.config
        budget, reallocate = budget_schedule(t, self.total_steps, self.initial_budget, self.target_budget,
                                             c.t_init, c.t_final, c.delta_t)
        if t <= self.total_steps - c.t_final:      # masks can still move: keep the scores current
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
            # x.lerp_(y, w) is x <- x + w (y - x) = (1 - w) x + w y: with w = 1 - beta the EMA update, with
            # w = 0 no change. The weight is 1 - beta on active components and 0 on switched-off ones, which
            # keep their EMAs (their gradient is 0 by construction; see above). In place, a few ops per
            # parameter: this runs at every optimizer step.
            w1, w2 = (1 - b1) * m.mask, (1 - b2) * m.mask                    # (r,) each; the mask is 0/1
            for key, p in self._params(m).items():
                ipt, unc = self.ipt[name][key], self.unc[name][key]
                sens = (p * p.grad).abs_() if p.grad is not None else torch.zeros_like(p)  # I, same shape as p
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

    def state_dict(self) -> dict:
        """Everything needed to resume: the EMAs, the last step and the history (the masks live in the model)."""
        return {"last_step": self.last_step, "total_steps": self.total_steps,
                "layers": [name for name, _ in self.layers],
                "ipt": {n: {k: v.clone() for k, v in d.items()} for n, d in self.ipt.items()},
                "unc": {n: {k: v.clone() for k, v in d.items()} for n, d in self.unc.items()},
                "history": copy.deepcopy(self.history)}

    def load_state_dict(self, state: dict):
        names = [name for name, _ in self.layers]
        if state["layers"] != names:
            raise ValueError(f"RankAllocator.load_state_dict: the state is for layers {state['layers'][:3]}..., "
                             f"this model has {names[:3]}...")
        if state["total_steps"] != self.total_steps:
            raise ValueError(f"RankAllocator.load_state_dict: the state was made for {state['total_steps']} total "
                             f"steps, this allocator for {self.total_steps}")
        for which in ("ipt", "unc"):
            for n in names:
                for k, v in state[which][n].items():
                    getattr(self, which)[n][k].copy_(v)
        self.last_step = state["last_step"]
        self.history = copy.deepcopy(state["history"])


def active_parameter_count(model: nn.Module) -> int:
    """Adapter parameters of the active components: the "same final trainable budget" count.

    Per layer with k active components: k (d_in + d_out) for A's rows and B's columns, + k for lambda (svd
    form), + the live gate's parameters that touch active components (RankGate.active_parameter_count:
    k (k + p) + k + p d_in, the rows of W_g over the active z and all of P x, the entries of c, and P). The
    head and trainable biases are the same for every method and are not counted.
    """
    total = 0
    for _, m in adapter_layers(model):
        k = m.active_components()
        total += k * (m.d_in + m.d_out)
        if m.form == "svd":
            total += k
        if m.gate is not None and not m.gate.is_frozen:
            total += m.gate.active_parameter_count(k)
    return total
