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
import logging
import os
import pathlib

import datasets

from fastft.errors import InputError, MissingInput

SQUAD_COLUMNS = ("id", "title", "context", "question", "answers")
SQUAD_FIX = ("each row needs context, question and answers{text[], answer_start[]} (the hub's squad columns; "
             "id and title are optional); for prompt/response rows use --data.format=sft")


def _is_squad_layout(obj) -> bool:
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("data"), list)
        and all(isinstance(article, dict) and "paragraphs" in article for article in obj["data"][:1])
    )


def flatten_squad_json(obj: dict, *, source: str | None = None, field: str = "data.source") -> list[dict]:
    """Rows of `id, title, context, question, answers{text[], answer_start[]}` from the original
    SQuAD JSON (v1.1 or v2.0; an `is_impossible` question has no answers, as on the hub). A
    missing key is an InputError naming its place (data[a].paragraphs[p].qas[q]) in `source`."""

    def need(item, key: str, where: str):
        if not isinstance(item, dict) or key not in item:
            raise InputError(f"{where} has no {key!r}", file=source, field=field,
                             fix="the SQuAD layout is data[].paragraphs[].{context, qas[].{id, question, "
                                 "answers[].{text, answer_start}}}; add it, or remove that entry")
        return item[key]

    rows = []
    for a, article in enumerate(obj["data"]):
        title = article.get("title", "")
        for p, paragraph in enumerate(need(article, "paragraphs", f"data[{a}]")):
            context = need(paragraph, "context", f"data[{a}].paragraphs[{p}]")
            for q, qa in enumerate(need(paragraph, "qas", f"data[{a}].paragraphs[{p}]")):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                answers = [] if qa.get("is_impossible", False) else qa.get("answers", [])
                rows.append({
                    "id": str(need(qa, "id", where)),
                    "title": title,
                    "context": context,
                    "question": need(qa, "question", where),
                    "answers": {
                        "text": [need(x, "text", f"{where}.answers[{i}]") for i, x in enumerate(answers)],
                        "answer_start": [int(need(x, "answer_start", f"{where}.answers[{i}]"))
                                         for i, x in enumerate(answers)],
                    },
                })
    return rows


# -- local files: every problem named by file, line and fix ----------------------------------------
#
# A broken JSON line: datasets (pyarrow, then pandas) raises without the file or the line ("Expected
# object or value at position 103", positions within a block). We do not parse the file ourselves
# before datasets on every load: datasets reads the whole file up front anyway (map-style), into its
# cache, so a second pass would double the load of every good file, cached ones included. Only when
# datasets refuses a file do we read it line by line to find the first bad line (json.loads gives
# line and column exactly). A stream is the exception: datasets parses it lazily, so a bad line deep
# in the file would stop the run mid-training, hours in; a stream of a local file is checked line by
# line before the run starts (one pass, constant memory).

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}
JSON_LINES_FIX = "each line must be one JSON object, e.g. {\"context\": ..., \"question\": ..., \"answers\": ...}"


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _json_lines(path: pathlib.Path):
    """(line number, decoded text) of each non-blank line, as the JSON-lines reader counts them."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"line {number} is not UTF-8 text (byte {exc.start + 1} of the line)", file=path,
                                 line=number, fix="save the file as UTF-8") from None
            if text.strip():
                yield number, text


def first_bad_json_line(path: pathlib.Path, field: str = "data.source", *, types: bool = True) -> InputError | None:
    """An InputError naming the first line of a JSON-lines file that is not one JSON object, or
    (`types`) a line where a key's JSON type differs from the one it first had (pyarrow needs one
    type per column: "answer_start": "12" among numbers); None when every line is fine."""
    first_types: dict[str, tuple[str, int]] = {}
    for number, text in _json_lines(path):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return InputError(f"line {number} is not valid JSON ({exc.msg} at column {exc.colno})", file=path,
                              line=number, field=field, fix=f"repair or remove line {number}; {JSON_LINES_FIX}")
        if not isinstance(value, dict):
            return InputError(f"line {number} is a JSON {_json_type(value)}, not an object", file=path, line=number,
                              field=field, fix=f"repair or remove line {number}; {JSON_LINES_FIX}")
        for key, item in _leaves(value) if types else ():
            kind, seen = first_types.setdefault(key, (_json_type(item), number))
            if _json_type(item) != kind:
                return InputError(f"line {number}: {key!r} is a JSON {_json_type(item)}, but a {kind} on line {seen}",
                                  file=path, line=number, field=key,
                                  fix=f"give {key!r} one type in every line (e.g. a number, not a quoted number)")
    return None


def _leaves(value: dict, prefix: str = ""):
    """(key path, value) of a JSON object's non-null values, into nested objects ("answers.text")."""
    for key, item in value.items():
        if isinstance(item, dict):
            yield f"{prefix}{key}", item
            yield from _leaves(item, f"{prefix}{key}.")
        elif item is not None:
            yield f"{prefix}{key}", item


