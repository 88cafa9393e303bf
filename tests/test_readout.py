"""The readouts (--readout, readout.py) and the zero-shot row (zeroshot.py), on the tiny fixtures.

The nano backbone's tokenizer has 300 tokens and its block is 32 long, too short for readout.PROMPTS' real
templates (and " no" / " yes" both start with the token " " there), so the tests that run a prompt swap in a
table of short templates (SHORT) with label words that start with distinct tokens."""

import hashlib
import json

import numpy as np
import pytest
import torch

import data
import readout
import report
import runs
import train
from cli import evaluate_run
from data import Example
from model import GPT, GPTClassifier

from conftest import FIXTURES, cli

SHORT = {"SST-2": readout.Prompt("{a}\nIt was", ("bad", "good")),
         "RTE": readout.Prompt("{a}\n{b}\nTrue?", ("yes", "no")),
         "STS-B": readout.Prompt("{a}\n{b}\nSame?", ("no", "yes"))}


@pytest.fixture
def short_prompts(monkeypatch):
    monkeypatch.setattr(readout, "PROMPTS", SHORT)


def finetune_args(backbone, tmp_path, task, method, *extra):
    return ["finetune", "--task", task, "--method", method, "--backbone", backbone, "--data-dir", FIXTURES,
            "--epochs", "1", "--batch-size", "4", "--max-len", "32", "--out-dir", tmp_path / "run",
            "--results-dir", tmp_path / "results", "--threads", "1", *extra]


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def test_default_readout_is_todays(backbone, tmp_path):
    config, state, tok, tok_path = runs.load_backbone(backbone)
    examples = [Example("a warm , funny film", None, 1, 2), Example("It rained.", "The ground is wet.", 0, 3)]
    # The ids: text_a [<sep> text_b] <cls>, as before the readouts existed.
    ids, _ = data.encode_examples(tok, examples, 32)
    assert ids[0].tolist() == enc(tok, "a warm , funny film") + [data.CLS_ID]
    assert ids[1].tolist() == enc(tok, "It rained.") + [data.SEP_ID] + enc(tok, "The ground is wet.") + [data.CLS_ID]
    # The cache file keeps the key it always had (tokenizer, max_len, examples), so old caches still hit.
    data.cached_encode(tok, tok_path, "rte", "dev", examples, 32, tmp_path)
    h = hashlib.sha256(tok_path.read_bytes() + b"max_len=32\n")
    for ex in examples:
        h.update(f"{ex.text_a}\t{ex.text_b}\t{ex.label}\n".encode())
    assert (tmp_path / f"RTE-dev-{h.hexdigest()[:16]}.npz").is_file()
    # The model: the same parameters, drawn from the same random stream, and the same logits.
    torch.manual_seed(0)
    new = runs.build_classifier(config, state, 2)
    torch.manual_seed(0)
    old = GPTClassifier(config, 2)
    old.gpt.load_state_dict(state)
    assert new.cls_row is None and new.state_dict().keys() == old.state_dict().keys()
    idx = torch.tensor([ids[1].tolist()])
    assert torch.equal(new(idx)[0], old.head(old.pool(old.gpt.hidden_states(idx), idx)))


def test_last_readout_appends_nothing(backbone):
    _, _, tok, _ = runs.load_backbone(backbone)
    long = "The agency will publish its findings next spring, after a long review of every record."
    examples = [Example("a warm , funny film", None, 1, 2), Example("It rained.", "The ground is wet.", 0, 3)]
    ids, _ = data.encode_examples(tok, examples, 64, readout="last")
    assert ids[0].tolist() == enc(tok, "a warm , funny film")
    assert ids[1].tolist() == enc(tok, "It rained.") + [data.SEP_ID] + enc(tok, "The ground is wet.")
    ids, _ = data.encode_examples(tok, [Example(long, long, 0, 4), Example(long, None, 1, 5)], 12, readout="last")
    assert ids[0].tolist() == enc(tok, long)[:5] + [data.SEP_ID] + enc(tok, long)[:6]   # budget 11, longest first
    assert ids[1].tolist() == enc(tok, long)[:12]
    assert not any(data.CLS_ID in seq for seq in ids)
    with pytest.raises(data.DataError, match="line 7 has no tokens.*--readout cls"):
        data.encode_examples(tok, [Example("", None, 0, 7)], 12, readout="last")


