"""Tests for data.py: GLUE parsing, download, tokenizer, batching and metrics.

The GLUE files under tests/fixtures/glue are hand-written rows in the official layouts (a few per split).
The real data is only read by test_real_glue_row_counts, which is skipped when it is absent.
"""

import functools
import io
import math
import shutil
import socket
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import data                                               # tests/conftest.py puts the repo on sys.path
import runtime
from data import DataError, Example

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "glue"


def read(task, split):
    return data.read_split(FIXTURES, task, split)


def write_tsv(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(text.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------------------
# Tasks

def test_get_task_accepts_common_spellings():
    assert data.get_task("sst2") is data.GLUE_TASKS["SST-2"]
    assert data.get_task("SST-2") is data.GLUE_TASKS["SST-2"]
    assert data.get_task("sts-b") is data.GLUE_TASKS["STS-B"]
    assert data.get_task("stsb") is data.GLUE_TASKS["STS-B"]
    assert data.get_task("cola") is data.GLUE_TASKS["CoLA"]
    assert data.get_task(data.GLUE_TASKS["MNLI"]) is data.GLUE_TASKS["MNLI"]


def test_unknown_task_lists_valid_names():
    with pytest.raises(DataError, match=r"unknown GLUE task 'sst5'; valid names: CoLA, SST-2, MRPC, STS-B, QQP, MNLI"):
        data.get_task("sst5")


def test_task_specs():
    assert set(data.GLUE_TASKS) == {"CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"}
    stsb, mnli = data.get_task("stsb"), data.get_task("mnli")
    assert stsb.is_regression and stsb.num_outputs == 1
    assert not mnli.is_regression and mnli.num_outputs == 3
    assert list(mnli.dev_files) == ["dev_matched", "dev_mismatched"]
    assert mnli.n_columns == {"train": 12, "dev_matched": 16, "dev_mismatched": 16}
    assert data.get_task("cola").header is False
    assert data.get_task("mrpc").metrics == ("f1", "accuracy")


def test_resolve_data_dir(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", "/from/env")
    assert data.resolve_data_dir("/from/arg") == Path("/from/arg")
    assert data.resolve_data_dir(None) == Path("/from/env")
    monkeypatch.delenv("GLUE_DIR")
    assert data.resolve_data_dir(None) == Path("data/glue")


def test_find_data_dir_takes_the_first_folder_holding_glue_files(tmp_path, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(FIXTURES))
    assert data.find_data_dir() == FIXTURES                                  # 1. $GLUE_DIR
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("GLUE_DIR", str(empty))                               # a folder without GLUE files: passed over
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "glue" / "RTE").mkdir(parents=True)
    shutil.copyfile(FIXTURES / "RTE" / "train.tsv", tmp_path / "data" / "glue" / "RTE" / "train.tsv")
    assert data.find_data_dir() == data.find_data_dir("rte") == Path("data/glue")   # 2. ./data/glue
    assert data.find_data_dir("SST-2") != Path("data/glue")                  # it holds no SST-2: the search goes on


# ---------------------------------------------------------------------------------------------------------
# Reading the nine layouts

FIXTURE_COUNTS = {
    ("CoLA", "train"): 10, ("CoLA", "dev"): 5,
    ("SST-2", "train"): 12, ("SST-2", "dev"): 6,
    ("MRPC", "train"): 10, ("MRPC", "dev"): 4,
    ("STS-B", "train"): 8, ("STS-B", "dev"): 4,
    ("QQP", "train"): 10, ("QQP", "dev"): 4,
    ("MNLI", "train"): 9, ("MNLI", "dev_matched"): 4, ("MNLI", "dev_mismatched"): 3,
    ("QNLI", "train"): 6, ("QNLI", "dev"): 3,
    ("RTE", "train"): 6, ("RTE", "dev"): 3,
    ("WNLI", "train"): 6, ("WNLI", "dev"): 3,
}


@pytest.mark.filterwarnings("ignore:.*malformed rows")
@pytest.mark.parametrize("task, split", list(FIXTURE_COUNTS))
def test_every_fixture_split_parses(task, split):
    spec = data.get_task(task)
    examples = read(task, split)
    assert len(examples) == FIXTURE_COUNTS[task, split]
    single = spec.name in ("CoLA", "SST-2")
    for ex in examples:
        assert ex.text_a and ex.text_a == ex.text_a.strip()
        assert (ex.text_b is None) == single
        if spec.is_regression:
            assert isinstance(ex.label, float) and 0.0 <= ex.label <= 5.0
        else:
            assert isinstance(ex.label, int) and 0 <= ex.label < spec.num_outputs


def test_cola_has_no_header_and_no_final_newline():
    raw = (FIXTURES / "CoLA" / "dev.tsv").read_bytes()
    assert not raw.endswith(b"\n")                         # the fixture keeps the official quirk
    train = read("cola", "train")
    assert train[0] == Example("The children kept the secret for a whole week.", None, 1, 1)
    assert train[1].label == 0 and train[1].line == 2
    assert train[6].text_a == 'John said "hello" to nobody in particular.'   # stray quotes kept
    assert train[9].text_a == "The café on the corner serves crêpes."
    dev = read("cola", "dev")
    assert dev[-1] == Example("Bill talked to Sue about herself.", None, 1, 5)  # the unterminated last row


def test_sst2_strips_trailing_space_and_keeps_quotes():
    train = read("sst2", "train")
    assert train[0] == Example("a warm , funny and thoroughly charming film", None, 1, 2)
    assert train[3] == Example("the film 's \" message \" is muddled at best", None, 0, 5)
    assert read("sst2", "dev")[4].text_a == '" wow " is the only word for it'


def test_mrpc_header_with_byte_order_mark():
    assert (FIXTURES / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality\t")
    train = read("mrpc", "train")
    assert train[0] == Example("The company said profits rose 12 percent in the third quarter .",
                               "Third-quarter profit climbed 12 percent , the company said .", 1, 2)
    assert train[2].text_a == '" We are very pleased with the result , " the minister told reporters .'
    assert train[1].label == 0


def test_stsb_float_scores():
    train = read("stsb", "train")
    assert train[0] == Example("A dog is running through the grass.", "A dog runs across a lawn.", 4.2, 2)
    assert train[4].text_b == '"Jobs data lifts stocks'
    assert train[5].label == pytest.approx(3.11111111111111)
    assert train[6].label == 0.0                           # written as a bare "0"


def test_qqp_skips_malformed_rows_with_a_warning():
    with pytest.warns(UserWarning,
                      match=r"QQP/train.tsv: skipped 2 malformed rows without 6 columns \(first at line 6\)"):
        train = read("qqp", "train")
    assert len(train) == 10
    assert [ex.line for ex in train[3:6]] == [5, 8, 9]     # lines 6 and 7 are the broken row
    assert train[5].text_a == 'What does "fair use" mean in copyright law?'


def test_qqp_header_with_wrong_columns_is_an_error(tmp_path):
    write_tsv(tmp_path / "QQP", "train.tsv", "id\tqid1\tquestion1\n1\t2\t3\t4\t5\t1\n")
    with pytest.raises(DataError, match=r"QQP/train.tsv:1: expected 6 tab-separated columns, got 3"):
        data.read_split(tmp_path, "qqp", "train")


def test_mnli_both_dev_files_and_gold_label():
    train = read("mnli", "train")
    # label order: entailment 0, neutral 1, contradiction 2
    assert [ex.label for ex in train[:3]] == [0, 2, 1]
    assert train[0].text_a == "The agency will publish its findings next spring."
    assert train[0].text_b == "The findings will be made public."
    matched, mismatched = read("mnli", "dev_matched"), read("mnli", "dev_mismatched")
    assert matched[0].text_a == "The letter arrived two days late."
    assert mismatched[0].text_a == "Your gift helped us feed 500 families this winter."
    # label1 of this row is "neutral" but gold_label (the last of 16 columns) is "contradiction"
    assert mismatched[1].label == 2
    with pytest.raises(DataError, match=r"MNLI has no split 'dev'; valid splits: train, dev_matched, dev_mismatched"):
        read("mnli", "dev")


def test_string_labels_of_qnli_rte_and_digit_labels_of_wnli():
    assert [ex.label for ex in read("qnli", "train")[:2]] == [0, 1]   # entailment, not_entailment
    rte = read("rte", "dev")
    assert rte[1] == Example("The team lost the final in extra time.", "The team won the final.", 1, 3)
    wnli = read("wnli", "train")
    assert [ex.label for ex in wnli[:2]] == [1, 0]


def test_windows_line_endings_parse_the_same(tmp_path):
    text = (FIXTURES / "RTE" / "dev.tsv").read_text(encoding="utf-8").replace("\n", "\r\n")
    write_tsv(tmp_path / "RTE", "dev.tsv", text)
    assert data.read_split(tmp_path, "rte", "dev") == read("rte", "dev")


# ---------------------------------------------------------------------------------------------------------
# Bad inputs

def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=r"GLUE data folder .*nowhere does not exist; set --data-dir or \$GLUE_DIR"):
        data.read_split(tmp_path / "nowhere", "sst2", "train")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"SST-2/train.tsv not found; put the official GLUE SST-2 files in"):
        data.read_split(tmp_path, "sst2", "train")


def test_wrong_column_count_names_file_and_line(tmp_path):
    write_tsv(tmp_path / "SST-2", "train.tsv", "sentence\tlabel\na fine film \t1\ntoo\tmany\tcolumns\t0\n")
    with pytest.raises(DataError, match=r"SST-2/train.tsv:3: expected 2 tab-separated columns, got 4"):
        data.read_split(tmp_path, "sst2", "train")


def test_quoted_field_with_tab_is_not_merged(tmp_path):
    # a CSV reader with quoting would join these fields into one; the GLUE format has no quoting
    write_tsv(tmp_path / "CoLA", "train.tsv", 'gj04\t1\t\t"He said\tno" loudly.\n')
    with pytest.raises(DataError, match=r"CoLA/train.tsv:1: expected 4 tab-separated columns, got 5"):
        data.read_split(tmp_path, "cola", "train")


def test_label_outside_the_set_names_file_and_line(tmp_path):
    write_tsv(tmp_path / "RTE", "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA b.\tA.\tentailment\n"
                                            "1\tC d.\tC.\tneutral\n")
    with pytest.raises(DataError,
                       match=r"RTE/dev.tsv:3: label 'neutral' is not one of \['entailment', 'not_entailment'\]"):
        data.read_split(tmp_path, "rte", "dev")


def test_regression_label_must_be_a_number(tmp_path):
    row = "\t".join(["0", "g", "f", "2012", "0000", "none", "none", "A.", "B.", "high"])
    write_tsv(tmp_path / "STS-B", "dev.tsv", "\t".join(["h"] * 10) + "\n" + row + "\n")
    with pytest.raises(DataError, match=r"STS-B/dev.tsv:2: label 'high' is not a number"):
        data.read_split(tmp_path, "stsb", "dev")


@pytest.mark.parametrize("text", ["", "sentence\tlabel\n"])
def test_empty_file(tmp_path, text):
    write_tsv(tmp_path / "SST-2", "dev.tsv", text)
    with pytest.raises(DataError, match=r"SST-2/dev.tsv: the file has no data rows"):
        data.read_split(tmp_path, "sst2", "dev")


def test_not_utf8_names_the_line(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "dev.tsv").write_bytes(b"sentence\tlabel\nfine \t1\ncaf\xe9 \t1\n")
    with pytest.raises(DataError, match=r"SST-2/dev.tsv:3: not valid UTF-8"):
        data.read_split(tmp_path, "sst2", "dev")


STSB_HEADER = "\t".join(["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                         "sentence2", "score"])


@pytest.mark.parametrize("score", ["nan", "inf", "-inf", "NaN", "5.5", "-0.5"])
def test_stsb_score_not_finite_or_outside_0_to_5_names_file_and_line(tmp_path, score):
    rows = [["0", "g", "f", "2012", "0000", "none", "none", "A.", "B.", "3.0"],
            ["1", "g", "f", "2012", "0001", "none", "none", "C.", "D.", score]]
    write_tsv(tmp_path / "STS-B", "dev.tsv", STSB_HEADER + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"STS-B/dev.tsv:3: score {score!r} is not a number from 0 to 5"):
        data.read_split(tmp_path, "stsb", "dev")


@pytest.mark.parametrize("task, split", [("SST-2", "train"), ("STS-B", "dev"), ("RTE", "dev"), ("MRPC", "train"),
                                         ("MNLI", "dev_matched"), ("QQP", "train")])
def test_a_file_without_its_header_row_is_an_error_not_a_lost_example(tmp_path, task, split):
    spec = data.get_task(task)
    name = spec.split_files[split]
    text = (FIXTURES / task / name).read_text(encoding="utf-8-sig")
    write_tsv(tmp_path / task, name, text.split("\n", 1)[1])            # the header row removed
    with pytest.raises(DataError, match=rf"{task}/{name}:1: the first line is a data row, not the header row"):
        data.read_split(tmp_path, task, split)


def test_cr_only_line_endings_are_named(tmp_path):
    text = (FIXTURES / "SST-2" / "dev.tsv").read_text(encoding="utf-8").replace("\n", "\r")
    write_tsv(tmp_path / "SST-2", "dev.tsv", text)
    with pytest.raises(DataError, match=r"SST-2/dev.tsv: the line endings are CR only .*convert"):
        data.read_split(tmp_path, "sst2", "dev")
    write_tsv(tmp_path / "CoLA", "dev.tsv", (FIXTURES / "CoLA" / "dev.tsv").read_text().replace("\n", "\r"))
    with pytest.raises(DataError, match=r"CoLA/dev.tsv: the line endings are CR only"):
        data.read_split(tmp_path, "cola", "dev")


def test_a_folder_where_a_file_should_be_is_named_and_not_downloaded(tmp_path):
    (tmp_path / "SST-2" / "train.tsv").mkdir(parents=True)
    shutil.copy(FIXTURES / "SST-2" / "dev.tsv", tmp_path / "SST-2" / "dev.tsv")
    with pytest.raises(DataError, match=r"SST-2/train.tsv is a folder, not a file") as err:
        data.read_split(tmp_path, "sst2", "train")
    with pytest.raises(DataError, match=r"SST-2/train.tsv is a folder, not a file") as err:
        data.ensure_task(tmp_path, "sst2")                          # no download is tried
    assert "download" not in str(err.value)


def test_a_data_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "glue").write_text("not a folder")
    for call in (lambda: data.read_split(tmp_path / "glue", "sst2", "train"),
                 lambda: data.ensure_task(tmp_path / "glue", "sst2")):
        with pytest.raises(DataError, match=r"glue is a file, not a folder; .*--data-dir") as err:
            call()
        assert "File exists" not in str(err.value)
    (tmp_path / "glue2").mkdir()
    (tmp_path / "glue2" / "SST-2").write_text("not a folder")       # the task folder is a file
    with pytest.raises(DataError, match=r"glue2/SST-2 is a file, not a folder"):
        data.ensure_task(tmp_path / "glue2", "sst2")


# ---------------------------------------------------------------------------------------------------------
# Download, against a local HTTP server

class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(folder served, its base url) from a loopback HTTP server running in a thread."""
    root = tmp_path / "server"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def make_zip(path: Path, files: dict, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, content in files.items():
            zf.writestr(name, content)


def fixture_files(task: str, folder: str) -> dict:
    return {f"{folder}/{p.name}": p.read_bytes() for p in (FIXTURES / task).iterdir()}


def test_download_zip_task(server, tmp_path):
    root, url = server
    make_zip(root / "SST-2.zip", {**fixture_files("SST-2", "SST-2"), "SST-2/test.tsv": b"index\tsentence\n0\tok \n"})
    make_zip(root / "QNLIv2.zip", fixture_files("QNLI", "QNLI"))          # the folder is QNLI/, not QNLIv2/
    data_dir = tmp_path / "glue"
    assert data.ensure_task(data_dir, "sst2", base_url=url) == data_dir / "SST-2"
    assert data.ensure_task(data_dir, "qnli", base_url=url) == data_dir / "QNLI"
    assert sorted(p.name for p in data_dir.iterdir()) == ["QNLI", "SST-2"]   # no temporary leftovers
    assert (data_dir / "SST-2" / "test.tsv").is_file()
    assert data.read_split(data_dir, "sst2", "dev") == read("sst2", "dev")
    assert data.read_split(data_dir, "qnli", "train") == read("qnli", "train")


def test_download_uses_glue_base_url_env(server, tmp_path, monkeypatch):
    root, url = server
    make_zip(root / "RTE.zip", fixture_files("RTE", "RTE"))
    monkeypatch.setenv("GLUE_BASE_URL", url)
    data.download_task("rte", tmp_path / "glue", progress=False)
    assert data.read_split(tmp_path / "glue", "rte", "train") == read("rte", "train")


def test_download_mrpc_from_senteval_files(server, tmp_path):
    root, url = server
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = ["1\t101\t102\tThe deal closed on Friday .\tThe deal was completed Friday .",
            "0\t103\t104\tShares rose 3 percent .\tThe chief executive resigned .",
            "1\t105\t106\t\" Yes , \" she said .\tShe said yes .",
            "0\t107\t108\tThe plant employs 900 people .\tThe plant opened in 1990 .",
            "1\t109\t110\tRain is expected on Monday .\tMonday should be rainy ."]
    (root / "msr_paraphrase_train.txt").write_bytes("\r\n".join([header] + rows).encode() + b"\r\n")
    test_rows = ["1\t201\t202\tA is B .\tB is A .", "0\t203\t204\tC .\tD ."]
    (root / "msr_paraphrase_test.txt").write_bytes("\r\n".join([header] + test_rows).encode() + b"\r\n")
    (root / "mrpc_dev_ids.tsv").write_text("103\t104\n109\t110\n")   # pairs that GLUE puts in dev
    folder = data.ensure_task(tmp_path / "glue", "mrpc", base_url=url)
    out_header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    assert (folder / "train.tsv").read_text() == out_header + "\n".join(rows[i] for i in (0, 2, 3)) + "\n"
    assert (folder / "dev.tsv").read_text() == out_header + "\n".join(rows[i] for i in (1, 4)) + "\n"
    assert (folder / "test.tsv").read_text().splitlines()[1] == "0\t201\t202\tA is B .\tB is A ."
    dev = data.read_split(tmp_path / "glue", "mrpc", "dev")
    assert [(ex.text_a, ex.label) for ex in dev] == [("Shares rose 3 percent .", 0),
                                                     ("Rain is expected on Monday .", 1)]
    assert data.read_split(tmp_path / "glue", "mrpc", "train")[1].text_a == '" Yes , " she said .'


def test_corrupt_zip_leaves_no_task_folder(server, tmp_path):
    root, url = server
    (root / "SST-2.zip").write_bytes(b"PK\x03\x04 this is not really a zip file")
    data_dir = tmp_path / "glue"
    with pytest.raises(DataError, match=r"GLUE task SST-2 not found in .*glue/SST-2 \(missing train.tsv, dev.tsv\) "
                                        r"and download failed \(SST-2.zip is not a valid zip file"):
        data.ensure_task(data_dir, "sst2", base_url=url)
    assert list(data_dir.iterdir()) == []


def test_zip_with_bad_crc_is_rejected(server, tmp_path):
    root, url = server
    buffer = io.BytesIO()
    make_zip(buffer, fixture_files("WNLI", "WNLI"), compression=zipfile.ZIP_STORED)
    raw = bytearray(buffer.getvalue())
    raw[raw.index(b"The piano")] ^= 0x20                    # flip one byte of stored file content
    (root / "WNLI.zip").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"WNLI.zip is corrupt \(bad CRC in WNLI/"):
        data.download_task("wnli", tmp_path / "glue", base_url=url, progress=False)
    assert list((tmp_path / "glue").iterdir()) == []


def test_zip_missing_a_split_is_rejected(server, tmp_path):
    root, url = server
    make_zip(root / "MNLI.zip", {"MNLI/train.tsv": (FIXTURES / "MNLI" / "train.tsv").read_bytes(),
                                 "MNLI/dev_matched.tsv": (FIXTURES / "MNLI" / "dev_matched.tsv").read_bytes()})
    with pytest.raises(DataError, match=r"MNLI.zip lacks MNLI/dev_mismatched.tsv"):
        data.download_task("mnli", tmp_path / "glue", base_url=url, progress=False)
    assert list((tmp_path / "glue").iterdir()) == []


def test_http_error_is_reported(server, tmp_path):
    _, url = server
    with pytest.raises(DataError, match=r"download failed \(http://127.0.0.1:\d+/CoLA.zip: HTTP 404"):
        data.ensure_task(tmp_path / "glue", "cola", base_url=url)


def test_offline_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"GLUE task STS-B not found in .*glue/STS-B \(missing train.tsv, dev.tsv\) and "
                                        r"download failed \(.*\)\. Put the official TSVs there, "
                                        r"set --data-dir or \$GLUE_DIR\."):
        data.ensure_task(tmp_path / "glue", "stsb", base_url=closed_port_url())
    assert not (tmp_path / "glue" / "STS-B").exists()


def test_ensure_task_without_download(tmp_path):
    write_tsv(tmp_path / "MNLI", "train.tsv", "x")
    with pytest.raises(DataError, match=r"GLUE task MNLI not found in .*MNLI "
                                        r"\(missing dev_matched.tsv, dev_mismatched.tsv\)\. Put"):
        data.ensure_task(tmp_path, "mnli", download=False)


def test_ensure_task_with_files_present_does_not_download():
    # the url cannot be reached, so any download attempt would raise
    assert data.ensure_task(FIXTURES, "mnli", base_url=closed_port_url()) == FIXTURES / "MNLI"


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and encoding

@pytest.fixture(scope="module")
def tok():
    texts = data.pretrain_texts(FIXTURES, [t for t in data.GLUE_TASKS if t != "QQP"])
    return data.train_tokenizer(texts, vocab_size=400)


def test_special_token_ids(tok):
    assert [tok.token_to_id(t) for t in (data.PAD, data.SEP, data.CLS, data.EOS)] == [0, 1, 2, 3]
    assert tok.get_vocab_size() <= 400


@pytest.mark.parametrize("text", ["The children kept the secret.", "  two  spaces\tand a tab\n",
                                  "café crêpes naïve — “quoted” 東京 🙂", 'it \'s a " stray quote ',
                                  "a literal <pad> and <cls> stay text"])
def test_tokenizer_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert not set(ids) & {0, 1, 2, 3}                      # special ids never come from text


def test_save_and_load_tokenizer(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    data.save_tokenizer(tok, path)
    loaded = data.load_tokenizer(path)
    text = "a literal <pad> is text"
    assert loaded.encode(text).ids == tok.encode(text).ids
    assert 0 not in loaded.encode(text).ids


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer file .*missing.json not found; train one first"):
        data.load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(DataError, match=r"bad.json: not a valid tokenizer.json .*; delete it and retrain"):
        data.load_tokenizer(tmp_path / "bad.json")


def test_train_tokenizer_rejects_tiny_vocab():
    with pytest.raises(DataError, match=r"vocab_size=100 is too small; a byte-level BPE needs at least 260"):
        data.train_tokenizer(["abc"], vocab_size=100)


def test_truncated_lengths():
    # budget 6: a text shorter than half (3) is kept whole, the other gets the rest
    assert data._truncated_lengths(10, 2, 6) == (4, 2)
    assert data._truncated_lengths(2, 10, 6) == (2, 4)
    # both long: half each, the odd token to b (budget 7 -> 3 + 4)
    assert data._truncated_lengths(10, 10, 7) == (3, 4)
    assert data._truncated_lengths(3, 3, 6) == (3, 3)     # fits: untouched


def test_encode_examples_format(tok):
    def enc(s):
        return tok.encode(s, add_special_tokens=False).ids
    examples = [Example("a quiet triumph", None, 1, 2), Example("Why is the sky blue?", "What makes it blue?", 0, 3)]
    ids, labels = data.encode_examples(tok, examples, max_len=64)
    assert ids[0].tolist() == enc("a quiet triumph") + [data.CLS_ID]
    assert ids[1].tolist() == enc("Why is the sky blue?") + [data.SEP_ID] + enc("What makes it blue?") + [data.CLS_ID]
    assert ids[0].dtype == np.int32
    assert labels.dtype == np.int64 and labels.tolist() == [1, 0]
    _, scores = data.encode_examples(tok, [Example("a", "b", 4.25, 2)], max_len=8)
    assert scores.dtype == np.float32 and scores.tolist() == [4.25]


def test_encode_examples_truncation_keeps_cls_last(tok):
    long_a = "The agency will publish its findings next spring, after a long review of every record."
    examples = [Example(long_a, "Yes.", 0, 2), Example(long_a, None, 1, 3), Example(long_a, long_a, 2, 4)]
    n_yes = len(tok.encode("Yes.", add_special_tokens=False).ids)
    ids, _ = data.encode_examples(tok, examples, max_len=12)
    for seq in ids:
        assert len(seq) == 12 and seq[-1] == data.CLS_ID
    yes = tok.encode("Yes.", add_special_tokens=False).ids
    assert ids[0].tolist()[-2 - n_yes:] == [data.SEP_ID] + yes + [data.CLS_ID]
    assert ids[2].tolist().index(data.SEP_ID) == 5          # budget 10 split 5 / 5


def test_encode_examples_rejects_tiny_max_len(tok):
    with pytest.raises(DataError, match=r"max_len=2 is too small"):
        data.encode_examples(tok, [Example("a", None, 0, 1)], max_len=2)


def test_cached_encode_hits_without_tokenizing(tok, tmp_path, monkeypatch):
    tok_path = tmp_path / "tokenizer.json"
    data.save_tokenizer(tok, tok_path)
    examples = read("rte", "train")
    ids, labels = data.cached_encode(tok, tok_path, "rte", "train", examples, 32, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("RTE-train-*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized on a cache hit")

    monkeypatch.setattr(data, "encode_examples", fail)
    ids2, labels2 = data.cached_encode(tok, tok_path, "rte", "train", examples, 32, tmp_path / "cache")
    assert len(ids2) == len(ids) and all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(ids, ids2))
    assert np.array_equal(labels, labels2) and labels2.dtype == labels.dtype
    with pytest.raises(AssertionError, match="re-tokenized"):  # a different max_len is a different key
        data.cached_encode(tok, tok_path, "rte", "train", examples, 16, tmp_path / "cache")


def test_pretrain_texts_train_only_deduplicated_in_order():
    texts = data.pretrain_texts(FIXTURES, ["wnli", "sst2"])
    piano = "The piano would not fit through the door because it was too wide."
    assert texts[:3] == [piano, "The piano was too wide.", "The door was too wide."]   # sentence1 repeats in WNLI
    assert texts.count(piano) == 1
    assert "a warm , funny and thoroughly charming film" in texts
    assert "The glass fell off the table and it broke." not in texts                 # a WNLI dev sentence
    assert len(texts) == 11 + 12                          # WNLI: 6 rows, 12 texts, 1 repeat; SST-2: 12


def test_lm_stream(tok):
    texts = ["a quiet triumph", "dull"]
    stream = data.lm_stream(tok, texts)
    a, b = (tok.encode(t, add_special_tokens=False).ids for t in texts)
    assert stream.dtype == np.int32
    assert stream.tolist() == a + [data.EOS_ID] + b + [data.EOS_ID]


# ---------------------------------------------------------------------------------------------------------
# Batching

def random_ids(n=500, max_len=60, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 100, size=int(k)).astype(np.int32) for k in rng.integers(1, max_len + 1, size=n)]


def test_bucket_batcher_covers_every_example_once_with_right_padding():
    ids = random_ids()
    labels = np.arange(len(ids))                           # the label of each example is its index
    batcher = data.BucketBatcher(ids, labels, batch_size=16, shuffle=True, seed=1)
    seen = []
    batches = list(batcher.epoch(0))
    assert len(batches) == len(batcher) == 32              # ceil(500 / 16)
    for idx, y in batches:
        assert idx.dtype == torch.int64 and y.dtype == torch.int64
        for row, i in zip(idx.tolist(), y.tolist()):
            n = len(ids[i])
            assert row[:n] == ids[i].tolist() and all(t == 0 for t in row[n:])
        assert (idx[:, -1] != 0).any()                     # the batch is as long as its longest example
        seen += y.tolist()
    assert sorted(seen) == list(range(len(ids)))


def padding_fraction(batches, lengths):
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return 1 - lengths.sum() / padded


def test_bucketing_pads_less_than_random_batches():
    ids = random_ids(n=2000, seed=3)
    lengths = np.array([len(x) for x in ids])
    batcher = data.BucketBatcher(ids, np.arange(len(ids)), batch_size=16, shuffle=True, seed=0)
    bucketed = [y.numpy() for _, y in batcher.epoch(0)]   # labels are example indices
    perm = np.random.default_rng(0).permutation(len(ids))
    random_batches = [perm[i:i + 16] for i in range(0, len(perm), 16)]
    assert padding_fraction(bucketed, lengths) < 0.5 * padding_fraction(random_batches, lengths)


def test_bucket_batcher_deterministic_per_seed_and_epoch():
    ids = random_ids()
    def order(seed, epoch):
        batcher = data.BucketBatcher(ids, np.arange(len(ids)), 16, shuffle=True, seed=seed)
        return [y.tolist() for _, y in batcher.epoch(epoch)]
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def ranks(world_size: int) -> list:
    """The Runtime of each of world_size processes (no process group needed: runtime.share only reads them)."""
    return [runtime.Runtime(torch.device("cpu"), "fp32", rank, world_size) for rank in range(world_size)]


def test_training_batches_are_the_same_for_every_process():
    ids = random_ids(n=330)                                # 21 batches of 16: every process builds all 21
    batchers = [data.BucketBatcher(ids, np.arange(len(ids)), 16, shuffle=True, seed=5) for _ in range(3)]
    epochs = [[y.tolist() for _, y in b.epoch(2)] for b in batchers]
    assert len(epochs[0]) == len(batchers[0]) == 21 and epochs[0] == epochs[1] == epochs[2]


def test_eval_batches_are_sorted_and_shared_completely_over_ranks():
    ids = random_ids(n=100)
    lengths = np.array([len(x) for x in ids])
    batcher = data.BucketBatcher(ids, np.arange(100), 16, shuffle=False)
    seen, counts = [], []
    for rt in ranks(3):
        batches = [y.numpy() for _, y in runtime.share(batcher.epoch(0), rt)]
        counts.append(len(batches))
        seen += [i for b in batches for i in b]
    assert counts == [3, 2, 2]                             # 7 batches over 3 ranks
    assert len(seen) == 100 and set(seen) == set(range(100))
    flat = np.concatenate([y.numpy() for _, y in batcher.epoch(0)])
    assert np.all(np.diff(lengths[flat]) >= 0)             # sorted by length


def test_bucket_batcher_regression_labels_and_errors():
    ids = random_ids(n=10)
    _, y = next(data.BucketBatcher(ids, np.linspace(0, 5, 10), 4, shuffle=False).epoch(0))
    assert y.dtype == torch.float32
    with pytest.raises(DataError, match=r"BucketBatcher got 10 id sequences but 9 labels"):
        data.BucketBatcher(ids, np.zeros(9), 4, shuffle=True)


def test_lm_batcher_windows():
    stream = np.arange(1000, dtype=np.int32)               # token value = its position
    batcher = data.LMBatcher(stream, block_size=8, batch_size=4, seed=0)
    assert len(batcher) == (1000 // 8 - 1) // 4            # 124 windows -> 31 batches
    starts = []
    batches = list(batcher.epoch(0))
    assert len(batches) == len(batcher)
    for x, y in batches:
        assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)                       # next-token targets
        assert torch.equal(x, x[:, :1] + torch.arange(8))  # contiguous windows
        starts += x[:, 0].tolist()
    starts = np.sort(starts)
    assert np.all(np.diff(starts) % 8 == 0) and np.all(np.diff(starts) > 0)   # same offset, no overlap
    again = [x.tolist() for x, _ in batcher.epoch(0)]
    assert again == [x.tolist() for x, _ in batches]
    assert again != [x.tolist() for x, _ in batcher.epoch(1)]


def test_lm_batches_shared_over_ranks_and_short_stream():
    stream = np.arange(1000, dtype=np.int32)
    batcher = data.LMBatcher(stream, 8, 4, seed=1)         # 31 batches of 4 windows
    shards = [{tuple(r) for x, _ in runtime.share(batcher.epoch(0), rt) for r in x.tolist()} for rt in ranks(2)]
    assert len(shards[0]) == 16 * 4 and len(shards[1]) == 15 * 4 and not shards[0] & shards[1]
    with pytest.raises(DataError, match=r"a stream of 20 tokens is too short for one batch of 4 x 8 tokens"):
        data.LMBatcher(np.arange(20), block_size=8, batch_size=4)


# ---------------------------------------------------------------------------------------------------------
# Metrics, against values worked out by hand

def test_accuracy():
    assert data.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5        # 2 of 4 agree


def test_f1():
    # preds  1 1 0 1 0 0
    # labels 1 0 0 1 1 0  -> TP = 2 (positions 0, 3), FP = 1 (1), FN = 1 (4)
    # F1 = 2 TP / (2 TP + FP + FN) = 4 / 6
    assert data.f1([1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0]) == pytest.approx(2 / 3)
    assert data.f1([0, 0], [0, 0]) == 0.0                  # no positives anywhere: undefined -> 0


def test_matthews_corrcoef_binary():
    # TP = 3, TN = 2, FP = 1, FN = 1
    preds = [1, 1, 1, 0, 0, 1, 0]
    labels = [1, 1, 1, 0, 0, 0, 1]
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 1) / sqrt(4 * 4 * 3 * 3) = 5 / 12
    assert data.matthews_corrcoef(preds, labels) == pytest.approx(5 / 12)
    assert data.matthews_corrcoef([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert data.matthews_corrcoef([0, 1, 0], [1, 0, 1]) == pytest.approx(-1.0)
    assert data.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0   # constant predictions: undefined -> 0


def test_matthews_corrcoef_three_classes():
    # confusion (rows label, columns pred): [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # t = label counts (2, 2, 2), p = pred counts (2, 3, 1), correct c = 4, n = 6
    # cov(t,p) = c n - t.p = 24 - 12 = 12; cov(p,p) = n^2 - p.p = 36 - 14 = 22; cov(t,t) = 36 - 12 = 24
    # MCC = 12 / sqrt(22 * 24)
    mcc = data.matthews_corrcoef([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2])
    assert mcc == pytest.approx(12 / math.sqrt(22 * 24))


def test_pearson():
    # x - mean = (-1.5, -0.5, 0.5, 1.5), y - mean = (-3, -1, 0, 4)
    # sum of products 4.5 + 0.5 + 0 + 6 = 11; sums of squares 5 and 26 -> r = 11 / sqrt(130)
    assert data.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert data.pearson([2, 2, 2], [1, 2, 3]) == 0.0       # constant input: undefined -> 0


def test_spearman_with_ties():
    # ranks of x = (1, 2, 2, 3): (1, 2.5, 2.5, 4); ranks of y = (10, 20, 30, 20): (1, 2.5, 4, 2.5)
    # centered: (-1.5, 0, 0, 1.5) and (-1.5, 0, 1.5, 0) -> 2.25 / sqrt(4.5 * 4.5) = 0.5
    assert data.spearman([1, 2, 2, 3], [10, 20, 30, 20]) == pytest.approx(0.5)
    assert data._average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_predictions_that_are_not_finite_are_an_error():
    with pytest.raises(data.DataError, match=r"2 of 3 predictions are not finite"):
        data.compute_metrics("stsb", np.array([np.nan, 1.0, np.inf]), np.array([1.0, 2.0, 3.0]))
    with pytest.raises(data.DataError, match=r"1 of 2 predictions are not finite"):
        data.spearman([np.nan, 1.0], [1.0, 2.0])
    with pytest.raises(data.DataError, match=r"1 of 2 labels are not finite"):
        data.pearson([0.0, 1.0], [np.inf, 2.0])


def test_pearson_of_huge_values_does_not_overflow():
    x = np.array([1e200, 2e200, 4e200])
    assert data.pearson(x, [1.0, 2.0, 4.0]) == pytest.approx(1.0)
    big = np.array([3e38, -3e38, 1e38], dtype=np.float32)
    assert data.pearson(big, big.astype(np.float64) * -1) == pytest.approx(-1.0)
    assert data.spearman(x, [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_metric_length_mismatch():
    with pytest.raises(DataError, match=r"got 3 and 2"):
        data.accuracy([1, 0, 1], [1, 0])


def test_compute_metrics_and_task_score():
    m = data.compute_metrics("mrpc", [1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0])
    assert m == {"f1": pytest.approx(2 / 3), "accuracy": pytest.approx(4 / 6)}
    assert data.task_score("mrpc", {**m, "loss": 0.3}) == pytest.approx((2 / 3 + 4 / 6) / 2)   # extra keys ignored
    s = data.compute_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0])
    assert s["pearson"] == pytest.approx(11 / math.sqrt(130)) and s["spearman"] == pytest.approx(1.0)
    assert data.task_score("stsb", s) == pytest.approx((11 / math.sqrt(130) + 1.0) / 2)
    # CoLA: TP = TN = FP = 1, FN = 0 -> (1 * 1 - 1 * 0) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 1 / sqrt(2 * 1 * 2 * 1)
    assert data.compute_metrics("cola", [1, 0, 1], [1, 0, 0]) == {"mcc": pytest.approx(0.5)}
    assert data.task_score("cola", {"mcc": 0.5}) == 0.5


def test_task_score_missing_metric():
    with pytest.raises(DataError, match=r"task_score\(QQP\) needs metrics \['f1', 'accuracy'\], missing \['f1'\]"):
        data.task_score("qqp", {"accuracy": 0.8})


def test_glue_average():
    assert data.glue_average({"CoLA": 0.5, "sst2": 0.9, "RTE": 0.7}) == pytest.approx(0.7)
    with pytest.raises(DataError, match="got a task twice"):
        data.glue_average({"SST-2": 0.9, "sst2": 0.8})
    with pytest.raises(DataError, match="unknown GLUE task 'glue'"):
        data.glue_average({"glue": 0.9})
    with pytest.raises(DataError, match="no task scores"):
        data.glue_average({})


# ---------------------------------------------------------------------------------------------------------
# The real GLUE files, where present (row counts from /work/shared/glue/README.md)

REAL_GLUE = next((p for p in (Path("/work/shared/glue"), REPO.parent / "shared" / "glue") if p.is_dir()), None)
REAL_COUNTS = {
    ("CoLA", "train"): 8551, ("CoLA", "dev"): 1043,
    ("SST-2", "train"): 67349, ("SST-2", "dev"): 872,
    ("MRPC", "train"): 3668, ("MRPC", "dev"): 408,
    ("STS-B", "train"): 5749, ("STS-B", "dev"): 1500,
    ("QNLI", "dev"): 5463,
    ("RTE", "train"): 2490, ("RTE", "dev"): 277,
    ("WNLI", "train"): 635, ("WNLI", "dev"): 71,
}


@pytest.mark.skipif(REAL_GLUE is None, reason="real GLUE data not present")
@pytest.mark.parametrize("task, split", list(REAL_COUNTS))
def test_real_glue_row_counts(task, split):
    path = REAL_GLUE / task / data.get_task(task).split_files[split]
    if not path.is_file():
        pytest.skip(f"{path} not present")
    examples = data.read_split(REAL_GLUE, task, split)
    assert len(examples) == REAL_COUNTS[task, split]
    assert all(ex.text_a for ex in examples)
