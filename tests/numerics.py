"""The tolerance rule for kernel tests (DESIGN.md; flash-attention's rule).

A kernel is compared with the float64 reference ("truth"). Its relative error
    err(kernel) = ||kernel - truth|| / ||truth||
must stay within FACTOR times the error eager torch makes on the same inputs in the same dtype
(the reference run without upcasting the inputs), with the dtype's unit roundoff as the floor
so that an exactly-rounded eager result does not demand the impossible.

FACTOR = 2 unless a test states another multiple and why.
"""

from __future__ import annotations

import torch

FACTOR = 2.0


def rel_err(a: torch.Tensor, truth: torch.Tensor) -> float:
    a = a.double()
    truth = truth.double()
    assert torch.isfinite(a).all(), "non-finite values"
    denom = truth.norm().item()
    diff = (a - truth).norm().item()
    return diff / denom if denom > 0 else diff


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def assert_within_eager(name: str, kernel: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor,
                        dtype: torch.dtype, factor: float = FACTOR) -> None:
    assert kernel.shape == truth.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(truth.shape)}"
    k_err = rel_err(kernel, truth)
    e_err = rel_err(eager, truth)
    bound = factor * max(e_err, unit_roundoff(dtype))
    assert k_err <= bound, (
        f"{name}: kernel rel. error {k_err:.3e} > {factor} x max(eager {e_err:.3e}, "
        f"unit roundoff {unit_roundoff(dtype):.1e}) in {dtype}"
    )
