"""
tune.py -- the tuning protocol: each method's setting chosen on held-out TRAINING data, never on dev.

    python cli.py tune --tasks RTE --methods full,lora --grid "lr=3e-4,1e-3,3e-3;epochs=1,3" \\
        --val-fraction 0.1 --seeds 0 --backbone runs/smollm2-135m [any finetune flag: the fixed recipe]
    python cli.py finetune --task RTE --method lora --backbone runs/smollm2-135m --from-tune results/tune.jsonl

The protocol, in the order of this file:
  1. The split (data.validation_split). A fixed fraction of a task's train split is held out as the validation set.
     The examples are put in an order drawn from data.SPLIT_SEED alone -- never from the run's seed, method or
     setting -- so every trial of a task holds out the same examples; the first round(fraction x n) of that
     order are the validation set, the rest, in file order, the training set; --max-train then takes the
     first N of those. A run with --val-fraction > 0 scores the validation set INSTEAD of dev: its dev files
     are never read, and its result line says "split": "validation" (report.py leaves such lines out).
  2. The grid (parse_grid, method_grids). A setting is one combination of the grid's values, a trial one
     setting at one seed. Each method family has a stated default grid (DEFAULT_GRIDS); --grid replaces it
     for every method, --method-grid for one method. Every method gets the same number of trials (settings
     x seeds), or tune refuses to start; --max-trials caps it.
  3. The trials (run). A trial is train.finetune with the fixed recipe (every finetune flag given to tune),
     the setting and --val-fraction; its line goes to <results-dir>/tune.jsonl as it finishes. A trial is
     known by its trial_id, a hash of what it trains (task, method, seed, every training setting, the split,
     the backbone's hash; not how it runs: device, precision), so a tune started again skips the trials
     already in the file and continues where it stopped.
  4. The choice (choose). Once all of a method's trials on a task are in the file, a "choice" line names
     the setting with the best mean validation score over the seeds -- the score of the model at the end of
     training, `last_score`, the number the report compares. A setting with a diverged trial cannot win;
     means within TIE of the best are a tie, won by the setting listed first in the grid (the grid's order:
     the first key varies slowest, each key's values in the order given).
  5. Read-back (apply_choice). `finetune --from-tune FILE` applies the last choice line of FILE for the run's
     task, method and backbone (its sha256). A choice for another task, method or backbone is refused, so is
     a flag that sets a tuned setting to another value, and so is a run whose recipe differs from the one tuned with in
     anything but --max-train (the final runs may train on the whole training split).

cli.py holds the command line (`cli.py tune`; `cli.py finetune --from-tune` calls apply_choice before
train.finetune) and calls into this file, which imports neither cli.py nor train.py: run() gets
train.finetune and the config checker as arguments (a test passes its own).
"""

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import data
import dynlora
import runs

TUNE_FILE = "tune.jsonl"     # in a results folder: one line per finished trial, one per method's choice
TIE = 1e-9                   # mean validation scores closer than this are equal (the grid's order decides)

# The stated default grid of each method family ("full", every adapter method "adapters"), each of 6 settings.
# A placeholder until the recipe's grid is chosen (see the tuning protocol in docs/reproduce.md); --grid replaces it.
DEFAULT_GRIDS = {dynlora.FULL: "lr=5e-5,1e-4,2e-4;epochs=1,3", "adapters": "lr=3e-4,1e-3,3e-3;epochs=1,3"}

# FinetuneConfig fields that say where things are or how to run, not what is trained: never a tuned key,
# not part of a recipe (the backbone is known by its hash instead).
WHERE = {"backbone", "data_dir", "out_dir", "threads", "suite", "results_dir", "from_tune", "tuned_on"}
# FinetuneConfig fields that say which run it is, not its recipe.
NOT_RECIPE = {"task", "method", "seed", "val_fraction"}
# FinetuneConfig fields tune sets itself, per trial or by a flag of its own: not passed through as the recipe.
TUNE_OWNS = {"task", "method", "seed", "out_dir", "suite", "results_dir", "val_fraction", "from_tune",
             "tuned_on"}
