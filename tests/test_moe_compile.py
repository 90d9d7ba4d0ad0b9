"""The MoE kernels compile for sm_90 (H100/H200) at the launch configurations the host code picks at the
benchmark shapes (kernels/moe.py: row_block, launch_blocks), with no register spills: a first GPU run
must not lose its window to a compile failure or a spilling tile. Compiled on the CPU with
triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)); spills read from `ptxas -v`.
The compile runs in a child process without TRITON_INTERPRET (under the interpreter, triton.jit gives
interpreted functions, which the compiler cannot take). Skips when triton has no NVIDIA backend."""

from __future__ import annotations

import inspect
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import pytest
import triton

from fastft.kernels import moe

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
INT_POINTERS = {"X_ROWS", "TOKEN", "SLOT", "TILE_CUM", "OFFSETS", "A_ROWS", "B_ROWS"}
FP32_POINTERS = {"DW_PART", "ROW_W"}
FLOATS = {"lr_scale", "scale"}
SIZES = {"E", "H", "I", "K", "N", "P", "Q", "R"}  # int sizes with capital names

# (name, S = tokens x top-k, E, H, I): the benchmark layers at 8192 tokens.
SHAPES = [("qwen3_30b_a3b", 8192 * 8, 128, 2048, 768), ("mixtral_8x7b", 8192 * 2, 8, 4096, 14336)]


def _compile(kernel, constexprs: dict, unit_stride: str | None, warps: int, stages: int):
    """What the JIT compiles at launch: int arguments equal to 1 (the unit stride) become constexprs,
    pointers and the other ints are multiples of 16 at these shapes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    params = list(inspect.signature(fn.fn).parameters)
    consts = dict(constexprs)
    if unit_stride:
        consts[unit_stride] = 1
    signature, attrs = {}, {}
    for i, name in enumerate(params):
        if name in consts:
            signature[name] = "constexpr"
        elif name.isupper() and name not in SIZES:  # house style: pointers in CAPS
            signature[name] = "*i32" if name in INT_POINTERS else "*fp32" if name in FP32_POINTERS else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
            if name not in FLOATS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    report = subprocess.run([os.path.join(BIN, "ptxas"), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                            capture_output=True, text=True).stderr
    os.unlink(f.name)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)]
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    return registers, spills, compiled.metadata.shared


def _configs():
    """(label, kernel, constexprs, unit stride, warps, stages) as the host code launches them."""
    for name, slots, experts, hidden, inter in SHAPES:
        block_m = moe.row_block("cuda", slots, experts)
        block_e = triton.next_power_of_2(experts)
        for lora in (False, True):
            r = dict(BLOCK_R=16, HAS_LR=lora, BLOCK_E=block_e, BLOCK_M=block_m, FP32_DOT=False)
            bl = moe.launch_blocks("cuda", "glu_fwd", inter, hidden, block_m)
            yield (f"{name} glu_fwd lora={lora}", moe._glu_fwd_kernel,
                   dict(r, ACT=0, BLOCK_N=bl.block_n, BLOCK_K=bl.block_k), "stride_wk", bl.num_warps, bl.num_stages)
            bl = moe.launch_blocks("cuda", "glu_bwd", inter, hidden, block_m)
            yield (f"{name} glu_bwd lora={lora}", moe._glu_bwd_kernel,
                   dict(r, ACT=0, STORE_H=True, BLOCK_N=bl.block_n, BLOCK_K=bl.block_k), "stride_wn", bl.num_warps,
                   bl.num_stages)
            for label, n_out, k_dim, unit, flags in (
                    ("down", hidden, inter, "stride_wk", dict(GATHER=False, SCATTER=True, ROW_SCALE=True, SPLIT=False)),
                    ("dX", hidden, inter, "stride_wn", dict(GATHER=False, SCATTER=True, ROW_SCALE=False, SPLIT=True))):
                bl = moe.launch_blocks("cuda", "mm", n_out, k_dim, block_m)
                yield (f"{name} mm {label} lora={lora}", moe._grouped_mm_kernel,
                       dict(r, **flags, BLOCK_N=bl.block_n, BLOCK_K=bl.block_k), unit, bl.num_warps, bl.num_stages)
        for label, p_dim, q_dim, flags in (("dW_gu", 2 * inter, hidden, dict(GATHER_A=False, GATHER_B=True, ROW_SCALE=False)),
                                           ("dW_d", hidden, inter, dict(GATHER_A=True, GATHER_B=False, ROW_SCALE=True))):
            bl = moe.launch_blocks("cuda", "weight_grad", q_dim, p_dim, block_m)
            yield (f"{name} weight_grad {label}", moe._weight_grad_kernel,
                   dict(flags, BLOCK_P=min(128, triton.next_power_of_2(p_dim)), BLOCK_Q=bl.block_n, BLOCK_M=bl.block_k,
                        FP32_DOT=False), "stride_dq", bl.num_warps, bl.num_stages)


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends and os.path.exists(os.path.join(BIN, "ptxas"))


def problems() -> list[str]:
    out = []
    for label, kernel, constexprs, unit, warps, stages in _configs():
        registers, spills, shared = _compile(kernel, constexprs, unit, warps, stages)
        if any(spills) or shared > 227 * 1024:  # sm_90: 227 KB of shared memory per block
            out.append(f"{label}: registers {registers}, spill bytes {spills}, shared {shared}")
    return out


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton without its NVIDIA backend / ptxas")
def test_moe_kernels_compile_for_sm90_without_spills():
    here = pathlib.Path(__file__).resolve()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(here)], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0 and "COMPILED OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


if __name__ == "__main__":
    found = problems()
    print("\n".join(found) if found else f"COMPILED OK ({sum(1 for _ in _configs())} configurations)")
    sys.exit(1 if found else 0)
