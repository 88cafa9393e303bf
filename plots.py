"""
plots.py -- the figures a run writes next to its metrics (matplotlib, PNG, no screen needed).

  pretrain_curves     training and held-out loss of causal-LM pretraining
  finetune_curves     training loss per step and the dev score per epoch of a fine-tuning run
  rank_timeline       for rank allocation: the rank of each layer as cells on the optimizer-step axis
  allocation_plots    for rank allocation: rank per layer over training (heat map, warm-up and final phase
                      included when given the run's length), layer importance over training, and the budget
  effective_rank_hist for rank gating: how many rank components the gates switch on, per token
  planted_scenario    the known-answer benchmark (planted.py), one scenario: held-out relative error per
                      method and seed, final rank per layer against the planted rank, and how much the
                      gates depend on the input
  adapter_diagram     the adapted layer h = W0 x + b + s B diag(m * g(x)) A x drawn as a data flow (the
                      notebooks show it in chapters 2-4)
  GLUE results        notebook 7's figures of one suite, one panel per task: glue_scores (a dot per seed, the
                      mean, the majority-class line), glue_paired (the paired differences to LoRA with their
                      95% t intervals, a line at 0, the smallest resolvable difference as a band) and
                      glue_merged_costs (merged minus best-epoch score of the gated runs)
  why_it_ties         notebook 7's figure of what decides a GLUE comparison, per suite (report.tie_evidence):
                      what training adds, the noise floor, LoRA's rank, the gates, allocation against its control
  headline            the README's figure (report.headline_numbers): each dynamic method minus LoRA with its 95%
                      interval, on GLUE and in each scenario of the known-answer benchmark

Each function takes plain Python data (lists of dicts from the metrics log, or dicts of arrays), so the
notebooks can call them on saved runs.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # render to files; no display is needed (or available on servers)
import matplotlib.pyplot as plt
import numpy as np

import dynlora


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pretrain_curves(log: list, path):
    """log: dicts with step, train_loss and (some) val_loss."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in log], [r["train_loss"] for r in log], lw=0.8, label="train (batch)")
    val = [r for r in log if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="held-out")
    ax.set(title="Causal-LM pretraining", xlabel="optimizer step", ylabel="cross-entropy (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def finetune_curves(history: list, task: str, path):
    """history: dicts with step and train_loss (during epochs) or score (after each epoch's eval)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    train = [r for r in history if "train_loss" in r]
    ax1.plot([r["step"] for r in train], [r["train_loss"] for r in train], lw=0.8)
    ax1.set(title=f"{task}: training loss", xlabel="optimizer step", ylabel="loss (per example)")
    ax1.grid(alpha=0.3)
    evals = [r for r in history if "score" in r]
    ax2.plot([r["epoch"] for r in evals], [100 * r["score"] for r in evals], "o-")
    ax2.set(title=f"{task}: dev score", xlabel="epoch", ylabel="GLUE score x 100")
    ax2.grid(alpha=0.3)
    _save(fig, path)


def rank_timeline(history: list, total_steps: int | None = None, initial_ranks: dict | None = None):
    """The rank of every layer over training as cells on the optimizer-step axis: (edges, ranks, layers).

    history: the RankAllocator's records (a record at step s holds the ranks the masks have after the
    reallocation at the end of step s). Step t (t = 1..T) is drawn as the interval [t - 1, t], so the masks set
    at step s_i act on steps s_i + 1 .. s_{i+1}: the cell [s_i, s_{i+1}]. With initial_ranks (layer -> r, the
    ranks before any reallocation) a first cell [0, s_1] holds the warm-up and the steps up to the first
    reallocation; with total_steps T the last record's cell runs to T (the final phase, masks frozen; with no
    final phase, a reallocation at step T acts on no step and has no cell). Without them the axis starts at
    s_1 and the last record gets a cell of one step.
    Returns edges (n + 1,) in optimizer steps, ranks (n, L) ints and the L layer names.
    """
    layers = list(history[0]["ranks"])
    steps = [h["step"] for h in history]
    ranks = [[h["ranks"][name] for name in layers] for h in history]
    if initial_ranks is not None:
        steps, ranks = [0] + steps, [[initial_ranks[name] for name in layers]] + ranks
    end = total_steps if total_steps is not None else steps[-1] + 1
    if end < steps[-1]:
        raise ValueError(f"rank_timeline: total_steps ({end}) comes before the last reallocation ({steps[-1]})")
    if end == steps[-1] and len(steps) > 1:           # t_final = 0: the last masks act on no training step
        steps, ranks = steps[:-1], ranks[:-1]
    return np.array(steps + [end], dtype=float), np.array(ranks, dtype=int), layers


def allocation_plots(history: list, out_dir, total_steps: int | None = None,
                     initial_ranks: dict | None = None) -> list:
    """history: the RankAllocator's records (step, budget, ranks {layer: r}, importance {layer: float}).

    Writes rank_heatmap.png (rank per layer over the optimizer steps, one cell per stretch of steps between
    reallocations: rank_timeline), layer_importance.png and budget.png into out_dir, and returns their paths.
    Pass total_steps and initial_ranks ({layer: r}, e.g. from the allocator) to draw the whole run, warm-up
    and final phase included; without them the plots span the reallocations only."""
    if not history:
        return []
    out_dir = Path(out_dir)
    edges, ranks, layers = rank_timeline(history, total_steps, initial_ranks)
    steps = [h["step"] for h in history]

    fig, ax = plt.subplots(figsize=(8, 0.25 * len(layers) + 2))
    top = int(ranks.max())
    cmap = plt.get_cmap("viridis", top + 1)                    # one colour per integer rank 0..max
    mesh = ax.pcolormesh(edges, np.arange(len(layers) + 1) - 0.5, ranks.T, cmap=cmap, vmin=-0.5, vmax=top + 0.5)
    ax.set_ylim(len(layers) - 0.5, -0.5)                       # first layer on top
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlim(edges[0], edges[-1])
    if initial_ranks is not None or total_steps is not None:   # where the pruning phase starts and ends
        for x, label in ((steps[0], "first reallocation"), (steps[-1], "last reallocation")):
            ax.axvline(x, color="w", ls="--", lw=1)
            ax.text(x, len(layers) - 0.6, f" {label} (step {x}) ", rotation=90, ha="right", va="bottom",
                    fontsize=7, bbox=dict(fc="white", ec="none", alpha=0.8, pad=1))
    ax.set(title="Active rank per adapted layer (a cell: the steps between two reallocations)",
           xlabel="optimizer step", ylabel="layer")
    fig.colorbar(mesh, ax=ax, label="active rank components", ticks=range(top + 1))
    _save(fig, out_dir / "rank_heatmap.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    importance = np.array([[h["importance"][name] for name in layers] for h in history])
    for j, name in enumerate(layers):
        ax.plot(steps, importance[:, j], lw=0.8, label=name)
    # A log scale: importances span orders of magnitude (and are ~1e-7 early on); zeros, before B has
    # moved away from 0, are left out of the plot.
    ax.set(title="Layer importance (sum of component scores)", xlabel="optimizer step",
           ylabel="importance (smoothed sensitivity x uncertainty)")
    ax.set_yscale("log", nonpositive="mask")
    if len(layers) <= 12:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, out_dir / "layer_importance.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    budget = ranks.sum(1)                                      # the budget b(t) each cell ran with
    ax.stairs(budget, edges, baseline=None)
    ax.set(title="Rank budget b(t)", xlabel="optimizer step", ylabel="active rank components (all layers)")
    ax.set_xlim(edges[0], edges[-1])
    ax.grid(alpha=0.3)
    _save(fig, out_dir / "budget.png")
    return [out_dir / "rank_heatmap.png", out_dir / "layer_importance.png", out_dir / "budget.png"]


def effective_rank_hist(per_token_rank: dict, r: int, path):
    """per_token_rank: layer name -> 1-D array of the number of open gates for each token."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.arange(r + 2) - 0.5
    for name, counts in per_token_rank.items():
        ax.hist(np.asarray(counts), bins=bins, histtype="step", density=True, label=name)
    ax.set(title="Effective rank under the gates", xlabel="open rank components per token (gate > 0.5)",
           ylabel="fraction of tokens")
    if len(per_token_rank) <= 12:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path)


