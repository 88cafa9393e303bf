"""
data.py -- GLUE data, from the official TSV files to padded batches and metric scores.

What this file holds, in order:
  1. Tasks        -- TaskSpec: where each of the nine GLUE tasks keeps its files, which columns hold the
                     texts and the label, the label set and the metrics. GLUE_TASKS, get_task.
  2. Reading TSVs -- resolve_data_dir (the folder a command reads) and find_data_dir (the one search for an
                     existing GLUE folder); read_split turns one official file into a list of Examples, with
                     one-line errors naming file:line. pretrain_texts collects the unlabeled train text for LM
                     pretraining. validation_split holds out part of a train split (--val-fraction).
  3. Download     -- ensure_task / download_task fetch the official zips (and build MRPC from SentEval's
                     files) when a task folder is missing.
  4. Tokenizer    -- a byte-level BPE trained on our own text, the classification input format
                     `text_a [<sep> text_b] <cls>`, an on-disk cache, and the token stream for pretraining.
  5. Batching     -- BucketBatcher (length-bucketed, right-padded classification batches) and LMBatcher
                     (next-token windows), both deterministic per (seed, epoch): every process
                     builds the same batches, and runtime.py shares out the work.
  6. Metrics      -- accuracy, F1, Matthews correlation, Pearson, Spearman with the GLUE definitions, the
                     per-task and average GLUE scores, and the majority-class baseline of a task.

Typical use:
    task = get_task("sst2")
    ensure_task(data_dir, task)                              # downloads if the files are missing
    train = read_split(data_dir, task, "train")
    tok = train_tokenizer(pretrain_texts(data_dir, [task]), vocab_size=8192)
    ids, labels = encode_examples(tok, train, max_len=128)
    for idx, y in BucketBatcher(ids, labels, batch_size=32, shuffle=True).epoch(0): ...

Every problem with the data raises DataError (a ValueError) with a single line saying what is wrong, where
(file:line or argument), and how to fix it.
"""

import hashlib
import math
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm


class DataError(ValueError):
    """A problem with the data or with an argument, explained in one line."""


# ---------------------------------------------------------------------------------------------------------
# 1. Tasks
#
# Columns are given by index because CoLA has no header row. Negative indices count from the end (MNLI's
# gold_label is the last column in train, 12 columns, and in dev, 16 columns).

@dataclass(frozen=True)
class TaskSpec:
    name: str               # canonical name, also the folder name: "SST-2"
    train_file: str         # "train.tsv"
    dev_files: dict         # dev split name -> file name; MNLI has two dev splits
    header: bool            # False only for CoLA
    n_columns: dict         # split name ("train" and each dev split) -> exact number of tab-separated columns
    text_columns: tuple     # column index of text_a, and of text_b for sentence-pair tasks
    label_column: int       # column index of the label
    labels: tuple | None    # label strings in class-index order; None means regression (STS-B)
    metrics: tuple          # metric names, see compute_metrics
    zip_name: str | None    # file on the GLUE mirror; None for MRPC, which is built from SentEval's files
    skip_malformed: bool = False   # QQP only: rows with the wrong column count are skipped with a warning
    score_range: tuple = (0.0, 5.0)   # regression only: the allowed scores (STS-B's similarity, 0 to 5)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_outputs(self) -> int:
        return 1 if self.is_regression else len(self.labels)

    @property
    def split_files(self) -> dict:
        """Every split with its file name: {"train": "train.tsv", "dev": "dev.tsv"}."""
        return {"train": self.train_file, **self.dev_files}


def _spec(name, *, n_columns, text_columns, label_column, labels, metrics, zip_name, header=True,
          dev_files=None, skip_malformed=False) -> TaskSpec:
    """A TaskSpec with the usual defaults: train.tsv, one dev split in dev.tsv, a header row."""
    dev_files = dev_files or {"dev": "dev.tsv"}
    if isinstance(n_columns, int):
        n_columns = {split: n_columns for split in ["train", *dev_files]}
    return TaskSpec(name, "train.tsv", dev_files, header, n_columns, text_columns, label_column, labels,
                    metrics, zip_name, skip_malformed)


BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")
NLI3 = ("entailment", "neutral", "contradiction")

GLUE_TASKS = {
    # no header; columns: source, label, original annotation, sentence
    "CoLA": _spec("CoLA", n_columns=4, text_columns=(3,), label_column=1, labels=BINARY, metrics=("mcc",),
                  zip_name="CoLA.zip", header=False),
    # sentence, label
    "SST-2": _spec("SST-2", n_columns=2, text_columns=(0,), label_column=1, labels=BINARY,
                   metrics=("accuracy",), zip_name="SST-2.zip"),
    # Quality, #1 ID, #2 ID, #1 String, #2 String
    "MRPC": _spec("MRPC", n_columns=5, text_columns=(3, 4), label_column=0, labels=BINARY,
                  metrics=("f1", "accuracy"), zip_name=None),
    # index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score
    "STS-B": _spec("STS-B", n_columns=10, text_columns=(7, 8), label_column=9, labels=None,
                   metrics=("pearson", "spearman"), zip_name="STS-B.zip"),
    # id, qid1, qid2, question1, question2, is_duplicate
    "QQP": _spec("QQP", n_columns=6, text_columns=(3, 4), label_column=5, labels=BINARY,
                 metrics=("f1", "accuracy"), zip_name="QQP-clean.zip", skip_malformed=True),
    # train: index, promptID, pairID, genre, 4 parse columns, sentence1, sentence2, label1, gold_label;
    # dev: the same with label1..label5 before gold_label
    "MNLI": _spec("MNLI", n_columns={"train": 12, "dev_matched": 16, "dev_mismatched": 16}, text_columns=(8, 9),
                  label_column=-1, labels=NLI3, metrics=("accuracy",), zip_name="MNLI.zip",
                  dev_files={"dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"}),
    # index, question, sentence, label
    "QNLI": _spec("QNLI", n_columns=4, text_columns=(1, 2), label_column=3, labels=NLI2,
                  metrics=("accuracy",), zip_name="QNLIv2.zip"),
    # index, sentence1, sentence2, label
    "RTE": _spec("RTE", n_columns=4, text_columns=(1, 2), label_column=3, labels=NLI2,
                 metrics=("accuracy",), zip_name="RTE.zip"),
    # index, sentence1, sentence2, label
    "WNLI": _spec("WNLI", n_columns=4, text_columns=(1, 2), label_column=3, labels=BINARY,
                  metrics=("accuracy",), zip_name="WNLI.zip"),
}


