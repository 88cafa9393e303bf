"""Tests of dynlora.py, chapter by chapter: each one would fail if the formula or guard it names were wrong.

All models are model.preset("nano") (2 blocks, width 32) or a single small layer; each test takes well under
a second on an idle CPU (the first optimizer step of a process pays a one-off start-up cost).
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import analysis
import dynlora
import runs
from analysis import gate_statistics
from dynlora import (AdapterConfig, LoRALinear, RankAllocator, RankGate, adapter_layers, apply_lora,
                     budget_schedule, config_for_method, count_parameters, freeze_gates, live_gates,
                     merge_adapters, merge_and_unload, regularization_loss, unmerge_adapters)
from runs import load_adapter, save_adapter
from model import GPTClassifier, preset


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------

def classifier(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPTClassifier(preset("nano", **overrides), num_outputs=2)


def batch(seed=1, B=3, T=10, vocab=512):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, vocab, (B, T), generator=g)
    y = torch.randint(0, 2, (B,), generator=g)
    return idx, y


def adapted(method="lora", seed=0, model_seed=0, **overrides):
    """A nano classifier with adapters; the adapter init uses `seed`."""
    model = classifier(model_seed)
    config = config_for_method(method, **{"r": 4, "target_r": 2, **overrides})
    torch.manual_seed(seed)
    apply_lora(model, config)
    return model, config


def randomize_B(model, seed=3, std=0.3):
    """Give every adapter a nonzero update (B = 0 at init would make many checks trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)
            if layer.form == "svd":
                layer.lora_E.copy_(torch.randn(layer.r, generator=g))


def train_steps(model, n, allocator=None, lr=1e-2, seed=5, start=1):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for t in range(start, start + n):
        idx, y = batch(seed + t)
        _, loss = model(idx, y)
        (loss + regularization_loss(model)).backward()
        opt.step()
        if allocator is not None:
            allocator.step(t)
        opt.zero_grad()


def set_params_and_grads(allocator, values: dict):
    """values: layer name -> (param value, grad value or None) applied to A, B (and lambda)."""
    with torch.no_grad():
        for name, layer in allocator.layers:
            value, grad = values[name]
            for p in allocator._params(layer).values():
                p.fill_(value)
                p.grad = None if grad is None else torch.full_like(p, grad)


# ---------------------------------------------------------------------------------------------------------
# Chapter 1: LoRA
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(dynlora.METHODS))
def test_zero_update_at_init_gives_the_base_model_exactly(method):
    model = classifier()
    idx, _ = batch()
    model.eval()
    with torch.no_grad():
        before = model(idx)[0]
    apply_lora(model, config_for_method(method, r=4, target_r=2))
    with torch.no_grad():
        after = model(idx)[0]
    assert torch.equal(before, after)        # B = 0 (plain) or lambda = 0 (svd): dW = 0 exactly


def test_training_changes_only_adapters_and_head():
    model, _ = adapted("lora")
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith("head.") for n in trainable_before)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)   # decay would move frozen weights if they were in it
    for t in range(3):
        idx, y = batch(t)
        model(idx, y)[1].backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n          # bit-identical backbone
        else:
            assert not torch.equal(p, trainable_before[n]), n   # A, B and the head all moved


def test_parameter_counts():
    model, _ = adapted("lora")
    trainable, total = count_parameters(model)
    adapters = 4 * 4 * (32 + 32)          # 2 blocks x (q, v) adapters, r = 4, each r (d_in + d_out)
    head = 32 * 2 + 2
    assert trainable == adapters + head
    assert total == sum(p.numel() for p in classifier().parameters()) + adapters
    assert dynlora.active_parameter_count(model) == adapters


def test_bias_options():
    model, _ = adapted("lora", bias="lora_only")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "gpt.blocks.0.attn.q_proj.base.bias" in trainable
    assert "gpt.blocks.0.attn.k_proj.bias" not in trainable
    model, _ = adapted("lora", bias="all")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"gpt.blocks.0.attn.k_proj.bias", "gpt.blocks.1.ln_2.bias",
            "gpt.blocks.0.attn.q_proj.base.bias"} <= trainable
    assert "gpt.blocks.0.attn.k_proj.weight" not in trainable


def test_merge_matches_unmerged_and_unmerge_restores_W0():
    model, _ = adapted("lora")
    randomize_B(model)
    w0 = {n: l.base.weight.detach().clone() for n, l in adapter_layers(model)}
    idx, _ = batch()
    model.eval()
    with torch.no_grad():
        ref = model(idx)[0]
        merge_adapters(model)
        merged = model(idx)[0]
    assert all(l.merged for _, l in adapter_layers(model))
    assert torch.allclose(merged, ref, atol=1e-6)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_adapters(model)
    unmerge_adapters(model)
    for n, l in adapter_layers(model):
        assert torch.allclose(l.base.weight, w0[n], atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        adapter_layers(model)[0][1].unmerge()


def test_merged_layer_forward_uses_only_the_base():
    layer = LoRALinear(nn.Linear(6, 5), r=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge()
    with torch.no_grad():
        layer.lora_B.zero_()                 # if forward still added the adapter, this would change the output
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), layer.base(x))


def test_gradients_match_closed_form():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(5, 4), r=3, alpha=6.0)   # s = 6 / 3 = 2
    with torch.no_grad():
        layer.lora_B.normal_()
    x, G = torch.randn(7, 5), torch.randn(7, 4)
    loss = (layer(x) * G).sum()                           # dL/dh = G
    loss.backward()
    s, A, B = 2.0, layer.lora_A.detach(), layer.lora_B.detach()
    z = x @ A.t()                                         # (7, 5) @ (5, 3) -> (7, 3)
    assert torch.allclose(layer.lora_B.grad, s * G.t() @ z, atol=1e-5)       # dL/dB = s sum_n g_n z_n^T
    assert torch.allclose(layer.lora_A.grad, s * B.t() @ G.t() @ x, atol=1e-5)  # dL/dA = s B^T sum_n g_n x_n^T
    assert layer.base.weight.grad is None


