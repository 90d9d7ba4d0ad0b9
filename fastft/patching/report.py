"""PatchReport: what `fastft.patch` replaced, with what, and what it left alone and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class PatchEntry:
    kind: str          # "rms_norm", "layer_norm", "cross_entropy", "attention", "recurrent", "lora"
    module: str        # the module's name in the model ("" for the model itself)
    original: str      # the class it had
    replacement: str   # what runs now, or "" when left alone
    reason: str = ""   # why it was left alone, or what spec was chosen

    @property
    def patched(self) -> bool:
        return bool(self.replacement)


@dataclass
class PatchReport:
    """`packing` is the packed probe's verdict (fastft/patching/packed_probe.py): "safe",
    "unsafe: <why>" or "unverified: <why>"; only a "safe" model is trained on packed batches.
    `attention_calls` counts, live, the attention calls of every forward since patching (or
    `reset_counts()`) per (layer, path), e.g. ("model.layers.0.self_attn", "varlen/flash_attn")."""
    model: str
    entries: list[PatchEntry] = field(default_factory=list)
    packing: str = "unverified: not probed"
    attention_calls: Counter = field(default_factory=Counter)
    loss_calls: Counter = field(default_factory=Counter)  # "fused" -> forwards whose loss the fused op computed
    hub_kernels: str = "off"  # transformers' hub kernels: "off", "on (<mode>)" or "off: <why>" (hub_kernels.py)
    hub_entries: list[PatchEntry] = field(default_factory=list)  # what runs on each hub-tagged layer

    @property
    def packing_safe(self) -> bool:
        return self.packing.startswith("safe")  # "safe", "safe (probed on ...)", "safe; only with ..."

    def reset_counts(self) -> None:
        self.attention_calls.clear()
        self.loss_calls.clear()

    def paths(self) -> Counter:
        """Attention (and recurrent mixer) calls per path, over all layers."""
        totals = Counter()
        for (_, path), n in self.attention_calls.items():
            totals[path] += n
        return totals

    def paths_line(self) -> str:
        """One line: the calls of each path and in how many layers, e.g. for the trainer's log."""
        layers: dict[str, set] = {}
        for (layer, path), n in self.attention_calls.items():
            layers.setdefault(path, set()).add(layer)
        totals = self.paths()
        if not totals:
            return "no attention calls through fastft"
        return ", ".join(f"{path} {n} calls in {len(layers[path])} layers" for path, n in sorted(totals.items()))

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
        grouped = Counter((e.kind, e.original, e.replacement or "kept", e.reason)
                          for e in [*self.entries, *self.hub_entries])
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
        lines.append(f"packing: {self.packing}")
        lines.append(f"transformers hub kernels: {self.hub_kernels}")
        return "\n".join(lines)
