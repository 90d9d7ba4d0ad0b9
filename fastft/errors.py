"""One error type for bad user input that is not the config itself: a data file, a run folder, a
checkpoint. It reads as one line, like a compiler's: where (file, and line for JSON lines), which
field or column, what is wrong, and the fix:

    data/train.jsonl:3: data.source: line 3 is not valid JSON (Expecting ',' delimiter, column 97). Fix: ...

A leaf module (it imports nothing of fastft), so that fastft.data, rundir and checkpoint can all
raise it and `fastft train` (fastft/cli.py) turns it into that line and exit status 2. Errors of
libraries (datasets, torch, the OS) are caught where they arise, next to the file they concern,
and re-raised as an InputError: only there is it known which file and field they are about.
"""

from __future__ import annotations


def one_line(text: object) -> str:
    """`text` with its whitespace runs (newlines too) made single spaces: library messages are
    often several lines, and the CLI promises one."""
    return " ".join(str(text).split())


class InputError(ValueError):
    """Bad input named by its parts: `problem` (what is wrong), `file`, `line` (1-based, JSON
    lines), `field` (a config field such as data.source, or a column), `fix` (what to do).
    A ValueError, so that callers catching the loaders' ValueErrors still do."""

    def __init__(self, problem: str, *, file: object = None, line: int | None = None, field: str | None = None,
                 fix: str | None = None):
        self.problem, self.line, self.field, self.fix = one_line(problem), line, field, fix
        self.file = None if file is None else str(file)
        super().__init__(str(self))

    def __str__(self) -> str:
        where = (self.file or "") + (f":{self.line}" if self.line is not None and self.file else "")
        text = (f"{where}: " if where else "") + (f"{self.field}: " if self.field else "") + self.problem
        if self.fix:
            text = text.rstrip(".") + ". Fix: " + self.fix
        return one_line(text)

    def __reduce__(self):
        # Keyword-only parts: the default (cls, self.args) would not rebuild it, and torchrun's rank 0
        # broadcasts its run-folder decision, an InputError included, to the other ranks by pickling.
        return (_rebuild, (type(self), self.problem, self.file, self.line, self.field, self.fix))


def _rebuild(cls, problem, file, line, field, fix):
    return cls(problem, file=file, line=line, field=field, fix=fix)


class MissingInput(InputError, FileNotFoundError):
    """An input file or folder that does not exist (also a FileNotFoundError, as before)."""
