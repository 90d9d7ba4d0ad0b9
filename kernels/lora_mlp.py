"""Gated MLP with LoRA on gate, up and down: y = down(act(gate(x)) ⊙ up(x)), each a LoRA linear.

Math (SwiGLU / GeGLU: Shazeer 2020, "GLU Variants Improve Transformer"; LoRA as in lora.py), with
x [N, H], gate/up [I, H], down [H, I], scales s_g, s_u, s_d and dropout masks D_g, D_u (on x) and
D_d (on h), each an independent Philox stream (lora.py):
    xa_g = s_g·(x ⊙ D_g)·A_gᵀ,  xa_u = s_u·(x ⊙ D_u)·A_uᵀ                  [N, r]
    g    = x·W_gᵀ + b_g + xa_g·B_gᵀ,   u = x·W_uᵀ + b_u + xa_u·B_uᵀ         [N, I]
    h    = act(g) ⊙ u                  act = silu, gelu (tanh approximation) or gelu (erf)
    hd   = s_d·(h ⊙ D_d)·A_dᵀ                                              [N, r]
    y    = h·W_dᵀ + b_d + hd·B_dᵀ
Backward, with dY:
    dhd = dY·B_d;  dB_d = dYᵀ·hd;  dA_d = s_d·dhdᵀ·(h ⊙ D_d)
    dh  = dY·W_d + s_d·(dhd·A_d) ⊙ D_d
    dg  = dh ⊙ u ⊙ act'(g),  du = dh ⊙ act(g)
    dxa_g = dg·B_g;  dB_g = dgᵀ·xa_g;  dA_g = s_g·dxa_gᵀ·(x ⊙ D_g)   (and the same for up)
    dX  = s_g·(dxa_g·A_g) ⊙ D_g + s_u·(dxa_u·A_u) ⊙ D_u + dg·W_g + du·W_u
(sigmoid'/tanh' from the closed forms; gelu'(g) = Φ(g) + g·φ(g) for the erf form.)

Where the work goes (b = bytes per element; per token at Llama-3.1-8B, H = 4096, I = 14336):
- cuBLAS: x·W_gᵀ, x·W_uᵀ, h·W_dᵀ (forward, 3·2·H·I FLOPs a token), dY·W_d, dg·W_g, du·W_u (and
  the dW products if the base trains). The forward writes g_base = x·W_gᵀ (+ b) and u_base
  without any LoRA term: the low-rank terms xa·Bᵀ are added inside the Triton activation kernel,
  which has to read g_base and u_base anyway (a rank-r tl.dot per tile, no extra pass).
- Forward Triton kernel, one program per BLOCK_M rows looping over I: reads g_base, u_base, adds
  the low-rank terms, writes h (2·I·b read, I·b written) and, from the h tile in registers,
  accumulates hd = s_d·drop(h)·A_dᵀ, so the down adapter never reads h again. y is then produced
  as in lora.py: y = b_d + hd·B_dᵀ written first, y += h·W_dᵀ in the GEMM's epilogue.
- Backward Triton kernel, the same layout: reads dY·W_d, g_base, u_base, recomputes g, u, act(g)
  and h, adds the down adapter's low-rank dh term with its mask, writes dg, du and drop(h) (for
  dA_d; h itself too when W_d trains) and accumulates dxa_g = dg·B_g and dxa_u = du·B_u from the
  tiles in registers (no extra read of dg or du).

Saved for backward by the lora_mlp op: x, g_base, u_base (the pre-activations without the LoRA
terms, which are recomputed from xa·Bᵀ), xa_g, xa_u and hd [N, r], the parameters and three
seeds: (H + 2·I)·b + 3·r·b' bytes a token (b' the adapter's element size), 65.6 KB at Llama-8B
shapes, rank 16, bf16. h = act(g)·u is not saved: the backward recomputes it. PEFT's eager MLP
saves x, g (after the LoRA add), act(g), u and h: (H + 4·I)·b plus the rank-r tensors, about
123 KB a token, and another N·H·b per adapter (and an N·I mask) once dropout > 0.

Over 4-bit bases (QLoRA; ops lora_mlp_4bit / _bwd) the three base GEMMs of each pass take their
weight from kernels/dequantize_4bit.py, dequantized just before and freed just after (lora.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from torch import Tensor

from ._common import (absent, as_rows, capability_of, fp32_dot, kernel_op, launch, register_autograd, round_to,
                      use_triton)
from .activations import ACT_ID, ACTIVATIONS, act_and_grad, activation_reference
from .dequantize_4bit import base_grad, base_grad_into, base_product, base_product_into, is_quantized
from .lora import (check_lora, dense_projections, draw_seed, flatten_projections, lora_down, lora_grad_a, lora_linear,
                   lora_linear_reference, lora_up_into, quant_projections, seed_tensor, slot_grads, slot_needs)

def lora_mlp_reference(x, gate, up, down, activation="silu", dropout=(0.0, 0.0, 0.0), seeds=(0, 0, 0)):
    """PEFT's computation: each of gate/up/down a LoRA linear (W, b, A, B, scale) in PEFT's order."""
    g = lora_linear_reference(x, *_args(gate), dropout[0], seeds[0])
    u = lora_linear_reference(x, *_args(up), dropout[1], seeds[1])
    h = activation_reference(g, activation) * u
    return lora_linear_reference(h, *_args(down), dropout[2], seeds[2])


def _args(layer):
    w, b, a, bm, s = layer
    return w, a, bm, s, b


# ------------------------------------------------------------------------------------------------
# Triton: activation forward / backward with the LoRA epilogues.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _low_rank_tile(XA, B, rows, cols, row_mask, col_mask, R, BLOCK_R: tl.constexpr, FP32_DOT: tl.constexpr):
    """XA[rows, :]·B[cols, :]ᵀ: [BM, BI] fp32 (XA [N, R], B [I, R], both contiguous)."""
    ranks = tl.arange(0, BLOCK_R)
    xa = tl.load(XA + rows[:, None] * R + ranks[None, :], mask=row_mask[:, None] & (ranks < R)[None, :], other=0.0)
    b = tl.load(B + cols[None, :] * R + ranks[:, None], mask=col_mask[None, :] & (ranks < R)[:, None], other=0.0)
    if FP32_DOT:
        return tl.dot(xa.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(xa.to(B.dtype.element_ty), b)


@triton.jit
def _gate_up_tile(G, U, XA_G, XA_U, B_G, B_U, rows, cols, row_mask, col_mask, mask, STRIDE_G, STRIDE_U, R_G, R_U,
                  BR_G: tl.constexpr, BR_U: tl.constexpr, FP32_DOT: tl.constexpr):
    """The gate and up pre-activations of one [BM, BI] tile, fp32: the base GEMMs' outputs G, U
    plus their low-rank terms (recomputed in the backward rather than saved)."""
    g = tl.load(G + rows[:, None] * STRIDE_G + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * STRIDE_U + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g += _low_rank_tile(XA_G, B_G, rows, cols, row_mask, col_mask, R_G, BR_G, FP32_DOT)
    u += _low_rank_tile(XA_U, B_U, rows, cols, row_mask, col_mask, R_U, BR_U, FP32_DOT)
    return g, u


@triton.jit(do_not_specialize=["N", "seed"])
def _lora_mlp_fwd_kernel(
    G, U, XA_G, XA_U, B_G, B_U, A_D, H, HD,   # G, U [N, I] (row strides), XA_* [N, R_*], B_* [I, R_*],
    N, I, R_G, R_U, R_D, STRIDE_G, STRIDE_U,  # A_D [R_D, I], H [N, I] contiguous, HD [N, R_D] contiguous
    seed, p, scale,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BR_G: tl.constexpr, BR_U: tl.constexpr,
    BR_D: tl.constexpr, FP32_DOT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    ranks_d = tl.arange(0, BR_D)
    pf = tl.cast(p, tl.float32)
    acc = tl.zeros([BLOCK_M, BR_D], dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        col_mask = cols < I
        mask = row_mask[:, None] & col_mask[None, :]
        g, u = _gate_up_tile(G, U, XA_G, XA_U, B_G, B_U, rows, cols, row_mask, col_mask, mask, STRIDE_G, STRIDE_U,
                             R_G, R_U, BR_G, BR_U, FP32_DOT)
        a, _ = act_and_grad(g, ACT)
        h = round_to(a * u, H.dtype.element_ty)                               # [BM, BI]
        tl.store(H + rows[:, None] * I + cols[None, :], h, mask=mask)
        if HAS_DROPOUT:
            hm = tl.where(tl.rand(seed, rows[:, None] * I + cols[None, :]) >= pf, h.to(tl.float32), 0.0)
        else:  # no Philox stream to generate (about 80 integer ops an element)
            hm = h.to(tl.float32)
        ad = tl.load(A_D + ranks_d[None, :] * I + cols[:, None], mask=(ranks_d < R_D)[None, :] & col_mask[:, None],
                     other=0.0)                                               # [BI, BR_D]
        if FP32_DOT:
            acc += tl.dot(hm, ad.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(hm.to(A_D.dtype.element_ty), ad)
    acc = acc * (tl.cast(scale, tl.float32) / (1.0 - pf))
    tl.store(HD + rows[:, None] * R_D + ranks_d[None, :], round_to(acc, HD.dtype.element_ty),
             mask=row_mask[:, None] & (ranks_d < R_D)[None, :])


@triton.jit(do_not_specialize=["N", "seed"])
def _lora_mlp_bwd_kernel(
    DH, DHD, G, U, XA_G, XA_U, B_G, B_U, A_D,   # DH [N, I] = dY·W_d (contiguous), DHD [N, R_D] = dY·B_d
    DG, DU, HM, HF, DXA_G, DXA_U,              # DG, DU, HM, HF [N, I]; DXA_* [N, R_*] fp32
    N, I, R_G, R_U, R_D, STRIDE_G, STRIDE_U,
    seed, p, scale,
    ACT: tl.constexpr, STORE_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
    BR_G: tl.constexpr, BR_U: tl.constexpr, BR_D: tl.constexpr, FP32_DOT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    ranks_g, ranks_u, ranks_d = tl.arange(0, BR_G), tl.arange(0, BR_U), tl.arange(0, BR_D)
    pf = tl.cast(p, tl.float32)
    inv_keep = 1.0 / (1.0 - pf)
    dhd = tl.load(DHD + rows[:, None] * R_D + ranks_d[None, :], mask=row_mask[:, None] & (ranks_d < R_D)[None, :],
                  other=0.0)                                                  # [BM, BR_D]
    acc_g = tl.zeros([BLOCK_M, BR_G], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BR_U], dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        col_mask = cols < I
        mask = row_mask[:, None] & col_mask[None, :]
        g, u = _gate_up_tile(G, U, XA_G, XA_U, B_G, B_U, rows, cols, row_mask, col_mask, mask, STRIDE_G, STRIDE_U,
                             R_G, R_U, BR_G, BR_U, FP32_DOT)
        a, da = act_and_grad(g, ACT)
        h = round_to(a * u, HM.dtype.element_ty).to(tl.float32)
        if HAS_DROPOUT:
            keep = tl.rand(seed, rows[:, None] * I + cols[None, :]) >= pf
        else:
            keep = tl.full([BLOCK_M, BLOCK_I], 1, tl.int1)
        ad = tl.load(A_D + ranks_d[:, None] * I + cols[None, :], mask=(ranks_d < R_D)[:, None] & col_mask[None, :],
                     other=0.0)                                               # [BR_D, BI]
        if FP32_DOT:
            low = tl.dot(dhd.to(tl.float32), ad.to(tl.float32), input_precision="ieee")
        else:
            low = tl.dot(dhd.to(A_D.dtype.element_ty), ad)
        dh = tl.load(DH + rows[:, None] * I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dh += tl.where(keep, low * (tl.cast(scale, tl.float32) * inv_keep), 0.0)
        dg = round_to(dh * u * da, DG.dtype.element_ty)
        du = round_to(dh * a, DU.dtype.element_ty)
        tl.store(DG + rows[:, None] * I + cols[None, :], dg, mask=mask)
        tl.store(DU + rows[:, None] * I + cols[None, :], du, mask=mask)
        tl.store(HM + rows[:, None] * I + cols[None, :], round_to(tl.where(keep, h * inv_keep, 0.0),
                                                                   HM.dtype.element_ty), mask=mask)
        if STORE_H:
            tl.store(HF + rows[:, None] * I + cols[None, :], round_to(h, HF.dtype.element_ty), mask=mask)
        bg = tl.load(B_G + cols[:, None] * R_G + ranks_g[None, :], mask=col_mask[:, None] & (ranks_g < R_G)[None, :],
                     other=0.0)                                               # [BI, BR_G]
        bu = tl.load(B_U + cols[:, None] * R_U + ranks_u[None, :], mask=col_mask[:, None] & (ranks_u < R_U)[None, :],
                     other=0.0)
        if FP32_DOT:
            acc_g += tl.dot(dg.to(tl.float32), bg.to(tl.float32), input_precision="ieee")
            acc_u += tl.dot(du.to(tl.float32), bu.to(tl.float32), input_precision="ieee")
        else:
            acc_g += tl.dot(dg.to(B_G.dtype.element_ty), bg)
            acc_u += tl.dot(du.to(B_U.dtype.element_ty), bu)
    tl.store(DXA_G + rows[:, None] * R_G + ranks_g[None, :], acc_g, mask=row_mask[:, None] & (ranks_g < R_G)[None, :])
    tl.store(DXA_U + rows[:, None] * R_U + ranks_u[None, :], acc_u, mask=row_mask[:, None] & (ranks_u < R_U)[None, :])


class MLPTiles(NamedTuple):
    """Launch choice of the activation kernels."""
    block_m: int
    block_i: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None

    def options(self) -> dict:
        """The launch options (maxnreg only when set: the interpreter takes no such option)."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages,
                    **({"maxnreg": self.maxnreg} if self.maxnreg else {}))