def planted_scenario(rows: list, scenario: str, path) -> Path:
    """rows: planted.py's result lines of one scenario (any methods and seeds). Returns the path written."""
    path = Path(path)
    methods = [m for m in dynlora.METHODS if any(r["method"] == m for r in rows)]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    frozen_label = "gates frozen to their mean"
    for i, m in enumerate(methods):
        mine = [r for r in rows if r["method"] == m]
        errs = [r["rel_error"] for r in mine]
        ax1.plot(np.full(len(errs), i) + np.linspace(-0.15, 0.15, len(errs)), errs, "o", alpha=0.6, color=f"C{i}")
        ax1.plot([i - 0.3, i + 0.3], [np.mean(errs)] * 2, "-", color="k", lw=2)
        frozen = [r["rel_error_frozen_gates"] for r in mine if r.get("rel_error_frozen_gates") is not None]
        if frozen:
            ax1.plot(np.full(len(frozen), i) + 0.35, frozen, "x", color="grey", label=frozen_label)
            frozen_label = None
    ax1.set_xticks(range(len(methods)), methods)
    ax1.set_xlim(-0.6, len(methods) - 0.2)
    ax1.set(title=f"{scenario}: held-out distillation error",
            ylabel="||h_s - h_t||² / ||h_t - h_base||²  (1 = nothing)")
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3)
    if frozen_label is None:
        ax1.legend(fontsize=7, loc="lower left")

    planted = rows[0]["planted_ranks"]
    x = np.arange(len(planted))
    ax2.bar(x, planted, color="lightgrey", edgecolor="k", label="planted")
    for i, m in enumerate(methods):
        ranks = np.array([r["final_ranks"] for r in rows if r["method"] == m], dtype=float)
        ax2.plot(x, ranks.mean(0), "o-", color=f"C{i}", label=m, alpha=0.8)
    labels = [name.replace("blocks.", "").replace(".attn", "").replace(".mlp", "")
              for name in rows[0].get("layers", [])]
    ax2.set_xticks(x, labels or [str(v) for v in x], rotation=45, fontsize=7)
    ax2.set(title="final rank per adapted layer (mean over seeds)", ylabel="active rank components")
    top = max([max(planted)] + [max(r["final_ranks"]) for r in rows])
    ax2.set_ylim(0, top + 2.2)                              # room above the data for the legend
    ax2.legend(fontsize=7, ncol=3, loc="upper center")
    ax2.grid(alpha=0.3)

    gated = [m for m in methods if any(r.get("gate_var_tokens") is not None for r in rows if r["method"] == m)]
    if gated:
        width = 0.38

        def mean_of(m, f):
            vals = [f(r) for r in rows if r["method"] == m and r.get("gate_var_tokens") is not None]
            vals = [v for v in vals if v is not None]
            return np.mean(vals) if vals else np.nan
        mi = [mean_of(m, lambda r: r.get("gate_mi_bits")) for m in gated]
        share = [mean_of(m, lambda r: r["gate_var_tokens"] / (r["gate_var_tokens"] + r["gate_var_layers"])
                         if r["gate_var_tokens"] + r["gate_var_layers"] > 0 else None) for m in gated]
        has_mi = not all(np.isnan(mi))
        if has_mi:
            ax3.bar(np.arange(len(gated)) - width / 2, mi, width, label="MI(open pattern; planted kind), bit")
        ax3.bar(np.arange(len(gated)) + (width / 2 if has_mi else 0), share, width,
                label="var across tokens / (var across tokens + var across layers)")
        ax3.set_xticks(range(len(gated)), gated)
        ax3.set_ylim(0, 1.05)
        ax3.legend(fontsize=7)
        ax3.set(title="input dependence of the gates (held-out tokens)")
        ax3.grid(alpha=0.3)
    else:
        ax3.set_axis_off()                                  # no gating method among these rows: nothing to show
    _save(fig, path)
    return path


