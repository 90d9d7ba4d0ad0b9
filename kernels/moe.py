"""Mixture-of-experts experts layer: top-k routed gated experts as grouped GEMMs, permutation fused.

Math (Shazeer et al. 2017, "Outrageously Large Neural Networks"; the stacked-weight layout is
transformers 5's fused experts). Token n has hidden row x_n [H], top-k experts e_(n,k) and routing
weights w_(n,k); expert e has W_gu[e] [2I, H] (gate rows, then up rows) and W_d[e] [H, I], and
optionally a LoRA pair on either stack (Hu et al. 2021): A_gu[e] [r, H], B_gu[e] [2I, r], A_d[e]
[r, I], B_d[e] [H, r], scales s_gu, s_d. For the slot s = (n, k) with e = e_(n,k):
    xa_s = x_n·A_gu[e]ᵀ                                              [r]
    gu_s = x_n·W_gu[e]ᵀ + s_gu·xa_s·B_gu[e]ᵀ = [g_s, u_s]            [2I]
    h_s  = act(g_s) ⊙ u_s                                            [I]
    hd_s = h_s·A_d[e]ᵀ                                               [r]
    y_s  = h_s·W_d[e]ᵀ + s_d·hd_s·B_d[e]ᵀ                            [H]
    out_n = Σ_k w_(n,k)·y_(n,k)
Backward, with dout [N, H] (dout_s = dout_n of the slot's token):
    a_s   = dout_s·W_d[e] + s_d·(dout_s·B_d[e])·A_d[e]     dL/dh_s before the routing weight
    dw_s  = a_s · h_s                                      routing-weight gradient
    dh_s  = w_s·a_s;   dg_s = dh_s ⊙ u_s ⊙ act'(g_s);   du_s = dh_s ⊙ act(g_s)
    dxa_s = s_gu·dgu_s·B_gu[e]
    dx_n  = Σ_k [dgu_s·W_gu[e] + dxa_s·A_gu[e]]
    dW_gu[e] = Σ_(s∈e) dgu_sᵀ·x_n          dW_d[e] = Σ_(s∈e) w_s·dout_sᵀ·h_s
    dB_gu[e] = s_gu·Σ dgu_sᵀ·xa_s          dA_gu[e] = Σ dxa_sᵀ·x_n
    dB_d[e]  = s_d·Σ w_s·dout_sᵀ·hd_s      dA_d[e]  = s_d·Σ w_s·(dout_s·B_d[e])ᵀ·h_s
(act'(g) from the closed forms in activations.py: silu, gelu tanh, gelu erf.)

How: the slots are sorted by expert on the device and every product above is a grouped GEMM
over the sorted rows, permutation fused into its prologue and epilogue (grouped_gemm.py: the
layout, the five kernels and their launch geometry). This file is the op: the reference, the
gate/up layouts, the forward and backward in those GEMMs, the custom ops and the functional API.

Saved for backward: x (the input, no copy), the routing (4 int32 vectors of S or E entries), gu
[S, 2I] and, with LoRA, xa [S, r] and hd [S, r]; h is recomputed from gu. That is 2·I·K elements a
token (Qwen3-30B-A3B, I = 768, K = 8, bf16: 24.6 KB), where transformers' grouped_mm path keeps
the gathered hidden states [S, H], the gate-up output, the activation and its product, and the
down output (2·H + 4·I elements a slot: 114 KB a token there). LoRA never forms W + s·B·A:
PEFT's target_parameters path materialises that whole [E, 2I, H] stack per forward and its
gradient per backward.

Cost: the FLOPs of the routed slots only, 2·S·H·2I + 2·S·I·H = 6·S·H·I forward and twice that
backward (dX and dW), plus the rank-r terms; each expert's weights are read once per BLOCK_M-row
tile of its slots. Host sync: none (the routing is built with device ops; the interpreter, on the
CPU anyway, sizes its grid exactly).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from torch import Tensor

from ._common import absent, as_rows, autocast_dtype, capability_of, fp32_dot, kernel_op, register_autograd, use_triton
from .activations import ACT_ID, ACTIVATIONS, activation_reference
from .grouped_gemm import combine, expert_block_m, glu_backward, glu_forward, grouped_mm, route, weight_grad


class ExpertLoRA(NamedTuple):
    """A LoRA pair on a stack of expert weights W [E, out, in]: delta W[e] = scale·b[e]·a[e].
    a [E, r, in] and b [E, out, r] may be strided views (PEFT's ParamWrapper factors are)."""
    a: torch.Tensor
    b: torch.Tensor
    scale: float


# ------------------------------------------------------------------------------------------------
# Reference: the per-expert loop (transformers' eager experts), in the input dtype, fp32 combine.
# ------------------------------------------------------------------------------------------------
def _expert_linear(x, w, lora, e):
    y = F.linear(x, w)
    if lora is not None:
        y = y + F.linear(F.linear(x, lora.a[e]), lora.b[e]) * lora.scale
    return y


def moe_experts_reference(x, topk_idx, topk_w, gate_up, down, activation="silu", gate_up_lora=None,
                          down_lora=None):
    """Σ_k w_(n,k)·expert_(e_(n,k))(x_n), one expert at a time. gate_up [E, 2I, H] (gate rows
    first), down [E, H, I]; topk_idx [N, K] with values in [0, E] (E: no expert); LoRA pairs as
    ExpertLoRA. Each expert computes in the input dtype; the weighted outputs are summed in fp32
    (as transformers' grouped_mm path does), then cast to x's dtype."""
    n_experts = gate_up.shape[0]
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.promote_types(x.dtype, torch.float32),
                      device=x.device)
    for e in range(n_experts):
        token, k = torch.where(topk_idx == e)
        if token.numel() == 0:
            continue
        g, u = _expert_linear(x[token], gate_up[e], gate_up_lora, e).chunk(2, dim=-1)
        y = _expert_linear(activation_reference(g, activation) * u, down[e], down_lora, e)
        out.index_add_(0, token, (y * topk_w[token, k, None]).to(out.dtype))
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Gate/up layouts and the op's tile height.
# ------------------------------------------------------------------------------------------------
def op_block_m(x: torch.Tensor, topk_idx: torch.Tensor, gate_up: torch.Tensor) -> int:
    """The moe_experts op's BLOCK_M for these operands (x [N, H], topk_idx [N, K], gate_up [E, 2I, H])."""
    capability = capability_of(x.device)
    return expert_block_m(capability, topk_idx.numel(), gate_up.shape[0], fp32_dot(capability, x, gate_up))