def _mlp_blocks(capability: tuple[int, int] | None, ranks: tuple[int, ...], fp32_dot: bool) -> MLPTiles:
    """Tiles for the activation kernels (ranks: gate's, up's and down's).

    The interpreter (capability None) gets big tiles. On a GPU, from the compile report (sm_80,
    sm_90, sm_100, with triton 3.8 and 3.6; benchmarks/NOTES.md): 64x64 tiles at 4 warps and 3
    stages spilled (48-680 B) and at rank 128 needed 250-390 KB of shared memory (pipeline buffers
    for six dot operands). One stage and 32x32 tiles at 8 warps fit, with maxnreg=255: left to
    itself ptxas held some of these 256-thread programs to 128 registers and spilled 16-40 B.
    Ranks that are not multiples of 16 load their rows unvectorised and take 32x16 tiles (4 B of
    spills on sm_100 at rank 8 otherwise). fp32 dots above rank 32 do not fit (`_fused_fits`)."""
    if capability is None:
        return MLPTiles(64, 128, 4, 1)
    return MLPTiles(32, 32 if all(r % 16 == 0 for r in ranks) else 16, 8, 1, maxnreg=255)


def _launch_choice(x: Tensor, ag: Tensor, au: Tensor, ad: Tensor) -> tuple[bool, MLPTiles]:
    """(FP32_DOT, tiles) of the activation kernels for these operands on x's device."""
    capability = capability_of(x.device)
    fp32 = fp32_dot(capability, x, ag, au, ad)
    return fp32, _mlp_blocks(capability, (ag.shape[0], au.shape[0], ad.shape[0]), fp32)


