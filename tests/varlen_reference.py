"""A CPU varlen attention backend for the tests: per-document attention over the cu_seqlens it is
given (causal, sliding window, soft-capping, GQA), in float32, output in the input dtype.

Registered in place of flash-attn / torch's varlen_attn (which need CUDA), with their dtype rule
(16-bit inputs only), so that on a CPU the fastft attention takes exactly the dispatch it takes
on a GPU: the one decision per forward, the mask function returning None, the cu_seqlens from
the collator or from position_ids, the flattening to [tokens, heads, dim] and back.
"""

from __future__ import annotations

import contextlib

import torch

from fastft import attention

NAME = "reference"


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, softcap, dropout):
    assert dropout == 0.0, "the reference backend has no dropout"
    assert q.dim() == 3 and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    scale = dim**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0], bounds
    assert max(b - a for a, b in zip(bounds, bounds[1:])) == max_q, (bounds, max_q)
    for start, end in zip(bounds, bounds[1:]):
        qd = q[start:end].float().transpose(0, 1)                                     # [H, L, D]
        kd, vd = (t[start:end].float().transpose(0, 1).repeat_interleave(heads // kv_heads, 0) for t in (k, v))
        scores = qd @ kd.transpose(1, 2) * scale                                      # [H, L, L]
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(end - start)
        allowed = i[None, :] <= i[:, None]
        if window:
            allowed &= i[:, None] - i[None, :] < window
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[start:end] = (probs @ vd).transpose(0, 1).to(q.dtype)
    return out


BACKEND = attention.VarlenBackend(NAME, reference_varlen, frozenset({"cpu"}), softcap=True)


@contextlib.contextmanager
def registered():
    """The reference backend tried first, for the duration of the block."""
    attention.register_varlen_backend(BACKEND)
    try:
        yield BACKEND
    finally:
        attention.unregister_varlen_backend(NAME)
