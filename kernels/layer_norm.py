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

from ._common import (as_rows, check_row_op_inputs, persistent_programs, round_to, row_block, sum_partials,
                      use_triton)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
                         eps: float = 1e-5, offset: float = 0.0) -> torch.Tensor:
    """Plain-torch LayerNorm in fp32, rounded once to x.dtype."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * (offset + weight.float())
    if bias is not None:
        y = y + bias.float()
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


@triton.jit
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


def layer_norm_forward(x, weight, bias, eps: float, offset: float):
    """Launch the forward kernel: returns (y [rows, H], x as rows, mean, rstd)."""
    rows = as_rows(x)
    n_rows, hidden = rows.shape
    y = torch.empty((n_rows, hidden), dtype=x.dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block, num_warps = row_block(hidden)
    if n_rows > 0:
        _layer_norm_fwd_kernel[(n_rows,)](
            rows, weight, bias, y, mean, rstd, rows.stride(0), y.stride(0), hidden, eps, offset,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=block, num_warps=num_warps,
        )
    return y, rows, mean, rstd


def layer_norm_backward(dy, rows, weight, bias, mean, rstd, offset: float, compute_dw: bool, compute_db: bool):
    """Launch the backward kernel: returns (dx as rows, dw or None, db or None)."""
    dy = as_rows(dy)
    n_rows, hidden = rows.shape
    dx = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    programs = persistent_programs(rows.device, n_rows)
    partial_shape = (programs, hidden)
    dw_partial = torch.empty(partial_shape if compute_dw else (1,), dtype=torch.float32, device=rows.device)
    db_partial = torch.empty(partial_shape if compute_db else (1,), dtype=torch.float32, device=rows.device)
    block, num_warps = row_block(hidden)
    if n_rows > 0:
        _layer_norm_bwd_kernel[(programs,)](
            dy, rows, weight, mean, rstd, dx, dw_partial, db_partial, dy.stride(0), rows.stride(0),
            dx.stride(0), n_rows, hidden, offset, HAS_WEIGHT=weight is not None, BLOCK=block,
            COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, num_warps=num_warps,
        )
    return (dx, sum_partials(dw_partial if compute_dw else None, n_rows, weight),
            sum_partials(db_partial if compute_db else None, n_rows, bias))


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, offset):
        y, rows, mean, rstd = layer_norm_forward(x, weight, bias, eps, offset)
        ctx.save_for_backward(rows, weight, bias, mean, rstd)
        ctx.offset, ctx.x_shape = offset, x.shape
        return y  # [rows, H]: never a view (kernels/_common.py, as_rows)

    @staticmethod
    def backward(ctx, dy):
        rows, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_backward(dy, rows, weight, bias, mean, rstd, ctx.offset,
                                         ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return dx.view(ctx.x_shape), dw, db, None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None, eps: float = 1e-5,
               offset: float = 0.0) -> torch.Tensor:
    """LayerNorm over the last dimension of x (any leading shape), differentiable in x, weight, bias.

    weight=None gives the non-parametric LayerNorm (OLMo 1). Uses the Triton kernels on CUDA (or on the CPU under TRITON_INTERPRET=1), the torch
    reference elsewhere.
    """
    check_row_op_inputs("layer_norm", x, weight=weight, bias=bias)
    if not use_triton(x, weight, bias):
        return layer_norm_reference(x, weight, bias, eps, offset)
    return LayerNormFunction.apply(x, weight, bias, float(eps), float(offset)).view(x.shape)
