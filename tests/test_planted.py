"""Tests of planted.py, the known-answer benchmark: its metrics by hand, its teacher, and one tiny case of each
scenario that fails when the mechanism it tests is broken.

The model is model.preset("nano") at random init (2 blocks, width 32, q_proj and v_proj adapted: 4 layers) on
the fixtures' text; a student trains in about a second.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch

import data
import dynlora
import planted
import runs
from conftest import FIXTURES, cli
from planted import PlantedConfig


TINY = dict(data_dir=str(FIXTURES), preset="nano", vocab_size=300, max_len=16, train_windows=256,
            heldout_windows=64, rank=2, alloc_rank=4, heterogeneous_ranks="4,0,0,4", steps=150, batch_size=16,
            t_init=20, t_final=50, delta_t=5, backbone="", threads=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, frozen nano backbone, token streams) shared by the scenario tests."""
    cfg = PlantedConfig(**TINY, out_dir=str(tmp_path_factory.mktemp("planted")))
    texts = planted.read_texts(cfg)
    base, tok, _ = planted.load_backbone(cfg, texts[0])
    return cfg, base, (data.lm_stream(tok, texts[0]), data.lm_stream(tok, texts[1]))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# Metrics, by hand
# ---------------------------------------------------------------------------------------------------------

def diff_to_lora(diffs):
    """planted.summarize's paired interval (runs.paired_ci) of a method whose seeds differ from lora by diffs."""
    rows = [dict(scenario="input", method=m, seed=s, rel_error=(0.5 + d if m == "alloc" else 0.5))
            for s, d in enumerate(diffs) for m in ("lora", "alloc")]
    return next(r for r in planted.summarize(rows) if r["method"] == "alloc")["diff_to_lora"]


def test_paired_interval_against_a_hand_computation():
    d = [0.1, -0.2, 0.3, 0.0, 0.4]
    mean, lo, hi = diff_to_lora(d)
    # mean 0.12; sample sd = sqrt(sum (d - 0.12)^2 / 4) = sqrt(0.228 / 4) = 0.238747; t_{0.975, 4} = 2.776
    half = 2.776 * math.sqrt(0.228 / 4) / math.sqrt(5)
    assert mean == pytest.approx(0.12)
    assert (lo, hi) == pytest.approx((0.12 - half, 0.12 + half))
    assert diff_to_lora([1.0, 3.0])[1:] == pytest.approx((2 - 12.706, 2 + 12.706))   # df 1, sd sqrt(2)
    assert runs.T95[29] == 2.042 and len(runs.T95) == 30
    big = diff_to_lora(np.arange(40.0) / 100)                                            # df 39: normal
    assert big[2] - big[0] == pytest.approx(1.96 * (np.arange(40.0) / 100).std(ddof=1) / math.sqrt(40))
    assert all(math.isnan(v) for v in diff_to_lora([0.5])[1:])                          # one pair: no interval
    assert all(math.isnan(v) for v in diff_to_lora([0.25, 0.25])[1:])                   # equal differences: none


def test_budget_share_and_rank_correlation():
    planted_ranks = [6, 0, 6, 0]
    assert planted.budget_share([4, 4, 4, 4], planted_ranks) == 0.5            # LoRA's uniform ranks
    assert planted.budget_share([6, 1, 6, 3], planted_ranks) == 12 / 16
    assert planted.budget_share([4, 4, 4, 4], [4, 4, 4, 4]) is None            # every layer planted
    assert planted.rank_correlation([6, 1, 6, 3], planted_ranks) == pytest.approx(
        np.corrcoef([3.5, 1, 3.5, 2], [3.5, 1.5, 3.5, 1.5])[0, 1])            # Pearson of the (average) ranks
    assert planted.rank_correlation([4, 4, 4, 4], planted_ranks) is None       # undefined for a constant
    assert planted.rank_correlation([1, 2, 3, 4], [2, 2, 2, 2]) is None


def test_relative_error_is_one_for_a_student_that_learned_nothing(tiny):
    cfg, base, streams = tiny
    setting = planted.make_setting(base, streams, cfg, "heterogeneous", 0)
    h = torch.randn(2, 3, 4)
    assert planted.relative_error(h, h + 1, h) == 1.0 and planted.relative_error(h + 1, h + 1, h) == 0.0
    for method in ("lora", "dynlora", "adalora"):      # adapters applied, not trained: B = 0 (lambda = 0)
        student = dynlora.apply_lora(copy.deepcopy(base), planted.student_config(cfg, method))
        student.eval()
        scores = planted.score_student(student, setting.heldout, setting.h_teacher, setting.h_base, setting.kinds)
        assert scores["rel_error"] == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------------------