def adapter_diagram(gate: bool = True, allocation: bool = True, path=None):
    """The adapted layer drawn as a data-flow diagram:

        h = W0 x + b + s B diag(m * g(x)) A x

    the frozen path on top (W0, b), the low-rank path below (A, then the r rank components z = A x scaled by
    the allocator's mask m and the gate g, then B and the scale s). gate=False leaves out g (chapter 1 with
    allocation only, or plain LoRA with allocation=False too); allocation=False leaves out m. Returns the
    figure (a notebook shows it), and writes it to `path` if given."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(11, 4.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 4.6)
    ax.axis("off")

    def box(x, y, text, color, w=1.3, h=0.7, size=10):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05", fc=color, ec="k"))
        ax.text(x, y, text, ha="center", va="center", fontsize=size)

    def arrow(p, q, text="", dy=0.15, style="-|>"):
        ax.add_patch(FancyArrowPatch(p, q, arrowstyle=style, mutation_scale=14, lw=1.2, color="k"))
        if text:
            ax.text((p[0] + q[0]) / 2, (p[1] + q[1]) / 2 + dy, text, ha="center", va="bottom", fontsize=9)

    frozen, trained, dynamic = "#d9d9d9", "#cfe2f3", "#fce5cd"
    ax.text(0.35, 2.9, "x", fontsize=16, ha="center", va="center")                        # the layer input, (d_in,)
    box(2.4, 3.9, "$W_0$  (frozen)\n$d_{out} \\times d_{in}$", frozen, w=1.8, h=0.8)
    arrow((0.5, 3.0), (1.5, 3.8), "")
    ax.add_patch(plt.Circle((9.2, 3.9), 0.25, fc="white", ec="k"))
    ax.text(9.2, 3.9, "+", ha="center", va="center", fontsize=14)
    arrow((3.3, 3.9), (8.95, 3.9), "$W_0 x$")
    arrow((9.2, 4.55), (9.2, 4.15), "")
    ax.text(9.45, 4.45, "$b$", fontsize=11)
    arrow((9.45, 3.9), (10.4, 3.9), "")
    ax.text(10.6, 3.9, "h", fontsize=16, ha="center", va="center")

    box(2.4, 1.9, "$A$  (trained)\n$r \\times d_{in}$", trained, w=1.8, h=0.8)
    arrow((0.5, 2.8), (1.5, 2.0), "")
    inner = " \\odot ".join(t for t, on in (("m", allocation), ("g(x)", gate)) if on)    # m * g(x), g(x), m or none
    if inner:
        label = f"$\\mathrm{{diag}}({inner})$"
        box(5.0, 1.9, label, dynamic, w=1.8, h=0.8)
        arrow((3.3, 1.9), (4.1, 1.9), "$z = Ax$")
        after = 5.9
    else:
        after = 3.3
    box(7.0, 1.9, "$B$  (trained)\n$d_{out} \\times r$", trained, w=1.6, h=0.8)
    arrow((after, 1.9), (6.2, 1.9), "" if inner else "$z = Ax$")
    box(8.55, 1.9, "$\\times\\, s$", "white", w=0.8, h=0.6)
    arrow((7.8, 1.9), (8.15, 1.9), "")
    arrow((8.95, 1.9), (9.2, 3.65), "")
    if gate:
        box(5.0, 0.45, "gate  $g = \\sigma(W_g [z;\\, Px] + c)$\n(per token, chapter 2)", dynamic,
            w=3.4, h=0.75, size=9)
        arrow((5.0, 0.85), (5.0, 1.5), "")
        arrow((3.75, 1.9), (3.75, 0.85), "")                                  # z into the gate
        ax.text(3.55, 1.15, "$z$", fontsize=10)
        ax.plot([0.35, 0.35], [2.65, 0.45], color="k", lw=1.2)                 # x into the gate (P x)
        arrow((0.35, 0.45), (3.3, 0.45), "$x$")
    if allocation:
        box(5.0, 3.0, "mask $m \\in \\{0,1\\}^r$: the allocator's\nbudget (chapter 3)", dynamic, w=3.0, h=0.7, size=9)
        arrow((5.0, 2.65), (5.0, 2.3), "")
    terms = f"\\,\\mathrm{{diag}}({inner})\\," if inner else ""
    ax.set_title(f"$h = W_0 x + b + s\\, B{terms} A x$", fontsize=14)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# ---------------------------------------------------------------------------------------------------------
# GLUE results (notebook 7): one panel per task, so that each task keeps its own scale; the numbers come from
# report.py (the notebook passes them in), the legends sit below the panels, outside the data.

def method_color(method: str) -> str:
    """A method's colour in every GLUE figure: its place in dynlora.method_names() (full C0, lora C1, ...)."""
    names = dynlora.method_names()
    return f"C{names.index(method)}" if method in names else "grey"


