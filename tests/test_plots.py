"""plots.py's drawings that the notebooks show: the adapted layer's diagram names the terms it draws."""

import matplotlib.pyplot as plt
import pytest

import plots


@pytest.mark.parametrize("gate, allocation, term", [(True, True, r"m \odot g(x)"), (True, False, "g(x)"),
                                                   (False, True, "m"), (False, False, None)])
def test_the_adapter_diagram_draws_the_formula_of_its_switches(gate, allocation, term, tmp_path):
    fig = plots.adapter_diagram(gate=gate, allocation=allocation, path=tmp_path / "d.png")
    title = fig.axes[0].get_title()
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    plt.close(fig)
    assert (tmp_path / "d.png").stat().st_size > 0
    if term is None:
        assert "diag" not in title and "B A x" in title.replace("BA", "B A"), title
    else:
        assert rf"\mathrm{{diag}}({term})" in title, title
    assert ("W_g" in texts) == gate and ("allocator" in texts) == allocation, texts


# ---------------------------------------------------------------------------------------------------------
# GLUE results (notebook 7)

def _texts(fig):
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_glue_scores_draws_the_majority_line_or_names_it_when_far_off(tmp_path):
    scores = {"RTE": {"lora": {0: 55.0, 1: 57.0}, "gate": {0: 56.0}}, "STS-B": {"lora": {0: 69.0, 1: 70.0}}}
    fig = plots.glue_scores(scores, {"RTE": 52.7, "STS-B": 0.0}, {"RTE"}, "t", path=tmp_path / "s.png")
    rte, stsb = fig.axes
    assert (tmp_path / "s.png").stat().st_size > 0
    assert rte.get_ylim()[0] < 52.7 and "majority" not in " ".join(t.get_text() for t in rte.texts)
    assert stsb.get_ylim()[0] > 50 and "majority class 0.0" in " ".join(t.get_text() for t in stsb.texts)
    assert "†" in rte.get_title() and "†" not in stsb.get_title()
    assert [t.get_text() for t in rte.get_xticklabels()] == ["lora\nn=2", "gate\nn=1"]
    assert {t.get_text() for t in fig.legends[0].get_texts()} >= {"seed 0 (final model)", "seed 1 (final model)"}
    plt.close(fig)
    assert plots.glue_scores({"RTE": {}}, {}, set(), "t") is None


def test_glue_paired_stars_an_interval_that_excludes_zero_and_leaves_out_unpaired_methods():
    intervals = {"RTE": {"alloc": (2.0, 1.0, 3), "gate": (0.5, 2.0, 3), "full": (4.0, None, 1),
                         "adalora": (float("nan"), None, 0)}}
    fig = plots.glue_paired(intervals, {"RTE": (1.5, 3)}, set(), "t")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["alloc\nn=3\ndf=2", "gate\nn=3\ndf=2", "full\nn=1"]
    markers = [line.get_marker() for line in ax.get_lines() if line.get_linestyle() in ("None", "")]
    assert markers.count("*") == 1
    plt.close(fig)
    assert plots.glue_paired({"RTE": {"gate": (float("nan"), None, 0)}}, {}, set(), "t") is None


def test_why_it_ties_puts_each_measure_in_its_panel_at_its_task_or_projection():
    suite = {"scores": {"CoLA": {"majority": 0.0, "zero-shot": -2.0, "lora": 14.0, "full": 21.0},
                        "RTE": {"majority": 52.7, "zero-shot": None, "lora": 57.0, "full": None}},
             "resolvable": {"CoLA": (8.2, 3), "RTE": (None, 0)}, "rank": {"smollm2-r4": {"RTE": (-0.2, 0.8, 5)}},
             "gates": {"gate": {"CoLA": (8.0, 0.0, 0.0)}}, "projections": {"alloc": {"q_proj": 0.8, "v_proj": 1.2}}}
    control = {"alloc": {"q_proj": 0.7, "v_proj": 1.3}, "adalora": {"q_proj": 0.9, "v_proj": 1.1}}
    fig = plots.why_it_ties({"suites": {"smollm2": suite}, "control": control}, 1.0, {"smollm2": "short recipe"})
    adds, floor, rank, gates, alloc = fig.axes[:5]

    def points(ax):                                     # (x, y) of every marker drawn without a line
        return sorted((round(x, 2), round(y, 2)) for line in ax.get_lines() if line.get_linestyle() in ("None", "")
                      for x, y in zip(line.get_xdata(), line.get_ydata()))
    assert points(adds) == [(0, -2.0), (0, 0.0), (0, 14.0), (0, 21.0), (1, 52.7), (1, 57.0)]   # CoLA 0, RTE 1
    assert [round(b.get_height(), 1) for b in floor.patches] == [8.2]            # RTE has no resolvable difference
    assert (1, -0.2) in points(rank) and "r=4" in _texts(fig)
    assert (0, 8.0) in points(gates)
    assert [t.get_text() for t in alloc.get_xticklabels()] == ["q", "v"]
    assert points(alloc) == [(-0.1, 0.7), (-0.1, 0.8), (0.1, 0.9), (0.9, 1.2), (0.9, 1.3), (1.1, 1.1)]   # by control
    assert "short recipe" in {t.get_text() for t in fig.legends[0].get_texts()}
    plt.close(fig)
    assert plots.why_it_ties({"suites": {}, "control": control}) is None


def test_glue_merged_costs_needs_a_merged_run():
    assert plots.glue_merged_costs({"RTE": {"gate": [], "dynlora": []}}, "t") is None
    fig = plots.glue_merged_costs({"RTE": {"gate": [-1.0, 0.5]}, "MRPC": {"gate": [0.0]}}, "t")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["RTE", "MRPC"]
    plt.close(fig)


def _history(steps, ranks_at):
    layers = ["a", "b"]
    return [{"step": t, "budget": sum(ranks_at(t)), "ranks": dict(zip(layers, ranks_at(t))),
             "importance": {"a": 1.0, "b": 2.0}} for t in steps]


def test_the_rank_timeline_covers_the_whole_run_with_cells_on_their_steps(tmp_path):
    # Reallocations at steps 6, 9, 12 (t_init = 3, delta_t = 3) of a 16-step run; r = 4 in both layers before.
    history = _history([6, 9, 12], lambda t: (4 - t // 6, t // 6))
    edges, ranks, layers = plots.rank_timeline(history, total_steps=16, initial_ranks={"a": 4, "b": 4})
    assert layers == ["a", "b"]
    assert edges.tolist() == [0, 6, 9, 12, 16]                 # warm-up cell from 0, final cell to T
    assert ranks.tolist() == [[4, 4], [3, 1], [3, 1], [2, 2]]  # the masks set at step s act on steps s+1..
    # Without the run's length: the reallocations only, the last one a cell of one step.
    edges, ranks, _ = plots.rank_timeline(history)
    assert edges.tolist() == [6, 9, 12, 13] and len(ranks) == 3
    # No final phase: the masks set at the last step act on no step, so they get no cell.
    assert plots.rank_timeline(history, total_steps=12)[0].tolist() == [6, 9, 12]
    with pytest.raises(ValueError, match="before the last reallocation"):
        plots.rank_timeline(history, total_steps=11)
    paths = plots.allocation_plots(history, tmp_path, total_steps=16, initial_ranks={"a": 4, "b": 4})
    assert [p.name for p in paths] == ["rank_heatmap.png", "layer_importance.png", "budget.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert plots.allocation_plots([], tmp_path) == []
