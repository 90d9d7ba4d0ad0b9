"""Helpers shared by the kernel files: when to launch Triton, and launch geometry.

Nothing here knows about models; kernels/ depends on torch and triton only.
"""

from __future__ import annotations

import functools
import os

import torch
import triton


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
    """View x as [rows, last dim] with unit stride along the last dim (copies only if it must)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows
