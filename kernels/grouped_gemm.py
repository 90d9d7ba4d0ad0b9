"""Grouped GEMMs over routed rows: the experts' matrix products, one expert's weights per tile,
for moe.py (the op, its math and what it saves) and fastft/expert_parallel.py (through the op).

Layout: the S = N·K slots are sorted by expert once per call (a stable torch.sort of the expert
ids on the device), so that expert e owns the sorted rows offsets[e] .. offsets[e+1]. Nothing is
permuted in memory: every GEMM's prologue gathers the rows it needs (x and dout by the row's
token, everything else is already in sorted order), the forward's epilogue multiplies by the
routing weight and writes each row to its slot (n·K + k), and one small kernel sums the K slots of
each token in fp32 (the combine; deterministic, unlike atomics). A program owns BLOCK_M sorted
rows of one expert; the expert of program t is found by comparing t with the cumulative tile
counts (a vector compare in the kernel), so the grid needs no host sync: it is launched at its
upper bound cdiv(S, BLOCK_M) + E programs and those past the last tile return at once. An expert
with no tokens has no tiles, so it costs nothing in the forward and in dX; its weight gradient is
a zero write. The expert id E (one past the last) means "no expert": such slots are skipped
everywhere (expert parallelism marks other ranks' experts so; see fastft/expert_parallel.py).

Kernels (each a grouped GEMM over the sorted rows, weights addressed by strides, so transposed
and interleaved expert layouts and PEFT's LoRA factor layouts are views, never copies):
    _glu_fwd_kernel      gu = x[token]·W_gu[e]ᵀ (+ low rank); stores gu and h = act(g)⊙u
    _grouped_mm_kernel   y = X[rows]·W[e]ᵀ (+ low rank); epilogue: plain store, or × w and
                         scatter to the slot (down projection, dX)
    _glu_bwd_kernel      a = dout[token]·W_d[e] (+ low rank); epilogue: dw partial sums, dgu, h
    _weight_grad_kernel  dW[e] = Σ_(rows of e) (w·)A[rows]ᵀ·B[rows]: one program per expert and
                         output tile, looping over that expert's rows (bounds read on the device)
    _combine_kernel      out_n = Σ_k Y[n·K + k] over the slots that have an expert


Launch geometry (launch_blocks, expert_block_m) is a pure function of the GPU's compute
capability and the shapes, so that the compile report (benchmarks/compile_report.py) and the
planner (fastft/planning/workspace.py) see exactly what a GPU run launches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import capability_of, dot, fp32_dot, launch, round_to
from .activations import ACT_ID, act_and_grad

# ------------------------------------------------------------------------------------------------
# Triton: shared pieces.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _tile(TILE_CUM, OFFSETS, E, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, sorted rows [BLOCK_M] int64, row mask) of this program's tile. The caller has
    checked that program_id(0) < the total tile count."""
    t = tl.program_id(0)
    ids = tl.arange(0, BLOCK_E)
    cum = tl.load(TILE_CUM + ids, mask=ids < E, other=2147483647)        # [BLOCK_E] int32
    e = tl.sum((cum <= t).to(tl.int32), axis=0)                          # first expert with cum > t
    first_tile = tl.sum(tl.where(ids == e - 1, cum, 0), axis=0)          # tiles of experts < e
    start = tl.load(OFFSETS + e) + (t - first_tile) * BLOCK_M
    end = tl.load(OFFSETS + e + 1)
    rows = start.to(tl.int64) + tl.arange(0, BLOCK_M)
    return e.to(tl.int64), rows, rows < end


