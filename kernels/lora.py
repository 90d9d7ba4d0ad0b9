"""LoRA linear layers: y = x·Wᵀ (+ b) + s·(drop(x)·Aᵀ)·Bᵀ, without forming W + s·B·A.

Math (Hu et al. 2021, "LoRA"; rsLoRA's s = alpha/sqrt(r) from Kalajdzievski 2023 arrives here as
the plain number `scale`), with x [N, K], W [O, K], A [r, K], B [O, r], D = dropout mask / (1 - p):
    u  = s · (x ⊙ D)·Aᵀ                          [N, r]   the rank-r product first
    y  = x·Wᵀ + b + u·Bᵀ                          [N, O]
Backward, with dY [N, O]:
    du = dY·B                                     [N, r]
    dB = dYᵀ·u                                    [O, r]
    dA = s · duᵀ·(x ⊙ D)                          [r, K]
    dX = dY·W + s · (du·A) ⊙ D                    [N, K]
    dW = dYᵀ·x,  db = Σ_rows dY                   only when the base layer is trainable

Where the bytes go (b = bytes per element of x/y, N·O·b = one pass over y):
- The big GEMMs (x·Wᵀ, dY·W, dYᵀ·x) stay on cuBLAS. The forward first writes the low-rank term
  (plus the bias) into y with one rank-r GEMM, y = b + u·Bᵀ (N·O·b written), then adds the base
  product in place, y += x·Wᵀ (addmm_ with beta = 1): cuBLAS reads the old y in the GEMM's
  epilogue, inside a compute-bound kernel (2·N·K·O FLOPs), and writes y once. In all: y written
  twice and read once (3·N·O·b) where PEFT's eager forward moves 7·N·O·b (base y written; B's
  output written; × s read+write; the add reads two and writes one) in four launches, and a
  separate `y += u·Bᵀ` after the base GEMM would read and write y again outside any GEMM
  epilogue. The backward does the same for dX: dX = s·(du·A) ⊙ D first, then dX += dY·W.
- The rank-r products read x or dY once each: u reads x (N·K·b), du and dB read dY (2·N·O·b),
  dA reads x again (N·K·b). At rank 16 and Llama-8B's MLP (K=4096, O=14336) these memory-bound
  passes are a few per cent of the 2·N·K·O-FLOP base GEMMs.
- Dropout is exact and never stored: the keep mask of element (n, k) is Philox(seed, n·K + k)
  >= p (`tl.rand`), generated inside the Triton kernels that read x for u and dA and that write
  the low-rank part of dX, and regenerated in the backward from the seed (8 bytes saved).
  With p = 0 those three products are plain cuBLAS GEMMs.

Saved for backward by the lora_linear op: x (the input itself, no copy: several adapters on one
input share it), u [N, r] in the adapter dtype (r·4 bytes a token for fp32 adapters), the
parameters (not activations) and the dropout seed. PEFT's eager layer saves x, drop(x) (another
N·K·b when p > 0) and the [N, r] output of A, plus a mask of N·K bytes for nn.Dropout.

Dtypes: y has x's dtype. The rank-r path runs in the adapter's dtype; when that differs from x's
(fp32 adapters on a bf16 model, PEFT's default), x and dY are cast to it as PEFT casts x, which
costs an extra pass over each: keep adapters in the model dtype for the fast path.

`lora_linear_many` runs several adapted projections of one input (the attention's q/k/v) as one
op: one saved x, one GEMM x·[A_q; A_k; A_v]ᵀ for all rank-r inputs when dropout is off,
and dX accumulated from all of them with one rank-(sum of r) GEMM plus one addmm_ per base.

4-bit bases (QLoRA; ops lora_linear_4bit / _bwd): W is a frozen NF4/FP4 weight (a Quant4bit,
dequantize_4bit.py), dequantized into its compute dtype c right before the GEMM that needs it,
y += x·dequant(W)ᵀ in the forward and dX += dY·dequant(W) in the backward, and freed after each:
one [O, K] tensor of c lives at a time, and none is saved (the op saves the packed weight, which
is the parameter itself). When c is x's dtype the base product is the same epilogue addmm_ as
above; otherwise it runs in c and is added in x's dtype, as bitsandbytes' Linear4bit computes it.
The dequantization pass costs O·K·(0.52 + 2·|c|) bytes, twice a step, beside a 2·N·K·O-FLOP GEMM.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from torch import Tensor

from ._common import (absent, as_rows, capability_of, fp32_dot, kernel_op, launch, register_autograd, round_to,
                      use_triton)
from .dequantize_4bit import (META_FIELDS, base_grad_into, base_product_into, is_quantized, linear_reference,
                              unflatten_weight, flatten_weight)


# ------------------------------------------------------------------------------------------------
# Reference: PEFT's LoRA Linear forward, in plain torch (the dropout mask from `lora_dropout`).
# ------------------------------------------------------------------------------------------------
def lora_linear_reference(x, weight, lora_a, lora_b, scale, bias=None, dropout=0.0, seed=0):
    """result = F.linear(x, W, b) + B(A(drop(x))) · s in PEFT's order of operations, cast back to
    x's dtype; drop(x) = lora_dropout(x, dropout, seed), the mask the kernels use. A 4-bit W
    (Quant4bit) is dequantized and multiplied in its compute dtype, as bitsandbytes' Linear4bit."""
    result = linear_reference(x, weight, bias)
    xd = lora_dropout(x, dropout, seed) if dropout > 0 else x
    xd = xd.to(lora_a.dtype)
    return (result + F.linear(F.linear(xd, lora_a), lora_b) * scale).to(result.dtype)


