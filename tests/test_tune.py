"""The tuning protocol (tune.py): the held-out split of the training data, `cli.py tune`'s trials and choices,
resuming an interrupted tune, reading a choice back with --from-tune, and the bad input of each."""

import json
import re

import numpy as np
import pytest
import torch

import data
import report
import runs
import runtime
import train
import tune
from cli import evaluate_run

from conftest import FIXTURES, cli

# SST-2's fixture has 12 training sentences: --val-fraction 0.34 holds out 4 (two batches of 2), trains on 8.
TINY = ["--data-dir", FIXTURES, "--epochs", "1", "--batch-size", "2", "--max-len", "32", "--threads", "1"]


def tune_args(backbone, tmp_path, *extra):
    return ["tune", "--tasks", "SST-2", "--backbone", backbone, "--val-fraction", "0.34", *TINY,
            "--results-dir", tmp_path / "results", "--out-dir", tmp_path / "trials", *extra]


def lines(tmp_path, kind=None):
    rows = runs.load_jsonl(tmp_path / "results" / tune.TUNE_FILE)
    return [r for r in rows if kind is None or r["kind"] == kind]


def fake_finetune(scores: dict, calls: list, stop_after: int | None = None):
    """A stand-in for train.finetune: the score of a trial is scores[(method, lr, seed)] (None: it diverges);
    it raises KeyboardInterrupt (a kill) once stop_after trials have run."""
    def finetune(cfg, overrides, system):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append((cfg.method, cfg.lr, cfg.seed))
        assert cfg.val_fraction == 0.34 and cfg.suite == ""
        score = scores[(cfg.method, cfg.lr, cfg.seed)]
        if score is None:
            raise train.DivergedError("the training loss became nan at step 3")
        return {"last_score": score, "score": score, "dev": {"validation": {"accuracy": score}, "score": score},
                "run_id": f"{cfg.method}-{cfg.lr}-{cfg.seed}", "wall_s": 1.0, "val_examples": 4, "train_examples": 8}
    return finetune


def run_fake(backbone, tmp_path, finetune, grid="lr=1e-3,3e-3", methods="full,lora", seeds="0,1", **spec):
    cfg = train.FinetuneConfig(backbone=str(backbone), data_dir=str(FIXTURES), batch_size=2, max_len=32, epochs=1)
    spec = tune.TuneConfig(tasks="SST-2", methods=methods, grid=grid, seeds=seeds, val_fraction=0.34,
                           results_dir=str(tmp_path / "results"), out_dir=str(tmp_path / "trials"), **spec)
    return tune.run(spec, cfg, {}, train.SystemConfig(), finetune=finetune, check=runs.check_config,
                    flag=lambda k: runs.flag(k, runs.FLAG_NAMES), diverged=train.DivergedError)


# ---------------------------------------------------------------------------------------------------------
# The split

def test_the_split_is_fixed_disjoint_and_depends_on_nothing_but_the_split_size():
    keep, held = data.validation_split(1000, 0.1, 32, "X")
    assert len(held) == 100 and len(keep) == 900
    assert not set(keep) & set(held) and sorted({*keep, *held}) == list(range(1000))
    again = data.validation_split(1000, 0.1, 32, "X")
    assert all(np.array_equal(a, b) for a, b in zip((keep, held), again))
    np.random.seed(123)                                     # the global random state plays no part
    torch.manual_seed(123)
    assert np.array_equal(data.validation_split(1000, 0.1, 32, "X")[1], held)
    assert not np.array_equal(held, np.arange(900, 1000)) and not np.array_equal(held, np.arange(100))


