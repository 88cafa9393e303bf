"""
model.py -- a GPT, written to be read top to bottom.

What this file holds, in order:
  1. GPTConfig      -- the hyperparameters, with named presets ("nano" for tests, "cpu" for the default
                       recipe on a laptop CPU, "gpt2" for the 124M-parameter GPT-2 shape).
  2. The blocks     -- causal self-attention (separate q/k/v/o projections), the GELU MLP, a pre-LayerNorm
                       residual block.
  3. GPT            -- token + position embeddings, the blocks, a final LayerNorm and a language-model head
                       tied to the token embedding. forward(idx, targets=None) -> (logits, loss).
  4. GPTClassifier  -- the same body with a sequence-classification head for GLUE: the hidden state of the
                       last real (non-pad) token is pooled, as GPT does, and mapped to k class logits (or to
                       1 number for STS-B regression). forward(idx, targets=None) -> (logits, loss).
  5. FLOP counting  -- the matmul FLOPs of a training step, used to report achieved FLOP/s.

The q/k/v/o projections are four separate nn.Linear layers rather than GPT-2's fused c_attn. A fused layer
is marginally faster, but LoRA adapts individual projections (the LoRA paper adapts W_q and W_v), and with
separate layers each one is a module that dynlora.py can wrap by name.
"""

import math
from dataclasses import dataclass, fields, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    vocab_size: int = 8192   # number of token ids; set from the tokenizer when pretraining
    block_size: int = 128    # longest sequence the position embedding covers
    n_layer: int = 4         # number of transformer blocks
    n_head: int = 6          # attention heads per block; must divide n_embd
    n_embd: int = 384        # width of the residual stream
    dropout: float = 0.0     # dropout on attention weights and residual branches (0 = off)
    bias: bool = True        # biases in Linear and LayerNorm layers, as in GPT-2
    pad_id: int = 0          # id of the padding token (data.py puts <pad> at id 0)

    def __post_init__(self):
        checks = [
            (self.vocab_size > 0, f"vocab_size must be > 0, got {self.vocab_size}"),
            (self.block_size > 0, f"block_size must be > 0, got {self.block_size}"),
            (self.n_layer > 0, f"n_layer must be > 0, got {self.n_layer}"),
            (self.n_head > 0, f"n_head must be > 0, got {self.n_head}"),
            (self.n_embd > 0 and self.n_embd % max(self.n_head, 1) == 0,
             f"n_head ({self.n_head}) must divide n_embd ({self.n_embd}); e.g. use n_embd={self.n_head * 64}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (0 <= self.pad_id < self.vocab_size, f"pad_id ({self.pad_id}) must be a valid token id < vocab_size"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GPTConfig: {message}")

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Build a config from a saved dict, naming any key this version does not know."""
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
}


def preset(name: str, **overrides) -> GPTConfig:
    """A named GPTConfig, optionally with some fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------------------
# 2. The blocks
# ---------------------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends only to positions <= t."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.n_embd
        self.n_head = config.n_head
        self.q_proj = nn.Linear(d, d, bias=config.bias)
        self.k_proj = nn.Linear(d, d, bias=config.bias)
        self.v_proj = nn.Linear(d, d, bias=config.bias)
        self.o_proj = nn.Linear(d, d, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_head
        # Each projection: (B, T, C) @ (C, C) -> (B, T, C); then split C into H heads of size C // H.
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, T, C) -> (B, H, T, C/H)
        k = self.k_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, T, C) -> (B, H, T, C/H)
        v = self.v_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, T, C) -> (B, H, T, C/H)
        # softmax(q k^T / sqrt(C/H) + causal mask) v, in one fused kernel:
        # (B, H, T, C/H) @ (B, H, C/H, T) -> (B, H, T, T);  (B, H, T, T) @ (B, H, T, C/H) -> (B, H, T, C/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, C/H) -> (B, T, C): heads side by side again
        return self.resid_dropout(self.o_proj(y))  # (B, T, C) @ (C, C) -> (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward network: d -> 4d -> GELU -> d."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.fc_out = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc_in(x), approximate="tanh")  # (B, T, d) @ (d, 4d) -> (B, T, 4d); GPT-2's tanh GELU
        return self.dropout(self.fc_out(h))            # (B, T, 4d) @ (4d, d) -> (B, T, d)


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x)).

    Normalising the input of each branch (rather than the sum, as the original Transformer did) keeps the
    residual stream an identity path from the embeddings to the head, which is what lets GPT-2 train stably
    without learning-rate tricks.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
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
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embedding
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017, used by GPT-2): the output layer reuses the input embedding, so a
        # token's "read" and "write" vectors are the same; it saves vocab_size * n_embd parameters.
        self.lm_head.weight = self.wte.weight
        self.init_weights()

    def init_weights(self):
        """GPT-2's initialisation.

        - Linear and Embedding weights ~ N(0, 0.02): small enough that the initial logits are near zero
          (the initial loss is close to log(vocab_size)), large enough for gradients to flow.
        - The two projections that write into the residual stream (attention out, MLP out) get
          std 0.02 / sqrt(2 * n_layer): each block adds two such branches, so without the scaling the
          variance of the residual stream would grow with depth.
        - Biases start at zero; LayerNorm starts as the identity (weight 1, bias 0, PyTorch's default).
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for residual_out in (block.attn.o_proj, block.mlp.fc_out):
                nn.init.normal_(residual_out.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final normalised hidden states: (B, T) token ids -> (B, T, n_embd)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}; "
                             f"truncate inputs (e.g. --max-len) or use a config with a larger block_size")
        pos = torch.arange(T, device=idx.device)                 # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))             # (B, T, d) + (T, d) -> (B, T, d)
        for block in self.blocks:
            x = block(x)                                         # (B, T, d) -> (B, T, d)
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
        """Parameter count; the tied lm_head is counted once (it is the token embedding)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------------------
