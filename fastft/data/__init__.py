"""fastft.data: SQuAD and generic SFT formatting, tokenization, packing, collators, SQuAD eval.

    rows = load_squad("builtin")                      # or "squad", or a SQuAD .json/.jsonl/.parquet
    formatter = SquadFormatter(tokenizer, max_seq_len=512)
    examples = formatter.encode(rows); print(formatter.report())
    batches = PackedBatches(examples, pad_id=..., max_seq_len=512, batch_size=8)
    for batch in batches: model(**model_inputs(batch))  # use_cache=False for packed batches

or, from one config: `build_train_batches(DataConfig(...), tokenizer)`.
"""

from fastft.data.builtin import (
    SIMPLE_CHAT_TEMPLATE,
    builtin_squad,
    builtin_squad_records,
    byte_level_tokenizer,
    word_level_tokenizer,
)
from fastft.data.collate import collate_packed, collate_padded, model_inputs, to_device
from fastft.data.loaders import flatten_squad_json, load_sft, load_squad, load_table
from fastft.data.packing import PackedBatches, PackingStats, best_fit_decreasing
from fastft.data.recipe import (BatchStream, DataConfig, DataReport, build_eval_prompts, build_train_batches,
                                 make_formatter)
from fastft.data.sft import SFTFormatter
from fastft.data.squad import DEFAULT_SQUAD_TEMPLATE, SquadFormatter
from fastft.data.squad_eval import exact_match_score, f1_score, generate_answers, normalize_answer, squad_metrics
from fastft.data.tokenize import IGNORE_INDEX

__all__ = [
    "DEFAULT_SQUAD_TEMPLATE", "IGNORE_INDEX", "SIMPLE_CHAT_TEMPLATE",
    "BatchStream", "DataConfig", "DataReport", "PackedBatches", "PackingStats", "SFTFormatter", "SquadFormatter",
    "best_fit_decreasing", "build_eval_prompts", "build_train_batches", "builtin_squad", "builtin_squad_records",
    "byte_level_tokenizer", "word_level_tokenizer", "collate_packed", "collate_padded", "exact_match_score", "f1_score",
    "flatten_squad_json", "generate_answers", "load_sft", "load_squad", "load_table", "make_formatter",
    "model_inputs", "normalize_answer", "squad_metrics", "to_device",
]