def test_every_seed_holds_out_the_same_examples_and_max_train_takes_from_the_rest(backbone, tmp_path):
    tok_path = backbone / runs.TOKENIZER_FILE
    tok, task, rt = data.load_tokenizer(tok_path), data.get_task("SST-2"), runtime.Runtime(torch.device("cpu"), "fp32")
    built = [runs.build_run_data(task, FIXTURES, tok, tok_path, tmp_path, 32, 2, seed, max_train, rt, val_fraction=0.34)
             for seed, max_train in [(0, 0), (7, 0), (0, 5)]]
    def as_set(ids):
        return {tuple(x) for x in ids}
    held = [as_set(b.dev[data.VALIDATION].ids) for b in built]
    assert held[0] == held[1] == held[2] and len(held[0]) == 4 and all(set(b.dev) == {"validation"} for b in built)
    assert as_set(built[0].train.ids) == as_set(built[1].train.ids) and not held[0] & as_set(built[0].train.ids)
    assert [b.train_examples for b in built] == [8, 8, 5] and [b.held_out for b in built] == [4, 4, 4]
    assert [tuple(x) for x in built[2].train.ids] == [tuple(x) for x in built[0].train.ids[:5]]   # --max-train
    default = runs.build_run_data(task, FIXTURES, tok, tok_path, tmp_path, 32, 2, 0, 0, rt)
    assert set(default.dev) == {"dev"} and default.train_examples == 12 and default.held_out == 0


def test_a_validation_run_never_reads_dev_and_says_so(backbone, tmp_path, monkeypatch):
    read = []
    real_read = data.read_split
    monkeypatch.setattr(data, "read_split", lambda d, t, split: read.append(split) or real_read(d, t, split))
    args = ["finetune", "--task", "SST-2", "--method", "lora", "--backbone", backbone, *TINY,
            "--out-dir", tmp_path / "run", "--results-dir", tmp_path / "results"]
    code, message = cli(*args, "--val-fraction", "0.34")
    assert code == 0, message
    assert set(read) == {"train"}                                   # dev.tsv was never opened
    record = json.loads((tmp_path / "results" / runs.RESULTS_FILE).read_text().splitlines()[-1])
    assert record["split"] == "validation" and record["val_examples"] == 4 and record["train_examples"] == 8
    assert set(record["dev"]) == {"validation", "score"}
    # eval of the saved run scores the same validation set, again without dev
    assert evaluate_run(tmp_path / "run", FIXTURES)["score"] == pytest.approx(record["score"], abs=1e-12)
    assert set(read) == {"train"}
    code, message = cli(*args, "--out-dir", tmp_path / "run0")      # the default run: dev, as before
    assert code == 0, message
    assert "dev" in read
    default = json.loads((tmp_path / "results" / runs.RESULTS_FILE).read_text().splitlines()[-1])
    assert "split" not in default and set(default["dev"]) == {"dev", "score"} and default["train_examples"] == 12


def test_the_report_leaves_validation_lines_out():
    row = dict(task="RTE", method="lora", seed=0, suite="x", last_score=0.6)
    suites = report.split_suites([row, {**row, "seed": 1, "split": "dev"}, {**row, "seed": 2, "split": "validation"}])
    assert [r["seed"] for r in suites["x"]] == [0, 1]
    assert report.split_suites([{**row, "split": "validation"}]) == {}


# ---------------------------------------------------------------------------------------------------------
# The trials and the choice

def test_every_method_gets_the_same_trials_and_the_best_mean_is_chosen(backbone, tmp_path):
    scores = {("full", 1e-3, 0): 0.5, ("full", 1e-3, 1): 0.9, ("full", 3e-3, 0): 0.8, ("full", 3e-3, 1): 0.7,
              ("lora", 1e-3, 0): 0.6, ("lora", 1e-3, 1): 0.6, ("lora", 3e-3, 0): 0.7, ("lora", 3e-3, 1): 0.5}
    calls = []
    choices = run_fake(backbone, tmp_path, fake_finetune(scores, calls))
    trials = lines(tmp_path, "trial")
    assert len(trials) == 8 and sorted(calls) == sorted(scores)
    assert [sum(t["method"] == m for t in trials) for m in ("full", "lora")] == [4, 4]
    by = {c["method"]: c for c in choices}
    assert by["full"]["setting"] == {"lr": 3e-3} and by["full"]["val_score"] == pytest.approx(0.75)  # not the best seed
    assert by["lora"]["setting"] == {"lr": 1e-3}            # 0.6 and 0.6 tie: the setting listed first wins
    assert by["full"]["trials"] == by["lora"]["trials"] == 4 and lines(tmp_path, "choice") == choices
    t = trials[0]
    for key in ("task", "method", "setting", "seed", "val_score", "run_id", "backbone_sha256", "recipe", "machine",
                "commit", "date", "wall_s"):
        assert key in t, key
    assert t["backbone_sha256"] == runs.file_sha256(backbone / runs.BACKBONE_FILE) and t["recipe"]["max_len"] == 32
    assert "lr" not in t["recipe"] and t["split"] == "validation"


