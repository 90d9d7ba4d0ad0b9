"""The built-in default: a synthetic SQuAD-format dataset and a byte-level tokenizer, both made here.

For the main job on a fresh machine with no model hub. Every word comes from the lists in this
file (names and towns are built from made-up syllables), so the repository holds no third-party
text. Each example is a short story of 2-5 fact sentences about one to three invented people, and
a question whose answer is an exact span of the story; distractor facts of the same kind about
other people make the model read the name, not just the question type. Generation is seeded and
fast (a few thousand examples in a few tens of milliseconds).

The tokenizer is byte-level (256 byte tokens + a few special tokens, no merges): it needs no
training data and no download, encodes any text, and is saved with the run like any
`PreTrainedTokenizerFast` (`tokenizer.save_pretrained(dir)`).
"""

from __future__ import annotations

import random

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "k", "th"]
_TOWN_ENDINGS = ["ford", "holm", "vale", "mere", "stead", "wick", "port", "bury", "dell", "reach"]
_JOBS = ["baker", "carpenter", "pilot", "teacher", "gardener", "weaver", "potter", "sailor", "doctor",
         "painter", "miller", "tailor", "engineer", "librarian", "farmer", "chemist"]
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "grey", "white", "black", "brown", "pink"]
_ANIMALS = ["cats", "dogs", "goats", "horses", "rabbits", "parrots", "ducks", "sheep", "hens", "tortoises"]
_INSTRUMENTS = ["flute", "violin", "drum", "harp", "trumpet", "piano", "cello", "guitar", "oboe"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _person(rng: random.Random) -> str:
    return f"{_word(rng, rng.randint(1, 2)).capitalize()} {_word(rng, rng.randint(2, 3)).capitalize()}"


def _town(rng: random.Random) -> str:
    return (_word(rng, rng.randint(1, 2)) + rng.choice(_TOWN_ENDINGS)).capitalize()


# A fact kind: (sentence templates, question templates, answer slot). Slots in {braces} are filled
# per fact; the answer slot's value is the span the question asks for.
_FACTS = {
    "birthplace": (["{name} was born in {town}.", "The town of {town} is where {name} was born."],
                   ["Where was {name} born?", "In which town was {name} born?"], "town"),
    "birth_year": (["{name} was born in the year {year}.", "In {year}, {name} was born."],
                   ["In which year was {name} born?", "When was {name} born?"], "year"),
    "job": (["{name} works as a {job}.", "By trade, {name} is a {job}."],
            ["What does {name} work as?", "What is the trade of {name}?"], "job"),
    "colour": (["The favourite colour of {name} is {colour}.", "{name} likes the colour {colour} best."],
               ["What is the favourite colour of {name}?", "Which colour does {name} like best?"], "colour"),
    "pets": (["{name} keeps {count} {animal} at home.", "At home, {name} looks after {count} {animal}."],
             ["How many {animal} does {name} keep?", "How many {animal} does {name} look after?"], "count"),
    "move_date": (["{name} moved to {town} on {date}.", "On {date}, {name} arrived in {town} to stay."],
                  ["When did {name} move to {town}?", "On what date did {name} arrive in {town}?"], "date"),
    "instrument": (["{name} plays the {instrument}.", "Every evening {name} practises the {instrument}."],
                   ["Which instrument does {name} play?", "What does {name} practise every evening?"], "instrument"),
    "friend": (["{name} is an old friend of {other}.", "{name} and {other} have been friends for years."],
               ["Who is an old friend of {name}?", "Who has been friends with {name} for years?"], "other"),
}


def _slots(rng: random.Random, name: str) -> dict[str, str]:
    return {
        "name": name,
        "town": _town(rng),
        "year": str(rng.randint(1850, 2015)),
        "job": rng.choice(_JOBS),
        "colour": rng.choice(_COLOURS),
        "count": rng.choice(_NUMBER_WORDS + [str(n) for n in range(13, 40)]),
        "animal": rng.choice(_ANIMALS),
        "date": f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1850, 2015)}",
        "instrument": rng.choice(_INSTRUMENTS),
        "other": _person(rng),
    }


