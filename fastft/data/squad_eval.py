"""SQuAD evaluation: exact match and F1, and batched greedy generation of answers.

Metric definitions follow the official SQuAD evaluation scripts (Rajpurkar et al., 2016, "SQuAD:
100,000+ Questions for Machine Comprehension of Text", evaluate-v1.1.py; and evaluate-v2.0.py for
unanswerable questions), re-implemented here:

- normalise both strings: lower-case, drop punctuation, drop the articles "a", "an", "the" as
  whole words, collapse whitespace;
- exact match: normalised strings are equal;
- F1: harmonic mean of token precision and recall over the bag of normalised whitespace tokens
  (common tokens counted with multiplicity). When either side has no tokens (v2.0's "no answer"),
  F1 is 1 if both are empty, else 0;
- per question, the maximum over the gold answers; corpus scores are means, times 100.
For an unanswerable question the gold answer list is [""] (as in evaluate-v2.0.py).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Mapping, Sequence

import torch

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation, articles and extra whitespace (the official SQuAD order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def max_over_golds(metric, prediction: str, golds: Sequence[str]) -> float:
    """Best score of `prediction` against any gold answer; no gold answers means "unanswerable"."""
    golds = [g for g in golds if normalize_answer(g)] or [""]
    return max(metric(prediction, g) for g in golds)


def squad_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    unanswerable_answer: str | None = None,
) -> dict[str, float]:
    """Exact match and F1 (both in percent) of `predictions` (id -> text) against `references`
    (id -> gold answer texts; an empty list marks an unanswerable question).

    `unanswerable_answer`: the text the model was trained to say for "no answer" (SQuAD v2.0);
    a prediction equal to it (after normalisation) counts as the empty answer.
    Every reference id must have a prediction: a missing one is an error, not a silent zero.
    """
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(references)} questions have no prediction (first: {missing[0]!r}); "
            "generate answers for the whole eval split before scoring"
        )
    no_answer = normalize_answer(unanswerable_answer) if unanswerable_answer else None
    em = f1 = 0.0
    for qid, golds in references.items():
        prediction = predictions[qid]
        if no_answer is not None and normalize_answer(prediction) == no_answer:
            prediction = ""
        em += max_over_golds(exact_match_score, prediction, golds)
        f1 += max_over_golds(f1_score, prediction, golds)
    n = max(len(references), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "count": len(references)}


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: Iterable[tuple[str, Sequence[int]]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> dict[str, str]:
    """Greedy answers for `prompts` ((id, prompt token ids) pairs, e.g. from `SquadFormatter.eval_prompts`).

    Batched with left padding so that every row's next token sits in the last column; each answer
    stops at EOS or after `max_new_tokens`. Returns id -> decoded answer (stripped).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token: set tokenizer.eos_token so that generation can stop")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: dict[str, str] = {}
    items = list(prompts)
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            width = max(len(ids) for _, ids in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (_, ids) in enumerate(chunk):
                input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
            )
            for row, (qid, _) in enumerate(chunk):
                new_tokens = output[row, width:].tolist()
                if eos_id in new_tokens:
                    new_tokens = new_tokens[: new_tokens.index(eos_id)]
                answers[qid] = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers
