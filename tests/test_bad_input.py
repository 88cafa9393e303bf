"""Bad input never becomes a result: what a new user may hand cli.py by mistake (flags that are not finite
numbers, data that diverges training, damaged model files, output paths that cannot be written, files of
two runs mixed up) stops with one line naming the flag or file and the fix, before the work where it can,
and nothing non-finite is ever saved or recorded."""

import json
import shutil

import numpy as np
import pytest
import torch

import data
import plots
import runs
import train

from conftest import FIXTURES, NANO, cli


def finetune_args(backbone, tmp_path, task="SST-2", method="full", *extra):
    """SST-2's fixture: 12 training examples, 3 steps of 4 per epoch; STS-B's: 8, 2 steps."""
    return ["finetune", "--task", task, "--method", method, "--backbone", backbone, "--data-dir", FIXTURES,
            "--epochs", "2", "--batch-size", "4", "--max-len", "32", "--out-dir", tmp_path / "run",
            "--results-dir", tmp_path / "results", "--threads", "1", *extra]


def pretrain_args(tmp_path, *extra):
    return ["pretrain", "--out-dir", tmp_path / "bb", "--data-dir", FIXTURES, *NANO, *extra]


def replace_flag(args, flag, value):
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


# ---------------------------------------------------------------------------------------------------------
# Flags: every number finite and in range, named by its --flag (check_config)

@pytest.mark.parametrize("flag, value, expected", [
    ("--lr", "inf", "--lr must be a finite number"),
    ("--weight-decay", "nan", "--weight-decay must be a finite number"),
    ("--grad-clip", "nan", "--grad-clip must be a finite number"),
    ("--min-lr-ratio", "-1", "--min-lr-ratio must be >= 0 and <= 1, got -1"),
    ("--max-train", "-5", "--max-train must be >= 0, got -5"),
    ("--seed", "99999999999", "--seed must be >= 0 and <= 4294967295, got 99999999999"),
])
def test_finetune_flags_that_are_not_finite_or_out_of_range(backbone, tmp_path, flag, value, expected):
    code, message = cli(*replace_flag(finetune_args(backbone, tmp_path), flag, value))
    assert code == 1 and expected in message, message
    assert not (tmp_path / "run").exists()                     # stopped before anything was written


@pytest.mark.parametrize("flag, value, expected", [
    ("--lr", "inf", "--lr must be a finite number"),
    ("--weight-decay", "nan", "--weight-decay must be a finite number"),
    ("--grad-clip", "nan", "--grad-clip must be a finite number"),
    ("--min-lr-ratio", "-1", "--min-lr-ratio must be >= 0 and <= 1, got -1"),
    ("--seed", "99999999999", "--seed must be >= 0 and <= 4294967295, got 99999999999"),
])
def test_pretrain_flags_that_are_not_finite_or_out_of_range(tmp_path, flag, value, expected):
    code, message = cli(*replace_flag(pretrain_args(tmp_path), flag, value))
    assert code == 1 and expected in message, message
    assert not (tmp_path / "bb").exists()


# ---------------------------------------------------------------------------------------------------------
# The finite-loss guard: a diverged run stops with the step, and saves nothing from the diverged weights

def poison_after(monkeypatch, call: int):
    """Make train_step fill the first trainable tensor with NaN right after its call-th step."""
    real, calls = train.train_step, {"n": 0}

    def step(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        return out

    monkeypatch.setattr(train, "train_step", step)


def results_before(tmp_path) -> str:
    """A results file with one earlier line, whose text must not change."""
    path = tmp_path / "results" / runs.RESULTS_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"task": "SST-2", "run_id": "earlier"}) + "\n")
    return path.read_text()


@pytest.mark.parametrize("task, method", [("STS-B", "full"), ("SST-2", "lora")])
def test_a_loss_that_becomes_nan_stops_the_run_at_its_step(backbone, tmp_path, monkeypatch, task, method):
    before = results_before(tmp_path)
    steps = {"STS-B": 2, "SST-2": 3}[task]                     # steps per epoch
    poison_after(monkeypatch, steps + 1)                       # in epoch 2: the next step's loss is nan
    code, message = cli(*finetune_args(backbone, tmp_path, task, method))
    run = tmp_path / "run"
    assert code == 1
    assert f"the training loss became nan at step {steps + 2} (epoch 2)" in message, message
    assert f"the last good checkpoint is {run / runs.CHECKPOINT_FILE} (step {steps})" in message
    assert "--lr" in message
    assert (tmp_path / "results" / runs.RESULTS_FILE).read_text() == before
    assert not (run / runs.FINAL_FILE).exists()
    ckpt = torch.load(run / runs.CHECKPOINT_FILE, weights_only=True)
    assert ckpt["state"]["step"] == steps                      # the epoch-1 checkpoint, untouched
    best = torch.load(run / ("model.pt" if method == "full" else "adapter.pt"), weights_only=True)
    assert all(torch.isfinite(t).all() for t in best["model" if method == "full" else "state"].values())


