"""
model.py -- a GPT, written to be read top to bottom; a few config switches turn it into a Llama.

What this file holds, in order:
  1. GPTConfig      -- the hyperparameters, with named presets ("nano" for tests, "cpu" for the default
                       recipe on a laptop CPU, "gpt2" for the 124M-parameter GPT-2 shape, "smollm2-135m" for
                       the Llama-architecture SmolLM2-135M). The switches, each defaulting to GPT-2:
                         norm            layernorm | rmsnorm            (Llama: rmsnorm, no biases)
                         pos             learned | rope                 (learned position table, or rotary q/k)
                         n_kv_head       grouped-query attention        (0 = n_head, plain multi-head)
                         mlp             gelu | swiglu, width mlp_hidden (0 = 4 * n_embd)
                         tie_embeddings  lm_head shares the token embedding, or has its own weight
  2. The blocks     -- RMSNorm, rotary position embedding (RoPE), causal self-attention (separate q/k/v/o
                       projections, optionally with fewer key/value heads), the GELU MLP and the SwiGLU MLP,
                       a pre-norm residual block.
  3. GPT            -- token embedding (+ a learned position embedding unless pos = rope), the blocks, a final
                       norm and a language-model head (tied to the token embedding by default).
                       forward(idx, targets=None) -> (logits, loss).
  4. GPTClassifier  -- the same body with a sequence-classification head for GLUE: the hidden state of the
                       last real (non-pad) token is pooled, as GPT does, and mapped to k class logits (or to
                       1 number for STS-B regression). forward(idx, targets=None) -> (logits, loss).
  5. FLOP counting  -- the matmul FLOPs of a training step, used to report achieved FLOP/s.

The q/k/v/o projections are four separate nn.Linear layers rather than GPT-2's fused c_attn. A fused layer
is marginally faster, but LoRA adapts individual projections (the LoRA paper adapts W_q and W_v), and with
separate layers each one is a module that dynlora.py can wrap by name. The module names are the same for
every configuration (ln_1, ln_2, ln_f whatever the norm; attn.{q,k,v,o}_proj; wte; lm_head) except the
MLP's: fc_in / fc_out for GELU, gate_proj / up_proj / down_proj (Llama's names) for SwiGLU.
"""

import math
from dataclasses import dataclass, fields, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------------------

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")


