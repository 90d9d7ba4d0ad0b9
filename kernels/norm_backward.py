"""The wide-row backward of the row norms (RMSNorm, LayerNorm): rows too wide to keep their dW
(and dB) accumulators in registers beside x, dy and the weight.

Math (as in rms_norm.py and layer_norm.py; x_hat = (x - mean)·rstd, or x·rstd without a mean,
g = dy ⊙ (offset + w)):
    dx = rstd·(g - mean_cols(g) - x_hat·mean_cols(g ⊙ x_hat))      (RMSNorm: no mean_cols(g) term)
    dW = Σ_rows dy ⊙ x_hat,   dB = Σ_rows dy
The fused backward of rms_norm.py / layer_norm.py holds one whole row and the dW partials in
registers; past 32 fp32 values a thread (wide_row) that spills, so wide rows take two kernels:
`_norm_dx_wide_kernel` streams each row twice in WIDE_CHUNK-column chunks (the two row means,
then dx), and `_norm_param_grad_kernel` sums dW and dB over rows in column tiles, reading x and
dy once more. Why not atomics: the split partials are summed by torch in a fixed order
(deterministic, as the fused path is).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import capability_of, launch, persistent_programs, round_to, row_block, sum_partials

WIDE_CHUNK = (4096, 16)  # (columns, warps) of a wide row's chunk on a GPU: 8 elements a thread


def wide_row(block: int, num_warps: int, accumulators: int = 1) -> bool:
    """Whether a row norm's backward row is too wide to keep its dW (and dB) accumulators in
    registers beside x, dy and the weight: more than 32 such fp32 values a thread. Measured
    (compile report, benchmarks/NOTES.md): at BLOCK 16384 on 32 warps (16 elements a thread)
    RMSNorm spilled 44-52 B and LayerNorm 96-280 B on sm_90, and LayerNorm with dW and dB spilled
    at BLOCK 8192 on sm_100. Wide rows get dX from `_norm_dx_wide_kernel`, which streams each row
    in chunks of WIDE_CHUNK columns twice, and dW/dB from `_norm_param_grad_kernel`."""
    return block // (32 * num_warps) * (3 + accumulators) > 32


@triton.jit(do_not_specialize=["ROWS"])
def _norm_param_grad_kernel(
    DY, X, MEAN, RSTD, DW_PARTIAL, DB_PARTIAL,   # DY, X [rows, H] (row strides); MEAN, RSTD [rows] fp32;
    STRIDE_DY, STRIDE_X, ROWS, H,                # partials [SPLIT, H] fp32
    HAS_MEAN: tl.constexpr, ROUND_RSTD: tl.constexpr, ROUND_X_HAT: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Column sums of a row norm's parameter gradients over this split's rows:
        DW_PARTIAL[split] = sum_rows dy * x_hat,   DB_PARTIAL[split] = sum_rows dy,
    x_hat = (x - mean) * rstd (LayerNorm) or x * rstd (RMSNorm), rounded as its forward rounded it.
    Column tiles of BLOCK_C, rows dealt round-robin in [BLOCK_M, BLOCK_C] tiles to SPLIT programs
    per column tile (no atomics; torch sums the partials). It reads x and dy once more than a
    fused backward, the price of rows too wide for an accumulator in registers (wide_row)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    col_mask = cols < H
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for m0 in range(split * BLOCK_M, ROWS, n_split * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < ROWS
        mask = row_mask[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows[:, None] * STRIDE_DY + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if COMPUTE_DW:
            x = tl.load(X + rows[:, None] * STRIDE_X + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            if ROUND_RSTD:
                rstd = round_to(rstd, X.dtype.element_ty).to(tl.float32)
            if HAS_MEAN:
                x = x - tl.load(MEAN + rows, mask=row_mask, other=0.0)[:, None]
            x_hat = x * rstd[:, None]
            if ROUND_X_HAT:
                x_hat = round_to(x_hat, X.dtype.element_ty).to(tl.float32)
            dw += tl.sum(dy * x_hat, axis=0)
        if COMPUTE_DB:
            db += tl.sum(dy, axis=0)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + split * H + cols, dw, mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_PARTIAL + split * H + cols, db, mask=col_mask)


def norm_param_grads(dy: torch.Tensor, rows: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor,
                     weight: torch.Tensor | None, bias: torch.Tensor | None, *, round_rstd: bool = False,
                     round_x_hat: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dW, dB) of a row norm by `_norm_param_grad_kernel` (dW when weight is given, dB when bias is)."""
    n_rows, hidden = rows.shape
    capability = capability_of(rows.device)
    # the interpreter pays per program: one column block of the whole row; a GPU: 8x256 tiles, 4 warps
    block_m, block_c, num_warps = (16, triton.next_power_of_2(hidden), 1) if capability is None else (8, 256, 4)
    col_blocks = triton.cdiv(hidden, block_c)
    split = max(1, min(triton.cdiv(n_rows, block_m), persistent_programs(rows.device, 1 << 30) // col_blocks))
    dw_partial = torch.empty((split, hidden) if weight is not None else (1,), dtype=torch.float32, device=rows.device)
    db_partial = torch.empty((split, hidden) if bias is not None else (1,), dtype=torch.float32, device=rows.device)
    if n_rows > 0:
        launch(_norm_param_grad_kernel, (col_blocks, split), dy, rows, mean if mean is not None else rstd, rstd,
               dw_partial, db_partial, dy.stride(0), rows.stride(0), n_rows, hidden, HAS_MEAN=mean is not None,
               ROUND_RSTD=round_rstd, ROUND_X_HAT=round_x_hat, COMPUTE_DW=weight is not None,
               COMPUTE_DB=bias is not None, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)
    return (None if weight is None else sum_partials(dw_partial, n_rows, weight),
            None if bias is None else sum_partials(db_partial, n_rows, bias))


@triton.jit
def _norm_weight(W, cols, mask, offset, HAS_WEIGHT: tl.constexpr, ROUNDING: tl.constexpr, X_DTYPE: tl.constexpr,
                 BLOCK: tl.constexpr):
    """offset + w in fp32 (ones without a weight), rounded where RMSNorm's forward rounded it:
    ROUNDING is its CASTING id, 0 to W's dtype ("llama"), 1 not at all ("gemma", and LayerNorm),
    2 to x's dtype ("none")."""
    if HAS_WEIGHT:
        scale = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + tl.cast(offset, tl.float32)
        if ROUNDING == 2:
            scale = round_to(scale, X_DTYPE).to(tl.float32)
        elif ROUNDING == 0:
            scale = round_to(scale, W.dtype.element_ty).to(tl.float32)
        return scale
    return tl.full([BLOCK], 1.0, tl.float32)


@triton.jit(do_not_specialize=["ROWS"])
def _norm_dx_wide_kernel(
    DY, X, W, MEAN, RSTD, DX,   # DY, X, DX [rows, H] (row strides); W [H]; MEAN, RSTD [rows] fp32
    STRIDE_DY, STRIDE_X, STRIDE_DX, ROWS, H, offset,
    HAS_MEAN: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROUNDING: tl.constexpr, BLOCK: tl.constexpr,
):
    """dX of a row norm whose rows are too wide for registers (wide_row), with g = dy · (offset + w),
    x̂ = (x − mean) · rstd (x · rstd for RMSNorm, HAS_MEAN false):
        dx = rstd · (g − mean(g) − x̂ · mean(g · x̂))      (RMSNorm: without the mean(g) term)
    Per row, pass 1 over BLOCK-column chunks sums g and g·x̂, pass 2 reads the chunks again (from
    L1/L2: the row was just read) and writes dx. Persistent grid over rows. ROUNDING: RMSNorm's
    casting (_norm_weight; 2 also rounds rstd to x's dtype, as its forward did)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    for row in range(pid, ROWS, programs):
        row = tl.cast(row, tl.int64)
        rstd = tl.load(RSTD + row)
        if ROUNDING == 2:
            rstd = round_to(rstd, X.dtype.element_ty).to(tl.float32)
        mean = tl.cast(0.0, tl.float32)
        if HAS_MEAN:
            mean = tl.load(MEAN + row)
        acc_g = tl.zeros([BLOCK], dtype=tl.float32)
        acc_gx = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, H, BLOCK):
            mask = c0 + cols < H
            x = tl.load(X + row * STRIDE_X + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * STRIDE_DY + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            g = dy * _norm_weight(W, c0 + cols, mask, offset, HAS_WEIGHT, ROUNDING, X.dtype.element_ty, BLOCK)
            if HAS_MEAN:
                acc_g += g  # 0 where masked: dy is
            acc_gx += g * ((x - mean) * rstd)
        c_g = tl.sum(acc_g, axis=0) / H
        c_gx = tl.sum(acc_gx, axis=0) / H
        for c0 in range(0, H, BLOCK):
            mask = c0 + cols < H
            x = tl.load(X + row * STRIDE_X + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * STRIDE_DY + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            g = dy * _norm_weight(W, c0 + cols, mask, offset, HAS_WEIGHT, ROUNDING, X.dtype.element_ty, BLOCK)
            dx = rstd * (g - c_g - (x - mean) * rstd * c_gx)
            tl.store(DX + row * STRIDE_DX + c0 + cols, round_to(dx, DX.dtype.element_ty), mask=mask)


def norm_dx_wide(dy: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor | None,
                 rstd: torch.Tensor, dx: torch.Tensor, offset: float, rounding: int = 1) -> None:
    """dX of wide rows into dx by `_norm_dx_wide_kernel` (rows, dy: [rows, H] with unit column stride)."""
    n_rows, hidden = rows.shape
    capability = capability_of(rows.device)
    block, num_warps = row_block(capability, hidden)
    # 4096 columns at 16 warps on a GPU (8 elements a thread); 2 chunks under the interpreter, so
    # that the tests run both loops more than once
    chunk, chunk_warps = WIDE_CHUNK if capability is not None else (block // 2, 1)
    if n_rows > 0:
        launch(_norm_dx_wide_kernel, (persistent_programs(rows.device, n_rows),), dy, rows, weight,
               mean if mean is not None else rstd, rstd, dx, dy.stride(0), rows.stride(0), hidden, n_rows, hidden,
               offset, HAS_MEAN=mean is not None, HAS_WEIGHT=weight is not None, ROUNDING=rounding, BLOCK=chunk,
               num_warps=chunk_warps)