def test_prompt_encoding_is_the_whole_string_and_truncates_the_texts_not_the_template(backbone):
    _, _, tok, _ = runs.load_backbone(backbone)
    template = "Premise: {a}\nHypothesis: {b}\nAnswer:"
    short = Example("It rained.", "The ground is wet.", 0, 2)
    ids, _ = data.encode_examples(tok, [short], 64, "prompt", template)
    assert ids[0].tolist() == enc(tok, "Premise: It rained.\nHypothesis: The ground is wet.\nAnswer:")
    long = "The agency will publish its findings next spring, after a long review of every record."
    ids, _ = data.encode_examples(tok, [Example(long, "Yes.", 0, 3)], 40, "prompt", template)
    assert len(ids[0]) == 40
    assert ids[0].tolist()[-len(enc(tok, "\nHypothesis: Yes.\nAnswer:")):] == enc(tok, "\nHypothesis") + \
        enc(tok, ":") + enc(tok, " Yes.") + enc(tok, "\nAnswer:")   # the template's end and the short text kept
    with pytest.raises(data.DataError, match=r"max_len=8 is too small for the prompt template.*--max-len"):
        data.encode_examples(tok, [short], 8, "prompt", template)
    with pytest.raises(data.DataError, match="has a \\{b\\} but the examples lack"):
        data.encode_examples(tok, [Example("a", None, 0, 2)], 64, "prompt", template)


def test_cache_keys_differ_by_readout_and_template(backbone, tmp_path):
    _, _, tok, tok_path = runs.load_backbone(backbone)
    examples = data.read_split(FIXTURES, "SST-2", "dev")
    for name, template in [("cls", None), ("last", None), ("cls-train", None), ("prompt", "{a}\nIt was"),
                           ("prompt", "{a}\nSo:")]:
        ids, _ = data.cached_encode(tok, tok_path, "sst2", "dev", examples, 32, tmp_path, name, template)
        direct, _ = data.encode_examples(tok, examples, 32, name, template)
        assert [x.tolist() for x in ids] == [x.tolist() for x in direct]
    assert len(list(tmp_path.glob("SST-2-dev-*.npz"))) == 5


def test_cls_train_trains_only_the_cls_row_and_round_trips(backbone, tmp_path):
    code, message = cli(*finetune_args(backbone, tmp_path, "RTE", "lora", "--lora-r", "2", "--readout", "cls-train"))
    assert code == 0, message
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["finetune"]["readout"] == "cls-train" and config["adapter"]["modules_to_save"] == ["head", "cls_row"]
    payload = torch.load(run / "adapter.pt", weights_only=True)
    assert payload["extra"]["readout"] == "cls-train"
    delta = payload["state"]["cls_row.delta"]
    assert delta.shape == (32,) and delta.abs().sum() > 0                       # the row moved...
    _, backbone_state, _, _ = runs.load_backbone(backbone)
    model, _, _ = runs.load_finetuned(run)
    assert torch.equal(model.gpt.wte.weight, backbone_state["wte.weight"])      # ...the embedding did not
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "cls_row.delta" in trainable and not any("wte" in n for n in trainable)
    # Reloaded (adapter and row onto the backbone), and merged and exported, it scores what the run reported.
    final = json.loads((run / "final.json").read_text())
    assert final["readout"] == "cls-train"
    assert final["trainable_params"] == 2 * 2 * (32 + 32) * 2 + 32 * 2 + 2 + 32   # LoRA q, v x 2 layers; head; row
    assert evaluate_run(run, FIXTURES)["score"] == pytest.approx(final["score"], abs=1e-12)
    assert cli("export", "--run", run, "--data-dir", FIXTURES)[0] == 0
    assert evaluate_run(tmp_path / "run-merged", FIXTURES)["score"] == pytest.approx(final["merged_score"], abs=1e-12)


@pytest.mark.parametrize("readout_name,method,task", [("last", "lora", "RTE"), ("prompt", "lora", "RTE"),
                                                      ("prompt", "full", "STS-B"), ("cls-train", "full", "SST-2")])
def test_every_readout_trains_saves_and_reloads(backbone, tmp_path, short_prompts, readout_name, method, task):
    code, message = cli(*finetune_args(backbone, tmp_path, task, method, "--readout", readout_name))
    assert code == 0, message
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["readout"] == readout_name
    assert evaluate_run(tmp_path / "run", FIXTURES)["score"] == pytest.approx(final["score"], abs=1e-12)


def label_logits_of_the_lm(config, state, idx, ids):
    lm = GPT(config)
    lm.load_state_dict(state)
    last = (idx != 0).sum(1) - 1
    return lm(idx)[0][torch.arange(len(idx)), last][:, ids]                     # (B, V) -> (B, k)


