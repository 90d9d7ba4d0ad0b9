"""Loading SQuAD-format and SFT datasets from the hub, from local files, or the built-in data.

`source` is one of:
- "builtin": the synthetic SQuAD-format dataset made by fastft (fastft.data.builtin);
- a path to a file: `.json` in the original SQuAD layout (`version`, `data[].paragraphs[].qas[]`),
  `.json`/`.jsonl` JSON lines, or `.parquet`, the rows having the hub's columns;
- a hub dataset name ("squad", "squad_v2", "org/name"), loaded with `datasets.load_dataset`.
`streaming=True` returns a `datasets.IterableDataset` (files and hub only).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib

import datasets

SQUAD_COLUMNS = ("id", "title", "context", "question", "answers")


def _is_squad_layout(obj) -> bool:
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("data"), list)
        and all(isinstance(article, dict) and "paragraphs" in article for article in obj["data"][:1])
    )


def flatten_squad_json(obj: dict) -> list[dict]:
    """Rows of `id, title, context, question, answers{text[], answer_start[]}` from the original
    SQuAD JSON (v1.1 or v2.0; an `is_impossible` question has no answers, as on the hub)."""
    rows = []
    for article in obj["data"]:
        title = article.get("title", "")
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = [] if qa.get("is_impossible", False) else qa.get("answers", [])
                rows.append({
                    "id": str(qa["id"]),
                    "title": title,
                    "context": context,
                    "question": qa["question"],
                    "answers": {
                        "text": [a["text"] for a in answers],
                        "answer_start": [int(a["answer_start"]) for a in answers],
                    },
                })
    return rows


def load_table(source: str, split: str = "train", *, streaming: bool = False, **builtin_kwargs):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) from `source` (see module doc)."""
    if source == "builtin":
        if streaming:
            raise ValueError("the built-in dataset is generated in memory: use streaming=False")
        from fastft.data.builtin import builtin_squad

        return builtin_squad(split, **builtin_kwargs)
    path = pathlib.Path(os.path.expanduser(source))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            with open(path, encoding="utf-8") as f:
                text = f.read()
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                obj = None  # several JSON values: JSON lines
            if _is_squad_layout(obj):
                rows = flatten_squad_json(obj)
                ds = datasets.Dataset.from_list(rows)
                return ds.to_iterable_dataset() if streaming else ds
            if isinstance(obj, dict):
                raise ValueError(
                    f"{source}: a JSON object that is not in the SQuAD layout (no data[].paragraphs[]); "
                    "give the original SQuAD JSON, or JSON lines with one example per line"
                )
            return datasets.load_dataset("json", data_files=str(path), split="train", streaming=streaming)
        if suffix == ".jsonl":
            return datasets.load_dataset("json", data_files=str(path), split="train", streaming=streaming)
        if suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=streaming)
        raise ValueError(f"{source}: unknown file type {suffix!r}; use .json (SQuAD layout or JSON lines), .jsonl or .parquet")
    if path.suffix.lower() in (".json", ".jsonl", ".parquet") or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"dataset file {source!r} does not exist; check the path, or use source='builtin'")
    from fastft import hub

    online = not hub.offline_by_setting() and hub.hub_reachable()
    try:
        with contextlib.nullcontext() if online else hub.offline_mode():  # the cache only: no retries
            return datasets.load_dataset(source, split=split, streaming=streaming)
    except Exception as error:  # offline, unknown name, unknown split: say what to do instead
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise hub.LoadError(
            f"data.source={source!r} (split {split!r}): cannot load the dataset from "
            + ("the Hugging Face hub" if online else "the local cache only (the hub is not reachable)")
            + f": {reason}. Fixes: point data.source at a local SQuAD .json / .jsonl / .parquet file, use "
            "data.source=builtin, or fill the cache on a machine with network and run with HF_HUB_OFFLINE=1"
        ) from None


def _columns(dataset) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else None


def check_columns(dataset, required: tuple[str, ...], what: str, hint: str) -> None:
    """Raise a clear error when `dataset` lacks any of `required` (skipped when unknown, e.g. some streams)."""
    columns = _columns(dataset)
    if columns is None:
        return
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{what} dataset is missing column(s) {missing}; it has {columns}. {hint}")


def load_squad(source: str = "squad", split: str = "train", *, streaming: bool = False, **builtin_kwargs):
    """SQuAD-format rows (`id, title, context, question, answers{text[], answer_start[]}`)."""
    dataset = load_table(source, split, streaming=streaming, **builtin_kwargs)
    check_columns(
        dataset, ("context", "question", "answers"), f"SQuAD-format ({source})",
        "Expected the hub's squad columns id, title, context, question, answers{text[], answer_start[]}.",
    )
    return dataset


def load_sft(source: str, split: str = "train", *, streaming: bool = False):
    """Generic SFT rows: `prompt` + `response` columns, or a `messages` column of chat turns (the
    column names are checked by `SFTFormatter`, where they can be renamed)."""
    return load_table(source, split, streaming=streaming)
