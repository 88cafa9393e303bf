"""
readout.py -- where a classifier reads its prediction (--readout), and the prompt table that the `prompt`
readout and the zero-shot row (zeroshot.py) share.

A causal model's prediction is read at one position, the last real token of the input (model.GPTClassifier
pools it). What that token is, is the readout:

  cls        text_a [<sep> text_b] <cls>, read at an appended <cls> (GPT's recipe; the default). For an
             imported backbone <cls> is a new token whose embedding row starts as the mean row (imports.py);
             an adapter method freezes the embedding, so every input ends on that same fixed vector.
  last       text_a [<sep> text_b], read at the text's own last token, as sequence classification with
             decoder models usually does: no new token.
  cls-train  as cls, plus a trainable vector added to the embedding at <cls> positions (TokenRow): the one
             row an adapter method may move. It is a module of its own (model.cls_row), trained in full and
             stored in the adapter file (AdapterConfig.modules_to_save gets "cls_row").
  prompt     the texts rendered through the task's template in PROMPTS, which ends just before the label word,
             read at its last token; the head starts as the LM head's rows of the label words
             (init_prompt_head), so at step 0 the classifier computes what the zero-shot prompt does.

PROMPTS is the one table of templates and label words. The templates are those of EleutherAI's
lm-evaluation-harness for GLUE (STS-B, which it lacks, borrows MRPC's question; SST-2 uses notebook 6's
one-line prompt), chosen before any score was seen: a template picked by its dev score would flatter the
zero-shot row by its own noise.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

import data

READOUTS = ("cls", "last", "cls-train", "prompt")


@dataclass(frozen=True)
class Prompt:
    template: str      # the input, with {a} (and {b} for pairs) for the texts; ends just before the label word
    words: tuple       # the label words in the task's class order (data.TaskSpec.labels); regression: (low, high)


PROMPTS = {
    # CoLA labels ("0", "1") = unacceptable, acceptable
    "CoLA": Prompt("{a}\nQuestion: Does this sentence make sense?\nAnswer:", (" no", " yes")),
    "SST-2": Prompt('Movie review: "{a}"\nThe sentiment of this review is', (" negative", " positive")),
    # MRPC labels ("0", "1") = not a paraphrase, paraphrase
    "MRPC": Prompt("Sentence 1: {a}\nSentence 2: {b}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
                   (" no", " yes")),
    # STS-B: similarity 0..5, read as P(" yes") against P(" no") (regression_score, init_prompt_head)
    "STS-B": Prompt("Sentence 1: {a}\nSentence 2: {b}\nQuestion: Do both sentences mean the same thing?\nAnswer:",
                    (" no", " yes")),
    # RTE labels ("entailment", "not_entailment")
    "RTE": Prompt("{a}\nQuestion: {b} True or False?\nAnswer:", (" True", " False")),
}


def check(readout: str, task=None):
    """Raise ValueError, naming --readout, for an unknown readout, or `prompt` for a task without a prompt."""
    if readout not in READOUTS:
        raise ValueError(f"--readout {readout!r} is not known; choose one of {', '.join(READOUTS)}")
    if readout == "prompt" and task is not None:
        prompt_of(task)


def prompt_of(task) -> Prompt:
    """The task's entry of PROMPTS; a ValueError naming the task when it has none."""
    task = data.get_task(task)
    if task.name not in PROMPTS:
        raise ValueError(f"no prompt for {task.name} in readout.PROMPTS (there are: {', '.join(PROMPTS)}); add "
                         f"its template and label words there, or use another --readout")
    return PROMPTS[task.name]


def template_of(task, readout: str) -> str | None:
    """The prompt template the readout renders the task's examples through (None but for `prompt`)."""
    return prompt_of(task).template if readout == "prompt" else None


