"""The built-in default: a synthetic SQuAD-format dataset and two tokenizers, all made here.

For the main job on a fresh machine with no model hub. Every word comes from the lists in this
file (first names, surnames and town names are built from made-up syllables), so the repository
holds no third-party text. Each example is a short story of 2-5 fact sentences about one to three
invented people, and a question whose answer is an exact span of the story; distractor facts of
the same kinds about the other people make the model read the name, not just the question type.

Honest validation: a person is a (first name, surname) pair and a town a (stem, kind) pair, and
each pair belongs to one split by a fixed hash, so no validation person or town ever appears in
a training story (`split_of`); the stories come from different seeds, and the facts are drawn
afresh for every story, so an answer cannot be remembered from training, only read.

Tokenizers, both built in code (no training data, no download), both `PreTrainedTokenizerFast`
that save with the run like any other (`tokenizer.save_pretrained(dir)`):
- `word_level_tokenizer()`: one token per word or punctuation mark of this file's vocabulary
  (about 1,400 tokens). The default run's: an answer is one to three tokens that the model learns
  to copy from the story within minutes on a CPU, where byte by byte it takes far longer.
- `byte_level_tokenizer()`: 256 bytes + special tokens; encodes any text.
Generation is seeded and fast (20,000 examples in about a second).
"""

from __future__ import annotations

import functools
import random
import re
import zlib

