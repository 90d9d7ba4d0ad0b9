"""LayerNorm: y = (x − mean) / std · (offset + w) + b, fused forward and backward with dW, dB.

Forward, per row x of length H (Ba, Kiros & Hinton 2016, "Layer Normalization"), in fp32:
    μ    = mean(x),  rstd = 1 / sqrt(mean((x − μ)²) + eps)
    x̂    = (x − μ) · rstd
    y    = x̂ · (offset + w) + b              offset = 1 gives Nemotron's (1 + w) scale
Backward, with g = dy · (offset + w):
    dx = rstd · (g − mean(g) − x̂ · mean(g · x̂))
    dw = Σ_rows dy · x̂,   db = Σ_rows dy
Saved for backward: x (no copy), mean and rstd [rows] in fp32.

The output is rounded once, to x.dtype, as torch's own layer_norm kernels do (they compute in
fp32 for bf16/fp16 input). Used by Falcon, GPT-NeoX, Phi, StableLM, Starcoder2 (with bias),
Cohere (no bias) and Nemotron (offset 1).

Cost and layout as in rms_norm.py: forward one program per row, 2·N·H·b bytes; backward a
persistent grid whose programs accumulate dw and db in registers over a stride of rows and write
[programs, H] fp32 partials that torch sums (deterministic, no atomics; the split of
triton's python/tutorials/05-layer-norm.py, without its locks).
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


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
                         eps: float = 1e-5, offset: float = 0.0) -> torch.Tensor:
    """Plain-torch LayerNorm in fp32 (float64 stays float64: the tests' truth), rounded once to x.dtype."""
    up = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(up)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * (offset + weight.to(up))
    if bias is not None:
        y = y + bias.to(up)
    return y.to(x.dtype)


@triton.jit
def _layer_norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,   # X, Y [rows, H]; W, B [H]; MEAN, RSTD [rows] fp32
    STRIDE_X, STRIDE_Y, H, eps, offset,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * STRIDE_X + cols, mask=mask, other=0.0).to(tl.float32)   # [BLOCK]
    mean = tl.sum(x, axis=0) / H
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / H + tl.cast(eps, tl.float32))
    y = centered * rstd
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + tl.cast(offset, tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * STRIDE_Y + cols, round_to(y, Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit(do_not_specialize=["ROWS"])
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL,   # [rows, H] x3; W [H]; [rows] x2; partials [programs, H] fp32
    STRIDE_DY, STRIDE_X, STRIDE_DX, ROWS, H, offset,
    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + tl.cast(offset, tl.float32)
    else:
        w = tl.full([BLOCK], 1.0, tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, ROWS, programs):
        row = tl.cast(row, tl.int64)
        x = tl.load(X + row * STRIDE_X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * STRIDE_DY + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        if COMPUTE_DW:
            dw += dy * x_hat
        if COMPUTE_DB:
            db += dy
        g = dy * w
        dx = rstd * (g - tl.sum(g, axis=0) / H - x_hat * (tl.sum(g * x_hat, axis=0) / H))
        tl.store(DX + row * STRIDE_DX + cols, round_to(dx, DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * H + cols, dw, mask=mask)
    if COMPUTE_DB:
        tl.store(DB_PARTIAL + pid * H + cols, db, mask=mask)


# ------------------------------------------------------------------------------------------------
# Host side: launchers (launch choices from kernels/_common.py), the custom ops, the functional API.
# ------------------------------------------------------------------------------------------------
def layer_norm_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, offset: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel: returns (y [rows, H], mean, rstd [rows] fp32)."""
    rows = as_rows(x)
    n_rows, hidden = rows.shape
    y = torch.empty((n_rows, hidden), dtype=x.dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block, num_warps = row_block(capability_of(x.device), hidden)
    if n_rows > 0:
        launch(_layer_norm_fwd_kernel, (n_rows,), rows, weight, bias, y, mean, rstd, rows.stride(0), y.stride(0),
               hidden, eps, offset, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=block,
               num_warps=num_warps)
    return y, mean, rstd


def layer_norm_backward(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                        rstd: Tensor, offset: float, compute_dw: bool, compute_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernel: returns (dx shaped like x, dw, db); an empty tensor for a gradient
    not asked for."""
    rows, dy = as_rows(x), as_rows(dy)
    n_rows, hidden = rows.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    programs = persistent_programs(x.device, n_rows)
    capability = capability_of(x.device)
    block, num_warps = row_block(capability, hidden)
    if wide_row(block, num_warps, accumulators=int(compute_dw) + int(compute_db)):
        norm_dx_wide(dy, rows, weight, mean, rstd, dx, offset)  # kernels/norm_backward.py: dX in chunks, dW and dB
        dw, db = norm_param_grads(dy, rows, mean, rstd, weight if compute_dw else None,
                                  bias if compute_db else None) if compute_dw or compute_db else (None, None)
        return dx, absent(x) if dw is None else dw, absent(x) if db is None else db
    dw_partial = torch.empty((programs, hidden) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((programs, hidden) if compute_db else (1,), dtype=torch.float32, device=x.device)
    if n_rows > 0:
        launch(_layer_norm_bwd_kernel, (programs,), dy, rows, weight, mean, rstd, dx, dw_partial, db_partial,
               dy.stride(0), rows.stride(0), hidden, n_rows, hidden, offset, HAS_WEIGHT=weight is not None,
               BLOCK=block, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, num_warps=num_warps)
    return (dx, sum_partials(dw_partial, n_rows, weight) if compute_dw else absent(x),
            sum_partials(db_partial, n_rows, bias) if compute_db else absent(x))


def _layer_norm_fwd_fake(x, weight, bias, eps, offset):
    n_rows = x.numel() // x.shape[-1]
    return (x.new_empty((n_rows, x.shape[-1])), x.new_empty(n_rows, dtype=torch.float32),
            x.new_empty(n_rows, dtype=torch.float32))


def _layer_norm_bwd_fake(dy, x, weight, bias, mean, rstd, offset, compute_dw, compute_db):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight) if compute_dw else absent(x), torch.empty_like(bias) if compute_db else absent(x))


layer_norm_fwd = kernel_op("layer_norm_fwd", fake=_layer_norm_fwd_fake)(layer_norm_forward)
layer_norm_bwd = kernel_op("layer_norm_bwd", fake=_layer_norm_bwd_fake)(layer_norm_backward)


def _save(ctx, inputs, output):
    x, weight, bias, _, offset = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.offset = offset


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if dy is None:
        return None, None, None, None, None
    compute_dw, compute_db = need[1] and weight is not None, need[2] and bias is not None
    dx, dw, db = layer_norm_bwd(dy, x, weight, bias, mean, rstd, ctx.offset, compute_dw, compute_db)
    return dx, dw if compute_dw else None, db if compute_db else None, None, None


register_autograd(layer_norm_fwd, backward=_backward, save=_save)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None = None, eps: float = 1e-5,
               offset: float = 0.0) -> Tensor:
    """LayerNorm over the last dimension of x (any leading shape), differentiable in x, weight, bias.

    weight=None gives the non-parametric LayerNorm (OLMo 1). Runs torch.ops.fastft.layer_norm_fwd
    (the Triton kernels) on CUDA, on the CPU under TRITON_INTERPRET=1 and on the meta device (its
    fake); the torch reference elsewhere.
    """
    check_row_op_inputs("layer_norm", x, weight=weight, bias=bias)
    if not use_triton(x, weight, bias):
        return layer_norm_reference(x, weight, bias, eps, offset)
    y, _, _ = layer_norm_fwd(x, weight, bias, float(eps), float(offset))
    return y.view(x.shape)  # [rows, H] from the op: never a view of x (kernels/_common.py, as_rows)
