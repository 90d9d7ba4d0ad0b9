"""Fused linear + cross-entropy: the LM head and its loss in one op, without the [N, V] logits.

Math (per token n with hidden row x, label y, vocabulary size V)
-----------------------------------------------------------------
    a_j   = x . W_j + b_j                          raw logits (input dtype, cuBLAS)
    z_j   = s * a_j                                s = logit_scale (Granite: 1/logits_scaling,
                                                   Cohere: logit_scale)
    z_j  <- c * tanh(z_j / c)          if softcap c (Gemma 2 final-logit soft-capping)
    lse   = log sum_j exp(z_j)
    loss  = (1 - eps) (lse - z_y) + eps (lse - mean_j z_j)     torch cross_entropy's label
                                                               smoothing (Szegedy et al. 2016)
          + zl * lse^2                                         PaLM z-loss (Chowdhery et al. 2022)
Backward, with p = softmax(z):
    dloss/dz_j = p_j (1 + 2 zl lse) - (1 - eps) [j == y] - eps / V
    dloss/da_j = dloss/dz_j * (1 - tanh^2) * s      (the tanh factor only with a softcap)
    dX = dA @ W,  dW = dA^T @ X,  db = sum_n dA_n
Ignored tokens (label == ignore_index) have loss 0 and dA = 0. The reduction "mean" divides the
sum by max(1, #non-ignored) (torch's rule; all-ignored gives 0, not NaN), "sum" sums, "none"
returns the per-token losses; a `normalizer` (HF's num_items_in_batch, a global token count)
divides the sum instead. Labels outside [0, V) that are not ignore_index are not checked (that
would synchronise with the host): their target logit reads as 0.

Algorithm (the idea of chunked LM-head losses: Wijmans et al. 2024 "Cut Your Losses", Liger's
fused linear CE; written anew here)
------------------------------------------------------------------------------------------------
Rows are processed in chunks of C rows, C * V * itemsize <= 1 GiB (a power of two, or
`chunk_size`). Per chunk: A_c = X_c @ W^T (+ b, addmm) in the input dtype; one Triton program
per row streams A_c's row twice in BLOCK_V blocks: pass 1 keeps a per-lane online max / sum-exp
(Milakov & Gimelshein 2018) and sum_j z_j, loads the target logit once, and writes the loss; pass 2 writes
dA (already multiplied by the gradient scale read from a device pointer) in place over A_c. Then
dX_c = dA_c @ W goes straight into dX, dW += dA_c^T @ X_c (addmm, in the weight's dtype: with
bf16 weights dW is rounded to bf16 once per chunk, which costs a little accuracy for several
chunks but saves V*H*4 bytes), db += sum of dA_c rows in fp32.

For the scalar reductions the gradients are computed in the forward (3 matmuls in all, no
recomputation) with scale 1/denominator; backward multiplies them in place by grad_output (a
device tensor, never compared with 1 on the host) and hands them over. A second backward through
the same graph (retain_graph=True) recomputes them chunk by chunk. For reduction="none" the
per-token grad_output is only known in backward, so forward computes the losses only and
backward recomputes the logits with grad_output as the per-row scale (4 matmuls).
Saved for backward: hidden, weight, bias, labels and the precomputed dX, dW, db32. Keeping
hidden (N*H elements) alive until backward is the price of a correct retained-graph backward.
As custom ops (kernels/_common.py): torch.ops.fastft.fused_linear_cross_entropy returns the loss
and the gradients made in the forward as extra outputs; torch.ops.fastft.
fused_linear_cross_entropy_bwd recomputes them. Under torch.compile both are opaque nodes.

Cost: FLOPs 6 N H V (2 N H V for the loss alone, 8 N H V for "none"); memory beyond the inputs and gradients is one
chunk of logits (<= 1 GiB) plus O(N + V) fp32, whatever N. The Triton pass moves 3 C V
itemsize bytes per chunk (read, read, write), small beside the matmuls for H in the thousands.
No host synchronisation; deterministic (no atomics: each row belongs to one program, reductions
over rows are torch matmuls and sums).
"""