def line_of_row(path: pathlib.Path, row: int) -> int | None:
    """The line number of 0-based `row` of a JSON-lines file (datasets skips blank lines)."""
    for i, (number, _) in enumerate(_json_lines(path)):
        if i == row:
            return number
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs a file it cannot read at ERROR level (to stderr), then raises; we report the
    raise, in one line, so its log line would be a second one."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _refuse_empty(path: pathlib.Path, field: str) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return
    raise InputError("the file is empty" + (" (only whitespace)" if path.stat().st_size else ""), file=path,
                     field=field, fix="give a file with examples in it (JSON lines: one JSON object per line), or "
                                      "point --" + field + "=... at another file, or use --data.source=builtin")


def _load_json_lines(path: pathlib.Path, field: str, streaming: bool):
    # Types are left to datasets here: a stream casts later blocks to the first block's types.
    if streaming and (bad := first_bad_json_line(path, field, types=False)) is not None:
        raise bad
    try:
        with _quiet_datasets():
            return datasets.load_dataset("json", data_files=str(path), split="train", streaming=streaming)
    except Exception as error:
        bad = first_bad_json_line(path, field)
        if bad is not None:
            raise bad from error
        raise InputError(f"datasets cannot read it as JSON lines ({_first_line(error)})", file=path, field=field,
                         fix=JSON_LINES_FIX) from error


def _load_parquet(path: pathlib.Path, field: str, streaming: bool):
    try:
        with _quiet_datasets():
            return datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=streaming)
    except Exception as error:
        raise InputError(f"datasets cannot read it as Parquet ({_first_line(error)})", file=path, field=field,
                         fix="write it again (e.g. Dataset.to_parquet), or give JSON lines") from error


