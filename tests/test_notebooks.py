"""The tutorial notebooks run top to bottom.

Each notebook is read into memory and executed by nbclient in a fresh kernel of this Python (the kernel's
working folder is notebooks/, as when a reader opens it there); the executed copy is discarded, so nothing is
written back into the repository. Any error in any cell fails the test, naming the cell. The exercises'
solutions, folded in Markdown <details> blocks, run too, each where its Markdown cell stands
(tutorial.with_solutions).

The notebooks find GLUE through $GLUE_DIR, ../shared/glue beside the repository or ./data/glue; these tests
point $GLUE_DIR at the test fixtures, on which every notebook runs at its "tiny" scale (tutorial.glue_data), so
that they need no GLUE download and take the same time on every machine. (The committed outputs come from
runs on the real GLUE files at the "small" scale.) They keep their files in the system's temporary folder,
which for these tests is a folder of this session: notebook 1 pretrains its backbone there once and the later
notebooks reuse it.
"""

import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

import tutorial
from conftest import FIXTURES

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory):
    """One temporary folder for all notebook kernels of the session (the cached backbone lives there)."""
    return tmp_path_factory.mktemp("notebooks")


def test_the_tutorial_is_seven_numbered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"], [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, shared_tmp, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(shared_tmp))            # the kernel inherits it: tempfile uses this folder
    monkeypatch.setenv("GLUE_DIR", str(FIXTURES))            # and this: the tiny scale (see the docstring)
    nb = tutorial.with_solutions(nbformat.read(path, as_version=4))   # the folded solutions' code runs too
    # First, make sure the kernel is this Python (the venv with the repository's requirements).
    nb.cells.insert(0, new_code_cell(f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.prefix"))
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    before = sorted(NOTEBOOK_DIR.rglob("*"))
    client.execute()                                           # raises CellExecutionError on the first error
    assert sorted(NOTEBOOK_DIR.rglob("*")) == before, "a notebook wrote files into its working folder"
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors, errors


def test_solutions_are_folded_and_run_where_they_stand(tmp_path):
    """A solution's code runs after its Markdown cell (it sees the state there), and execute(write=True) stores
    what it printed inside its <details> block, replacing what an earlier run printed, and numbers the cells
    that stay 1..n."""
    md = ("## Solutions\n\n<details><summary>Solution 1</summary>\n\nWhy.\n\n```python\nprint(x * 2)\n```\n\n"
          "It printed:\n\n```text\nstale\n```\n\n</details>")
    nb = nbformat.v4.new_notebook(cells=[new_code_cell("x = 21"), nbformat.v4.new_markdown_cell(md),
                                         new_code_cell("x = 0")])
    assert tutorial.solutions(md) == ["print(x * 2)\n"]
    assert tutorial.solutions(md.replace("<details>", "").replace("</details>", "")) == []   # only folded code
    assert [c.source for c in tutorial.with_solutions(nb).cells] == ["x = 21", md, "print(x * 2)", "x = 0"]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    tutorial.execute(path, write=True, timeout=60)
    again = nbformat.read(path, as_version=4)
    assert [c.cell_type for c in again.cells] == ["code", "markdown", "code"]   # no solution cell left behind
    assert again.cells[1].source == md.replace("stale", "42")
    assert [c.execution_count for c in again.cells if c.cell_type == "code"] == [1, 2]   # the solution ran as 2
    tutorial.execute(path, write=True, timeout=60)                             # idempotent
    assert nbformat.read(path, as_version=4).cells[1].source == md.replace("stale", "42")


def test_a_progress_bar_is_stored_as_displayed(tmp_path):
    """execute(write=True) stores a cell's consecutive stream outputs as one, each line as it is displayed after
    its carriage returns: a progress bar's last state, not every update."""
    bar = ("import sys\nfor i in range(3):\n    sys.stderr.write(f'\\rbar {i}'); sys.stderr.flush()\n"
           "sys.stderr.write('\\r      \\r'); sys.stderr.flush()\n_ = sys.stderr.write('\\rbar 3\\ndone\\n')")
    path = tmp_path / "bar.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[new_code_cell(bar)]), path)
    tutorial.execute(path, write=True, timeout=60)
    outputs = nbformat.read(path, as_version=4).cells[0].outputs
    assert [(o.output_type, o.name, o.text) for o in outputs] == [("stream", "stderr", "bar 3\ndone\n")]
    # a solution's printed text under its code, the same way
    md = "Try it.\n\n<details>\n\n```python\n" + bar + "\n```\n\n</details>\n"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(md)]), path)
    tutorial.execute(path, write=True, timeout=60)
    assert "It printed:\n\n```text\nbar 3\ndone\n```" in nbformat.read(path, as_version=4).cells[0].source


def test_no_code_cell_is_hidden():
    """Solutions fold in Markdown: a code cell's source_hidden flag shows it in full on GitHub."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        hidden = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
                  and c.metadata.get("jupyter", {}).get("source_hidden")]
        assert not hidden, f"{path.name}: code cells {hidden} are hidden; fold a solution in a <details> block"
        text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        assert text.count("<details>") == text.count("</details>"), f"{path.name}: a <details> block is not closed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_stated_runtime_is_the_recorded_one(path):
    """The committed outputs are one recorded run, top to bottom; the notebook's **Runtime:** line and its entry
    in docs/tutorial.md state how long that run's code cells took (tutorial.recorded_minutes), to within 15% or
    half a minute; the README's bound holds for every notebook."""
    nb = nbformat.read(path, as_version=4)
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: not one run top to bottom: {counts}"
    recorded, stated = tutorial.recorded_minutes(nb), tutorial.stated_minutes(nb)
    assert abs(stated - recorded) <= max(0.5, 0.15 * recorded), f"{path.name}: states {stated}, took {recorded:.2f}"
    guide = (NOTEBOOK_DIR.parent / "docs" / "tutorial.md").read_text()
    entry = re.search(rf"\[`{path.name}`\].*?(?=\n\d\. \[|\n\n)", guide, re.S).group(0)
    assert re.search(r"About ([0-9.]+) minutes", entry).group(1) == f"{stated:g}", f"{path.name} in docs/tutorial.md"
    readme = (NOTEBOOK_DIR.parent / "README.md").read_text()
    bound = float(re.search(r"in under (\d+) minutes in its recorded run", readme).group(1))
    assert recorded < bound, f"{path.name} took {recorded:.1f} minutes, the README says under {bound:g}"