LAYOUTS = ("concatenated", "interleaved")  # gate_up rows: [gate; up] or [g0, u0, g1, u1, ...]


def gate_up_halves(t: torch.Tensor, layout: str) -> tuple[torch.Tensor, int]:
    """(gate view [E, I, ...], element offset from a gate element to its up partner) of a stack
    whose dim 1 holds the 2I gate/up rows in `layout`."""
    inter = t.shape[1] // 2
    if layout == "interleaved":
        return t[:, 0::2], t.stride(1)
    return t[:, :inter], inter * t.stride(1)


def _up_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t[:, 1::2] if layout == "interleaved" else t[:, t.shape[1] // 2:]


def concatenated(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A gate/up stack (dim 1) in the concatenated layout: itself, or a copy of interleaved rows."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1) if layout == "interleaved" else t


# ------------------------------------------------------------------------------------------------
# The custom ops (kernels/_common.py): the forward returns the output and what the backward needs
# (gu, and with LoRA xa, hd); the backward op rebuilds the routing from topk_idx (a sort of S ids,
# cheaper than saving five vectors) and returns the gradients of x, topk_w, the stacks and the LoRA
# factors. x [N, H], topk_w [N, K], gate_up [E, 2I, H] and down [E, H, I] (logical views), the LoRA
# factors a_gu [E, r, H], b_gu [E, 2I, r], a_d [E, r, I], b_d [E, H, r] or None.
# ------------------------------------------------------------------------------------------------
def _moe_forward(x: Tensor, topk_idx: Tensor, topk_w: Tensor, gate_up: Tensor, down: Tensor, a_gu: Tensor | None,
                 b_gu: Tensor | None, a_d: Tensor | None, b_d: Tensor | None, activation: str, layout: str,
                 s_gu: float, s_d: float, grad_scale: float, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out [N, H], gu [S, 2I], xa [S, r] or empty, hd [S, r] or empty)."""
    x = as_rows(x)
    routing = route(topk_idx, gate_up.shape[0], block_m)
    w_slot = topk_w.reshape(-1)
    gate, w_up = gate_up_halves(gate_up, layout)
    xa = lr_gu = None
    lb_up = 0
    if a_gu is not None:
        xa = grouped_mm(x, a_gu, routing, gather=True)                          # [S, r]
        b_gate, lb_up = gate_up_halves(b_gu, layout)
        lr_gu = (xa, b_gate, s_gu)
    gu, h = glu_forward(x, gate, w_up, routing, lr_gu, lb_up, activation)      # [S, 2I], [S, I]
    hd = grouped_mm(h, a_d, routing, gather=False) if a_d is not None else None  # [S, r]
    ys = grouped_mm(h, down, routing, gather=False, lr=None if hd is None else (hd, b_d, s_d), scatter=True,
                    row_w=w_slot)                                                # [S, H] by slot
    del h
    out = combine(ys, routing, x.shape[0])
    return out, gu, absent(x) if xa is None else xa, absent(x) if hd is None else hd


def _moe_backward(dout: Tensor, x: Tensor, topk_idx: Tensor, topk_w: Tensor, gate_up: Tensor, down: Tensor,
                  a_gu: Tensor | None, b_gu: Tensor | None, a_d: Tensor | None, b_d: Tensor | None, gu: Tensor,
                  xa: Tensor, hd: Tensor, activation: str, layout: str, s_gu: float, s_d: float, grad_scale: float,
                  block_m: int, needs: list[bool]) -> list[Tensor]:
    """The gradients of x, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d (needs: one flag each, in
    that order); an empty tensor for one not asked for."""
    x = as_rows(x)
    routing = route(topk_idx, gate_up.shape[0], block_m)
    w_slot = topk_w.reshape(-1)
    xa, hd = (xa if a_gu is not None else None), (hd if a_d is not None else None)
    need = needs
    dout = as_rows(dout)
    grads = [None] * 8
    # Down projection (and the activation's backward, fused into its epilogue).
    u = grouped_mm(dout, b_d.transpose(1, 2), routing, gather=True) if a_d is not None else None  # dout·B_d
    store_h = need[3] or (a_d is not None and need[6])
    dgu, h, dw_sorted = glu_backward(dout, down.transpose(1, 2), routing, gu, w_slot,
                                      None if u is None else (u, a_d.transpose(1, 2), s_d), activation, store_h)
    if need[3]:
        grads[3] = weight_grad(dout, h, routing, torch.empty_like(down), gather_a=True, row_w=w_slot, scale=grad_scale)
    if a_d is not None and need[6]:
        grads[6] = weight_grad(u, h, routing, torch.empty_like(a_d), row_w=w_slot, scale=s_d * grad_scale)
    if a_d is not None and need[7]:
        grads[7] = weight_grad(dout, hd, routing, torch.empty_like(b_d), gather_a=True, row_w=w_slot,
                               scale=s_d * grad_scale)
    del h, u
    inter = gu.shape[1] // 2
    dg, du = dgu[:, :inter], dgu[:, inter:]
    # Gate/up: LoRA's rank-r gradient first (dX needs it), then the weight gradients, then dX.
    dxa = None
    if a_gu is not None and (need[0] or need[4]):
        b_gate, lb_up = gate_up_halves(b_gu, layout)
        dxa = grouped_mm(dgu, b_gate.transpose(1, 2), routing, gather=False, split=lb_up)  # dg·B_g + du·B_u
        dxa.mul_(s_gu)
    if a_gu is not None and need[5]:
        grads[5] = torch.empty_like(b_gu)
        weight_grad(dg, xa, routing, gate_up_halves(grads[5], layout)[0], scale=s_gu * grad_scale)
        weight_grad(du, xa, routing, _up_view(grads[5], layout), scale=s_gu * grad_scale)
    if a_gu is not None and need[4]:
        grads[4] = weight_grad(dxa, x, routing, torch.empty_like(a_gu), gather_b=True, scale=grad_scale)
    if need[2]:
        grads[2] = torch.empty_like(gate_up)
        weight_grad(dg, x, routing, gate_up_halves(grads[2], layout)[0], gather_b=True, scale=grad_scale)
        weight_grad(du, x, routing, _up_view(grads[2], layout), gather_b=True, scale=grad_scale)
    if need[0]:
        gate, w_up = gate_up_halves(gate_up, layout)
        dxs = grouped_mm(dgu, gate.transpose(1, 2), routing, gather=False, split=w_up, scatter=True,
                         lr=None if dxa is None else (dxa, a_gu.transpose(1, 2), 1.0))  # [S, H] by slot
        grads[0] = combine(dxs, routing, x.shape[0])
    if need[1]:
        dw = torch.empty_like(dw_sorted).index_copy_(0, routing.slot.long(), dw_sorted)
        grads[1] = dw.view(topk_w.shape).to(topk_w.dtype)
    return [absent(x) if g is None else g for g in grads]


def _moe_forward_fake(x, topk_idx, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d, activation, layout, s_gu, s_d,
                      grad_scale, block_m):
    slots = topk_idx.numel()
    return (x.new_empty(x.shape), x.new_empty(slots, gate_up.shape[1]),
            x.new_empty(slots, a_gu.shape[1]) if a_gu is not None else absent(x),
            x.new_empty(slots, a_d.shape[1]) if a_d is not None else absent(x))


def _moe_backward_fake(dout, x, topk_idx, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d, gu, xa, hd, activation,
                       layout, s_gu, s_d, grad_scale, block_m, needs):
    inputs = (x, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d)
    return [torch.empty_like(t) if t is not None and needed else absent(x) for t, needed in zip(inputs, needs)]


moe_experts_fwd = kernel_op("moe_experts", fake=_moe_forward_fake)(_moe_forward)
moe_experts_bwd = kernel_op("moe_experts_bwd", fake=_moe_backward_fake)(_moe_backward)


def _save(ctx, inputs, output):
    x, topk_idx, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d, activation, layout, s_gu, s_d, grad_scale, block_m = inputs
    _, gu, xa, hd = output
    ctx.save_for_backward(x, topk_idx, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d, gu, xa, hd)
    ctx.meta = activation, layout, s_gu, s_d, grad_scale, block_m
    ctx.mark_non_differentiable(gu, xa, hd)


def _backward(ctx, dout, *_):
    x, topk_idx, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d, gu, xa, hd = ctx.saved_tensors
    if dout is None:
        return (None,) * 15
    need = ctx.needs_input_grad
    # in the order the backward op takes: x, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d
    needs = [bool(need[i]) and t is not None for i, t in zip((0, 2, 3, 4, 5, 6, 7, 8),
                                                            (x, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d))]
    grads = moe_experts_bwd(dout, x, topk_idx, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d, gu, xa, hd,
                            *ctx.meta, needs)
    g = [t if n else None for t, n in zip(grads, needs)]
    return (g[0], None, *g[1:], None, None, None, None, None, None)


register_autograd(moe_experts_fwd, backward=_backward, save=_save)


def _check(x, topk_idx, topk_w, gate_up, down, activation, layout, loras):
    if activation not in ACT_ID:
        raise ValueError(f"moe_experts: activation {activation!r} is not one of {ACTIVATIONS}")
    if layout not in LAYOUTS:
        raise ValueError(f"moe_experts: layout {layout!r} is not one of {LAYOUTS}")
    if x.dim() != 2 or topk_idx.dim() != 2 or topk_w.shape != topk_idx.shape or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: x {tuple(x.shape)} must be [N, H] and topk_idx {tuple(topk_idx.shape)}, "
                         f"topk_w {tuple(topk_w.shape)} both [N, K]")
    if topk_idx.is_floating_point() or not topk_w.is_floating_point():
        raise TypeError(f"moe_experts: topk_idx must hold integer expert ids (got {topk_idx.dtype}) and topk_w "
                        f"floating routing weights (got {topk_w.dtype}); check the argument order")
    n_exp, two_i, hidden = gate_up.shape if gate_up.dim() == 3 else (0, 0, 0)
    if gate_up.dim() != 3 or two_i % 2 or hidden != x.shape[1] or down.shape != (n_exp, hidden, two_i // 2):
        raise ValueError(f"moe_experts: gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} must be "
                         f"[E, 2I, H] and [E, H, I] with H = {x.shape[1]} (pass transposed=True for [E, H, 2I] / [E, I, H])")
    for name, lora, w in (("gate_up_lora", loras[0], gate_up), ("down_lora", loras[1], down)):
        if lora is not None and (lora.a.shape[::2] != (n_exp, w.shape[2]) or lora.b.shape[:2] != w.shape[:2]
                                 or lora.a.shape[1] != lora.b.shape[2]):
            raise ValueError(f"moe_experts: {name} a {tuple(lora.a.shape)}, b {tuple(lora.b.shape)} do not fit the "
                             f"weights {tuple(w.shape)}: a must be [E, r, in], b [E, out, r]")


def moe_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, activation: str = "silu", *, gate_up_lora: ExpertLoRA | None = None,
                down_lora: ExpertLoRA | None = None, layout: str = "concatenated", transposed: bool = False,
                weight_grad_scale: float = 1.0) -> torch.Tensor:
    """Σ_k topk_w[n, k]·expert_(topk_idx[n, k])(x[n]) for gated experts (module docstring).

    x [N, H]; topk_idx, topk_w [N, K] (ids in [0, E], E meaning none); gate_up [E, 2I, H] with the
    gate/up rows in `layout`, down [E, H, I] (transposed=True: [E, H, 2I] and [E, I, H]);
    activation "silu", "gelu_tanh" or "gelu". LoRA pairs as ExpertLoRA in the [E, out, in]
    orientation of the logical weights. weight_grad_scale multiplies the gradients of the expert
    parameters (the stacks and their LoRA factors; not dX, not the routing weights' gradient).
    Returns [N, H] in x's dtype."""
    if transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    loras = (gate_up_lora, down_lora)
    _check(x, topk_idx, topk_w, gate_up, down, activation, layout, loras)
    device_type = x.device.type
    dtype = autocast_dtype(device_type)
    if dtype is not None:  # as autocast runs each expert's F.linear
        x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
    loras = tuple(None if lo is None else ExpertLoRA(lo.a.to(x.dtype), lo.b.to(x.dtype), float(lo.scale))
                  for lo in loras)
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise TypeError(f"moe_experts: x ({x.dtype}) and the expert weights ({gate_up.dtype}, {down.dtype}) must "
                        "share one dtype (or run under autocast)")
    tensors = [x, topk_idx, topk_w, gate_up, down, *(t for lo in loras if lo is not None for t in lo[:2])]
    if not use_triton(*tensors):  # the reference, in the concatenated layout
        scale = float(weight_grad_scale)
        gate_up, down = _scaled_grad(concatenated(gate_up, layout), scale), _scaled_grad(down, scale)
        loras = [None if lo is None else ExpertLoRA(_scaled_grad(lo.a, scale), _scaled_grad(
            concatenated(lo.b, layout) if lo is loras[0] else lo.b, scale), lo.scale) for lo in loras]
        return moe_experts_reference(x, topk_idx, topk_w, gate_up, down, activation, *loras)
    no_autocast = torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
        else contextlib.nullcontext()  # the meta device has no autocast
    with no_autocast:
        (a_gu, b_gu, s_gu), (a_d, b_d, s_d) = ((lo.a, lo.b, lo.scale) if lo is not None else (None, None, 0.0)
                                               for lo in loras)
        out, *_ = moe_experts_fwd(x, topk_idx, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d, activation, layout,
                                  float(s_gu), float(s_d), float(weight_grad_scale),
                                  op_block_m(x, topk_idx, gate_up))
        return out


def _scaled_grad(t: torch.Tensor, scale: float) -> torch.Tensor:
    """t, with its gradient multiplied by scale on the way back (weight_grad_scale, reference path)."""
    t = t.view_as(t)
    if t.requires_grad:
        t.register_hook(lambda g: g * scale)
    return t
