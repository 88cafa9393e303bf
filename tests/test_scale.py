"""Tests of scaling up and surviving: resumable runs (a real SIGKILL), devices and precision, and DDP with
2 gloo processes on the CPU. Everything runs on the tiny fixtures with the nano model. (Imported
checkpoints, GPT-2's among them, are tests/test_import.py's.)"""

import errno
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import runs
import runtime
from model import GPTClassifier, preset
from conftest import FIXTURES, NANO, cli

REPO = Path(__file__).resolve().parents[1]
SCHEDULE = ["--t-init", "1", "--t-final", "1", "--delta-t", "1", "--lora-r", "4", "--target-r", "2"]
# Fields of final.json that describe the attempt rather than the result.
VOLATILE = {"wall_s", "tokens_per_s", "date", "run_dir", "resumed", "run_id", "machine", "commit"}


def finetune_args(backbone, run, method="dynlora", task="SST-2", epochs=2, *extra):
    """SST-2's fixture has 12 training examples: 6 batches of 2 per epoch."""
    adapter = SCHEDULE if method in ("alloc", "dynlora", "adalora") else []
    return ["finetune", "--task", task, "--method", method, "--backbone", backbone, "--data-dir", FIXTURES,
            "--epochs", epochs, "--batch-size", "2", "--max-len", "32", "--out-dir", run / "run",
            "--results-dir", run / "results", "--threads", "1", "--precision", "fp32", *adapter, *extra]


# A cli.py process that blocks (sleeps) inside its N-th optimizer step, after the forward and backward
# passes of that step; it touches a marker file first, so the test knows when to kill it.
BLOCKING_TRAIN = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch
calls = 0
original_step = torch.optim.AdamW.step
def step(self, *args, **kwargs):
    global calls
    calls += 1
    if calls == {block_at}:
        Path({marker!r}).touch()
        time.sleep(600)
    return original_step(self, *args, **kwargs)