from __future__ import annotations

import dataclasses
import numbers

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from torch import Tensor

from ._common import absent, autocast_dtype, capability_of, kernel_op, launch, register_autograd, round_to, use_triton

REDUCTIONS = ("mean", "sum", "none")
# Upper bound on the logits chunk buffer. Each chunk after the first reads and writes all of dW
# (addmm into the weight-sized gradient): at V=128256, H=4096 bf16 that is 2.1 GB of traffic per
# chunk, about 0.7 ms on an H100. 1 GiB chunks (4096 rows there: 2 chunks for N=8192) keep that
# to one pass and the matmuls at M=4096, while the buffer stays a sixth of HF eager's logits +
# fp32 upcast (6.3 GB). Smaller GPUs can pass chunk_size.
CHUNK_BYTES = 2**30


# ------------------------------------------------------------------------------------------------
# Reference: the definition, as Hugging Face computes it (logits in the input dtype, then fp32).
# ------------------------------------------------------------------------------------------------
def fused_linear_cross_entropy_reference(hidden, weight, labels, bias=None, ignore_index=-100,
                                         reduction="mean", label_smoothing=0.0, softcap=None,
                                         logit_scale=1.0, z_loss=0.0, normalizer=None,
                                         chunk_size=None):
    """Plain torch: logits = hidden @ weight.T (+ bias) in the input dtype, upcast to fp32 (fp64
    stays fp64), then scale, softcap, cross-entropy, z-loss. Materialises [N, V]; chunk_size is
    accepted for signature compatibility and ignored."""
    _check_args(hidden, weight, labels, bias, reduction, label_smoothing, softcap, z_loss,
                normalizer, chunk_size)
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none",
                             label_smoothing=label_smoothing)
    keep = labels != ignore_index
    if z_loss:
        losses = losses + z_loss * torch.logsumexp(logits, dim=-1).square() * keep
    if reduction == "none":
        return losses
    total = losses.sum()
    if normalizer is not None:
        return total / _as_tensor(normalizer, total.device, total.dtype)
    if reduction == "mean":
        return total / keep.sum().clamp(min=1).to(total.dtype)
    return total


# ------------------------------------------------------------------------------------------------
# Triton: one program per row of a logits chunk. Loss, then (optionally) dA in place.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _softcap_tanh(z, cap):
    """tanh(z / cap) with core tl.* math only (libdevice tanh is unavailable in the interpreter).

    |a| >= 0.5: tanh(a) = 1 - 2 / (exp(2a) + 1) (exp overflow to inf gives exactly +-1); its
    cancellation near 0 would cost fp32 accuracy, so |a| < 0.5 uses the Maclaurin series to a^15
    (coefficient of a^(2n-1): 2^2n (2^2n - 1) B_2n / (2n)!, B the Bernoulli numbers; truncation
    below 1e-8 relative at |a| = 0.5).
    """
    a = z / cap
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (
        62.0 / 2835.0 + a2 * (-1382.0 / 155925.0 + a2 * (21844.0 / 6081075.0 + a2 * (
            -929569.0 / 638512875.0))))))))
    closed = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    return tl.where(tl.abs(a) < 0.5, series, closed)


