"""The data section of a run: one config, and the functions that turn it into batches.

    config -> load (hub / file / builtin) -> format + tokenize (SQuAD or SFT) -> batch (packed /
    flat / padded) -> micro-batches for this rank; and, for evaluation, prompts + gold answers.
Each step reports what it did in one line (`DataReport.lines`), for the start-up log.
"""

from __future__ import annotations

import dataclasses

from fastft.data.loaders import load_table
from fastft.data.packing import MODES, PackedBatches
from fastft.data.sft import SFTFormatter
from fastft.data.squad import DEFAULT_SQUAD_TEMPLATE, SquadFormatter, check_template


@dataclasses.dataclass
class DataConfig:
    source: str = "builtin"  # "builtin", a hub name ("squad", "squad_v2"), or a .json/.jsonl/.parquet path
    format: str = "squad"  # "squad" (context/question/answers) or "sft" (prompt/response or messages)
    train_split: str = "train"
    eval_split: str = "validation"
    eval_source: str | None = None  # defaults to `source` (a local file is one split: give the eval file here)
    max_seq_len: int = 1024
    template: str = DEFAULT_SQUAD_TEMPLATE  # squad: prompt with {context} and {question}
    chat: bool = False  # use the tokenizer's chat template
    system_prompt: str | None = None
    unanswerable_answer: str | None = None  # squad v2.0: None drops unanswerable questions
    prompt_column: str = "prompt"  # sft
    response_column: str = "response"
    messages_column: str = "messages"
    batching: str = "packed"  # "packed" rows of max_seq_len, "flat" (padding-free) or "padded"
    batch_size: int = 8  # rows per micro-batch (packed, padded)
    token_budget: int | None = None  # tokens per micro-batch (flat)
    seed: int = 0
    streaming: bool = False
    buffer_size: int = 10_000  # documents packed together when streaming
    eval_examples: int | None = 500  # None: the whole eval split
    eval_max_new_tokens: int = 32
    eval_batch_size: int = 16

    def __post_init__(self):
        if self.format not in ("squad", "sft"):
            raise ValueError(f"data.format={self.format!r}: use 'squad' or 'sft'")
        if self.batching not in MODES:
            raise ValueError(f"data.batching={self.batching!r}: use one of {MODES}")
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


def build_train_batches(config: DataConfig, tokenizer, *, rank: int = 0, world_size: int = 1):
    """(an iterable of this rank's micro-batches, call `.set_epoch(e)` per epoch; DataReport)."""
    report = DataReport()
    rows = load_table(config.source, config.train_split, streaming=config.streaming)
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


def build_eval_prompts(config: DataConfig, tokenizer):
    """((id, prompt ids) pairs, id -> gold answers) for SQuAD-format evaluation."""
    if config.format != "squad":
        raise ValueError("generation-based evaluation (EM/F1) needs data.format='squad'")
    rows = load_table(config.eval_source or config.source, config.eval_split)
    if config.eval_examples is not None:
        rows = rows.select(range(min(config.eval_examples, len(rows))))
    return make_formatter(config, tokenizer).eval_prompts(rows, max_new_tokens=config.eval_max_new_tokens)
