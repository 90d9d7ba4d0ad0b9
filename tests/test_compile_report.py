"""Every kernel launch configuration compiles for the GPU, here on the CPU (benchmarks/compile_report.py).

The default suite compiles every configuration the host code picks at the benchmark shapes for
sm_90 (H100/H200) and fails on a compile error, any register spill (ptxas's spill stores/loads)
or shared memory above the limit; it also fails when the committed benchmarks/COMPILE.md no
longer lists the configurations the code launches. sm_80 and sm_100 are a slow test. Results
are cached per configuration (benchmarks/compile_report.py --cache), so a rerun compiles only
what changed. Without an NVIDIA backend in the installed triton the compile tests skip.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import compile_report as report

ROOT = pathlib.Path(__file__).resolve().parent.parent
MISSING = report.nvidia_backend_missing()
needs_backend = pytest.mark.skipif(MISSING is not None, reason=f"cannot compile for NVIDIA GPUs: {MISSING}")
OPS = {"rms_norm", "layer_norm", "fused_linear_cross_entropy", "lora_linear", "lora_mlp", "lora_dropout"}


def _compile(tmp_path, targets: str, *extra: str) -> list[dict]:
    """Run the report in a fresh process: the kernels must be built for the GPU, not for the
    interpreter this test process runs them in."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--targets", targets, "--check",
                           "--json", str(out), "--out", str(tmp_path / "COMPILE.md"), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def _assert_clean(rows: list[dict], targets: set[int]) -> None:
    assert {r["op"] for r in rows} == OPS
    assert {r["target"] for r in rows} == targets
    for r in rows:
        assert not r["problems"], (r["kernel"], r["launch"], r["target"], r["problems"])
        assert r["result"]["spill_stores"] == r["result"]["spill_loads"] == 0
        assert sum(r["result"]["loads"].values()) > 0, f"{r['kernel']}: no global loads in its SASS"


@needs_backend
def test_every_configuration_compiles_for_sm90_without_spills(tmp_path):
    rows = _compile(tmp_path, "90", "--committed", str(ROOT / "benchmarks" / "COMPILE.md"))
    _assert_clean(rows, {90})
    # the memory-bound kernels keep enough warps resident to have loads in flight
    low = [(r["kernel"], r["launch"], r["occupancy"]) for r in rows if r["low_occupancy"]]
    assert not low, low


@needs_backend
@pytest.mark.slow
def test_every_configuration_compiles_for_sm80_and_sm100(tmp_path):
    _assert_clean(_compile(tmp_path, "80,100"), {80, 100})


def test_occupancy_follows_the_register_file_and_warp_limits():
    h100 = report.ARCHES[90]

    def occ(regs, warps, smem=0):
        return report.occupancy({"regs": regs, "num_warps": warps, "shared_static": 0, "shared_dynamic": smem},
                                h100)

    assert occ(128, 8) == 0.25       # 4096 registers a warp: 16 warps a SM, two programs of 8
    assert occ(64, 32) == 0.5        # one 1024-thread program
    assert occ(32, 16) == 1.0
    assert occ(255, 4) == 0.125      # 256 a thread, rounded to the allocation unit
    assert occ(32, 4, smem=100 * 1024) == 2 * 4 / 64  # two programs' shared memory fit a SM


def test_load_widths_read_from_sass():
    sass = """
        /*0090*/  LDG.E.128 R4, desc[UR4][R2.64] ;
        /*00a0*/  LDG.E.64 R8, desc[UR4][R6.64] ;
        /*00b0*/  LDG.E R10, desc[UR4][R6.64] ;
        /*00c0*/  LDG.E.U16 R11, desc[UR4][R6.64] ;
        /*00d0*/  LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R4.64] ;
        /*00e0*/  STG.E.128 desc[UR4][R2.64], R4 ;
    """
    assert report.load_widths(sass) == {128: 2, 64: 1, 32: 1, 16: 1}
    assert report.vector_share({128: 1, 32: 4}) == 0.5


def test_problems_are_spills_errors_and_shared_memory():
    h100 = report.ARCHES[90]
    fine = {"spill_stores": 0, "spill_loads": 0, "shared_static": 0, "shared_dynamic": 1024}
    assert report.problems(fine, h100) == []
    assert report.problems({**fine, "spill_stores": 8}, h100) == ["spills 8 B stores / 0 B loads"]
    assert "shared memory" in report.problems({**fine, "shared_dynamic": 300 * 1024}, h100)[0]
    assert report.problems({"error": "boom"}, h100) == ["compile error: boom"]


def test_every_op_has_cases_at_the_benchmark_shapes():
    cases = report.cases()
    assert {c.op for c in cases} == OPS
    norm_h = {dict(c.label)["H"] for c in cases if c.op == "rms_norm"}
    assert norm_h == set(report.NORM_HIDDEN)
    assert {dict(c.label)["V"] for c in cases if c.op == "fused_linear_cross_entropy"} == set(report.FLCE_VOCAB)
    assert {dict(c.label)["r"] for c in cases if c.op == "lora_mlp"} == set(report.LORA_RANKS)
