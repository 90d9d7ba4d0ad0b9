"""Turn benchmark JSON lines into Markdown tables and the issue targets' verdicts.

    python -m benchmarks.report [RESULTS_DIR ...]   (default: benchmarks/results)

Prints the tables and writes RESULTS_DIR/report.md. Only measured rows appear; smoke rows
(tiny shapes, CPU) are left out unless --smoke is given.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections import defaultdict

from benchmarks.harness import RESULTS_DIR


def load_rows(dirs: list[pathlib.Path], smoke: bool) -> list[dict]:
    rows = []
    for d in dirs:
        for path in sorted(d.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("smoke", False) == smoke:
                        rows.append(row)
    return rows


def _shape(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in row.get("shape", {}).items())


def _fmt(v, digits=3):
    return "" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def kernel_tables(rows: list[dict]) -> list[str]:
    out = []
    latest: dict[tuple, dict] = {}
    for r in rows:  # the newest row wins for each (op, shape, mode, provider, device)
        key = (r["op"], _shape(r), r.get("mode"), r["provider"], r.get("device"))
        if key not in latest or r["date"] >= latest[key]["date"]:
            latest[key] = r
    by_op = defaultdict(list)
    for r in latest.values():
        by_op[r["op"]].append(r)
    for op, op_rows in sorted(by_op.items()):
        out.append(f"\n### {op}\n")
        out.append("| shape | mode | provider | ms (p20-p80) | GB/s | TFLOP/s | peak MiB | time / fastft time | device, date |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        fastft = {(_shape(r), r.get("mode")): r for r in op_rows if r["provider"] == "fastft"}
        for r in sorted(op_rows, key=lambda r: (_shape(r), str(r.get("mode")), r["provider"])):
            ref = fastft.get((_shape(r), r.get("mode")))
            ratio = (f"{r['ms'] / ref['ms']:.2f}x" if ref and r.get("ms") and ref.get("ms") and r is not ref else "")
            ms = (f"{r['ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f})" if r.get("ms") is not None
                  else f"error: {r.get('error', '')[:60]}")
            out.append(f"| {_shape(r)} | {r.get('mode', '')} | {r['provider']} | {ms} | {_fmt(r.get('gbps'))} | "
                       f"{_fmt(r.get('tflops'))} | {_fmt(r.get('peak_mib'))} | {ratio} | "
                       f"{r['device']}, {r['date'][:10]} |")
    return out


def targets(rows: list[dict]) -> list[str]:
    """The issue-2 targets, judged from rows of one device (recorded, never asserted)."""
    out = ["\n### Targets (issue 2)\n"]
    copy = [r for r in rows if r["op"] == "copy" and r.get("gbps")]
    for op in ("rms_norm", "layer_norm"):
        for r in rows:
            if r["op"] != op or r["provider"] != "fastft" or r.get("mode") != "full" or not r.get("gbps"):
                continue
            ceiling = max((c["gbps"] for c in copy if c["device"] == r["device"]), default=None)
            liger = next((x for x in rows if x["op"] == op and x["provider"] == "liger" and x.get("mode") == "full"
                          and _shape(x) == _shape(r) and x.get("ms")), None)
            frac = f"{r['gbps'] / ceiling:.0%} of copy bandwidth (target 85%)" if ceiling else "no copy row"
            vs = f"; Liger {liger['ms'] / r['ms']:.2f}x our time (target >= 1)" if liger else "; Liger not measured"
            out.append(f"- {op} full {_shape(r)}: {r['gbps']} GB/s = {frac}{vs}")
    for r in rows:
        if r["op"] != "fused_linear_cross_entropy" or r["provider"] != "fastft" or r.get("mode") != "full":
            continue
        if not r.get("ms"):
            continue
        floor = next((x for x in rows if x["op"] == "matmul3" and _shape(x) == _shape(r) and x.get("ms")), None)
        eager = next((x for x in rows if x["op"] == r["op"] and x["provider"] == "torch" and x.get("mode") == "full"
                      and _shape(x) == _shape(r) and x.get("peak_mib")), None)
        liger = next((x for x in rows if x["op"] == r["op"] and x["provider"] == "liger" and x.get("mode") == "full"
                      and _shape(x) == _shape(r) and x.get("ms")), None)
        parts = [f"- fused_linear_cross_entropy full {_shape(r)}: {r['ms']:.2f} ms"]
        if floor:
            parts.append(f"{r['ms'] / floor['ms']:.2f}x the three matmuls (target <= 1.15)")
        if eager and r.get("peak_mib"):
            parts.append(f"peak {r['peak_mib'] / eager['peak_mib']:.2f}x HF eager's (target <= 0.25)")
        if liger:
            parts.append(f"Liger {liger['ms'] / r['ms']:.2f}x our time (target > 1)")
        out.append("; ".join(parts))
    return out if len(out) > 1 else []


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dirs", nargs="*", type=pathlib.Path, default=[RESULTS_DIR])
    parser.add_argument("--smoke", action="store_true", help="report the smoke rows instead")
    args = parser.parse_args(argv)
    rows = load_rows(args.dirs, args.smoke)
    if not rows:
        text = "No measured results yet (not yet measured on GPU)."
    else:
        text = "\n".join(["## Kernel benchmarks", *kernel_tables([r for r in rows if "ms" in r or "error" in r]),
                          *targets(rows)])
    print(text)
    (args.dirs[0] / "report.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
