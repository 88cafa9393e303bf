"""
gpt2.py -- OpenAI's GPT-2 weights, from a local Hugging Face folder, as a backbone folder of this repository.

    python train.py import-gpt2 --gpt2-dir ~/models/gpt2 --out-dir runs/gpt2      # once: convert
    python train.py finetune --backbone runs/gpt2 --task SST-2 --method lora       # then use it like any backbone
    python train.py pretrain --init runs/gpt2 --out-dir runs/gpt2-glue             # or continue pretraining

The folder is what the Hugging Face hub serves for "gpt2" (and distilgpt2, gpt2-medium, ...): config.json,
the weights in model.safetensors or pytorch_model.bin, and tokenizer.json. The output is what
runs.load_backbone reads: backbone.pt (our GPTConfig and state dict) and tokenizer.json.

What this file holds, in order:
  1. Reading the files  -- config.json, a small reader of the .safetensors format (no extra package), or
                           pytorch_model.bin through torch.load(weights_only=True).
  2. The weights        -- convert_weights: GPT-2's names and layouts into model.py's, every shape checked.
  3. The tokenizer      -- convert_tokenizer: GPT-2's byte-level BPE with our four special tokens in front.
  4. import_gpt2        -- both, written as a backbone folder.

The weights. GPT-2 and model.py compute the same function (pre-LN blocks, learned positions, tanh GELU,
LayerNorm eps 1e-5, tied LM head), stored differently:

  GPT-2 (Hugging Face name)        shape (Conv1D: in x out)   model.py                    shape (Linear: out x in)
  wte.weight, wpe.weight           (V, d), (P, d)             wte.weight, wpe.weight      same
  h.i.ln_1 / h.i.ln_2 / ln_f       (d,)                       blocks.i.ln_1 / ln_2, ln_f  same
  h.i.attn.c_attn.weight           (d, 3d) = [q | k | v]      blocks.i.attn.{q,k,v}_proj  3 x (d, d), each transposed
  h.i.attn.c_attn.bias             (3d,)                      ..._proj.bias               3 x (d,)
  h.i.attn.c_proj.weight           (d, d)                     blocks.i.attn.o_proj        transposed
  h.i.mlp.c_fc.weight              (d, 4d)                    blocks.i.mlp.fc_in          (4d, d), transposed
  h.i.mlp.c_proj.weight            (4d, d)                    blocks.i.mlp.fc_out         (d, 4d), transposed
  h.i.attn.bias, h.i.attn.masked_bias                         (skipped: the causal mask as a buffer, not a weight)
  lm_head.weight (when present)                               (skipped: it is wte, tied)

GPT-2's Conv1D computes x @ W + b with W stored (in, out); nn.Linear computes x @ W^T + b with W stored
(out, in). So each Conv1D weight is transposed, and c_attn's output columns [0, d), [d, 2d), [2d, 3d) are
the query, key and value projections. Names may carry a "transformer." prefix (GPT2LMHeadModel files).

The tokenizer. data.py needs <pad>, <sep>, <cls>, <eos> at ids 0, 1, 2, 3 (it pads with 0 and checks the
four ids when it loads a tokenizer). GPT-2's vocabulary has only <|endoftext|> (id 50256 in GPT-2), so the
converted tokenizer puts <pad>, <sep>, <cls> at 0, 1, 2, <|endoftext|> (renamed <eos>, its role here too)
at 3, and every other token, in GPT-2's order, from 4 on (<|endoftext|> is GPT-2's last id, so every
other GPT-2 id t becomes t + 4). The merges, the byte-level pre-tokenizer and the decoder are GPT-2's
own, so a text splits into exactly GPT-2's tokens.
The embedding rows are permuted the same way (the LM head is tied, so its logits are GPT-2's, permuted),
and the three new tokens get new rows: <sep> starts as <|endoftext|>'s row, GPT-2's own boundary between
texts; <cls> and <pad> start as the mean of all rows, which keeps a new token's embedding inside the
distribution the network has seen (Hewitt 2021, "Initializing new word embeddings"). With adapters the
embeddings stay frozen, so these rows stay as they are; the model reads its prediction at <cls>, the last
position, which attends to the whole input. No change to data.py is needed.

Where to get the files: https://huggingface.co/openai-community/gpt2/tree/main (config.json,
model.safetensors, tokenizer.json; about 550 MB), e.g. `huggingface-cli download openai-community/gpt2
config.json model.safetensors tokenizer.json --local-dir ~/models/gpt2`, or from any machine with the
transformers cache (~/.cache/huggingface/hub/models--gpt2/snapshots/<hash>/).
"""