def test_a_diverged_setting_is_recorded_and_cannot_win(backbone, tmp_path):
    scores = {("lora", 1e-3, 0): 0.6, ("lora", 3e-3, 0): None}
    choices = run_fake(backbone, tmp_path, fake_finetune(scores, []), methods="lora", seeds="0")
    diverged = [t for t in lines(tmp_path, "trial") if t["diverged"]]
    assert len(diverged) == 1 and diverged[0]["val_score"] is None and "nan" in diverged[0]["diverged"]
    assert choices[0]["setting"] == {"lr": 1e-3}


def test_an_interrupted_tune_continues_where_it_stopped(backbone, tmp_path):
    scores = {(m, lr, s): 0.5 + lr + s / 10 for m in ("full", "lora") for lr in (1e-3, 3e-3) for s in (0, 1)}
    first = []
    with pytest.raises(KeyboardInterrupt):
        run_fake(backbone, tmp_path, fake_finetune(scores, first, stop_after=5))
    assert len(lines(tmp_path, "trial")) == 5 and len(lines(tmp_path, "choice")) == 1      # full's 4 trials: chosen
    second = []
    choices = run_fake(backbone, tmp_path, fake_finetune(scores, second))
    assert len(second) == 3 and not set(first) & set(second)        # only the trials not in the file ran
    assert len(lines(tmp_path, "trial")) == 8 and len(lines(tmp_path, "choice")) == 2 and len(choices) == 2
    third = []
    run_fake(backbone, tmp_path, fake_finetune(scores, third))       # all done: nothing runs, nothing is added
    assert third == [] and len(lines(tmp_path)) == 10
    # A trial is what it trains: in a grid over max_len too, the settings at the recipe's max_len 32 are the
    # trials already run; only those at 16 run.
    run_fake(backbone, tmp_path, fake_finetune(scores, third), grid="lr=1e-3,3e-3;max_len=16,32")
    assert len(third) == 8 and len(lines(tmp_path, "trial")) == 16 and len(lines(tmp_path, "choice")) == 4


def test_a_real_tune_end_to_end_then_read_back(backbone, tmp_path):
    args = tune_args(backbone, tmp_path, "--methods", "full,lora", "--grid", "lr=1e-3,3e-3")
    code, message = cli(*args)
    assert code == 0, message
    trials, choices = lines(tmp_path, "trial"), lines(tmp_path, "choice")
    assert len(trials) == 4 and len(choices) == 2
    assert all(t["val_examples"] == 4 and t["train_examples"] == 8 and 0 <= t["val_score"] <= 1 for t in trials)
    assert not list((tmp_path / "trials").glob("*/model.pt")) and not list((tmp_path / "trials").glob("*/adapter.pt"))
    code, message = cli(*args)                                      # again: every trial is there already
    assert code == 0, message
    assert len(lines(tmp_path)) == 6
    chosen = {c["method"]: c["setting"]["lr"] for c in choices}
    run = ["finetune", "--task", "SST-2", "--method", "lora", "--backbone", backbone, *TINY, "--out-dir",
           tmp_path / "final", "--results-dir", tmp_path / "final-results", "--max-train", "10",
           "--from-tune", tmp_path / "results" / tune.TUNE_FILE]
    code, message = cli(*run)
    assert code == 0, message
    record = json.loads((tmp_path / "final-results" / runs.RESULTS_FILE).read_text())
    assert record["lr"] == chosen["lora"] and "split" not in record and record["train_examples"] == 10
    assert record["from_tune"].endswith(tune.TUNE_FILE) and record["tuned_on"] == "SST-2"


# ---------------------------------------------------------------------------------------------------------
# Read-back

def choice_file(tmp_path, backbone, **changes) -> str:
    sha = runs.file_sha256(backbone / runs.BACKBONE_FILE)
    line = {"kind": "choice", "choice_id": "c", "task": "SST-2", "method": "lora", "setting": {"lr": 3e-3, "r": 4},
            "backbone": str(backbone), "backbone_sha256": sha, "recipe": {"max_len": 32, "batch_size": 2,
                                                                          "max_train": 100}, "adapter": {"alpha": 8.0}}
    path = tmp_path / "tune.jsonl"
    path.write_text(json.dumps({**line, **changes}) + "\n")
    return str(path)