def test_rslora_scaling():
    plain = LoRALinear(nn.Linear(8, 8), r=4, alpha=16.0)
    rs = LoRALinear(nn.Linear(8, 8), r=4, alpha=16.0, use_rslora=True)
    assert plain.scaling == 4.0 and rs.scaling == 8.0       # 16 / 4 and 16 / sqrt(4)
    with torch.no_grad():
        rs.lora_B.normal_()
    x = torch.randn(3, 8)
    expected = rs.base(x) + 8.0 * (x @ rs.lora_A.t()) @ rs.lora_B.t()
    assert torch.allclose(rs(x), expected, atol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=4, alpha=8.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(10, 16)
    no_dropout = layer.base(x) + 2.0 * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    layer.eval()
    assert torch.allclose(layer(x), no_dropout, atol=1e-5) and torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), no_dropout, atol=1e-3)


def test_static_lora_is_the_plain_path():
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=4.0)
    assert layer.static_coefficients() is None
    assert not hasattr(layer, "mask") and layer.gate is None and not hasattr(layer, "lora_E")


@pytest.mark.parametrize("method", ["lora", "dynlora", "adalora"])
def test_adapter_save_load_round_trip(tmp_path, method):
    model, config = adapted(method, t_init=2, t_final=2, delta_t=2)
    allocator = RankAllocator(model, config, 8) if config.allocation else None
    train_steps(model, 6, allocator)
    path = save_adapter(tmp_path / "adapter.pt", model, config, extra={"task": "toy", "step": 6})
    assert path.stat().st_size < 200_000
    idx, _ = batch(9)
    model.eval()
    with torch.no_grad():
        ref = model(idx)[0]
    fresh = classifier()                       # the same pretrained backbone, a new random head
    _, loaded_config, extra = load_adapter(path, fresh)
    fresh.eval()
    with torch.no_grad():
        out = fresh(idx)[0]
    assert torch.equal(out, ref)               # exactly the same function, head included
    assert loaded_config == config and extra == {"task": "toy", "step": 6}


def test_bad_configs_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        AdapterConfig(r=0)
    with pytest.raises(ValueError, match=r"unknown target.*valid targets"):
        AdapterConfig(targets=("q_proj", "query"))
    with pytest.raises(ValueError, match="bias must be"):
        AdapterConfig(bias="some")
    with pytest.raises(ValueError, match="gate_penalty must be >= 0"):
        AdapterConfig(gate_penalty=-0.1)
    with pytest.raises(ValueError, match="ortho_gamma must be >= 0"):
        AdapterConfig(ortho_gamma=-1.0)
    with pytest.raises(ValueError, match=r"^AdapterConfig: gate must be one of \['rank'\].*'sorA'$"):
        AdapterConfig(gate="sorA")
    with pytest.raises(ValueError, match=r"target_r \(12\) is above the initial rank r \(8\)"):
        config_for_method("alloc", r=8, target_r=12)
    config_for_method("lora", r=2)             # target_r (4) is irrelevant without allocation: accepted
    with pytest.raises(ValueError, match=r"gpt\.blocks\.0\.attn\.q_proj \(32 -> 32\).*exceeds min"):
        apply_lora(classifier(), config_for_method("lora", r=64))
    with pytest.raises(ValueError, match="modules_to_save"):
        apply_lora(classifier(), config_for_method("lora", modules_to_save=("classifier",)))
    model, _ = adapted("lora")
    with pytest.raises(ValueError, match="already has adapters"):
        apply_lora(model, config_for_method("lora"))


def test_adapter_file_for_another_backbone_is_refused(tmp_path):
    model, config = adapted("lora")
    path = save_adapter(tmp_path / "a.pt", model)
    cases = [(classifier(n_layer=3), "n_layer"),                 # one more block
             (classifier(n_embd=64), "shape"),                   # wider
             (classifier(seed=7), "different values")]           # same shapes, other pretrained weights
    for other, what in cases:
        with pytest.raises(ValueError, match=what) as err:
            load_adapter(path, other)
        assert "a.pt" in str(err.value) and "\n" not in str(err.value)
        assert not adapter_layers(other)                         # refused before touching the model


def test_adapter_state_dict_key_names():
    model, _ = adapted("dynlora")
    state = runs.adapter_state_dict(model)
    layer = "gpt.blocks.0.attn.q_proj."
    assert {k[len(layer):] for k in state if k.startswith(layer)} == {
        "lora_A", "lora_B", "mask", "gate.weight", "gate.bias", "gate.proj", "gate.frozen_mean", "gate.frozen"}
    assert {k for k in state if not k.startswith("gpt.")} == {"head.weight", "head.bias"}
    model, _ = adapted("adalora")
    state = runs.adapter_state_dict(model)
    assert {k[len(layer):] for k in state if k.startswith(layer)} == {"lora_A", "lora_B", "lora_E", "mask"}
    assert runs.ADAPTER_FORMAT == "dynlora-adapter/2"


def test_adapter_file_from_before_gate_x_dims_loads_as_a_gate_that_reads_z_only(tmp_path):
    model, config = adapted("gate", gate_x_dims=0)             # the gate before gate_x_dims existed
    randomize_B(model)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.gate.weight.normal_()
    path = save_adapter(tmp_path / "zgate.pt", model)
    payload = torch.load(path, weights_only=True)
    del payload["config"]["gate_x_dims"]                       # what such a file holds
    torch.save(payload, path)
    fresh = classifier()
    _, loaded, _ = load_adapter(path, fresh)
    assert loaded.gate_x_dims == 0 and all(l.gate.x_dims == 0 for _, l in adapter_layers(fresh))
    idx, _ = batch()
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(idx)[0], model(idx)[0])