import json
from pathlib import Path

import torch

import data
import runs
from model import GPT, GPTConfig

EOT = "<|endoftext|>"
NEW_SPECIALS = (data.PAD, data.SEP, data.CLS)         # ids 0, 1, 2; <|endoftext|> becomes data.EOS at id 3
SHIFT = 4                                             # first new id of GPT-2's ordinary tokens


class GPT2FormatError(ValueError):
    """A GPT-2 folder or file that cannot be converted, explained in one line."""


# ---------------------------------------------------------------------------------------------------------
# 1. Reading the files
# ---------------------------------------------------------------------------------------------------------

# The .safetensors format: 8 bytes (little-endian u64) giving the length N of a JSON header; the header
# maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, byte offsets into the data
# that follows the header (plus an optional "__metadata__" entry); the data is raw little-endian values.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, read with the format's definition above."""
    path = Path(path)
    blob = path.read_bytes()
    try:
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + n])
        base = 8 + n
        out = {}
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
        raise GPT2FormatError(f"{path}: not a readable .safetensors file ({err}); download it again") from None
    return out


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict in model.safetensors (preferred) or pytorch_model.bin, and the file it came from."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = folder / name
        if path.is_file():
            if name.endswith(".safetensors"):
                return read_safetensors(path), path
            try:
                return torch.load(path, map_location="cpu", weights_only=True), path
            except Exception as err:              # torch.load raises RuntimeError, UnpicklingError, EOFError, ...
                raise GPT2FormatError(f"{path}: not a readable PyTorch checkpoint ({str(err).splitlines()[0]}); "
                                      f"download it again") from None
    raise FileNotFoundError(f"--gpt2-dir {folder}: neither model.safetensors nor pytorch_model.bin there; put "
                            f"the Hugging Face GPT-2 files in it (see gpt2.py for where to get them)")