def test_read_back_applies_the_choice_and_refuses_what_does_not_match(backbone, tmp_path):
    def flag(k):
        return runs.flag(k, runs.FLAG_NAMES)
    cfg = train.FinetuneConfig(task="sst2", method="lora", backbone=str(backbone), max_len=32, batch_size=2,
                               from_tune=choice_file(tmp_path, backbone))
    applied, overrides = tune.apply_choice(cfg, {"alpha": 8.0}, flag)
    assert applied.lr == 3e-3 and overrides == {"alpha": 8.0, "r": 4} and applied.max_len == 32
    assert tune.apply_choice(train.FinetuneConfig(), {"r": 2}, flag) == (train.FinetuneConfig(), {"r": 2})
    same = tune.apply_choice(train.dataclasses.replace(cfg, lr=3e-3), {"alpha": 8.0, "r": 4}, flag)   # flags that agree
    assert same == (applied, overrides)
    refused = [
        (dict(cfg=dict(task="RTE")), "no choice for task RTE with method lora (it holds SST-2/lora)"),
        (dict(cfg=dict(method="gate")), "no choice for task SST-2 with method gate"),
        (dict(line=dict(backbone_sha256="0" * 64)), "tuned on another backbone"),
        (dict(cfg=dict(lr=1e-4)), "sets --lr (tuned), also given as a flag"),
        (dict(overrides={"r": 16}), "sets --lora-r (tuned), also given as a flag"),
        (dict(cfg=dict(max_len=16)), "--max-len 32 then, 16 now"),
        (dict(overrides={"targets": ("q_proj",)}), "--lora-targets None then, ['q_proj'] now"),
        (dict(overrides={"alpha": 16.0}), "--lora-alpha 8.0 then, 16.0 now"),
        (dict(cfg=dict(from_tune=str(tmp_path / "none.jsonl"))), "no such file"),
    ]
    for case, words in refused:
        path = choice_file(tmp_path, backbone, **case.get("line", {}))
        bad = train.dataclasses.replace(cfg, **{"from_tune": path, **case.get("cfg", {})})
        with pytest.raises(ValueError) as err:
            tune.apply_choice(bad, {"alpha": 8.0, **case.get("overrides", {})}, flag)
        assert words in str(err.value) and "\n" not in str(err.value), (case, str(err.value))
    # --tuned-on: the choice made on SST-2 for an RTE run (a suite at the recipe tuned on one task)
    on_sst2 = train.dataclasses.replace(cfg, task="RTE", tuned_on="SST-2")
    assert tune.apply_choice(on_sst2, {"alpha": 8.0}, flag)[0].lr == 3e-3
    for bad, words in [(dict(tuned_on="SST-3"), "--tuned-on: unknown GLUE task 'SST-3'"),
                       (dict(tuned_on="RTE"), "no choice for task RTE with method lora"),
                       (dict(from_tune=""), "--tuned-on SST-2 reads a tune's choice: give --from-tune")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            tune.apply_choice(train.dataclasses.replace(on_sst2, **bad), {"alpha": 8.0}, flag)
    # another --max-train is the final runs' right: the whole training split
    assert tune.apply_choice(train.dataclasses.replace(cfg, from_tune=choice_file(tmp_path, backbone),
                                                       max_train=0), {"alpha": 8.0}, flag)[0].lr == 3e-3


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line naming the flag, exit code 1, nothing run

@pytest.mark.parametrize("extra, words", [
    (["--val-fraction", "0.1"], "--val-fraction 0.1 holds out 1 of SST-2's 12 training examples, fewer than one batch"),
    (["--val-fraction", "0.9"], "--val-fraction 0.9 leaves 1 of SST-2's 12 training examples to train on"),
    (["--tasks", "RTE", "--batch-size", "4"], "--val-fraction 0.34: RTE's training split has 6 examples, too few"),
    (["--val-fraction", "0"], "--val-fraction must be > 0"),
    (["--grid", ""], "--grid is empty"),
    (["--grid", "lr"], "--grid: 'lr' is not key=value"),
    (["--grid", "foo=1,2"], "--grid: 'foo' is not a finetune or adapter setting"),
    (["--grid", "seed=1,2"], "--grid: 'seed' is set by tune itself"),
    (["--grid", "data-dir=a,b"], "--grid: 'data-dir' says where or how to run"),
    (["--grid", "lr=1e-3,nan"], "--grid: lr=nan is not a finite number"),
    (["--grid", "epochs=1.5"], "--grid: epochs='1.5' is not a whole number"),
    (["--grid", "lr=-1"], "--grid: --lr must be >= 0, got -1"),
    (["--methods", "alloc", "--grid", "t_init=0.1,x"], "--grid: t_init='x' is not a number"),
    (["--grid", "lr=1e-3;lr=2e-3"], "appears twice"),
    (["--methods", "lora", "--grid", "lora-r=0,4"], "--grid: --lora-r"),
    (["--methods", "full,lora", "--grid", "lora_r=4,8"],
     "--lora-r: an adapter setting, and method full has no adapter"),
    (["--methods", "full,lora", "--grid", "lr=1e-4", "--method-grid", "lora:lr=1e-3,3e-3"],
     "every method must get the same number of trials, but full gets 1, lora gets 2"),
    (["--methods", "lora", "--method-grid", "gate:lr=1e-3"], "--method-grid 'gate:lr=1e-3'"),
    (["--methods", "lora", "--grid", "lr=1e-3,3e-3", "--seeds", "0,1", "--max-trials", "3"],
     "--max-trials 3: the grid has 4 trials per method (2 settings x 2 seeds)"),
    (["--methods", "lora,bogus"], "--methods 'lora,bogus'"),
    (["--tasks", "SST3"], "--tasks: unknown GLUE task 'SST3'"),
    (["--seeds", "0,x"], "--seeds '0,x'"),
])
def test_bad_tune_input_is_one_line_naming_the_flag(backbone, tmp_path, extra, words):
    code, message = cli(*tune_args(backbone, tmp_path, "--methods", "lora", "--grid", "lr=1e-3", *extra))
    assert code == 1 and words in message and "\n" not in message, message
    assert not (tmp_path / "results" / tune.TUNE_FILE).exists() and not (tmp_path / "trials").exists()


def test_a_finetune_validation_fraction_too_small_for_a_batch(backbone, tmp_path):
    code, message = cli("finetune", "--task", "SST-2", "--method", "lora", "--backbone", backbone, *TINY,
                        "--out-dir", tmp_path / "run", "--results-dir", tmp_path / "results", "--val-fraction", "0.05")
    assert code == 1 and "--val-fraction 0.05 holds out 1 of SST-2's 12" in message


def test_a_setting_equal_to_the_methods_default_is_the_same_trial():
    """Naming LoRA's default targets in a grid (q,v against all projections) must not train q,v again: the trial
    id of a setting equal to its default is the id of the run without it; another value is another trial."""
    spec = tune.TuneConfig(tasks="CoLA", methods="lora", val_fraction=0.1)
    base = train.FinetuneConfig(task="CoLA", max_len=32, lr=1e-3)
    def tid(method, setting):
        return tune.trial_config(spec, base, {}, "CoLA", method, setting, 0, "sha")[2]
    assert tid("lora", {"targets": ["q_proj", "v_proj"]}) == tid("lora", {}) == tid("lora", {"r": 8})
    assert tid("lora", {"targets": ["q_proj", "k_proj", "v_proj"]}) != tid("lora", {})
    assert tid("lora", {"r": 4}) != tid("lora", {}) and tid("full", {}) != tid("lora", {})
    assert tid("lora", {"lr": 1e-3}) == tid("lora", {})          # a finetune setting at the recipe's own value
    # t_init keeps its form: 50 steps is the default (the same trial), 0.1 of the run another trial
    grid = tune.parse_grid("t_init=50,0.1", "--grid", tune.tunable_defaults(base), runs.flag)
    assert grid == {"t_init": [50, 0.1]} and type(grid["t_init"][0]) is int
    assert tid("alloc", {"t_init": 50}) == tid("alloc", {}) != tid("alloc", {"t_init": 0.1})