@dataclass
class GPTConfig:
    vocab_size: int = 8192   # number of token ids; set from the tokenizer when pretraining
    block_size: int = 128    # longest sequence the model covers (position table / rotary cache length)
    n_layer: int = 4         # number of transformer blocks
    n_head: int = 6          # attention (query) heads per block; must divide n_embd
    n_embd: int = 384        # width of the residual stream
    dropout: float = 0.0     # dropout on attention weights and residual branches (0 = off)
    bias: bool = True        # biases in Linear and LayerNorm layers, as in GPT-2 (Llama has none)
    pad_id: int = 0          # id of the padding token (data.py puts <pad> at id 0)
    norm: str = "layernorm"  # normalisation layers: layernorm (GPT-2) | rmsnorm (Llama; weight only)
    norm_eps: float = 1e-5   # epsilon added to the variance (LayerNorm) or mean square (RMSNorm)
    pos: str = "learned"     # positions: learned (GPT-2's table wpe) | rope (rotary q/k, no table; Llama)
    rope_theta: float = 10000.0  # rotary base: pair i of a head turns at theta^(-2i/head_dim) rad per position
    n_kv_head: int = 0       # key/value heads for grouped-query attention (0 = n_head); must divide n_head
    mlp: str = "gelu"        # MLP: gelu (fc_in, fc_out; GPT-2) | swiglu (gate_proj, up_proj, down_proj; Llama)
    mlp_hidden: int = 0      # MLP width (0 = 4 * n_embd)
    tie_embeddings: bool = True  # lm_head shares wte's weight; False: its own lm_head.weight

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads, n_kv_head with 0 read as n_head."""
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        """The MLP width, mlp_hidden with 0 read as 4 * n_embd."""
        return self.mlp_hidden or 4 * self.n_embd

    def __post_init__(self):
        heads = max(self.n_head, 1)
        checks = [
            (self.vocab_size > 0, f"vocab_size must be > 0, got {self.vocab_size}"),
            (self.block_size > 0, f"block_size must be > 0, got {self.block_size}"),
            (self.n_layer > 0, f"n_layer must be > 0, got {self.n_layer}"),
            (self.n_head > 0, f"n_head must be > 0, got {self.n_head}"),
            (self.n_embd > 0 and self.n_embd % heads == 0,
             f"n_head ({self.n_head}) must divide n_embd ({self.n_embd}); e.g. use n_embd={self.n_head * 64}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (0 <= self.pad_id < self.vocab_size, f"pad_id ({self.pad_id}) must be a valid token id < vocab_size"),
            (self.norm in NORMS, f"norm must be one of {list(NORMS)}, got {self.norm!r}"),
            (math.isfinite(self.norm_eps) and self.norm_eps > 0,
             f"norm_eps must be finite and > 0, got {self.norm_eps}"),
            (self.pos in POSITIONS, f"pos must be one of {list(POSITIONS)}, got {self.pos!r}"),
            (math.isfinite(self.rope_theta) and self.rope_theta > 0,
             f"rope_theta must be finite and > 0, got {self.rope_theta}"),
            (self.pos != "rope" or (self.n_embd // heads) % 2 == 0,
             f"pos='rope' needs an even head dim n_embd / n_head, got {self.n_embd} / {self.n_head}"),
            (0 <= self.n_kv_head and heads % max(self.n_kv_head, 1) == 0,
             f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}); 0 means n_head"),
            (self.mlp in MLPS, f"mlp must be one of {list(MLPS)}, got {self.mlp!r}"),
            (self.mlp_hidden >= 0, f"mlp_hidden must be >= 0 (0 = 4 * n_embd), got {self.mlp_hidden}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GPTConfig: {message}")

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Build a config from a saved dict, naming any key this version does not know.

        Keys a saved dict lacks take their defaults, which are GPT-2's choices: a config saved before the
        Llama switches existed loads as the model it was.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown keys {unknown} in saved config; known keys are {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # A few thousand parameters: for unit tests, runs in milliseconds.
    "nano": dict(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32),
    # The default recipe: pretrains and fine-tunes in minutes on a 2-core CPU (7.1M parameters in the blocks,
    # 3.2M in the embeddings). A width of 384 keeps each matmul large enough to run near the CPU's matmul
    # peak; at 256 the fixed cost of the 8192-way softmax of the LM loss takes a third of a pretraining step.
    "cpu": dict(vocab_size=8192, block_size=128, n_layer=4, n_head=6, n_embd=384),
    # GPT-2 small (124M), the shape of the public checkpoint.
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    # SmolLM2-135M (HuggingFaceTB, Apache-2.0), a Llama-architecture model: RMSNorm, rotary positions,
    # grouped-query attention (9 query heads share 3 key/value heads), a SwiGLU MLP, no biases, tied
    # embeddings. 134,515,008 parameters; the checkpoint importer sets vocab_size and pad_id.
    "smollm2-135m": dict(vocab_size=49152, block_size=2048, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                         mlp_hidden=1536, norm="rmsnorm", norm_eps=1e-5, pos="rope", rope_theta=100000.0,
                         mlp="swiglu", bias=False, tie_embeddings=True),
}


def preset(name: str, **overrides) -> GPTConfig:
    """A named GPTConfig, optionally with some fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------------------
# 2. The blocks
# ---------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich 2019), Llama's norm, over the last dimension:

        y = x / sqrt(mean(x^2) + eps) * weight

    Unlike LayerNorm it neither subtracts the mean nor adds a bias; weight starts at 1. As in Llama, the
    mean square is computed in float32 and the normalised x cast back to the input dtype before the weight.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (B, T, d) * (B, T, 1)
        return self.weight * y.to(x.dtype)                                      # (d,) * (B, T, d)