def test_weights_that_become_nan_are_never_saved_nor_scored(backbone, tmp_path, monkeypatch):
    # The weights turn NaN in the last step of epoch 1: that step's loss was still finite, but the epoch's
    # evaluation and checkpoint would save them (and score a classifier of NaNs 50%).
    before = results_before(tmp_path)
    poison_after(monkeypatch, 3)
    code, message = cli(*finetune_args(backbone, tmp_path, "SST-2"))
    run = tmp_path / "run"
    assert code == 1 and "the weights became non-finite" in message and "at step 3 (epoch 1)" in message, message
    assert "no checkpoint of this run was written yet" in message
    assert not (run / "model.pt").exists() and not (run / runs.CHECKPOINT_FILE).exists()
    assert not (run / runs.FINAL_FILE).exists()
    assert (tmp_path / "results" / runs.RESULTS_FILE).read_text() == before


def test_a_pretraining_loss_that_becomes_nan_stops_the_run(tmp_path, monkeypatch):
    poison_after(monkeypatch, 6)                               # checkpoint at step 5 (evaluation); nan at 7
    code, message = cli(*pretrain_args(tmp_path))
    out = tmp_path / "bb"
    assert code == 1 and "the training loss became nan at step 7" in message, message
    assert f"the last good checkpoint is {out / runs.CHECKPOINT_FILE} (step 5)" in message
    assert not (out / runs.BACKBONE_FILE).exists()
    assert torch.load(out / runs.CHECKPOINT_FILE, weights_only=True)["state"]["step"] == 5


def test_a_saved_model_of_nans_is_not_scored(backbone, tmp_path):
    code, message = cli(*finetune_args(backbone, tmp_path, "SST-2", "full", "--epochs", "1"))
    assert code == 0, message
    path = tmp_path / "run" / "model.pt"
    saved = torch.load(path, weights_only=True)
    saved["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                      for k, v in saved["model"].items()}
    torch.save(saved, path)
    code, message = cli("eval", "--run", tmp_path / "run", "--data-dir", FIXTURES)
    assert code == 1 and "predictions are not finite" in message, message




def test_classifier_outputs_that_are_not_finite_become_an_error_not_a_class():
    class NaNModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx, y):
            logits = torch.zeros(len(idx), 2)
            logits[0] = float("nan")                           # argmax would call this row class 0 (or 1)
            return logits, logits.sum()

    batcher = data.BucketBatcher([np.array([5, 2])] * 3, np.array([0, 1, 0]), 4, shuffle=False)
    preds, labels, _ = train.predict(NaNModel(), batcher)
    with pytest.raises(data.DataError, match="1 of 3 predictions are not finite"):
        data.compute_metrics("sst2", preds, labels)




def test_a_non_finite_number_never_reaches_results(tmp_path):
    record = {"task": "STS-B", "run_id": "x", "score": 0.5, "dev": {"dev": {"pearson": float("nan")}}}
    with pytest.raises(ValueError, match=r"dev\.dev\.pearson is nan"):
        runs.append_result(record, tmp_path)
    assert not (tmp_path / runs.RESULTS_FILE).exists()


# ---------------------------------------------------------------------------------------------------------
# Model files: one careful reader (runs.read_torch_file) names the damaged file

def truncate(path):
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


@pytest.fixture(scope="module")
def lora_run(backbone, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    code, message = cli(*finetune_args(backbone, tmp, "SST-2", "lora", "--epochs", "1", "--lora-r", "2"))
    assert code == 0, message
    return tmp / "run"


def test_a_truncated_adapter_file_is_named(lora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    truncate(run / "adapter.pt")
    code, message = cli("eval", "--run", run, "--data-dir", FIXTURES)
    assert code == 1 and f"{run / 'adapter.pt'} is damaged and cannot be read" in message, message


def test_a_truncated_model_file_is_named(backbone, tmp_path):
    code, message = cli(*finetune_args(backbone, tmp_path, "SST-2", "full", "--epochs", "1"))
    assert code == 0, message
    truncate(tmp_path / "run" / "model.pt")
    code, message = cli("eval", "--run", tmp_path / "run", "--data-dir", FIXTURES)
    assert code == 1 and f"{tmp_path / 'run' / 'model.pt'} is damaged and cannot be read" in message, message


def test_a_truncated_backbone_file_is_named(backbone, lora_run, tmp_path):
    other = tmp_path / "backbone"
    shutil.copytree(backbone, other)
    truncate(other / runs.BACKBONE_FILE)
    code, message = cli(*finetune_args(other, tmp_path))
    assert code == 1 and f"{other / runs.BACKBONE_FILE} is damaged and cannot be read" in message, message
    assert "pretrain" in message
    code, message = cli("eval", "--run", lora_run, "--data-dir", FIXTURES, "--backbone", other)
    assert code == 1 and f"{other / runs.BACKBONE_FILE} is damaged" in message, message


def test_load_adapter_takes_an_already_read_payload(lora_run, backbone):
    payload = runs.read_torch_file(lora_run / "adapter.pt", "fine-tune again")
    config, state, _, _ = runs.load_backbone(backbone)
    model = runs.build_classifier(config, state, 2)
    _, adapter_cfg, extra = runs.load_adapter(lora_run / "adapter.pt", model, payload=payload)
    assert adapter_cfg.r == 2 and extra["task"] == "SST-2"


def test_eval_uses_the_task_of_the_run_config_and_refuses_a_model_of_another(lora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    config = json.loads((run / "config.json").read_text())
    config["task"] = "RTE"
    (run / "config.json").write_text(json.dumps(config))
    code, message = cli("eval", "--run", run, "--data-dir", FIXTURES)
    assert code == 1 and "SST-2" in message and "RTE" in message and "config.json" in message, message
    assert str(run / "adapter.pt") in message


# ---------------------------------------------------------------------------------------------------------
# Outputs: every place a run writes is checked before its first step, and a finished run is never lost

def test_results_dir_that_is_a_file_stops_before_training(backbone, tmp_path):
    (tmp_path / "results").write_text("not a folder")
    code, message = cli(*finetune_args(backbone, tmp_path))
    assert code == 1 and "--results-dir" in message and "is a file, not a folder" in message, message
    assert not (tmp_path / "run").exists()


def test_out_dir_that_is_a_file_stops_before_training(backbone, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    code, message = cli(*finetune_args(backbone, tmp_path))
    assert code == 1 and "--out-dir" in message and "is a file, not a folder" in message, message
    (tmp_path / "bb").write_text("not a folder")
    code, message = cli(*pretrain_args(tmp_path))
    assert code == 1 and "--out-dir" in message and "is a file, not a folder" in message, message
    code, message = cli(*replace_flag(pretrain_args(tmp_path), "--out-dir", tmp_path / "bb" / "sub"))
    assert code == 1 and "--out-dir" in message and "is a file, not a folder" in message, message


def test_a_results_write_that_fails_at_the_end_loses_nothing(backbone, tmp_path, monkeypatch):
    real = train.finetune_epochs

    def epochs_then_block_results(run, system):
        wall = real(run, system)
        (tmp_path / "results").write_text("now a file")         # the results folder is gone after training
        return wall

    monkeypatch.setattr(train, "finetune_epochs", epochs_then_block_results)
    args = finetune_args(backbone, tmp_path, "SST-2", "full", "--epochs", "1")
    code, message = cli(*args)
    assert code == 1 and "--resume" in message and str(tmp_path / "results") in message, message
    assert not (tmp_path / "run" / runs.FINAL_FILE).exists()
    monkeypatch.setattr(train, "finetune_epochs", real)
    (tmp_path / "results").unlink()
    code, message = cli(*args, "--resume")                      # the finished training is in the checkpoint
    assert code == 0, message
    assert (tmp_path / "run" / runs.FINAL_FILE).is_file()
    assert len((tmp_path / "results" / runs.RESULTS_FILE).read_text().splitlines()) == 1


def test_a_plot_that_fails_comes_after_the_result_is_saved(backbone, tmp_path, monkeypatch):
    def broken_plot(*args, **kwargs):
        raise OSError("plotting failed")

    monkeypatch.setattr(plots, "finetune_curves", broken_plot)
    code, message = cli(*finetune_args(backbone, tmp_path, "SST-2", "full", "--epochs", "1"))
    assert code == 1 and "plotting failed" in message
    assert (tmp_path / "run" / runs.FINAL_FILE).is_file()
    assert len((tmp_path / "results" / runs.RESULTS_FILE).read_text().splitlines()) == 1


def test_data_dir_that_is_a_file(backbone, tmp_path):
    (tmp_path / "glue").write_text("not a folder")
    code, message = cli(*replace_flag(finetune_args(backbone, tmp_path), "--data-dir", tmp_path / "glue"))
    assert code == 1 and f"{tmp_path / 'glue'} is a file, not a folder" in message, message
    assert "cannot write" not in message and "File exists" not in message


@pytest.mark.parametrize("extra, expected", [
    (["--lora-r", "0"], "--lora-r must be a positive integer"),
    (["--gate-penalty", "nan"], "--gate-penalty must be >= 0"),
    (["--gate-lr-mult", "0"], "--gate-lr-mult must be a finite number > 0"),
])
def test_an_adapter_setting_out_of_range_names_its_flag(backbone, tmp_path, extra, expected):
    code, message = cli("finetune", "--task", "RTE", "--method", "gate", "--backbone", backbone, "--data-dir",
                        FIXTURES, "--epochs", "1", "--batch-size", "4", "--max-len", "32", "--out-dir",
                        tmp_path / "run", "--results-dir", tmp_path / "results", *extra)
    assert code == 1 and expected in message, message
