"""Helpers shared by the kernel files: when to launch Triton, and launch geometry.

Nothing here knows about models; kernels/ depends on torch and triton only.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Launch the Triton kernel for these tensors, or fall back to the torch reference?

    On CUDA the kernel compiles; on the CPU it runs only under the interpreter (the test suite
    sets TRITON_INTERPRET=1). Anywhere else the functional API uses the reference so that a
    patched model still runs, slower, on a CPU.
    """
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"}:
        return True
    return devices == {"cpu"} and interpreting()


# Read once at import: TRITON_INTERPRET must be set before triton is imported anyway.
INTERPRETER: tl.constexpr = tl.constexpr(interpreting())


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """x.to(DTYPE), rounding to nearest even as the GPU does.

    The interpreter (triton 3.9) truncates fp32 -> bf16 conversions toward zero, which would put
    a one-sided bias of up to 1 ulp into every bf16 output. Under the interpreter, round the fp32
    bits to the nearest even bf16 first (add 0x7FFF plus the lowest kept bit, clear the low 16
    bits: the standard bit trick; inf and NaN survive it), after which truncation is exact. On
    the GPU the branch is compiled away.
    """
    if INTERPRETER:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device: torch.device, n_rows: int, per_sm: int = 4) -> int:
    """Programs for a grid-stride loop over rows: enough to fill the GPU, and no more.

    Under the interpreter each program costs Python time, so a few suffice.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return max(1, min(n_rows, per_sm * _sm_count(index)))
    return max(1, min(n_rows, 4))


def row_block(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that holds one whole row of n_cols in registers.

    Eight elements per thread keeps loads 16 bytes wide for bf16 and registers in check up to
    hidden size 32768 (32 warps x 32 threads x 32 elements).
    """
    block = triton.next_power_of_2(n_cols)
    num_warps = min(32, max(1, block // 256))
    return block, num_warps


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View x as [rows, last dim] with unit stride along the last dim (copies only if it must).

    The ops' autograd Functions take x as given, work on these rows and return fresh [rows, ...]
    outputs; the functional APIs restore the caller's leading shape outside the Function. A view
    returned from inside a custom Function may not be modified in place by the caller (autograd
    refuses it, since its view+inplace handling would bypass the custom backward), and models do
    write into projection outputs in place (Falcon's attention does).
    """
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_row_op_inputs(op: str, x: torch.Tensor, **params: torch.Tensor | None) -> None:
    """Errors for a row-wise op (a norm): x's dtype, and every per-column parameter 1-D of x's last size."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: unsupported dtype {x.dtype}; use float32, bfloat16 or float16")
    hidden = x.shape[-1]
    for name, t in params.items():
        if t is not None and (t.dim() != 1 or t.shape[0] != hidden):
            raise ValueError(f"{op}: {name} shape {tuple(t.shape)} does not match the last dimension of x "
                             f"{tuple(x.shape)}; pass a 1-D {name} of size {hidden}")


def sum_partials(partial: torch.Tensor | None, n_rows: int, like: torch.Tensor) -> torch.Tensor | None:
    """Reduce a [programs, H] fp32 partial (per-program sums of a parameter's gradient) to like's dtype."""
    if partial is None:
        return None
    return partial.sum(0).to(like.dtype) if n_rows > 0 else torch.zeros_like(like)
