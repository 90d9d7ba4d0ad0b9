"""SQuAD and SFT formatting on real samples: answer-only labels, exact boundaries, truncation,
SQuAD v2.0, chat mode, loaders, the built-in dataset and tokenizer, clear errors."""

from __future__ import annotations

import json
import logging
import pathlib

import pytest

from fastft.data import builtin
from fastft.data.loaders import flatten_squad_json, load_squad, load_table
from fastft.data.sft import SFTFormatter
from fastft.data.squad import SquadFormatter

IGNORE = -100
ASSETS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "assets"  # ../shared/assets from the repo root
SQUAD_V1 = ASSETS / "squad" / "squad_v1.1_xquad_en.json"
SQUAD_V2 = ASSETS / "squad" / "squad_v2.0_sample.json"
TOKENIZER_DIRS = {"gpt2": ASSETS / "tokenizers" / "gpt2", "stories260K": ASSETS / "models" / "stories260K"}


def need(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"shared test asset {path} is absent (see ../shared/assets/README.md)")
    return path


@pytest.fixture(scope="module", params=["gpt2", "stories260K", "byte"])
def tokenizer(request):
    if request.param == "byte":
        return builtin.byte_level_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(need(TOKENIZER_DIRS[request.param]))


@pytest.fixture(scope="module")
def gpt2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(need(TOKENIZER_DIRS["gpt2"]))


@pytest.fixture(scope="module")
def squad_v1():
    return load_squad(str(need(SQUAD_V1))).select(range(300))


