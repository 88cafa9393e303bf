"""
report.py -- what a run reports: the results page (RESULTS.md) and the README's headline, from results/.

    python cli.py report          # re-renders RESULTS.md's tables and the README's headline between their markers

What this file holds, in order:
  1. Statistics    -- paired_diffs (a method minus LoRA, runs of the same task and seed paired, for
                      runs.paired_ci's t interval), cross_suite_diffs (the same across two suites),
                      resolvable_difference (the smallest difference the seeds can resolve), merged_costs
                      (merged model minus the best-epoch model it came from).
  2. Baselines     -- majority_scores: the dev score of the majority-class predictor per
                      task (data.majority_baseline), "—" where the GLUE files are not found.
  3. render_report -- split_suites (the suites, the pretrained backbone's first) and suite_columns (a suite's
                      tasks, methods, majority scores and uninformative tasks); paired_summary (the paired
                      intervals and the resolvable difference of a suite, the numbers of its paired table and
                      of notebook 7's figures); per suite: the score table (methods x tasks, mean +- std over
                      seeds, a majority-class row, † on tasks no method beats it on, parameter counts, wall
                      time over the tasks every method has), the paired differences to LoRA with 95% intervals
                      and the resolvable difference, the gated methods' merged-model cost, effective rank and
                      dependence on the input (results/gates.jsonl), where the allocating methods put their
                      final budget, and under the tuned suite the recipe issue's figures, each marked ✓/✗ and
                      met, missed or pending (recipe_targets); after the pretrained backbone's suites, the
                      comparisons across them
                      (CROSS_SUITE: a variant or control suite against another suite's runs of the same task
                      and seed).
  4. render_bench  -- the benchmark's figures and targets (results/bench.json, written by bench.py), each
                      target marked ✓ or ✗ missed (target_met).
  5. render_import -- the check of an imported backbone (results/import.json).
  6. render_tune   -- the tuning trials and choices so far (results/tune.jsonl, written by tune.py);
                      tune_progress and suite_progress: how far the tuning and the tuned suite's runs have
                      come, a sentence each (the headline's last paragraph).
  7. The headline  -- headline_numbers; conclusion: the answer in words (the README's opening, notebook 7's
                      end); render_headline: one small table for the README (each dynamic method against LoRA
                      on the GLUE task its seeds resolve best, and on the known-answer benchmark's scenarios);
                      plots.headline draws it (results/headline.png).
  7b. Why they tie -- tie_evidence: per suite (the short recipe, the tuned one), what fine-tuning adds over
                      the zero-shot prompt and the majority class, the smallest resolvable difference, LoRA's rank
                      sweeps, what the gates do, where allocation puts the budget against its homogeneous
                      control (plots.why_it_ties draws it, notebook 7 shows it).
  8. write_report  -- all of it: the tables between RESULTS.md's <!-- results:start --> and <!-- results:end -->,
                      the headline between the README's <!-- headline:start --> and <!-- headline:end -->.

Every number in RESULTS.md's tables and the README's headline comes from a results file through these
functions, never by hand.
"""

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

import data
import dynlora
import planted
import plots
import runs
import tune

RESULTS_PAGE = runs.REPO / "RESULTS.md"     # the results page: every generated table, and their discussion
RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"
README = runs.REPO / "README.md"            # the front door: only the headline is generated
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"
HEADLINE_SUITE = "smollm2"                  # the suite whose paired differences the headline shows
HEADLINE_SUITE_LABEL = "SmolLM2-135M, the short CPU recipe"      # what that suite is, in the headline's words
HEADLINE_FIGURE = "headline.png"            # in the results folder: the headline drawn (plots.headline)
PRECISION_DIR = "precision"                 # in the results folder: the known-answer benchmark in fp32/ and bf16/

TASK_ORDER = ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"]
BASELINE = "lora"                                               # every paired difference is to LoRA


# The methods come from dynlora's registry when a table is drawn (a method registered after import is in every
# table): their order is dynlora.method_names(), the dynamic ones are every adapter method but LoRA, the gated
# ones those whose METHODS entry turns gating on.

def dynamic_methods() -> list:
    """alloc, gate, dynlora, adalora, and any method registered since: every METHODS entry but BASELINE."""
    return [m for m in dynlora.METHODS if m != BASELINE]


def gated_methods() -> list:
    """gate, dynlora, and any registered method with gating=True."""
    return [m for m, preset in dynlora.METHODS.items() if preset["gating"]]


# ---------------------------------------------------------------------------------------------------------
# 1. Statistics: a method is compared with LoRA seed by seed, d_s = score(method, s) - score(lora, s), and the
# mean difference gets the one 95% t interval of the project, runs.paired_ci (its edge cases are written there).

def _by_seed(rows, task, method) -> dict:
    """{seed: record} of one task and method (a repeated seed: its last record)."""
    return {r["seed"]: r for r in rows if r["task"] == task and r["method"] == method}


def _seed_diffs(ours: dict, base: dict, key: str) -> list[float]:
    """100 x (ours - base) of `key`, one per seed both {seed: record} have, in seed order."""
    return [100 * (ours[s][key] - base[s][key]) for s in sorted(set(ours) & set(base))]


def paired_diffs(rows, task, method, key="last_score") -> list[float]:
    """100 x (method - LoRA) of `key`, one per seed both have, in seed order; unpaired seeds are skipped."""
    return _seed_diffs(_by_seed(rows, task, method), _by_seed(rows, task, BASELINE), key)


def cross_suite_diffs(suites: dict, run, base, task, key="last_score") -> list[float]:
    """paired_diffs across suites: 100 x (run - base) of `key`, run and base each a (suite, method) of `suites`
    ({suite: its runs}, split_suites), paired by task and seed (a seed's batch order is the same in every suite
    of one recipe)."""
    (run_suite, run_method), (base_suite, base_method) = run, base
    return _seed_diffs(_by_seed(suites.get(run_suite, []), task, run_method),
                       _by_seed(suites.get(base_suite, []), task, base_method), key)


def resolvable_difference(diff_lists) -> tuple[float | None, int]:
    """(t(n - 1) sd / sqrt(n), n): the half-width of a paired interval, with sd pooled over the given lists of
    differences (those with n >= 2) and n the fewest pairs among them; (None, 0) when no list has 2 pairs or
    the pooled spread is 0 (see runs.paired_ci)."""
    lists = [d for d in diff_lists if len(d) >= 2]
    if not lists:
        return None, 0
    pooled_var = sum((len(d) - 1) * np.var(d, ddof=1) for d in lists) / sum(len(d) - 1 for d in lists)
    if math.sqrt(pooled_var) < runs.EQUAL_POINTS:   # every list's differences are equal: no spread to go by
        return None, 0
    n = min(len(d) for d in lists)
    return runs.t_quantile_95(n - 1) * math.sqrt(pooled_var) / math.sqrt(n), n


def merged_costs(rows, task, method) -> list[float]:
    """100 x (merged_score - score) per run: the merged model (gates frozen to their means) against the
    best-epoch model it was merged from (`score`, not `last_score`)."""
    return [100 * (r["merged_score"] - r["score"]) for r in _by_seed(rows, task, method).values()
            if r.get("merged_score") is not None and r.get("score") is not None]


# ---------------------------------------------------------------------------------------------------------
# 2. Baselines: the majority class, decided on the train labels and scored on the dev labels with the task's
# GLUE metric (for STS-B a constant prediction, whose correlation is 0: chance). Read afresh each time.