def read_config(folder: Path) -> dict:
    """config.json, checked for the variants of GPT-2 that model.py cannot compute."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--gpt2-dir {folder}: no config.json there; it is needed for n_head, which the "
                                f"weights do not determine")
    cfg = json.loads(path.read_text())
    expected = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
                "scale_attn_by_inverse_layer_idx": (False,), "scale_attn_weights": (True,), "n_inner": (None,)}
    for key, allowed in expected.items():
        value = cfg.get(key, allowed[0])
        if key == "n_inner" and value == 4 * cfg.get("n_embd", 0):
            continue
        if value not in allowed:
            raise GPT2FormatError(f"{path}: {key} = {value!r}, but model.py computes GPT-2 with {key} in "
                                  f"{list(allowed)}; this checkpoint is another architecture")
    if "n_head" not in cfg:
        raise GPT2FormatError(f"{path}: no n_head; is it a GPT-2 config.json?")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# 2. The weights
# ---------------------------------------------------------------------------------------------------------

def convert_weights(hf: dict[str, torch.Tensor], n_head: int, where: str = "the GPT-2 file") -> tuple[GPTConfig, dict]:
    """(GPTConfig, model.py state dict) from a GPT-2 state dict in Hugging Face's names and layouts.

    The sizes come from the weights (d and V from wte, the context length from wpe, the depth from the
    h.<i> blocks); n_head from config.json. Every tensor's shape is checked; a missing, misshaped or
    unknown tensor raises GPT2FormatError naming it. The vocabulary keeps GPT-2's order here;
    permute_vocabulary applies the tokenizer's new order.
    """
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    for key in ("wte.weight", "wpe.weight"):
        if key not in hf:
            raise GPT2FormatError(f"{where}: tensor {key!r} is missing; is this a GPT-2 checkpoint?")
    V, d = hf["wte.weight"].shape
    P = hf["wpe.weight"].shape[0]
    n_layer = len({k.split(".")[1] for k in hf if k.startswith("h.")})
    used = set()

    def take(key: str, shape: tuple) -> torch.Tensor:
        if key not in hf:
            raise GPT2FormatError(f"{where}: tensor {key!r} is missing (a GPT-2 with {n_layer} blocks of width "
                                  f"{d} has it); the file is incomplete or not GPT-2")
        t = hf[key]
        if tuple(t.shape) != shape:
            raise GPT2FormatError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape} for a "
                                  f"GPT-2 of width {d}, vocabulary {V}, context {P}")
        used.add(key)
        return t.float()

    out = {"wte.weight": take("wte.weight", (V, d)), "wpe.weight": take("wpe.weight", (P, d))}
    for i in range(n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[b + ln + ".weight"] = take(h + ln + ".weight", (d,))
            out[b + ln + ".bias"] = take(h + ln + ".bias", (d,))
        qkv_w = take(h + "attn.c_attn.weight", (d, 3 * d))             # (d, 3d): x @ W gives [q | k | v]
        qkv_b = take(h + "attn.c_attn.bias", (3 * d,))
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[b + f"attn.{name}.weight"] = qkv_w[:, j * d:(j + 1) * d].t().contiguous()  # (d, d) in x out -> out x in
            out[b + f"attn.{name}.bias"] = qkv_b[j * d:(j + 1) * d].clone()
        out[b + "attn.o_proj.weight"] = take(h + "attn.c_proj.weight", (d, d)).t().contiguous()
        out[b + "attn.o_proj.bias"] = take(h + "attn.c_proj.bias", (d,))
        out[b + "mlp.fc_in.weight"] = take(h + "mlp.c_fc.weight", (d, 4 * d)).t().contiguous()     # -> (4d, d)
        out[b + "mlp.fc_in.bias"] = take(h + "mlp.c_fc.bias", (4 * d,))
        out[b + "mlp.fc_out.weight"] = take(h + "mlp.c_proj.weight", (4 * d, d)).t().contiguous()  # -> (d, 4d)
        out[b + "mlp.fc_out.bias"] = take(h + "mlp.c_proj.bias", (d,))
    out["ln_f.weight"] = take("ln_f.weight", (d,))
    out["ln_f.bias"] = take("ln_f.bias", (d,))
    skipped = {k for k in hf if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight"}
    unknown = sorted(set(hf) - used - skipped)
    if unknown:
        raise GPT2FormatError(f"{where}: unexpected tensor {unknown[0]!r} ({len(unknown)} in all); model.py "
                              f"computes plain GPT-2 only")
    if d % n_head:
        raise GPT2FormatError(f"{where}: n_head {n_head} does not divide the width {d}")
    config = GPTConfig(vocab_size=V, block_size=P, n_layer=n_layer, n_head=n_head, n_embd=d, bias=True, pad_id=0)
    return config, out


def permute_vocabulary(config: GPTConfig, state: dict, order: list[int]) -> tuple[GPTConfig, dict]:
    """Reorder the embedding rows into the converted tokenizer's ids (see the file's docstring).

    order: GPT-2's ids in the new order of ids 3, 4, 5, ... (<|endoftext|> first). The rows of <pad>,
    <sep>, <cls> (ids 0, 1, 2) are new. Returns the config with the new vocabulary size and the state dict
    with the new wte (and the tied lm_head).
    """
    wte = state["wte.weight"]                                          # (V, d), GPT-2's order
    if len(order) != wte.shape[0]:
        raise GPT2FormatError(f"the tokenizer has {len(order)} tokens but wte has {wte.shape[0]} rows; use the "
                              f"tokenizer.json that came with the weights")
    mean = wte.mean(0, keepdim=True)                                   # (V, d) -> (1, d)
    eot = wte[order[0]:order[0] + 1]                                   # (1, d)
    new_rows = {data.PAD: mean, data.SEP: eot, data.CLS: mean}
    new_wte = torch.cat([new_rows[t] for t in NEW_SPECIALS] + [wte[torch.tensor(order)]])  # (V + 3, d)
    state = {**state, "wte.weight": new_wte, "lm_head.weight": new_wte}
    config = GPTConfig(**{**config.to_dict(), "vocab_size": new_wte.shape[0]})
    return config, state


# ---------------------------------------------------------------------------------------------------------
# 3. The tokenizer
# ---------------------------------------------------------------------------------------------------------

def convert_tokenizer(path: Path) -> tuple[str, list[int]]:
    """(tokenizer.json text for data.load_tokenizer, order) from GPT-2's tokenizer.json.

    order lists GPT-2's ids in the order of the new ids 3, 4, 5, ...: <|endoftext|> first, then every other
    token by increasing GPT-2 id. Everything but the vocabulary and the special tokens is GPT-2's own.
    """
    if not path.is_file():
        raise FileNotFoundError(f"--gpt2-dir {path.parent}: no tokenizer.json there; download it with the weights")
    spec = json.loads(path.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "vocab" not in model:
        raise GPT2FormatError(f"{path}: not a byte-level BPE tokenizer.json (GPT-2's)")
    vocab = dict(model["vocab"])
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    if EOT not in specials and EOT not in vocab:
        raise GPT2FormatError(f"{path}: no {EOT} token; is it GPT-2's tokenizer?")
    eot_id = specials.get(EOT, vocab.get(EOT))
    others = set(specials) - {EOT}
    if others:
        raise GPT2FormatError(f"{path}: special tokens {sorted(others)} besides {EOT}; expected GPT-2's tokenizer")
    vocab.pop(EOT, None)
    regular = sorted(vocab.values())
    order = [eot_id] + regular
    position = {old: SHIFT + k for k, old in enumerate(regular)}      # GPT-2 id -> new id
    new_vocab = {token: position[i] for token, i in vocab.items()}
    for i, token in enumerate(NEW_SPECIALS + (data.EOS,)):
        new_vocab[token] = i
    model["vocab"] = dict(sorted(new_vocab.items(), key=lambda item: item[1]))
    spec["model"] = model
    spec["added_tokens"] = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True}
                            for i, token in enumerate(NEW_SPECIALS + (data.EOS,))]
    return json.dumps(spec, ensure_ascii=False), order


# ---------------------------------------------------------------------------------------------------------
# 4. Import
# ---------------------------------------------------------------------------------------------------------

def import_gpt2(gpt2_dir, out_dir) -> Path:
    """Convert a Hugging Face GPT-2 folder into a backbone folder (backbone.pt, tokenizer.json, config.json)."""
    folder, out = Path(gpt2_dir), Path(out_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"--gpt2-dir {folder}: no such folder; download GPT-2 first (see gpt2.py)")
    hf_config = read_config(folder)
    tok_text, order = convert_tokenizer(folder / "tokenizer.json")
    weights, weights_path = read_weights(folder)
    config, state = convert_weights(weights, hf_config["n_head"], where=str(weights_path))
    config, state = permute_vocabulary(config, state, order)
    model = GPT(config)
    model.load_state_dict(state)                    # every key present, every shape right: checked above
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / runs.TOKENIZER_FILE
    runs.atomic_write_text(tok_path, tok_text)
    data.load_tokenizer(tok_path)                   # checks the four special ids
    runs.save_backbone(out, config, model.state_dict(), {"model": config.to_dict(), "gpt2": str(folder)},
                       source=str(folder))
    print(f"import-gpt2: {model.num_params():,} parameters ({config.n_layer} blocks, width {config.n_embd}, "
          f"{config.vocab_size} tokens) from {weights_path} -> {out / runs.BACKBONE_FILE}")
    return out