def test_format_1_adapter_file_is_refused_with_one_line(tmp_path):
    model, config = adapted("gate")
    path = save_adapter(tmp_path / "old.pt", model)
    payload = torch.load(path, weights_only=True)
    old_names = {"gate.weight": "gate_weight", "gate.bias": "gate_bias", "gate.frozen_mean": "frozen_gate",
                 "gate.frozen": "gate_frozen"}        # what format 1 called them
    state = {}
    for key, value in payload["state"].items():
        for new, old in old_names.items():
            key = key.replace(new, old)
        state[key] = value
    torch.save({**payload, "format": "dynlora-adapter/1", "state": state}, path)
    fresh = classifier()
    with pytest.raises(ValueError, match=r"older version.*format 1.*gate.*re-run the fine-tuning.*older commit") as err:
        load_adapter(path, fresh)
    assert "old.pt" in str(err.value) and "\n" not in str(err.value)
    assert not adapter_layers(fresh)                             # refused before touching the model


def test_swiglu_projection_names_are_adaptable():
    class SwiGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False)
            self.down_proj = nn.Linear(16, 8, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))   # (N, 16) -> (N, 8)

    mlp = SwiGLU()
    x = torch.randn(5, 8)
    with torch.no_grad():
        before = mlp(x)
    config = config_for_method("gate", r=2, targets=("gate_proj", "up_proj", "down_proj"), modules_to_save=())
    apply_lora(mlp, config)
    assert [n for n, _ in adapter_layers(mlp)] == ["gate_proj", "up_proj", "down_proj"]
    assert isinstance(mlp.gate_proj.gate, RankGate)             # the projection named "gate" keeps its own gate
    with torch.no_grad():
        assert torch.equal(mlp(x), before)                       # B = 0: the base function exactly


def test_merge_and_unload_returns_a_plain_equivalent_model():
    model, config = adapted("alloc")
    randomize_B(model)
    layers = adapter_layers(model)
    with torch.no_grad():
        layers[0][1].mask.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0]))   # the merge must respect the mask
    idx, _ = batch()
    model.eval()
    with torch.no_grad():
        ref = model(idx)[0]
        plain = merge_and_unload(model)
        out = plain(idx)[0]
    assert not adapter_layers(plain) and not hasattr(plain, "adapter_config")
    assert type(plain.gpt.blocks[0].attn.q_proj) is nn.Linear
    assert torch.allclose(out, ref, atol=1e-6)
    assert adapter_layers(model) and not layers[0][1].merged          # the input model is untouched


# ---------------------------------------------------------------------------------------------------------
# Chapter 2: input-driven gating
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair", [("gate", "lora", 4), ("dynlora", "alloc", 4)])
def test_a_gate_leaves_the_initialisation_of_the_same_shapes_unchanged(pair):
    """Same seed, same shapes -> the same A in every layer (and the same head), with or without gates: the
    gate's projection P is drawn aside (RankGate.__init__), so paired runs start from the same point."""
    gated_method, plain_method, r = pair
    gated, _ = adapted(gated_method, seed=7, r=r, target_r=2)
    plain, _ = adapted(plain_method, seed=7, r=r, target_r=2)
    a = {n: l.lora_A.detach() for n, l in adapter_layers(gated)}
    b = {n: l.lora_A.detach() for n, l in adapter_layers(plain)}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    gates = [l.gate for _, l in adapter_layers(gated)]
    assert all(g.x_dims == 1 for g in gates)
    assert not torch.equal(gates[0].proj, gates[1].proj)             # each layer's P is its own draw
    assert not torch.allclose(gates[0].proj, torch.zeros_like(gates[0].proj))
    again, _ = adapted(gated_method, seed=7, r=r, target_r=2)           # and P is reproducible
    assert torch.equal(gates[0].proj, adapter_layers(again)[0][1].gate.proj)


def test_gated_layer_is_the_formula_forward_and_backward():
    """h = W0 x + b + s B diag(m * g(x)) A x, g = sigmoid(W_g [A x; P x] + c), p = 2, with a switched-off
    component: the layer's one GEMM over [A; P] gives the formula's output and every gradient."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10), r=4, alpha=8.0, masked=True, gate=RankGate(4, d_in=12, x_dims=2))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.gate.weight.normal_()
        layer.mask[2] = 0
    x = torch.randn(3, 5, 12, requires_grad=True)
    A, B, P, W, c = layer.lora_A, layer.lora_B, layer.gate.proj, layer.gate.weight, layer.gate.bias
    m = layer.mask
    z = x @ (A * m[:, None]).t()                                            # (3, 5, 4)
    g = torch.sigmoid(torch.cat([z, x @ P.t()], -1) @ W.t() + c)            # (3, 5, 6) @ (6, 4) -> (3, 5, 4)
    expected = layer.base(x) + 2.0 * (z * g) @ B.t()                        # s = alpha / r = 2
    params = [x, A, B, P, W, c]
    want = torch.autograd.grad((expected * torch.linspace(-1, 1, 10)).sum(), params)
    got_h = layer(x)
    assert torch.allclose(got_h, expected, atol=1e-5)
    got = torch.autograd.grad((got_h * torch.linspace(-1, 1, 10)).sum(), params)
    for name, a, b in zip(["x", "A", "B", "P", "W_g", "c"], got, want):
        assert torch.allclose(a, b, atol=1e-5), name
    assert torch.equal(got[1][2], torch.zeros(12))                          # a switched-off row gets no gradient


def test_open_gate_reproduces_static_lora():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    static = LoRALinear(base, r=4, alpha=8.0)
    gated = LoRALinear(nn.Linear(12, 10), r=4, alpha=8.0, gate=RankGate(4, 30.0, d_in=12, x_dims=0))  # sigmoid(30) = 1
    with torch.no_grad():
        gated.base.load_state_dict(base.state_dict())
        static.lora_B.normal_()
        gated.lora_A.copy_(static.lora_A)
        gated.lora_B.copy_(static.lora_B)
    x = torch.randn(2, 5, 12)
    assert torch.allclose(gated(x), static(x), atol=1e-6, rtol=0)


def test_gate_at_init_is_constant_and_penalty_is_its_mean():
    model, config = adapted("gate", gate_penalty=0.5)
    idx, _ = batch()
    model(idx)
    # W_g = 0: every gate of every token is sigmoid(gate_init), so the mean gate is sigmoid(gate_init) in every layer.
    reg = regularization_loss(model)
    assert torch.allclose(reg, torch.tensor(0.5 / (1 + math.exp(-AdapterConfig().gate_init))), atol=1e-6)
    with pytest.raises(RuntimeError, match="after each forward pass"):
        regularization_loss(model)             # the records were consumed
    # With allocation, switched-off components are not penalised: 3 of 4 active -> 3/4 of the mean.
    model, _ = adapted("dynlora", gate_penalty=1.0)
    for _, layer in adapter_layers(model):
        layer.mask[1] = 0.0
    model(idx)
    g0 = 1 / (1 + math.exp(-AdapterConfig().gate_init))         # sigmoid(gate_init)
    assert torch.allclose(regularization_loss(model), torch.tensor(0.75 * g0), atol=1e-6)


def test_gate_penalty_lowers_effective_rank_on_a_toy_problem():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.q_proj(x)

    def effective_rank(penalty):
        torch.manual_seed(0)
        toy = Toy()
        apply_lora(toy, config_for_method("gate", r=4, alpha=4.0, targets=("q_proj",), modules_to_save=(),
                                          gate_penalty=penalty))
        g = torch.Generator().manual_seed(1)
        u, v = torch.randn(8, 1, generator=g), torch.randn(1, 8, generator=g)   # the task: a rank-1 update
        opt = torch.optim.Adam([p for p in toy.parameters() if p.requires_grad], lr=0.03)
        for step in range(200):
            x = torch.randn(64, 8, generator=g)
            target = toy.q_proj.base(x).detach() + x @ (u @ v).t()
            loss = F.mse_loss(toy(x), target) + regularization_loss(toy)
            loss.backward()
            opt.step()
            opt.zero_grad()
        with gate_statistics(toy) as stats, torch.no_grad():
            toy(torch.randn(256, 8, generator=g))
        return stats.mean_effective_rank()["q_proj"]

    without, with_penalty = effective_rank(0.0), effective_rank(0.5)
    assert without >= 3.5                      # nothing asks the gates to close
    assert with_penalty <= 2.0                 # the penalty switches most components off


def test_freeze_gates_then_merge_matches_frozen_forward():
    model, config = adapted("gate")
    train_steps(model, 5, lr=5e-2)             # gates now depend on the input
    idx, _ = batch(11)
    with pytest.raises(RuntimeError, match="freeze_gates"):
        merge_and_unload(model)
    calibration = [batch(20 + i) for i in range(3)]              # (idx, y) tuples, as a loader yields
    means = freeze_gates(model, calibration, pad_id=0)
    assert model.training                                         # mode restored
    for name, layer in adapter_layers(model):
        assert layer.gate.is_frozen and torch.equal(layer.gate.frozen_mean, means[name])
    model.eval()
    with torch.no_grad():
        frozen = model(idx)[0]
        merged = merge_and_unload(model)(idx)[0]
    assert torch.allclose(merged, frozen, atol=1e-5)


def test_frozen_gate_is_the_mean_gate_and_survives_save_load(tmp_path):
    model, _ = adapted("gate")
    freeze_gates(model, [batch(1)[0]])
    for _, layer in adapter_layers(model):     # untrained: g = sigmoid(gate_init) for every token
        g0 = 1 / (1 + math.exp(-AdapterConfig().gate_init))
        assert torch.allclose(layer.gate.frozen_mean, torch.full((4,), g0), atol=1e-6)
    randomize_B(model)
    path = save_adapter(tmp_path / "g.pt", model)
    fresh = classifier()
    load_adapter(path, fresh)
    assert all(l.gate.is_frozen for _, l in adapter_layers(fresh))
    assert not any(p.requires_grad for _, l in adapter_layers(fresh) for p in l.gate.parameters())
    idx, _ = batch(2)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(idx)[0], model(idx)[0])


class HalfGate(RankGate):
    """A replacement gate for the tests: g = 1/2 for every token and component, whatever z."""

    def forward(self, u, mask=None):
        g = u.new_full((*u.shape[:-1], self.r), 0.5)             # (..., r + p) -> (..., r)
        self.record(g, mask)
        return g


def test_a_custom_gate_module_plugs_in(tmp_path, monkeypatch):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), r=3, alpha=3.0, gate=HalfGate(3, d_in=6, x_dims=0))   # s = 1
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = layer.base(x) + 0.5 * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    assert torch.allclose(layer(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(6, 5), r=3, alpha=3.0, gate=RankGate(2, d_in=6))
    # Registered by name and used by a method entry: apply_lora builds one per layer; penalty, statistics,
    # freezing and files follow it.
    monkeypatch.setitem(dynlora.GATES, "half", HalfGate)
    monkeypatch.setitem(dynlora.METHODS, "half", dict(form="plain", allocation=False, gating=True, gate="half"))
    model, config = classifier(), config_for_method("half", r=4, gate_penalty=1.0)
    assert config.gate == "half" and config.method == "half"
    apply_lora(model, config)
    assert all(type(l.gate) is HalfGate for _, l in adapter_layers(model))
    idx, _ = batch()
    model(idx)
    assert torch.allclose(regularization_loss(model), torch.tensor(0.5))
    freeze_gates(model, [idx])
    assert all(torch.equal(l.gate.frozen_mean, torch.full((4,), 0.5)) for _, l in adapter_layers(model))
    randomize_B(model)
    model.eval()
    with torch.no_grad():
        ref = model(idx)[0]
        assert torch.allclose(merge_and_unload(model)(idx)[0], ref, atol=1e-5)
    path = save_adapter(tmp_path / "half.pt", model)
    fresh = classifier()
    _, loaded, _ = load_adapter(path, fresh)                     # the file names its gate: it reloads as itself
    fresh.eval()
    assert loaded.gate == "half" and loaded.method == "half"
    assert all(type(l.gate) is HalfGate and l.gate.is_frozen for _, l in adapter_layers(fresh))
    with torch.no_grad():
        assert torch.equal(fresh(idx)[0], ref)
    monkeypatch.delitem(dynlora.GATES, "half")                    # a file whose gate is not registered here
    with pytest.raises(ValueError, match=r"gate must be one of \['rank'\].*'half'"):
        load_adapter(path, classifier())


def test_live_gates_lists_the_layers_whose_gates_are_not_frozen():
    model, _ = adapted("dynlora")
    assert [n for n, _ in live_gates(model)] == [n for n, _ in adapter_layers(model)]
    assert all(layer.r == 4 for _, layer in live_gates(model))
    freeze_gates(model, [batch()[0]])
    assert live_gates(model) == []
    assert live_gates(adapted("alloc")[0]) == []


# ---------------------------------------------------------------------------------------------------------
# Chapter 3: importance-based allocation
# ---------------------------------------------------------------------------------------------------------

def test_budget_schedule_values():
    # T = 40, t_init = 10, t_final = 20 -> the cubic runs over D = 40 - 20 - 10 = 10 steps; b0 = 24, b_T = 8.
    kw = dict(total_steps=40, initial_budget=24, target_budget=8, t_init=10, t_final=20, delta_t=5)
    assert budget_schedule(1, **kw) == (24, False)
    assert budget_schedule(10, **kw) == (24, False)              # warm-up: no masking
    assert budget_schedule(11, **kw) == (19, False)              # 8 + floor(16 * 9^3 / 10^3) = 8 + 11
    assert budget_schedule(12, **kw) == (16, False)              # 8 + floor(16 * 512 / 1000) = 8 + 8
    assert budget_schedule(15, **kw) == (10, True)               # 8 + floor(16 * 125 / 1000) = 10; (15-10) % 5 == 0
    assert budget_schedule(20, **kw) == (8, True)                # t = T - t_final: the target, final reallocation
    assert budget_schedule(21, **kw) == (8, False)               # masks frozen
    assert budget_schedule(40, **kw) == (8, False)


def test_schedule_that_does_not_fit_is_rejected():
    with pytest.raises(ValueError, match=r"t_init \(30\) \+ t_final \(20\) = 50 must be < the total steps"):
        budget_schedule(1, 40, 24, 8, t_init=30, t_final=20, delta_t=5)
    with pytest.raises(ValueError, match="target budget"):
        budget_schedule(1, 40, 8, 24, t_init=5, t_final=5, delta_t=5)
    model, config = adapted("alloc", t_init=50, t_final=50)
    with pytest.raises(ValueError, match="does not fit in 80 training steps"):
        RankAllocator(model, config, total_steps=80)
    with pytest.raises(ValueError, match="does not allocate"):
        RankAllocator(*adapted("gate"), total_steps=80)


def test_ema_and_uncertainty_match_hand_computation():
    model, config = adapted("alloc", r=2, targets=("q_proj",), t_init=10, t_final=10)
    alloc = RankAllocator(model, config, total_steps=100)
    first, second = [n for n, _ in alloc.layers]
    # step 1: A and B of the first layer have theta = -2, grad = 3 -> I = |-6| = 6; the second layer's grads are None.
    set_params_and_grads(alloc, {first: (-2.0, 3.0), second: (1.0, None)})
    alloc.step(1)
    # I_bar = 0.15 * 6 = 0.9;  U_bar = 0.15 * |6 - 0.9| = 0.765
    assert torch.allclose(alloc.ipt[first]["A"], torch.full((2, 32), 0.9))
    assert torch.allclose(alloc.unc[first]["A"], torch.full((2, 32), 0.765))
    assert torch.equal(alloc.ipt[second]["A"], torch.zeros(2, 32))          # grad None -> I = 0, no crash
    # step 2: I = |2 * 1| = 2 -> I_bar = 0.85 * 0.9 + 0.15 * 2 = 1.065;
    #         U_bar = 0.85 * 0.765 + 0.15 * |2 - 1.065| = 0.7905
    set_params_and_grads(alloc, {first: (2.0, 1.0), second: (1.0, None)})
    alloc.step(2)
    assert torch.allclose(alloc.ipt[first]["B"], torch.full((32, 2), 1.065))
    assert torch.allclose(alloc.unc[first]["B"], torch.full((32, 2), 0.7905))
    # S_i = mean_j score(A_ij) + mean_j score(B_ji) = 2 * 1.065 * 0.7905 = 1.683765; layer importance = 2 S_i
    assert torch.allclose(alloc.component_scores()[first], torch.full((2,), 1.683765))
    assert alloc.layer_importance()[first] == pytest.approx(2 * 1.683765, rel=1e-5)


def test_svd_component_score_includes_lambda():
    model, config = adapted("adalora", r=2, targets=("q_proj",), t_init=10, t_final=10)
    alloc = RankAllocator(model, config, total_steps=100)
    first, second = [n for n, _ in alloc.layers]
    set_params_and_grads(alloc, {first: (1.0, 2.0), second: (1.0, 2.0)})   # I = 2 everywhere
    alloc.step(1)
    # per parameter: I_bar = 0.3, U_bar = 0.15 * 1.7 = 0.255, score 0.0765; S_i = A + B + lambda = 3 * 0.0765
    assert torch.allclose(alloc.component_scores()[first], torch.full((2,), 3 * 0.0765))


def test_budget_is_conserved_at_every_reallocation():
    model, config = adapted("dynlora", t_init=3, t_final=4, delta_t=3)
    T = 20
    alloc = RankAllocator(model, config, T)
    assert alloc.initial_budget == 16 and alloc.target_budget == 8       # 4 layers x r = 4, 4 layers x target 2
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    current = 16
    for t in range(1, T + 1):
        idx, y = batch(t)
        _, loss = model(idx, y)
        (loss + regularization_loss(model)).backward()
        opt.step()
        budget = alloc.step(t)
        opt.zero_grad()
        expected, reallocated = budget_schedule(t, T, 16, 8, 3, 4, 3)
        assert budget == expected
        if reallocated:
            current = expected
        assert sum(alloc.rank_pattern().values()) == current                # exactly b(t) active
        if t == T - config.t_final:
            final_masks = [l.mask.clone() for _, l in alloc.layers]
    assert [h["step"] for h in alloc.history] == [6, 9, 12, 15, 16]
    assert all(sum(h["ranks"].values()) == h["budget"] for h in alloc.history)
    assert alloc.history[-1]["budget"] == 8
    assert all(torch.equal(l.mask, m) for (_, l), m in zip(alloc.layers, final_masks))   # frozen after T - t_final


def test_schedule_as_fractions_of_the_run_is_the_same_schedule_in_steps():
    # t_init = 0.15 and t_final = 0.2 of T = 20 steps are round(3.0) = 3 and round(4.0) = 4 steps: the same
    # budgets, reallocations and masks as the schedule given in steps.
    T, histories = 20, []
    for t_init, t_final in ((3, 4), (0.15, 0.2)):
        model, config = adapted("dynlora", t_init=t_init, t_final=t_final, delta_t=3)
        alloc = RankAllocator(model, config, T)
        assert (alloc.t_init, alloc.t_final) == (3, 4)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        budgets = []
        for t in range(1, T + 1):
            idx, y = batch(t)
            _, loss = model(idx, y)
            (loss + regularization_loss(model)).backward()
            opt.step()
            budgets.append(alloc.step(t))
            opt.zero_grad()
        histories.append((budgets, [(h["step"], h["ranks"]) for h in alloc.history]))
    assert histories[0] == histories[1]
    assert [step for step, _ in histories[0][1]] == [6, 9, 12, 15, 16]
    assert RankAllocator(*adapted("alloc", t_init=0.1, t_final=0.25), total_steps=1443).t_final == 361   # 360.75


@pytest.mark.parametrize("value", [1.5, -1, 0.0, 1.0, True, float("nan")])
def test_schedule_length_must_be_whole_steps_or_a_fraction(value):
    with pytest.raises(ValueError, match="t_init must be whole steps >= 0 or a fraction of the run in"):
        config_for_method("alloc", t_init=value)


def test_rank_moves_to_the_layer_whose_gradients_dominate():
    model, config = adapted("alloc", t_init=1, t_final=1, delta_t=1)
    alloc = RankAllocator(model, config, total_steps=6)          # b0 = 16 -> b_T = 8 over steps 2..5
    names = [n for n, _ in alloc.layers]
    dominant = names[-1]                                          # the LAST layer, so tie order cannot explain it
    for t in range(1, 6):
        set_params_and_grads(alloc, {n: (1.0, 10.0 if n == dominant else 0.1) for n in names})
        alloc.step(t)
    ranks = alloc.rank_pattern()
    assert sum(ranks.values()) == 8
    assert ranks[dominant] == 4                                   # full rank, above the uniform share of 2
    # the three others (equal scores) share the remaining 4 in layer order: deterministic tie-breaking
    assert [ranks[n] for n in names[:-1]] == [4, 0, 0]


def test_pruned_component_contributes_exactly_nothing_and_can_return():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), r=3, alpha=3.0, masked=True)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.mask[1] = 0.0
    x = torch.randn(4, 6)
    out = layer(x)
    with torch.no_grad():                     # change everything component 1 owns
        layer.lora_A[1].normal_()
        layer.lora_B[:, 1].normal_()
    assert torch.equal(layer(x), out)
    layer(x).sum().backward()
    assert torch.equal(layer.lora_A.grad[1], torch.zeros(6)) and torch.equal(layer.lora_B.grad[:, 1], torch.zeros(5))
    with torch.no_grad():
        layer.mask[1] = 1.0                   # the weights were kept: switching it back on restores its effect
    assert not torch.allclose(layer(x), out)


def test_allocator_brings_a_pruned_component_back():
    model, config = adapted("alloc", r=2, target_r=1, targets=("q_proj",), t_init=1, t_final=1, delta_t=1)
    alloc = RankAllocator(model, config, total_steps=30)         # b0 = 4 -> b_T = 2 over steps 2..29
    first, second = alloc.layers
    # gradients per component: first layer [5, 1], second layer [4, 3] (A rows and B columns alike)
    for t in (1, 2):
        _set_component_grads(alloc, {first[0]: [5.0, 1.0], second[0]: [4.0, 3.0]})
        alloc.step(t)
    assert first[1].mask.tolist() == [1.0, 0.0]                  # the weakest component was switched off
    frozen_score = alloc.component_scores()[first[0]][1].item()
    # Now the second layer stops mattering (zero gradients): its scores decay, the pruned one's stay frozen.
    returned_at = None
    for t in range(3, 30):
        _set_component_grads(alloc, {first[0]: [5.0, 0.0], second[0]: [0.0, 0.0]})
        alloc.step(t)
        if first[1].mask[1] == 1.0 and returned_at is None:
            returned_at = t
            assert alloc.component_scores()[first[0]][1].item() == frozen_score
    assert returned_at is not None, "the pruned component never came back"
    assert sum(alloc.rank_pattern().values()) == 2 and first[1].mask.tolist() == [1.0, 1.0]


def _set_component_grads(alloc, per_layer: dict):
    """theta = 1 everywhere; the gradient of component i (row i of A, column i of B) is per_layer[name][i]."""
    with torch.no_grad():
        for name, layer in alloc.layers:
            g = torch.tensor(per_layer[name])                        # (r,)
            layer.lora_A.fill_(1.0)
            layer.lora_B.fill_(1.0)
            layer.lora_A.grad = g[:, None].expand_as(layer.lora_A).clone()   # (r,) -> (r, d_in)
            layer.lora_B.grad = g[None, :].expand_as(layer.lora_B).clone()   # (r,) -> (d_out, r)


def test_ties_are_broken_by_layer_order():
    model, config = adapted("alloc", t_init=1, t_final=1, delta_t=1)
    alloc = RankAllocator(model, config, total_steps=4)          # b(2) = 8 + floor(8 * 1 / 8) = 9
    for t in (1, 2):
        set_params_and_grads(alloc, {n: (1.0, 1.0) for n, _ in alloc.layers})
        alloc.step(t)
    assert list(alloc.rank_pattern().values()) == [4, 4, 1, 0]


def test_allocator_call_order_is_enforced():
    model, config = adapted("alloc", t_init=2, t_final=2)
    alloc = RankAllocator(model, config, total_steps=20)
    idx, y = batch()
    model(idx, y)[1].backward()
    alloc.step(1)
    with pytest.raises(RuntimeError, match="once per optimizer step"):
        alloc.step(1)
    with pytest.raises(ValueError, match="from 1"):
        RankAllocator(model, config, total_steps=20).step(0)
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="before zero_grad"):
        alloc.step(2)
    model(idx, y)[1].backward()
    model.zero_grad(set_to_none=False)
    with pytest.raises(RuntimeError, match="zero_grad"):
        alloc.step(2)
    model(idx, y)[1].backward()
    merge_adapters(model)
    with pytest.raises(RuntimeError, match="merged"):
        alloc.step(2)


def test_masks_and_allocator_state_survive_save_load(tmp_path):
    model, config = adapted("dynlora", t_init=1, t_final=2, delta_t=1)
    alloc = RankAllocator(model, config, total_steps=10)
    train_steps(model, 4, alloc)                                  # through three reallocations
    masks = {n: l.mask.clone() for n, l in alloc.layers}
    assert sum(m.sum().item() for m in masks.values()) < 16       # some components are off
    path = save_adapter(tmp_path / "a.pt", model, config, extra={"allocator": runs.allocator_state(alloc)})
    fresh = classifier()
    _, _, extra = load_adapter(path, fresh)
    alloc2 = RankAllocator(fresh, config, total_steps=10)
    runs.load_allocator_state(alloc2, extra["allocator"])
    for (n, l) in alloc2.layers:
        assert torch.equal(l.mask, masks[n])
        assert torch.equal(alloc2.ipt[n]["A"], alloc.ipt[n]["A"]) and torch.equal(alloc2.unc[n]["B"], alloc.unc[n]["B"])
    assert alloc2.last_step == 4 and alloc2.history == alloc.history
    # Both continue identically.
    train_steps(model, 2, alloc, start=5)
    train_steps(fresh, 2, alloc2, start=5)
    assert alloc2.rank_pattern() == alloc.rank_pattern()


# ---------------------------------------------------------------------------------------------------------
# AdaLoRA's orthogonality penalty, parameter counts, the method table
# ---------------------------------------------------------------------------------------------------------

def test_orthogonality_penalty():
    layer = LoRALinear(nn.Linear(6, 5), r=3, alpha=3.0, form="svd")
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(3, 6))       # orthonormal rows
        layer.lora_B.copy_(torch.eye(5, 3))       # orthonormal columns
    assert layer.orthogonality_penalty().item() == 0.0
    with torch.no_grad():
        layer.lora_A.mul_(2.0)                    # A A^T = 4 I: ||3 I||_F^2 / r = 9 r / r = 9
    assert layer.orthogonality_penalty().item() == pytest.approx(9.0)
    model, config = adapted("adalora", ortho_gamma=0.5)
    layers = adapter_layers(model)
    model(batch()[0])
    expected = 0.5 * torch.stack([l.orthogonality_penalty() for _, l in layers]).mean()
    assert torch.allclose(regularization_loss(model), expected)


def test_active_parameter_count():
    model, _ = adapted("dynlora")
    layers = adapter_layers(model)
    for (_, layer), k in zip(layers, [4, 2, 0, 3]):
        layer.mask.copy_(torch.arange(4) < k)
    # k (32 + 32) for A rows and B columns, + k (k + 1) + k for the gate's rows of W_g (over z and the one
    # projection P x) and biases, + the 1 x 32 projection P itself, which every component shares
    assert dynlora.active_parameter_count(model) == sum(k * 64 + k * (k + 1) + k + 32 for k in [4, 2, 0, 3])
    for _, layer in layers:                    # a gate that reads z only (the design before gate_x_dims)
        layer.gate = RankGate(4, d_in=32, x_dims=0)
    assert dynlora.active_parameter_count(model) == sum(k * 64 + k * k + k for k in [4, 2, 0, 3])


def test_method_table_and_presets():
    assert list(dynlora.METHODS) == ["lora", "alloc", "gate", "dynlora", "adalora"]
    assert dynlora.method_names() == ("full", "lora", "alloc", "gate", "dynlora", "adalora")
    assert dynlora.FULL == "full" and dynlora.GATES == {"rank": RankGate}
    for name in dynlora.METHODS:
        assert config_for_method(name).method == name
    cfg = config_for_method("dynlora", r=16, target_r=8)
    assert (cfg.allocation, cfg.gating, cfg.form, cfg.r) == (True, True, "plain", 16)
    assert config_for_method("adalora").form == "svd"
    with pytest.raises(ValueError, match="choose one of"):
        config_for_method("dora")
    with pytest.raises(ValueError, match="another method"):
        config_for_method("lora", allocation=True)
    with pytest.raises(ValueError, match="another method"):
        config_for_method("gate", gate="other")               # the gate is one of a method's switches
    assert AdapterConfig(gating=True, gate="rank").method == "gate"
    with pytest.raises(ValueError, match="unknown adapter option"):
        config_for_method("lora", rank=4)
    from dataclasses import asdict
    assert runs.adapter_config_from_dict({**asdict(cfg), "targets": ["q_proj", "v_proj"]}) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        runs.adapter_config_from_dict({"rank": 4})
    saved = asdict(cfg)
    del saved["gate"]                                         # a file written before the gate was named
    assert runs.adapter_config_from_dict(saved).gate == "rank"


def test_gate_flops_per_token_by_hand():
    # r = 8: W_g z = 2 * 8 * 8 = 128, bias 8, sigmoid 4 * 8 = 32, z * g 8 -> 176
    assert dynlora.gate_flops_per_token(8) == 176
    # + one projection of a 384-wide x: P x = 2 * 384 = 768, and W_g's extra column 2 * 8 = 16 -> 960
    assert dynlora.gate_flops_per_token(8, d_in=384, x_dims=1) == 960
    assert dynlora.gate_flops_per_token(8, 384, 1) == RankGate(8, d_in=384, x_dims=1).flops_per_token(8, 384, 1)


# --- The gates' own learning rate (gate_lr_mult) -------------------------------------------------------------

def test_make_optimizer_gives_the_live_gates_their_own_learning_rate():
    import train
    model, _ = adapted("gate")
    gate_ids = {id(p) for p in dynlora.gate_parameters(model)}
    assert gate_ids and len(gate_ids) == 3 * len(dynlora.live_gates(model))      # W_g, c and P of every gate
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(train.make_optimizer(model, 1e-3, 0.01).param_groups) == 2           # the layout before the option
    opt = train.make_optimizer(model, 1e-3, 0.01, gate_lr_mult=30)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in trainable)                          # every parameter, once
    for group in opt.param_groups:
        is_gate = {id(p) in gate_ids for p in group["params"]}
        assert len(is_gate) == 1                                                     # gates and the rest apart
        assert group["lr"] == pytest.approx(1e-3 * (30 if is_gate.pop() else 1))
    train.set_lr(opt, 2e-4)                                                          # the schedule keeps the factor
    assert sorted({round(g["lr"], 10) for g in opt.param_groups}) == [2e-4, 6e-3]


def test_gate_lr_mult_moves_the_gates_by_that_factor_more():
    import train
    moved = {}
    for mult in (1.0, 30.0):
        model, _ = adapted("gate", gate_penalty=0.1)
        opt = train.make_optimizer(model, 1e-3, 0.0, gate_lr_mult=mult)
        before = [m.gate.bias.detach().clone() for _, m in dynlora.live_gates(model)]
        idx = torch.randint(1, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
        for _ in range(5):
            _, loss = model(idx, torch.tensor([0, 1, 0, 1]))
            (loss + dynlora.regularization_loss(model)).backward()
            opt.step()
            opt.zero_grad()
        moved[mult] = sum((m.gate.bias - b).abs().mean().item() for (_, m), b in zip(dynlora.live_gates(model), before))
    assert moved[30.0] > 10 * moved[1.0] > 0


def test_gate_lr_mult_must_be_positive():
    with pytest.raises(ValueError, match="gate_lr_mult must be a finite number > 0"):
        AdapterConfig(gate_lr_mult=0.0)


# ---------------------------------------------------------------------------------------------------------
# bf16 autocast (--precision auto picks it on CPUs that compute bf16 natively): the matmuls' inputs go to bf16,
# nothing else does. bf16 keeps 8 bits of mantissa (relative rounding 2^-9), so values that pass through a few
# matmuls agree with fp32 to about 1%; the tolerances below are a few times that.

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def test_under_bf16_autocast_the_gates_agree_with_fp32():
    model, _ = adapted("dynlora", seed=1)
    randomize_B(model)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in live_gates(model):                       # gates that vary with the input
            layer.gate.weight.copy_(torch.randn(layer.gate.weight.shape, generator=g))
    idx, _ = batch(B=4, T=12)
    model.eval()
    values = {}
    for name, ctx in (("fp32", torch.autocast(enabled=False, **BF16)), ("bf16", torch.autocast(**BF16))):
        with analysis.gate_values(model) as recorded, torch.no_grad(), ctx:
            logits, _ = model(idx)
        values[name] = (recorded.values(), logits.float())
    for layer, g32 in values["fp32"][0].items():
        g16 = values["bf16"][0][layer]
        assert g16.dtype == torch.bfloat16                            # the gate really ran in bf16 ...
        assert (g16.float() - g32).abs().max() < 0.03                  # ... and agrees with fp32
        assert g32.std() > 0.05                                       # (gates that do depend on the input)
    assert torch.allclose(values["bf16"][1], values["fp32"][1], atol=0.05, rtol=0.05)


def test_under_bf16_autocast_everything_trained_and_the_allocator_scores_stay_fp32_and_agree():
    ipt = {}
    for precision in ("fp32", "bf16"):
        model, config = adapted("dynlora", seed=2)
        randomize_B(model)
        allocator = RankAllocator(model, config, total_steps=500)
        idx, y = batch(B=4, T=12)
        with torch.autocast(enabled=precision == "bf16", **BF16):
            _, loss = model(idx, y)
            loss = loss + regularization_loss(model)
        assert loss.dtype == torch.float32                            # the loss (and the penalty) in fp32
        loss.backward()
        trained = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trained)
        opt = torch.optim.AdamW(trained, lr=1e-3)
        opt.step()
        assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values() if v.dim())
        allocator.step(1)
        ipt[precision] = torch.cat([s.reshape(-1) for layer in allocator.ipt.values() for s in layer.values()])
        assert ipt[precision].dtype == torch.float32
    rel = (ipt["bf16"] - ipt["fp32"]).norm() / ipt["fp32"].norm()
    assert 0 < rel < 0.05                                             # bf16 did change them, but not by much


def test_merging_inside_an_autocast_block_gives_the_fp32_merge_exactly():
    merged = {}
    for precision in ("fp32", "bf16"):
        model, _ = adapted("lora", seed=3)
        randomize_B(model)
        with torch.autocast(enabled=precision == "bf16", **BF16):
            merge_adapters(model)
        merged[precision] = {n: m.base.weight.clone() for n, m in adapter_layers(model)}
        assert all(w.dtype == torch.float32 for w in merged[precision].values())
    for name, w in merged["fp32"].items():
        assert torch.equal(merged["bf16"][name], w)
    # and the merged model's bf16 forward pass agrees with the unmerged one's
    model, _ = adapted("lora", seed=3)
    randomize_B(model)
    idx, _ = batch()
    with torch.no_grad(), torch.autocast(**BF16):
        before = model(idx)[0].float()
        merge_adapters(model)
        after = model(idx)[0].float()
    assert torch.allclose(before, after, atol=0.05, rtol=0.05)