def _task_panels(tasks: list, width: float = 2.7, height: float = 3.4):
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, width * len(tasks)), height), squeeze=False)
    return fig, list(axes[0])


def _mark_uninformative(ax, task: str, weak: set):
    if task in weak:
        ax.set_facecolor("#efefef")
        ax.set_title(f"{task}†  (uninformative)", fontsize=10)
    else:
        ax.set_title(task, fontsize=10)


def _legend_below(fig, handles: list, weak_shown: bool):
    """A figure legend under the panels (outside every axis); with an entry for the grey panel of an
    uninformative task when one is shown."""
    from matplotlib.patches import Patch

    if weak_shown:
        handles = handles + [Patch(fc="#efefef", ec="grey", label="† uninformative task: no method's mean beats "
                                                                 "the majority class")]
    fig.tight_layout()
    return fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(handles)),
                      fontsize=8, frameon=False)


def _save_tight(fig, path):
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")


SEED_MARKERS = "os^Dvp<>hX"


def glue_scores(scores: dict, majority: dict, weak: set, title: str, path=None):
    """Dev scores of one suite: one panel per task, one column per method, a dot per seed (one marker per seed,
    the same in every column: runs of one seed are paired) and a bar at the mean over seeds (n under the
    method's name), and the task's majority-class score as a dashed line.

    scores: {task: {method: {seed: score x 100}}}; majority: {task: majority-class score x 100, or None};
    weak: the uninformative tasks (no method beats the majority; grey panel, † in the title).
    The y-axis of a panel spans the scores, not 0: where the majority line lies far outside that span (a
    correlation task's 0, say) it is not drawn there but named at the panel's edge, so that the differences
    between methods stay visible. Returns the figure (a notebook shows it), written to `path` if given."""
    from matplotlib.lines import Line2D

    tasks = [t for t in scores if any(scores[t].values())]
    if not tasks:
        return None
    seeds = sorted({seed for t in tasks for by_seed in scores[t].values() for seed in by_seed})
    marker = {seed: SEED_MARKERS[i % len(SEED_MARKERS)] for i, seed in enumerate(seeds)}
    fig, axes = _task_panels(tasks)
    for ax, task in zip(axes, tasks):
        methods = [m for m in scores[task] if scores[task][m]]
        values = [v for m in methods for v in scores[task][m].values()]
        lo, hi = min(values), max(values)
        span = max(hi - lo, 2.0)
        base = majority.get(task)
        if base is not None and lo - 1.5 * span <= base <= hi + 1.5 * span:
            lo, hi = min(lo, base), max(hi, base)
            span = max(hi - lo, 2.0)
        pad = 0.18 * span
        ax.set_ylim(lo - pad, hi + pad)
        for i, m in enumerate(methods):
            by_seed = scores[task][m]
            for seed, v in by_seed.items():
                ax.plot(i + 0.3 * (seeds.index(seed) / max(1, len(seeds) - 1) - 0.5), v, marker[seed], ls="",
                        color=method_color(m), alpha=0.8, ms=5)
            ax.plot([i - 0.28, i + 0.28], [np.mean(list(by_seed.values()))] * 2, "-", color="k", lw=2)
        if base is not None and lo - pad <= base <= hi + pad:
            ax.axhline(base, color="k", ls="--", lw=1)
        elif base is not None:
            above = base > hi
            ax.text(0.5, 0.97 if above else 0.03, f"majority class {base:.1f} {'↑' if above else '↓'} (off the axis)",
                    transform=ax.transAxes, ha="center", va="top" if above else "bottom", fontsize=7)
        ax.set_xticks(range(len(methods)), [f"{m}\nn={len(scores[task][m])}" for m in methods], fontsize=8)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.grid(alpha=0.3, axis="y")
        _mark_uninformative(ax, task, weak)
    axes[0].set_ylabel("GLUE dev score x 100")
    fig.suptitle(title, fontsize=11)
    handles = [Line2D([], [], ls="", marker=marker[seed], color="grey", label=f"seed {seed} (final model)")
               for seed in seeds]
    handles += [Line2D([], [], color="k", lw=2, label="mean over seeds"),
               Line2D([], [], color="k", ls="--", lw=1, label="majority class (0 = chance for CoLA, STS-B)")]
    _legend_below(fig, handles, bool(weak & set(tasks)))
    _save_tight(fig, path)
    return fig