def majority_score(task, data_dir) -> float | None:
    """The majority-class dev score of a task (the mean over MNLI's two dev splits); None without its files."""
    try:
        spec = data.get_task(task)
        train = [e.label for e in data.read_split(data_dir, spec, "train")]
        return float(np.mean([data.majority_baseline(spec, train, [e.label for e in data.read_split(data_dir, spec, s)])
                              for s in spec.dev_files]))
    except (data.DataError, OSError):
        return None


def majority_scores(tasks, data_dir) -> dict:
    """{task: majority-class dev score or None}; all None when data_dir is None."""
    return {t: (majority_score(t, data_dir) if data_dir is not None else None) for t in tasks}


# ---------------------------------------------------------------------------------------------------------
# 3. The result tables

def _count_range(values) -> str:
    """'49,152', '49,537–49,922' (min–max over runs), or '—' when no run has the count (None)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return "—"
    return f"{values[0]:,}" if values[0] == values[-1] else f"{values[0]:,}–{values[-1]:,}"


def _points(x: float) -> str:
    """A score in points with one decimal, never '-0.0'."""
    return f"{round(x, 1) + 0.0:.1f}"


def _signed(x: float) -> str:
    return f"{round(x, 1) + 0.0:+.1f}"


def _runs(rows, task, method) -> list:
    return [r for r in rows if r["task"] == task and r["method"] == method]


def _seed_points(rows, task, method) -> list:
    """The task's dev scores x 100 of the method's runs, one per seed."""
    return [100 * r["last_score"] for r in _runs(rows, task, method)]


def _seed_sd(points: list) -> float | None:
    """The sample standard deviation over seeds (n - 1 in the denominator), None for fewer than two."""
    return float(np.std(points, ddof=1)) if len(points) > 1 else None


def _mean_score(rows, task, method) -> float | None:
    scores = [r["last_score"] for r in _runs(rows, task, method)]
    return float(np.mean(scores)) if scores else None


def uninformative(rows, tasks, methods, majority: dict) -> set:
    """Tasks where no method's mean final score exceeds the majority-class score (known majority only)."""
    return {t for t in tasks if majority.get(t) is not None
            and not any((s := _mean_score(rows, t, m)) is not None and s > majority[t] for m in methods)}


def wall_tasks(rows, tasks, methods) -> list:
    """The tasks every method of the suite has run: the only ones whose wall times compare."""
    return [t for t in tasks if all(_runs(rows, t, m) for m in methods)]


def _score_row(rows, m, tasks, common) -> str:
    cells, means = [], []
    for t in tasks:
        scores = _seed_points(rows, t, m)
        if not scores:
            cells.append("—")
            continue
        means.append(np.mean(scores))
        sd = f" ± {_seed_sd(scores):.1f}" if len(scores) > 1 else ""
        cells.append(f"{np.mean(scores):.1f}{sd} (n={len(scores)})")
    runs_of = [r for t in tasks for r in _runs(rows, t, m)]
    avg = f"{np.mean(means):.1f}" if len(means) == len(tasks) else "—"
    wall = (f"{np.mean([np.mean([r['wall_s'] for r in _runs(rows, t, m)]) for t in common]) / 60:.1f}"
            if common else "—")
    return (f"| {m} | " + " | ".join(cells) + f" | {avg} | {_count_range({r['trainable_params'] for r in runs_of})} "
            f"| {_count_range({r.get('final_active_adapter_params') for r in runs_of})} | {wall} |")


def _majority_row(tasks, majority) -> str:
    cells = [_points(100 * majority[t]) if majority.get(t) is not None else "—" for t in tasks]
    known = [majority[t] for t in tasks if majority.get(t) is not None]
    avg = _points(100 * np.mean(known)) if len(known) == len(tasks) else "—"
    return "| majority class | " + " | ".join(cells) + f" | {avg} | — | — | — |"


def _zero_shot_row(tasks, zero_shot: dict) -> str:
    cells = [_points(100 * zero_shot[t]) if t in zero_shot else "—" for t in tasks]
    avg = _points(100 * np.mean([zero_shot[t] for t in tasks])) if all(t in zero_shot for t in tasks) else "—"
    return "| zero-shot (prompt, no training) | " + " | ".join(cells) + f" | {avg} | 0 | — | — |"


def score_table(rows, tasks, methods, majority, labels, zero_shot: dict | None = None) -> list:
    """The methods' mean scores, the majority-class row, and with zero_shot ({task: score} of the backbone's
    zero-shot lines, see zero_shot_scores) the zero-shot row."""
    common = wall_tasks(rows, tasks, methods)
    over = ", ".join(common) if common else "none: no task has a run of every method"
    lines = ["| method | " + " | ".join(labels[t] for t in tasks) + " | avg | trainable params "
             "| active adapter params (final model) | wall (min per run) |", "|---" * (len(tasks) + 5) + "|"]
    lines += [_score_row(rows, m, tasks, common) for m in methods]
    lines.append(_majority_row(tasks, majority))
    if zero_shot:
        lines.append(_zero_shot_row(tasks, zero_shot))
    notes = [f"Wall: minutes per run, the mean over the tasks every method here has run ({over}) of each "
             "task's mean, so that every method is timed on the same work.",
             "Majority class: the dev score of always predicting the most frequent class of the task's whole "
             "training split, also where a suite trains on part of it (for STS-B a "
             "constant, whose correlation is 0: chance; CoLA's MCC of a constant is 0); — where the GLUE "
             "files were not found."]
    if zero_shot:
        notes.append("Zero-shot: the same backbone with no training, each task's prompt (`readout.PROMPTS`) read "
                     "through the LM head's label words, on the whole dev set (`python cli.py zeroshot`).")
    if any("†" in labels[t] for t in tasks):
        notes.append("† No method's mean score beats the majority class: the task is uninformative here.")
    return lines + [""] + notes


def _diff_cell(interval) -> str:
    mean, half, n = interval
    if n == 0:
        return "—"
    if half is None:
        why = "no interval" if n == 1 else "equal differences, no interval"
        return f"{_signed(mean)} (n={n}, {why})"
    interval = f"{_signed(mean)} [{_signed(mean - half)}, {_signed(mean + half)}]"
    if mean - half > 0 or mean + half < 0:
        interval = f"**{interval}**"
    return f"{interval} (n={n}, df={n - 1})"


def paired_summary(rows, tasks, methods) -> tuple[dict, dict]:
    """({(task, method): runs.paired_ci(paired_diffs(rows, task, method))} for every method but LoRA,
    {task: resolvable_difference over the paired differences of the dynamic_methods() on the task}): the numbers
    of the paired table. A pair without runs is (nan, None, 0); a task without two pairs is (None, 0)."""
    intervals = {(t, m): runs.paired_ci(paired_diffs(rows, t, m)) for t in tasks for m in methods if m != BASELINE}
    resolvable = {t: resolvable_difference([paired_diffs(rows, t, m) for m in dynamic_methods()]) for t in tasks}
    return intervals, resolvable