def _simple_name(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def get_task(name) -> TaskSpec:
    """The TaskSpec for a name in any common spelling ("SST-2", "sst2", "stsb"); a TaskSpec is returned as is."""
    if isinstance(name, TaskSpec):
        return name
    for spec in GLUE_TASKS.values():
        if _simple_name(spec.name) == _simple_name(str(name)):
            return spec
    raise DataError(f"unknown GLUE task {name!r}; valid names: {', '.join(GLUE_TASKS)}")


# ---------------------------------------------------------------------------------------------------------
# 2. Reading TSVs
#
# The official files are read as raw text split on newlines and tabs, with no quote handling: texts contain
# stray `"` characters that a CSV reader would treat as the start of a quoted field. The file is split on
# "\n" only (str.splitlines would also split on characters such as U+2028 that can occur inside a text).
# Texts and labels are stripped of surrounding whitespace: SST-2 sentences end with a space, and a file
# saved with Windows line endings leaves a "\r" on the last column. A row with the wrong number of columns
# is an error, except in QQP, whose official train file has a few broken rows (a question split over two
# lines): those are skipped with one warning, as most GLUE readers do. So are, naming file:line, a first line
# that is a data row where the header row belongs (it would be dropped as the header), an STS-B score that
# is not a finite number from 0 to 5, and old-Mac CR-only line endings (the file would read as one line).

@dataclass
class Example:
    text_a: str
    text_b: str | None      # None for single-sentence tasks (CoLA, SST-2)
    label: int | float      # class index, or the similarity score for STS-B
    line: int               # 1-based line number in the file, for error messages


def resolve_data_dir(arg: str | None) -> Path:
    """The GLUE folder a command reads (and ensure_task downloads into): the argument if given, else $GLUE_DIR,
    else ./data/glue. It need not exist yet; to look for one that does, see find_data_dir."""
    return Path(arg or os.environ.get("GLUE_DIR") or "data/glue").expanduser()


def find_data_dir(task=None) -> Path | None:
    """The one lookup of an existing GLUE folder, for what only reads one if it is there (the report's
    majority-class rows, the benchmark, the notebooks). The search order, first match wins:
      1. $GLUE_DIR;
      2. ./data/glue (the commands' default, where ensure_task downloads);
      3. data/glue in the repository (the same folder, seen from another working folder such as notebooks/);
      4. ../shared/glue beside the repository (where a shared machine keeps one copy).
    A folder matches when it holds the train file of `task` (default: of any GLUE task), so an empty folder
    left by a failed download is passed over. None when nothing matches."""
    tasks = [get_task(task)] if task else list(GLUE_TASKS.values())
    repo = Path(__file__).resolve().parent
    for folder in (os.environ.get("GLUE_DIR"), "data/glue", repo / "data" / "glue", repo.parent / "shared" / "glue"):
        if folder and any((Path(folder).expanduser() / t.name / t.split_files["train"]).is_file() for t in tasks):
            return Path(folder).expanduser()
    return None


def read_split(data_dir, task, split: str) -> list[Example]:
    """Parse one split ("train" or a key of task.dev_files) of a task from its official TSV file."""
    task = get_task(task)
    if split not in task.split_files:
        raise DataError(f"{task.name} has no split {split!r}; valid splits: {', '.join(task.split_files)}")
    data_dir = Path(data_dir)
    _check_folder(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"GLUE data folder {data_dir} does not exist; set --data-dir or $GLUE_DIR "
                        f"(or let ensure_task download the task)")
    path = data_dir / task.name / task.split_files[split]
    _check_folder(path.parent)
    _check_file(path)
    if not path.is_file():
        raise DataError(f"{path} not found; put the official GLUE {task.name} files in {path.parent} "
                        f"(or let ensure_task download them)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")                     # "-sig" drops MRPC's byte-order mark
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8; replace the file with the official GLUE one") from None
    if "\n" not in text and "\r" in text.rstrip("\r"):  # old Mac files end their lines with a bare CR
        raise DataError(f"{path}: the line endings are CR only (an old Mac format), so the file reads as one "
                        f"line; convert them to LF (e.g. `tr '\\r' '\\n' < {path.name} > fixed.tsv`) or use "
                        f"the official GLUE file")

    lines = text.split("\n")
    if lines[-1] == "":                                    # the usual final newline (CoLA dev has none)
        lines.pop()
    first_row = 2 if task.header else 1
    if len(lines) < first_row:
        raise DataError(f"{path}: the file has no data rows; replace it with the official GLUE file")

    n_columns = task.n_columns[split]
    label_index = {label: i for i, label in enumerate(task.labels or ())}
    examples, skipped = [], []
    for line_no, line in enumerate(lines, start=1):
        columns = line.split("\t")
        if len(columns) != n_columns:
            if task.skip_malformed and line_no >= first_row:
                skipped.append(line_no)
                continue
            raise DataError(f"{path}:{line_no}: expected {n_columns} tab-separated columns, got {len(columns)}; "
                            f"the file must be the official GLUE {task.name} {path.name} (tabs, no quoting)")
        raw_label = columns[task.label_column].strip()
        if line_no < first_row:
            _check_header(path, task, raw_label, label_index)
            continue
        if task.is_regression:
            label = _score(path, line_no, task, raw_label)
        elif raw_label in label_index:
            label = label_index[raw_label]
        else:
            raise DataError(f"{path}:{line_no}: label {raw_label!r} is not one of {list(task.labels)}; "
                            f"fix the row or replace the file with the official GLUE one")
        texts = [columns[i].strip() for i in task.text_columns]
        examples.append(Example(texts[0], texts[1] if len(texts) == 2 else None, label, line_no))

    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} malformed rows without {n_columns} columns "
                      f"(first at line {skipped[0]})", stacklevel=2)
    if not examples:
        raise DataError(f"{path}: the file has no usable data rows; replace it with the official GLUE file")
    return examples