# 4. Sequence classification (GLUE)
# ---------------------------------------------------------------------------------------------------------

class GPTClassifier(nn.Module):
    """A GPT body with a classification (or regression) head: forward(idx, targets=None) -> (logits, loss).

    Pooling. A causal model's last position is the only one that has seen the whole input, so GPT
    (Radford et al. 2018) classifies from the hidden state of the final token -- here an explicit <cls>
    token that data.py appends. Batches are right-padded: pads come *after* the real tokens, and since
    attention is causal, no real position ever attends to a pad. The pooled position is therefore
    (number of non-pad tokens) - 1 in each row, and padding changes nothing about the result.

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

    def pool(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Hidden state of the last non-pad token of each row: (B, T, d), (B, T) -> (B, d)."""
        lengths = (idx != self.config.pad_id).sum(dim=1)         # (B,)
        if (lengths == 0).any():
            raise ValueError("a row of the batch contains only padding; every input needs at least one token")
        last = lengths - 1                                       # (B,) index of the last real token
        return h[torch.arange(h.size(0), device=h.device), last]  # (B, T, d) -> (B, d)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        h = self.gpt.hidden_states(idx)                          # (B, T) -> (B, T, d)
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

    Per block: q, k, v, o projections 4 * 2 d^2, MLP 2 * 2 * 4 d^2 (= 24 d^2 with the above), and attention
    scores plus the weighted sum 2 * 2 * T * d -- counted for the full T x T square, as PaLM's MFU formula
    does, although the causal mask makes half of it unnecessary. The LM head adds 2 * d * V. Elementwise
    work (LayerNorm, GELU, softmax, the optimizer) is not counted: it is memory-bound and small next to
    the matmuls.
    """
    d, L = config.n_embd, config.n_layer
    per_block = 24 * d * d + 4 * seq_len * d
    return L * per_block + (2 * d * config.vocab_size if lm_head else 0)


def training_flops(config: GPTConfig, n_tokens: int, seq_len: int, lm_head: bool = True) -> int:
    """Matmul FLOPs of one training step over n_tokens: forward + backward = 3 x forward.

    The backward pass of a matmul computes two products of the forward's size (the gradient with respect
    to the input and to the weight), hence the common factor 3 = 1 + 2.
    """
    return 3 * n_tokens * matmul_flops_per_token(config, seq_len, lm_head)