def paired_table(rows, tasks, methods, labels) -> list:
    others = [m for m in methods if m != BASELINE]
    if BASELINE not in methods or not others:
        return []
    intervals, resolvable = paired_summary(rows, tasks, methods)
    lines = [f"Paired difference to LoRA, points x 100 of the final model's dev score: the mean over the seeds "
             f"both ran of (method − LoRA) [95% t interval, df = n − 1]; a run is paired with LoRA's run of the "
             f"same task and seed (same batch order), an unpaired seed is left out. **Bold**: the interval "
             f"excludes 0. Last row: the smallest difference the seeds can resolve, t(n − 1)·sd/√n with sd "
             f"pooled over the paired differences of the dynamic methods ({', '.join(dynamic_methods())}) on the task "
             f"and n their fewest pairs.\n",
             "| method − lora | " + " | ".join(labels[t] for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in others:
        lines.append(f"| {m} | " + " | ".join(_diff_cell(intervals[(t, m)]) for t in tasks) + " |")
    if not set(dynamic_methods()) & set(methods):
        return lines
    cells = []
    for t in tasks:
        half, n = resolvable[t]
        cells.append(f"±{half:.1f} (n={n})" if half is not None else "—")
    return lines + ["| smallest resolvable difference | " + " | ".join(cells) + " |"]


def merged_cost_table(rows, tasks, methods, labels) -> list:
    gated = [m for m in methods if m in gated_methods() and any(merged_costs(rows, t, m) for t in tasks)]
    if not gated:
        return []
    lines = ["Merged-model cost of the gated methods: the dev score of the merged model (gates frozen to their "
             "means and folded into the weights) minus that of the best-epoch model it was merged from, "
             "points x 100; mean over runs (worst run).\n",
             "| method | " + " | ".join(labels[t] for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in gated:
        costs = [merged_costs(rows, t, m) for t in tasks]
        lines.append(f"| {m} | " + " | ".join(f"{_signed(np.mean(c))} (worst {_signed(min(c))})" if c else "—"
                                              for c in costs) + " |")
    return lines


def rank_table(rows, tasks, methods, labels) -> list:
    gated = [m for m in methods if any(r["method"] == m and r.get("mean_effective_rank") is not None for r in rows)]
    if not gated:
        return []
    lines = ["Gated methods: mean effective rank per dev token (components whose gate m_i g_i(x) > 0.5, "
             "averaged over tokens and adapted layers, of the saved model; mean over seeds).\n",
             "| method | " + " | ".join(labels[t] for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in gated:
        cells = []
        for t in tasks:
            ranks = [r["mean_effective_rank"] for r in _runs(rows, t, m) if r.get("mean_effective_rank") is not None]
            cells.append(f"{np.mean(ranks):.1f}" if ranks else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _allocation_shares(ranks: dict) -> tuple[float, list]:
    """(share of the components in v_proj layers, shares in the first, middle and last third of the blocks)
    of one final rank pattern {"gpt.blocks.<i>.attn.<proj>": components}."""
    total = sum(ranks.values()) or 1
    blocks = [int(name.split("blocks.")[1].split(".")[0]) for name in ranks]
    n = max(blocks) + 1
    thirds = [sum(k for b, k in zip(blocks, ranks.values()) if third * n <= 3 * b < (third + 1) * n) / total
              for third in range(3)]
    return sum(k for name, k in ranks.items() if name.endswith("v_proj")) / total, thirds


def allocation_table(rows, tasks, methods, labels) -> list:
    """Where the allocating methods put their final budget: the share in v_proj (the rest is in the other
    adapted projections) and in each third of the blocks, mean over seeds (runs that recorded final_ranks)."""
    allocating = [m for m in methods if any(r["method"] == m and r.get("final_ranks") for r in rows)]
    if not allocating:
        return []
    lines = ["Allocating methods: where the final budget went -- share of the active components in v_proj; "
             "shares in the first / middle / last third of the blocks (mean over seeds; % of the budget).\n",
             "| method | " + " | ".join(labels[t] for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in allocating:
        cells = []
        for t in tasks:
            shares = [_allocation_shares(r["final_ranks"]) for r in _runs(rows, t, m) if r.get("final_ranks")]
            if not shares:
                cells.append("—")
                continue
            v = 100 * np.mean([s[0] for s in shares])
            thirds = 100 * np.mean([s[1] for s in shares], axis=0)
            cells.append(f"v {v:.0f}%; {thirds[0]:.0f} / {thirds[1]:.0f} / {thirds[2]:.0f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def gate_means(records: list) -> tuple[float, float, float | None]:
    """(effective rank per token, its sd across tokens, label information in bits, None where no record has it)
    of `cli.py gates` records, each the mean over the records (the seeds of one task and method)."""
    mi = [g["gate_mi_label_bits"] for g in records if g.get("gate_mi_label_bits") is not None]
    return (float(np.mean([g["mean_effective_rank"] for g in records])),
            float(np.mean([g["effective_rank_sd_tokens"] for g in records])), float(np.mean(mi)) if mi else None)


def gates_table(gates: list, tasks, labels) -> list:
    """How much the gates depend on the input on dev (records of `cli.py gates`, one per gated run): the
    token share of the gate variance, the effective rank per token (mean +- its spread across tokens) and the
    mutual information between the open-gate pattern and the sentence's label; mean over seeds."""
    methods = [m for m in gated_methods() if any(g["method"] == m for g in gates)]
    if not methods:
        return []
    examples = sorted({g["dev_examples"] for g in gates})
    lines = ["Gated methods: how much the gates depend on the input (`python cli.py gates`; "
             f"{_count_range(examples)} dev examples per run). Per cell: token share of the gate variance, "
             "var across tokens / (var across tokens + var of the layer means across layers) -- near 0 for a "
             "static per-layer switch -- with the gates' standard deviation across tokens (sd, gate units); "
             "effective rank per token, mean ± sd across tokens, over the layers that keep "
             "components (so above the target for dynlora, whose emptied layers are left out); mutual information "
             "between the open-gate pattern and the label (bit). Mean over seeds (n).\n",
             "| method | " + " | ".join(labels[t] for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in methods:
        cells = []
        for t in tasks:
            mine = [g for g in gates if g["method"] == m and g["task"] == t]
            if not mine:
                cells.append("—")
                continue
            share = np.mean([g["token_share"] for g in mine if g["token_share"] is not None])
            rank, sd, mi = gate_means(mine)
            token_sd = np.mean([math.sqrt(g["gate_var_tokens"]) for g in mine])
            cells.append(f"{share:.2f} (sd {token_sd:.3f}); {rank:.1f} ± {sd:.1f}"
                         + (f"; {mi:.3f} bit" if mi is not None else "") + f" (n={len(mine)})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


# The comparisons across the pretrained backbone's suites: a variant of the recipe, or a control, runs as a
# suite of its own, and its runs pair with another suite's by task and seed. Each: (suite, method) minus
# (suite, method), and the question it answers. Add a line here for a suite of your own.
CROSS_SUITE = [
    (("smollm2-alpha11", "lora"), ("smollm2", "lora"), "LoRA's scale: alpha 11 against 16"),
    (("smollm2", "gate"), ("smollm2-alpha11", "lora"), "the default gate against LoRA at the gate's static scale"),
    (("smollm2", "dynlora"), ("smollm2-alpha11", "lora"), "dynlora against LoRA at the gates' static scale"),
    (("smollm2-gatelr30", "gate"), ("smollm2", "lora"), "gates that move (30x lr) against LoRA at r = 8"),
    (("smollm2-gatelr30", "gate"), ("smollm2", "gate"), "what the gates' own learning rate changes"),
    (("smollm2-gatelr30", "gate"), ("smollm2-r4", "lora"), "gates that move against LoRA at their effective rank"),
    (("smollm2-r4", "lora"), ("smollm2", "lora"), "LoRA's rank: 4 against 8"),
    (("smollm2-bf16", "lora"), ("smollm2-fp32", "lora"), "bf16 autocast against fp32, same machine: LoRA"),
    (("smollm2-bf16", "dynlora"), ("smollm2-fp32", "dynlora"), "bf16 autocast against fp32, same machine: dynlora"),
    (("tuned-bf16", "lora"), ("tuned-rerun", "lora"), "bf16 autocast against fp32, same CPU: LoRA at lr 1e-3"),
    (("tuned-rerun", "lora"), ("tuned-lr1e-3", "lora"), "the same fp32 LoRA run on another CPU (AVX-512 against AVX2)"),
]


def cross_suite_table(suites: dict, comparisons=CROSS_SUITE) -> list:
    """The comparisons (run, base, question) that have paired runs in `suites` ({suite: its runs},
    split_suites), as a table: the mean difference with its 95% t interval per task (runs.paired_ci of
    cross_suite_diffs)."""
    cells = {(run, base, t): runs.paired_ci(cross_suite_diffs(suites, run, base, t))
             for run, base, _ in comparisons for t in TASK_ORDER}
    asked = [(run, base, why) for run, base, why in comparisons
             if any(cells[(run, base, t)][2] for t in TASK_ORDER)]
    if not asked:
        return []
    tasks = [t for t in TASK_ORDER if any(cells[(run, base, t)][2] for run, base, _ in asked)]
    lines = ["**Across suites** — paired difference, points x 100 of the final model's dev score, between two "
             "suites' runs of the same task and seed (`report.CROSS_SUITE`): mean [95% t interval, df = n − 1]; "
             "**bold**: the interval excludes 0.\n",
             "| suite/method − suite/method | question | " + " | ".join(tasks) + " |",
             "|---" * (len(tasks) + 2) + "|"]
    for run, base, why in asked:
        lines.append(f"| {'/'.join(run)} − {'/'.join(base)} | {why} | "
                     + " | ".join(_diff_cell(cells[(run, base, t)]) for t in tasks) + " |")
    return lines


def pretrained_suite(name: str) -> bool:
    """Whether a suite runs on the pretrained backbone: "smollm2" (the short recipe) or "tuned" (the tuned
    one, docs/reproduce.md), or a variant of either, "smollm2-..." or "tuned-..."."""
    return name in ("smollm2", "tuned") or name.startswith(("smollm2-", "tuned-"))


def suite_of(record: dict) -> str:
    """The suite of a result or gates record: runs of the first grids carry suite "" for the default suite,
    later runs name it "default"; both are "default"."""
    return record.get("suite") or "default"


ZERO_SHOT = "zero-shot"     # the method of `cli.py zeroshot`'s lines: a row of every table on its backbone


def zero_shot_scores(results: list, rows: list) -> dict:
    """{task: score} of the zero-shot lines (no training, no seeds) on the backbone of a suite's runs `rows`:
    the backbone folder of the same name (a hash may differ between two imports of the same weights)."""
    folders = {Path(r["backbone"]).name for r in rows if r.get("backbone")}
    return {r["task"]: r["last_score"] for r in results
            if r.get("method") == ZERO_SHOT and Path(r.get("backbone") or "").name in folders}


def split_suites(results: list) -> dict:
    """{suite: its result lines}, the pretrained backbone's suites first ("smollm2", then its variants; see
    pretrained_suite), whose tasks can tell methods apart, then the others by name; suite_of names a record's
    suite. Only runs scored on dev: a line scored on held-out training data ("split": "validation", a tuning
    trial of tune.py) is left out, so no table mixes the two."""
    results = [r for r in results if r.get("split", "dev") == "dev"]
    results = [r for r in results if r.get("method") != ZERO_SHOT]   # a row of the tables (zero_shot_scores)
    names = sorted({suite_of(r) for r in results}, key=lambda s: (not pretrained_suite(s), s))
    return {s: [r for r in results if suite_of(r) == s] for s in names}


def suite_columns(rows: list, data_dir) -> tuple[list, list, dict, set]:
    """(tasks, methods, majority, uninformative) of one suite's lines: its tasks and methods in the report's
    order, {task: majority-class dev score, None without the GLUE files} and the tasks no method's mean final
    score beats the majority on."""
    tasks = [t for t in TASK_ORDER if any(r["task"] == t for r in rows)]
    methods = [m for m in dynlora.method_names() if any(r["method"] == m for r in rows)]
    majority = majority_scores(tasks, data_dir)
    return tasks, methods, majority, uninformative(rows, tasks, methods, majority)


RECIPE_SUITE = "tuned"       # the suite the recipe issue's figures are checked on (recipe_targets)
RECIPE_SEEDS = 3             # seeds per method and task before a figure is called met or missed
RECIPE_TASKS = ["CoLA", "SST-2", "MRPC", "STS-B", "RTE"]     # the tasks the recipe issue's figures are over
# The GPT-1 paper's Transformer without pre-training (Radford et al. 2018, Table 5), GLUE dev: a floor any
# pretrained recipe must clear. Its MRPC is F1 alone and its STS-B Pearson alone; our scores are GLUE's mean
# of two metrics (F1 and accuracy; Pearson and Spearman).
NO_PRETRAINING = {"CoLA": 18.9, "SST-2": 84.0, "MRPC": 79.4, "STS-B": 30.9, "RTE": 53.8}


def recipe_targets(rows, tasks, majority: dict, zero_shot: dict | None) -> list:
    """The recipe issue's figures, per task, from a suite's runs (lines of a markdown table and its note):
    LoRA's score minus full fine-tuning's, the mean over their paired seeds (>= -2 points), LoRA's seed sd
    (<= 2), the smallest difference the seeds resolve (paired_summary's; <= 1.5 on at least 3 tasks), and
    LoRA's mean above the majority class, the no-pretraining row (NO_PRETRAINING) and, on SST-2, the zero-shot
    row. A cell shows the current value with ✓/✗; a figure is "met" or "missed" only once each of its tasks
    has RECIPE_SEEDS seeds of every method it reads, "pending" before."""
    lora = {t: _mean_score(rows, t, BASELINE) for t in tasks}
    sds = {t: _seed_sd(_seed_points(rows, t, BASELINE)) for t in tasks}
    full = {t: paired_diffs(rows, t, dynlora.FULL) for t in tasks}              # full - LoRA, per seed
    resolvable = paired_summary(rows, tasks, [BASELINE])[1]

    def above(ref: dict) -> dict:           # LoRA's mean minus a reference score, in points
        return {t: 100 * (lora[t] - ref[t]) for t in tasks if lora[t] is not None and ref.get(t) is not None}

    figures = [  # (figure, target, {task: value}, ok(value), met(list of oks), the tasks it reads, its methods)
        ("LoRA − full fine-tuning", "≥ −2 on every task", {t: -float(np.mean(d)) for t, d in full.items() if d},
         lambda v: v >= -2, all, tasks, (BASELINE, dynlora.FULL)),
        ("LoRA's seed sd", "≤ 2 on every task", {t: sd for t, sd in sds.items() if sd is not None},
         lambda v: v <= 2, all, tasks, (BASELINE,)),
        ("smallest resolvable difference", "≤ 1.5 on 3 tasks", {t: h for t, (h, _) in resolvable.items()
                                                               if h is not None},
         lambda v: v <= 1.5, lambda oks: sum(oks) >= 3, tasks, (BASELINE, *dynamic_methods())),
        ("LoRA − majority class", "> 0 on every task", above(majority), lambda v: v > 0, all, tasks, (BASELINE,)),
        ("LoRA − no pre-training", "> 0 on every task", above({t: v / 100 for t, v in NO_PRETRAINING.items()}),
         lambda v: v > 0, all, [t for t in tasks if t in NO_PRETRAINING], (BASELINE,)),
        ("LoRA − zero-shot", "> 0 on SST-2", {t: v for t, v in above(zero_shot or {}).items() if t == "SST-2"},
         lambda v: v > 0, all, [t for t in tasks if t == "SST-2"], (BASELINE,)),
    ]
    lines = ["The recipe's figures (the recipe issue) on this suite's runs so far: each cell the current value, ✓ "
             f"or ✗ against the target; a figure is met or missed once each of its tasks has {RECIPE_SEEDS} seeds "
             "of every method it reads, pending before.\n",
             "| figure | target | " + " | ".join(tasks) + " | status |", "|---" * (len(tasks) + 3) + "|"]
    for name, target, values, ok, met, scope, methods in figures:
        signed = name.startswith("LoRA −")
        cells = [f"{_signed(v) if signed else _points(v)} {'✓' if ok(v) else '✗'}" if (v := values.get(t)) is not None
                 else "—" for t in tasks]
        complete = bool(scope) and all(t in values and all(len(_runs(rows, t, m)) >= RECIPE_SEEDS for m in methods)
                                       for t in scope)
        status = ("met" if met([ok(values[t]) for t in scope]) else "**missed**") if complete else "pending"
        lines.append(f"| {name} | {target} | " + " | ".join(cells) + f" | {status} |")
    floors = ", ".join(f"{t} {v}" for t, v in NO_PRETRAINING.items())
    return lines + ["", "Points x 100 of the final model's dev score; LoRA − full: the mean over the seeds both "
                    f"ran. No pre-training: the GPT-1 paper's Transformer trained on the task alone (Table 5: "
                    f"{floors}); its MRPC is F1 alone and its STS-B Pearson alone, ours GLUE's mean of two metrics."]


def render_suite(suite: str, rows: list, data_dir, gates: list = (), zero_shot: dict | None = None) -> str:
    """One suite's tables; gates: the suite's records of `cli.py gates`; zero_shot: {task: zero-shot score}."""
    tasks, methods, majority, weak = suite_columns(rows, data_dir)
    labels = {t: t + ("†" if t in weak else "") for t in tasks}
    lines = [f"**Suite `{suite or 'default'}`** — GLUE dev score x 100 of the model at the end of training "
             f"(mean ± std over seeds, n = seeds), trainable parameters, wall time per run.\n"]
    for table in (score_table(rows, tasks, methods, majority, labels, zero_shot),
                  paired_table(rows, tasks, methods, labels), merged_cost_table(rows, tasks, methods, labels),
                  rank_table(rows, tasks, methods, labels), gates_table(list(gates), tasks, labels),
                  allocation_table(rows, tasks, methods, labels),
                  recipe_targets(rows, RECIPE_TASKS, majority_scores(RECIPE_TASKS, data_dir), zero_shot)
                  if suite == RECIPE_SUITE else []):
        if table:
            lines += table + [""]
    lines.append(f"{provenance(rows)} {precision_note(rows)}\n")
    return "\n".join(lines)


def provenance(rows: list) -> str:
    """Where result lines came from: "Machine: <each CPU/GPU line>. Commits: <each commit>." """
    machines, commits = sorted({r["machine"] for r in rows}), sorted({r["commit"] for r in rows})
    return f"Machine: {'; '.join(machines)}. Commits: {', '.join(commits)}."


def precision_note(rows: list) -> str:
    """The precision of a suite's runs ("fp32" for lines written before records carried it), and a warning
    where one suite mixes precisions: its paired differences then compare runs that differ in more than the
    method."""
    counts = Counter(r.get("precision") or "fp32" for r in rows)
    if len(counts) == 1:
        return f"Precision: {next(iter(counts))}."
    return ("**Precision: mixed** -- " + ", ".join(f"{p} ({n} runs)" for p, n in sorted(counts.items()))
            + "; a paired difference may compare two precisions.")


def render_report(results: list, bench: dict | None = None, data_dir=None, gates: list = ()) -> str:
    """Markdown tables of the results, one group per suite (see render_suite); data_dir is the GLUE folder for
    the majority-class row (default: data.find_data_dir()).

    A score is the dev score of the model at the end of training (`last_score`), not of the best epoch: GLUE's
    test labels are hidden, so the dev set is our test set, and picking the best of several epochs on it
    would flatter every method by its own noise; and an allocating method's best epoch can come before its
    budget has shrunk to the target, which would compare it to LoRA at a larger budget.
    """
    data_dir = data.find_data_dir() if data_dir is None else Path(data_dir)
    suites = split_suites(results)
    parts = [render_suite(s, rows, data_dir, [g for g in gates if suite_of(g) == s],
                          zero_shot_scores(results, rows) if pretrained_suite(s) else None)
             for s, rows in suites.items()]
    cross = cross_suite_table(suites)
    if cross:                                   # after the pretrained backbone's suites, which it compares
        parts.insert(sum(map(pretrained_suite, suites)), "\n".join(cross) + "\n")
    if bench:
        parts.append(render_bench(bench))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# 4. The benchmark table

_NUMBER = r"[-+]?\d+(?:\.\d+)?"


def target_met(value: str, target: str, low: float | None = None, high: float | None = None) -> bool | None:
    """Whether a figure meets its target ("<= 1.02", ">= 70%"), from the value's leading number, or for a
    percentage target the percentage in the value's parentheses ("76.1 (83%)"); None when either won't parse.

    A ratio measured over several rounds carries its range [low, high]: the target is met only when the
    whole range meets it (the highest round for an upper bound, the lowest for a lower bound).
    """
    goal = re.fullmatch(rf"\s*(<=|>=|<|>)\s*({_NUMBER})\s*(%?)\s*", target or "")
    if not goal:
        return None
    op, bound, percent = goal.groups()
    found = re.search(rf"\(\s*({_NUMBER})\s*%\s*\)", value) if percent else None
    found = found or re.match(rf"\s*({_NUMBER})", value)
    if not found:
        return None
    x, bound = float(found.group(1)), float(bound)
    if op in ("<=", "<") and high is not None:
        x = high
    if op in (">=", ">") and low is not None:
        x = low
    return {"<=": x <= bound, ">=": x >= bound, "<": x < bound, ">": x > bound}[op]


def _target_cell(row: dict) -> str:
    target = row.get("target", "")
    met = target_met(row["value"], target, row.get("low"), row.get("high"))
    return target if met is None else f"{target} {'✓' if met else '✗ missed'}"


def render_bench(bench: dict, only: str | None = None) -> str:
    command = f"python cli.py bench --only {only}" if only else "python cli.py bench"
    lines = [f"**Benchmark{', ' + only + ' part' if only else ''}** (`{command}`, {bench['machine']}, commit "
             f"{bench['commit']}, {bench['date']}, {bench.get('wall_s', '?')} s):\n", "| figure | value | target |",
             "|---|---|---|"]
    for row in bench["rows"]:
        lines.append(f"| {row['name']} | {row['value']} | {_target_cell(row)} |")
    if bench.get("note"):
        lines.append(f"\nNote: {bench['note']}")
    return "\n".join(lines) + "\n"


def render_precision_check(folder: Path) -> str:
    """The known-answer benchmark run twice, differing only in --precision (folder/fp32 and folder/bf16, each
    `python cli.py planted --results-dir` of its own), as planted.precision_table; "" until both exist."""
    rows = {p: runs.load_jsonl(Path(folder) / p / planted.RESULTS_FILE) for p in ("fp32", "bf16")}
    if not all(rows.values()):
        return ""
    where = f"{Path(folder).parent.name}/{Path(folder).name}/"
    return (f"\n**bf16 against fp32, known-answer benchmark** (`python cli.py planted --precision bf16` paired by "
            f"seed with `--precision fp32`, results in `{where}`; relative error, lower is better):\n\n"
            + planted.precision_table(rows["fp32"], rows["bf16"])
            + f"\n{provenance(rows['fp32'] + rows['bf16'])}\n")


# ---------------------------------------------------------------------------------------------------------
# 5. The import check

def render_import(record: dict) -> str:
    """The check of an imported backbone (results/import.json, written by `cli.py import --check`)."""
    return "\n".join([
        f"**Import check** (`python cli.py import --check`, {record['machine']}, commit {record['commit']}, "
        f"{record['date']}): `{record['source']}` -> `{record['out_dir']}` (backbone sha256 "
        f"{record['backbone_sha256'][:12]}...)\n",
        "| figure | value |", "|---|---|",
        f"| import time, wall (s) | {record['import_wall_s']} |",
        f"| peak resident memory of import and check (MiB) | {record['import_peak_rss_mib']:,} |",
        f"| next-token perplexity, first {record['sentences']} RTE dev premises (48 tokens each) | "
        f"{record['perplexity_rte_dev']} |",
        f"| the same with the q/k rows left in the GGUF's order (no un-permutation) | "
        f"{record['perplexity_without_unpermutation']} |",
        f"| greedy continuation | `{record['greedy']!r}` |"]) + "\n"


# ---------------------------------------------------------------------------------------------------------
# 6. The tuning so far: each task and method's trials (scored on held-out training data, never on dev) and
# its choice once all its trials are in.

def _fixed(line: dict) -> dict:
    """The fixed recipe a trial or choice ran at (its recipe and adapter flags), as one flat dict."""
    return {**line.get("recipe", {}), **line.get("adapter", {})}


def _uncovered_trials(lines: list) -> list:
    """The trial lines no choice line names (its `trial_ids`): the trials of a stage still under way."""
    covered = {i for r in lines if r.get("kind") == "choice" for i in r.get("trial_ids", [])}
    return [r for r in lines if r.get("kind") == "trial" and r.get("trial_id") not in covered]


def render_tune(lines: list) -> str:
    """The trials and choices of results/tune.jsonl (tune.py): one row per stage of a task and method -- each
    choice line with the trials it chose among, then the trials no choice covers yet, grouped by their fixed
    recipe -- with each setting's validation score(s) of the final model; the "fixed" column names what of the
    fixed recipe differs between the rows (e.g. a stage run at an earlier stage's chosen readout); '' without
    lines."""
    trials = [r for r in lines if r.get("kind") == "trial"]
    if not trials:
        return ""
    by_id = {r.get("trial_id"): r for r in trials}
    rows = []                                          # (task, method, fixed recipe, [trial lines], choice or None)
    for choice in (r for r in lines if r.get("kind") == "choice"):
        mine = [by_id[i] for i in choice.get("trial_ids", []) if i in by_id]
        rows.append((choice["task"], choice["method"], _fixed(choice), mine, choice))
    groups = {}
    for r in _uncovered_trials(lines):
        key = (r["task"], r["method"], json.dumps(_fixed(r), sort_keys=True))
        groups.setdefault(key, []).append(r)
    rows += [(task, method, json.loads(fixed), mine, None) for (task, method, fixed), mine in groups.items()]
    common = set.intersection(*({(k, json.dumps(v)) for k, v in row[2].items()} for row in rows))
    order = {m: i for i, m in enumerate(dynlora.method_names())}
    rows.sort(key=lambda row: (TASK_ORDER.index(row[0]) if row[0] in TASK_ORDER else len(TASK_ORDER), row[0],
                               order.get(row[1], len(order)), row[1], row[4] is None))
    out = ["**Tuning** (`python cli.py tune`, results/tune.jsonl): each setting scored on held-out *training* "
           "examples (`--val-fraction`), never on dev -- the validation score x 100 of the model at the end of "
           "training, per seed; the choice is the best mean (docs/reproduce.md, the tune protocol). A row is one "
           "stage: its choice and the trials it chose among (a trial shared with an earlier stage, the same run, shows "
           "the setting it first ran as); *fixed* is what of the fixed recipe differs between the rows.\n",
           "| task | method | fixed | trials | setting: validation score | choice |", "|---|---|---|---|---|---|"]
    for task, method, fixed, mine, choice in rows:
        shown = tune.describe({k: v for k, v in fixed.items() if (k, json.dumps(v)) not in common}) or "—"
        tried = "; ".join(f"{tune.describe(r['setting'])}: "
                          + ("diverged" if r.get("val_score") is None else _points(100 * r["val_score"]))
                          + f" (s{r['seed']})" for r in mine)
        chosen = (f"{tune.describe(choice['setting'])} ({_points(100 * choice['val_score'])})" if choice
                  else "not yet: trials running")
        out.append(f"| {task} | {method} | {shown} | {len(mine)} | {tried} | {chosen} |")
    commits = sorted({r["commit"] for r in trials if r.get("commit")})
    return "\n".join(out) + f"\n\nCommits: {', '.join(commits) or '—'}.\n"


def tune_progress(lines: list) -> str:
    """One sentence: how far the tuning in results/tune.jsonl has come."""
    trials = [r for r in lines if r.get("kind") == "trial"]
    chosen = sorted({f"{r['task']}/{r['method']}" for r in lines if r.get("kind") == "choice"})
    if not trials:
        return "no tuning trial has finished yet (results/tune.jsonl is empty)"
    cells = sorted({f"{r['task']}/{r['method']}" for r in trials})
    open_ = sorted({f"{r['task']}/{r['method']}" for r in _uncovered_trials(lines)})
    return (f"{len(trials)} tuning trial(s) finished, on {', '.join(cells)} (task/method); choices made: "
            f"{', '.join(chosen) if chosen else 'none yet'}"
            + (f"; trials no choice covers yet (a stage under way): {', '.join(open_)}" if open_ else "")
            + " (results/tune.jsonl, RESULTS.md's Tuning table)")


def suite_progress(results: list) -> str:
    """One sentence: how many of the recipe suite's runs (RECIPE_SUITE: every method on RECIPE_TASKS, RECIPE_SEEDS
    seeds each) have finished, per task and method, so that the README says which cells are done."""
    rows = split_suites(results).get(RECIPE_SUITE, [])
    methods = dynlora.method_names()
    seeds = {(t, m): min(len({r["seed"] for r in _runs(rows, t, m)}), RECIPE_SEEDS)
             for t in RECIPE_TASKS for m in methods}
    started = [t for t in RECIPE_TASKS if any(seeds[(t, m)] for m in methods)]
    waiting = [t for t in RECIPE_TASKS if t not in started]
    per_task = [f"{t} {sum(seeds[(t, m)] for m in methods)} of {len(methods) * RECIPE_SEEDS} ("
                + ", ".join(f"{m} {seeds[(t, m)]}" for m in methods) + ")" for t in started]
    return (f"suite `{RECIPE_SUITE}` (each of the {len(methods)} methods at its tuned setting on "
            f"{len(RECIPE_TASKS)} tasks, {RECIPE_SEEDS} seeds each): {sum(seeds.values())} of "
            f"{len(seeds) * RECIPE_SEEDS} runs finished"
            + (" -- " + "; ".join(per_task) if per_task else "")
            + (f"; none finished yet: {', '.join(waiting)}" if waiting else "")
            + f" (RESULTS.md's `{RECIPE_SUITE}` tables)")


# ---------------------------------------------------------------------------------------------------------
# 7. The headline: does each dynamic method beat LoRA? On GLUE, on the task of HEADLINE_SUITE whose seeds
# resolve the smallest difference (and a count over its other tasks); on the known-answer benchmark, in each
# scenario. A cell's verdict is "better" or "worse" when its 95% interval excludes 0, else "tie".

def headline_numbers(results: list, planted_rows: list) -> dict:
    """{"suite", "task", "resolvable", "glue": {method: (mean, half or None, n)}, "others": {method: [better,
    tie, worse] over the suite's other tasks}, "planted": {scenario: {method: (mean, low, high)}}} of the
    dynamic_methods(); "task" None without the suite's runs, "planted" {} without known-answer lines."""
    rows = split_suites(results).get(HEADLINE_SUITE, [])
    tasks, methods = suite_columns_of(rows)
    intervals, resolvable = paired_summary(rows, tasks, methods)
    resolved = [t for t in tasks if resolvable[t][0] is not None]
    task = min(resolved, key=lambda t: resolvable[t][0]) if resolved else None
    dynamic = [m for m in dynamic_methods() if m in methods]
    glue = {m: intervals[(task, m)] for m in dynamic} if task else {}
    others = {}
    for m in dynamic:
        counts = {"better": 0, "tie": 0, "worse": 0}
        for t in tasks:
            mean, half, n = intervals[(t, m)]
            if t != task and half is not None:                  # only the tasks with an interval count
                counts[runs.verdict(mean - half, mean + half, True)] += 1
        others[m] = [counts["better"], counts["tie"], counts["worse"]]
    known = {}
    for row in planted.summarize(planted_rows):
        if row["method"] in dynamic_methods() and row.get("diff_to_lora"):
            known.setdefault(row["scenario"], {})[row["method"]] = row["diff_to_lora"]
    return {"suite": HEADLINE_SUITE, "task": task, "resolvable": resolvable.get(task) if task else None,
            "glue": glue, "others": others, "planted": known}


def suite_columns_of(rows: list) -> tuple[list, list]:
    """(tasks, methods) of one suite's lines in the report's order (suite_columns without the GLUE files)."""
    return ([t for t in TASK_ORDER if any(r["task"] == t for r in rows)],
            [m for m in dynlora.method_names() if any(r["method"] == m for r in rows)])


PLANTED_LABELS = {"heterogeneous": "rank planted in a few layers", "input": "updates that depend on the token",
                  "homogeneous": "control: LoRA's own structure"}


def render_headline(numbers: dict) -> str:
    """The README's headline table of headline_numbers (each dynamic method minus LoRA, with a verdict: better
    or worse where the 95% interval excludes 0, else tie) and what its columns are."""
    task, known = numbers["task"], numbers["planted"]
    scenarios = [s for s in planted.SCENARIOS if s in known]
    methods = list(dict.fromkeys(list(numbers["glue"]) + [m for s in scenarios for m in known[s]]))
    if not methods:
        return "No results yet: `python cli.py report` fills this table from results/.\n"
    head = ["method − LoRA"]
    if task:
        half, n = numbers["resolvable"]
        head += [f"GLUE {task}, points [95% CI]", "GLUE, other tasks: better / tie / worse"]
    head += [f"known answer: {PLANTED_LABELS.get(s, s)}" for s in scenarios]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m in methods:
        cells = [m]
        if task:
            counts = numbers["others"].get(m, [0, 0, 0])
            cells += [_headline_glue_cell(numbers["glue"].get(m, (math.nan, None, 0))),
                      " / ".join(map(str, counts)) if sum(counts) else "— (no interval)"]
        for s in scenarios:
            if m not in known[s]:
                cells.append("—")
                continue
            mean, low, high = known[s][m]
            interval = "" if math.isnan(low) else f" [{low:+.3f}, {high:+.3f}]"
            verdict = runs.verdict(low, high, False)
            cells.append(f"{mean:+.3f}{interval} " + (f"**{verdict}**" if verdict == "better" else verdict))
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if task:
        half, n = numbers["resolvable"]
        notes.append(f"GLUE: suite `{numbers['suite']}` ({HEADLINE_SUITE_LABEL}), dev score x 100 of the "
                     f"final model minus LoRA's, paired by seed; {task} is the task whose seeds resolve the "
                     f"smallest difference (±{half:.1f} points, n={n}); the other tasks count the intervals that "
                     f"exclude 0.")
    if scenarios:
        notes.append("Known answer: `python cli.py planted`, relative error of the student minus LoRA's (lower is "
                     "better), paired by seed.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


# What each known-answer scenario is built to reward (planted.py): the methods expected to beat LoRA there.
EXPECTED_WINNERS = {"heterogeneous": lambda preset: preset["allocation"], "input": lambda preset: preset["gating"],
                    "homogeneous": lambda preset: False}


def _names(methods) -> str:
    methods = list(methods)
    return ", ".join(methods[:-1]) + " and " + methods[-1] if len(methods) > 1 else (methods or ["none"])[0]


def conclusion(numbers: dict, tune_lines: list = (), results: list | None = None) -> str:
    """The answer in words, from headline_numbers: what the GLUE suite's intervals and the known-answer
    scenarios say, and how far the tuned recipe has come (its tuning; with results, its suite's runs: see
    suite_progress). The README opens with it and notebook 7 ends with it, so that no sentence of either can
    drift from the numbers."""
    out = []
    task = numbers["task"]
    if task:
        half, n = numbers["resolvable"]
        glue = numbers["glue"]
        verdicts = {m: runs.verdict(mean - h, mean + h, True) if h is not None else "tie" for m, (mean, h, _) in
                    glue.items()}
        better = [m for m, v in verdicts.items() if v == "better"]
        others = numbers["others"]
        n_other = sum(sum(c) for c in others.values())
        other_better = [m for m, c in others.items() if c[0]]
        worse = sum(c[2] for c in others.values()) + sum(v == "worse" for v in verdicts.values())
        verdict = (f"**{_names(better)} beat{'s' if len(better) == 1 else ''} LoRA** on {task}" if better else
                   "**no dynamic variant beats LoRA**" if not other_better else
                   f"no dynamic variant beats LoRA on {task}, but {_names(other_better)} on another task")
        out.append(f"On GLUE (suite `{numbers['suite']}`: {HEADLINE_SUITE_LABEL}), {verdict}: on {task}, the "
                   f"task whose seeds resolve the smallest difference (±{half:.1f} points, n={n}), "
                   + ("the intervals of " + _names(better) + " lie above 0" if better else
                      "every interval contains 0 or lies below it")
                   + f"; on the other tasks, {sum(c[0] for c in others.values())} of {n_other} intervals lie above "
                   f"0, and over all tasks {worse} {'lies' if worse == 1 else 'lie'} below it (LoRA better).")
    known = numbers["planted"]
    if known:
        parts, as_expected = [], True
        for scenario in (s for s in planted.SCENARIOS if s in known):
            verdicts = {m: runs.verdict(low, high, False) for m, (_, low, high) in known[scenario].items()}
            won = [m for m, v in verdicts.items() if v == "better"]
            lost = [m for m, v in verdicts.items() if v == "worse"]
            expected = [m for m in known[scenario] if EXPECTED_WINNERS[scenario](dynlora.METHODS[m])]
            as_expected &= set(won) == set(expected)
            parts.append(f"{PLANTED_LABELS.get(scenario, scenario)}: {_names(won)}"
                         + ("" if set(won) == set(expected) else f" (expected: {_names(expected)})")
                         + (f", while {_names(lost)} {'does' if len(lost) == 1 else 'do'} worse" if lost else ""))
        out.append("On the known-answer benchmark, the methods whose intervals put them ahead of LoRA are, per "
                   "scenario -- "
                   + "; ".join(parts) + ". "
                   + ("**Each mechanism wins where it should**, and only there." if as_expected else
                      "**Not every mechanism wins where it should** (see the expected winners named above)."))
    out.append(f"Tuned recipe: {tune_progress(tune_lines)}."
               + (f" Its comparison, {suite_progress(results)}." if results is not None else ""))
    return "\n\n".join(out) + "\n"


def _headline_glue_cell(interval) -> str:
    mean, half, n = interval
    if not n:
        return "—"
    if half is None:
        return f"{_signed(mean)} (n={n}, no interval)"
    verdict = runs.verdict(mean - half, mean + half, True)
    return f"{_signed(mean)} [{_signed(mean - half)}, {_signed(mean + half)}] " + \
        (f"**{verdict}**" if verdict == "better" else verdict)


# ---------------------------------------------------------------------------------------------------------
# 7b. Why the methods tie on GLUE (notebook 7's last figure, plots.why_it_ties): the measures above that decide
# a suite's comparison, gathered per suite so that the short recipe and the tuned one sit side by side.

TIE_SUITES = {"smollm2": "short recipe", "smollm2-gatelr30": "short, gates at 30x lr", "tuned": "tuned recipe"}
CLAIMED_GAIN = 1.0   # points: the size of gain over LoRA that the paper and AdaLoRA report (about one point)


def projection_shares(ranks: dict) -> dict:
    """{projection: its share of the final budget / its share under equal ranks} of one final rank pattern
    {"...blocks.<i>.<module>.<proj>": components}: 1 everywhere when every layer keeps the same rank."""
    total = sum(ranks.values()) or 1
    kinds = {name.rsplit(".", 1)[-1] for name in ranks}
    return {k: (sum(v for name, v in ranks.items() if name.endswith("." + k)) / total)
            / (sum(name.endswith("." + k) for name in ranks) / len(ranks)) for k in sorted(kinds)}


def tie_evidence(results: list, gates: list, planted_rows: list, data_dir, names=TIE_SUITES) -> dict:
    """What decides the comparison, for each suite of `names` with runs (split_suites), as {suite: {
      "scores":      {task: {"majority", "zero-shot", "lora", "full": dev score x 100 (mean over seeds) or None}},
      "resolvable":  {task: (half-width or None, n)}: the smallest difference its seeds resolve (paired_summary),
      "rank":        {"<suite>-r<k>": {task: (mean, half, n)}}: LoRA of the suite "<suite>-r<k>" (rank k) minus
                     the suite's LoRA, paired by seed,
      "gates":       {method: {task: gate_means of its records of `cli.py gates`}},
      "projections": {method: {projection: mean projection_shares of the final ranks}}}},
    and under "control" {allocating method: the same shares in the known-answer benchmark's homogeneous
    scenario, where every layer needs the same rank}."""
    suites = split_suites(results)
    out = {}
    for name in (n for n in names if n in suites):
        rows = suites[name]
        tasks, methods, majority, _ = suite_columns(rows, data_dir)
        zero = zero_shot_scores(results, rows)
        scores = {t: {"majority": None if majority[t] is None else 100 * majority[t],
                      "zero-shot": 100 * zero[t] if t in zero else None,
                      **{m: None if (mean := _mean_score(rows, t, m)) is None else 100 * mean
                         for m in (BASELINE, dynlora.FULL)}} for t in tasks}
        sweeps = sorted(s for s in suites if re.fullmatch(re.escape(name) + r"-r\d+", s))
        rank = {s: {t: iv for t in tasks
                    if (iv := runs.paired_ci(cross_suite_diffs(suites, (s, BASELINE), (name, BASELINE), t)))[2]}
                for s in sweeps}
        mine = [g for g in gates if suite_of(g) == name]
        gated = {m: {t: gate_means(gs) for t in tasks
                     if (gs := [g for g in mine if g["method"] == m and g["task"] == t])} for m in gated_methods()}
        patterns = {m: [projection_shares(r["final_ranks"]) for r in rows if r["method"] == m and r.get("final_ranks")]
                    for m in methods}
        out[name] = {"scores": scores, "resolvable": paired_summary(rows, tasks, methods)[1], "rank": rank,
                     "gates": {m: v for m, v in gated.items() if v},
                     "projections": {m: _mean_shares(p) for m, p in patterns.items() if p}}
    control = {}
    for m in (m for m, preset in dynlora.METHODS.items() if preset["allocation"]):
        rows = [r for r in planted_rows if r["scenario"] == "homogeneous" and r["method"] == m and r.get("final_ranks")]
        if rows:
            control[m] = _mean_shares([projection_shares(dict(zip(r["layers"], r["final_ranks"]))) for r in rows])
    return {"suites": out, "control": control}


def _mean_shares(patterns: list) -> dict:
    return {k: float(np.mean([p[k] for p in patterns if k in p])) for k in sorted({k for p in patterns for k in p})}


# ---------------------------------------------------------------------------------------------------------
# 8. Writing RESULTS.md and the README's headline

def _fill(path: Path, start: str, end: str, text: str):
    """Replace the text between `start` and `end` in the file at `path` with `text`."""
    page = Path(path).read_text()
    if start not in page or end not in page:
        raise ValueError(f"{path} has no {start} ... {end} markers; add them where the generated text goes")
    head, rest = page.split(start, 1)
    _, tail = rest.split(end, 1)
    runs.atomic_write_text(Path(path), head + start + "\n" + text + "\n" + end + tail)


def write_report(page: Path = RESULTS_PAGE, results_dir: Path = runs.RESULTS_DIR, data_dir=None,
                 readme: Path | None = README, figure: Path | None = None) -> str:
    """Render every table from results_dir between the results page's markers, and (readme not None) the
    headline between the README's markers, with its figure (default results_dir/headline.png). Returns the
    tables."""
    results_dir = Path(results_dir)
    bench_path = results_dir / "bench.json"
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    gates = runs.load_jsonl(results_dir / runs.GATES_FILE)
    results = runs.load_results(results_dir)
    report = render_report(results, bench, data_dir, gates)
    for part in sorted(results_dir.glob("bench-*.json")):              # `bench --only PART`: a run of its own
        report += "\n" + render_bench(json.loads(part.read_text()), part.stem.removeprefix("bench-"))
    planted_rows = runs.load_jsonl(results_dir / "planted.jsonl")
    if planted_rows:
        report += "\n" + planted.summary_table(planted_rows)
    report += render_precision_check(results_dir / PRECISION_DIR)
    import_path = results_dir / "import.json"
    if import_path.is_file():
        report += "\n" + render_import(json.loads(import_path.read_text()))
    tune_lines = runs.load_jsonl(results_dir / tune.TUNE_FILE)
    if tune_lines:
        report += "\n" + render_tune(tune_lines)
    _fill(page, RESULTS_START, RESULTS_END, report)
    if readme is not None:
        numbers = headline_numbers(results, planted_rows)
        words = conclusion(numbers, tune_lines, results)
        _fill(readme, HEADLINE_START, HEADLINE_END, words + "\n" + render_headline(numbers))
        plots.headline(numbers, results_dir / HEADLINE_FIGURE if figure is None else figure)
    return report