def _check_folder(folder: Path):
    """A folder of the data path that exists but is a file: say so (rather than "missing", or a download
    that fails to create it)."""
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder; --data-dir (or $GLUE_DIR) must be the GLUE folder, "
                        f"holding one folder per task (SST-2/, RTE/, ...)")


def _check_file(path: Path):
    if path.exists() and not path.is_file():
        raise DataError(f"{path} is a folder, not a file; put the official GLUE {path.name} there in its place")


def _check_header(path: Path, task: TaskSpec, cell: str, label_index: dict):
    """The first line of a file with a header row must not be a data row: reading it as the header would
    silently drop the file's first example. Its label cell ("label", "score", "gold_label", ...) tells."""
    is_data = cell in label_index if not task.is_regression else _is_number(cell)
    if is_data:
        raise DataError(f"{path}:1: the first line is a data row, not the header row that {task.name} files "
                        f"start with (its label column holds {cell!r}); add the header line of the official "
                        f"GLUE file, or use that file")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _score(path: Path, line_no: int, task: TaskSpec, raw_label: str) -> float:
    """A regression label: a finite number within the task's score range."""
    low, high = task.score_range
    try:
        label = float(raw_label)
    except ValueError:
        raise DataError(f"{path}:{line_no}: label {raw_label!r} is not a number; "
                        f"{task.name} needs a similarity score in its last column") from None
    if not (math.isfinite(label) and low <= label <= high):
        raise DataError(f"{path}:{line_no}: score {raw_label!r} is not a number from {low:g} to {high:g}; "
                        f"fix the row or replace the file with the official GLUE one")
    return label


def pretrain_texts(data_dir, tasks) -> list[str]:
    """Unlabeled text of the given tasks' TRAIN splits (never dev): every text_a and text_b, deduplicated,
    in first-seen order. This is the corpus for tokenizer training and causal-LM pretraining."""
    texts = {}
    for task in tasks:
        for ex in read_split(data_dir, task, "train"):
            texts[ex.text_a] = None
            if ex.text_b is not None:
                texts[ex.text_b] = None
    return list(texts)


VALIDATION = "validation"    # the split name of the training examples held out by --val-fraction (tune.py)
SPLIT_SEED = 0               # the only seed the validation split depends on


