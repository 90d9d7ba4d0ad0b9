"""The kernel benchmark scripts run end to end in --smoke mode (tiny shapes), so they cannot rot.

Timings are never asserted: only that every provider and mode produced a row with provenance.
"""

import json

import pytest

from benchmarks.kernels import attention as attention_bench
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


def test_report_renders_smoke_rows(tmp_path):
    from benchmarks import report

    rms_norm_bench.main(["--smoke", "--out", str(tmp_path), "--modes", "full"])
    text = report.main([str(tmp_path), "--smoke"])
    assert "### rms_norm" in text and "| fastft |" in text
    assert (tmp_path / "report.md").read_text().strip() == text.strip()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not yet measured" in report.main([str(empty)])


def test_attention_benchmark_smoke(tmp_path):
    attention_bench.main(["--smoke", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "attention_smoke.jsonl").read_text().splitlines()]
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in ("fastft", "sdpa padded")
                                                          for m in ("fwd", "bwd", "full")}
    assert all("error" not in r and r["real_tokens_per_s"] > 0 for r in rows)


def _moe_smoke(tmp_path, ops):
    from benchmarks.kernels import moe as moe_bench

    moe_bench.main(["--smoke", "--out", str(tmp_path), "--modes", "full",
                    "--providers", "fastft,transformers grouped_mm", "--ops", ",".join(ops)])
    rows = [json.loads(line) for line in (tmp_path / "moe_smoke.jsonl").read_text().splitlines()]
    assert {(r["op"], r["provider"]) for r in rows} == {(o, p) for o in ops for p in ("fastft", "transformers grouped_mm")}
    assert all("error" not in r and r["ms"] > 0 and r["saved_mib"] > 0 for r in rows), rows


def test_moe_benchmark_smoke(tmp_path):
    """The LoRA row (block, PEFT target_parameters, fastft patch, both providers); the rest is slow."""
    _moe_smoke(tmp_path, ["moe_qwen3_30b_a3b_lora"])


@pytest.mark.slow
def test_moe_benchmark_smoke_every_op(tmp_path):
    _moe_smoke(tmp_path, ["moe_qwen3_30b_a3b", "moe_qwen3_30b_a3b_lora", "moe_mixtral_8x7b", "moe_mixtral_8x7b_lora"])


def test_compile_census_smoke(tmp_path):
    """benchmarks/compile_census.py on one architecture for two steps: its rows count what dynamo
    saw (the first step compiles something; every step's counts are there), and the packed rows
    it builds are one row of its fixed length cut into documents."""
    from benchmarks import compile_census

    splits = compile_census._splits(3)
    assert all(sum(s) == compile_census.ROW and len(s) >= 3 for s in splits) and len({tuple(s) for s in splits}) == 3
    out = tmp_path / "census.jsonl"
    assert compile_census.main(["--arch", "Llama", "--steps", "2", "--json", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["arch"] == "Llama" and set(row["whole_model"]) == {"plain", "packed"}
    block = row["per_block"]
    assert len(block["breaks_per_step"]) == len(block["frames_compiled_per_step"]) == 2
    assert block["frames_compiled_per_step"][0] >= 1
