"""
zeroshot.py -- the zero-shot row: the backbone with no training, scored on the whole dev set of each task.

    python cli.py zeroshot [--tasks CoLA,SST-2,MRPC,STS-B,RTE] [--backbone runs/smollm2-135m] [--data-dir D]

Each dev example is rendered through its task's prompt (readout.PROMPTS: the same template and label words
as the `prompt` readout), and the language model's next-token logits of the label words at the prompt's
last token decide: classification, the label word with the largest logit; STS-B, the probability of the
high word against the low one mapped onto 0..5 (readout.regression_score). The task's GLUE metrics then
come from data.compute_metrics / data.task_score, as for a fine-tuned run.

One JSON line per task goes to <results-dir>/finetune.jsonl (method and suite "zero-shot", seed 0, score =
last_score), with a run_id made of the task, the backbone's hash and the prompt's: a rerun finds its line
there and adds none. report.py shows these lines as a row of every table of a suite on the same backbone.
"""

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import torch

import data
import readout
import runs
from model import GPT

METHOD = SUITE = "zero-shot"
TASKS = "CoLA,SST-2,MRPC,STS-B,RTE"
BACKBONE = "runs/smollm2-135m"


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--tasks", default=TASKS,
                        help=f"GLUE tasks with a prompt in readout.PROMPTS (default: {TASKS})")
    parser.add_argument("--backbone", default=BACKBONE, help=f"backbone folder (default: {BACKBONE})")
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default: $GLUE_DIR, else ./data/glue)")
    parser.add_argument("--results-dir", default=str(runs.RESULTS_DIR), help="folder whose finetune.jsonl gets "
                        "one line per task (default: results/)")
    parser.add_argument("--batch-size", type=int, default=16, help="dev examples per forward pass (default: 16)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = PyTorch's default)")


def command(args: argparse.Namespace):
    """`cli.py zeroshot`: check every argument, then score each task (printing its line)."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not tasks:
        raise ValueError("--tasks is empty; give GLUE task names, e.g. --tasks SST-2,RTE")
    for record, written in zeroshot(tasks, args.backbone, args.data_dir, args.results_dir, args.batch_size):
        print(f"zeroshot {record['task']}: dev score {100 * record['score']:.1f} ({record['dev_examples']} "
              f"examples, {record['wall_s']:.0f} s)" + ("" if written else " -- already in the results file, "
                                                         "not scored again"))


def run_id(task: data.TaskSpec, backbone_sha256: str) -> str:
    """The same for every rerun on the same backbone with the same prompt: the results file keeps one line."""
    prompt = readout.prompt_of(task)
    key = hashlib.sha256(f"{prompt.template}\n{prompt.words}".encode()).hexdigest()[:12]
    return f"{SUITE}/{task.name}/{backbone_sha256[:16]}/{key}"


@torch.no_grad()
def label_logits(lm: GPT, idx: torch.Tensor, ids: list) -> torch.Tensor:
    """The LM's next-token logits of the label words at each row's last real token: (B, T) -> (B, k)."""
    h = lm.hidden_states(idx)                                              # (B, T, d)
    last = (idx != lm.config.pad_id).sum(1) - 1                            # (B,) right padding
    pooled = h[torch.arange(len(idx)), last]                               # (B, d)
    return pooled @ lm.lm_head.weight[ids].T                               # (B, d) @ (d, k) -> (B, k)


def score_task(lm: GPT, tok, tok_path: Path, task: data.TaskSpec, data_dir: Path, cache: Path,
               batch_size: int) -> tuple[dict, int, int]:
    """(metrics per dev split with the task's score, dev examples, tokens) of the zero-shot prompt."""
    ids = readout.label_token_ids(tok, task)
    template = readout.template_of(task, "prompt")
    dev, scores, examples, tokens = {}, [], 0, 0
    for split in task.dev_files:
        seqs, labels = data.cached_encode(tok, tok_path, task, split, data.read_split(data_dir, task, split),
                                          lm.config.block_size, cache, "prompt", template)
        preds, golds = [], []
        for idx, y in data.BucketBatcher(seqs, labels, batch_size, shuffle=False).epoch(0):
            logits = label_logits(lm, idx, ids).float()                     # (B, k)
            if task.is_regression:
                preds.append(readout.regression_score(logits[:, 1] - logits[:, 0], task).numpy())
            else:
                preds.append(logits.argmax(-1).numpy())
            golds.append(y.numpy())
            tokens += int((idx != lm.config.pad_id).sum())
        metrics = data.compute_metrics(task, np.concatenate(preds), np.concatenate(golds))
        scores.append(data.task_score(task, metrics))
        dev[split] = metrics
        examples += len(seqs)
    dev["score"] = float(np.mean(scores))
    return dev, examples, tokens


def zeroshot(tasks: list, backbone: str, data_dir: str | None = None, results_dir=runs.RESULTS_DIR,
             batch_size: int = 16):
    """Score each task's prompt with the backbone and append its line; yields (record, written) per task,
    where written is False for a task whose line the results file already holds (then nothing is scored)."""
    tasks = [data.get_task(t) for t in tasks]
    for task in tasks:                                                     # every prompt, before any work
        readout.prompt_of(task)
    runs.check_results_folder(results_dir)
    config, state, tok, tok_path = runs.load_backbone(backbone)
    sha = runs.file_sha256(Path(backbone) / runs.BACKBONE_FILE)
    for task in tasks:
        readout.label_token_ids(tok, task)
    ddir = data.resolve_data_dir(data_dir)
    for task in tasks:
        data.ensure_task(ddir, task)
    done = {r.get("run_id"): r for r in runs.load_results(results_dir)}
    lm = None
    for task in tasks:
        rid = run_id(task, sha)
        if rid in done:
            yield done[rid], False
            continue
        if lm is None:
            lm = GPT(config)
            lm.load_state_dict(state)
            lm.eval()
        t0 = time.time()
        dev, examples, tokens = score_task(lm, tok, tok_path, task, ddir, Path(backbone) / "cache", batch_size)
        wall = time.time() - t0
        prompt = readout.prompt_of(task)
        record = {
            "task": task.name, "method": METHOD, "seed": 0, "suite": SUITE,
            "score": dev["score"], "last_score": dev["score"], "dev": dev,
            "prompt": prompt.template, "label_words": list(prompt.words),
            "trainable_params": 0, "total_params": lm.num_params(), "train_examples": 0,
            "dev_examples": examples, "wall_s": round(wall, 1), "tokens_per_s": round(tokens / max(wall, 1e-9), 1),
            "device": "cpu", "precision": "fp32", "processes": 1, "run_id": rid,
            "backbone": backbone, "backbone_sha256": sha, "machine": runs.machine_description(),
            "commit": runs.git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        runs.append_result(record, results_dir)
        yield record, True
