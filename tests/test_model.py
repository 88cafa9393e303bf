"""Tests of model.py: shapes, causality, pooling under padding, learning, init, configs, FLOP counting."""

import math

import pytest
import torch

from model import GPT, GPTClassifier, GPTConfig, matmul_flops_per_token, preset, training_flops


@pytest.fixture
def cfg():
    return preset("nano")


def test_lm_shapes_and_loss(cfg):
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(1, cfg.vocab_size, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, cfg.vocab_size) and loss is None
    targets = torch.randint(1, cfg.vocab_size, (3, 10))
    logits, loss = model(idx, targets)
    assert loss.ndim == 0
    # At init the logits are near zero, so the loss is near log(vocab): GPT-2's small init at work.
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1


def test_ignore_index_positions_do_not_count(cfg):
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(1, cfg.vocab_size, (2, 6))
    targets = idx.clone()
    targets[:, 3:] = -100
    _, loss = model(idx, targets)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :3].reshape(-1, cfg.vocab_size), idx[:, :3].reshape(-1))
    assert torch.allclose(loss, expected)


def test_causal_mask_future_tokens_never_change_the_past(cfg):
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    idx = torch.randint(1, cfg.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = torch.randint(1, cfg.vocab_size, (2, 5))      # rewrite positions 7..11
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :7], b[:, :7])                          # positions 0..6 are bit-identical
    assert not torch.allclose(a[:, 7:], b[:, 7:])                   # later positions do see the change


def test_tied_lm_head_is_the_token_embedding(cfg):
    model = GPT(cfg)
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    blocks = sum(p.numel() for p in model.blocks.parameters())
    d, V, T = cfg.n_embd, cfg.vocab_size, cfg.block_size
    assert model.num_params() == blocks + V * d + T * d + 2 * d     # + final LayerNorm weight and bias


def test_residual_projections_are_scaled_at_init():
    torch.manual_seed(0)
    model = GPT(preset("cpu", vocab_size=512, n_layer=8))
    expected = 0.02 / math.sqrt(2 * 8)
    stds = [b.attn.o_proj.weight.std().item() for b in model.blocks] + \
        [b.mlp.fc_out.weight.std().item() for b in model.blocks]
    assert all(abs(s - expected) / expected < 0.05 for s in stds)
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.001
    assert torch.count_nonzero(model.blocks[0].attn.q_proj.bias) == 0


def test_classifier_pools_the_last_real_token_and_ignores_padding(cfg):
    torch.manual_seed(0)
    clf = GPTClassifier(cfg, num_outputs=3).eval()
    a = torch.randint(4, cfg.vocab_size, (5,))
    b = torch.randint(4, cfg.vocab_size, (8,))
    # Row 0 is a followed by 3 pads; row 1 is b. Each row alone (no padding) must give the same logits.
    batch = torch.full((2, 8), cfg.pad_id)
    batch[0, :5], batch[1] = a, b
    logits, _ = clf(batch)
    alone_a, _ = clf(a[None])
    alone_b, _ = clf(b[None])
    assert logits.shape == (2, 3)
    assert torch.allclose(logits[0], alone_a[0], atol=1e-6)
    assert torch.allclose(logits[1], alone_b[0], atol=1e-6)
    # The pooled vector is the hidden state at index 4 for row 0 (5 real tokens).
    h = clf.gpt.hidden_states(batch)
    assert torch.equal(clf.pool(h, batch)[0], h[0, 4])


def test_classifier_rejects_an_all_padding_row(cfg):
    clf = GPTClassifier(cfg, num_outputs=2)
    with pytest.raises(ValueError, match="only padding"):
        clf(torch.full((1, 4), cfg.pad_id))


def test_regression_head_uses_mse(cfg):
    torch.manual_seed(0)
    clf = GPTClassifier(cfg, num_outputs=1)
    idx = torch.randint(4, cfg.vocab_size, (4, 6))
    y = torch.tensor([0.5, 1.0, 4.0, 2.5])
    pred, loss = clf(idx, y)
    assert pred.shape == (4,)
    assert torch.allclose(loss, ((pred - y) ** 2).mean())


@pytest.mark.parametrize("num_outputs", [1, 3])
def test_loss_falls_when_overfitting_one_batch(cfg, num_outputs):
    torch.manual_seed(0)
    clf = GPTClassifier(cfg, num_outputs=num_outputs)
    idx = torch.randint(4, cfg.vocab_size, (8, 10))
    y = torch.randn(8) if num_outputs == 1 else torch.randint(0, num_outputs, (8,))
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        _, loss = clf(idx, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_lm_overfits_a_sentence(cfg):
    torch.manual_seed(0)
    model = GPT(cfg)
    seq = torch.randint(4, cfg.vocab_size, (1, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("bad, message", [
    (dict(n_head=3), "must divide n_embd"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_layer=0), "n_layer"),
    (dict(pad_id=9999), "pad_id"),
])
def test_bad_configs_are_rejected_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        preset("nano", **bad)


def test_unknown_preset_and_unknown_saved_keys():
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown keys"):
        GPTConfig.from_dict({**preset("nano").to_dict(), "n_experts": 4})
    assert GPTConfig.from_dict(preset("nano").to_dict()) == preset("nano")


def test_sequence_longer_than_block_size_is_a_clear_error(cfg):
    with pytest.raises(ValueError, match="exceeds block_size"):
        GPT(cfg)(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))


def test_flop_count_by_hand():
    c = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=8)
    # Per block: 24 d^2 = 24 * 64 = 1536, attention 4 T d = 4 * 16 * 8 = 512 -> 2048; two blocks 4096.
    # LM head 2 d V = 2 * 8 * 100 = 1600. Total forward per token: 5696.
    assert matmul_flops_per_token(c, seq_len=16) == 5696
    assert matmul_flops_per_token(c, seq_len=16, lm_head=False) == 4096
    assert training_flops(c, n_tokens=10, seq_len=16) == 3 * 10 * 5696


def test_flop_count_matches_the_linear_layers():
    """24 d^2 per block is exactly 2 x (the number of weights in the block's Linear layers)."""
    c = preset("nano")
    block = GPT(c).blocks[0]
    linear_weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    assert 24 * c.n_embd ** 2 == 2 * linear_weights


def test_saved_configs_without_the_llama_keys_load_as_gpt2():
    old_keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "pad_id")
    saved = {k: v for k, v in preset("cpu").to_dict().items() if k in old_keys}
    c = GPTConfig.from_dict(saved)
    assert c == preset("cpu")
    assert (c.norm, c.pos, c.mlp, c.kv_heads, c.hidden, c.tie_embeddings) == \
        ("layernorm", "learned", "gelu", 6, 1536, True)


def test_default_config_keeps_gpt2s_parameter_names(cfg):
    model = GPT(cfg)
    names = list(model.state_dict())
    assert names[:2] == ["wte.weight", "wpe.weight"]
    assert names[-3:] == ["ln_f.weight", "ln_f.bias", "lm_head.weight"]
    assert [n[len("blocks.0."):] for n in names if n.startswith("blocks.0.")] == [
        "ln_1.weight", "ln_1.bias",
        "attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight", "attn.k_proj.bias",
        "attn.v_proj.weight", "attn.v_proj.bias", "attn.o_proj.weight", "attn.o_proj.bias",
        "ln_2.weight", "ln_2.bias", "mlp.fc_in.weight", "mlp.fc_in.bias", "mlp.fc_out.weight", "mlp.fc_out.bias"]
    assert list(model.buffers()) == []