def test_prompt_head_starts_as_the_lm_heads_label_words(backbone, short_prompts):
    config, state, tok, _ = runs.load_backbone(backbone)
    for task in ("SST-2", "RTE"):
        examples = data.read_split(FIXTURES, task, "dev")
        ids, _ = data.encode_examples(tok, examples, 32, "prompt", readout.template_of(task, "prompt"))
        batch = next(data.BucketBatcher(ids, np.zeros(len(ids), dtype=np.int64), 8, shuffle=False).epoch(0))[0]
        model = runs.build_classifier(config, state, 2, "prompt", task, tok).eval()
        words = readout.label_token_ids(tok, task)
        expected = label_logits_of_the_lm(config, state, batch, words)
        with torch.no_grad():
            assert torch.allclose(model(batch)[0], expected, atol=1e-5, rtol=0)
        assert expected.std() > 0                                               # not trivially equal
    # STS-B: the tangent at 0 of 5 sigmoid(logit(yes) - logit(no)).
    examples = data.read_split(FIXTURES, "STS-B", "dev")
    ids, _ = data.encode_examples(tok, examples, 32, "prompt", readout.template_of("STS-B", "prompt"))
    batch = next(data.BucketBatcher(ids, np.zeros(len(ids), dtype=np.float32), 8, shuffle=False).epoch(0))[0]
    model = runs.build_classifier(config, state, 1, "prompt", "STS-B", tok).eval()
    lm = label_logits_of_the_lm(config, state, batch, readout.label_token_ids(tok, "STS-B"))
    with torch.no_grad():
        assert torch.allclose(model(batch)[0], 2.5 + 1.25 * (lm[:, 1] - lm[:, 0]), atol=1e-5, rtol=0)


def test_zeroshot_writes_one_line_per_task_once(backbone, tmp_path, short_prompts):
    args = ["zeroshot", "--tasks", "SST-2,RTE,STS-B", "--backbone", backbone, "--data-dir", FIXTURES,
            "--results-dir", tmp_path, "--threads", "1"]
    assert cli(*args) == (0, "")
    lines = runs.load_results(tmp_path)
    assert [r["task"] for r in lines] == ["SST-2", "RTE", "STS-B"]
    for r in lines:
        assert r["method"] == "zero-shot" and r["suite"] == "zero-shot" and r["seed"] == 0
        assert r["score"] == r["last_score"] and r["trainable_params"] == 0
        assert r["backbone_sha256"] == runs.file_sha256(backbone / "backbone.pt") and r["machine"] and r["commit"]
    # The score is the prompt classifier's at step 0 on the whole dev set (classification: the same argmax).
    config, state, tok, _ = runs.load_backbone(backbone)
    for task in ("SST-2", "RTE"):
        examples = data.read_split(FIXTURES, task, "dev")
        ids, labels = data.encode_examples(tok, examples, 32, "prompt", readout.template_of(task, "prompt"))
        model = runs.build_classifier(config, state, 2, "prompt", task, tok)
        dev = train.evaluate(model, data.get_task(task), {"dev": data.BucketBatcher(ids, labels, 8, shuffle=False)})
        assert next(r for r in lines if r["task"] == task)["score"] == pytest.approx(dev["score"], abs=1e-12)
    assert cli(*args) == (0, "")                                                # again: nothing is added
    assert len(runs.load_results(tmp_path)) == 3
    report_rows = [{**r, "method": "lora", "suite": "smollm2", "backbone": str(backbone)} for r in lines]
    assert report.zero_shot_scores(lines, report_rows) == {r["task"]: r["score"] for r in lines}
    assert "zero-shot" not in report.split_suites(lines + report_rows)


def test_zeroshot_refuses_a_task_without_a_prompt(backbone, tmp_path, short_prompts):
    code, message = cli("zeroshot", "--tasks", "SST-2,QQP", "--backbone", backbone, "--data-dir", FIXTURES,
                        "--results-dir", tmp_path)
    assert code == 1 and "no prompt for QQP in readout.PROMPTS" in message and "\n" not in message
    assert not (tmp_path / "finetune.jsonl").exists()                          # checked before any work


def test_real_prompts_cover_the_five_tasks_in_class_order():
    assert set(readout.PROMPTS) == {"CoLA", "SST-2", "MRPC", "STS-B", "RTE"}
    for name, prompt in readout.PROMPTS.items():
        task = data.get_task(name)
        assert len(prompt.words) == (2 if task.is_regression else len(task.labels))
        assert "{a}" in prompt.template and ("{b}" in prompt.template) == (len(task.text_columns) == 2)
    assert readout.PROMPTS["RTE"].words[data.get_task("RTE").labels.index("entailment")] == " True"
    assert readout.PROMPTS["SST-2"].words[1] == " positive"


@pytest.mark.parametrize("value,task,expected", [("bogus", "RTE", "--readout 'bogus' is not known"),
                                                 ("prompt", "QQP", "no prompt for QQP")])
def test_bad_readout_is_one_line_naming_the_flag(backbone, tmp_path, value, task, expected):
    code, message = cli(*finetune_args(backbone, tmp_path, task, "lora", "--readout", value))
    assert code == 1 and expected in message and "--readout" in message and "\n" not in message
    assert not (tmp_path / "run").exists()