def validation_split(n: int, fraction: float, batch_size: int, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) of a train split of n examples with `fraction` held out; both
    sorted, so the training examples keep their file order. The order is drawn from SPLIT_SEED alone, so every
    run of a task holds out the same examples whatever its seed, method or setting (tune.py's protocol).
    ValueError naming --val-fraction when either side would hold less than one batch."""
    n_val = int(round(fraction * n))
    if n < 2 * batch_size:
        raise ValueError(f"--val-fraction {fraction:g}: {task}'s training split has {n} examples, too few to hold "
                         f"out a validation set of one batch (--batch-size {batch_size}) and train on another; "
                         f"lower --batch-size or leave {task} out")
    if n_val < batch_size:
        raise ValueError(f"--val-fraction {fraction:g} holds out {n_val} of {task}'s {n} training examples, fewer "
                         f"than one batch (--batch-size {batch_size}); raise it to at least "
                         f"{math.ceil(1000 * batch_size / n) / 1000:g}")
    if n - n_val < batch_size:
        raise ValueError(f"--val-fraction {fraction:g} leaves {n - n_val} of {task}'s {n} training examples to train "
                         f"on, fewer than one batch (--batch-size {batch_size}); lower it to at most "
                         f"{math.floor(1000 * (1 - batch_size / n)) / 1000:g}")
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# ---------------------------------------------------------------------------------------------------------
# 3. Download
#
# The addresses used by the standard download_glue_data.py script. Eight tasks are one zip each, holding a
# folder with the TSVs (QNLIv2.zip holds QNLI/, QQP-clean.zip holds QQP/). GLUE does not host MRPC (its
# license), so MRPC is rebuilt from SentEval's copy of the corpus as the script does: rows of
# msr_paraphrase_train.txt whose (#1 ID, #2 ID) pair is listed in mrpc_dev_ids.tsv form dev.tsv, the rest
# train.tsv; msr_paraphrase_test.txt becomes the unlabeled test.tsv.
#
# A base_url (or $GLUE_BASE_URL) replaces every address by <base_url>/<file name>, for a mirror.
# Everything is built in a temporary folder inside data_dir and renamed into place at the end, so a failed
# download never leaves a half-written task folder behind.

GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data"
SENTEVAL_URL = "https://dl.fbaipublicfiles.com/senteval/senteval_data"
MRPC_FILES = ("msr_paraphrase_train.txt", "msr_paraphrase_test.txt", "mrpc_dev_ids.tsv")
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
TIMEOUT_S = 30


def ensure_task(data_dir, task, download: bool = True, base_url: str | None = None) -> Path:
    """The task's folder, downloading the task first (see download_task) if any train/dev file is missing."""
    task = get_task(task)
    folder = Path(data_dir) / task.name
    _check_folder(Path(data_dir))
    _check_folder(folder)
    for name in task.split_files.values():
        _check_file(folder / name)
    missing = [f for f in task.split_files.values() if not (folder / f).is_file()]
    if not missing:
        return folder
    where = f"GLUE task {task.name} not found in {folder} (missing {', '.join(missing)})"
    fix = "Put the official TSVs there, set --data-dir or $GLUE_DIR."
    if not download:
        raise DataError(f"{where}. {fix}")
    try:
        download_task(task, data_dir, base_url=base_url)
    except DataError as e:
        raise DataError(f"{where} and download failed ({e}). {fix}") from None
    missing = [f for f in task.split_files.values() if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{where}; the download did not provide them. {fix}")
    return folder


def download_task(task, data_dir, base_url: str | None = None, progress: bool = True) -> Path:
    """Download one task into <data_dir>/<task.name>/ and return that folder. Files already there are kept.
    Files come from the official addresses, or from <base_url>/<file name> (default $GLUE_BASE_URL)."""
    task = get_task(task)
    base_url = base_url or os.environ.get("GLUE_BASE_URL")
    data_dir = Path(data_dir)
    target = data_dir / task.name
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{task.name}-download-", dir=data_dir))
    except OSError as e:
        raise DataError(f"cannot write to {data_dir} ({e})") from None
    try:
        if task.zip_name is None:
            for name in MRPC_FILES:
                _fetch(_url(name, base_url), tmp / name, progress)
            built = tmp / task.name
            _build_mrpc(tmp, built)
        else:
            _fetch(_url(task.zip_name, base_url), tmp / task.zip_name, progress)
            built = _extract_task_zip(tmp / task.zip_name, task, tmp / "unzipped")
        if not target.exists():
            os.replace(built, target)
        else:
            for item in built.iterdir():
                if not (target / item.name).exists():
                    os.replace(item, target / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _url(file_name: str, base_url: str | None) -> str:
    if base_url:
        return f"{base_url.rstrip('/')}/{file_name}"
    return f"{SENTEVAL_URL if file_name.startswith('msr_') else GLUE_URL}/{file_name}"


def _fetch(url: str, dest: Path, progress: bool) -> None:
    """Download url to dest with a progress bar; any failure becomes a DataError naming the url."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(dest, "wb") as f:
            size = int(response.headers.get("Content-Length") or 0)
            with tqdm(total=size or None, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DataError(f"{url}: {e.reason}") from None
    except (OSError, ValueError) as e:                      # timeouts, resets, disk errors, a malformed url
        raise DataError(f"{url}: {e}") from None
    if size and dest.stat().st_size != size:
        raise DataError(f"{url}: got {dest.stat().st_size} of {size} bytes")


def _extract_task_zip(zip_path: Path, task: TaskSpec, out: Path) -> Path:
    """Check the zip and extract the folder holding train.tsv; return that folder."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()                              # reads every member and checks its CRC
            if bad is not None:
                raise DataError(f"{zip_path.name} is corrupt (bad CRC in {bad})")
            names = [n for n in zf.namelist() if not n.startswith("__MACOSX")]
            folders = [n.removesuffix(task.train_file) for n in names
                       if n == task.train_file or n.endswith("/" + task.train_file)]
            if not folders:
                raise DataError(f"{zip_path.name} does not contain {task.train_file}")
            folder = min(folders, key=len)                  # "QNLI/" for QNLIv2.zip
            missing = [f for f in task.split_files.values() if folder + f not in names]
            if missing:
                raise DataError(f"{zip_path.name} lacks {', '.join(folder + f for f in missing)}")
            zf.extractall(out, members=[n for n in names if n.startswith(folder)])
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DataError(f"{zip_path.name} is not a valid zip file ({e})") from None
    return out / folder


def _build_mrpc(src: Path, out: Path) -> None:
    """Write MRPC's train.tsv, dev.tsv and test.tsv from SentEval's files, split by the GLUE dev ids."""
    dev_ids = set()
    for line in (src / "mrpc_dev_ids.tsv").read_text(encoding="utf-8-sig").split("\n"):
        if line.strip():
            dev_ids.add(tuple(line.strip().split("\t")))
    out.mkdir()
    rows = _senteval_rows(src / "msr_paraphrase_train.txt")
    with open(out / "train.tsv", "w", encoding="utf-8") as train, open(out / "dev.tsv", "w", encoding="utf-8") as dev:
        train.write(MRPC_HEADER + "\n")
        dev.write(MRPC_HEADER + "\n")
        for quality, id1, id2, s1, s2 in rows:
            (dev if (id1, id2) in dev_ids else train).write(f"{quality}\t{id1}\t{id2}\t{s1}\t{s2}\n")
    with open(out / "test.tsv", "w", encoding="utf-8") as test:
        test.write("index\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
        for index, (_, id1, id2, s1, s2) in enumerate(_senteval_rows(src / "msr_paraphrase_test.txt")):
            test.write(f"{index}\t{id1}\t{id2}\t{s1}\t{s2}\n")


def _senteval_rows(path: Path) -> list[list[str]]:
    """The data rows of a SentEval MRPC file (header skipped), each as 5 fields."""
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    rows = []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.strip().split("\t")
        if len(fields) != 5:
            raise DataError(f"{path.name}:{line_no}: expected 5 tab-separated columns, got {len(fields)}")
        rows.append(fields)
    if not rows:
        raise DataError(f"{path.name} has no data rows")
    return rows


# ---------------------------------------------------------------------------------------------------------
# 4. Tokenizer
#
# A byte-level BPE (the GPT-2 scheme): text is first mapped to bytes, so any string can be encoded and
# decoded back exactly, and merges are learned from our own pretraining text. Four special tokens take the
# first ids. They are never produced from text: encode_special_tokens makes a literal "<pad>" in a sentence
# encode as ordinary bytes, so id 0 only ever means padding.
#
# Classification input:  ids(text_a) [<sep> ids(text_b)] <cls>
# The model reads its prediction at <cls>, the last real token; batches are padded on the right. (The other
# readouts of readout.py drop the <cls>, or render the texts through a prompt template: encode_examples.)

PAD, SEP, CLS, EOS = "<pad>", "<sep>", "<cls>", "<eos>"
PAD_ID, SEP_ID, CLS_ID, EOS_ID = 0, 1, 2, 3
ENCODE_CHUNK = 10_000           # texts per encode_batch call, to bound memory


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with <pad>, <sep>, <cls>, <eos> as ids 0, 1, 2, 3."""
    min_size = len(pre_tokenizers.ByteLevel.alphabet()) + 4
    if vocab_size < min_size:
        raise DataError(f"vocab_size={vocab_size} is too small; a byte-level BPE needs at least {min_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, SEP, CLS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.encode_special_tokens = True
    return tok


def save_tokenizer(tok: Tokenizer, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def load_tokenizer(path) -> Tokenizer:
    """Load a tokenizer.json written by save_tokenizer, checking its special-token ids."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file {path} not found; train one first (train_tokenizer + save_tokenizer)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:                                  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]}); "
                        "delete it and retrain") from None
    ids = [tok.token_to_id(t) for t in (PAD, SEP, CLS, EOS)]
    if ids != [PAD_ID, SEP_ID, CLS_ID, EOS_ID]:
        raise DataError(f"{path}: special tokens {PAD, SEP, CLS, EOS} have ids {ids}, expected [0, 1, 2, 3]; "
                        f"retrain it with train_tokenizer")
    tok.encode_special_tokens = True                        # not stored in the json
    return tok


def _encode_texts(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    ids = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        batch = tok.encode_batch(texts[start:start + ENCODE_CHUNK], add_special_tokens=False)
        ids.extend(enc.ids for enc in batch)
    return ids


def encode_examples(tok: Tokenizer, examples: list[Example], max_len: int, readout: str = "cls",
                    template: str | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Token ids per example (int32 arrays, at most max_len long) and the labels (int64 class indices, or
    float32 scores for regression).

    The layout depends on the readout (readout.py): `cls` and `cls-train`: text_a [<sep> text_b] <cls>;
    `last`: text_a [<sep> text_b], read at the text's own last token; `prompt`: the texts rendered through
    `template` (see _encode_prompted)."""
    if max_len < 3:
        raise DataError(f"max_len={max_len} is too small; it must leave room for <sep> and <cls> (at least 3)")
    if not examples:
        raise DataError("encode_examples got no examples")
    if readout == "prompt":
        return _encode_prompted(tok, examples, max_len, template), _labels(examples)
    if readout not in ("cls", "cls-train", "last"):
        raise DataError(f"encode_examples: unknown readout {readout!r}; see readout.READOUTS")
    tail = [] if readout == "last" else [CLS_ID]
    ids_a = _encode_texts(tok, [ex.text_a for ex in examples])
    pairs = [i for i, ex in enumerate(examples) if ex.text_b is not None]
    ids_b = dict(zip(pairs, _encode_texts(tok, [examples[i].text_b for i in pairs])))
    sequences = []
    for i, a in enumerate(ids_a):
        if i not in ids_b:
            seq = a[:max_len - len(tail)] + tail
        else:
            b = ids_b[i]
            n_a, n_b = _truncated_lengths(len(a), len(b), budget=max_len - 1 - len(tail))
            seq = a[:n_a] + [SEP_ID] + b[:n_b] + tail
        if not seq:
            raise DataError(f"the example of line {examples[i].line} has no tokens, so the last-token readout has "
                            f"nothing to read; fix the row, or use --readout cls")
        sequences.append(np.array(seq, dtype=np.int32))
    return sequences, _labels(examples)


def _labels(examples: list[Example]) -> np.ndarray:
    is_float = any(isinstance(ex.label, float) for ex in examples)
    return np.array([ex.label for ex in examples], dtype=np.float32 if is_float else np.int64)


def _encode_prompted(tok: Tokenizer, examples: list[Example], max_len: int, template: str | None) -> list[np.ndarray]:
    """The ids of each example rendered through a prompt template holding {a} (and {b} for pairs), e.g.
    'Sentence 1: {a}\nSentence 2: {b}\nAnswer:'.

    An example whose rendered string fits in max_len tokens is tokenized whole, exactly as the language model
    would read the prompt. A longer one is truncated the way <sep> pairs are (longest text first): the
    template's own text and the texts are tokenized apart, the texts cut, and the pieces joined, so that the
    template's words, and its end, where the prediction is read, are always kept. (Apart, the tokens can
    differ at a seam -- byte-level BPE may merge a text's final '.' with a following '"' -- so a space before
    a placeholder at least goes with its text, ' it', as in the whole string.)"""
    if not template or "{a}" not in template:
        raise DataError(f"the prompt readout needs a template holding {{a}}, got {template!r}; see readout.PROMPTS")
    parts = re.split(r"(\{a\}|\{b\})", template)         # literal, placeholder, literal, ...
    literals, slots = parts[0::2], parts[1::2]
    pair = "{b}" in slots
    if any((ex.text_b is not None) != pair for ex in examples):
        raise DataError(f"the prompt template {template!r} {'has' if pair else 'lacks'} a {{b}} but the "
                        f"examples {'lack' if pair else 'have'} a second text; fix the template")
    def texts(ex):
        return {"{a}": ex.text_a, "{b}": ex.text_b}
    whole = _encode_texts(tok, [literals[0] + "".join(texts(ex)[slot] + literals[k + 1] for k, slot in enumerate(slots))
                                for ex in examples])
    space = [lit.endswith(" ") for lit in literals[:-1]]   # the space before each placeholder
    literals = [lit[:-1] if i < len(space) and space[i] else lit for i, lit in enumerate(literals)]
    literal_ids = [_encode_texts(tok, [lit])[0] if lit else [] for lit in literals]
    budget = max_len - sum(map(len, literal_ids))
    if budget < len(slots):
        raise DataError(f"max_len={max_len} is too small for the prompt template {template!r} "
                        f"({sum(map(len, literal_ids))} tokens of its own); raise --max-len")
    sequences = []
    for ex, ids in zip(examples, whole):
        if len(ids) > max_len:
            pieces = {slot: _encode_texts(tok, [(" " if space[k] else "") + texts(ex)[slot]])[0]
                      for k, slot in enumerate(slots)}
            a, b = pieces["{a}"], pieces.get("{b}", [])
            n_a, n_b = _truncated_lengths(len(a), len(b), budget) if pair else (min(len(a), budget), 0)
            kept = {"{a}": a[:n_a], "{b}": b[:n_b]}
            ids = literal_ids[0] + [t for k, slot in enumerate(slots) for t in kept[slot] + literal_ids[k + 1]]
        sequences.append(np.array(ids, dtype=np.int32))
    return sequences


def _truncated_lengths(n_a: int, n_b: int, budget: int) -> tuple[int, int]:
    """Lengths to keep of two texts so that n_a + n_b <= budget, cutting the longer text first (as BERT
    does): a text shorter than half the budget is kept whole; otherwise both get half, b the odd token."""
    if n_a + n_b <= budget:
        return n_a, n_b
    half = budget // 2
    if n_a <= half:
        return n_a, budget - n_a
    if n_b <= half:
        return budget - n_b, n_b
    return half, budget - half


def cached_encode(tok: Tokenizer, tokenizer_path, task, split: str, examples: list[Example], max_len: int,
                  cache_dir, readout: str = "cls", template: str | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """encode_examples, stored in <cache_dir>/<task>-<split>-<key>.npz so a split is tokenized only once.
    The key hashes the tokenizer file, the examples (texts and labels), max_len, and the readout and its
    template (but for the default readout, `cls`, whose key is the one it always had): any change re-encodes."""
    task = get_task(task)
    h = hashlib.sha256()
    h.update(Path(tokenizer_path).read_bytes())
    h.update(f"max_len={max_len}\n".encode())
    if readout != "cls":
        h.update(f"readout={readout}\ntemplate={template!r}\n".encode())
    for ex in examples:
        h.update(f"{ex.text_a}\t{ex.text_b}\t{ex.label}\n".encode())
    path = Path(cache_dir) / f"{task.name}-{split}-{h.hexdigest()[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                flat, offsets, labels = f["ids"], f["offsets"], f["labels"]
            return np.split(flat, offsets[1:-1]), labels
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass                                            # an unreadable cache file is rebuilt
    ids, labels = encode_examples(tok, examples, max_len, readout, template)
    offsets = np.cumsum([0] + [len(x) for x in ids])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, ids=np.concatenate(ids), offsets=offsets, labels=labels)
    os.replace(tmp, path)
    return ids, labels


def lm_stream(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """All texts as one int32 token stream, each text followed by <eos>, for causal-LM pretraining."""
    if not texts:
        raise DataError("lm_stream got no texts; pass the output of pretrain_texts")
    return np.concatenate([np.array(seq + [EOS_ID], dtype=np.int32) for seq in _encode_texts(tok, list(texts))])


# ---------------------------------------------------------------------------------------------------------
# 5. Batching
#
# Classification: padding wastes compute, so examples of similar length are batched together. For training,
# shuffle the examples, cut them into chunks of CHUNK_BATCHES batches, sort each chunk by length, cut it
# into batches and shuffle the batch order: batches are tight yet their order and content are random.
# For evaluation, sort everything by length. Both are deterministic from (seed, epoch).
#
# Several processes (DDP) build the same batches; runtime.split_batch shares out the rows of a training
# batch and runtime.share the batches of an evaluation pass.

CHUNK_BATCHES = 50


class BucketBatcher:
    """Length-bucketed, dynamically padded batches (right padding with PAD id 0)."""

    def __init__(self, ids: list[np.ndarray], labels: np.ndarray, batch_size: int, shuffle: bool,
                 seed: int = 0):
        if len(ids) != len(labels):
            raise DataError(f"BucketBatcher got {len(ids)} id sequences but {len(labels)} labels")
        if len(ids) == 0:
            raise DataError("BucketBatcher got no examples")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be at least 1")
        self.ids = ids
        labels = np.asarray(labels)
        self.labels = labels.astype(np.float32 if labels.dtype.kind == "f" else np.int64)
        self.lengths = np.array([len(x) for x in ids])
        if self.lengths.min() == 0:
            raise DataError(f"example {int(self.lengths.argmin())} has no tokens; encode_examples always adds <cls>")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def __len__(self) -> int:
        return -(-len(self.ids) // self.batch_size)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        """All batches of the epoch, as arrays of example indices."""
        bs = self.batch_size
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            return [order[i:i + bs] for i in range(0, len(order), bs)]
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.ids))
        batches = []
        for start in range(0, len(perm), bs * CHUNK_BATCHES):
            chunk = perm[start:start + bs * CHUNK_BATCHES]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches: idx (B, T) int64 right-padded with 0, labels (B,) int64 or float32."""
        for b in self._batches(epoch):
            idx = np.zeros((len(b), self.lengths[b].max()), dtype=np.int64)
            for row, i in enumerate(b):
                idx[row, :self.lengths[i]] = self.ids[i]
            yield torch.from_numpy(idx), torch.from_numpy(self.labels[b])

    def padding_fraction(self, epochs: int = 1) -> float:
        """The share of the batch slots (B x T of every batch) that are padding, over epochs 0 .. epochs-1:
        compute spent on nothing. Counted from the lengths alone, without building a batch."""
        slots = real = 0
        for epoch in range(epochs):
            for b in self._batches(epoch):
                slots += len(b) * int(self.lengths[b].max())
                real += int(self.lengths[b].sum())
        return 1.0 - real / slots


# Language modeling: the stream is cut into non-overlapping windows of block_size + 1 tokens (x is the first
# block_size, y the same shifted by one). Each epoch starts the windows at a random offset in
# [0, block_size) and shuffles their order, so every token is seen about once per epoch and window borders
# move between epochs. The number of windows, len(stream) // block_size - 1, fits every offset. The last
# incomplete batch is dropped.

class LMBatcher:
    """Next-token batches (x, y), both (batch_size, block_size) int64, from a token stream."""

    def __init__(self, stream: np.ndarray, block_size: int, batch_size: int, seed: int = 0):
        if block_size < 1 or batch_size < 1:
            raise DataError(f"block_size={block_size} and batch_size={batch_size} must be at least 1")
        self.stream = np.asarray(stream)
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.n_windows = max(len(self.stream) // block_size - 1, 0)
        if len(self) == 0:
            raise DataError(f"a stream of {len(self.stream)} tokens is too short for one batch of "
                            f"{batch_size} x {block_size} tokens; "
                            f"lower block_size or batch_size")

    def __len__(self) -> int:
        return self.n_windows // self.batch_size

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches: x and y = x shifted by one token."""
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(self.block_size))
        starts = offset + self.block_size * rng.permutation(self.n_windows)
        batches = starts[:len(self) * self.batch_size].reshape(len(self), self.batch_size)
        window = np.arange(self.block_size + 1)
        for b in batches:
            chunk = torch.from_numpy(self.stream[b[:, None] + window].astype(np.int64))
            yield chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------------------------------------------------
# 6. Metrics
#
# The definitions GLUE uses (as computed by scikit-learn and SciPy), in numpy. Arguments are (preds, labels);
# all five metrics are symmetric in them. Values are fractions in [0, 1] ([-1, 1] for correlations); reports
# multiply by 100. Where a metric is undefined (a constant input) it is 0.0, as scikit-learn does for MCC
# and F1 (SciPy would return nan for the correlations). A prediction or label that is nan or inf is an
# error (DataError), never ranked, counted or scored; correlations are computed on standardised float64
# values, so that huge ones do not overflow.

def _pair(preds, labels) -> tuple[np.ndarray, np.ndarray]:
    """The two arrays, checked: equally long, not empty, and every number finite -- a NaN prediction (a
    model whose weights diverged) is an error, not a rank or a class."""
    preds, labels = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    if len(preds) != len(labels) or len(preds) == 0:
        raise DataError(f"metrics need equally many predictions and labels, at least one; "
                        f"got {len(preds)} and {len(labels)}")
    for name, values in (("predictions", preds), ("labels", labels)):
        bad = int(np.count_nonzero(~np.isfinite(values))) if values.dtype.kind in "fc" else 0
        if bad:
            fix = "the model's outputs diverged (its weights are not finite numbers): retrain it, e.g. with " \
                  "a lower --lr" if name == "predictions" else "check the data's labels"
            raise DataError(f"{bad} of {len(values)} {name} are not finite (nan or inf), so no score can be "
                            f"computed; {fix}")
    return preds, labels


def accuracy(preds, labels) -> float:
    preds, labels = _pair(preds, labels)
    return float(np.mean(preds == labels))


def f1(preds, labels) -> float:
    """Binary F1 of the positive class 1: 2 TP / (2 TP + FP + FN)."""
    preds, labels = _pair(preds, labels)
    tp = np.sum((preds == 1) & (labels == 1))
    fp = np.sum((preds == 1) & (labels != 1))
    fn = np.sum((preds != 1) & (labels == 1))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation (multiclass form; for two classes (TP TN - FP FN) / sqrt of the four margins)."""
    preds, labels = _pair(preds, labels)
    classes, codes = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    k, n = len(classes), len(labels)
    confusion = np.bincount(codes[:n] * k + codes[n:], minlength=k * k).reshape(k, k).astype(np.float64)
    t = confusion.sum(axis=1)                              # how often each class is the label
    p = confusion.sum(axis=0)                              # how often each class is predicted
    c = np.trace(confusion)                                # correct predictions
    cov_tp = c * n - t @ p
    cov_pp = n * n - p @ p
    cov_tt = n * n - t @ t
    denom = np.sqrt(cov_tt * cov_pp)
    return float(cov_tp / denom) if denom else 0.0


def _standardised(x: np.ndarray) -> np.ndarray:
    """x in float64, centred and scaled to a largest magnitude of 1 (all zeros if constant): the sums of
    products below then never overflow, however large the values (1e200, or float32's 3e38)."""
    x = x.astype(np.float64)
    top = np.max(np.abs(x))
    x = x / top if top > 0 else x          # scaled first: the sum inside the mean of huge values would overflow
    x = x - x.mean()
    top = np.max(np.abs(x))
    return x / top if top > 0 else x


def pearson(preds, labels) -> float:
    preds, labels = _pair(preds, labels)
    x, y = _standardised(preds), _standardised(labels)
    denom = np.sqrt((x @ x) * (y @ y))
    return float(np.clip(x @ y / denom, -1.0, 1.0)) if denom else 0.0


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])   # first position of each run of equal values
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)  # mean of ranks start+1 .. end
    return ranks


def spearman(preds, labels) -> float:
    """Pearson correlation of the ranks (ties get their average rank)."""
    preds, labels = _pair(preds, labels)
    return pearson(_average_ranks(preds), _average_ranks(labels))


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": matthews_corrcoef, "pearson": pearson, "spearman": spearman}


def compute_metrics(task, preds, labels) -> dict[str, float]:
    """The task's metrics on one split; preds are class ids (floats for STS-B)."""
    task = get_task(task)
    return {name: METRICS[name](preds, labels) for name in task.metrics}


def task_score(task, metrics: dict) -> float:
    """The number GLUE reports for a task on one dev split, from compute_metrics' dict (other keys ignored):
    the mean of the task's metrics, e.g. MRPC and QQP (F1 + accuracy) / 2, STS-B (Pearson + Spearman) / 2.
    MNLI has two dev splits: its score is the mean of the two, (matched + mismatched accuracy) / 2, so it
    weighs the same as every other task in glue_average (papers such as LoRA's report matched alone)."""
    task = get_task(task)
    missing = [m for m in task.metrics if m not in metrics]
    if missing:
        raise DataError(f"task_score({task.name}) needs metrics {list(task.metrics)}, missing {missing}; "
                        f"pass compute_metrics({task.name}, ...)")
    return float(np.mean([metrics[m] for m in task.metrics]))


def majority_baseline(task, train_labels, dev_labels) -> float:
    """The task score on one dev split of the constant predictor of the most frequent TRAIN class (a tie
    goes to the lower class index): the floor a classifier must beat. For STS-B the constant is the train
    mean, whose correlations are 0 (chance). MRPC's always-"paraphrase" scores (F1 81.2 + acc 68.4) / 2."""
    task = get_task(task)
    train_labels = np.asarray(train_labels)
    if task.is_regression:
        constant = float(train_labels.mean())
    else:
        constant = int(np.bincount(train_labels.astype(np.int64), minlength=task.num_outputs).argmax())
    preds = np.full(len(dev_labels), constant)
    return task_score(task, compute_metrics(task, preds, dev_labels))


def glue_average(scores: dict) -> float:
    """Unweighted mean of per-task scores {task name: task_score}. Pass the tasks you ran; the usual GLUE
    average of papers (BERT, LoRA) leaves out WNLI."""
    if not scores:
        raise DataError("glue_average got no task scores")
    names = [get_task(name).name for name in scores]        # also checks the names
    if len(set(names)) != len(names):
        raise DataError(f"glue_average got a task twice: {list(scores)}")
    return float(np.mean(list(scores.values())))
