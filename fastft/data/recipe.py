"""The data section of a run: one config, and the functions that turn it into batches.

    config -> load (hub / file / builtin) -> format + tokenize (SQuAD or SFT) -> batch (packed /
    flat / padded) -> micro-batches for this rank; and, for evaluation, prompts + gold answers.
Each step reports what it did in one line (`DataReport.lines`), for the start-up log.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import ConfigDict, PositiveInt
from pydantic.dataclasses import dataclass

from fastft.data.loaders import SQUAD_FIX, check_columns, load_table
from fastft.data.packing import MODES, PackedBatches
from fastft.data.sft import SFTFormatter
from fastft.data.squad import DEFAULT_SQUAD_TEMPLATE, SquadFormatter, check_template


# The settings of every config section (fastft/config.py's too): an unknown field is an error, a
# field's docstring (the string under it) is its help text, and a number given for a text field
# (YAML reads `--logging.run_dir=2024` as one) is taken as text.
SECTION = ConfigDict(extra="forbid", use_attribute_docstrings=True, coerce_numbers_to_str=True)


@dataclass(config=SECTION)
class DataConfig:
    source: str = "builtin"
    """builtin (fastft's synthetic SQuAD-format data), a hub name (squad, squad_v2), or a .json/.jsonl/.parquet file"""
    format: Literal["squad", "sft"] = "squad"
    """squad (context/question/answers columns) or sft (prompt/response, or messages)"""
    train_split: str = "train"
    eval_split: str = "validation"
    builtin_examples: PositiveInt | None = None
    """source=builtin: training examples generated (null: 20,000; the validation split keeps its 500)"""
    eval_source: str | None = None
    """the evaluation data; null: `source` (a local file is one split: give the eval file here)"""
    max_seq_len: PositiveInt = 1024
    """tokens per packed row, and the longest example (longer contexts are cut around the answer)"""
    template: str = DEFAULT_SQUAD_TEMPLATE
    """squad: the prompt, with {context} and {question} (and optionally {title})"""
    chat: bool = False
    """render prompts with the tokenizer's chat template"""
    system_prompt: str | None = None
    unanswerable_answer: str | None = None
    """squad v2.0: the answer trained for unanswerable questions; null drops them"""
    prompt_column: str = "prompt"
    """sft: the prompt column"""
    response_column: str = "response"
    """sft: the response column"""
    messages_column: str = "messages"
    """sft: the chat-turns column (used when present)"""
    batching: Literal[MODES] = "packed"
    """packed (rows of max_seq_len), flat (one padding-free row of token_budget tokens) or padded"""
    batch_size: PositiveInt = 8
    """rows per micro-batch per process (packed, padded)"""
    token_budget: PositiveInt | None = None
    """flat: tokens per micro-batch (>= max_seq_len)"""
    seed: int = 0
    """the packing plan's shuffle"""
    streaming: bool = False
    """read the source as a stream (hub or files), packing buffer_size documents at a time"""
    buffer_size: PositiveInt = 10_000
    eval_examples: PositiveInt | None = 500
    """questions read from the eval split for EM/F1; null: all"""
    eval_max_new_tokens: PositiveInt = 32
    """greedy generation stops at EOS or after this many tokens"""
    eval_batch_size: PositiveInt = 16

    def __post_init__(self):
        if self.batching == "flat" and self.token_budget is None:
            raise ValueError("data.batching='flat' needs data.token_budget (tokens per micro-batch, >= max_seq_len)")
        if self.format == "squad":
            check_template(self.template)


@dataclasses.dataclass
class DataReport:
    lines: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(self.lines)


def make_formatter(config: DataConfig, tokenizer):
    if config.format == "squad":
        return SquadFormatter(
            tokenizer, max_seq_len=config.max_seq_len, template=config.template, chat=config.chat,
            system_prompt=config.system_prompt, unanswerable_answer=config.unanswerable_answer,
        )
    return SFTFormatter(
        tokenizer, max_seq_len=config.max_seq_len, prompt_column=config.prompt_column,
        response_column=config.response_column, messages_column=config.messages_column,
        chat=config.chat, system_prompt=config.system_prompt,
    )


def check_rows(rows, config: DataConfig, source: str, field: str) -> None:
    """Every column the format reads is in `rows`, with a value in every row: else an InputError
    naming the file, the line (JSON lines) or row, the column and the fix, before any tokenizing
    (the formatters would fail later with a KeyError or a TypeError on None, naming neither)."""
    if config.format == "squad":
        required, what, hint = ("context", "question", "answers"), "SQuAD-format", SQUAD_FIX
    else:
        columns = getattr(rows, "column_names", None) or ()
        pair = (config.prompt_column, config.response_column)
        required = (config.messages_column,) if config.messages_column in columns else pair
        what = "SFT"
        hint = (f"data.format=sft reads {pair[0]!r} and {pair[1]!r} (or {config.messages_column!r}, a list of "
                "{role, content} turns); rename the file's columns, or name yours with --data.prompt_column=... "
                "--data.response_column=... (or --data.messages_column=...)")
    check_columns(rows, required, what, hint, source=source, field=field)


def build_train_batches(config: DataConfig, tokenizer, *, rank: int = 0, world_size: int = 1,
                        field: str = "data.source"):
    """(an iterable of this rank's micro-batches, call `.set_epoch(e)` per epoch; DataReport).
    `field`: the config field that named `config.source`, for error messages."""
    report = DataReport()
    sized = {"num_examples": config.builtin_examples} if config.source == "builtin" and config.train_split == "train" else {}
    rows = load_table(config.source, config.train_split, streaming=config.streaming, field=field, **sized)
    check_rows(rows, config, config.source, field)
    formatter = make_formatter(config, tokenizer)
    examples = formatter.encode(rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = PackedBatches(
        examples, pad_id=pad_id, max_seq_len=config.max_seq_len, mode=config.batching,
        batch_size=config.batch_size, token_budget=config.token_budget, seed=config.seed,
        rank=rank, world_size=world_size, buffer_size=config.buffer_size,
    )
    report.lines.append(f"data: {config.source} [{config.train_split}] as {config.format}")
    if config.streaming:
        report.lines.append("data: streaming; example and packing counts are known after the first pass")
    else:
        report.lines.append("data: " + formatter.report())
        report.lines.append("data: " + batches.describe())
    return batches, report


class BatchStream:
    """`build_train_batches`' micro-batches over epochs, with a position that checkpoints save:
    (epoch, consumed)."""

    def __init__(self, batches, epoch: int = 0, consumed: int = 0):
        self.batches, self.epoch, self.consumed = batches, epoch, consumed
        self._iter = None

    def _start(self):
        self.batches.set_epoch(self.epoch)
        self._iter = iter(self.batches)
        for _ in range(self.consumed):  # resume mid-epoch: the plan is seeded, so this replays it
            next(self._iter)

    def __next__(self) -> dict:
        if self._iter is None:
            self._start()
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch, self.consumed = self.epoch + 1, 0
            self._start()
            batch = next(self._iter)  # an empty epoch raises StopIteration: no data for this rank
        self.consumed += 1
        return batch

    def take(self, n: int) -> list[dict]:
        return [next(self) for _ in range(n)]

    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}


def build_eval_prompts(config: DataConfig, tokenizer):
    """((id, prompt ids) pairs, id -> gold answers) for SQuAD-format evaluation."""
    if config.format != "squad":
        raise ValueError("generation-based evaluation (EM/F1) needs data.format='squad'")
    source, field = (config.eval_source, "data.eval_source") if config.eval_source else (config.source, "data.source")
    rows = load_table(source, config.eval_split, field=field)
    check_rows(rows, dataclasses.replace(config, format="squad"), source, field)
    if config.eval_examples is not None:
        rows = rows.select(range(min(config.eval_examples, len(rows))))
    return make_formatter(config, tokenizer).eval_prompts(rows, max_new_tokens=config.eval_max_new_tokens)