@triton.jit
def _fused_linear_cross_entropy_fwd_kernel(
    A,              # [rows, V] raw logits of one chunk (input dtype); dA is written over it
    stride_a,       # row stride of A
    LABELS,         # [rows] int32/int64
    LOSS,           # [rows] fp32 per-token loss (out)
    SCALE,          # [1] or [rows] fp32: factor on dA (1/denominator, or grad_output)
    stride_scale,   # 0 for one scale, 1 for one per row
    V, ignore_index,
    logit_scale, softcap, label_smoothing, z_loss,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    a_row = A + row * stride_a
    y = tl.load(LABELS + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)                                       # [BLOCK_V]
    s = tl.cast(logit_scale, tl.float32)
    cap = tl.cast(softcap, tl.float32)
    eps = tl.cast(label_smoothing, tl.float32)
    zl = tl.cast(z_loss, tl.float32)
    if y == ignore_index:
        tl.store(LOSS + row, tl.cast(0.0, tl.float32))
        if COMPUTE_GRAD:
            zeros = tl.zeros([BLOCK_V], dtype=tl.float32).to(A.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                tl.store(a_row + start + cols, zeros, mask=start + cols < V)
    else:
        # Pass 1: per-lane online max / sum-exp, reduced across lanes once at the end. The
        # running max starts at -FLT_MAX (not -inf) so that a lane that only sees masked
        # columns never computes exp(-inf - -inf).
        m_vec = tl.full([BLOCK_V], -3.4028234663852886e38, tl.float32)
        d_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
        zsum_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(a_row + offs, mask=mask, other=0.0).to(tl.float32) * s
            if HAS_SOFTCAP:
                z = cap * _softcap_tanh(z, cap)
            if HAS_SMOOTHING:
                zsum_vec += tl.where(mask, z, 0.0)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m_vec, z)
            d_vec = d_vec * tl.exp(m_vec - m_new) + tl.exp(z - m_new)
            m_vec = m_new
        m = tl.max(m_vec, axis=0)
        lse = m + tl.log(tl.sum(d_vec * tl.exp(m_vec - m), axis=0))
        # The target logit: one scalar load (a per-lane accumulator would hold BLOCK_V / threads
        # registers through the loop for one element). A label outside [0, V) reads as 0.
        valid = (y >= 0) & (y < V)
        z_y = tl.load(a_row + tl.where(valid, y, 0)).to(tl.float32) * s
        if HAS_SOFTCAP:
            z_y = cap * _softcap_tanh(z_y, cap)
        z_y = tl.where(valid, z_y, 0.0)
        loss = lse - z_y
        if HAS_SMOOTHING:
            loss = (1.0 - eps) * loss + eps * (lse - tl.sum(zsum_vec, axis=0) / V)
        if HAS_Z_LOSS:
            loss += zl * lse * lse
        tl.store(LOSS + row, loss)

        if COMPUTE_GRAD:
            # Pass 2: dA_j = scale * s * (1 - tanh^2) * (p_j (1 + 2 zl lse) - (1-eps)[j==y] - eps/V)
            g_scale = tl.load(SCALE + row * stride_scale).to(tl.float32) * s
            p_factor = 1.0 + 2.0 * zl * lse
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                mask = offs < V
                z = tl.load(a_row + offs, mask=mask, other=0.0).to(tl.float32) * s
                if HAS_SOFTCAP:
                    t = _softcap_tanh(z, cap)
                    z = cap * t
                g = tl.exp(z - lse) * p_factor
                g = tl.where(offs == y, g - (1.0 - eps), g)
                if HAS_SMOOTHING:
                    g -= eps / V
                if HAS_SOFTCAP:
                    g = g * (1.0 - t * t)
                # round_to: round to nearest even also under the interpreter (which truncates)
                tl.store(a_row + offs, round_to(g * g_scale, A.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Host side: launch geometry, the chunk loop, the custom ops and their autograd, the functional API.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Options:
    ignore_index: int
    label_smoothing: float
    softcap: float | None
    logit_scale: float
    z_loss: float
    chunk_rows: int


def _block_v(capability: tuple[int, int] | None, V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). On a GPU 2048 columns per step at 8 warps: 8 per thread, one 128-bit
    load of bf16 each. The per-lane online-softmax state (max, sum, and the smoothing sum) costs a
    register per column per thread, so BLOCK_V=4096 held 80-107 registers (25-38% occupancy) where
    2048 holds 32-48 (62-100%): more rows in flight per SM for this streaming pass (compile report,
    benchmarks/NOTES.md). The interpreter (capability None) pays per program and per loop
    iteration, so it gets the biggest block that is reasonable."""
    if capability is None:
        return min(32768, triton.next_power_of_2(V)), 1
    block = min(2048, triton.next_power_of_2(V))
    return block, 8 if block >= 2048 else 4


def _chunk_rows(n_rows: int, vocab: int, itemsize: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(chunk_size, n_rows))
    fit = max(1, CHUNK_BYTES // (vocab * itemsize))
    return max(1, min(1 << (fit.bit_length() - 1), n_rows))


def _run_chunks(hidden, weight, bias, labels, scale, opts: _Options, *, need_dx=False,
                need_dw=False, need_db=False):
    """Loss per row (fp32 [N]) and, if asked, dX, dW, db32 for dloss scaled by `scale`
    ([1] or [N] fp32 device tensor, possibly with stride 0); absent() for what was not asked."""
    N, _ = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    compute_grad = need_dx or need_dw or need_db
    losses = torch.empty(N, dtype=torch.float32, device=device)
    # Contiguous gradients, whatever the inputs' strides: mm writes chunk rows of dX in place.
    dx = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if need_dx else absent(hidden)
    dw = (torch.empty if N > 0 else torch.zeros)(weight.shape, dtype=weight.dtype,
                                                 device=device) if need_dw else absent(weight)
    db32 = torch.zeros(V, dtype=torch.float32, device=device) if need_db else absent(hidden)
    if N == 0:
        return losses, dx, dw, db32
    C = opts.chunk_rows
    buffer = torch.empty(min(C, N), V, dtype=hidden.dtype, device=device)  # [C, V]
    block_v, num_warps = _block_v(capability_of(device), V)
    stride_scale = scale.stride(0) if scale.numel() > 1 else 0
    wt = weight.t()
    for start in range(0, N, C):
        end = min(start + C, N)
        x_c = hidden[start:end]
        a_c = buffer[: end - start]
        if bias is None:
            torch.mm(x_c, wt, out=a_c)
        else:
            torch.addmm(bias, x_c, wt, out=a_c)
        launch(
            _fused_linear_cross_entropy_fwd_kernel, (end - start,),
            a_c, a_c.stride(0), labels[start:end], losses[start:end],
            scale[start:end] if stride_scale else scale, stride_scale,
            V, opts.ignore_index,
            float(opts.logit_scale), float(opts.softcap or 1.0), float(opts.label_smoothing),
            float(opts.z_loss),
            HAS_SOFTCAP=opts.softcap is not None, HAS_SMOOTHING=opts.label_smoothing > 0,
            HAS_Z_LOSS=opts.z_loss > 0, COMPUTE_GRAD=compute_grad, BLOCK_V=block_v,
            num_warps=num_warps,
        )
        if need_dx:
            torch.mm(a_c, weight, out=dx[start:end])
        if need_dw:
            if start == 0:
                torch.mm(a_c.t(), x_c, out=dw)
            else:
                dw.addmm_(a_c.t(), x_c)
        if need_db:
            db32 += a_c.sum(0, dtype=torch.float32)
    return losses, dx, dw, db32


def _denominator(labels, reduction, normalizer, ignore_index) -> torch.Tensor:
    """What a scalar reduction divides the summed loss by: [1] fp32, on the device (no sync)."""
    if normalizer is not None:
        return _as_tensor(normalizer, labels.device, torch.float32).reshape(1)
    if reduction == "mean":
        return (labels != ignore_index).sum().clamp(min=1).to(torch.float32).reshape(1)
    return torch.ones(1, dtype=torch.float32, device=labels.device)


# ------------------------------------------------------------------------------------------------
# The custom ops (kernels/_common.py). Forward: the loss and, for a scalar reduction, the
# gradients of loss / denominator (handed to the backward, which scales them by grad_output).
# Backward op: the gradients recomputed, for reduction="none" or a second backward.
# ------------------------------------------------------------------------------------------------
def _forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, denominator: Tensor,
             reduction: str, ignore_index: int, label_smoothing: float, softcap: float | None,
             logit_scale: float, z_loss: float, chunk_rows: int, need_dx: bool, need_dw: bool,
             need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dX, dW, db32): loss 0-dim (summed / denominator) or [N] for reduction="none"; the
    gradients of that scalar loss when asked for (never for "none"), else empty."""
    opts = _Options(ignore_index, label_smoothing, softcap, logit_scale, z_loss, chunk_rows)
    if reduction == "none":
        losses, dx, dw, db32 = _run_chunks(hidden, weight, bias, labels, _unit_scale(hidden), opts)
        return losses, dx, dw, db32
    losses, dx, dw, db32 = _run_chunks(hidden, weight, bias, labels, 1.0 / denominator, opts,
                                       need_dx=need_dx, need_dw=need_dw, need_db=need_db)
    return losses.sum() / denominator[0], dx, dw, db32


def _backward_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, scale: Tensor,
                 ignore_index: int, label_smoothing: float, softcap: float | None, logit_scale: float,
                 z_loss: float, chunk_rows: int, need_dx: bool, need_dw: bool, need_db: bool
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dW, db) of sum_n scale_n * loss_n, recomputed chunk by chunk (scale [1] or [N] fp32)."""
    opts = _Options(ignore_index, label_smoothing, softcap, logit_scale, z_loss, chunk_rows)
    _, dx, dw, db32 = _run_chunks(hidden, weight, bias, labels, scale, opts,
                                  need_dx=need_dx, need_dw=need_dw, need_db=need_db)
    return dx, dw, db32.to(bias.dtype) if need_db else db32


def _grad_fakes(hidden, weight, need_dx, need_dw, need_db, db_dtype):
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dx else absent(hidden),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else absent(weight),
            hidden.new_empty(weight.shape[0], dtype=db_dtype) if need_db else absent(hidden))


def _forward_fake(hidden, weight, bias, labels, denominator, reduction, ignore_index, label_smoothing, softcap,
                  logit_scale, z_loss, chunk_rows, need_dx, need_dw, need_db):
    if reduction == "none":
        return (hidden.new_empty(hidden.shape[0], dtype=torch.float32), absent(hidden), absent(weight),
                absent(hidden))
    return (hidden.new_empty((), dtype=torch.float32),
            *_grad_fakes(hidden, weight, need_dx, need_dw, need_db, torch.float32))


def _backward_fake(hidden, weight, bias, labels, scale, ignore_index, label_smoothing, softcap, logit_scale,
                   z_loss, chunk_rows, need_dx, need_dw, need_db):
    return _grad_fakes(hidden, weight, need_dx, need_dw, need_db, None if bias is None else bias.dtype)


flce_fwd = kernel_op("fused_linear_cross_entropy", fake=_forward_fake)(_forward)
flce_bwd = kernel_op("fused_linear_cross_entropy_bwd", fake=_backward_fake)(_backward_op)


def _save(ctx, inputs, output):
    hidden, weight, bias, labels, denominator, reduction, *options = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, denominator)
    ctx.reduction, ctx.options = reduction, tuple(options[:6])  # ignore_index .. chunk_rows
    ctx.mark_non_differentiable(*output[1:])
    # The gradients made in the forward, kept outside save_for_backward so that the first
    # backward can scale them in place and hand them over (AccumulateGrad then takes them
    # without a copy); a second backward through a retained graph finds None and recomputes.
    ctx.grads = None if reduction == "none" else output[1:]


def _backward(ctx, grad_output, *_):
    hidden, weight, bias, labels, denominator = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, need_dw, need_db = need[0], need[1], bias is not None and need[2]
    if grad_output is None:
        return (None,) * 15
    g = grad_output.to(torch.float32)
    if ctx.grads is not None:
        dx, dw, db32 = ctx.grads
        ctx.grads = None
        for t, needed in ((dx, need_dx), (dw, need_dw), (db32, need_db)):
            if needed:
                t.mul_(g)  # grad_output is a device tensor: never compared with 1 on the host
        db = db32.to(bias.dtype) if need_db else None
    else:  # reduction="none" (per-token grad_output), or a second backward: recompute
        scale = g if ctx.reduction == "none" else (g / denominator).reshape(1)
        dx, dw, db = flce_bwd(hidden, weight, bias, labels, scale, *ctx.options, need_dx, need_dw, need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None) + (None,) * 12


register_autograd(flce_fwd, backward=_backward, save=_save)


def _unit_scale(like: torch.Tensor) -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32, device=like.device)


def _as_tensor(value, device, dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.full((), float(value), device=device, dtype=dtype)  # a fill, not a host copy


def _check_args(hidden, weight, labels, bias, reduction, label_smoothing, softcap, z_loss,
                normalizer, chunk_size):
    """Shape/dtype/option checks: host metadata only, never tensor values (no sync)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: choose one of {REDUCTIONS}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [tokens, hidden], got shape {tuple(hidden.shape)}: "
                         "reshape to [-1, hidden] (and labels to [-1])")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [vocab, hidden={hidden.shape[1]}], got shape "
                         f"{tuple(weight.shape)}: pass the LM head's weight (nn.Linear layout)")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must have shape [{hidden.shape[0]}] (one per row of hidden), got "
                         f"{tuple(labels.shape)}: reshape to [-1] (shift them before flattening)")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 (or int32) class indices, got {labels.dtype}: "
                         "use labels.long()")
    if not hidden.is_floating_point() or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one "
                         "floating dtype: cast hidden to the LM head's dtype")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [{weight.shape[0]}] in {weight.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"hidden, weight, labels and bias must be on one device, got {devices}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 1]")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap} must be positive (or None for no soft-capping)")
    if z_loss < 0:
        raise ValueError(f"z_loss={z_loss} must be >= 0")
    if normalizer is not None:
        if reduction == "none":
            raise ValueError("normalizer divides a summed loss: use reduction='sum' or 'mean' "
                             "with it, or drop it for reduction='none'")
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(f"normalizer tensor must hold one value, got shape "
                                 f"{tuple(normalizer.shape)}")
        elif not isinstance(normalizer, numbers.Real) or not normalizer > 0:
            raise ValueError(f"normalizer={normalizer!r} must be a positive number or a "
                             "1-element tensor (e.g. num_items_in_batch)")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (rows per chunk)")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               reduction: str = "mean", label_smoothing: float = 0.0,
                               softcap: float | None = None, logit_scale: float = 1.0,
                               z_loss: float = 0.0, normalizer=None,
                               chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, never materialising the
    [N, V] logits (see the module docstring for the math). Returns a 0-dim fp32 loss for
    reduction "mean"/"sum", or fp32 [N] per-token losses for "none"."""
    if not use_triton(hidden, weight, labels, bias):
        return fused_linear_cross_entropy_reference(
            hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap,
            logit_scale, z_loss, normalizer, chunk_size)
    device_type = hidden.device.type
    dtype = autocast_dtype(device_type)
    if dtype is not None:
        # As autocast runs nn.Linear: the LM head in the autocast dtype (fp32 master weights
        # get a low-precision copy; the cast's backward brings dW back to fp32).
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return fused_linear_cross_entropy(hidden, weight, labels, bias, ignore_index,
                                              reduction, label_smoothing, softcap, logit_scale,
                                              z_loss, normalizer, chunk_size)
    _check_args(hidden, weight, labels, bias, reduction, label_smoothing, softcap, z_loss,
                normalizer, chunk_size)
    labels = labels.contiguous()
    chunk_rows = _chunk_rows(hidden.shape[0], weight.shape[0], hidden.element_size(), chunk_size)
    grad = torch.is_grad_enabled()
    need_dx, need_dw = grad and hidden.requires_grad, grad and weight.requires_grad
    need_db = grad and bias is not None and bias.requires_grad
    denominator = (_unit_scale(hidden) if reduction == "none"
                   else _denominator(labels, reduction, normalizer, int(ignore_index)))
    loss, *_ = flce_fwd(hidden, weight, bias, labels, denominator, reduction, int(ignore_index),
                        float(label_smoothing), None if softcap is None else float(softcap),
                        float(logit_scale), float(z_loss), chunk_rows, need_dx, need_dw, need_db)
    return loss