def load_table(source: str, split: str = "train", *, streaming: bool = False, field: str = "data.source",
               **builtin_kwargs):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) from `source` (see module doc).
    A local file that cannot be read is an InputError naming the file (the line, for JSON lines),
    `field` (the config field that named it) and the fix."""
    if source == "builtin":
        if streaming:
            raise ValueError("the built-in dataset is generated in memory: use streaming=False")
        from fastft.data.builtin import builtin_squad

        return builtin_squad(split, **builtin_kwargs)
    path = pathlib.Path(os.path.expanduser(source))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in (".json", ".jsonl", ".parquet"):
            raise InputError(f"unknown file type {suffix!r}", file=source, field=field,
                             fix="use .json (SQuAD layout or JSON lines), .jsonl or .parquet")
        _refuse_empty(path, field)
        if suffix == ".json":
            with open(path, encoding="utf-8") as f:
                text = f.read()
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                first = text.lstrip().split("\n", 1)[0]
                if not _parses(first):  # one JSON document (not JSON lines) with an error in it
                    raise InputError(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
                                     file=source, line=exc.lineno, field=field,
                                     fix="repair the JSON there (the SQuAD layout, or JSON lines with one "
                                         "example per line)") from None
                obj = None  # several JSON values: JSON lines
            if _is_squad_layout(obj):
                rows = flatten_squad_json(obj, source=source, field=field)
                ds = datasets.Dataset.from_list(rows)
                return ds.to_iterable_dataset() if streaming else ds
            if isinstance(obj, dict):
                raise InputError("a JSON object that is not in the SQuAD layout (no data[].paragraphs[])",
                                 file=source, field=field,
                                 fix="give the original SQuAD JSON, or JSON lines with one example per line")
            return _load_json_lines(path, field, streaming)
        if suffix == ".jsonl":
            return _load_json_lines(path, field, streaming)
        return _load_parquet(path, field, streaming)
    if path.is_dir() and path.suffix.lower() in (".json", ".jsonl", ".parquet"):
        raise InputError("is a folder, not a data file", file=source, field=field,
                         fix="give the file inside it, or use --data.source=builtin")
    if path.suffix.lower() in (".json", ".jsonl", ".parquet") or source.startswith((".", "/", "~")):
        raise MissingInput("does not exist", file=source, field=field,
                           fix=f"check the path (a relative one is from {os.getcwd()}), or use --data.source=builtin")
    from fastft import hub

    online = not hub.offline_by_setting() and hub.hub_reachable()
    try:
        with contextlib.nullcontext() if online else hub.offline_mode():  # the cache only: no retries
            return datasets.load_dataset(source, split=split, streaming=streaming)
    except Exception as error:  # offline, unknown name, unknown split: say what to do instead
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise hub.LoadError(
            f"{field}={source!r} (split {split!r}): cannot load the dataset from "
            + ("the Hugging Face hub" if online else "the local cache only (the hub is not reachable)")
            + f": {reason}. Fixes: point {field} at a local SQuAD .json / .jsonl / .parquet file, use "
            "data.source=builtin, or fill the cache on a machine with network and run with HF_HUB_OFFLINE=1"
        ) from None


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _columns(dataset) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else None


def check_columns(dataset, required: tuple[str, ...], what: str, hint: str, *, source: str | None = None,
                  field: str | None = None) -> None:
    """Raise an InputError when `dataset` lacks any of `required` (skipped when unknown, e.g. some
    streams), or when a row has no value in one (JSON lines fill a key missing from some lines
    with null): naming the file and line (or row) when `source` is a local file."""
    columns = _columns(dataset)
    if columns is None:
        return
    path = pathlib.Path(os.path.expanduser(source)) if source else None
    file = source if path is not None and path.is_file() else None
    missing = [c for c in required if c not in columns]
    if missing:
        raise InputError(f"{what} dataset is missing column(s) {missing}; it has {columns}", file=file,
                         field=field if file is None else ", ".join(missing), fix=hint)
    for column in required:
        row = _first_null(dataset, column)
        if row is None:
            continue
        line = line_of_row(path, row) if file and path.suffix.lower() in (".json", ".jsonl") else None
        place = f"line {line}" if line is not None else f"row {row + 1}"
        nulls = _nulls(dataset, column)
        raise InputError(f"{place} has no {column!r} (null or missing; {nulls} row{'s' * (nulls > 1)} in all)",
                         file=file, line=line, field=column, fix=f"add it to every row, or drop those rows; {hint}")


def _first_null(dataset, column: str) -> int | None:
    """The first row with a null `column`, from the Arrow table's null counts (no rows are read
    when there is none); None for streams and for views (select/shuffle) of a table."""
    table = getattr(dataset, "data", None)
    if table is None or getattr(dataset, "_indices", None) is not None:
        return None
    values = table.column(column)
    if values.null_count == 0:
        return None
    import pyarrow.compute as pc

    return pc.index(pc.is_null(values), True).as_py()


def _nulls(dataset, column: str) -> int:
    return dataset.data.column(column).null_count


def load_squad(source: str = "squad", split: str = "train", *, streaming: bool = False, **builtin_kwargs):
    """SQuAD-format rows (`id, title, context, question, answers{text[], answer_start[]}`)."""
    dataset = load_table(source, split, streaming=streaming, **builtin_kwargs)
    check_columns(dataset, ("context", "question", "answers"), f"SQuAD-format ({source})", SQUAD_FIX, source=source,
                  field="data.source")
    return dataset


def load_sft(source: str, split: str = "train", *, streaming: bool = False):
    """Generic SFT rows: `prompt` + `response` columns, or a `messages` column of chat turns (the
    column names are checked by `SFTFormatter`, where they can be renamed)."""
    return load_table(source, split, streaming=streaming)