torch.optim.AdamW.step = step
import cli
cli.main(sys.argv[1:])
"""


def run_and_kill(args: list, block_at: int, tmp_path: Path, sig=signal.SIGKILL) -> str:
    """Start cli.py in a subprocess, send it sig (SIGKILL) during its block_at-th optimizer step; returns what it
    printed."""
    marker = tmp_path / "blocked"
    script = BLOCKING_TRAIN.format(repo=str(REPO), block_at=block_at, marker=str(marker))
    env = {**os.environ, "GLUE_BASE_URL": "http://127.0.0.1:9"}
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=log, stderr=log, env=env)
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        alive = proc.poll() is None
        proc.send_signal(sig)
        proc.wait(timeout=60)
    printed = (tmp_path / "killed.log").read_text()
    assert marker.exists() and alive, printed[-2000:]
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), printed[-2000:]
    return printed


def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def without(record: dict, keys: set) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0):
    assert set(a) == set(b)
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=0), \
                (key, (a[key].float() - b[key].float()).abs().max().item())


# ---------------------------------------------------------------------------------------------------------
# 1. Resume

@pytest.mark.parametrize("block_at, save_every", [(4, "2"), (1, "0")])
def test_ctrl_c_prints_one_line_saying_what_was_kept_and_how_to_continue(backbone, tmp_path, block_at, save_every):
    run = tmp_path / "run"
    args = finetune_args(backbone, tmp_path, "lora", "SST-2", 2, "--save-every", save_every)
    printed = run_and_kill(args, block_at=block_at, tmp_path=tmp_path, sig=signal.SIGINT)
    assert "Traceback" not in printed and "KeyboardInterrupt" not in printed, printed[-2000:]
    last = printed.strip().splitlines()[-1]
    if save_every == "0":       # interrupted in step 1: no checkpoint yet
        assert last.startswith(f"finetune interrupted before its first checkpoint in {run}"), last
    else:                       # interrupted in step 4: the checkpoint of step 2 continues it
        assert last.startswith(f"finetune interrupted: its last checkpoint, {run / 'checkpoint.pt'}"), last
        assert last.endswith("the same command plus --resume continues it"), last
        code, message = cli(*args, "--resume")
        assert code == 0, message


@pytest.mark.parametrize("method", ["dynlora", "full"])
def test_sigkill_mid_epoch_then_resume_ends_exactly_like_an_uninterrupted_run(backbone, tmp_path, method):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = finetune_args(backbone, whole, method)
    code, message = cli(*args)
    assert code == 0, message

    # Checkpoints every 2 steps; killed inside step 4 of epoch 1 (of 6), so step 3 is lost and redone.
    args = finetune_args(backbone, broken, method, "SST-2", 2, "--save-every", "2")
    run_and_kill(args, block_at=4, tmp_path=tmp_path)
    ckpt = torch.load(broken / "run" / "checkpoint.pt", weights_only=True)
    assert (ckpt["state"]["step"], ckpt["state"]["epoch"], ckpt["state"]["batch"]) == (2, 0, 2)
    assert not (broken / "run" / "final.json").exists() and not (broken / "results").exists()
    code, message = cli(*args, "--resume")
    assert code == 0, message

    a, b = whole / "run", broken / "run"
    final_a, final_b = json.loads((a / "final.json").read_text()), json.loads((b / "final.json").read_text())
    assert without(final_a, VOLATILE) == without(final_b, VOLATILE)
    assert final_b["resumed"] == 1 and final_a["resumed"] == 0
    # Every logged number (losses, learning rates, dev metrics, rank patterns) is the same.
    assert [without(r, {"wall_s"}) for r in lines(a / "metrics.jsonl")] == \
           [without(r, {"wall_s"}) for r in lines(b / "metrics.jsonl")]
    # The final training state and the saved best model are bit-identical.
    last_a = torch.load(a / "checkpoint.pt", weights_only=True)
    last_b = torch.load(b / "checkpoint.pt", weights_only=True)
    assert_same_tensors(last_a["model"], last_b["model"])
    best = "model.pt" if method == "full" else "adapter.pt"
    key = "model" if method == "full" else "state"
    assert_same_tensors(torch.load(a / best, weights_only=True)[key], torch.load(b / best, weights_only=True)[key])
    # The result was appended once.
    assert len(lines(broken / "results" / "finetune.jsonl")) == 1


def test_sigkill_during_pretraining_then_resume(tmp_path):
    args = ["pretrain", "--data-dir", FIXTURES, *NANO, "--precision", "fp32"]
    code, message = cli(*args, "--out-dir", tmp_path / "whole")
    assert code == 0, message
    broken = ["--out-dir", tmp_path / "broken", "--save-every", "4"]
    run_and_kill(args + broken, block_at=8, tmp_path=tmp_path)   # checkpoints at 4 and 5 (evaluation); 6, 7 lost
    assert torch.load(tmp_path / "broken" / "checkpoint.pt", weights_only=True)["state"]["step"] == 5
    code, message = cli(*args, *broken, "--resume")
    assert code == 0, message
    a = torch.load(tmp_path / "whole" / "backbone.pt", weights_only=True)
    b = torch.load(tmp_path / "broken" / "backbone.pt", weights_only=True)
    assert_same_tensors(a["model"], b["model"])
    assert lines(tmp_path / "whole" / "metrics.jsonl") == lines(tmp_path / "broken" / "metrics.jsonl")
    code, message = cli(*args, *broken, "--resume")
    assert code == 1 and "has finished" in message


def test_resume_refuses_other_settings_a_finished_run_and_a_missing_checkpoint(backbone, tmp_path):
    args = finetune_args(backbone, tmp_path, "lora", "SST-2", 1)
    code, message = cli(*args, "--resume")
    assert code == 1 and "no checkpoint.pt" in message and "without --resume" in message
    code, message = cli(*args)
    assert code == 0, message
    code, message = cli(*args, "--lr", "0.005", "--resume")
    # The learning rate in effect is compared: --lr 0 meant the method's default, 1e-3.
    assert code == 1 and "--lr 0.001 then, 0.005 now" in message and "config.json" in message
    code, message = cli(*finetune_args(backbone, tmp_path, "lora", "RTE", 1), "--resume")
    assert code == 1 and "--task 'SST-2' then, 'RTE' now" in message
    code, message = cli(*args, "--lora-r", "2", "--resume")
    assert code == 1 and "--lora-r 8 then, 2 now" in message
    # Same settings, but the run is complete: nothing to do, nothing appended twice.
    code, message = cli(*args, "--resume")
    assert code == 1 and "has finished" in message
    code, message = cli(*args, "--lr", "0.001", "--resume")        # the default, given explicitly: the same run
    assert code == 1 and "has finished" in message
    assert len(lines(tmp_path / "results" / "finetune.jsonl")) == 1


def test_truncated_checkpoint_is_reported(backbone, tmp_path):
    args = finetune_args(backbone, tmp_path, "lora", "SST-2", 1, "--save-every", "1")
    code, message = cli(*args)
    assert code == 0, message
    path = tmp_path / "run" / "checkpoint.pt"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    code, message = cli(*args, "--resume")
    assert code == 1 and str(path) in message and "damaged" in message


def test_disk_full_while_saving_keeps_the_previous_checkpoint(backbone, tmp_path, monkeypatch):
    real_save = torch.save
    seen = {"checkpoints": 0}

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("checkpoint.pt.tmp"):
            seen["checkpoints"] += 1
            if seen["checkpoints"] == 2:                   # the second checkpoint: the disk fills up mid-write
                seen["before"] = (tmp_path / "run" / "checkpoint.pt").read_bytes()
                Path(f).write_bytes(b"half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, message = cli(*finetune_args(backbone, tmp_path, "lora", "SST-2", 1, "--save-every", "1"))
    assert code == 1
    assert "No space left on device" in message and "checkpoint.pt is intact" in message and "--resume" in message
    path = tmp_path / "run" / "checkpoint.pt"
    assert path.read_bytes() == seen["before"] and not path.with_name("checkpoint.pt.tmp").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["state"]["step"] == 1
    code, message = cli(*finetune_args(backbone, tmp_path, "lora", "SST-2", 1, "--save-every", "1"), "--resume")
    assert code == 0, message


def test_results_line_is_appended_once_per_run(tmp_path):
    for _ in range(2):
        runs.append_result({"task": "RTE", "run_id": "abc"}, tmp_path)
    runs.append_result({"task": "RTE", "run_id": "def"}, tmp_path)
    assert [r["run_id"] for r in lines(tmp_path / "finetune.jsonl")] == ["abc", "def"]


# ---------------------------------------------------------------------------------------------------------
# 2. Devices, precision, torch.compile

def test_device_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "mps_available", lambda: False)
    assert runtime.select_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda: no CUDA GPU is available here"):
        runtime.select_device("cuda")
    with pytest.raises(ValueError, match="--device mps"):
        runtime.select_device("mps")
    with pytest.raises(ValueError, match="--device 'tpu' is not known"):
        runtime.select_device("tpu")
    monkeypatch.setattr(runtime, "mps_available", lambda: True)
    assert runtime.select_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)               # cuda > mps > cpu
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.select_device("auto", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="LOCAL_RANK 2 but only 2 GPU"):
        runtime.select_device("cuda", local_rank=2)


def test_precision_selection(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert runtime.select_precision("auto", cpu) == "fp32"
    assert runtime.select_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA device"):
        runtime.select_precision("fp16", cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.select_precision("auto", gpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)   # e.g. a V100 or T4
    assert runtime.select_precision("auto", gpu) == "fp16"
    with pytest.raises(ValueError, match="this GPU has no bf16 support"):
        runtime.select_precision("bf16", gpu)
    assert not runtime.Runtime(cpu, "bf16").grad_scaler().is_enabled()      # bf16 needs no loss scaling


def test_auto_picks_bf16_exactly_on_cpus_that_compute_it_natively(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: True)            # e.g. AMD Zen 4, Sapphire Rapids
    assert runtime.select_precision("auto", cpu) == "bf16"
    assert runtime.select_precision("fp32", cpu) == "fp32"                   # an explicit value is obeyed
    assert "computes bf16 natively" in runtime.precision_note("auto", "bf16", cpu)
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: False)           # e.g. AVX2-only
    assert runtime.select_precision("auto", cpu) == "fp32"
    assert runtime.select_precision("bf16", cpu) == "bf16"                   # runs, but says it is emulated:
    note = runtime.precision_note("bf16", "bf16", cpu)
    assert "EMULATED" in note and "--precision auto" in note and "\n" not in note
    assert "no native bf16" in runtime.precision_note("auto", "fp32", cpu)
    # The CPU checks PyTorch itself exposes decide it, whatever this machine is.
    monkeypatch.undo()
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert runtime.cpu_native_bf16() == bool(expected)


def test_a_run_prints_its_precision_and_why(backbone, tmp_path, capsys):
    code, message = cli(*finetune_args(backbone, tmp_path, "lora", "SST-2", 1, "--precision", "auto"))
    assert code == 0, message
    native = runtime.cpu_native_bf16()
    assert ("precision bf16 autocast (--precision auto; this CPU computes bf16 natively" if native else
            "precision fp32 (--precision auto; this CPU has no native bf16") in capsys.readouterr().out
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["precision"] == ("bf16" if native else "fp32") and final["compiled"] is None
    assert 0 <= final["padding_fraction"] < 1 and final["train_tokens"] > 0


def test_compile_falls_back_to_eager_in_one_line_where_the_compiler_cannot_run(monkeypatch, capsys):
    def broken(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nlong compiler output")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(runtime, "_COMPILE_PROBES", {})
    model = GPTClassifier(preset("nano"), 2)
    wrapped = runtime.wrap(model, runtime.Runtime(torch.device("cpu"), "fp32"), compile=True)
    assert wrapped is model                                                   # eager, not a broken wrapper
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("--compile: torch.compile cannot run here (RuntimeError: "
                                               "InductorError") and "training eagerly" in out[0]


@pytest.mark.parametrize("command", ["finetune", "pretrain"])
def test_cuda_asked_for_but_absent(backbone, tmp_path, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = finetune_args(backbone, tmp_path) if command == "finetune" else \
        ["pretrain", "--out-dir", tmp_path / "bb", "--data-dir", FIXTURES, *NANO]
    code, message = cli(*args, "--device", "cuda")
    assert code == 1 and "--device cuda: no CUDA GPU is available" in message and "--device cpu" in message


def test_bf16_autocast_trains_and_evaluates(backbone, tmp_path):
    code, message = cli(*finetune_args(backbone, tmp_path, "dynlora", "STS-B", 1), "--precision", "bf16")
    assert code == 0, message
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["precision"] == "bf16" and final["device"] == "cpu"
    assert all(map(lambda v: v == v, [final["score"], final["merged_score"], final["mean_effective_rank"]]))


def test_compiled_training_saves_clean_keys_and_matches_eager(backbone, tmp_path, monkeypatch):
    """torch.compile with the "eager" backend: TorchDynamo captures the graphs (the gates' side effects, the
    masked LoRA forward) and runs them without generating kernels, which keeps the test fast; the generated
    kernels themselves (the default "inductor" backend) are exercised on a GPU machine."""
    model = GPTClassifier(preset("nano"), 2)
    compiled = torch.compile(model)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())      # what saving it would give
    assert runtime.unwrap(compiled) is model

    code, message = cli(*finetune_args(backbone, tmp_path / "eager"))
    assert code == 0, message
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    code, message = cli(*finetune_args(backbone, tmp_path / "compiled"), "--compile")
    assert code == 0, message
    a = torch.load(tmp_path / "eager" / "run" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "compiled" / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in b)
    assert_same_tensors(a, b, atol=1e-6)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------
# 3. DDP: 2 gloo processes on the CPU, launched by torchrun

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world_size, grad_accum", [(1, 1), (1, 3), (2, 1), (2, 2), (3, 2)])
def test_a_global_batch_is_split_into_parts_whose_weights_give_its_mean(world_size, grad_accum):
    for n_rows in range(1, 10):
        rows, shares = [], []
        for rank in range(world_size):
            parts = runtime.split_batch(n_rows, rank, world_size, grad_accum)
            assert len(parts) == grad_accum
            rows += [r for part, w in parts if w > 0 for r in part.tolist()]
            # DDP divides the sum over ranks by world_size, so w / world_size = n_i / N is each part's share.
            shares += [w / world_size for part, w in parts]
            assert all(w == len(part) * world_size / n_rows for part, w in parts if w > 0)
            assert all(len(part) == 1 for part, w in parts if w == 0)                # an empty part: 1 dummy row
        assert sorted(rows) == list(range(n_rows))                                  # every row exactly once
        assert sum(shares) == pytest.approx(1.0)                                    # sum_i n_i / N = 1


# cli.py, plus a record of every rank's allocation masks after each reallocation (only rank 0 writes the
# run's files, so the other ranks' masks are otherwise invisible).
RECORD_MASKS = """
import json, os, sys
sys.path.insert(0, {repo!r})
import cli, dynlora
original = dynlora.RankAllocator._reallocate
masks = []
def reallocate(self, budget, t):
    original(self, budget, t)
    masks.append({{name: m.mask.tolist() for name, m in self.layers}})
    with open(os.path.join({out!r}, "masks-rank" + os.environ["RANK"] + ".json"), "w") as fh:
        json.dump(masks, fh)