def _example(rng: random.Random, qid: str, unanswerable: bool) -> dict:
    people = [_person(rng) for _ in range(rng.randint(1, 3))]
    # Distinct (person, fact kind) pairs, so that no question has two conflicting answers.
    pairs = [(person, kind) for person in people for kind in _FACTS]
    chosen = rng.sample(pairs, min(rng.randint(2, 5), len(pairs)))
    sentences: list[str] = []
    facts: list[tuple[str, str, dict[str, str], int]] = []  # (kind, template, slots, sentence offset)
    offset = 0
    for person, kind in chosen:
        slots = _slots(rng, person)
        template = rng.choice(_FACTS[kind][0])
        sentence = template.format(**slots)
        facts.append((kind, template, slots, offset))
        sentences.append(sentence)
        offset += len(sentence) + 1
    context = " ".join(sentences)
    kind, template, slots, sentence_start = rng.choice(facts)
    questions, answer_slot = _FACTS[kind][1], _FACTS[kind][2]
    if unanswerable:
        # Ask about someone the story never mentions: the answer is not in the context.
        slots = dict(slots, name=_person(rng))
        return {"id": qid, "title": slots["name"], "context": context,
                "question": rng.choice(questions).format(**slots), "answers": {"text": [], "answer_start": []}}
    answer = slots[answer_slot]
    # The answer starts where its slot sits in the template (found from the template, not by
    # searching the text, so that a value that also occurs earlier cannot be picked by mistake).
    answer_start = sentence_start + len(template.split("{" + answer_slot + "}")[0].format(**slots))
    assert context[answer_start : answer_start + len(answer)] == answer
    return {"id": qid, "title": slots["name"], "context": context,
            "question": rng.choice(questions).format(**slots),
            "answers": {"text": [answer], "answer_start": [answer_start]}}


def builtin_squad_records(
    split: str = "train", *, num_examples: int | None = None, seed: int = 0, unanswerable_fraction: float = 0.0
) -> list[dict]:
    """Synthetic SQuAD-format rows (`id, title, context, question, answers{text[], answer_start[]}`).

    `train` (4,000 by default) and `validation` (500) come from different seeds, so no story is
    shared. `unanswerable_fraction` > 0 adds SQuAD v2.0-style questions with no answer.
    """
    sizes = {"train": 4000, "validation": 500}
    if split not in sizes:
        raise ValueError(f"unknown split {split!r} for the built-in dataset: use one of {sorted(sizes)}")
    if not 0.0 <= unanswerable_fraction < 1.0:
        raise ValueError(f"unanswerable_fraction must be in [0, 1), got {unanswerable_fraction}")
    n = sizes[split] if num_examples is None else num_examples
    rng = random.Random(f"fastft-builtin-{split}-{seed}")
    return [
        _example(rng, f"builtin-{split}-{i:05d}", rng.random() < unanswerable_fraction) for i in range(n)
    ]


def builtin_squad(split: str = "train", **kwargs):
    """The built-in dataset as a `datasets.Dataset` with the hub `squad` columns."""
    import datasets

    return datasets.Dataset.from_list(builtin_squad_records(split, **kwargs))


# A minimal chat template, written for fastft: "<|role|>\n" + content + eos, one line per message;
# the generation prompt opens an assistant turn. Rendering a conversation one message longer only
# appends text (prefix-stable), which the SFT formatter relies on to place the loss mask exactly.
SIMPLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

BYTE_TOKENIZER_SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]


def byte_level_tokenizer():
    """A `PreTrainedTokenizerFast` over raw UTF-8 bytes: ids 0-5 are the special tokens
    (bos, eos, pad, and the chat roles), 6-261 the 256 bytes. Adds BOS; has a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(BYTE_TOKENIZER_SPECIAL_TOKENS)}
    vocab.update({symbol: len(BYTE_TOKENIZER_SPECIAL_TOKENS) + i for i, symbol in enumerate(byte_symbols)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(BYTE_TOKENIZER_SPECIAL_TOKENS)
    backend.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", vocab["<|bos|>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=BYTE_TOKENIZER_SPECIAL_TOKENS[3:],
    )
    tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    return tokenizer