def glue_paired(intervals: dict, resolvable: dict, weak: set, title: str, path=None):
    """Paired differences to LoRA of one suite: one panel per task, one column per method, the mean over seeds of
    (method - LoRA) with its 95% t interval as an error bar (a hollow dot without a bar where only one seed is
    paired; a star where the interval excludes 0), a line at 0, and a grey band of ± the task's smallest
    resolvable difference.

    intervals: {task: {method: (mean, half-width or None, n pairs)}} (runs.paired_ci); resolvable: {task:
    (half-width or None, n)} (report.resolvable_difference); weak: the uninformative tasks. A method without a
    pair on a task (n = 0) is left out of its panel. Returns the figure, written to `path` if given; None when no
    task has a pair."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    tasks = [t for t in intervals if any(n > 0 for _, _, n in intervals[t].values())]
    if not tasks:
        return None
    fig, axes = _task_panels(tasks)
    for ax, task in zip(axes, tasks):
        methods = [m for m in intervals[task] if intervals[task][m][2] > 0]     # the methods with a pair here
        half_r, n_r = resolvable.get(task, (None, 0))
        if half_r is not None:
            ax.axhspan(-half_r, half_r, color="tab:blue", alpha=0.12, lw=0)
        ax.axhline(0, color="k", lw=1)
        labels = []
        for i, m in enumerate(methods):
            mean, half, n = intervals[task][m]
            color = method_color(m)
            if half is None:
                ax.plot(i, mean, "o", mfc="white", mec=color, ms=7, mew=1.5)
                labels.append(f"{m}\nn={n}")                                 # one pair, or equal ones
                continue
            excludes = mean - half > 0 or mean + half < 0
            ax.errorbar(i, mean, yerr=half, fmt="*" if excludes else "o", ms=12 if excludes else 6, color=color,
                        capsize=4, lw=1.5)
            labels.append(f"{m}\nn={n}\ndf={n - 1}")
        ax.set_xticks(range(len(methods)), labels, fontsize=7)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.grid(alpha=0.3, axis="y")
        _mark_uninformative(ax, task, weak)
    axes[0].set_ylabel("method − LoRA, points x 100")
    fig.suptitle(title, fontsize=11)
    handles = [Line2D([], [], ls="", marker="o", color="grey", label="mean of the paired differences"),
               Line2D([], [], color="grey", lw=1.5, label="95% t interval (df = n − 1)"),
               Line2D([], [], ls="", marker="*", ms=10, color="grey", label="interval excludes 0"),
               Line2D([], [], ls="", marker="o", mfc="white", mec="grey", label="one pair: no interval"),
               Patch(color="tab:blue", alpha=0.12, label="± smallest resolvable difference")]
    _legend_below(fig, handles, bool(weak & set(tasks)))
    _save_tight(fig, path)
    return fig


def glue_merged_costs(costs: dict, title: str, path=None):
    """The merged-model cost of the gated runs of one suite: per task (x) and method (offset), a dot per run of
    merged score − the best-epoch score it was merged from (report.merged_costs), a bar at the mean, a line at 0.

    costs: {task: {method: [points x 100 per run]}}. Returns the figure, written to `path` if given; None when
    no run has a merged score."""
    from matplotlib.lines import Line2D

    tasks = [t for t in costs if any(costs[t].values())]
    if not tasks:
        return None
    methods = [m for m in dynlora.method_names() if any(costs[t].get(m) for t in tasks)]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.4 * len(tasks) + 2), 3.4))
    width = 0.7 / len(methods)
    for j, m in enumerate(methods):
        for i, t in enumerate(tasks):
            c = np.asarray(costs[t].get(m) or [], dtype=float)
            if not c.size:
                continue
            x = i + (j - (len(methods) - 1) / 2) * width
            ax.plot(x + np.linspace(-0.25, 0.25, c.size) * width if c.size > 1 else [x], c, "o",
                    color=method_color(m), alpha=0.75, ms=5)
            ax.plot([x - 0.4 * width, x + 0.4 * width], [c.mean()] * 2, "-", color=method_color(m), lw=2)
    ax.axhline(0, color="k", lw=1)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_xlim(-0.6, len(tasks) - 0.4)
    ax.set(title=title, ylabel="merged − best-epoch score, points x 100")
    ax.grid(alpha=0.3, axis="y")
    handles = [Line2D([], [], ls="", marker="o", color=method_color(m), label=f"{m}: one run") for m in methods]
    handles.append(Line2D([], [], color="k", lw=2, label="bar: mean over runs"))
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    _save_tight(fig, path)
    return fig


def headline(numbers: dict, path=None):
    """The README's headline figure: one panel for GLUE (each method minus LoRA on numbers["task"], points x 100,
    95% t interval) and one per known-answer scenario (relative error minus LoRA's; below 0 is better), each
    interval's method in its color, a line at 0. numbers: report.headline_numbers. Returns the figure, written
    to `path` if given; None when there is nothing to draw."""
    panels = []                                              # (title, ylabel, {method: (mean, low, high)})
    if numbers.get("task"):
        panels.append((f"GLUE {numbers['task']} ({numbers['suite']})", "method − LoRA, points (higher is better)",
                       {m: (mean, mean - half, mean + half) if half is not None else (mean, None, None)
                        for m, (mean, half, n) in numbers["glue"].items() if n}))
    for scenario, cells in numbers.get("planted", {}).items():
        panels.append((f"known answer: {scenario}", "rel. error − LoRA's (lower is better)",
                       {m: (mean, None, None) if np.isnan(low) else (mean, low, high)
                        for m, (mean, low, high) in cells.items()}))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels) + 0.6, 3.2), squeeze=False)
    for k, (ax, (title, ylabel, cells)) in enumerate(zip(axes[0], panels)):
        for i, (m, (mean, low, high)) in enumerate(cells.items()):
            color = method_color(m)
            if low is None:
                ax.plot(i, mean, "o", mfc="white", mec=color, ms=7, mew=1.5)
            else:
                ax.errorbar(i, mean, yerr=[[mean - low], [high - mean]], fmt="o", color=color, capsize=4, lw=1.5)
        ax.axhline(0, color="k", lw=1)
        ax.set_xticks(range(len(cells)), list(cells), fontsize=8)
        ax.set_xlim(-0.6, len(cells) - 0.4)
        ax.set_title(title, fontsize=9)
        if k == 0 or ylabel != panels[k - 1][1]:               # one label per kind of panel
            ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save_tight(fig, path)
    plt.close(fig)
    return fig


def why_it_ties(evidence: dict, claimed_gain: float = 1.0, labels: dict | None = None, path=None):
    """What decides a GLUE comparison, per suite (report.tie_evidence): five panels, each suite in its own
    marker. (1) What training adds: the majority class, the zero-shot prompt, LoRA and full fine-tuning per task.
    (2) The noise floor: the smallest difference the seeds resolve per task, against the gain claimed over LoRA
    (`claimed_gain` points). (3) Is rank the bottleneck: LoRA at another rank minus the suite's LoRA, paired,
    95% interval. (4) What the gates do: components open per token, ± their spread across tokens. (5) Where
    allocation puts the budget: each projection's share of the final budget over its share under equal ranks,
    next to the same method's shares in the known-answer benchmark's homogeneous control (every layer needs the
    same rank there). labels: {suite: a short name for the legend}. Returns the figure (None without a suite),
    written to `path` if given."""
    suites = evidence["suites"]
    if not suites:
        return None
    labels = labels or {}
    marks = dict(zip(suites, "os^D"))
    tasks = list(dict.fromkeys(t for ev in suites.values() for t in ev["scores"]))
    x = {t: i for i, t in enumerate(tasks)}
    shift = {s: 0.25 * (i - (len(suites) - 1) / 2) for i, s in enumerate(suites)}
    kinds = list(dict.fromkeys([k for ev in suites.values() for p in ev["projections"].values() for k in p]
                               + [k for p in evidence["control"].values() for k in p]))
    allocating = list(dict.fromkeys([m for ev in suites.values() for m in ev["projections"]]
                                    + list(evidence["control"])))
    off = {m: 0.2 * (i - (len(allocating) - 1) / 2) for i, m in enumerate(allocating)}
    fig, ax = plt.subplots(1, 5, figsize=(19, 3.9))
    for t in tasks:                         # (1) what training adds: the baselines of the backbone, once per task
        sc = next(ev["scores"][t] for ev in suites.values() if t in ev["scores"])
        for key, style, color in (("majority", "_", "k"), ("zero-shot", "x", "grey")):
            if sc[key] is not None:
                ax[0].plot(x[t], sc[key], style, color=color, ms=10, mew=2)
    for s, ev in suites.items():
        for t, sc in ev["scores"].items():
            for m in (k for k in sc if k in dynlora.method_names()):      # LoRA and full fine-tuning
                if sc[m] is not None:
                    ax[0].plot(x[t] + shift[s], sc[m], marks[s], color=method_color(m))
        half = {t: h for t, (h, n) in ev["resolvable"].items() if h is not None}   # (2) the noise floor
        ax[1].bar([x[t] + shift[s] for t in half], list(half.values()), width=0.22, color="tab:blue", alpha=0.5,
                  hatch="" if s == next(iter(suites)) else "//", label=labels.get(s, s))
        for sweep, cells in ev["rank"].items():                         # (3) LoRA's rank
            for t, (mean, h, n) in cells.items():
                ax[2].errorbar(x[t] + shift[s], mean, yerr=h or 0, fmt=marks[s], color=method_color("lora"), capsize=3,
                               mfc="white" if h is None else None)
                ax[2].annotate(sweep.rsplit("-", 1)[1].replace("r", "r="), (x[t] + shift[s], mean), fontsize=7,
                               xytext=(4, 2), textcoords="offset points")
        for m, cells in ev["gates"].items():                            # (4) the gates
            ax[3].errorbar([x[t] + shift[s] for t in cells], [c[0] for c in cells.values()],
                           yerr=[c[1] for c in cells.values()], fmt=marks[s], color=method_color(m), capsize=3)
        for m, shares in ev["projections"].items():                     # (5) allocation against its control
            ax[4].plot([kinds.index(k) + off[m] + shift[s] / 4 for k in shares], list(shares.values()), marks[s],
                       color=method_color(m))
    for m, shares in evidence["control"].items():
        ax[4].plot([kinds.index(k) + off[m] for k in shares], list(shares.values()), "_", color=method_color(m),
                   ms=14, mew=2)
    for a in ax[:4]:
        a.set_xticks(range(len(tasks)), tasks, fontsize=8)
    for a in ax:
        a.grid(alpha=0.3, axis="y")
    ax[0].set(title="what training adds", ylabel="dev score x 100")
    ax[1].axhline(claimed_gain, color="k", ls="--", lw=1)
    ax[1].set(title="noise floor: smallest resolvable difference", ylabel="points")
    ax[2].axhline(0, color="k", lw=1)
    ax[2].axhspan(-claimed_gain, claimed_gain, color="k", alpha=0.07, lw=0)
    ax[2].set(title="LoRA's rank: another r − the suite's", ylabel="points (95% interval)")
    ax[3].set(title="gates: components open per token", ylabel="effective rank (± sd across tokens)")
    ax[4].axhline(1, color="k", lw=1)
    ax[4].set_xticks(range(len(kinds)), [k.removesuffix("_proj") for k in kinds], fontsize=8)
    ax[4].set(title="allocation: budget share / equal share", ylabel="1 = the same rank everywhere")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], ls="", marker=marks[s], color="grey", label=labels.get(s, s)) for s in suites]
    handles += [Line2D([], [], ls="", marker="_", ms=10, mew=2, color="k", label="majority class"),
                Line2D([], [], ls="", marker="x", color="grey", label="zero-shot prompt"),
                Line2D([], [], color="k", ls="--", lw=1, label=f"a {claimed_gain:g}-point gain (claimed size)"),
                Line2D([], [], ls="", marker="_", ms=10, mew=2, color="grey", label="homogeneous control (panel 5)")]
    handles += [Line2D([], [], ls="", marker="o", color=method_color(m), label=m) for m in dynlora.method_names()
                if any(m in ev["gates"] or m in ev["projections"] or m in next(iter(ev["scores"].values()), {})
                       for ev in suites.values())]
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=6, fontsize=8, frameon=False)
    _save_tight(fig, path)
    return fig