def test_the_teacher_plants_what_it_says(tiny):
    cfg, base, streams = tiny
    setting = planted.make_setting(base, streams, cfg, "heterogeneous", 1)
    layers = dict(planted.planted_layers(setting.teacher))
    names = planted.target_layers(base, cfg.target_list)
    assert setting.info["planted_ranks"] == [4, 0, 0, 4]
    assert [n in layers for n in names] == [True, False, False, True]          # rank-0 layers stay nn.Linear
    calib = setting.train_idx[:64]
    for name in layers:
        layer = layers[name]
        x = planted.layer_input(setting.teacher, name, calib)                 # (N, d_in)
        z = x @ layer.A.t()                                                    # the read-outs a_i . x
        assert torch.allclose(z.t() @ z / len(z), torch.eye(4), atol=1e-3)    # unit mean square, uncorrelated
        assert torch.allclose(layer.O.t() @ layer.O, torch.eye(4), atol=1e-5)
    # Each planted component moves the final hidden state by about `effect` (RMS, relative to the base's):
    # four components in each of two layers -> a relative change of about 8 * effect^2.
    assert setting.info["teacher_change"] == pytest.approx(8 * cfg.effect ** 2, rel=0.35)


def test_input_teacher_splits_tokens_into_two_kinds(tiny):
    cfg, base, streams = tiny
    setting = planted.make_setting(base, streams, cfg, "input", 0)
    layers = planted.planted_layers(setting.teacher)
    assert len(layers) == 4 and all(m.gated for _, m in layers)
    for name, layer in layers:
        assert layer.kinds.tolist() == [0, 1]                                  # k = 2: one component per kind
        assert 0.3 < setting.kinds[name].float().mean() < 0.7                  # balanced on held-out text too
        x = planted.layer_input(setting.teacher, name, setting.train_idx[:64])
        z, u = x @ layer.A.t(), x @ layer.direction
        corr = (z * u[:, None]).mean(0) / (z.square().mean(0) * u.square().mean()).sqrt()
        assert corr.abs().max() < 1e-3                                         # z carries no linear trace of u . x
    # A token of kind 0 gets component 0 only, a token of kind 1 component 1 only.
    name, layer = layers[0]
    x = planted.layer_input(setting.teacher, name, setting.train_idx[:4])
    kind = layer.kind(x)
    delta = layer(x) - layer.base(x)
    expected = layer.sigma * (x @ layer.A.t()) * torch.stack([kind == 0, kind == 1], -1) @ layer.O.t()
    assert torch.allclose(delta, expected, atol=1e-5)


def test_config_checks():
    with pytest.raises(ValueError, match="unknown"):
        PlantedConfig(scenarios="heterogeneous,sideways")
    with pytest.raises(ValueError, match="--alloc-rank"):
        PlantedConfig(rank=4, alloc_rank=2)
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        PlantedConfig(seeds=0)
    with pytest.raises(ValueError, match="even --rank"):
        PlantedConfig(rank=3, alloc_rank=6)
    with pytest.raises(ValueError, match="--adapter"):
        PlantedConfig(adapter="r=3")
    assert PlantedConfig(adapter="gate_penalty=0.01, gate_x_dims=2").adapter_overrides() == \
        {"gate_penalty": 0.01, "gate_x_dims": 2}
    with pytest.raises(ValueError, match="one rank per layer"):
        planted.planted_ranks(PlantedConfig(heterogeneous_ranks="6,0"), "heterogeneous", 8)


# ---------------------------------------------------------------------------------------------------------
# One tiny case of each scenario
# ---------------------------------------------------------------------------------------------------------

def test_heterogeneous_allocation_finds_the_planted_layers(tiny):
    cfg, base, streams = tiny
    good = []
    for seed in (0, 1):
        setting = planted.make_setting(base, streams, cfg, "heterogeneous", seed)
        good.append(planted.run_one(base, setting, cfg, "heterogeneous", "alloc", seed))
    lora = planted.run_one(base, setting, cfg, "heterogeneous", "lora", 1)
    assert lora["budget_share"] == 0.5                                         # uniform: 2 of 4 layers planted
    assert np.mean([r["budget_share"] for r in good]) >= 0.75                  # most of the budget where it belongs
    assert all(r["rank_spearman"] > 0.5 for r in good)
    assert all(r["rel_error"] < 0.2 for r in good)
    assert good[1]["rel_error"] < lora["rel_error"] - 0.05                     # and it pays off


