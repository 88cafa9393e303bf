"""A new method is one registry entry and one module: a toy gate, registered in a few lines (the lines
docs/extending.md shows), trains through train.finetune, is counted by the equal-budget parameter count, has
its row in the report's tables and a place in the known-answer benchmark, and reloads from its adapter file
as itself."""

import contextlib
import inspect

import pytest
import torch

import dynlora
import planted
import report
import runs
import train
import tune
from conftest import FIXTURES, REPO


class HalfGate(dynlora.RankGate):
    """A toy gate: the first half of the rank components always open (g = 1), the other half always closed."""

    def forward(self, u, mask=None):                 # u = [z; P x] (..., r + p): read only for its shape here
        g = (torch.arange(self.r, device=u.device) < self.r // 2).to(u.dtype).expand(*u.shape[:-1], self.r)
        self.record(g, mask)                       # the penalty's record (and the recorders') of every gate
        return g

    def active_parameter_count(self, k):
        return 0                                   # W_g, c and P are never used


@contextlib.contextmanager
def registered():
    """The toy method in the registries, and gone again afterwards (the lines docs/extending.md shows)."""
    dynlora.GATES["half"] = HalfGate
    dynlora.METHODS["half"] = dict(form="plain", allocation=False, gating=True, gate="half")
    try:
        yield "half"
    finally:
        del dynlora.METHODS["half"], dynlora.GATES["half"]


@pytest.fixture
def half():
    with registered() as name:
        yield name


@pytest.fixture(scope="module")
def half_run(backbone, tmp_path_factory):
    """(result line, run folder) of the toy method fine-tuned on the fixtures' RTE (r = 4 on q_proj, v_proj)."""
    out = tmp_path_factory.mktemp("half")
    cfg = train.FinetuneConfig(task="RTE", method="half", backbone=str(backbone), data_dir=str(FIXTURES),
                               epochs=2, batch_size=4, max_len=32, threads=1, out_dir=str(out / "run"),
                               results_dir=str(out / "results"))
    with registered():
        result = train.finetune(cfg, {"r": 4}, train.SystemConfig(device="cpu", precision="fp32"))
    return result, out / "run"


def test_the_registry_names_the_new_method_everywhere(half):
    assert dynlora.method_names()[-1] == "half"
    assert "half" in report.dynamic_methods() and "half" in report.gated_methods()
    assert planted.PlantedConfig(data_dir=str(FIXTURES)).method_list[-1] == "half"   # the benchmark's default
    assert tune.TuneConfig().methods.split(",")[-1] == "half"                         # and tune's
    config = dynlora.config_for_method("half")
    assert (config.gating, config.allocation, config.gate) == (True, False, "half")


def test_a_registered_method_trains_and_is_counted(half, half_run):
    result, run = half_run
    assert result["method"] == "half" and 0 <= result["last_score"] <= 1
    # Rank 4 on q_proj and v_proj of the nano backbone's 2 blocks (32 wide): 4 adapted layers, each with the
    # 4 rank components of A (4 x 32) and B (32 x 4) the allocator's mask keeps (no allocation: all 4), and
    # the gate's own active_parameter_count(4) = 0 on top.
    assert result["final_active_adapter_params"] == 4 * (4 * 32 + 32 * 4) + 4 * 0
    assert result["active_adapter_params"] == 4 * (4 * 32 + 32 * 4)    # the merged model: gates frozen


def test_a_registered_method_reloads_from_its_adapter_file_as_itself(half, half_run):
    _, run = half_run
    model, _, _ = runs.load_finetuned(run)
    gates = [m.gate for _, m in dynlora.adapter_layers(model)]
    assert len(gates) == 4 and all(type(g) is HalfGate for g in gates)
    assert dynlora.config_of(model).gate == "half"


def test_a_registered_method_has_its_row_in_the_report(half, half_run):
    result, _ = half_run
    lora = dict(result, method="lora", last_score=result["last_score"] - 0.01)
    text = report.render_report([lora, result], data_dir=FIXTURES)
    rows = [line for line in text.splitlines() if line.startswith("| half |")]
    assert len(rows) >= 2, text                    # the score table and the paired differences to LoRA


def test_a_registered_method_is_in_the_known_answer_summary(half):
    lines = [dict(scenario="input", method=m, seed=s, rel_error=e) for s in range(2)
             for m, e in (("lora", 0.5), ("half", 0.6 + 0.01 * s))]
    summary = planted.summary_table(lines)
    assert any(line.startswith("| input | half | 2 |") for line in summary.splitlines()), summary


def test_the_readme_and_docs_show_exactly_these_lines():
    registration = [line.strip() for line in inspect.getsource(registered).splitlines() if "] = " in line]
    assert len(registration) == 2
    for doc in (REPO / "README.md", REPO / "docs" / "extending.md"):
        text = doc.read_text()
        assert inspect.getsource(HalfGate) in text and all(line in text for line in registration), doc.name
