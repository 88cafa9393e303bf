"""Shared by the test files: the repository on sys.path, the fixtures folder, the in-process command line,
no network, and one tiny pretrained backbone for the whole session."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import runtime  # noqa: E402
from cli import main as cli_main  # noqa: E402  (needs the path above)

FIXTURES = REPO / "tests" / "fixtures" / "glue"
# A nano GPT pretrained for 15 steps on the fixtures' text: a backbone in a few seconds.
NANO = ["--preset", "nano", "--batch-size", "4", "--block-size", "32", "--vocab-size", "300", "--max-steps", "15",
        "--warmup-steps", "2", "--eval-every", "5", "--threads", "1"]


def cli(*argv):
    """Run cli.py's command line in this process; returns (exit code, stderr-like message)."""
    try:
        cli_main([str(a) for a in argv])
    except SystemExit as stop:
        return (0 if stop.code in (None, 0) else 1), str(stop.code)
    return 0, ""


@pytest.fixture(autouse=True)
def offline_and_threads(monkeypatch):
    """No test may reach the network (downloads go to a closed local port); the thread count is restored
    after a run with --threads 1."""
    monkeypatch.setenv("GLUE_BASE_URL", "http://127.0.0.1:9")
    # --precision auto means fp32 in every test, whatever the CPU: the tests compare runs to the last digit,
    # which bf16 autocast (auto's choice on a CPU with native bf16) would not keep. test_scale checks both
    # branches of the choice itself; its subprocesses pass --precision fp32.
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def backbone(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("backbone")
    code, message = cli("pretrain", "--out-dir", out, "--data-dir", FIXTURES, *NANO)
    torch.set_num_threads(threads)
    assert code == 0, message
    return out