def split_example(example: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of an encoded example, checking the label layout on the way."""
    ids, labels = example["input_ids"], example["labels"]
    n_prompt = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert all(label == IGNORE for label in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:], "every response token is a target, with its own id"
    return ids[:n_prompt], ids[n_prompt:]


# -- SQuAD on real samples ----------------------------------------------------------------------
def test_squad_labels_are_the_answer_plus_eos(tokenizer, squad_v1):
    formatter = SquadFormatter(tokenizer, max_seq_len=4096)
    encoded = formatter.encode(squad_v1)
    assert len(encoded) == len(squad_v1) == formatter.stats["kept"]
    prompts, _ = formatter.eval_prompts(squad_v1, max_new_tokens=16)
    prompt_of = dict(prompts)
    for example, row in zip(encoded, squad_v1):
        assert example["id"] == row["id"]
        prompt, response = split_example(example)
        assert response[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in response[:-1]
        assert tokenizer.decode(response[:-1]).strip() == row["answers"]["text"][0]
        # Training sees exactly the prompt tokens that generation is given.
        assert prompt == prompt_of[row["id"]]
        assert prompt == tokenizer(formatter.render_prompt(row["context"], row["question"]))["input_ids"]


def test_squad_truncation_cuts_the_context_only(gpt2, squad_v1):
    formatter = SquadFormatter(gpt2, max_seq_len=80)
    encoded = formatter.encode(squad_v1)
    stats = formatter.stats
    assert stats["truncated"] > 100 and stats["kept"] + stats["dropped_too_long"] == stats["examples"] == 300
    for example in encoded:
        assert len(example["input_ids"]) <= 80
    for example, row in zip(encoded, [r for r in squad_v1 if r["id"] in {e["id"] for e in encoded}]):
        prompt, response = split_example(example)
        text = gpt2.decode(prompt)
        answer = row["answers"]["text"][0]
        assert gpt2.decode(response[:-1]).strip() == answer, "the answer is never cut"
        assert text.endswith(f"\nQuestion: {row['question']}\nAnswer:"), "the question is never cut"
        context = text[len("Context: ") : text.index("\nQuestion: ")]
        assert context in row["context"], "the context is cut to a contiguous window"
        assert answer in context, "the window keeps the answer's span"
    line = formatter.report()
    assert f"{stats['truncated']} with the context truncated to 80 tokens" in line


def test_squad_examples_that_cannot_fit_are_dropped_and_counted(gpt2, squad_v1):
    formatter = SquadFormatter(gpt2, max_seq_len=20)
    encoded = formatter.encode(squad_v1)
    assert formatter.stats["dropped_too_long"] > 0
    assert len(encoded) == formatter.stats["kept"] == 300 - formatter.stats["dropped_too_long"]
    assert all(len(e["input_ids"]) <= 20 for e in encoded)
    assert f"{formatter.stats['dropped_too_long']} dropped as too long" in formatter.report()


def test_squad_v2_unanswerable_dropped_or_trained(gpt2):
    rows = load_squad(str(need(SQUAD_V2)))
    impossible = sum(1 for r in rows if not r["answers"]["text"])
    assert impossible == 333
    dropping = SquadFormatter(gpt2, max_seq_len=1024)
    assert len(dropping.encode(rows)) == len(rows) - impossible
    assert dropping.stats["dropped_unanswerable"] == impossible
    training = SquadFormatter(gpt2, max_seq_len=1024, unanswerable_answer="unanswerable")
    encoded = training.encode(rows)
    assert len(encoded) == len(rows)
    answers = [gpt2.decode(split_example(e)[1][:-1]).strip() for e in encoded]
    assert answers.count("unanswerable") == impossible


def test_squad_chat_mode_uses_the_tokenizer_template():
    tokenizer = builtin.byte_level_tokenizer()
    rows = builtin.builtin_squad_records("validation", num_examples=20)
    formatter = SquadFormatter(tokenizer, max_seq_len=1024, chat=True, system_prompt="Answer from the context.")
    for example, row in zip(formatter.encode(rows), rows):
        prompt, response = split_example(example)
        assert tokenizer.decode(prompt).startswith("<|bos|><|system|>\nAnswer from the context.<|eos|>\n<|user|>\nContext: ")
        assert tokenizer.decode(prompt).endswith("<|assistant|>\n")
        assert tokenizer.decode(response) == row["answers"]["text"][0] + "<|eos|>"


def test_squad_chat_mode_falls_back_without_a_template(gpt2, squad_v1, caplog):
    with caplog.at_level(logging.WARNING):
        formatter = SquadFormatter(gpt2, max_seq_len=1024, chat=True)
    assert not formatter.chat and "no chat template" in caplog.text


@pytest.mark.parametrize("template, message", [
    ("Context: {context}\nAnswer:", r"lacks \['\{question\}'\]"),
    ("{context} {question} {answer}", r"unknown field\(s\) \['answer'\]"),
])
def test_bad_templates_are_named(gpt2, template, message):
    with pytest.raises(ValueError, match=message):
        SquadFormatter(gpt2, template=template)


def test_custom_template_with_title(gpt2, squad_v1):
    formatter = SquadFormatter(gpt2, template="[{title}] {context}\nQ: {question}\nA:")
    example = formatter.encode(squad_v1.select(range(1)))[0]
    assert gpt2.decode(split_example(example)[0]).startswith(f"[{squad_v1[0]['title']}] ")


# -- loaders --------------------------------------------------------------------------------------
def test_loaders_agree_on_squad_json_jsonl_and_parquet(tmp_path):
    obj = json.loads(need(SQUAD_V1).read_text(encoding="utf-8"))
    rows = flatten_squad_json(obj)
    assert len(rows) == 1190 and set(rows[0]) == {"id", "title", "context", "question", "answers"}
    for row in rows:  # every answer span checks out against its context
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            assert row["context"][start : start + len(text)] == text
    jsonl = tmp_path / "squad.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[:50]), encoding="utf-8")
    as_json_lines = tmp_path / "squad_lines.json"
    as_json_lines.write_text(jsonl.read_text(encoding="utf-8"), encoding="utf-8")
    parquet = tmp_path / "squad.parquet"
    load_squad(str(jsonl)).to_parquet(str(parquet))
    expected = rows[:50]
    for path in (jsonl, as_json_lines, parquet):
        loaded = load_squad(str(path))
        assert [dict(r) for r in loaded] == expected, path.name
    assert load_squad(str(SQUAD_V1)).num_rows == 1190
    streamed = list(load_squad(str(jsonl), streaming=True))
    assert [dict(r) for r in streamed] == expected


def test_loader_errors_say_what_to_do(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "c", "query": "q"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['question', 'answers'\]"):
        load_squad(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_squad(str(tmp_path / "nope.json"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"version": "1", "rows": []}), encoding="utf-8")
    with pytest.raises(ValueError, match="not in the SQuAD layout"):
        load_table(str(other))
    weird = tmp_path / "data.csv"
    weird.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown file type '.csv'"):
        load_table(str(weird))


# -- the built-in dataset and tokenizer -------------------------------------------------------------
def test_builtin_dataset_answers_are_spans_and_seeded():
    train = builtin.builtin_squad_records("train")
    validation = builtin.builtin_squad_records("validation")
    assert len(train) == 20_000 and len(validation) == 500
    for row in train + validation:
        (text,), (start,) = row["answers"]["text"], row["answers"]["answer_start"]
        assert row["context"][start : start + len(text)] == text
        assert 2 <= row["context"].count(". ") + 1 <= 5
    assert builtin.builtin_squad_records("train", num_examples=50) == train[:50]
    assert builtin.builtin_squad_records("train", num_examples=50, seed=1) != train[:50]
    assert not {r["context"] for r in train} & {r["context"] for r in validation}
    with_unanswerable = builtin.builtin_squad_records("train", num_examples=400, unanswerable_fraction=0.25)
    assert 50 < sum(not r["answers"]["text"] for r in with_unanswerable) < 150
    with pytest.raises(ValueError, match="unknown split 'test'"):
        builtin.builtin_squad_records("test")


def _names(rows) -> set[str]:
    """Every person ("First Last") and town ("Stem Kind") in the stories and questions."""
    import re

    first, towns = set(builtin._FIRST_NAMES), set(builtin._TOWN_STEMS)
    found = set()
    for row in rows:
        for text in (row["context"], row["question"]):
            words = re.findall(r"\w+", text)
            found |= {f"{a} {b}" for a, b in zip(words, words[1:]) if a in first or a in towns}
    return found


def test_builtin_validation_people_and_towns_never_occur_in_training():
    train = _names(builtin.builtin_squad_records("train"))
    validation = _names(builtin.builtin_squad_records("validation"))
    assert len(validation) > 500 and not train & validation
    assert all(builtin.split_of(*name.split()) == "validation" for name in validation)


def test_word_level_tokenizer_covers_the_builtin_data_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = builtin.word_level_tokenizer()
    unk = tokenizer.convert_tokens_to_ids(builtin.WORD_TOKENIZER_UNK)
    rows = builtin.builtin_squad_records("validation") + builtin.builtin_squad_records("train", num_examples=2000)
    for row in rows:
        ids = tokenizer(row["context"] + " " + row["question"])["input_ids"]
        assert unk not in ids and ids[0] == tokenizer.bos_token_id
        answer = row["answers"]["text"][0]
        assert tokenizer.decode(tokenizer(answer, add_special_tokens=False)["input_ids"]) == answer
    assert len(tokenizer) == 7 + len(builtin.builtin_vocabulary()) < 1000
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = rows[0]["context"]
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tokenizer("a qwertyuiop")["input_ids"][-1] == unk  # outside the vocabulary: one unknown word


def test_builtin_source_through_the_loader_and_formatter():
    tokenizer = builtin.byte_level_tokenizer()
    rows = load_squad("builtin", "validation")
    formatter = SquadFormatter(tokenizer, max_seq_len=512)
    encoded = formatter.encode(rows)
    assert len(encoded) == 500 and formatter.stats["truncated"] == 0
    assert "500 read, 500 kept" in formatter.report()


def test_byte_level_tokenizer_round_trips_and_saves(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = builtin.byte_level_tokenizer()
    text = "Héllo,  wörld!\n\tÅ ✓ 12:30"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + len(text.encode("utf-8"))
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert len(tokenizer) == 6 + 256
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.chat_template == builtin.SIMPLE_CHAT_TEMPLATE


# -- generic SFT ----------------------------------------------------------------------------------
def test_sft_prompt_response(gpt2):
    rows = [{"prompt": "Translate to French: cat\nFrench:", "response": " chat"},
            {"prompt": "2 + 2 =", "response": " 4"}]
    formatter = SFTFormatter(gpt2, max_seq_len=64)
    for example, row in zip(formatter.encode(rows), rows):
        prompt, response = split_example(example)
        assert prompt == gpt2(row["prompt"])["input_ids"]
        assert gpt2.decode(response) == row["response"] + gpt2.eos_token


def test_sft_boundary_inside_a_merge_is_exact(gpt2):
    # "gre" + "en" would merge into "green": the response is tokenized apart, labels stay exact.
    formatter = SFTFormatter(gpt2, max_seq_len=64)
    (example,) = formatter.encode([{"prompt": "The colour is gre", "response": "en"}])
    prompt, response = split_example(example)
    assert gpt2.decode(prompt) == "The colour is gre" and gpt2.decode(response[:-1]) == "en"
    assert formatter.stats["boundary_retokenized"] == 1


def test_sft_messages_train_every_assistant_turn():
    tokenizer = builtin.byte_level_tokenizer()
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"}]
    formatter = SFTFormatter(tokenizer, max_seq_len=256)
    (example,) = formatter.encode([{"messages": conversation}])
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(conversation, tokenize=False)
    targets = [t if label != IGNORE else None for t, label in zip(example["input_ids"], example["labels"])]
    spans, current = [], []
    for t in targets + [None]:
        if t is None and current:
            spans.append(tokenizer.decode(current))
            current = []
        elif t is not None:
            current.append(t)
    assert spans == ["Hello<|eos|>", "Blue<|eos|>"]


def test_sft_drops_too_long_and_names_bad_columns(gpt2):
    formatter = SFTFormatter(gpt2, max_seq_len=8)
    assert formatter.encode([{"prompt": "word " * 20, "response": " x"}]) == []
    assert formatter.stats["dropped_too_long"] == 1
    with pytest.raises(ValueError, match=r"columns \['input', 'output'\]: expected 'prompt' and 'response'"):
        formatter.encode([{"input": "a", "output": "b"}])
    renamed = SFTFormatter(gpt2, prompt_column="input", response_column="output")
    assert len(renamed.encode([{"input": "a", "output": " b"}])) == 1
    with pytest.raises(ValueError, match="need a chat template"):
        formatter.encode([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    with pytest.raises(ValueError, match="has no chat template"):
        SFTFormatter(gpt2, chat=True)


def test_streaming_rows_encode_and_pack(tmp_path):
    from fastft.data.packing import PackedBatches

    tokenizer = builtin.byte_level_tokenizer()
    path = tmp_path / "builtin.jsonl"
    rows = builtin.builtin_squad_records("validation", num_examples=60)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    formatter = SquadFormatter(tokenizer, max_seq_len=400)
    stream = formatter.encode(load_squad(str(path), streaming=True), batch_size=16)
    batches = PackedBatches(stream, pad_id=tokenizer.pad_token_id, max_seq_len=400, batch_size=2, buffer_size=25)
    documents = 0
    for batch in batches:
        cu, labels = batch["cu_seq_lens_q"].tolist(), batch["labels"].reshape(-1)
        documents += sum(bool((labels[s:e] != IGNORE).any()) for s, e in zip(cu[:-1], cu[1:]))  # tails have no labels
    assert documents == 60 and batches.stats.documents == 60 and formatter.stats["kept"] == 60


def test_data_config_recipe_end_to_end():
    from fastft.data.recipe import DataConfig, build_eval_prompts, build_train_batches

    tokenizer = builtin.byte_level_tokenizer()
    config = DataConfig(max_seq_len=512, batching="flat", token_budget=2048, eval_examples=8, builtin_examples=3000)
    batches, report = build_train_batches(config, tokenizer, rank=1, world_size=2)
    text = str(report)
    assert "3000 read, 3000 kept" in text and "efficiency" in text and "x 2 rank(s)" in text
    first = next(iter(batches))
    assert first["input_ids"].shape[0] == 1 and first["input_ids"].shape[1] <= 2048
    prompts, references = build_eval_prompts(config, tokenizer)
    assert len(prompts) == len(references) == 8
    with pytest.raises(ValueError, match="needs data.token_budget"):
        DataConfig(batching="flat")
    with pytest.raises(ValueError, match=r"format\n  Input should be 'squad' or 'sft'"):  # pydantic's message
        DataConfig(format="qa")
    with pytest.raises(ValueError, match=r"lacks \['\{question\}'\]"):
        DataConfig(template="{context}")