def test_heterogeneous_a_broken_allocator_does_not(tiny, monkeypatch):
    """Scores that know nothing (random): the same schedule spreads the budget by chance and the error stays
    near LoRA's (the test above: the working allocator's share >= 0.75, its error < 0.2)."""
    cfg, base, streams = tiny
    monkeypatch.setattr(dynlora, "importance_score", lambda ipt, unc: torch.rand(ipt["A"].shape[0]))
    broken = [planted.run_one(base, planted.make_setting(base, streams, cfg, "heterogeneous", seed), cfg,
                              "heterogeneous", "alloc", seed) for seed in (0, 1)]
    assert np.mean([r["budget_share"] for r in broken]) <= 0.7
    assert all(r["rel_error"] > 0.2 for r in broken)


class ConstantGate(dynlora.RankGate):
    """A gate forced constant: g = sigmoid(c) for every token (c still learns; W_g and P are never used)."""

    def forward(self, u, mask=None):
        g = torch.sigmoid(self.bias).expand(*u.shape[:-1], self.r)              # (r,) -> (..., r)
        self.record(g, mask)
        return g


def test_input_learned_gate_beats_a_constant_gate_and_depends_on_the_kind(tiny, monkeypatch):
    cfg, base, streams = tiny
    monkeypatch.setitem(dynlora.GATES, "constant", ConstantGate)               # the gate method with this gate
    monkeypatch.setitem(dynlora.METHODS, "constant", {**dynlora.METHODS["gate"], "gate": "constant"})
    for seed in (0, 1):
        setting = planted.make_setting(base, streams, cfg, "input", seed)
        learned = planted.run_one(base, setting, cfg, "input", "gate", seed)
        constant = planted.run_one(base, setting, cfg, "input", "constant", seed)
        assert learned["rel_error"] < constant["rel_error"] - 0.03
        assert learned["gate_mi_bits"] > 0.1 and constant["gate_mi_bits"] == 0.0
        assert learned["rel_error_frozen_gates"] > learned["rel_error"] + 0.03   # the input dependence is what helps
        assert learned["gate_var_tokens"] > 10 * constant["gate_var_tokens"] + 0.01


def test_input_a_gate_that_reads_only_z_stays_a_static_switch(tiny):
    """The measurement behind chapter 2's design: the teacher's kind is invisible in z = A x (see planted.py),
    so the former gate sigmoid(W_g z + c) learns next to nothing about it."""
    cfg, base, streams = tiny
    zcfg = PlantedConfig(**{**TINY, "adapter": "gate_x_dims=0,gate_penalty=0.05"}, out_dir=cfg.out_dir)
    setting = planted.make_setting(base, streams, zcfg, "input", 0)
    z_only = planted.run_one(base, setting, zcfg, "input", "gate", 0)
    default = planted.run_one(base, setting, cfg, "input", "gate", 0)
    assert z_only["gate_mi_bits"] < 0.1 < default["gate_mi_bits"]
    assert default["rel_error"] < z_only["rel_error"] - 0.03


def test_homogeneous_no_method_is_much_better_than_lora(tiny):
    cfg, base, streams = tiny
    setting = planted.make_setting(base, streams, cfg, "homogeneous", 0)
    errors = {m: planted.run_one(base, setting, cfg, "homogeneous", m, 0)["rel_error"]
              for m in ("lora", "alloc", "gate", "dynlora")}
    assert errors["lora"] < 0.1                                                # static LoRA fits the teacher
    assert all(e > errors["lora"] - 0.03 for e in errors.values())


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------

def test_cli_writes_one_line_per_run_and_a_plot_and_resumes(tmp_path):
    out, res = tmp_path / "run", tmp_path / "res"
    args = ["planted", "--scenarios", "heterogeneous", "--methods", "lora,alloc", "--seeds", "2", "--steps", "60",
            "--t-init", "10", "--t-final", "20", "--out-dir", out, "--results-dir", res]
    for key, value in TINY.items():
        if key not in ("steps", "t_init", "t_final"):
            args += ["--" + key.replace("_", "-"), value]
    code, message = cli(*args)
    assert code == 0, message
    lines = [json.loads(line) for line in (res / "planted.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"]) for r in lines] == [("lora", 0), ("alloc", 0), ("lora", 1), ("alloc", 1)]
    for r in lines:
        assert {"rel_error", "budget_share", "rank_spearman", "wall_s", "machine", "commit", "adapter_config"} <= set(r)
        assert r["planted_ranks"] == [4, 0, 0, 4] and sum(r["final_ranks"]) == 8
    for folder in (out, res / "planted"):
        assert (folder / "planted_heterogeneous.png").stat().st_size > 1000
        assert "| heterogeneous | alloc | 2 |" in (folder / "summary.md").read_text()
    code, message = cli(*args)                                                 # everything done: nothing rerun
    assert code == 0, message
    assert len((res / "planted.jsonl").read_text().splitlines()) == 4


