"""The kernel benchmark scripts run end to end in --smoke mode (tiny shapes), so they cannot rot.

Timings are never asserted: only that every provider and mode produced a row with provenance.
"""

import json

import pytest

from benchmarks.kernels import layer_norm as layer_norm_bench
from benchmarks.kernels import rms_norm as rms_norm_bench


@pytest.mark.parametrize("bench,op", [(rms_norm_bench, "rms_norm"), (layer_norm_bench, "layer_norm")])
def test_norm_benchmark_smoke(tmp_path, bench, op):
    bench.main(["--smoke", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / f"{op}_smoke.jsonl").read_text().splitlines()]
    measured = {(r["provider"], r["mode"]) for r in rows if r["op"] == op}
    assert {("fastft", m) for m in ("fwd", "bwd", "full")} <= measured
    assert {("torch", m) for m in ("fwd", "bwd", "full")} <= measured
    assert any(r["op"] == "copy" for r in rows)
    for r in rows:
        assert "error" not in r, r
        for key in ("device", "torch", "triton", "commit", "date"):
            assert r[key], f"missing provenance {key}"
        if r["op"] == op:
            assert r["ms"] > 0 and r["p20_ms"] <= r["ms"] <= r["p80_ms"]