def _fused_fits(x: Tensor, *adapters: Tensor) -> bool:
    """Whether the fused activation kernels compile without spills for these ranks and dtypes on a
    GPU: bf16 adapters to rank 128, fp32 or mixed-dtype ones to rank 32 (fp32 dots run on the FMA
    units with their operand tiles in registers; rank 64 still spilled at 16x16 tiles). Decided
    from the dtypes alone, so that the meta device and FakeTensorMode take the path a GPU takes;
    beyond it, lora_mlp composes three lora_linear ops and the eager activation, which compute the
    same thing."""
    br = max(_br(a.shape[0]) for a in adapters)
    return br <= 128 and (br <= 32 or not fp32_dot((9, 0), x, *adapters))


def _br(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


# ------------------------------------------------------------------------------------------------
# The custom ops (kernels/_common.py): the forward returns y and what the backward needs (g_base,
# u_base, xa_g, xa_u, hd); the backward op returns dX and the parameters' gradients. params holds
# gate's, up's and down's W, b, A, B in turn, each b left out where has_bias says so (lora.py).
# ------------------------------------------------------------------------------------------------
def _mlp_forward(x: Tensor, params: list[Tensor], has_bias: list[bool], activation: str, dropouts: list[float],
                 seeds: Tensor, scales: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y [rows, H], g_base, u_base [rows, I], xa_g, xa_u, hd [rows, r])."""
    return _mlp_forward_projections(as_rows(x), dense_projections(params, has_bias), activation, dropouts, seeds, scales)


def _mlp_forward_projections(rows, projections, activation, dropouts, seeds, scales):
    (wg, bg, ag, bmg), (wu, bu, au, bmu), (wd, bd, ad, bmd) = projections
    (pg, pu, pd), (sg, su, sd), seeds = dropouts, scales, seeds.tolist()
    n = rows.shape[0]
    inter = wg.shape[0]
    if pg == 0 and pu == 0 and ag.dtype == au.dtype:  # one read of x for both rank-r inputs
        xa = torch.mm(rows.to(ag.dtype), torch.cat([ag * sg, au * su]).t())
        # clone, not contiguous(): with one row both halves are already contiguous views of xa,
        # and a custom op's outputs may not alias each other
        xa_g, xa_u = xa[:, : ag.shape[0]].clone(), xa[:, ag.shape[0]:].clone()
    else:
        xa_g = lora_down(rows, ag, sg, pg, seeds[0])
        xa_u = lora_down(rows, au, su, pu, seeds[1])
    g = base_product(rows, wg, bg)                                                  # [N, I]
    u = base_product(rows, wu, bu)
    h = torch.empty(n, inter, dtype=rows.dtype, device=rows.device)
    hd = torch.empty(n, ad.shape[0], dtype=ad.dtype, device=rows.device)
    fp32, t = _launch_choice(rows, ag, au, ad)
    if n:
        launch(_lora_mlp_fwd_kernel, (triton.cdiv(n, t.block_m),),
               g, u, xa_g, xa_u, bmg.contiguous(), bmu.contiguous(), ad.contiguous(), h, hd, n, inter, ag.shape[0],
               au.shape[0], ad.shape[0], g.stride(0), u.stride(0), seeds[2], float(pd), float(sd),
               ACT=ACT_ID[activation], BLOCK_M=t.block_m, BLOCK_I=t.block_i, BR_G=_br(ag.shape[0]),
               BR_U=_br(au.shape[0]), BR_D=_br(ad.shape[0]), FP32_DOT=fp32, HAS_DROPOUT=pd > 0,
               **t.options())
    bdt = bmd.to(rows.dtype).t()
    hdy = hd.to(rows.dtype)
    y = torch.mm(hdy, bdt) if bd is None else torch.addmm(bd, hdy, bdt)             # [N, H]
    base_product_into(y, h, wd)                                                    # epilogue add
    return y, g, u, xa_g, xa_u, hd  # y [rows, H]: never a view (kernels/_common.py, as_rows)


def _mlp_backward(dy: Tensor, x: Tensor, g: Tensor, u: Tensor, xa_g: Tensor, xa_u: Tensor, hd: Tensor,
                  params: list[Tensor], has_bias: list[bool], activation: str, dropouts: list[float],
                  seeds: Tensor, scales: list[float], needs: list[bool]) -> tuple[Tensor, list[Tensor]]:
    """(dX shaped like x, the gradients of params in their order); needs: x's, then W, b, A, B of
    gate, up and down; absent() for what it does not ask."""
    projections = dense_projections(params, has_bias)
    dx, grads = _mlp_backward_projections(dy, x, g, u, xa_g, xa_u, hd, projections, activation, dropouts, seeds,
                                          scales, needs)
    return dx, [t for t, pr in zip(grads, (t for pr in projections for t in pr)) if pr is not None]


def _mlp_backward_projections(dy, x, g, u, xa_g, xa_u, hd, projections, activation, dropouts, seeds, scales,
                              needs):
    """(dX, [dW, db, dA, dB] of gate, up, down; absent() where not asked)."""
    rows = as_rows(x)
    (wg, bg, ag, bmg), (wu, bu, au, bmu), (wd, bd, ad, bmd) = projections
    (pg, pu, pd), (sg, su, sd), seeds = dropouts, scales, seeds.tolist()
    need = needs[1:]
    dy = as_rows(dy)
    n, inter = g.shape
    grads = [absent(x) for _ in range(12)]
    # Down projection: its rank-r products, and dh's base part from cuBLAS.
    dy_lr = dy.to(bmd.dtype)
    dhd = torch.mm(dy_lr, bmd)                                                     # [N, r_d]
    if need[11]:
        grads[11] = torch.mm(dy_lr.t(), hd).to(bmd.dtype)
    if bd is not None and need[9]:
        grads[9] = dy.sum(0, dtype=torch.float32).to(bd.dtype)
    dh = base_grad(dy, wd)                                                         # [N, I]
    dg, du, hm = torch.empty_like(dh), torch.empty_like(dh), torch.empty_like(dh)
    store_h = need[8] and pd > 0
    hf = torch.empty_like(dh) if store_h else hm
    dxa_g = torch.empty(n, ag.shape[0], dtype=torch.float32, device=dy.device)
    dxa_u = torch.empty(n, au.shape[0], dtype=torch.float32, device=dy.device)
    fp32, t = _launch_choice(dy, ag, au, ad)
    if n:
        launch(_lora_mlp_bwd_kernel, (triton.cdiv(n, t.block_m),),
               dh, dhd.contiguous(), g, u, xa_g, xa_u, bmg.contiguous(), bmu.contiguous(), ad.contiguous(),
               dg, du, hm, hf, dxa_g, dxa_u, n, inter, ag.shape[0], au.shape[0], ad.shape[0],
               g.stride(0), u.stride(0), seeds[2], float(pd), float(sd),
               ACT=ACT_ID[activation], STORE_H=store_h, BLOCK_M=t.block_m, BLOCK_I=t.block_i,
               BR_G=_br(ag.shape[0]), BR_U=_br(au.shape[0]), BR_D=_br(ad.shape[0]), FP32_DOT=fp32,
               HAS_DROPOUT=pd > 0, **t.options())
    del dh
    if need[10]:
        grads[10] = torch.mm(dhd.t(), hm.to(dhd.dtype)).mul_(sd).to(ad.dtype)     # dA_d (hm = drop(h))
    if need[8]:
        grads[8] = torch.mm(dy.t(), hf if store_h else hm).to(wd.dtype)           # dW_d (hm = h when p_d = 0)
    # Gate and up: rank-r grads from dxa and the saved xa, base grads if the base trains.
    for (w, b, a, bm, xa, dxa, d, s, p, seed, k) in (
            (wg, bg, ag, bmg, xa_g, dxa_g, dg, sg, pg, seeds[0], 0),
            (wu, bu, au, bmu, xa_u, dxa_u, du, su, pu, seeds[1], 4)):
        if need[k + 3]:
            grads[k + 3] = torch.mm(d.t().to(xa.dtype), xa).to(bm.dtype)
        if need[k + 2]:
            grads[k + 2] = lora_grad_a(dxa.to(a.dtype), rows, s, p, seed, a.dtype)
        if need[k]:
            grads[k] = torch.mm(d.t(), rows).to(w.dtype)
        if b is not None and need[k + 1]:
            grads[k + 1] = d.sum(0, dtype=torch.float32).to(b.dtype)
    dx = absent(x)
    if needs[0]:
        if pg == 0 and pu == 0:  # one rank-(r_g + r_u) GEMM writes the low-rank part of dX
            dx = torch.mm(torch.cat([dxa_g, dxa_u], 1).to(ag.dtype), torch.cat([ag * sg, au * su])).to(rows.dtype)
        else:
            dx = lora_up_into(None, dxa_g.to(ag.dtype), ag, sg, pg, seeds[0], rows.dtype)
            dx = lora_up_into(dx, dxa_u.to(au.dtype), au, su, pu, seeds[1], rows.dtype)
        base_grad_into(dx, dg, wg)  # a 4-bit W is dequantized here, one at a time
        base_grad_into(dx, du, wu)
        dx = dx.view(x.shape)
    return dx, grads


def _mlp_forward_fake(x, params, has_bias, activation, dropouts, seeds, scales):
    (wg, _, ag, _), (_, _, au, _), (_, _, ad, _) = dense_projections(params, has_bias)
    n = x.numel() // x.shape[-1]
    return (x.new_empty(n, x.shape[-1]), x.new_empty(n, wg.shape[0]), x.new_empty(n, wg.shape[0]),
            x.new_empty(n, ag.shape[0], dtype=ag.dtype), x.new_empty(n, au.shape[0], dtype=au.dtype),
            x.new_empty(n, ad.shape[0], dtype=ad.dtype))


def _mlp_backward_fake(dy, x, g, u, xa_g, xa_u, hd, params, has_bias, activation, dropouts, seeds, scales, needs):
    flat = [t for pr in dense_projections(params, has_bias) for t in pr]
    grads = [torch.empty_like(t) if needed else absent(x) for t, needed in zip(flat, needs[1:]) if t is not None]
    return torch.empty_like(x, memory_format=torch.contiguous_format) if needs[0] else absent(x), grads


lora_mlp_fwd = kernel_op("lora_mlp", fake=_mlp_forward_fake)(_mlp_forward)
lora_mlp_bwd = kernel_op("lora_mlp_bwd", fake=_mlp_backward_fake)(_mlp_backward)


def _save(ctx, inputs, output):
    x, params, has_bias, activation, dropouts, seeds, scales = inputs
    _, *saved = output
    ctx.save_for_backward(x, seeds, *saved, *params)
    ctx.has_bias, ctx.activation, ctx.dropouts, ctx.scales = has_bias, activation, dropouts, scales
    ctx.mark_non_differentiable(*saved)


def _backward(ctx, dy, *_):
    x, seeds, g, u, xa_g, xa_u, hd, *params = ctx.saved_tensors
    if dy is None:
        return None, None, None, None, None, None, None
    need_params = list(ctx.needs_input_grad[1])
    per_layer = iter(need_params)  # needs for W, b, A, B of gate, up, down (False for an absent b)
    needs = [bool(ctx.needs_input_grad[0])]
    for bias in ctx.has_bias:
        w, b = next(per_layer), next(per_layer) if bias else False
        needs += [w, b, next(per_layer), next(per_layer)]
    dx, grads = lora_mlp_bwd(dy, x, g, u, xa_g, xa_u, hd, list(params), ctx.has_bias, ctx.activation, ctx.dropouts,
                             seeds, ctx.scales, needs)
    return (dx if needs[0] else None, [t if n else None for t, n in zip(grads, need_params)],
            None, None, None, None, None)


register_autograd(lora_mlp_fwd, backward=_backward, save=_save)


# ------------------------------------------------------------------------------------------------
# The same ops over 4-bit bases (QLoRA): params and weight_meta laid out as lora.py's 4-bit ops
# (each weight a run of tensors); each 4-bit W is dequantized right before its GEMM and freed
# after it, forward and backward, never saved.
# ------------------------------------------------------------------------------------------------
def _mlp_4bit_forward(x: Tensor, params: list[Tensor], has_bias: list[bool], weight_meta: list[int],
                      activation: str, dropouts: list[float], seeds: Tensor,
                      scales: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    projections, _ = quant_projections(params, has_bias, weight_meta)
    return _mlp_forward_projections(as_rows(x), projections, activation, dropouts, seeds, scales)


def _mlp_4bit_backward(dy: Tensor, x: Tensor, g: Tensor, u: Tensor, xa_g: Tensor, xa_u: Tensor, hd: Tensor,
                       params: list[Tensor], has_bias: list[bool], weight_meta: list[int], activation: str,
                       dropouts: list[float], seeds: Tensor, scales: list[float],
                       needs: list[bool]) -> tuple[Tensor, list[Tensor]]:
    """needs: x's, then one per tensor of params."""
    projections, widths = quant_projections(params, has_bias, weight_meta)
    dx, grads = _mlp_backward_projections(dy, x, g, u, xa_g, xa_u, hd, projections, activation, dropouts, seeds,
                                          scales, [needs[0], *slot_needs(needs[1:], projections, widths)])
    return dx, slot_grads(grads, projections, widths, x)


def _mlp_4bit_forward_fake(x, params, has_bias, weight_meta, activation, dropouts, seeds, scales):
    (wg, _, ag, _), (_, _, au, _), (_, _, ad, _) = quant_projections(params, has_bias, weight_meta)[0]
    n = x.numel() // x.shape[-1]
    return (x.new_empty(n, x.shape[-1]), x.new_empty(n, wg.shape[0]), x.new_empty(n, wg.shape[0]),
            x.new_empty(n, ag.shape[0], dtype=ag.dtype), x.new_empty(n, au.shape[0], dtype=au.dtype),
            x.new_empty(n, ad.shape[0], dtype=ad.dtype))


def _mlp_4bit_backward_fake(dy, x, g, u, xa_g, xa_u, hd, params, has_bias, weight_meta, activation, dropouts, seeds,
                            scales, needs):
    grads = [torch.empty_like(t) if needed else absent(x) for t, needed in zip(params, needs[1:])]
    return torch.empty_like(x, memory_format=torch.contiguous_format) if needs[0] else absent(x), grads


lora_mlp_4bit_fwd = kernel_op("lora_mlp_4bit", fake=_mlp_4bit_forward_fake)(_mlp_4bit_forward)
lora_mlp_4bit_bwd = kernel_op("lora_mlp_4bit_bwd", fake=_mlp_4bit_backward_fake)(_mlp_4bit_backward)


def _save_4bit(ctx, inputs, output):
    x, params, has_bias, weight_meta, activation, dropouts, seeds, scales = inputs
    _, *saved = output
    ctx.save_for_backward(x, seeds, *saved, *params)
    ctx.has_bias, ctx.weight_meta, ctx.activation, ctx.dropouts, ctx.scales = (has_bias, weight_meta, activation,
                                                                               dropouts, scales)
    ctx.mark_non_differentiable(*saved)


def _backward_4bit(ctx, dy, *_):
    x, seeds, g, u, xa_g, xa_u, hd, *params = ctx.saved_tensors
    if dy is None:
        return None, None, None, None, None, None, None, None
    need_params = [bool(n) for n in ctx.needs_input_grad[1]]
    needs = [bool(ctx.needs_input_grad[0]), *need_params]
    dx, grads = lora_mlp_4bit_bwd(dy, x, g, u, xa_g, xa_u, hd, list(params), ctx.has_bias, ctx.weight_meta,
                                  ctx.activation, ctx.dropouts, seeds, ctx.scales, needs)
    return (dx if needs[0] else None, [t if n else None for t, n in zip(grads, need_params)],
            None, None, None, None, None, None)


register_autograd(lora_mlp_4bit_fwd, backward=_backward_4bit, save=_save_4bit)


def lora_mlp(x: torch.Tensor, gate, up, down, activation: str = "silu", dropout=0.0, seeds=None) -> torch.Tensor:
    """down(act(gate(x)) ⊙ up(x)) with a LoRA adapter on each projection, fused (module docstring).

    gate, up, down: (W, b or None, A, B, scale) each, W in nn.Linear's [out, in] layout or a frozen
    4-bit weight (a Quant4bit, kernels/dequantize_4bit.py).
    activation: "silu" (SwiGLU), "gelu_tanh" or "gelu" (GeGLU). dropout: one float or three (gate,
    up, down); seeds: three (ints or draw_seed() tensors), drawn from torch's generator in the order
    gate, up, down when None.
    """
    if activation not in ACT_ID:
        raise ValueError(f"lora_mlp: activation {activation!r} is not one of {ACTIVATIONS}")
    drops = (float(dropout),) * 3 if isinstance(dropout, (int, float)) else tuple(float(p) for p in dropout)
    if len(drops) != 3 or any(not 0.0 <= p < 1.0 for p in drops):
        raise ValueError(f"lora_mlp: dropout {dropout} must be one value or three, each in [0, 1)")
    if seeds is None:
        seeds = tuple(draw_seed() if p > 0 else 0 for p in drops)
    (wg, bg, ag, bmg, sg), (wu, bu, au, bmu, su), (wd, bd, ad, bmd, sd) = gate, up, down
    check_lora(x, wg, ag, bmg, bg)
    check_lora(x, wu, au, bmu, bu)
    if wg.shape != wu.shape or wd.shape != (wg.shape[1], wg.shape[0]):
        raise ValueError(f"lora_mlp: gate {tuple(wg.shape)}, up {tuple(wu.shape)} and down {tuple(wd.shape)} "
                         "are not a gated MLP's [I, H], [I, H], [H, I]")
    check_lora(x.new_empty(0, wd.shape[1]), wd, ad, bmd, bd)
    tensors = [t for t in (wg, bg, ag, bmg, wu, bu, au, bmu, wd, bd, ad, bmd) if isinstance(t, torch.Tensor)]
    if not use_triton(x, *tensors):
        return lora_mlp_reference(x, gate, up, down, activation, drops, seeds)
    if not _fused_fits(x, ag, au, ad):  # (lora_linear takes 4-bit weights too)
        g = lora_linear(x, wg, ag, bmg, sg, bg, drops[0], seeds[0])
        u = lora_linear(x, wu, au, bmu, su, bu, drops[1], seeds[1])
        return lora_linear(activation_reference(g, activation) * u, wd, ad, bmd, sd, bd, drops[2], seeds[2])
    if any(is_quantized(w) for w in (wg, wu, wd)):
        params, has_bias, weight_meta = flatten_projections(layer[:4] for layer in (gate, up, down))
        y, *_ = lora_mlp_4bit_fwd(x, params, has_bias, weight_meta, activation, list(drops), seed_tensor(seeds),
                                  [float(sg), float(su), float(sd)])
        return y.view(*x.shape[:-1], y.shape[-1])
    y, *_ = lora_mlp_fwd(x, tensors, [bg is not None, bu is not None, bd is not None], activation, list(drops),
                         seed_tensor(seeds), [float(sg), float(su), float(sd)])
    return y.view(*x.shape[:-1], y.shape[-1])