def test_append_jsonl_appends_whole_lines_once_and_names_a_bad_line(tmp_path):
    import runs
    path = tmp_path / "sub" / "x.jsonl"
    assert runs.load_jsonl(path) == []
    assert runs.append_jsonl(path, {"run_id": "a", "v": 1}) and not runs.append_jsonl(path, {"run_id": "a", "v": 2})
    assert runs.append_jsonl(path, {"v": 3}) and runs.append_jsonl(path, {"v": 3})   # no key: always appended
    assert runs.load_jsonl(path) == [{"run_id": "a", "v": 1}, {"v": 3}, {"v": 3}]
    with open(path, "a") as fh:
        fh.write('{"cut": \n')
    with pytest.raises(ValueError, match=r"x.jsonl:4: not a JSON line"):
        runs.load_jsonl(path)


def test_help_lists_every_flag_with_its_comment(capsys):
    code, _ = cli("planted", "--help")
    out = " ".join(capsys.readouterr().out.split())                           # argparse wraps the lines
    assert code == 0 and "--heterogeneous-ranks" in out and "cosine decay to a tenth" in out


def test_the_students_precision_is_part_of_a_result_only_when_it_is_not_fp32(monkeypatch):
    import runtime
    fp32 = planted.PlantedConfig()
    assert "precision" not in fp32.result_settings()          # the fp32 results made before it existed keep their ids
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: True)
    bf16, auto = planted.PlantedConfig(precision="bf16"), planted.PlantedConfig(precision="auto")
    assert bf16.result_settings()["precision"] == auto.result_settings()["precision"] == "bf16"
    assert planted.run_id(bf16, "input", "gate", 0) != planted.run_id(fp32, "input", "gate", 0)
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: False)
    assert planted.run_id(planted.PlantedConfig(precision="auto"), "input", "gate", 0) == \
        planted.run_id(fp32, "input", "gate", 0)                # auto resolves to fp32 here: the same result
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA device"):
        planted.PlantedConfig(precision="fp16")


def _precision_rows(errors: dict) -> list:
    """Benchmark lines from {(scenario, method): [rel_error per seed]}."""
    return [dict(scenario=s, method=m, seed=i, rel_error=e) for (s, m), es in errors.items() for i, e in enumerate(es)]


def test_the_precision_table_pairs_by_seed_and_flags_a_shift_beyond_the_seeds_spread_and_a_changed_verdict():
    fp32 = {("input", "lora"): [0.50, 0.52, 0.48], ("input", "gate"): [0.30, 0.33, 0.27],
            ("heterogeneous", "lora"): [0.20, 0.22, 0.18], ("heterogeneous", "alloc"): [0.19, 0.23, 0.18]}
    same = planted.precision_table(_precision_rows(fp32), _precision_rows(fp32))
    assert "| input | gate | 3 |" in same and "| +0.0000 | yes | better |" in same      # equal: no interval, kept
    assert "4 of 4 (scenario, method) rows within the fp32 seeds' spread; the verdict against LoRA the same in 2 of 2" \
        in same
    # bf16 moves gate up by 0.2 +- 0.001 on every seed: far beyond fp32's sd (0.03), and gate now ties LoRA
    bf16 = {**fp32, ("input", "gate"): [0.50, 0.531, 0.469]}
    shifted = planted.precision_table(_precision_rows(fp32), _precision_rows(bf16))
    gate = next(line for line in shifted.splitlines() if line.startswith("| input | gate |"))
    assert "**no**" in gate and "**better → tie**" in gate and "[+0.1" in gate
    assert "3 of 4 (scenario, method) rows" in shifted and "the same in 1 of 2" in shifted
    # a shift as large as the spread but within it: the interval may exclude 0, the row stays "yes"
    small = {**fp32, ("heterogeneous", "alloc"): [0.20, 0.241, 0.19]}          # +0.01, +0.011, +0.01
    alloc = next(line for line in planted.precision_table(_precision_rows(fp32), _precision_rows(small)).splitlines()
                 if line.startswith("| heterogeneous | alloc |"))
    assert "| yes |" in alloc, alloc