@triton.jit
def _mainloop(acc, X, src, row_mask, stride_xm, Wp, cols, col_mask, stride_wn, stride_wk, K,
              BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr):
    """acc [BM, BN] += X[src, :K]·Wp[cols, :K]ᵀ, Wp addressed as Wp + n·stride_wn + k·stride_wk."""
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < K
        x = tl.load(X + src[:, None] * stride_xm + kk[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)                                                       # [BM, BK]
        w = tl.load(Wp + kk[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)             # [BK, BN]
        acc = dot(acc, x, w, FP32_DOT)
    return acc


@triton.jit
def _low_rank(acc, LR, rows, row_mask, R, LBp, cols, col_mask, stride_lbn, stride_lbr, scale,
              BLOCK_R: tl.constexpr, R_STEP: tl.constexpr, FP32_DOT: tl.constexpr):
    """acc += scale·LR[rows, :R]·LBp[cols, :R]ᵀ (LR [S, R] contiguous, sorted rows): one [BM, BLOCK_R]
    by [BLOCK_R, BN] product for tensor-core dots; a loop over R in R_STEP-rank steps for fp32 dots
    on a GPU, which run on the FMA units with their operand tiles in registers (a whole rank-64
    tile spilled KBs there, and so did the steps unrolled: launch_blocks)."""
    zero = tl.zeros(acc.shape, dtype=tl.float32)
    if R_STEP < BLOCK_R:
        low = _mainloop(zero, LR, rows, row_mask, R, LBp, cols, col_mask, stride_lbn, stride_lbr, R, R_STEP, FP32_DOT)
    else:
        ranks = tl.arange(0, BLOCK_R)
        lr = tl.load(LR + rows[:, None] * R + ranks[None, :], mask=row_mask[:, None] & (ranks < R)[None, :],
                     other=0.0)                                                      # [BM, BR]
        lb = tl.load(LBp + ranks[:, None] * stride_lbr + cols[None, :] * stride_lbn,
                     mask=(ranks < R)[:, None] & col_mask[None, :], other=0.0)      # [BR, BN]
        low = dot(zero, lr, lb, FP32_DOT)
    return acc + low * scale


# ------------------------------------------------------------------------------------------------
# Triton: the four grouped GEMMs and the combine.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _glu_fwd_kernel(
    X, TOKEN, stride_xm,                               # X [N, H]; TOKEN [S] int32 (sorted row -> token)
    W, stride_we, stride_wn, stride_wk, w_up,          # W_gu[e, n, k]; up rows start w_up elements after gate
    LR, LB, stride_lbe, stride_lbn, stride_lbr, lb_up, lr_scale, R,   # LoRA: xa [S, R], B_gu[e, n, j]
    GU, HO,                                            # GU [S, 2I] pre-activations, HO [S, I] = act(g)·u
    TILE_CUM, OFFSETS, E, I, K,
    ACT: tl.constexpr, HAS_LR: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, R_STEP: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    if tl.program_id(0) >= tl.load(TILE_CUM + E - 1):
        return
    e, rows, row_mask = _tile(TILE_CUM, OFFSETS, E, BLOCK_E, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    src = tl.load(TOKEN + rows, mask=row_mask, other=0).to(tl.int64)
    Wp = W + e * stride_we
    g = _mainloop(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), X, src, row_mask, stride_xm, Wp, cols,
                  col_mask, stride_wn, stride_wk, K, BLOCK_K, FP32_DOT)
    u = _mainloop(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), X, src, row_mask, stride_xm, Wp + w_up, cols,
                  col_mask, stride_wn, stride_wk, K, BLOCK_K, FP32_DOT)
    if HAS_LR:
        LBp = LB + e * stride_lbe
        g = _low_rank(g, LR, rows, row_mask, R, LBp, cols, col_mask, stride_lbn, stride_lbr, lr_scale, BLOCK_R,
                      R_STEP, FP32_DOT)
        u = _low_rank(u, LR, rows, row_mask, R, LBp + lb_up, cols, col_mask, stride_lbn, stride_lbr, lr_scale,
                      BLOCK_R, R_STEP, FP32_DOT)
    mask = row_mask[:, None] & col_mask[None, :]
    g = round_to(g, GU.dtype.element_ty)
    u = round_to(u, GU.dtype.element_ty)
    tl.store(GU + rows[:, None] * (2 * I) + cols[None, :], g, mask=mask)
    tl.store(GU + rows[:, None] * (2 * I) + I + cols[None, :], u, mask=mask)
    a, _ = act_and_grad(g.to(tl.float32), ACT)   # h from the stored (rounded) g, u: the backward's h
    tl.store(HO + rows[:, None] * I + cols[None, :], round_to(a * u.to(tl.float32), HO.dtype.element_ty),
             mask=mask)


@triton.jit
def _grouped_mm_kernel(
    X, X_ROWS, stride_xm,                              # X [*, K]; X_ROWS [S] int32 when GATHER
    W, stride_we, stride_wn, stride_wk,                # W[e, n, k]
    LR, LB, stride_lbe, stride_lbn, stride_lbr, lr_scale, R,
    OUT, stride_om, SLOT, ROW_W,                       # OUT [S, N]: sorted rows, or slots when SCATTER
    w_split,                                           # SPLIT: columns K..2K of X meet W + w_split
    TILE_CUM, OFFSETS, E, N, K,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_LR: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, R_STEP: tl.constexpr, FP32_DOT: tl.constexpr,
):
    if tl.program_id(0) >= tl.load(TILE_CUM + E - 1):
        return
    e, rows, row_mask = _tile(TILE_CUM, OFFSETS, E, BLOCK_E, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    src = rows
    if GATHER:
        src = tl.load(X_ROWS + rows, mask=row_mask, other=0).to(tl.int64)
    Wp = W + e * stride_we
    acc = _mainloop(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), X, src, row_mask, stride_xm, Wp, cols, col_mask,
                    stride_wn, stride_wk, K, BLOCK_K, FP32_DOT)
    if SPLIT:  # [dg, du]·[W_g; W_u] for gate/up halves that are not one strided block (interleaved)
        acc = _mainloop(acc, X + K, src, row_mask, stride_xm, Wp + w_split, cols, col_mask, stride_wn, stride_wk, K,
                        BLOCK_K, FP32_DOT)
    if HAS_LR:
        acc = _low_rank(acc, LR, rows, row_mask, R, LB + e * stride_lbe, cols, col_mask, stride_lbn, stride_lbr,
                        lr_scale, BLOCK_R, R_STEP, FP32_DOT)
    dst = rows
    if SCATTER:
        dst = tl.load(SLOT + rows, mask=row_mask, other=0).to(tl.int64)
        if ROW_SCALE:
            acc = acc * tl.load(ROW_W + dst, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(OUT + dst[:, None] * stride_om + cols[None, :], round_to(acc, OUT.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _glu_bwd_kernel(
    DOUT, TOKEN, stride_dm,                            # DOUT [N, H]
    W, stride_we, stride_wn, stride_wk,                # W_d as [e, n over I, k over H]
    LR, LB, stride_lbe, stride_lbn, stride_lbr, lr_scale, R,  # dout·B_d [S, R], A_d as [e, n over I, j]
    GU, SLOT, ROW_W,                                   # GU [S, 2I]; ROW_W [S] routing weights by slot
    DGU, HO, DW_PART, n_part,                          # DGU [S, 2I]; HO [S, I] (STORE_H); DW_PART [S, n_part] fp32
    TILE_CUM, OFFSETS, E, I, K,
    ACT: tl.constexpr, HAS_LR: tl.constexpr, STORE_H: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    R_STEP: tl.constexpr, FP32_DOT: tl.constexpr,
):
    if tl.program_id(0) >= tl.load(TILE_CUM + E - 1):
        return
    e, rows, row_mask = _tile(TILE_CUM, OFFSETS, E, BLOCK_E, BLOCK_M)
    pid_n = tl.program_id(1)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    src = tl.load(TOKEN + rows, mask=row_mask, other=0).to(tl.int64)
    a = _mainloop(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOUT, src, row_mask, stride_dm, W + e * stride_we,
                  cols, col_mask, stride_wn, stride_wk, K, BLOCK_K, FP32_DOT)
    if HAS_LR:
        a = _low_rank(a, LR, rows, row_mask, R, LB + e * stride_lbe, cols, col_mask, stride_lbn, stride_lbr,
                      lr_scale, BLOCK_R, R_STEP, FP32_DOT)
    mask = row_mask[:, None] & col_mask[None, :]
    g = tl.load(GU + rows[:, None] * (2 * I) + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + rows[:, None] * (2 * I) + I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    act, dact = act_and_grad(g, ACT)
    h = round_to(act * u, GU.dtype.element_ty)      # exactly the forward's h
    slot = tl.load(SLOT + rows, mask=row_mask, other=0).to(tl.int64)
    w = tl.load(ROW_W + slot, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(DW_PART + rows * n_part + pid_n, tl.sum(a * h.to(tl.float32), axis=1), mask=row_mask)
    dh = a * w[:, None]
    tl.store(DGU + rows[:, None] * (2 * I) + cols[None, :], round_to(dh * u * dact, DGU.dtype.element_ty), mask=mask)
    tl.store(DGU + rows[:, None] * (2 * I) + I + cols[None, :], round_to(dh * act, DGU.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(HO + rows[:, None] * I + cols[None, :], h, mask=mask)


@triton.jit
def _weight_grad_kernel(
    A, A_ROWS, stride_am, B, B_ROWS, stride_bm,        # A [*, P], B [*, Q] (unit stride along P / Q)
    SLOT, ROW_W,                                       # ROW_SCALE: rows of A scaled by ROW_W[SLOT[row]]
    DW, stride_de, stride_dp, stride_dq,               # DW[e, p, q]
    OFFSETS, P, Q, scale,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, ROW_SCALE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, FP32_DOT: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64)
    ps = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(2).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    start = tl.load(OFFSETS + e)
    end = tl.load(OFFSETS + e + 1)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):           # no iteration for an expert without tokens
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < end
        ra = rows
        if GATHER_A:
            ra = tl.load(A_ROWS + rows, mask=row_mask, other=0).to(tl.int64)
        rb = rows
        if GATHER_B:
            rb = tl.load(B_ROWS + rows, mask=row_mask, other=0).to(tl.int64)
        at = tl.load(A + ra[None, :] * stride_am + ps[:, None], mask=row_mask[None, :] & (ps < P)[:, None],
                     other=0.0)                                                      # [BP, BM]
        if ROW_SCALE:
            slot = tl.load(SLOT + rows, mask=row_mask, other=0).to(tl.int64)
            w = tl.load(ROW_W + slot, mask=row_mask, other=0.0).to(tl.float32)
            at = round_to(at.to(tl.float32) * w[None, :], A.dtype.element_ty)
        b = tl.load(B + rb[:, None] * stride_bm + qs[None, :], mask=row_mask[:, None] & (qs < Q)[None, :],
                    other=0.0)                                                       # [BM, BQ]
        acc = dot(acc, at, b, FP32_DOT)
    acc = acc * tl.cast(scale, tl.float32)
    tl.store(DW + e * stride_de + ps[:, None] * stride_dp + qs[None, :] * stride_dq,
             round_to(acc, DW.dtype.element_ty), mask=(ps < P)[:, None] & (qs < Q)[None, :])


@triton.jit
def _combine_kernel(Y, IDX, OUT, N, H, E, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """OUT[n] = Σ_k Y[n·K + k] (fp32, fixed order) over the slots whose expert id is < E."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = tokens < N
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for k in range(TOP_K):
        slots = tokens * TOP_K + k
        live = t_mask & (tl.load(IDX + slots, mask=t_mask, other=E) < E)
        acc += tl.load(Y + slots[:, None] * H + cols[None, :], mask=live[:, None] & (cols < H)[None, :],
                       other=0.0).to(tl.float32)
    tl.store(OUT + tokens[:, None] * H + cols[None, :], round_to(acc, OUT.dtype.element_ty),
             mask=t_mask[:, None] & (cols < H)[None, :])


# ------------------------------------------------------------------------------------------------
# Host side: routing, launch geometry, launchers.
# ------------------------------------------------------------------------------------------------
class Routing(NamedTuple):
    """The slots sorted by expert: sorted row -> slot and token; expert e owns rows offsets[e]..offsets[e+1]."""
    slot: torch.Tensor       # [S] int32: the slot n·K + k of each sorted row
    token: torch.Tensor      # [S] int32: its token n
    offsets: torch.Tensor    # [E + 1] int32
    tile_cum: torch.Tensor   # [E] int32: cumulative BLOCK_M tiles (experts 0..e)
    idx: torch.Tensor        # [S] expert id per slot (E: none), for the combine
    programs: int            # grid size along the tiles (an upper bound on the GPU)
    block_m: int
    num_experts: int
    top_k: int


class Blocks(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    rank_step: int = 128  # the ranks a low-rank term takes per step (R_STEP, _low_rank)
    maxnreg: int | None = None

    def options(self) -> dict:
        """The launch options (maxnreg only when set: the interpreter takes no such option)."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages,
                    **({"maxnreg": self.maxnreg} if self.maxnreg else {}))


def expert_block_m(capability: tuple[int, int] | None, slots: int, n_experts: int, fp32: bool = False) -> int:
    """BLOCK_M, the sorted rows per program (one choice per call: the routing's tiles use it): 128
    when the experts average 256 rows or more (Qwen3-30B-A3B and Mixtral at 8192 tokens), else 64;
    64 for fp32 dots (launch_blocks). capability: the GPU's (kernels/_common.py: capability_of),
    None under the interpreter."""
    if capability is None or fp32:
        return 64
    return 128 if slots >= 256 * max(1, n_experts) else 64


def launch_blocks(capability: tuple[int, int] | None, kind: str, n_out: int, k_dim: int, block_m: int,
                  fp32: bool = False) -> Blocks:
    """Tiles of one grouped GEMM: a pure function of the compute capability (None: the
    interpreter), the kernel ("mm", "glu_fwd", "glu_bwd", "weight_grad"), its output columns n_out,
    reduction length k_dim, BLOCK_M and whether its dots take fp32, so that an ahead-of-time
    compile sees exactly what a GPU run launches. The GPU choices come from the compile report
    (benchmarks/COMPILE.md, NOTES.md: registers and spills per kernel):
    - tensor-core dots (bf16, fp16), 3 stages: a plain grouped GEMM takes 128x128 tiles on 8 warps with
      128-row blocks (64x64 on 4 warps otherwise); the gate/up forward, with two accumulators,
      keeps 64 columns; the fused down / activation backward, whose epilogue holds six [BM, BN]
      fp32 tiles, takes 8 warps and 32 columns at 128 rows (254 registers and spills at 64x64 on
      4 warps);
    - fp32 dots (an fp32 model: exact products on the FMA units, which hold their operand tiles
      in registers): 64-row blocks, 64-column tiles, 16-deep steps of K (of the rows, for the
      weight gradient) and of the LoRA rank, 8 warps, 2 stages, maxnreg=255 (the bf16 tiles
      spilled 8-420 B at rank <= 16, ~4-6 KB at rank 64, and 5-17 KB in the weight gradient on
      sm_80; left to itself ptxas held some 256-thread programs to 80 registers and spilled 4 B).
    Untuned until measured. The interpreter pays per program and per loop iteration, so it gets
    big tiles."""
    if capability is None:
        return Blocks(block_m, min(128, max(16, triton.next_power_of_2(n_out))),
                      min(128, max(16, triton.next_power_of_2(k_dim))), 1, 1)
    if fp32:
        return Blocks(block_m, min(64, max(16, triton.next_power_of_2(n_out))), 16, 8, 2, rank_step=16, maxnreg=255)
    wide = block_m == 128
    block_n = {"mm": 128 if wide else 64, "glu_fwd": 64, "glu_bwd": 32 if wide else 64,
               "weight_grad": 128}[kind]
    warps = 8 if wide or kind in ("glu_bwd", "weight_grad") else 4
    return Blocks(block_m, min(block_n, max(16, triton.next_power_of_2(n_out))), 64, warps, 3)


def route(topk_idx: torch.Tensor, num_experts: int, block_m: int) -> Routing:
    """Sort the slots by expert with device ops only (no host sync). topk_idx [N, K] ints in
    [0, num_experts]; the value num_experts marks a slot with no expert (it sorts last and no
    expert owns it). Ids outside that range are not checked (that would synchronise)."""
    n_tokens, top_k = topk_idx.shape
    flat = topk_idx.reshape(-1)
    device = flat.device
    _, order = torch.sort(flat.to(torch.int32), stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int32))
    counts = counts[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    offsets[1:] = counts.cumsum(0)
    tile_cum = ((counts + block_m - 1) // block_m).cumsum(0).to(torch.int32)
    slots = flat.numel()
    if capability_of(device) is not None:  # a GPU, or a compile-ahead recording on meta tensors
        programs = triton.cdiv(slots, block_m) + num_experts
    else:  # the interpreter runs on the CPU: an exact grid costs no device sync there
        programs = int(tile_cum[-1]) if num_experts else 0
    return Routing(order.to(torch.int32), (order // top_k).to(torch.int32), offsets, tile_cum, flat, programs,
                   block_m, num_experts, top_k)


def _grid_ok(routing: Routing) -> bool:
    return routing.programs > 0 and routing.num_experts > 0


def _lr_args(lr, rank_step: int):
    """(LR, LB view, strides, scale, R, BLOCK_R, R_STEP) for an optional low-rank term (rows [S, R],
    LB [E, n, R]); R_STEP: the ranks per step, at most rank_step (launch_blocks)."""
    if lr is None:
        return None, None, 0, 0, 0, 0.0, 0, 16, 16
    rows, lb, scale = lr
    rank = rows.shape[1]
    block_r = max(16, triton.next_power_of_2(rank))
    return rows, lb, lb.stride(0), lb.stride(1), lb.stride(2), float(scale), rank, block_r, min(rank_step, block_r)


def grouped_mm(x, w3, routing: Routing, *, gather: bool, lr=None, scatter: bool = False, row_w=None,
               split: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Y[row] = X[token(row) if gather else row]·W[e]ᵀ (+ scale·LR[row]·LB[e]ᵀ) for the sorted rows;
    w3 is a [E, n, k] view (any strides). split: X has 2k columns, the second k of which meet the
    weight view that starts `split` elements after w3 (a gate/up pair). scatter: Y is indexed by
    slot and, with row_w, each row is multiplied by its routing weight row_w[slot]. Returns
    [S, n] in x's dtype."""
    n_out, k_dim = w3.shape[1], w3.shape[2]
    slots = routing.slot.numel()
    if out is None:
        out = torch.empty(slots, n_out, dtype=x.dtype, device=x.device)
    if not _grid_ok(routing) or n_out == 0:
        return out
    capability = capability_of(x.device)
    fp32 = fp32_dot(capability, x, w3)
    bl = launch_blocks(capability, "mm", n_out, k_dim, routing.block_m, fp32)
    lr_rows, lb, s_lbe, s_lbn, s_lbr, lr_scale, rank, block_r, r_step = _lr_args(lr, bl.rank_step)
    launch(_grouped_mm_kernel, (routing.programs, triton.cdiv(n_out, bl.block_n)),
        x, routing.token, x.stride(0), w3, w3.stride(0), w3.stride(1), w3.stride(2),
        lr_rows, lb, s_lbe, s_lbn, s_lbr, lr_scale, rank,
        out, out.stride(0), routing.slot, row_w, split or 0, routing.tile_cum, routing.offsets, routing.num_experts,
        n_out, k_dim, GATHER=gather, SCATTER=scatter, ROW_SCALE=row_w is not None, HAS_LR=lr is not None,
        SPLIT=split is not None,
        BLOCK_E=triton.next_power_of_2(routing.num_experts), BLOCK_M=routing.block_m, BLOCK_N=bl.block_n,
        BLOCK_K=bl.block_k, BLOCK_R=block_r, R_STEP=r_step, FP32_DOT=fp32, **bl.options())
    return out


def weight_grad(a, b, routing: Routing, out: torch.Tensor, *, gather_a=False, gather_b=False, row_w=None,
                scale: float = 1.0) -> torch.Tensor:
    """out[e] = scale·Σ_(sorted rows of e) (row_w[slot]·)A[row]ᵀ·B[row] (rows gathered by token
    where asked); out is a [E, P, Q] tensor or view (any strides), written in full."""
    n_experts, p_dim, q_dim = out.shape
    if n_experts == 0 or p_dim == 0 or q_dim == 0:
        return out
    capability = capability_of(a.device)
    fp32 = fp32_dot(capability, a, b)
    bl = launch_blocks(capability, "weight_grad", q_dim, p_dim, routing.block_m, fp32)
    block_p = min(128, max(16, triton.next_power_of_2(p_dim)))  # P plays the M role of this GEMM
    launch(_weight_grad_kernel, (n_experts, triton.cdiv(p_dim, block_p), triton.cdiv(q_dim, bl.block_n)),
        a, routing.token, a.stride(0), b, routing.token, b.stride(0), routing.slot, row_w,
        out, out.stride(0), out.stride(1), out.stride(2), routing.offsets, p_dim, q_dim, float(scale),
        GATHER_A=gather_a, GATHER_B=gather_b, ROW_SCALE=row_w is not None, BLOCK_P=block_p, BLOCK_Q=bl.block_n,
        BLOCK_M=bl.block_k, FP32_DOT=fp32, **bl.options())
    return out


def combine(y: torch.Tensor, routing: Routing, n_tokens: int) -> torch.Tensor:
    """out[n] = Σ_k y[n·K + k] over slots with an expert, fp32 sum, y's dtype."""
    hidden = y.shape[1]
    out = torch.empty(n_tokens, hidden, dtype=y.dtype, device=y.device)
    if n_tokens == 0 or hidden == 0:
        return out
    # a GPU: 16 tokens x 256 columns on 8 warps (45-48 registers, 62% occupancy for this streaming
    # kernel; on 4 warps 72 registers, 44%: benchmarks/NOTES.md); the interpreter: fewer, bigger programs
    block_t, block_h, warps = (64, 128, 4) if capability_of(y.device) is None else (16, 256, 8)
    launch(_combine_kernel, (triton.cdiv(n_tokens, block_t), triton.cdiv(hidden, block_h)),
        y, routing.idx, out, n_tokens, hidden, routing.num_experts, TOP_K=routing.top_k, BLOCK_T=block_t,
        BLOCK_H=block_h, num_warps=warps)
    return out


def glu_forward(x, gate_up3, w_up, routing, lr, lb_up, activation):
    """(gu [S, 2I], h [S, I]) for the sorted rows."""
    slots, inter = routing.slot.numel(), gate_up3.shape[1]
    gu = torch.empty(slots, 2 * inter, dtype=x.dtype, device=x.device)
    h = torch.empty(slots, inter, dtype=x.dtype, device=x.device)
    if not _grid_ok(routing):
        return gu, h
    capability = capability_of(x.device)
    fp32 = fp32_dot(capability, x, gate_up3)
    bl = launch_blocks(capability, "glu_fwd", inter, gate_up3.shape[2], routing.block_m, fp32)
    lr_rows, lb, s_lbe, s_lbn, s_lbr, lr_scale, rank, block_r, r_step = _lr_args(lr, bl.rank_step)
    launch(_glu_fwd_kernel, (routing.programs, triton.cdiv(inter, bl.block_n)),
        x, routing.token, x.stride(0), gate_up3, gate_up3.stride(0), gate_up3.stride(1), gate_up3.stride(2), w_up,
        lr_rows, lb, s_lbe, s_lbn, s_lbr, lb_up, lr_scale, rank, gu, h,
        routing.tile_cum, routing.offsets, routing.num_experts, inter, gate_up3.shape[2],
        ACT=ACT_ID[activation], HAS_LR=lr is not None, BLOCK_E=triton.next_power_of_2(routing.num_experts),
        BLOCK_M=routing.block_m, BLOCK_N=bl.block_n, BLOCK_K=bl.block_k, BLOCK_R=block_r, R_STEP=r_step,
        FP32_DOT=fp32, **bl.options())
    return gu, h


def glu_backward(dout, down_t, routing, gu, topk_w, lr, activation, store_h):
    """(dgu [S, 2I], h [S, I] or None, dw [S] fp32 by sorted row); down_t is W_d as [E, I, H]."""
    slots, inter = gu.shape[0], gu.shape[1] // 2
    dgu = torch.empty_like(gu)
    h = torch.empty(slots, inter, dtype=gu.dtype, device=gu.device) if store_h else None
    capability = capability_of(dout.device)
    fp32 = fp32_dot(capability, dout, down_t)
    bl = launch_blocks(capability, "glu_bwd", inter, down_t.shape[2], routing.block_m, fp32)
    n_part = triton.cdiv(inter, bl.block_n)
    dw_part = torch.zeros(slots, n_part, dtype=torch.float32, device=gu.device)
    if not _grid_ok(routing):
        return dgu, h, dw_part.sum(1)
    lr_rows, lb, s_lbe, s_lbn, s_lbr, lr_scale, rank, block_r, r_step = _lr_args(lr, bl.rank_step)
    launch(_glu_bwd_kernel, (routing.programs, n_part),
        dout, routing.token, dout.stride(0), down_t, down_t.stride(0), down_t.stride(1), down_t.stride(2),
        lr_rows, lb, s_lbe, s_lbn, s_lbr, lr_scale, rank, gu, routing.slot, topk_w, dgu, h, dw_part, n_part,
        routing.tile_cum, routing.offsets, routing.num_experts, inter, down_t.shape[2],
        ACT=ACT_ID[activation], HAS_LR=lr is not None, STORE_H=store_h,
        BLOCK_E=triton.next_power_of_2(routing.num_experts), BLOCK_M=routing.block_m, BLOCK_N=bl.block_n,
        BLOCK_K=bl.block_k, BLOCK_R=block_r, R_STEP=r_step, FP32_DOT=fp32, **bl.options())
    return dgu, h, dw_part.sum(1)
