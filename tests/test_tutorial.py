"""tutorial.py: the GLUE slice the notebooks score their fine-tuning runs on."""

import data
import tutorial
from conftest import FIXTURES


def test_glue_slice_keeps_train_and_the_first_dev_examples(tmp_path):
    folder = tutorial.glue_slice(FIXTURES, "SST-2", 3, tmp_path)
    assert (folder / "SST-2" / "train.tsv").read_bytes() == (FIXTURES / "SST-2" / "train.tsv").read_bytes()
    dev, full_dev = data.read_split(folder, "SST-2", "dev"), data.read_split(FIXTURES, "SST-2", "dev")
    assert len(full_dev) > 3
    assert [(e.text_a, e.label) for e in dev] == [(e.text_a, e.label) for e in full_dev[:3]]
    again = tutorial.glue_slice(FIXTURES, "SST-2", 2, tmp_path)          # rewritten, not appended to
    assert len(data.read_split(again, "SST-2", "dev")) == 2


def test_glue_slice_of_zero_is_the_folder_itself(tmp_path):
    assert tutorial.glue_slice(FIXTURES, "SST-2", 0, tmp_path) == FIXTURES
    assert not any(tmp_path.iterdir())


def test_glue_data_runs_tiny_on_the_fixtures_and_keeps_the_scale_on_a_glue_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(FIXTURES))
    assert tutorial.glue_data("small") == (tutorial.FIXTURES, "tiny")        # the fixtures: always the tiny scale
    real = tmp_path / "glue"
    (real / "SST-2").mkdir(parents=True)
    (real / "SST-2" / "train.tsv").write_bytes((FIXTURES / "SST-2" / "train.tsv").read_bytes())
    monkeypatch.setenv("GLUE_DIR", str(real))
    assert tutorial.glue_data("small") == (real, "small")
