"""Every kernel launch configuration compiles for the GPU, here on the CPU (benchmarks/compile_report.py).

The default suite compiles for sm_90 (H100/H200) every kernel family at the launch choices the
host code makes at the benchmark shapes (`--quick`: the norms in bf16, their fp16 and fp32
variants being the same kernels with other conversions; the 4-bit LoRA ops and MoE at one model
each; about 205 compiles, 95 s on 2 cold, shared cores), and
fails on a compile error, any register spill (ptxas's spill stores/loads), shared memory above
the limit or a memory-bound kernel below 50% occupancy. It also fails unless the committed
benchmarks/COMPILE.md is fresh: it lists every sm_90 configuration the code launches (all
dtypes), was generated from the current kernel sources, and reports no problems, so that the
full sweep (every dtype, sm_80, sm_90, sm_100: the slow test) was run for this code. Results are
cached per configuration (--cache), so a rerun compiles only what changed. Without an NVIDIA
backend in the installed triton the compile tests skip.
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
OPS = {"rms_norm", "layer_norm", "fused_linear_cross_entropy", "lora_linear", "lora_mlp", "lora_dropout",
       "lora_linear_4bit", "lora_mlp_4bit", "moe_experts"}
NO_KERNEL_OPS = {"dequantize_4bit"}  # bitsandbytes' kernel: nothing of fastft's to compile


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
    no_kernel = [r for r in rows if r["kernel"] is None]
    rows = [r for r in rows if r["kernel"] is not None]
    assert {r["op"] for r in rows} == OPS
    assert {r["op"] for r in no_kernel} == NO_KERNEL_OPS and all(r["no_kernel"] for r in no_kernel)
    assert {r["target"] for r in rows} == targets
    for r in rows:
        assert not r["problems"], (r["kernel"], r["launch"], r["target"], r["problems"])
        assert r["result"]["spill_stores"] == r["result"]["spill_loads"] == 0
        assert sum(r["result"]["loads"].values()) > 0, f"{r['kernel']}: no global loads in its SASS"


@needs_backend
def test_every_configuration_compiles_for_sm90_without_spills(tmp_path):
    rows = _compile(tmp_path, "90", "--quick", "--committed", str(ROOT / "benchmarks" / "COMPILE.md"))
    _assert_clean(rows, {90})
    # the memory-bound kernels keep enough warps resident to have loads in flight
    low = [(r["kernel"], r["launch"], r["occupancy"]) for r in rows if r.get("low_occupancy")]
    assert not low, low


@needs_backend
@pytest.mark.slow
def test_every_configuration_compiles_for_every_target(tmp_path):
    _assert_clean(_compile(tmp_path, "80,90,100"), {80, 90, 100})


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
    assert {c.op for c in cases} == OPS | NO_KERNEL_OPS
    norm_h = {dict(c.label)["H"] for c in cases if c.op == "rms_norm"}
    assert norm_h == set(report.NORM_HIDDEN)
    assert {dict(c.label)["V"] for c in cases if c.op == "fused_linear_cross_entropy"} == set(report.FLCE_VOCAB)
    for op in ("lora_mlp", "lora_mlp_4bit", "lora_linear_4bit"):
        assert {dict(c.label)["r"] for c in cases if c.op == op} == set(report.LORA_RANKS)
    assert {dict(c.label)["model"] for c in cases if c.op == "lora_mlp_4bit"} == set(report.QLORA_MODELS)
    deq = [dict(c.label) for c in cases if c.op == "dequantize_4bit"]
    assert {(d["quant"], d["double quant"], d["dtype"]) for d in deq} == {
        (q, n, t) for q in ("nf4", "fp4") for n in (False, True) for t in ("bfloat16", "float32")}
    moe = [dict(c.label) for c in cases if c.op == "moe_experts"]
    assert {d["model"] for d in moe} >= set(report.MOE_MODELS)
    assert {d["expert LoRA r"] for d in moe} == {"none", *[r for r in report.MOE_RANKS if r]}
    assert {d["dtype"] for d in moe} == set(report.MOE_DTYPES)
    quick = {c.op for c in report.cases(quick=True)}
    assert quick == OPS | NO_KERNEL_OPS  # the default test compiles every kernel family


def test_moe_host_code_is_pure_in_capability_and_shapes():
    """The MoE launchers choose from (capability, shapes, dtypes) alone: on meta tensors, with no
    routing values to read, they record what an sm_90 run launches (128-row blocks at 8192 tokens,
    grids at their upper bound), here under the interpreter as anywhere."""
    import torch
    import triton

    from fastft.kernels import grouped_gemm
    from fastft.kernels._common import recording_launches

    hidden, inter, n_exp, top_k = report.MOE_MODELS["Qwen3-30B-A3B"]
    with recording_launches((9, 0), 132) as launches:
        report._run_moe(hidden, inter, n_exp, top_k, 8192, 16, "bfloat16")
    names = {launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else launch.kernel.__name__
             for launch in launches}
    assert names == {"_glu_fwd_kernel", "_grouped_mm_kernel", "_glu_bwd_kernel", "_weight_grad_kernel",
                     "_combine_kernel"}
    slots = 8192 * top_k
    for launch in launches:
        if "BLOCK_E" in launch.meta:  # the tile-walking grouped GEMMs
            assert launch.meta["BLOCK_M"] == 128 and launch.meta["FP32_DOT"] is False
            assert launch.grid[0] == triton.cdiv(slots, 128) + n_exp
            assert launch.meta["num_warps"] == 8 and launch.meta["num_stages"] == 3
    assert grouped_gemm.expert_block_m(None, slots, n_exp) == 64  # the interpreter's own choice
    assert all(a.device.type == "meta" for launch in launches for a in launch.args if isinstance(a, torch.Tensor))


def test_cli_refuses_to_compile_under_the_interpreter(capsys):
    """`fastft bench --compile-report` reaches the report, which will not build the kernels for
    the interpreter this test process runs them in."""
    from fastft.cli import main

    assert os.environ.get("TRITON_INTERPRET") == "1" or pytest.skip("needs the interpreter set (conftest)")
    assert main(["bench", "--compile-report", "--targets", "90", "--out", ""]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err
