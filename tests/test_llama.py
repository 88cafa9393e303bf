"""Tests of model.py's Llama switches: an independent Llama forward pass, each switch on its own, configs, counts.

llama_reference_logits is a self-contained Llama forward pass (plain torch, Hugging Face's tensor names and
config.json keys) that other test files can import, e.g. to check an imported checkpoint.
"""

import math

import pytest
import torch

from model import (GPT, GPTClassifier, GPTConfig, RMSNorm, apply_rope, matmul_flops_per_token, preset,
                   rope_cache)


# ---------------------------------------------------------------------------------------------------------
# An independent reference: Llama written out with plain torch ops from a Hugging Face-named state dict
# ---------------------------------------------------------------------------------------------------------

def llama_reference_logits(hf_state: dict, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of a Llama model for token ids (B, T), computed in float32.

    hf_state holds Hugging Face Llama names (model.embed_tokens.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj
    .weight, model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.layers.{i}.input_layernorm.weight,
    model.layers.{i}.post_attention_layernorm.weight, model.norm.weight, and lm_head.weight unless tied);
    config holds config.json keys: hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
    rms_norm_eps, rope_theta, tie_word_embeddings. No biases (Llama has none). Depends only on torch.
    """
    w = {name: t.float() for name, t in hf_state.items()}
    d, L, H = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    Hkv = config.get("num_key_value_heads", H)
    hd, eps, theta = d // H, config["rms_norm_eps"], config.get("rope_theta", 10000.0)
    B, T = ids.shape

    def rmsnorm(x, weight):
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight

    # Rotary: coordinates j and j + hd/2 form pair j, turned by angle position * theta^(-2j/hd).
    j = torch.arange(hd // 2, dtype=torch.float32)
    angle = torch.arange(T, dtype=torch.float32)[:, None] * theta ** (-2.0 * j / hd)[None, :]  # (T, hd/2)

    def rotary(x):                                                # (B, heads, T, hd)
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)

    def heads(x, n):                                              # (B, T, n*hd) -> (B, n, T, hd)
        return x.reshape(B, T, n, hd).permute(0, 2, 1, 3)

    future = torch.ones(T, T).triu(diagonal=1).bool()             # (T, T): key position > query position
    x = w["model.embed_tokens.weight"][ids]                       # (B, T, d)
    for i in range(L):
        p = f"model.layers.{i}."
        h = rmsnorm(x, w[p + "input_layernorm.weight"])
        q = rotary(heads(h @ w[p + "self_attn.q_proj.weight"].T, H))
        k = rotary(heads(h @ w[p + "self_attn.k_proj.weight"].T, Hkv))
        v = heads(h @ w[p + "self_attn.v_proj.weight"].T, Hkv)
        k = k.repeat_interleave(H // Hkv, dim=1)                  # kv head g serves query heads g*(H/Hkv) ..
        v = v.repeat_interleave(H // Hkv, dim=1)                  # (B, H, T, hd)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)        # (B, H, T, T)
        scores = scores.masked_fill(future, float("-inf"))
        probs = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        probs = probs / probs.sum(dim=-1, keepdim=True)
        att = (probs @ v).permute(0, 2, 1, 3).reshape(B, T, d)    # (B, T, d)
        x = x + att @ w[p + "self_attn.o_proj.weight"].T
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rmsnorm(x, w["model.norm.weight"])
    tied = config.get("tie_word_embeddings", False)
    head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    return x @ head.T                                             # (B, T, vocab)


def hf_to_ours(hf_state: dict, config: dict) -> dict:
    """The same weights under model.py's state-dict names."""
    rename = {"self_attn.": "attn.", "input_layernorm.": "ln_1.", "post_attention_layernorm.": "ln_2.",
              "mlp.": "mlp."}
    embed = hf_state["model.embed_tokens.weight"]
    out = {"wte.weight": embed, "ln_f.weight": hf_state["model.norm.weight"],
           "lm_head.weight": embed if config["tie_word_embeddings"] else hf_state["lm_head.weight"]}
    for name, t in hf_state.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            prefix = next(p for p in rename if rest.startswith(p))
            out[f"blocks.{i}.{rename[prefix]}{rest[len(prefix):]}"] = t
    return out


def our_config(config: dict, **overrides) -> GPTConfig:
    """model.py's GPTConfig for a Hugging Face Llama config dict."""
    return GPTConfig(vocab_size=config["vocab_size"], block_size=config["max_position_embeddings"],
                     n_layer=config["num_hidden_layers"], n_head=config["num_attention_heads"],
                     n_kv_head=config["num_key_value_heads"], n_embd=config["hidden_size"],
                     mlp_hidden=config["intermediate_size"], norm="rmsnorm", norm_eps=config["rms_norm_eps"],
                     pos="rope", rope_theta=config["rope_theta"], mlp="swiglu", bias=False,
                     tie_embeddings=config["tie_word_embeddings"], **overrides)


def tiny_hf_config(**overrides) -> dict:
    return {"vocab_size": 101, "max_position_embeddings": 32, "num_hidden_layers": 2, "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": True, **overrides}


def random_hf_state(config: dict, seed: int = 0) -> dict:
    """Random Llama weights: matrices with std 1/sqrt(fan_in) (embeddings 1/sqrt(d), so logits are O(1)),
    norm weights near 1 but not equal to it (so applying them matters)."""
    g = torch.Generator().manual_seed(seed)
    d, hd = config["hidden_size"], config["hidden_size"] // config["num_attention_heads"]
    kv, f, V = config["num_key_value_heads"] * hd, config["intermediate_size"], config["vocab_size"]

    def mat(rows, cols):
        return torch.randn(rows, cols, generator=g) / math.sqrt(cols)

    def norm():
        return 1.0 + 0.2 * torch.randn(d, generator=g)

    state = {"model.embed_tokens.weight": mat(V, d), "model.norm.weight": norm()}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({p + "self_attn.q_proj.weight": mat(d, d), p + "self_attn.k_proj.weight": mat(kv, d),
                      p + "self_attn.v_proj.weight": mat(kv, d), p + "self_attn.o_proj.weight": mat(d, d),
                      p + "mlp.gate_proj.weight": mat(f, d), p + "mlp.up_proj.weight": mat(f, d),
                      p + "mlp.down_proj.weight": mat(d, f), p + "input_layernorm.weight": norm(),
                      p + "post_attention_layernorm.weight": norm()})
    if not config["tie_word_embeddings"]:
        state["lm_head.weight"] = mat(V, d)
    return state


def llama_model(config: dict, seed: int = 0) -> tuple[GPT, dict]:
    hf = random_hf_state(config, seed)
    model = GPT(our_config(config)).eval()
    model.load_state_dict(hf_to_ours(hf, config), strict=True)
    return model, hf


@pytest.mark.parametrize("theta", [10000.0, 100000.0])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_matches_an_independent_llama_forward_pass(theta, tied, eps):
    config = tiny_hf_config(rope_theta=theta, tie_word_embeddings=tied, rms_norm_eps=eps)
    model, hf = llama_model(config)
    assert (model.lm_head.weight is model.wte.weight) == tied
    ids = torch.randint(0, config["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(ids)
    ref = llama_reference_logits(hf, config, ids)
    assert ours.shape == ref.shape == (2, 20, config["vocab_size"])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_reference_reads_the_weights_it_is_given():
    """Guard against a reference that ignores its input: other weights, other logits."""
    config = tiny_hf_config()
    ids = torch.arange(10)[None]
    a = llama_reference_logits(random_hf_state(config, 0), config, ids)
    b = llama_reference_logits(random_hf_state(config, 1), config, ids)
    assert not torch.allclose(a, b, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# Each switch on its own
# ---------------------------------------------------------------------------------------------------------

def test_rope_pairs_i_and_i_plus_half_turn_at_theta_to_the_minus_2i_over_hd():
    hd, theta, m = 8, 100.0, 5
    cos, sin = rope_cache(hd, 16, theta)
    x = torch.randn(hd, dtype=torch.float32)
    y = apply_rope(x[None], cos[m:m + 1], sin[m:m + 1])[0]
    for i in range(hd // 2):
        angle = m * theta ** (-2 * i / hd)
        z = complex(x[i], x[i + hd // 2]) * complex(math.cos(angle), math.sin(angle))   # turn x_i + i x_{i+hd/2}
        assert abs(y[i].item() - z.real) < 1e-5 and abs(y[i + hd // 2].item() - z.imag) < 1e-5
    assert torch.equal(apply_rope(x[None], cos[:1], sin[:1])[0], x)          # position 0: no rotation


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 16
    cos, sin = rope_cache(hd, 64, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)

    def score(m, n):                                                          # <rope(q, m), rope(k, n)>
        qm = apply_rope(q[None], cos[m:m + 1], sin[m:m + 1])                   # (1, hd)
        kn = apply_rope(k[None], cos[n:n + 1], sin[n:n + 1])                   # (1, hd)
        return (qm @ kn.T).item()

    for delta in (0, 3, -7):
        scores = [score(m, m - delta) for m in range(max(delta, 0), 40, 5)]
        assert max(scores) - min(scores) < 1e-4, (delta, scores)
    assert abs(score(10, 7) - score(10, 2)) > 1e-3                            # a different offset does matter


def test_rope_block_is_shift_invariant_and_position_aware():
    """A block sees only relative positions: rotating a window at positions 9.. or 0.. gives the same output.
    And rope is what makes it tell order apart: without a rotation, the last position's output depends only
    on the set of earlier inputs (attention is a weighted sum), so swapping two earlier inputs changes nothing."""
    torch.manual_seed(0)
    config = tiny_hf_config()
    model, _ = llama_model(config)
    block, T = model.blocks[0], 10
    x = torch.randn(2, T, config["hidden_size"])
    rope = (model.rope_cos[:T], model.rope_sin[:T])                          # (T, hd) each
    with torch.no_grad():
        shifted = block(x, (model.rope_cos[9:9 + T], model.rope_sin[9:9 + T]))
        torch.testing.assert_close(block(x, rope), shifted, atol=1e-5, rtol=1e-5)

        swapped = x[:, [1, 0] + list(range(2, T))]                           # inputs 0 and 1 exchanged
        assert not torch.allclose(block(x, rope)[:, -1], block(swapped, rope)[:, -1], atol=1e-3)
        no_rotation = (torch.ones(T, 16), torch.zeros(T, 16))
        torch.testing.assert_close(block(x, no_rotation)[:, -1], block(swapped, no_rotation)[:, -1],
                                   atol=1e-5, rtol=1e-5)


def test_rope_tables_are_buffers_outside_the_state_dict():
    model, _ = llama_model(tiny_hf_config())
    assert model.wpe is None
    assert model.rope_cos.shape == model.rope_sin.shape == (32, 16)
    assert not any("rope" in name or "wpe" in name for name in model.state_dict())
    assert {name for name, _ in model.named_buffers()} == {"rope_cos", "rope_sin"}


def test_gqa_with_as_many_kv_heads_as_heads_is_multi_head_attention():
    c = preset("nano", n_head=4, pos="rope")
    torch.manual_seed(0)
    plain = GPT(c).eval()
    explicit = GPT(GPTConfig(**{**c.to_dict(), "n_kv_head": 4})).eval()
    explicit.load_state_dict(plain.state_dict())
    idx = torch.randint(1, c.vocab_size, (2, 9))
    assert torch.equal(plain(idx)[0], explicit(idx)[0])


def test_gqa_equals_multi_head_attention_with_each_kv_head_repeated():
    """n_kv_head = 2 of 4 heads computes what 4-head attention computes with k/v weights repeated per group."""
    config = tiny_hf_config()
    gqa, hf = llama_model(config)
    mha = GPT(our_config({**config, "num_key_value_heads": 4})).eval()
    state, hd = hf_to_ours(hf, config), 16
    for name in list(state):
        if name.endswith(("attn.k_proj.weight", "attn.v_proj.weight")):             # (2*hd, d) -> (4*hd, d)
            state[name] = state[name].view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    idx = torch.randint(0, config["vocab_size"], (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=1e-5, rtol=1e-5)
    assert gqa.blocks[0].attn.k_proj.weight.shape == (32, 64)


def test_rmsnorm_is_the_hand_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    # A bf16 input is normalised in float32 and cast back before the weight, as Llama does.
    xb = x.bfloat16()
    x32 = xb.float()
    expected_b = norm.weight * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(norm(xb), expected_b)
    assert [name for name, _ in norm.named_parameters()] == ["weight"]


def test_norm_switch_picks_the_layers():
    rms = GPT(preset("nano", norm="rmsnorm", bias=False))
    assert all(isinstance(m, RMSNorm) for m in (rms.ln_f, rms.blocks[0].ln_1, rms.blocks[1].ln_2))
    assert not any(name.endswith("bias") for name, _ in rms.named_parameters())
    ln = GPT(preset("nano", norm_eps=1e-6))
    assert isinstance(ln.ln_f, torch.nn.LayerNorm) and ln.ln_f.eps == 1e-6 and ln.ln_f.bias is not None


def test_swiglu_is_spelled_out_and_down_proj_is_scaled_at_init():
    torch.manual_seed(0)
    model = GPT(preset("cpu", vocab_size=512, n_layer=8, mlp="swiglu", mlp_hidden=1024, bias=False))
    mlp = model.blocks[0].mlp
    assert {n for n, _ in mlp.named_parameters()} == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    x = torch.randn(2, 3, 384)
    g = x @ mlp.gate_proj.weight.T
    up = x @ mlp.up_proj.weight.T
    torch.testing.assert_close(mlp(x), (g * torch.sigmoid(g) * up) @ mlp.down_proj.weight.T)
    expected = 0.02 / math.sqrt(2 * 8)
    for b in model.blocks:
        assert abs(b.mlp.down_proj.weight.std().item() - expected) / expected < 0.05
        assert abs(b.mlp.gate_proj.weight.std().item() - 0.02) < 0.001


def test_mlp_hidden_sets_the_gelu_width():
    mlp = GPT(preset("nano", mlp_hidden=48)).blocks[0].mlp
    assert mlp.fc_in.weight.shape == (48, 32) and mlp.fc_out.weight.shape == (32, 48)


def test_untied_lm_head_has_its_own_weight():
    tied = GPT(preset("nano"))
    untied = GPT(preset("nano", tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert untied.num_params() == tied.num_params() + 512 * 32
    assert torch.count_nonzero(untied.lm_head.weight - untied.wte.weight) > 0


def test_causal_mask_holds_for_the_llama_config():
    model, _ = llama_model(tiny_hf_config())
    idx = torch.randint(0, 101, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = torch.randint(0, 101, (2, 5))
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_classifier_pools_the_last_real_token_for_the_llama_config():
    config = tiny_hf_config()
    torch.manual_seed(0)
    clf = GPTClassifier(our_config(config, pad_id=0), num_outputs=3).eval()
    clf.gpt.load_state_dict(hf_to_ours(random_hf_state(config), config))
    a = torch.randint(4, config["vocab_size"], (5,))
    b = torch.randint(4, config["vocab_size"], (8,))
    batch = torch.zeros(2, 8, dtype=torch.long)
    batch[0, :5], batch[1] = a, b
    with torch.no_grad():
        logits, _ = clf(batch)
        torch.testing.assert_close(logits[0], clf(a[None])[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1], clf(b[None])[0][0], atol=1e-5, rtol=1e-5)
        h = clf.gpt.hidden_states(batch)
        assert torch.equal(clf.pool(h, batch)[0], h[0, 4])
    with pytest.raises(ValueError, match="exceeds block_size"):
        clf(torch.ones(1, 33, dtype=torch.long))


def test_llama_config_learns():
    torch.manual_seed(0)
    model = GPT(our_config(tiny_hf_config()))
    seq = torch.randint(0, 101, (1, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


# ---------------------------------------------------------------------------------------------------------
# Configs and counts
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, field", [
    (dict(norm="batchnorm"), "norm"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(pos="alibi"), "pos"),
    (dict(pos="rope", n_embd=6, n_head=2), "rope"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(rope_theta=float("inf")), "rope_theta"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(n_kv_head=-1), "n_kv_head"),
    (dict(mlp="relu"), "mlp"),
    (dict(mlp_hidden=-1), "mlp_hidden"),
])
def test_bad_llama_configs_are_one_line_errors_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field) as err:
        preset("nano", **bad)
    assert "\n" not in str(err.value)


def test_smollm2_preset_has_134_515_008_parameters():
    c = preset("smollm2-135m")
    d, L, V, f, kv = 576, 30, 49152, 1536, 3 * 64
    per_block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d          # q, o; k, v; gate, up, down; two norms
    assert L * per_block + V * d + d == 134_515_008                 # + tied embedding, final norm
    with torch.device("meta"):
        model = GPT(c)
    assert model.num_params() == 134_515_008
    assert model.lm_head.weight is model.wte.weight and model.wpe is None
    assert c.head_dim == 64 and c.kv_heads == 3 and c.hidden == 1536
    assert GPTConfig.from_dict(c.to_dict()) == c


def test_flop_count_by_hand_for_gqa_and_swiglu():
    c = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=8, mlp_hidden=12,
                  mlp="swiglu", norm="rmsnorm", pos="rope", bias=False)
    # d = 8, kv = 2 heads * 2 = 4, h = 12. Per block: q, o 4 d^2 = 256; k, v 4 d kv = 128;
    # SwiGLU 6 d h = 576; attention 4 T d = 512 -> 1472; two blocks 2944. LM head 2 d V = 1600. Total 4544.
    assert matmul_flops_per_token(c, seq_len=16) == 4544
    assert matmul_flops_per_token(c, seq_len=16, lm_head=False) == 2944


@pytest.mark.parametrize("switches", [dict(mlp="swiglu", n_kv_head=2), dict(mlp="swiglu"),
                                      dict(mlp="gelu", n_kv_head=1, mlp_hidden=20)])
def test_flop_count_matches_the_linear_layers_for_gqa_and_swiglu(switches):
    """Per block, the projection and MLP FLOPs are exactly 2 x (the number of weights in the Linear layers)."""
    c = GPTConfig(vocab_size=100, block_size=16, n_layer=3, n_head=4, n_embd=8, **switches)
    block = GPT(c).blocks[0]
    linear_weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    per_block = matmul_flops_per_token(c, seq_len=16, lm_head=False) // c.n_layer
    assert per_block - 4 * 16 * c.n_embd == 2 * linear_weights
