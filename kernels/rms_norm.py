"""RMSNorm: y = x / rms(x) * (offset + w), fused forward and backward with dW.

Forward, per row x of length H (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"):
    rstd = 1 / sqrt(mean(x²) + eps)          computed in fp32
    x̂    = x · rstd
    y    = x̂ · (offset + w)                  offset = 1 gives Gemma's (1 + w) scale
Backward, with g = dy · (offset + w):
    dx = rstd · (g − x̂ · mean(g · x̂))
    dw = Σ_rows dy · x̂
Saved for backward: x (the input itself, no copy) and rstd [rows] in fp32, 4 bytes a row.

Casting modes say where the result is rounded to a low-precision dtype, so that the kernel
reproduces each family's eager module bit-for-bit in its rounding points:
    "llama": x̂ rounded to x.dtype, then multiplied by the weight (HF LlamaRMSNorm:
             `weight * hidden.to(input_dtype)`); output dtype = promote(x.dtype, w.dtype).
    "gemma": everything in fp32, one rounding at the output (HF GemmaRMSNorm); output x.dtype.
    "none":  rstd, x̂ and y each rounded to x.dtype, as a module computing in x.dtype would;
             output x.dtype.
The backward treats the roundings as identity (straight-through), as autograd does.

Cost: the forward reads x and w and writes y: 2·N·H·b bytes (b = bytes per element); the
backward reads x, dy, w and rstd and writes dx and per-program partial dw: 3·N·H·b bytes plus
a [programs, H] fp32 partial that torch sums. Both are memory-bound: the target is the
device-to-device copy bandwidth.

Layout of the work: the forward runs one program per row; the backward runs a persistent grid
(a few programs per SM), each program striding over rows and accumulating its dw in registers,
so that dw needs no atomics and is deterministic (the approach of triton's
python/tutorials/05-layer-norm.py, with the partial sums reduced by torch instead of locks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch import Tensor

from ._common import (absent, as_rows, capability_of, check_row_op_inputs, kernel_op, launch,
                      persistent_programs, register_autograd, round_to, row_block, sum_partials,
                      use_triton)
from .norm_backward import norm_dx_wide, norm_param_grads, wide_row

CASTING_MODES = ("llama", "gemma", "none")
_CASTING_ID = {name: i for i, name in enumerate(CASTING_MODES)}
_LLAMA, _GEMMA, _NONE = 0, 1, 2


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
                       casting: str = "llama") -> torch.Tensor:
    """Plain-torch RMSNorm with the rounding points of each casting mode (see module docstring).
    Upcast to fp32, never down: float64 inputs (the tests' truth) stay float64."""
    _check_casting(casting)
    dtype = x.dtype
    up = torch.promote_types(dtype, torch.float32)
    if casting == "none":
        rstd = torch.rsqrt(x.to(up).pow(2).mean(-1, keepdim=True) + eps).to(dtype)
        return (x * rstd) * (offset + weight.to(up)).to(dtype)
    xf = x.to(up)
    x_hat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        return (x_hat * (offset + weight.to(up))).to(dtype)
    return (offset + weight) * x_hat.to(dtype)


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,            # X [rows, H] (row stride STRIDE_X), W [H], Y [rows, H], RSTD [rows] fp32
    STRIDE_X, STRIDE_Y, H, eps, offset,
    CASTING: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * STRIDE_X + cols, mask=mask, other=0.0).to(tl.float32)   # [BLOCK]
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)                    # [BLOCK]
    scale = w + tl.cast(offset, tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / H
    rstd = 1.0 / tl.sqrt(mean_sq + tl.cast(eps, tl.float32))
    if CASTING == 2:  # "none": every intermediate rounded to x's dtype
        rstd_r = round_to(rstd, X.dtype.element_ty).to(tl.float32)
        x_hat = round_to(x * rstd_r, X.dtype.element_ty).to(tl.float32)
        scale = round_to(scale, X.dtype.element_ty).to(tl.float32)
    elif CASTING == 0:  # "llama": x̂ rounded to x's dtype before the weight
        x_hat = round_to(x * rstd, X.dtype.element_ty).to(tl.float32)
        scale = round_to(scale, W.dtype.element_ty).to(tl.float32)
    else:  # "gemma": all fp32
        x_hat = x * rstd
    tl.store(Y + row * STRIDE_Y + cols, round_to(x_hat * scale, Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit(do_not_specialize=["ROWS"])
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,   # DY, X, DX [rows, H]; W [H]; RSTD [rows]; DW_PARTIAL [programs, H] fp32
    STRIDE_DY, STRIDE_X, STRIDE_DX, ROWS, H, offset,
    CASTING: tl.constexpr, BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    scale = w + tl.cast(offset, tl.float32)
    if CASTING == 2:
        scale = round_to(scale, X.dtype.element_ty).to(tl.float32)
    elif CASTING == 0:
        scale = round_to(scale, W.dtype.element_ty).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, ROWS, programs):
        row = tl.cast(row, tl.int64)
        x = tl.load(X + row * STRIDE_X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * STRIDE_DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if CASTING == 2:
            rstd = round_to(rstd, X.dtype.element_ty).to(tl.float32)
        x_hat = x * rstd
        if COMPUTE_DW:
            if CASTING == 1:
                dw += dy * x_hat
            else:  # the weight multiplied the rounded x̂ in the forward
                dw += dy * round_to(x_hat, X.dtype.element_ty).to(tl.float32)
        g = dy * scale
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / H))
        tl.store(DX + row * STRIDE_DX + cols, round_to(dx, DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * H + cols, dw, mask=mask)


def _check_casting(casting: str) -> None:
    if casting not in _CASTING_ID:
        raise ValueError(f"rms_norm: casting={casting!r} is not one of {CASTING_MODES}; "
                         "use 'llama' (Llama, Mistral, Qwen...), 'gemma' (Gemma: fp32 throughout) or 'none'")


def _casting_id(casting: str, x: Tensor, weight: Tensor) -> int:
    """The CASTING constexpr. With x and the weight in fp32 every mode rounds to fp32, i.e. not at
    all: one compiled kernel (gemma's) serves the three."""
    if x.dtype == weight.dtype == torch.float32:
        return _GEMMA
    return _CASTING_ID[casting]


def _output_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype, casting: str) -> torch.dtype:
    return torch.promote_types(x_dtype, w_dtype) if casting == "llama" else x_dtype


# ------------------------------------------------------------------------------------------------
# Host side: launchers (launch choices from kernels/_common.py), the custom ops, the functional API.
# ------------------------------------------------------------------------------------------------
def rms_norm_forward(x: Tensor, weight: Tensor, eps: float, offset: float, casting: str) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel: returns (y [rows, H], rstd [rows] fp32)."""
    rows = as_rows(x)
    n_rows, hidden = rows.shape
    y = torch.empty((n_rows, hidden), dtype=_output_dtype(x.dtype, weight.dtype, casting), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block, num_warps = row_block(capability_of(x.device), hidden)
    if n_rows > 0:
        launch(_rms_norm_fwd_kernel, (n_rows,), rows, weight, y, rstd, rows.stride(0), y.stride(0), hidden, eps,
               offset, CASTING=_casting_id(casting, x, weight), BLOCK=block, num_warps=num_warps)
    return y, rstd


def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, offset: float, casting: str,
                      compute_dw: bool) -> tuple[Tensor, Tensor]:
    """Launch the backward kernel: returns (dx shaped like x, dw, or an empty tensor without compute_dw)."""
    rows, dy = as_rows(x), as_rows(dy)
    n_rows, hidden = rows.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    programs = persistent_programs(x.device, n_rows)
    capability = capability_of(x.device)
    block, num_warps = row_block(capability, hidden)
    casting_id = _casting_id(casting, x, weight)
    if wide_row(block, num_warps):  # kernels/norm_backward.py: dX in chunks, dW by a column-tiled pass
        norm_dx_wide(dy, rows, weight, None, rstd, dx, offset, rounding=casting_id)  # the ids are _norm_weight's
        if not compute_dw:
            return dx, absent(weight)
        dw, _ = norm_param_grads(dy, rows, None, rstd, weight, None, round_rstd=casting_id == _NONE,
                                 round_x_hat=casting_id != _GEMMA)
        return dx, dw
    dw_partial = torch.empty((programs, hidden) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    if n_rows > 0:
        launch(_rms_norm_bwd_kernel, (programs,), dy, rows, weight, rstd, dx, dw_partial, dy.stride(0),
               rows.stride(0), hidden, n_rows, hidden, offset, CASTING=casting_id, BLOCK=block,
               COMPUTE_DW=compute_dw, num_warps=num_warps)
    return dx, sum_partials(dw_partial, n_rows, weight) if compute_dw else absent(weight)


def _rms_norm_fwd_fake(x, weight, eps, offset, casting):
    n_rows = x.numel() // x.shape[-1]
    return (x.new_empty((n_rows, x.shape[-1]), dtype=_output_dtype(x.dtype, weight.dtype, casting)),
            x.new_empty(n_rows, dtype=torch.float32))


def _rms_norm_bwd_fake(dy, x, weight, rstd, offset, casting, compute_dw):
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        torch.empty_like(weight) if compute_dw else absent(weight)


rms_norm_fwd = kernel_op("rms_norm_fwd", fake=_rms_norm_fwd_fake)(rms_norm_forward)
rms_norm_bwd = kernel_op("rms_norm_bwd", fake=_rms_norm_bwd_fake)(rms_norm_backward)


def _save(ctx, inputs, output):
    x, weight, _, offset, casting = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset, ctx.casting = offset, casting


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    if dy is None:
        return None, None, None, None, None
    compute_dw = ctx.needs_input_grad[1]
    dx, dw = rms_norm_bwd(dy, x, weight, rstd, ctx.offset, ctx.casting, compute_dw)
    return dx, dw if compute_dw else None, None, None, None


register_autograd(rms_norm_fwd, backward=_backward, save=_save)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, offset: float = 0.0, casting: str = "llama") -> Tensor:
    """RMSNorm over the last dimension of x (any leading shape), differentiable in x and weight.

    Runs torch.ops.fastft.rms_norm_fwd (the Triton kernels) on CUDA, on the CPU under
    TRITON_INTERPRET=1 and on the meta device (its fake); the torch reference elsewhere. See the
    module docstring for `offset` and `casting`.
    """
    _check_casting(casting)
    check_row_op_inputs("rms_norm", x, weight=weight)
    if not use_triton(x, weight):
        return rms_norm_reference(x, weight, eps, offset, casting)
    y, _ = rms_norm_fwd(x, weight, float(eps), float(offset), casting)
    return y.view(x.shape)  # [rows, H] from the op: never a view of x (kernels/_common.py, as_rows)