dynlora.RankAllocator._reallocate = reallocate
cli.main(sys.argv[1:])
"""


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(backbone, tmp_path):
    # Global batches of 4 split over 2 processes x 2 micro-steps (one row each); 11 training examples, so the
    # last batch of each epoch has 3 rows and one part is empty. The dev split (the fixture's 6 rows, 3 times)
    # makes 3 batches of 8, 8 and 2: rank 0 scores two, rank 1 one, and the gate counts must be summed.
    glue = tmp_path / "glue" / "SST-2"
    glue.mkdir(parents=True)
    (glue / "train.tsv").write_text((FIXTURES / "SST-2" / "train.tsv").read_text())
    header, *rows = (FIXTURES / "SST-2" / "dev.tsv").read_text().splitlines()
    (glue / "dev.tsv").write_text("\n".join([header] + rows * 3) + "\n")

    def args(run, *extra):
        a = finetune_args(backbone, run, "dynlora", "SST-2", 2, "--batch-size", "4", "--max-train", "11", *extra)
        a[a.index("--data-dir") + 1] = tmp_path / "glue"
        return a

    code, message = cli(*args(tmp_path / "one"))
    assert code == 0, message

    two = tmp_path / "two"
    two.mkdir()
    script = two / "record_masks.py"
    script.write_text(RECORD_MASKS.format(repo=str(REPO), out=str(two)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLUE_BASE_URL": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *map(str, args(two, "--grad-accum", "2", "--device", "cpu"))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Both ranks took the same allocation decisions at every reallocation.
    masks0 = json.loads((two / "masks-rank0.json").read_text())
    masks1 = json.loads((two / "masks-rank1.json").read_text())
    assert len(masks0) == 4 and masks0 == masks1                # reallocations at steps 2..5 of 6
    # The result equals the 1-process run's, up to float rounding (the gradient sums run in another order).
    a = torch.load(tmp_path / "one" / "run" / "checkpoint.pt", weights_only=True)
    b = torch.load(two / "run" / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in b["model"])
    assert_same_tensors(a["model"], b["model"], atol=1e-5)
    assert_same_tensors({k: v for k, v in a["model"].items() if k.endswith("mask")},
                        {k: v for k, v in b["model"].items() if k.endswith("mask")})   # the same final masks
    final_a = json.loads((tmp_path / "one" / "run" / "final.json").read_text())
    final_b = json.loads((two / "run" / "final.json").read_text())
    assert final_b["processes"] == 2 and final_a["processes"] == 1
    assert final_b["score"] == final_a["score"] and final_b["merged_score"] == final_a["merged_score"]
    assert final_b["dev"]["dev"]["loss"] == pytest.approx(final_a["dev"]["dev"]["loss"], abs=1e-6)
    gates_a, gates_b = json.loads((tmp_path / "one" / "run" / "gates.json").read_text()), \
        json.loads((two / "run" / "gates.json").read_text())
    assert {n: (g["positions"], g["histogram"]) for n, g in gates_a.items()} == \
           {n: (g["positions"], g["histogram"]) for n, g in gates_b.items()}  # counts summed over the ranks
    assert len(lines(two / "results" / "finetune.jsonl")) == 1                   # rank 0 alone wrote it


def test_pretraining_on_two_gloo_processes_matches_one_process(tmp_path):
    # --holdout 0.2: 428 held-out tokens, 3 validation batches, shared out 2 + 1 over the two processes.
    args = ["pretrain", "--data-dir", FIXTURES, *NANO, "--max-steps", "6", "--eval-every", "3", "--holdout", "0.2",
            "--precision", "fp32"]
    code, message = cli(*args, "--out-dir", tmp_path / "one")
    assert code == 0, message
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLUE_BASE_URL": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "cli.py"), *map(str, args), "--out-dir", str(tmp_path / "two"),
                           "--grad-accum", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "backbone.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "backbone.pt", weights_only=True)
    assert_same_tensors(a["model"], b["model"], atol=1e-5)
    held_out = [[r["val_loss"] for r in lines(tmp_path / run / "metrics.jsonl") if "val_loss" in r]
                for run in ("one", "two")]
    assert len(held_out[0]) == 2 and held_out[0] == pytest.approx(held_out[1], abs=1e-5)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_without_its_peers_times_out_with_a_message(backbone, tmp_path, rank):
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    started = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, finetune_args(backbone, tmp_path)),
                           "--dist-timeout", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and time.time() - started < 60
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: rank {rank} of 2 could not reach the other processes at 127.0.0.1:")
    assert "--dist-timeout 2 s" in last and "torchrun --nproc_per_node=2" in last