# Settings typed int | float (t_init, t_final: steps, or a fraction of the run): a grid value keeps its form.
EITHER = {f.name for f in dataclasses.fields(dynlora.AdapterConfig) if f.type == int | float}
# Recipe keys a run read back with --from-tune may change: the final runs train on the whole training split.
READBACK_FREE = {"max_train"}


@dataclass
class TuneConfig:
    tasks: str = "CoLA,SST-2,MRPC,STS-B,RTE"            # GLUE tasks to tune on, comma-separated
    methods: str = field(default_factory=lambda: ",".join(dynlora.method_names()))  # methods to tune, comma-separated;
                                                                                    # all get equally many trials
    grid: str = "default"                               # settings to try for every method, "key=v1,v2;key=v1,v2"
                                                        # (keys: finetune or adapter settings; '+' joins a tuple's
                                                        # items); 'default' = DEFAULT_GRIDS per family
    method_grid: list = field(default_factory=list)     # one method's own grid, replacing --grid for it:
                                                        # "gate:lr=1e-3,3e-3;gate_lr_mult=10,30" (several allowed)
    seeds: str = "0"                                    # seeds of every setting's trials, comma-separated; a
                                                        # setting scores its mean over them
    val_fraction: float = field(default=0.1, metadata={"bounds": (0, 1, True, True)})  # fraction of each task's TRAIN
                                                                                       # split held out to validate on
                                                                                       # (dev is never read)
    max_trials: int = field(default=0, metadata={"bounds": (0, None, False, False)})  # refuse a grid of more trials
                                                                                      # per method than this
                                                                                      # (0 = no cap)
    results_dir: str = "results"                        # folder of tune.jsonl (relative: to the repository)
    out_dir: str = "runs/tune"                          # folder of the trials' run folders and their finetune.jsonl
                                                        # (relative: to the repository)
    keep_models: bool = False                           # keep each trial's model and checkpoint files (default:
                                                        # deleted once its line is written)


# ---------------------------------------------------------------------------------------------------------
# 1. The split
# ---------------------------------------------------------------------------------------------------------

# validation_split, VALIDATION and SPLIT_SEED live in data.py: train.py builds a run's data with them, and
# train.py does not import this file.


# ---------------------------------------------------------------------------------------------------------
# 2. The grid
# ---------------------------------------------------------------------------------------------------------

def tunable_defaults(base) -> dict:
    """{setting: its default} of every key a grid may hold: the FinetuneConfig fields that shape training
    (not WHERE, not task/method/seed/val_fraction) and the AdapterConfig fields a method does not fix."""
    fin = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
           if f.name not in WHERE | NOT_RECIPE}
    fixed = set(dynlora.SWITCHES)                                      # form, allocation, gating, gate
    adapter = {f.name: getattr(dynlora.AdapterConfig(), f.name) for f in dataclasses.fields(dynlora.AdapterConfig)
               if f.name not in fixed}
    return {**fin, **adapter}


def key_name(key: str, flag) -> str:
    """A grid key as typed -- a field name, or a flag without its dashes (lr, lora-r, lora_r, gate-lr-mult) --
    as the field name."""
    name = key.strip().lstrip("-").replace("-", "_")
    return next((f.name for f in dataclasses.fields(dynlora.AdapterConfig)
                 if flag(f.name) == "--" + name.replace("_", "-")), name)


def parse_value(name: str, text: str, default, where: str):
    """One grid value, parsed by its field's type (a tuple's items joined by '+'); ValueError naming the flag
    for one that does not parse or is not finite."""
    text = text.strip()
    if isinstance(default, tuple):
        return [t.strip() for t in text.split("+") if t.strip()]
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{where}: {name}={text!r} is not true or false")
        return text.lower() in ("true", "1")
    if not isinstance(default, (int, float)):
        return text
    either = name in EITHER
    try:
        value = runs.parse_number(text) if either else type(default)(text)
    except ValueError:
        whole = isinstance(default, int) and not either
        raise ValueError(f"{where}: {name}={text!r} is not {'a whole' if whole else 'a'} number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: {name}={text} is not a finite number")
    return value