def label_token_ids(tok, task) -> list[int]:
    """The token id of each label word of the task (its first token, if a word has several), in class
    order; a ValueError when two words start with the same token (they could not be told apart)."""
    prompt = prompt_of(task)
    ids = [tok.encode(word, add_special_tokens=False).ids[:1] for word in prompt.words]
    if any(not i for i in ids) or len({i[0] for i in ids}) < len(ids):
        raise ValueError(f"the label words {list(prompt.words)} of {data.get_task(task).name} in readout.PROMPTS "
                         f"do not start with distinct tokens ({ids}) in this tokenizer; choose other words")
    return [i[0] for i in ids]


def regression_score(diff: torch.Tensor, task) -> torch.Tensor:
    """A regression task's score from d = logit(high word) - logit(low word): the probability of the high word
    against the low one, sigmoid(d), mapped onto the score range (STS-B: 5 sigmoid(d), from 0 to 5)."""
    low, high = data.get_task(task).score_range
    return low + (high - low) * torch.sigmoid(diff)


class TokenRow(nn.Module):
    """A trainable vector added to the token embedding wherever the input holds token_id (readout cls-train).

    It starts at zero, so the model starts as with readout cls; training moves the <cls> embedding to
    row + delta. Only this row: the rest of the (frozen) embedding is untouched.
    """

    def __init__(self, n_embd: int, token_id: int):
        super().__init__()
        self.token_id = token_id
        self.delta = nn.Parameter(torch.zeros(n_embd))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        at = (idx == self.token_id).unsqueeze(-1).to(self.delta.dtype)      # (B, T, 1)
        return at * self.delta                                              # (B, T, 1) * (d,) -> (B, T, d)


@torch.no_grad()
def init_prompt_head(model, task, tok):
    """Start the classifier's head as the LM head's rows of the task's label words (readout prompt).

    Classification: head row c = lm_head row of word c, bias 0, so logit c is the LM's next-token logit of
    word c at the prompt's end, and argmax picks the word the LM prefers -- the zero-shot prediction.

    Regression (STS-B, one output): the zero-shot score regression_score(d) = low + (high - low) sigmoid(d),
    d = logit(high) - logit(low), is not linear in the hidden state, so a linear head cannot start as it. It
    starts as its tangent at d = 0: mid + (high - low) / 4 * d, i.e. weight (high - low) / 4 (row(high) -
    row(low)), bias mid = (low + high) / 2. That ranks the pairs exactly as the zero-shot score does (same
    Spearman), predicts the middle of the range where the LM is undecided, and keeps the first squared
    errors of the order of the range rather than of the raw logits.
    """
    ids = label_token_ids(tok, task)
    rows = model.gpt.lm_head.weight[ids].float()                            # (k, d): the tied embedding rows
    spec = data.get_task(task)
    if spec.is_regression:
        low, high = spec.score_range
        weight = (high - low) / 4 * (rows[1] - rows[0]).unsqueeze(0)         # (1, d)
        bias = torch.full((1,), (low + high) / 2)
    else:
        weight, bias = rows, torch.zeros(len(ids))
    model.head.weight.copy_(weight)
    model.head.bias.copy_(bias)


def attach(model, readout: str, task=None, tok=None):
    """Give a new classifier what its readout needs: the trainable <cls> row (cls-train), the head started
    from the label words (prompt; needs the task and the tokenizer). cls and last need nothing."""
    if readout == "cls-train":
        model.cls_row = TokenRow(model.config.n_embd, data.CLS_ID)
    elif readout == "prompt":
        init_prompt_head(model, task, tok)
    return model


def adapter_config(adapter_cfg, readout: str):
    """An adapter method's config for the readout: with cls-train, the <cls> row trains and is saved with
    the adapter, as the head is (modules_to_save)."""
    if adapter_cfg is None or readout != "cls-train" or "cls_row" in adapter_cfg.modules_to_save:
        return adapter_cfg
    return dataclasses.replace(adapter_cfg, modules_to_save=(*adapter_cfg.modules_to_save, "cls_row"))