# ------------------------------------------------------------------------------------------------
# Triton kernels. The keep mask of element (row, col) of an [N, K] tensor is
# rand(seed, row·K + col) >= p everywhere below, so every kernel sees the same mask.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _keep(seed, rows, cols, K, p):
    offsets = rows[:, None] * K + cols[None, :]                            # int64 [BM, BK]
    return tl.rand(seed, offsets) >= p


@triton.jit(do_not_specialize=["N", "seed"])
def _lora_dropout_kernel(
    X, Y,                      # X [N, K] (row stride STRIDE_X), Y [N, K] contiguous
    N, K, STRIDE_X, seed, p,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    x = tl.load(X + rows[:, None] * STRIDE_X + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    inv_keep = 1.0 / (1.0 - tl.cast(p, tl.float32))
    y = tl.where(_keep(seed, rows, cols, K, tl.cast(p, tl.float32)), x * inv_keep, 0.0)
    tl.store(Y + rows[:, None] * K + cols[None, :], round_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "seed"])
def _lora_down_kernel(
    X, A, U,                   # X [N, K] (row stride STRIDE_X), A [R, K] contiguous, U [N, R] contiguous
    N, K, R, STRIDE_X, seed, p, scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """U = scale · (X ⊙ keep / (1 - p))·Aᵀ: one read of X, the mask made in registers."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_mask = rows < N
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    pf = tl.cast(p, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_mask = cols < K
        x = tl.load(X + rows[:, None] * STRIDE_X + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)                                  # [BM, BK]
        x = tl.where(_keep(seed, rows, cols, K, pf), x, 0.0)
        a = tl.load(A + ranks[None, :] * K + cols[:, None], mask=(ranks < R)[None, :] & col_mask[:, None],
                    other=0.0)                                                 # [BK, BR]
        if FP32_DOT:
            acc += tl.dot(x, a.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x.to(A.dtype.element_ty), a)
    acc = acc * (tl.cast(scale, tl.float32) / (1.0 - pf))
    tl.store(U + rows[:, None] * R + ranks[None, :], round_to(acc, U.dtype.element_ty),
             mask=row_mask[:, None] & (ranks < R)[None, :])


@triton.jit(do_not_specialize=["N", "seed"])
def _lora_up_kernel(
    DU, A, DX,                 # DU [N, R] contiguous, A [R, K] contiguous, DX [N, K] contiguous
    N, K, R, seed, p, scale,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """DX (+)= scale · (DU·A) ⊙ keep / (1 - p): the low-rank part of dX, masked as it is written."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, BLOCK_R)
    row_mask, col_mask, rank_mask = rows < N, cols < K, ranks < R
    du = tl.load(DU + rows[:, None] * R + ranks[None, :], mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
    a = tl.load(A + ranks[:, None] * K + cols[None, :], mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
    if FP32_DOT:
        t = tl.dot(du.to(tl.float32), a.to(tl.float32), input_precision="ieee")    # [BM, BK]
    else:
        t = tl.dot(du.to(A.dtype.element_ty), a)
    pf = tl.cast(p, tl.float32)
    t = tl.where(_keep(seed, rows, cols, K, pf), t * (tl.cast(scale, tl.float32) / (1.0 - pf)), 0.0)
    mask = row_mask[:, None] & col_mask[None, :]
    if ACCUMULATE:
        t += tl.load(DX + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + rows[:, None] * K + cols[None, :], round_to(t, DX.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "seed"])
def _lora_grad_a_kernel(
    DU, X, PARTIAL,            # DU [N, R] contiguous, X [N, K] (row stride STRIDE_X), PARTIAL [SPLIT, R, K] fp32
    N, K, R, STRIDE_X, seed, p,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """PARTIAL[split] = Σ over this split's rows of DUᵀ·(X ⊙ keep): dA without materialising drop(x).
    Rows are dealt round-robin to SPLIT programs per column block (no atomics; torch sums)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    ranks = tl.arange(0, BLOCK_R)
    col_mask, rank_mask = cols < K, ranks < R
    pf = tl.cast(p, tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for m0 in range(split * BLOCK_M, N, n_split * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < N
        x = tl.load(X + rows[:, None] * STRIDE_X + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)                                  # [BM, BK]
        x = tl.where(_keep(seed, rows, cols, K, pf), x, 0.0)
        du = tl.load(DU + rows[:, None] * R + ranks[None, :], mask=row_mask[:, None] & rank_mask[None, :],
                     other=0.0)                                                # [BM, BR]
        if FP32_DOT:
            acc += tl.dot(tl.trans(du.to(tl.float32)), x, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(du), x.to(DU.dtype.element_ty))
    tl.store(PARTIAL + split * R * K + ranks[:, None] * K + cols[None, :], acc,
             mask=rank_mask[:, None] & col_mask[None, :])


# ------------------------------------------------------------------------------------------------
# Host launchers. Launch choices are pure functions of (capability, rank, dtypes); capability None
# is the interpreter (kernels/_common.py).
# ------------------------------------------------------------------------------------------------
class Tiles(NamedTuple):
    """Launch choice of the rank-r kernels: tile sizes and warps."""
    block_m: int
    block_k: int
    block_r: int
    num_warps: int


def _blocks(capability: tuple[int, int] | None, rank: int, fp32_dot: bool) -> Tiles:
    """Tiles for the rank-r kernels. tl.dot wants every dim >= 16; the interpreter pays per
    program and per iteration, so it gets big tiles.

    On a GPU, from the compile report (sm_90, benchmarks/NOTES.md): 64x64 tiles at 4 warps held
    96-192 registers with bf16 and spilled with fp32 adapters (fp32 dots run on the FMA units
    with whole operand tiles in registers: 255 registers and up to 5 KB of spills at rank 128).
    32x64 at 8 warps keeps every bf16 rank and fp32 up to rank 32 at 36-123 registers, no
    spills; larger fp32 ranks take 16x16 tiles (34-96 registers; 16x32 still spilled 16 B on
    sm_100). Speed is untuned until measured.
    """
    block_r = max(16, triton.next_power_of_2(rank))
    if capability is None:
        return Tiles(64, 128, block_r, 4)
    if fp32_dot and block_r > 32:
        return Tiles(16, 16, block_r, 8)
    return Tiles(32, 64, block_r, 8)


def draw_seed() -> torch.Tensor:
    """A dropout seed from torch's default CPU generator, as a 1-element int64 CPU tensor: no
    device sync, and no host read of its value either, so that torch.compile keeps the graph
    whole (the ops read it inside). torch.manual_seed makes the masks reproducible."""
    return torch.randint(0, 2**31 - 1, (1,))


def seed_tensor(seeds) -> torch.Tensor:
    """int64 CPU [n] from ints and/or 1-element tensors (draw_seed's)."""
    parts = [s.reshape(1).to(torch.int64) if isinstance(s, torch.Tensor) else torch.tensor([int(s)]) for s in seeds]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def lora_dropout(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """x ⊙ keep / (1 - p) with the kernels' mask for `seed` (inverted dropout, as nn.Dropout).

    seed: an int or draw_seed()'s tensor. The fused kernels never call this: it is the definition
    that tests and references use to apply the very mask the kernels generate. Without Triton (a
    CPU without the interpreter) the mask comes from a torch generator seeded with `seed`, and
    lora_linear uses this function too.
    """
    if p <= 0:
        return x
    seed_t = seed_tensor([seed])
    if not use_triton(x):
        gen = torch.Generator(device=x.device).manual_seed(int(seed_t[0]))
        keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
        return x * keep.to(x.dtype) / (1 - p)
    return dropout_op(x, float(p), seed_t)


def _apply_dropout(x: Tensor, p: float, seed: Tensor) -> Tensor:
    """The Triton dropout of x (any shape) with the mask of int(seed[0]): a new tensor shaped like x."""
    rows = as_rows(x if x.dim() else x.reshape(1, 1))
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    n, k = rows.shape
    # [16, 256] tiles at 8 warps: 16 elements a thread; 4 warps held 32 with the Philox state and
    # reached 25% occupancy (compile report)
    bm, bk, warps = (64, 256, 4) if capability_of(x.device) is None else (16, 256, 8)
    if n and k:
        launch(_lora_dropout_kernel, (triton.cdiv(n, bm), triton.cdiv(k, bk)),
               rows, out, n, k, rows.stride(0), int(seed[0]), p, BLOCK_M=bm, BLOCK_K=bk, num_warps=warps)
    return out.view(x.shape)


dropout_op = kernel_op("lora_dropout", fake=lambda x, p, seed: torch.empty_like(
    x, memory_format=torch.contiguous_format))(_apply_dropout)


def _dropout_save(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.p = inputs[1]


def _dropout_backward(ctx, dy):  # the same mask on the way back: d(drop(x)) = drop(dy)
    (seed,) = ctx.saved_tensors
    return None if dy is None else dropout_op(dy, ctx.p, seed), None, None


register_autograd(dropout_op, backward=_dropout_backward, save=_dropout_save)


def lora_down(x: torch.Tensor, a: torch.Tensor, scale: float, p: float, seed: int) -> torch.Tensor:
    """u = scale · drop(x)·Aᵀ [N, r] in A's dtype (x [N, K] already in A's dtype or castable)."""
    if p <= 0:
        return torch.mm(x.to(a.dtype), a.t()).mul_(scale)
    n, k = x.shape
    r = a.shape[0]
    u = torch.empty(n, r, dtype=a.dtype, device=x.device)
    capability = capability_of(x.device)
    fp32 = fp32_dot(capability, x, a)
    t = _blocks(capability, r, fp32)
    if n:
        launch(_lora_down_kernel, (triton.cdiv(n, t.block_m),),
               x, a.contiguous(), u, n, k, r, x.stride(0), seed, float(p), float(scale),
               BLOCK_M=t.block_m, BLOCK_K=t.block_k, BLOCK_R=t.block_r, FP32_DOT=fp32, num_warps=t.num_warps)
    return u


def lora_up_into(out: torch.Tensor | None, du: torch.Tensor, a: torch.Tensor, scale: float, p: float,
                 seed: int, dtype: torch.dtype) -> torch.Tensor:
    """out (+)= scale · drop(du·A), the low-rank part of dX; a new [N, K] tensor when out is None."""
    if p <= 0:
        t = torch.mm(du, a.to(du.dtype)).mul_(scale).to(dtype)
        return t if out is None else out.add_(t)
    n, r = du.shape
    k = a.shape[1]
    accumulate = out is not None
    if out is None:
        out = torch.empty(n, k, dtype=dtype, device=du.device)
    capability = capability_of(du.device)
    fp32 = fp32_dot(capability, du, a)
    t = _blocks(capability, r, fp32)
    if n:
        launch(_lora_up_kernel, (triton.cdiv(n, t.block_m), triton.cdiv(k, t.block_k)),
               du.contiguous(), a.contiguous(), out, n, k, r, seed, float(p), float(scale), ACCUMULATE=accumulate,
               BLOCK_M=t.block_m, BLOCK_K=t.block_k, BLOCK_R=t.block_r, FP32_DOT=fp32, num_warps=t.num_warps)
    return out


def lora_grad_a(du: torch.Tensor, x: torch.Tensor, scale: float, p: float, seed: int,
                dtype: torch.dtype) -> torch.Tensor:
    """dA = scale · duᵀ·drop(x) [r, K] in `dtype` (du [N, r], x [N, K])."""
    if p <= 0:
        return torch.mm(du.t(), x.to(du.dtype)).mul_(scale).to(dtype)
    n, k = x.shape
    r = du.shape[1]
    capability = capability_of(x.device)
    fp32 = fp32_dot(capability, du, x)
    t = _blocks(capability, r, fp32)
    split = max(1, min(triton.cdiv(n, t.block_m), 1 if capability is None else 16))
    partial = torch.empty(split, r, k, dtype=torch.float32, device=x.device)
    if n == 0:
        return torch.zeros(r, k, dtype=dtype, device=x.device)
    launch(_lora_grad_a_kernel, (triton.cdiv(k, t.block_k), split),
           du.contiguous(), x, partial, n, k, r, x.stride(0), seed, float(p),
           BLOCK_M=t.block_m, BLOCK_K=t.block_k, BLOCK_R=t.block_r, FP32_DOT=fp32, num_warps=t.num_warps)
    return partial.sum(0).mul_(scale / (1 - p)).to(dtype)


# ------------------------------------------------------------------------------------------------
# The custom ops: one forward and one backward for one or several adapted projections of the
# same input. params holds the tensors of each projection in turn, W, b, A, B, with b left out
# where has_bias says so (autograd takes a list of tensors only when none of them is None).
# ------------------------------------------------------------------------------------------------
class Adapter(NamedTuple):
    """Static settings of one adapted projection: LoRA scale s, dropout p and its seed."""
    scale: float
    dropout: float = 0.0
    seed: int = 0


class Projection(NamedTuple):
    """The tensors of one adapted projection."""
    weight: Tensor
    bias: Tensor | None
    lora_a: Tensor
    lora_b: Tensor


def dense_projections(params, has_bias) -> list[Projection]:
    out, i = [], 0
    for bias in has_bias:
        n = 4 if bias else 3
        w, *rest = params[i: i + n]
        out.append(Projection(w, rest[0], *rest[1:]) if bias else Projection(w, None, *rest))
        i += n
    return out


def _flat(projections: list[Projection]) -> list[Tensor]:
    """The inverse of dense_projections: present tensors in order (W, b, A, B)."""
    return [t for pr in projections for t in pr if t is not None]


def _adapters(scales, dropouts, seeds: Tensor) -> list[Adapter]:
    return [Adapter(s, p, seed) for s, p, seed in zip(scales, dropouts, seeds.tolist())]


def _plain_group(adapters: list[Adapter], projections: list[Projection]) -> bool:
    """Several projections, no dropout, one adapter dtype: their rank-r products can be stacked."""
    return len(adapters) > 1 and all(ad.dropout == 0 for ad in adapters) and \
        len({pr.lora_a.dtype for pr in projections}) == 1


def _stacked_down(x, adapters, projections):
    """[u_1, ..., u_n] from one GEMM x·[s_1 A_1; ...; s_n A_n]ᵀ (one read of x), or None."""
    if not _plain_group(adapters, projections):
        return None
    a_all = torch.cat([pr.lora_a * ad.scale for pr, ad in zip(projections, adapters)])
    u_all = torch.mm(x.to(a_all.dtype), a_all.t())
    # clone, not contiguous(): a one-row slice is contiguous already, and outputs must not alias
    widths = [pr.lora_a.shape[0] for pr in projections]
    return [u.clone(memory_format=torch.contiguous_format) for u in u_all.split(widths, 1)]


def _forward_one(x, pr: Projection, ad: Adapter, u=None):
    """(y, u) for one projection: y = b + u·Bᵀ written first, then y += x·Wᵀ (see docstring)."""
    if u is None:
        u = lora_down(x, pr.lora_a, ad.scale, ad.dropout, ad.seed)             # [N, r], A's dtype
    bt = pr.lora_b.to(x.dtype).t()
    uy = u.to(x.dtype)
    y = torch.mm(uy, bt) if pr.bias is None else torch.addmm(pr.bias.to(x.dtype), uy, bt)  # [N, O]
    base_product_into(y, x, pr.weight)                                          # beta = 1: epilogue add
    return y, u


def _lora_forward(x: Tensor, params: list[Tensor], has_bias: list[bool], scales: list[float],
                  dropouts: list[float], seeds: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """([y_i [rows, O_i]], [u_i [rows, r_i]]): the outputs, and the rank-r inputs the backward needs."""
    return _forward_projections(as_rows(x), dense_projections(params, has_bias), _adapters(scales, dropouts, seeds))


def _forward_projections(rows: Tensor, projections: list[Projection], adapters: list[Adapter]):
    stacked = _stacked_down(rows, adapters, projections)
    outs, us = [], []
    for i, (pr, ad) in enumerate(zip(projections, adapters)):
        y, u = _forward_one(rows, pr, ad, None if stacked is None else stacked[i])
        outs.append(y)
        us.append(u)
    return outs, us


def _lora_backward(dys: list[Tensor | None], x: Tensor, params: list[Tensor], has_bias: list[bool],
                   us: list[Tensor], scales: list[float], dropouts: list[float], seeds: Tensor,
                   needs: list[bool]) -> tuple[Tensor, list[Tensor]]:
    """(dX shaped like x, the gradients of params in their order); absent() for what needs (x's,
    then 4 per projection: W, b, A, B) does not ask."""
    projections = dense_projections(params, has_bias)
    dx, grads = _backward_projections(dys, x, projections, _adapters(scales, dropouts, seeds), us, needs)
    return dx, [g for g, pr in zip(grads, (t for pr in projections for t in pr)) if pr is not None]


def _backward_projections(dys, x, projections: list[Projection], adapters: list[Adapter], us, needs):
    """(dX, [dW, db, dA, dB] per projection, absent() where not asked)."""
    rows = as_rows(x)
    need_x, need = needs[0], needs[1:]
    grads = [absent(x) for _ in range(4 * len(projections))]
    dx = None
    pending = []  # (dY, W) base products added into dx last, as addmm_ epilogues
    dus = []
    stack = _plain_group(adapters, projections)
    for i, (pr, ad) in enumerate(zip(projections, adapters)):
        dy = dys[i]
        if dy is None:
            continue
        dy = as_rows(dy)
        dy_lr = dy.to(pr.lora_a.dtype)
        du = torch.mm(dy_lr, pr.lora_b)                                          # [N, r]
        if need[4 * i + 3]:
            grads[4 * i + 3] = torch.mm(dy_lr.t(), us[i]).to(pr.lora_b.dtype)    # dB [O, r]
        if need[4 * i + 2]:
            grads[4 * i + 2] = lora_grad_a(du, rows, ad.scale, ad.dropout, ad.seed, pr.lora_a.dtype)
        if need[4 * i]:
            grads[4 * i] = torch.mm(dy.t(), rows.to(dy.dtype)).to(pr.weight.dtype)  # dW
        if pr.bias is not None and need[4 * i + 1]:
            grads[4 * i + 1] = dy.sum(0, dtype=torch.float32).to(pr.bias.dtype)
        if need_x:
            pending.append((dy, pr.weight))
            dus.append(du)
            if not stack:
                dx = lora_up_into(dx, du, pr.lora_a, ad.scale, ad.dropout, ad.seed, rows.dtype)
    if stack and pending:  # one rank-(r_1 + ... + r_n) GEMM for the low-rank part of dX
        used = [i for i in range(len(adapters)) if dys[i] is not None]
        a_all = torch.cat([projections[i].lora_a * adapters[i].scale for i in used])
        dx = torch.mm(torch.cat(dus, 1), a_all).to(rows.dtype)
    if dx is None:
        dx = torch.zeros(x.shape, dtype=x.dtype, device=x.device) if need_x else absent(x)
    else:
        for dy, w in pending:  # a 4-bit W is dequantized here, one at a time
            base_grad_into(dx, dy, w)
        dx = dx.view(x.shape)
    return dx, grads


def _lora_forward_fake(x, params, has_bias, scales, dropouts, seeds):
    n = x.numel() // x.shape[-1]
    projections = dense_projections(params, has_bias)
    return ([x.new_empty(n, pr.weight.shape[0]) for pr in projections],
            [x.new_empty(n, pr.lora_a.shape[0], dtype=pr.lora_a.dtype) for pr in projections])


def _lora_backward_fake(dys, x, params, has_bias, us, scales, dropouts, seeds, needs):
    flat = [t for pr in dense_projections(params, has_bias) for t in pr]
    grads = [torch.empty_like(t) if needed else absent(x) for t, needed in zip(flat, needs[1:]) if t is not None]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if needs[0] else absent(x)
    return dx, grads


lora_linear_fwd = kernel_op("lora_linear", fake=_lora_forward_fake)(_lora_forward)
lora_linear_bwd = kernel_op("lora_linear_bwd", fake=_lora_backward_fake)(_lora_backward)


def _save(ctx, inputs, output):
    x, params, has_bias, scales, dropouts, seeds = inputs
    ys, us = output
    ctx.save_for_backward(x, seeds, *us, *params)
    ctx.n_us, ctx.has_bias, ctx.scales, ctx.dropouts = len(us), has_bias, scales, dropouts
    ctx.mark_non_differentiable(*us)


def _backward(ctx, dys, _dus):
    x, seeds, *rest = ctx.saved_tensors
    us, params = rest[:ctx.n_us], rest[ctx.n_us:]
    need_params = list(ctx.needs_input_grad[1])
    per_projection = iter(need_params)  # needs for W, b, A, B (False for an absent b)
    needs = [bool(ctx.needs_input_grad[0])]
    for bias in ctx.has_bias:
        w, b = next(per_projection), next(per_projection) if bias else False
        needs += [w, b, next(per_projection), next(per_projection)]
    dx, grads = lora_linear_bwd(list(dys), x, list(params), ctx.has_bias, list(us), ctx.scales, ctx.dropouts,
                                seeds, needs)
    return (dx if needs[0] else None, [g if n else None for g, n in zip(grads, need_params)],
            None, None, None, None)


register_autograd(lora_linear_fwd, backward=_backward, save=_save)


# ------------------------------------------------------------------------------------------------
# The same ops over 4-bit bases (QLoRA; dense and 4-bit projections may mix). A projection's weight
# is a run of tensors described by META_FIELDS ints (kernels/dequantize_4bit.py), then b (where
# has_bias says), A and B. A 4-bit W is dequantized into its compute dtype right before its GEMM
# and freed after it, in the forward and again in the backward for dX; what the op saves is the
# packed weight and its quantization state, the parameters themselves (no copy).
# ------------------------------------------------------------------------------------------------
def quant_projections(params, has_bias, weight_meta) -> tuple[list[Projection], list[int]]:
    """The projections, and how many tensors of params each one's weight took."""
    projections, widths, i = [], [], 0
    for j, bias in enumerate(has_bias):
        w, n = unflatten_weight(params, i, weight_meta[META_FIELDS * j: META_FIELDS * (j + 1)])
        i += n
        b = params[i] if bias else None
        i += int(bias)
        projections.append(Projection(w, b, params[i], params[i + 1]))
        widths.append(n)
        i += 2
    return projections, widths


def flatten_projections(layers) -> tuple[list[Tensor], list[bool], list[int]]:
    """(params, has_bias, weight_meta) of (W, b, A, B) tuples, W dense or Quant4bit."""
    params, has_bias, weight_meta = [], [], []
    for w, b, a, bm in layers:
        tensors, meta = flatten_weight(w)
        params += tensors + ([] if b is None else [b]) + [a, bm]
        has_bias.append(b is not None)
        weight_meta += meta
    return params, has_bias, weight_meta


def slot_needs(need_params: list[bool], projections: list[Projection], widths: list[int]) -> list[bool]:
    """Per-tensor needs -> the [W, b, A, B] needs of each projection (no gradient for a 4-bit W)."""
    needs, i = [], 0
    for pr, n in zip(projections, widths):
        w = need_params[i] and not is_quantized(pr.weight)
        i += n
        b = pr.bias is not None and need_params[i]
        i += int(pr.bias is not None)
        needs += [w, b, need_params[i], need_params[i + 1]]
        i += 2
    return needs


def slot_grads(grads: list[Tensor], projections: list[Projection], widths: list[int], like: Tensor) -> list[Tensor]:
    """[dW, db, dA, dB] per projection -> one gradient per tensor of params (absent for a 4-bit W's)."""
    out = []
    for k, (pr, n) in enumerate(zip(projections, widths)):
        out += [absent(like) for _ in range(n)] if is_quantized(pr.weight) else [grads[4 * k]]
        out += ([] if pr.bias is None else [grads[4 * k + 1]]) + [grads[4 * k + 2], grads[4 * k + 3]]
    return out


def _lora_4bit_forward(x: Tensor, params: list[Tensor], has_bias: list[bool], weight_meta: list[int],
                       scales: list[float], dropouts: list[float], seeds: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    projections, _ = quant_projections(params, has_bias, weight_meta)
    return _forward_projections(as_rows(x), projections, _adapters(scales, dropouts, seeds))


def _lora_4bit_backward(dys: list[Tensor | None], x: Tensor, params: list[Tensor], has_bias: list[bool],
                        weight_meta: list[int], us: list[Tensor], scales: list[float], dropouts: list[float],
                        seeds: Tensor, needs: list[bool]) -> tuple[Tensor, list[Tensor]]:
    """needs: x's, then one per tensor of params."""
    projections, widths = quant_projections(params, has_bias, weight_meta)
    dx, grads = _backward_projections(dys, x, projections, _adapters(scales, dropouts, seeds), us,
                                      [needs[0], *slot_needs(needs[1:], projections, widths)])
    return dx, slot_grads(grads, projections, widths, x)


def _lora_4bit_forward_fake(x, params, has_bias, weight_meta, scales, dropouts, seeds):
    n = x.numel() // x.shape[-1]
    projections, _ = quant_projections(params, has_bias, weight_meta)
    return ([x.new_empty(n, pr.weight.shape[0]) for pr in projections],
            [x.new_empty(n, pr.lora_a.shape[0], dtype=pr.lora_a.dtype) for pr in projections])


def _lora_4bit_backward_fake(dys, x, params, has_bias, weight_meta, us, scales, dropouts, seeds, needs):
    grads = [torch.empty_like(t) if needed else absent(x) for t, needed in zip(params, needs[1:])]
    return torch.empty_like(x, memory_format=torch.contiguous_format) if needs[0] else absent(x), grads


lora_linear_4bit_fwd = kernel_op("lora_linear_4bit", fake=_lora_4bit_forward_fake)(_lora_4bit_forward)
lora_linear_4bit_bwd = kernel_op("lora_linear_4bit_bwd", fake=_lora_4bit_backward_fake)(_lora_4bit_backward)


def _save_4bit(ctx, inputs, output):
    x, params, has_bias, weight_meta, scales, dropouts, seeds = inputs
    _, us = output
    ctx.save_for_backward(x, seeds, *us, *params)
    ctx.n_us, ctx.has_bias, ctx.weight_meta, ctx.scales, ctx.dropouts = len(us), has_bias, weight_meta, scales, dropouts
    ctx.mark_non_differentiable(*us)


def _backward_4bit(ctx, dys, _dus):
    x, seeds, *rest = ctx.saved_tensors
    us, params = rest[:ctx.n_us], rest[ctx.n_us:]
    need_params = [bool(n) for n in ctx.needs_input_grad[1]]
    needs = [bool(ctx.needs_input_grad[0]), *need_params]
    dx, grads = lora_linear_4bit_bwd(list(dys), x, list(params), ctx.has_bias, ctx.weight_meta, list(us),
                                     ctx.scales, ctx.dropouts, seeds, needs)
    return (dx if needs[0] else None, [g if n else None for g, n in zip(grads, need_params)],
            None, None, None, None, None)


register_autograd(lora_linear_4bit_fwd, backward=_backward_4bit, save=_save_4bit)


def check_lora(x, weight, lora_a, lora_b, bias):
    if len(weight.shape) != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"lora_linear: weight {tuple(weight.shape)} does not take inputs of size "
                         f"{x.shape[-1]}; pass the base layer's [out, in] weight")
    if lora_a.dim() != 2 or lora_a.shape[1] != x.shape[-1]:
        raise ValueError(f"lora_linear: A {tuple(lora_a.shape)} must be [r, in={x.shape[-1]}]")
    if lora_b.dim() != 2 or lora_b.shape != (weight.shape[0], lora_a.shape[0]):
        raise ValueError(f"lora_linear: B {tuple(lora_b.shape)} must be [out={weight.shape[0]}, "
                         f"r={lora_a.shape[0]}]")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"lora_linear: bias {tuple(bias.shape)} must be [{weight.shape[0]}]")
    if x.dtype != weight.dtype and not is_quantized(weight):  # a 4-bit W runs in its compute dtype
        raise ValueError(f"lora_linear: x ({x.dtype}) and the base weight ({weight.dtype}) must share a dtype, "
                         "as nn.Linear requires")


def lora_linear_many(x: torch.Tensor, layers, dropout=0.0, seeds=None) -> tuple[torch.Tensor, ...]:
    """Several LoRA projections of one input x: layers is a sequence of (W, b, A, B, scale); one
    output per layer. dropout (a float or one per layer) with seeds (one per layer: ints or
    draw_seed() tensors; drawn from torch's generator when None)."""
    layers = list(layers)
    drops = [float(dropout)] * len(layers) if isinstance(dropout, (int, float)) else [float(p) for p in dropout]
    if any(not 0.0 <= p < 1.0 for p in drops):
        raise ValueError(f"lora_linear: dropout {drops} must lie in [0, 1)")
    if seeds is None:
        seeds = [draw_seed() if p > 0 else 0 for p in drops]
    for w, b, a, bm, _ in layers:
        check_lora(x, w, a, bm, b)
    if not use_triton(x, *[t for layer in layers for t in layer[:4] if isinstance(t, torch.Tensor)]):
        return tuple(lora_linear_reference(x, w, a, bm, s, b, p, seed)
                     for (w, b, a, bm, s), p, seed in zip(layers, drops, seeds))
    if any(is_quantized(layer[0]) for layer in layers):
        params, has_bias, weight_meta = flatten_projections(layer[:4] for layer in layers)
        outs, _ = lora_linear_4bit_fwd(x, params, has_bias, weight_meta, [float(layer[4]) for layer in layers],
                                       drops, seed_tensor(seeds))
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)
    params = [t for (w, b, a, bm, _) in layers for t in (w, b, a, bm) if t is not None]
    outs, _ = lora_linear_fwd(x, params, [layer[1] is not None for layer in layers],
                              [float(layer[4]) for layer in layers], drops, seed_tensor(seeds))
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float, bias: torch.Tensor | None = None, dropout: float = 0.0,
                seed: int | None = None) -> torch.Tensor:
    """y = x·Wᵀ (+ b) + scale·(drop(x)·Aᵀ)·Bᵀ over the last dim of x (any leading shape).

    weight [out, in] and bias [out] are the base layer's (trainable or frozen: gradients are
    computed for what requires them), or weight is a frozen 4-bit one (a Quant4bit, see
    dequantize_4bit.py: the base product then runs in its compute dtype); lora_a [r, in],
    lora_b [out, r]. dropout applies to the adapter's input only (PEFT's lora_dropout), with a
    Philox mask regenerated from `seed` in the backward (drawn from torch's generator when None).
    See the module docstring.
    """
    return lora_linear_many(x, [(weight, bias, lora_a, lora_b, scale)], dropout,
                            None if seed is None else [seed])[0]