def parse_grid(text: str, where: str, defaults: dict, flag) -> dict:
    """{key: [values]} of "key=v1,v2;key=v1,v2" (where: the flag it came from, for the error messages)."""
    grid = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        key, sep, values = part.partition("=")
        name = key_name(key, flag)
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"{where}: {part!r} is not key=value[,value...] (e.g. {DEFAULT_GRIDS['adapters']!r})")
        if name not in defaults:
            why = "says where or how to run, not what is trained" if name in WHERE else \
                "is set by tune itself" if name in TUNE_OWNS else "is set by the method" \
                if name in dynlora.SWITCHES else "is not a finetune or adapter setting"
            raise ValueError(f"{where}: {key.strip()!r} {why}; a grid varies settings such as lr, epochs, "
                             f"batch_size, max_len, lora_r, lora_targets, gate_lr_mult, t_init")
        if name in grid:
            raise ValueError(f"{where}: {key.strip()!r} appears twice; give each key once")
        grid[name] = [parse_value(name, v, defaults[name], where) for v in values.split(",")]
        if len({json.dumps(v) for v in grid[name]}) < len(grid[name]):
            raise ValueError(f"{where}: {key.strip()!r} lists a value twice")
    if not grid:
        raise ValueError(f"{where} is empty; give key=v1,v2[;key=...], e.g. {DEFAULT_GRIDS['adapters']!r}")
    return grid


def settings_of(grid: dict) -> list:
    """Every combination of the grid's values, in the grid's order (the first key varies slowest)."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def method_grids(spec: TuneConfig, methods: list, defaults: dict, flag) -> dict:
    """{method: its grid}: its --method-grid, else --grid, else its family's DEFAULT_GRIDS entry."""
    own = {}
    for item in spec.method_grid:
        method, sep, text = item.partition(":")
        method = method.strip()
        if not sep or method not in methods:
            raise ValueError(f"--method-grid {item!r}: give METHOD:key=v1,v2;... for one of --methods {methods}")
        if method in own:
            raise ValueError(f"--method-grid: {method} is given twice")
        own[method] = parse_grid(text, f"--method-grid {method}", defaults, flag)
    common = parse_grid(spec.grid, "--grid", defaults, flag) if spec.grid != "default" else None
    family = {f: parse_grid(g, f"DEFAULT_GRIDS[{f!r}]", defaults, flag) for f, g in DEFAULT_GRIDS.items()}
    return {m: own.get(m) or common or family[m if m == dynlora.FULL else "adapters"] for m in methods}


# ---------------------------------------------------------------------------------------------------------
# 3. The trials
# ---------------------------------------------------------------------------------------------------------

def split_setting(setting: dict, base) -> tuple[dict, dict]:
    """(FinetuneConfig part, AdapterConfig part) of a setting."""
    fin = {f.name for f in dataclasses.fields(base)}
    return {k: v for k, v in setting.items() if k in fin}, {k: v for k, v in setting.items() if k not in fin}


def without_defaults(method: str, overrides: dict) -> dict:
    """The adapter overrides that differ from the method's defaults: a setting equal to its default trains the
    same run, so it must give the same trial id (e.g. LoRA's default targets named in a grid of targets)."""
    if method == dynlora.FULL:
        return dict(overrides)
    default = dynlora.config_for_method(method)

    def same(key, value):
        return hasattr(default, key) and getattr(default, key) == (tuple(value) if isinstance(value, list) else value)
    return {k: v for k, v in overrides.items() if not same(k, v)}


