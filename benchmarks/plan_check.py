"""Planned against measured memory: every end-to-end row's torch.cuda.max_memory_allocated beside
the planner's peak for the same run (benchmarks/plan_e2e.json, planned on a CPU by
`python -m benchmarks.plan_tables --part harness`: the harness's shapes, depths, bf16 weights and
batches).

    python -m benchmarks.plan_check RESULTS_DIR      (benchmarks/gpu.sh runs it after the e2e rows)

Writes RESULTS_DIR/plan_check.md (and prints it): model, mode, provider, measured and planned GiB
and the planner's error. Rows the planner has no plan for (other shapes, the liger provider)
are listed as such.
"""

from __future__ import annotations

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = pathlib.Path(argv[0] if argv else HERE / "results")
    planned = {(r["model"], r["mode"], r["provider"], r["seq"], r["rows"]): r
               for r in json.loads((HERE / "plan_e2e.json").read_text())}
    lines = ["# Planned against measured peak memory (e2e rows)", "",
             "| model | mode | provider | measured GiB | planned GiB | planned - measured |", "|---|---|---|---:|---:|---:|"]
    for path in sorted(out_dir.glob("*.jsonl")):
        for text in path.read_text().splitlines():
            row = json.loads(text) if text.strip() else {}
            if row.get("op") != "e2e" or row.get("smoke") or row.get("peak_gib") is None:
                continue
            shape = row.get("shape", {})
            key = (row["model"], row["mode"], row["provider"], shape.get("seq"), shape.get("rows"))
            plan = planned.get(key, {}).get("planned_gib")
            error = f"{100 * (plan - row['peak_gib']) / row['peak_gib']:+.1f}%" if plan else "no plan"
            lines.append(f"| {row['model']} | {row['mode']} | {row['provider']} | {row['peak_gib']} | "
                         f"{plan if plan else ''} | {error} |")
    text = "\n".join(lines) + "\n"
    (out_dir / "plan_check.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