# -- the vocabulary ----------------------------------------------------------------------------------

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "k", "th"]
_TOWN_KINDS = ["Ford", "Holm", "Vale", "Mere", "Stead", "Wick", "Port", "Bury", "Dell", "Reach"]
_JOBS = ["baker", "carpenter", "pilot", "teacher", "gardener", "weaver", "potter", "sailor", "doctor",
         "painter", "miller", "tailor", "engineer", "librarian", "farmer", "chemist"]
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "grey", "white", "black", "brown", "pink"]
_ANIMALS = ["cats", "dogs", "goats", "horses", "rabbits", "parrots", "ducks", "sheep", "hens", "tortoises"]
_INSTRUMENTS = ["flute", "violin", "drum", "harp", "trumpet", "piano", "cello", "guitar", "oboe"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
_YEARS = range(1850, 2016)
_VALIDATION_SHARE = 5  # one (first name, surname) or (stem, kind) pair in 5 is a validation-only one
PEOPLE_PER_STORY = (1, 3)
FACTS_PER_STORY = (2, 5)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _pool(name: str, size: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    """`size` distinct capitalised made-up words, seeded by `name`, none already in `taken`."""
    rng, words = random.Random(f"fastft-builtin-{name}"), []
    while len(words) < size:
        word = _word(rng, rng.randint(*syllables)).capitalize()
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


_TAKEN: set[str] = set()
_FIRST_NAMES = _pool("first-names", 160, (1, 2), _TAKEN)
_SURNAMES = _pool("surnames", 160, (2, 3), _TAKEN)
_TOWN_STEMS = _pool("towns", 120, (1, 2), _TAKEN)


def split_of(*words: str) -> str:
    """The split a person (first name, surname) or a town (stem, kind) belongs to: a fixed hash,
    so that validation names never occur in training stories."""
    return "validation" if zlib.crc32(" ".join(words).encode()) % _VALIDATION_SHARE == 0 else "train"


@functools.lru_cache(maxsize=None)
def _pairs(kind: str, split: str) -> list[tuple[str, str]]:
    """Every person or town of a split, as (first word, second word)."""
    left, right = (_FIRST_NAMES, _SURNAMES) if kind == "person" else (_TOWN_STEMS, _TOWN_KINDS)
    return [(a, b) for a in left for b in right if split_of(a, b) == split]


def _person(rng: random.Random, split: str, avoid=()) -> str:
    pairs = _pairs("person", split)
    while True:
        pair = pairs[rng.randrange(len(pairs))]
        if pair[0] not in avoid and pair[1] not in avoid:
            return " ".join(pair)


def _town(rng: random.Random, split: str) -> str:
    pairs = _pairs("town", split)
    return " ".join(pairs[rng.randrange(len(pairs))])


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
_COUNTS = _NUMBER_WORDS + [str(n) for n in range(13, 40)]


_SLOTS = {  # slot -> (rng, split, people in the story) -> value
    "town": lambda rng, split, people: _town(rng, split),
    "year": lambda rng, split, people: str(rng.choice(_YEARS)),
    "job": lambda rng, split, people: rng.choice(_JOBS),
    "colour": lambda rng, split, people: rng.choice(_COLOURS),
    "count": lambda rng, split, people: rng.choice(_COUNTS),
    "animal": lambda rng, split, people: rng.choice(_ANIMALS),
    "date": lambda rng, split, people: f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.choice(_YEARS)}",
    "instrument": lambda rng, split, people: rng.choice(_INSTRUMENTS),
    "other": lambda rng, split, people: _person(rng, split, avoid={w for p in people for w in p.split()}),
}
_TEMPLATE_SLOTS = {kind: sorted({m for t in sentences + questions for m in re.findall(r"\{(\w+)\}", t)} - {"name"})
                   for kind, (sentences, questions, _) in _FACTS.items()}


def _slots(rng: random.Random, split: str, kind: str, name: str, people: list[str]) -> dict[str, str]:
    """The values of the slots a fact of `kind` about `name` uses."""
    return {"name": name, **{slot: _SLOTS[slot](rng, split, people) for slot in _TEMPLATE_SLOTS[kind]}}


def _example(rng: random.Random, split: str, qid: str, unanswerable: bool) -> dict:
    # One to three people with distinct first names and surnames (so one word tells them apart).
    people: list[str] = []
    for _ in range(rng.randint(*PEOPLE_PER_STORY)):
        people.append(_person(rng, split, avoid={w for p in people for w in p.split()}))
    # Distinct (person, fact kind) pairs, so that no question has two conflicting answers.
    pairs = [(person, kind) for person in people for kind in _FACTS]
    chosen = rng.sample(pairs, min(rng.randint(*FACTS_PER_STORY), len(pairs)))
    sentences: list[str] = []
    facts: list[tuple[str, str, dict[str, str], int]] = []  # (kind, template, slots, sentence offset)
    offset = 0
    for person, kind in chosen:
        slots = _slots(rng, split, kind, person, people)
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
        slots = dict(slots, name=_person(rng, split, avoid={w for p in people for w in p.split()}))
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


SPLIT_SIZES = {"train": 20_000, "validation": 500}


def builtin_squad_records(
    split: str = "train", *, num_examples: int | None = None, seed: int = 0, unanswerable_fraction: float = 0.0
) -> list[dict]:
    """Synthetic SQuAD-format rows (`id, title, context, question, answers{text[], answer_start[]}`).

    `train` (20,000 by default) and `validation` (500) come from different seeds and different
    people and towns (see the module docstring). `unanswerable_fraction` > 0 adds SQuAD
    v2.0-style questions with no answer.
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r} for the built-in dataset: use one of {sorted(SPLIT_SIZES)}")
    if not 0.0 <= unanswerable_fraction < 1.0:
        raise ValueError(f"unanswerable_fraction must be in [0, 1), got {unanswerable_fraction}")
    n = SPLIT_SIZES[split] if num_examples is None else num_examples
    rng = random.Random(f"fastft-builtin-{split}-{seed}")
    return [
        _example(rng, split, f"builtin-{split}-{i:05d}", rng.random() < unanswerable_fraction) for i in range(n)
    ]


@functools.lru_cache(maxsize=8)
def builtin_squad(split: str = "train", **kwargs):
    """The built-in dataset as a `datasets.Dataset` with the hub `squad` columns (made once per
    process for each set of arguments: a Dataset is immutable)."""
    import datasets

    return datasets.Dataset.from_list(builtin_squad_records(split, **kwargs))


# -- tokenizers --------------------------------------------------------------------------------------

# A minimal chat template, written for fastft: "<|role|>\n" + content + eos, one line per message;
# the generation prompt opens an assistant turn. Rendering a conversation one message longer only
# appends text (prefix-stable), which the SFT formatter relies on to place the loss mask exactly.
SIMPLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

BYTE_TOKENIZER_SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
WORD_TOKENIZER_UNK = "<|unk|>"
_WORD = re.compile(r"\w+|[^\w\s]+")  # what tokenizers' `Whitespace` pre-tokenizer splits on


@functools.lru_cache(maxsize=1)
def builtin_vocabulary() -> tuple[str, ...]:
    """Every word and punctuation mark the built-in data and the default SQuAD prompt can contain."""
    from fastft.data.squad import DEFAULT_SQUAD_TEMPLATE

    texts = [DEFAULT_SQUAD_TEMPLATE.format(context="", question="")]
    for sentences, questions, _ in _FACTS.values():
        texts += [re.sub(r"\{\w+\}", " ", t) for t in sentences + questions]
    words = {w for text in texts for w in _WORD.findall(text)}
    words |= {*_FIRST_NAMES, *_SURNAMES, *_TOWN_STEMS, *_TOWN_KINDS, *_JOBS, *_COLOURS, *_ANIMALS,
              *_INSTRUMENTS, *_MONTHS, *_COUNTS, *map(str, _YEARS), *map(str, range(1, 29))}
    return tuple(sorted(words))


def _fast_tokenizer(backend, vocab: dict[str, int]):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

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


def word_level_tokenizer():
    """A `PreTrainedTokenizerFast` with one token per word or punctuation mark of
    `builtin_vocabulary()`: ids 0-5 are the special tokens (bos, eos, pad, the chat roles), 6 the
    unknown word, then the words. Splits on whitespace and punctuation; decodes words joined by
    spaces. Adds BOS; has a chat template. Text outside the vocabulary becomes `<|unk|>`: for
    other data use a real tokenizer (model.tokenizer) or the byte-level one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate([*BYTE_TOKENIZER_SPECIAL_TOKENS, WORD_TOKENIZER_UNK])}
    vocab.update({word: len(vocab) + i for i, word in enumerate(builtin_vocabulary())})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=WORD_TOKENIZER_UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return _fast_tokenizer(backend, vocab)


def byte_level_tokenizer():
    """A `PreTrainedTokenizerFast` over raw UTF-8 bytes: ids 0-5 are the special tokens
    (bos, eos, pad, and the chat roles), 6-261 the 256 bytes. Adds BOS; has a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(BYTE_TOKENIZER_SPECIAL_TOKENS)}
    vocab.update({symbol: len(BYTE_TOKENIZER_SPECIAL_TOKENS) + i for i, symbol in enumerate(byte_symbols)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return _fast_tokenizer(backend, vocab)
