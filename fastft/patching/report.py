"""PatchReport: what `fastft.patch` replaced, with what, and what it left alone and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class PatchEntry:
    kind: str          # "rms_norm", "layer_norm", "cross_entropy", "attention", "lora"
    module: str        # the module's name in the model ("" for the model itself)
    original: str      # the class it had
    replacement: str   # what runs now, or "" when left alone
    reason: str = ""   # why it was left alone, or what spec was chosen

    @property
    def patched(self) -> bool:
        return bool(self.replacement)


@dataclass
class PatchReport:
    model: str
    entries: list[PatchEntry] = field(default_factory=list)

    def add(self, kind: str, module: str, original: str, replacement: str = "", reason: str = "") -> None:
        self.entries.append(PatchEntry(kind, module, original, replacement, reason))

    def patched(self, kind: str | None = None) -> list[PatchEntry]:
        return [e for e in self.entries if e.patched and (kind is None or e.kind == kind)]

    def skipped(self, kind: str | None = None) -> list[PatchEntry]:
        return [e for e in self.entries if not e.patched and (kind is None or e.kind == kind)]

    def count(self, kind: str) -> int:
        return len(self.patched(kind))

    def rows(self) -> list[tuple[str, str, str, int, str]]:
        """(kind, original class, replacement or 'kept', count, reason) grouped."""
        grouped = Counter((e.kind, e.original, e.replacement or "kept", e.reason) for e in self.entries)
        return [(kind, orig, repl, n, reason) for (kind, orig, repl, reason), n in grouped.items()]

    def __str__(self) -> str:
        rows = self.rows()
        header = ("kind", "module class", "now", "count", "note")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
        lines = [f"fastft patch report: {self.model}"]
        for r in [header, *rows]:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if not rows:
            lines.append("(nothing found to patch)")
        return "\n".join(lines)
