"""SQuAD exact match / F1 on hand-made cases, and batched greedy answer generation."""

from __future__ import annotations

import pytest
import torch

from fastft.data import builtin
from fastft.data.squad import SquadFormatter
from fastft.data.squad_eval import (
    exact_match_score,
    f1_score,
    generate_answers,
    max_over_golds,
    normalize_answer,
    squad_metrics,
)


@pytest.mark.parametrize("text, normalised", [
    ("The Cat", "cat"),
    ("  an apple   a day ", "apple day"),
    ("U.S.A.", "usa"),
    ("Theatre, the theory!", "theatre theory"),  # articles only as whole words
    ("A", ""),
    ("1,000 (approx.)", "1000 approx"),
])
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_and_f1_hand_computed():
    assert exact_match_score("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match_score("Eiffel", "Eiffel Tower") == 0.0
    # pred {cat, sat}, gold {cat, sat, down}: precision 1, recall 2/3, F1 = 2*1*(2/3)/(5/3) = 0.8
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred {red, red, car}, gold {red, car}: p 2/3, r 1 -> 0.8
    assert f1_score("red red car", "red car") == pytest.approx(0.8)
    assert f1_score("blue", "red car") == 0.0
    # no answer on either side (v2.0): 1 only when both are empty
    assert f1_score("", "") == 1.0 and f1_score("the", "") == 1.0 and f1_score("x", "") == 0.0


def test_max_over_golds_and_corpus_metrics():
    assert max_over_golds(f1_score, "10th century", ["in the 10th and 11th centuries", "10th century"]) == 1.0
    predictions = {"q1": "France", "q2": "the 10th", "q3": "no answer", "q4": "Paris"}
    references = {"q1": ["France", "France"], "q2": ["10th and 11th centuries", "in the 10th century"],
                  "q3": [], "q4": []}
    metrics = squad_metrics(predictions, references, unanswerable_answer="No answer.")
    # q1: EM 1, F1 1. q2: pred {10th}; vs {10th, and, 11th, centuries} p 1, r 1/4 -> 0.4; vs {in, 10th,
    # century} p 1, r 1/3 -> 0.5; max 0.5, EM 0. q3: "no answer" counts as "" -> 1, 1. q4: 0, 0.
    assert metrics["count"] == 4
    assert metrics["exact_match"] == pytest.approx(100 * 2 / 4)
    assert metrics["f1"] == pytest.approx(100 * (1 + 0.5 + 1 + 0) / 4)
    with pytest.raises(ValueError, match="1 of 1 questions have no prediction \\(first: 'q9'\\)"):
        squad_metrics({}, {"q9": ["x"]})


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).double()


def test_generate_answers_batched_equals_one_at_a_time():
    tokenizer = builtin.byte_level_tokenizer()
    model = tiny_llama(len(tokenizer))
    rows = builtin.builtin_squad_records("validation", num_examples=6)
    formatter = SquadFormatter(tokenizer, max_seq_len=1024)
    prompts, references = formatter.eval_prompts(rows, max_new_tokens=5)
    assert [qid for qid, _ in prompts] == [r["id"] for r in rows] and len({len(p) for _, p in prompts}) > 1
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=4)
    single = generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=1)
    assert batched == single and set(batched) == set(references)
    for answer in batched.values():
        assert len(answer) <= 5  # a byte tokenizer: at most one character per new token
    metrics = squad_metrics(batched, references)
    assert 0.0 <= metrics["f1"] <= 100.0 and metrics["count"] == 6
    assert model.training  # restored after generation


def test_eval_prompts_leave_room_for_the_answer():
    tokenizer = builtin.byte_level_tokenizer()
    rows = builtin.builtin_squad_records("validation", num_examples=30)
    formatter = SquadFormatter(tokenizer, max_seq_len=160)
    prompts, references = formatter.eval_prompts(rows, max_new_tokens=32)
    assert all(len(p) <= 160 - 32 for _, p in prompts) and len(prompts) == len(references) > 0
    for (qid, prompt), row in zip(prompts, [r for r in rows if r["id"] in references]):
        assert row["answers"]["text"][0] in tokenizer.decode(prompt), "the cut context keeps the answer"


def favour(model, token_id: int):
    """Make `token_id` the greedy choice everywhere (a large logit bump after the LM head)."""
    bump = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    bump[token_id] = 1e4
    return model.lm_head.register_forward_hook(lambda module, args, output: output + bump)


def test_generate_answers_stops_at_eos_or_max_new_tokens():
    tokenizer = builtin.byte_level_tokenizer()
    model = tiny_llama(len(tokenizer))
    prompts = [("a", tokenizer("Question one?")["input_ids"]), ("b", tokenizer("Q2?")["input_ids"])]
    handle = favour(model, tokenizer.eos_token_id)
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=8) == {"a": "", "b": ""}
    handle.remove()
    favour(model, tokenizer.convert_tokens_to_ids("x"))
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=7) == {"a": "x" * 7, "b": "x" * 7}
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_answers(model, tokenizer, prompts, max_new_tokens=0)
