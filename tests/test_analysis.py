"""Tests of analysis.py: the gate recorders and the gate metrics, by hand. (The `gates` command runs end to
end in test_train.py.)"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from analysis import gate_statistics, gate_values, gate_variances, mutual_information_bits, open_pattern
from dynlora import adapter_layers
from test_dynlora import adapted, batch


# ---------------------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------------------

def test_gate_statistics_counts_real_tokens_only():
    model, _ = adapted("dynlora")
    layers = adapter_layers(model)
    layers[0][1].mask[0] = 0.0                 # 3 of 4 components active in the first layer
    idx, _ = batch(B=2, T=6)
    idx[0, 4:] = 0                             # two pad positions (pad_id = 0)
    with gate_statistics(model, pad_id=0) as stats, torch.no_grad():
        model.eval()
        model(idx)
    hist = stats.histogram()
    # At init every gate is sigmoid(gate_init) = 0.73 > 0.5: each of the 10 real positions has all active gates open.
    assert hist[layers[0][0]] == [0, 0, 0, 10, 0]
    assert hist[layers[1][0]] == [0, 0, 0, 0, 10]
    assert stats.mean_effective_rank()[layers[0][0]] == 3.0
    assert all(l.gate.recorder is None for _, l in layers)       # the context leaves nothing behind


def test_gate_values_keeps_the_active_gates_of_the_real_tokens():
    model, _ = adapted("dynlora")
    layers = adapter_layers(model)
    for _, layer in layers:                    # gates that differ per token and per component
        nn.init.normal_(layer.gate.weight, std=2.0, generator=torch.Generator().manual_seed(3))
    layers[0][1].mask[1] = 0.0                 # component 1 of the first layer switched off by allocation
    idx, _ = batch(B=2, T=6)
    idx[1, 3:] = 0                             # three pad positions (pad_id = 0)
    real = (idx != 0).reshape(-1)
    name, layer = layers[0]
    seen = []
    layer.gate.register_forward_hook(lambda module, args, g: seen.append(g.detach()))
    with gate_values(model, pad_id=0) as values, torch.no_grad():
        model.eval()
        model(idx)
    got = values.values()
    expected = seen[0].reshape(-1, layer.r)[real][:, [0, 2, 3]]  # (B T, r) -> (9, 3): real rows, active columns
    assert got[name].shape == (9, 3)
    assert torch.equal(got[name], expected)
    assert got[name].std(0).min() > 0.01       # the test's gates do vary across tokens
    assert got[layers[1][0]].shape == (9, 4)
    assert all(l.gate.recorder is None for _, l in layers)       # the context leaves nothing behind
    with pytest.raises(ValueError, match="no input-driven gates"):
        with gate_values(adapted("lora")[0]):
            pass


# ---------------------------------------------------------------------------------------------------------
# Metrics, by hand
# ---------------------------------------------------------------------------------------------------------

def test_mutual_information_on_hand_examples():
    kind = [0, 0, 1, 1]
    assert mutual_information_bits([5, 5, 9, 9], kind) == pytest.approx(1.0)   # the pattern is the kind
    assert mutual_information_bits([3, 3, 3, 3], kind) == pytest.approx(0.0)   # a constant pattern
    assert mutual_information_bits([0, 1, 0, 1], kind) == pytest.approx(0.0)   # independent of the kind
    # joint p(0,0) = 1/2, p(1,0) = 0, p(0,1) = 1/4, p(1,1) = 1/4; p(x) = (3/4, 1/4), p(y) = (1/2, 1/2):
    # I = 1/2 log2(4/3) + 1/4 log2(2/3) + 1/4 log2(2) = 0.311278
    assert mutual_information_bits([0, 0, 0, 1], kind) == pytest.approx(
        0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25, abs=1e-12)
    with pytest.raises(ValueError, match="1-D arrays of one length"):
        mutual_information_bits([0, 1], [0, 1, 1])


def test_open_pattern_codes_the_open_components():
    g = torch.tensor([[0.9, 0.1, 0.6], [0.2, 0.8, 0.4], [0.9, 0.1, 0.6]])
    assert open_pattern(g).tolist() == [1 + 4, 2, 1 + 4]


def test_gate_variances_split_tokens_from_layers():
    # Layer a: component 0 is 0 or 1 by token (variance 1/4), component 1 always 1/2. Layer b: always 1.
    a = torch.tensor([[0.0, 0.5], [1.0, 0.5], [0.0, 0.5], [1.0, 0.5]])
    b = torch.ones(4, 2)
    v = gate_variances({"a": a, "b": b})
    assert v["gate_var_tokens"] == pytest.approx((0.25 + 0 + 0 + 0) / 4)
    assert v["gate_var_layers"] == pytest.approx(0.0625)                       # layer means 0.5 and 1
    assert v["gate_var_components"] == pytest.approx(np.var([0.5, 0.5, 1, 1]))