def make_norm(config: GPTConfig) -> nn.Module:
    """The normalisation layer the config asks for: LayerNorm (with bias if config.bias) or RMSNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_cache(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for positions 0 .. length-1, each (length, head_dim).

    Pair i (i = 0 .. head_dim/2 - 1) turns at frequency f_i = theta^(-2i / head_dim), so at position m its
    angle is m * f_i. Llama's "rotate_half" layout pairs coordinate i with coordinate i + head_dim/2, so
    both halves of each row hold the same angles: row m = (m f_0, .., m f_{hd/2-1}, m f_0, .., m f_{hd/2-1}).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)             # (length, hd/2)
    angles = torch.cat([angles, angles], dim=-1)                                           # (length, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) of x (..., T, hd) with cos, sin (T, hd) from rope_cache.

    Each pair (x_i, x_{i+hd/2}) at position m is rotated by its angle a = m f_i:

        x_i'        = x_i cos a - x_{i+hd/2} sin a
        x_{i+hd/2}' = x_{i+hd/2} cos a + x_i sin a

    i.e. x' = x * cos + rotate_half(x) * sin with rotate_half(x1, x2) = (-x2, x1). Rotations compose, so
    <rope(q, m), rope(k, n)> = <q, rope(k, n - m)>: the attention score sees only the relative position.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)                       # (..., T, hd/2) each
    rotated = torch.cat([-x2, x1], dim=-1)            # (..., T, hd)
    return x * cos + rotated * sin                    # (..., T, hd) * (T, hd) -> (..., T, hd)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends only to positions <= t.

    Per query head h: y_h = softmax(q_h k_h^T / sqrt(hd) + causal mask) v_h, with hd = n_embd / n_head; the
    heads are concatenated and mixed by o_proj.

    Grouped-query attention (Ainslie et al. 2023): with n_kv_head < n_head, k_proj and v_proj map
    d -> n_kv_head * hd, and each key/value head serves g = n_head / n_kv_head consecutive query heads
    (query head h reads key/value head h // g). n_kv_head = n_head is plain multi-head attention. SDPA's
    enable_gqa does the sharing inside the kernel, without materialising the repeated k and v.

    With pos = rope, q and k are rotated by their positions (apply_rope) after the head split.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        d, hd = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, hd
        self.q_proj = nn.Linear(d, d, bias=config.bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * hd, bias=config.bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * hd, bias=config.bias)
        self.o_proj = nn.Linear(d, d, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); rope = (cos, sin), each (T, hd), or None for no rotary embedding."""
        B, T, C = x.shape
        H, Hkv, hd = self.n_head, self.n_kv_head, self.head_dim
        # Projections: (B, T, C) @ (C, C) for q, (B, T, C) @ (C, Hkv*hd) for k and v; then split into heads.
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)      # (B, T, C) -> (B, H, T, hd)
        k = self.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2)    # (B, T, Hkv*hd) -> (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)    # (B, T, Hkv*hd) -> (B, Hkv, T, hd)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # shapes unchanged
        # softmax(q k^T / sqrt(hd) + causal mask) v in one fused kernel; with enable_gqa each of the Hkv k/v
        # heads serves H / Hkv query heads, as if k and v were (B, H, T, hd):
        # (B, H, T, hd) @ (B, H, hd, T) -> (B, H, T, T);  (B, H, T, T) @ (B, H, T, hd) -> (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=Hkv != H)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, hd) -> (B, T, C): heads side by side again
        return self.resid_dropout(self.o_proj(y))  # (B, T, C) @ (C, C) -> (B, T, C)


class MLP(nn.Module):
    """GPT-2's position-wise feed-forward network: fc_out(GELU(fc_in(x))), d -> hidden -> d (hidden = 4d)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.fc_out = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc_in(x), approximate="tanh")  # (B, T, d) @ (d, h) -> (B, T, h); GPT-2's tanh GELU
        return self.dropout(self.fc_out(h))            # (B, T, h) @ (h, d) -> (B, T, d)


class SwiGLU(nn.Module):
    """Llama's gated feed-forward network (Shazeer 2020): down_proj(silu(gate_proj(x)) * up_proj(x)).

    silu(z) = z * sigmoid(z). The gate and the value are two d -> hidden projections multiplied elementwise,
    then down_proj maps hidden -> d: three matrices where GELU's MLP has two, which is why Llama-style
    models use hidden ~ 8d/3 rather than 4d for about the same parameter count.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.down_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, d) @ (d, h) -> (B, T, h), twice, elementwise
        return self.dropout(self.down_proj(h))           # (B, T, h) @ (h, d) -> (B, T, d)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    Normalising the input of each branch (rather than the sum, as the original Transformer did) keeps the
    residual stream an identity path from the embeddings to the head, which is what lets GPT-2 (and Llama,
    with RMSNorm) train stably without learning-rate tricks.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope)
        x = x + self.mlp(self.ln_2(x))
        return x


