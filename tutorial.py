"""
tutorial.py -- what the notebooks in notebooks/ share: where the GLUE data is, a scratch folder, a backbone.

Each notebook's first cell finds the repository (so that its .py files can be imported), then:

    import tutorial
    DATA, SCALE = tutorial.glue_data(SCALE)          # real GLUE if found, else the tiny test fixtures
    WORK = tutorial.scratch("nb2")                  # this notebook's files, outside the repository
    BACKBONE = tutorial.backbone(SCALE, DATA, WORK)  # runs/backbone if `python train.py` made it, else a small one

What this file holds, in order:
  1. glue_data -- $GLUE_DIR, else ../shared/glue beside the repository, else ./data/glue, else the fixtures.
  2. scratch   -- a temporary folder removed when the kernel stops.
  3. backbone  -- the backbone a notebook fine-tunes: a copy of runs/backbone, or notebook 1's small recipe
                  pretrained once into the system's temporary folder and reused by every notebook.
"""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

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


def glue_data(scale: str) -> tuple[Path, str]:
    """(the GLUE folder, the scale to run at): "tiny" when only the test fixtures are there, and says so."""
    candidates = (os.environ.get("GLUE_DIR"), runs.REPO.parent / "shared" / "glue", runs.REPO / "data" / "glue")
    found = [Path(c) for c in candidates if c and (Path(c) / "SST-2" / "train.tsv").is_file()]
    if found:
        return found[0], scale
    print("note: no GLUE data ($GLUE_DIR, ../shared/glue, ./data/glue), so this runs on the tiny test fixtures "
          "and its numbers mean nothing; set GLUE_DIR to a GLUE folder for real results")
    return FIXTURES, "tiny"


def scratch(name: str) -> Path:
    """A new temporary folder for one notebook's files, removed when the kernel stops."""
    folder = tempfile.TemporaryDirectory(prefix=f"dynlora-{name}-")
    _SCRATCH.append(folder)
    return Path(folder.name)


def backbone(scale: str, data_dir: Path, work: Path) -> Path:
    """A backbone folder for a notebook: runs/backbone (copied into `work`, so the notebook never writes into
    the repository) when `python train.py` has made it and the scale is not tiny; else notebook 1's recipe
    for this scale, pretrained once and cached in <tmp>/dynlora-tutorial/backbone-<hash of the recipe>."""
    made = runs.REPO / "runs" / "backbone"
    if scale != "tiny" and (made / runs.BACKBONE_FILE).is_file():
        folder = work / "backbone"
        folder.mkdir(exist_ok=True)
        for name in (runs.BACKBONE_FILE, runs.TOKENIZER_FILE):
            shutil.copy(made / name, folder / name)
        return folder
    cfg = train.PretrainConfig(data_dir=str(data_dir), **PRETRAIN[scale])
    folder = Path(tempfile.gettempdir()) / "dynlora-tutorial" / ("backbone-" + hashlib.sha256(repr(cfg).encode()).hexdigest()[:12])
    cfg.out_dir = str(folder)
    if not (folder / runs.BACKBONE_FILE).is_file():
        train.pretrain(cfg)
    return folder