def recipe_of(cfg) -> dict:
    """The training-shaping FinetuneConfig settings of a run (not WHERE, task, method, seed, val_fraction)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in WHERE | NOT_RECIPE}


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def backbone_hash(backbone: str) -> str | None:
    if not backbone:
        return None
    path = Path(backbone) / runs.BACKBONE_FILE
    if not path.is_file():
        raise ValueError(f"--backbone {backbone}: no {runs.BACKBONE_FILE} there; give a backbone folder "
                         f"(`python cli.py pretrain` or `python cli.py import` writes one)")
    return runs.file_sha256(path)


def repo_path(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else runs.REPO / path


def plan(spec: TuneConfig, base, adapter: dict, check, flag) -> tuple[list, list, list, dict]:
    """(tasks, methods, seeds, {method: settings}) of a tune, every setting checked before the first trial."""
    try:
        tasks = [data.get_task(t).name for t in spec.tasks.split(",") if t.strip()]
    except data.DataError as err:
        raise ValueError(f"--tasks: {err}") from None
    methods = [m.strip() for m in spec.methods.split(",") if m.strip()]
    known = list(dynlora.method_names())
    if not tasks or not methods:
        raise ValueError(f"--{'tasks' if not tasks else 'methods'} is empty; name at least one")
    if any(m not in known for m in methods) or len(set(methods)) < len(methods) or len(set(tasks)) < len(tasks):
        raise ValueError(f"--methods {spec.methods!r} / --tasks {spec.tasks!r}: give each once; methods: {known}")
    try:
        seeds = [int(s) for s in spec.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {spec.seeds!r}: give whole numbers, comma-separated (e.g. 0,1,2)") from None
    if not seeds or len(set(seeds)) < len(seeds):
        raise ValueError(f"--seeds {spec.seeds!r}: give at least one seed, each once")
    for seed in seeds:
        check(dataclasses.replace(base, seed=seed))
    defaults = tunable_defaults(base)
    grids = method_grids(spec, methods, defaults, flag)
    settings = {m: settings_of(g) for m, g in grids.items()}
    for method, options in settings.items():
        where = f"--method-grid {method}" if any(g.partition(":")[0].strip() == method for g in spec.method_grid) \
            else "--grid"
        for setting in options:
            fin, ad = split_setting(setting, base)
            if method == dynlora.FULL and (ad or adapter):
                raise ValueError(f"{where}: {', '.join(flag(k) for k in {**ad, **adapter})}: an adapter setting, and "
                                 f"method full has no adapter; give full its own grid with --method-grid "
                                 f"\"full:lr=...\", or tune it apart")
            try:
                check(dataclasses.replace(base, val_fraction=spec.val_fraction, **fin))
                if method != dynlora.FULL:
                    check(dynlora.config_for_method(method, **{**adapter, **ad}))
            except ValueError as err:               # AdapterConfig names its field; the user typed its flag
                message = re.sub(r"^AdapterConfig: (\w+)", lambda m: flag(m.group(1)), str(err))
                raise ValueError(f"{where}: {message}") from None
    trials = {m: len(s) * len(seeds) for m, s in settings.items()}
    if len(set(trials.values())) > 1:
        raise ValueError(f"--grid / --method-grid: every method must get the same number of trials, but "
                         f"{', '.join(f'{m} gets {n}' for m, n in trials.items())}; give the grids the same size")
    per_method = next(iter(trials.values()))
    if spec.max_trials and per_method > spec.max_trials:
        raise ValueError(f"--max-trials {spec.max_trials}: the grid has {per_method} trials per method "
                         f"({per_method // len(seeds)} settings x {len(seeds)} seeds); shrink the grid or raise it")
    return tasks, methods, seeds, settings


def check_splits(tasks: list, settings: dict, base, fraction: float):
    """Fail before the first trial when a task's train split cannot hold out --val-fraction at any batch
    size of the grid (the same check runs.build_run_data makes)."""
    data_dir = data.resolve_data_dir(base.data_dir)
    sizes = {s.get("batch_size", base.batch_size) for options in settings.values() for s in options}
    for name in tasks:
        task = data.get_task(name)
        data.ensure_task(data_dir, task)
        n = len(data.read_split(data_dir, task, "train"))
        for batch_size in sorted(sizes):
            data.validation_split(n, fraction, batch_size, task.name)


def trial_config(spec: TuneConfig, base, adapter: dict, task: str, method: str, setting: dict, seed: int,
                 sha: str | None) -> tuple[object, dict, str]:
    """(FinetuneConfig, adapter overrides, trial_id) of one trial."""
    fin, ad = split_setting(setting, base)
    cfg = dataclasses.replace(base, task=task, method=method, seed=seed, val_fraction=spec.val_fraction, suite="",
                              **fin)
    overrides = without_defaults(method, {**adapter, **ad})
    trial_id = digest({"task": task, "method": method, "seed": seed, "val_fraction": spec.val_fraction,
                       "backbone_sha256": sha, "recipe": recipe_of(cfg), "adapter": overrides})
    out = repo_path(spec.out_dir)
    cfg = dataclasses.replace(cfg, out_dir=str(out / f"{task}-{method}-{trial_id}"), results_dir=str(out / "results"))
    return cfg, overrides, trial_id


def run_trial(cfg, overrides: dict, system, finetune, diverged) -> tuple[dict, str | None]:
    """(the trial's result record, None) or ({}, why) when it diverged. A trial whose run folder holds a
    final.json (finished, its line not yet written) is not trained again; one with a checkpoint resumes."""
    out = Path(cfg.out_dir)
    if (out / runs.FINAL_FILE).is_file():
        return json.loads((out / runs.FINAL_FILE).read_text()), None
    try:
        resume = (out / runs.CHECKPOINT_FILE).is_file()
        return finetune(cfg, dict(overrides), dataclasses.replace(system, resume=resume)), None
    except diverged as err:
        return {}, str(err)


def trial_record(trial_id: str, cfg, setting: dict, adapter: dict, sha, result: dict, why, wall: float) -> dict:
    fin, _ = split_setting(setting, cfg)
    return {"kind": "trial", "trial_id": trial_id, "task": cfg.task, "method": cfg.method, "setting": setting,
            "seed": cfg.seed, "val_score": result.get("last_score"), "val_best_score": result.get("score"),
            "val_metrics": result.get("dev"), "diverged": why, "split": data.VALIDATION,
            "val_fraction": cfg.val_fraction, "val_examples": result.get("val_examples"),
            "train_examples": result.get("train_examples"),
            "recipe": {k: v for k, v in recipe_of(cfg).items() if k not in fin}, "adapter": adapter,
            "backbone": cfg.backbone, "backbone_sha256": sha, "run_id": result.get("run_id"), "run_dir": cfg.out_dir,
            "device": result.get("device"), "precision": result.get("precision"), "lr": result.get("lr"),
            "machine": runs.machine_description(), "commit": runs.git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(wall, 1), "train_wall_s": result.get("wall_s")}


def drop_model_files(run_dir: str):
    """A recorded trial's model and checkpoint files (full fine-tuning's are the size of the backbone)."""
    for name in (runs.CHECKPOINT_FILE, "model.pt", "adapter.pt"):
        (Path(run_dir) / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# 4. The choice
# ---------------------------------------------------------------------------------------------------------

def choose(scores: list) -> tuple[int | None, list]:
    """(index of the chosen setting or None, each setting's mean score or None) from each setting's scores
    over the seeds: the best mean; a setting with a diverged trial (score None) has no mean; means within
    TIE of the best are a tie, won by the earliest setting."""
    means = [None if any(s is None for s in ss) else float(np.mean(ss)) for ss in scores]
    valid = [m for m in means if m is not None]
    if not valid:
        return None, means
    best = max(valid)
    return next(i for i, m in enumerate(means) if m is not None and m >= best - TIE), means


def choice_record(task, method, settings, seeds, trials: dict, spec, base, adapter, sha) -> dict | None:
    """The choice line of one task and method from its trials ({trial_id: line}), None when every setting
    has a diverged trial."""
    scores = [[trials[tid]["val_score"] for tid in ids] for _, ids in settings]
    best, means = choose(scores)
    if best is None:
        return None
    grid_keys = set().union(*(s for s, _ in settings))
    cfg = dataclasses.replace(base, task=task, method=method)
    record = {"kind": "choice", "task": task, "method": method, "setting": settings[best][0],
              "val_score": means[best], "seeds": seeds, "trials": len(settings) * len(seeds),
              "settings": [{"setting": s, "val_score": m, "scores": sc}
                           for (s, _), m, sc in zip(settings, means, scores)],
              "split": data.VALIDATION, "val_fraction": spec.val_fraction,
              "recipe": {k: v for k, v in recipe_of(cfg).items() if k not in grid_keys},
              "adapter": {k: v for k, v in adapter.items() if k not in grid_keys},
              "backbone": base.backbone, "backbone_sha256": sha,
              "trial_ids": [tid for _, ids in settings for tid in ids]}
    record["choice_id"] = digest({k: record[k] for k in ("task", "method", "seeds", "val_fraction", "recipe",
                                                            "adapter", "backbone_sha256", "trial_ids")})
    return {**record, "machine": runs.machine_description(), "commit": runs.git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe(setting: dict) -> str:
    return ", ".join(f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in setting.items())


def run(spec: TuneConfig, base, adapter: dict, system, *, finetune, check, flag, diverged) -> list:
    """`cli.py tune`: every trial not yet in tune.jsonl, then each method's choice; returns the choice lines
    written or found. base: the FinetuneConfig of the fixed recipe; adapter: the adapter flags given;
    finetune / check / flag / diverged: train.finetune, runs.check_config, the --flag of a field, and
    train.DivergedError (a diverged trial is recorded with no score, and its setting cannot be chosen)."""
    tasks, methods, seeds, settings = plan(spec, base, adapter, check, flag)
    check_splits(tasks, settings, base, spec.val_fraction)
    path = repo_path(spec.results_dir) / TUNE_FILE
    runs.check_output_folder(path.parent, "--results-dir")
    sha = backbone_hash(base.backbone)
    main = os.environ.get("RANK", "0") == "0"
    per_method = len(next(iter(settings.values()))) * len(seeds)
    lines = {r["trial_id"]: r for r in runs.load_jsonl(path) if r.get("kind") == "trial"}
    print(f"tune: {per_method} trials per method ({per_method // len(seeds)} settings x {len(seeds)} seed(s)), "
          f"{len(methods)} method(s) x {len(tasks)} task(s); validation: {spec.val_fraction:g} of each training "
          f"split; -> {path}")
    choices = []
    for task, method in itertools.product(tasks, methods):
        done = []
        for setting in settings[method]:
            ids = []
            for seed in seeds:
                cfg, overrides, tid = trial_config(spec, base, adapter, task, method, setting, seed, sha)
                ids.append(tid)
                if tid in lines:
                    continue
                t0 = time.time()
                result, why = run_trial(cfg, overrides, system, finetune, diverged)
                lines[tid] = trial_record(tid, cfg, setting, adapter, sha, result, why, time.time() - t0)
                if main:
                    runs.append_jsonl(path, lines[tid], key="trial_id")
                    if not spec.keep_models:
                        drop_model_files(cfg.out_dir)
                score = "diverged" if why else f"validation {100 * lines[tid]['val_score']:.2f}"
                print(f"tune {task} {method} [{describe(setting)}] seed {seed}: {score} "
                      f"({lines[tid]['wall_s'] / 60:.1f} min)")
            done.append((setting, ids))
        choice = choice_record(task, method, done, seeds, lines, spec, base, adapter, sha)
        if choice is None:
            print(f"tune {task} {method}: every setting has a diverged trial; no choice written")
            continue
        if main:
            runs.append_jsonl(path, choice, key="choice_id")
        choices.append(choice)
        print(f"tune {task} {method}: chose [{describe(choice['setting'])}], validation "
              f"{100 * choice['val_score']:.2f} (mean of {len(seeds)} seed(s)), {per_method} trials")
    return choices


# ---------------------------------------------------------------------------------------------------------
# 5. Read-back
# ---------------------------------------------------------------------------------------------------------

def apply_choice(cfg, overrides: dict, flag) -> tuple[object, dict]:
    """(cfg, adapter overrides) with the chosen setting of cfg.from_tune applied; unchanged without it.

    The choice is the one made on the run's own task, or, with cfg.tuned_on, on that task (a suite run at the
    recipe tuned on CoLA: the result line records both). Refused, with one line: no choice for that task and
    method, a choice tuned on another backbone, a tuned setting also given as a flag (a FinetuneConfig field
    away from its default, or an adapter flag) with another value than the chosen one (the same value agrees, so
    one command line serves every method of a suite), and a recipe that differs from the tuned one in anything but
    READBACK_FREE.
    """
    if not cfg.from_tune:
        if cfg.tuned_on:
            raise ValueError(f"--tuned-on {cfg.tuned_on} reads a tune's choice: give --from-tune results/{TUNE_FILE}")
        return cfg, overrides
    try:
        path, task = Path(cfg.from_tune), data.get_task(cfg.tuned_on or cfg.task).name
    except ValueError as e:
        raise ValueError(f"--tuned-on: {e}") from None
    if not path.is_file():
        raise ValueError(f"--from-tune {path}: no such file; `python cli.py tune` writes results/{TUNE_FILE}")
    choices = [r for r in runs.load_jsonl(path) if r.get("kind") == "choice"]
    mine = [r for r in choices if r["task"] == task and r["method"] == cfg.method]
    if not mine:
        held = sorted({f"{r['task']}/{r['method']}" for r in choices}) or ["none"]
        raise ValueError(f"--from-tune {path}: no choice for task {task} with method {cfg.method} (it holds "
                         f"{', '.join(held)}); tune that task and method first, or give --tuned-on TASK to "
                         f"use the choice made on another task")
    sha = backbone_hash(cfg.backbone)
    same = [r for r in mine if r["backbone_sha256"] == sha]
    if not same:
        raise ValueError(f"--from-tune {path}: the choice for {task}/{cfg.method} was tuned on another backbone "
                         f"({mine[-1]['backbone'] or 'random init'}, sha256 {str(mine[-1]['backbone_sha256'])[:12]}), "
                         f"not --backbone {cfg.backbone!r}; tune on this backbone")
    choice = same[-1]
    fin, ad = split_setting(choice["setting"], cfg)
    defaults = type(cfg)()
    clash = ([k for k, v in fin.items() if getattr(cfg, k) not in (getattr(defaults, k), v)]
             + [k for k, v in ad.items() if k in overrides and overrides[k] != v])
    if clash:
        raise ValueError(f"--from-tune {path} sets {', '.join(flag(k) for k in clash)} (tuned), also given as a "
                         f"flag with another value; drop the flag, or --from-tune")
    now = {**recipe_of(cfg), **{k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}}
    then = {**choice["recipe"], **choice["adapter"]}
    diffs = [f"{flag(k)} {then.get(k)!r} then, {now.get(k)!r} now" for k in sorted(set(then) | set(overrides))
             if k not in READBACK_FREE and k not in ad and then.get(k) != now.get(k)]
    if diffs:
        raise ValueError(f"--from-tune {path}: this run's recipe is not the one {task}/{cfg.method} was tuned with "
                         f"({'; '.join(diffs[:3])}); give the tune's flags (its choice line's recipe and adapter)")
    return dataclasses.replace(cfg, **fin), {**overrides, **ad}
