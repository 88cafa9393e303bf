"""
report.py -- what a run reports: the README's result tables and the benchmark table, from results/.

    python train.py report        # re-renders the tables between the README's result markers

What this file holds, in order:
  1. render_report -- one table per suite: methods x tasks, the dev score of the model at the end of training
                      (mean +- std over seeds), parameter counts, wall time; the gated methods' effective rank.
  2. render_bench  -- the benchmark's figures and targets (results/bench.json, written by bench.py).
  3. write_report  -- both, written between the README's <!-- results:start --> and <!-- results:end -->.

Every number in the README's tables comes from a results file through these functions, never by hand.
"""

import json
from pathlib import Path

import numpy as np

import runs

README = runs.REPO / "README.md"
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"

TASK_ORDER = ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"]
METHOD_ORDER = ["full", "lora", "alloc", "gate", "dynlora", "adalora"]


def _count_range(values) -> str:
    """'49,152', '49,537–49,922' (min–max over runs), or '—' when no run has the count (None)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return "—"
    return f"{values[0]:,}" if values[0] == values[-1] else f"{values[0]:,}–{values[-1]:,}"


def render_report(results: list, bench: dict | None = None) -> str:
    """Markdown tables of the results: one per suite, methods x tasks, mean +- std over seeds.

    A cell is the dev score of the model at the end of training (`last_score`), not of the best epoch: GLUE's
    test labels are hidden, so the dev set is our test set, and picking the best of several epochs on it
    would flatter every method by its own noise; and an allocating method's best epoch can come before its
    budget has shrunk to the target, which would compare it to LoRA at a larger budget.
    """
    lines = []
    suites = sorted({r.get("suite", "") for r in results})
    for suite in suites:
        rows = [r for r in results if r.get("suite", "") == suite]
        tasks = [t for t in TASK_ORDER if any(r["task"] == t for r in rows)]
        methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
        lines.append(f"**Suite `{suite or 'default'}`** — GLUE dev score x 100 of the model at the end of training "
                     f"(mean ± std over seeds, n = seeds), trainable parameters, wall time per run.\n")
        lines.append("| method | " + " | ".join(tasks) + " | avg | trainable params | active adapter params (final model) "
                     "| wall (min, mean) |")
        lines.append("|---" * (len(tasks) + 5) + "|")
        for m in methods:
            cells, means, params, active, walls = [], [], set(), set(), []
            for t in tasks:
                scores = [100 * r["last_score"] for r in rows if r["task"] == t and r["method"] == m]
                params |= {r["trainable_params"] for r in rows if r["task"] == t and r["method"] == m}
                active |= {r.get("final_active_adapter_params") for r in rows if r["task"] == t and r["method"] == m}
                walls += [r["wall_s"] for r in rows if r["task"] == t and r["method"] == m]
                if not scores:
                    cells.append("—")
                    continue
                means.append(np.mean(scores))
                sd = f" ± {np.std(scores, ddof=1):.1f}" if len(scores) > 1 else ""
                cells.append(f"{np.mean(scores):.1f}{sd} (n={len(scores)})")
            avg = f"{np.mean(means):.1f}" if len(means) == len(tasks) else "—"
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} | {_count_range(params)} "
                         f"| {_count_range(active)} | {np.mean(walls) / 60:.1f} |")
        gated = [m for m in methods
                 if any(r["method"] == m and r.get("mean_effective_rank") is not None for r in rows)]
        if gated:
            lines.append("\nGated methods: mean effective rank per dev token (components whose gate m_i g_i(x) > 0.5, "
                         "averaged over tokens and adapted layers, of the saved model; mean over seeds).\n")
            lines.append("| method | " + " | ".join(tasks) + " |")
            lines.append("|---" * (len(tasks) + 1) + "|")
            for m in gated:
                cells = []
                for t in tasks:
                    ranks = [r["mean_effective_rank"] for r in rows if r["task"] == t and r["method"] == m
                             and r.get("mean_effective_rank") is not None]
                    cells.append(f"{np.mean(ranks):.1f}" if ranks else "—")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        machines = sorted({r["machine"] for r in rows})
        commits = sorted({r["commit"] for r in rows})
        lines.append(f"\nMachine: {'; '.join(machines)}. Commits: {', '.join(commits)}.\n")
    if bench:
        lines.append(render_bench(bench))
    return "\n".join(lines)


def render_bench(bench: dict) -> str:
    lines = [f"**Benchmark** (`python train.py bench`, {bench['machine']}, commit {bench['commit']}, "
             f"{bench['date']}):\n", "| figure | value | target |", "|---|---|---|"]
    for row in bench["rows"]:
        lines.append(f"| {row['name']} | {row['value']} | {row.get('target', '')} |")
    if bench.get("note"):
        lines.append(f"\nNote: {bench['note']}")
    return "\n".join(lines) + "\n"


def write_report(readme: Path = README, results_dir: Path = runs.RESULTS_DIR) -> str:
    """Replace the text between the README's result markers with freshly rendered tables."""
    bench_path = Path(results_dir) / "bench.json"
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    report = render_report(runs.load_results(results_dir), bench)
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} markers; add them where the tables go")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    runs.atomic_write_text(readme, head + README_START + "\n" + report + "\n" + README_END + tail)
    return report