# ---------------------------------------------------------------------------------------------------------
# 3. The GPT language model
# ---------------------------------------------------------------------------------------------------------

class GPT(nn.Module):
    """A decoder-only transformer language model: forward(idx, targets=None) -> (logits, loss)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        # Learned position embedding (GPT-2); with rotary embeddings positions enter through q and k instead.
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying (Press & Wolf 2017, used by GPT-2 and SmolLM2): the output layer reuses the input
            # embedding, so a token's "read" and "write" vectors are the same; it saves vocab_size * n_embd
            # parameters.
            self.lm_head.weight = self.wte.weight
        if config.pos == "rope":
            # The rotary angles are a function of the config, not learned: buffers that follow .to(device)
            # but stay out of the state dict.
            cos, sin = rope_cache(config.head_dim, config.block_size, config.rope_theta)  # (block_size, hd)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self):
        """GPT-2's initialisation.

        - Linear and Embedding weights ~ N(0, 0.02): small enough that the initial logits are near zero
          (the initial loss is close to log(vocab_size)), large enough for gradients to flow.
        - The two projections that write into the residual stream (attention o_proj, MLP fc_out or
          down_proj) get std 0.02 / sqrt(2 * n_layer): each block adds two such branches, so without the
          scaling the variance of the residual stream would grow with depth.
        - Biases start at zero; the norms start as the identity (weight 1, bias 0, their constructors' values).
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            mlp_out = block.mlp.down_proj if self.config.mlp == "swiglu" else block.mlp.fc_out
            for residual_out in (block.attn.o_proj, mlp_out):
                nn.init.normal_(residual_out.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def hidden_states(self, idx: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states: (B, T) token ids -> (B, T, n_embd); extra (B, T, n_embd), when
        given, is added to the token embeddings (the classifier's trainable <cls> row, readout.py)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}; "
                             f"truncate inputs (e.g. --max-len) or use a config with a larger block_size")
        x = self.wte(idx)                                        # (B, T) -> (B, T, d)
        if extra is not None:
            x = x + extra                                        # (B, T, d) + (B, T, d)
        if self.wpe is not None:
            pos = torch.arange(T, device=idx.device)             # (T,)
            x = x + self.wpe(pos)                                # (B, T, d) + (T, d) -> (B, T, d)
        x = self.drop(x)
        rope = (self.rope_cos[:T], self.rope_sin[:T]) if self.config.pos == "rope" else None  # (T, hd) each
        for block in self.blocks:
            x = block(x, rope)                                   # (B, T, d) -> (B, T, d)
        return self.ln_f(x)                                      # (B, T, d)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) -> logits (B, T, vocab); with targets (B, T) also the mean next-token cross-entropy.

        Target positions equal to -100 are ignored (PyTorch's cross_entropy convention).
        """
        h = self.hidden_states(idx)
        logits = self.lm_head(h)                                 # (B, T, d) @ (d, V) -> (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameter count; a tied lm_head is counted once (it is the token embedding)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------------------
# 4. Sequence classification (GLUE)
# ---------------------------------------------------------------------------------------------------------

class GPTClassifier(nn.Module):
    """A GPT body with a classification (or regression) head: forward(idx, targets=None) -> (logits, loss).

    Pooling. A causal model's last position is the only one that has seen the whole input, so GPT
    (Radford et al. 2018) classifies from the hidden state of the final token -- here an explicit <cls>
    token that data.py appends (by default; readout.py has the other choices). Batches are right-padded: pads
    come *after* the real tokens, and since attention is causal, no real position ever attends to a pad. The
    pooled position is therefore (number of non-pad tokens) - 1 in each row, and padding changes nothing about
    the result.

    Outputs. num_outputs = k class logits trained with cross-entropy, or num_outputs = 1 for regression
    (STS-B similarity scores) trained with mean squared error.
    """

    def __init__(self, config: GPTConfig, num_outputs: int):
        super().__init__()
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1 (1 = regression), got {num_outputs}")
        self.config = config
        self.num_outputs = num_outputs
        self.gpt = GPT(config)
        self.head = nn.Linear(config.n_embd, num_outputs)
        # A small head init keeps the initial predictions near zero, as for the other projections.
        nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.head.bias)
        # None, or a module idx (B, T) -> (B, T, d) added to the token embeddings: readout.TokenRow, the
        # trainable <cls> row of the cls-train readout (the readouts, where the prediction is read, are in readout.py).
        self.cls_row = None

    def pool(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Hidden state of the last non-pad token of each row: (B, T, d), (B, T) -> (B, d)."""
        lengths = (idx != self.config.pad_id).sum(dim=1)         # (B,)
        if (lengths == 0).any():
            raise ValueError("a row of the batch contains only padding; every input needs at least one token")
        last = lengths - 1                                       # (B,) index of the last real token
        return h[torch.arange(h.size(0), device=h.device), last]  # (B, T, d) -> (B, d)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        extra = self.cls_row(idx) if self.cls_row is not None else None
        h = self.gpt.hidden_states(idx, extra)                   # (B, T) -> (B, T, d)
        logits = self.head(self.pool(h, idx))                    # (B, d) @ (d, k) -> (B, k)
        loss = None
        if targets is not None:
            if self.num_outputs == 1:
                logits = logits.squeeze(-1)                      # (B, 1) -> (B,)
                loss = F.mse_loss(logits, targets.float())
            else:
                loss = F.cross_entropy(logits, targets)
        elif self.num_outputs == 1:
            logits = logits.squeeze(-1)                          # (B, 1) -> (B,)
        return logits, loss


# ---------------------------------------------------------------------------------------------------------
# 5. Counting FLOPs
# ---------------------------------------------------------------------------------------------------------

def matmul_flops_per_token(config: GPTConfig, seq_len: int, lm_head: bool = True) -> int:
    """Forward-pass matmul FLOPs per token (a multiply-add counts as 2 FLOPs).

    With d = n_embd, kv = n_kv_head * head_dim (= d without grouped-query attention), h = the MLP width and
    T = seq_len, per block:

        q and o projections      2 * 2 d^2
        k and v projections      2 * 2 d kv
        MLP                      2 * 2 d h   GELU (fc_in, fc_out)
                             or  3 * 2 d h   SwiGLU (gate_proj, up_proj, down_proj)
        attention                2 * 2 T d   scores q k^T and the weighted sum of v, over all query heads

    For GPT-2's shape (kv = d, h = 4d, GELU) the projections and MLP total 24 d^2. The attention term is
    counted for the full T x T square, as PaLM's MFU formula does, although the causal mask makes half of
    it unnecessary; it does not depend on kv, since every query head still scores T keys. The LM head adds
    2 d V. Elementwise work (norms, GELU/SiLU, rotary, softmax, the optimizer) is not counted: it is
    memory-bound and small next to the matmuls.
    """
    d, L, T = config.n_embd, config.n_layer, seq_len
    kv = config.kv_heads * config.head_dim
    mlp_matrices = 3 if config.mlp == "swiglu" else 2
    per_block = 4 * d * d + 4 * d * kv + 2 * mlp_matrices * d * config.hidden + 4 * T * d
    return L * per_block + (2 * d * config.vocab_size if lm_head else 0)


def training_flops(config: GPTConfig, n_tokens: int, seq_len: int, lm_head: bool = True) -> int:
    """Matmul FLOPs of one training step over n_tokens: forward + backward = 3 x forward.

    The backward pass of a matmul computes two products of the forward's size (the gradient with respect
    to the input and to the weight), hence the common factor 3 = 1 + 2.
    """
    return 3 * n_tokens * matmul_flops_per_token(config, seq_len, lm_head)
