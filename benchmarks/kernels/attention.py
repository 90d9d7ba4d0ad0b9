"""Attention on packed vs padded batches: fastft varlen (no mask) vs SDPA on the padded batch.

    python -m benchmarks.kernels.attention [--smoke] [--out DIR]

The same documents (SQuAD-like lengths, drawn with a fixed seed) run two ways: packed into one
row that fastft's attention splits with cu_seqlens (varlen FlashAttention on CUDA), and padded to
the longest document with a key-padding mask through transformers' SDPA path, which is what a
plain HF Trainer user runs. Reported: time fwd/bwd/full and real tokens per second (padding
excluded), so that the padded run pays for the work it wastes. Llama-3.1-8B head shapes
(32 query heads, 8 KV heads, head dim 128), bf16.
"""

from __future__ import annotations

import sys

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from benchmarks import harness
from fastft.attention import fastft_attention_forward


class _Layer(torch.nn.Module):
    """What the attention functions read off the module: config, is_causal, num_key_value_groups."""

    def __init__(self, heads, kv_heads):
        super().__init__()
        self.config = None
        self.is_causal = True
        self.num_key_value_groups = heads // kv_heads


def _lengths(n_tokens: int, gen: torch.Generator) -> list[int]:
    """Document lengths like SQuAD prompts + answers at a 4096-token budget: 150 to 900 tokens."""
    lengths = []
    while sum(lengths) < n_tokens:
        lengths.append(int(torch.randint(150, 900, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - n_tokens
    return [n for n in lengths if n > 0]


def main(argv=None):
    args = harness.parse_args("packed varlen attention vs padded SDPA", argv)
    rec = harness.Recorder("attention", args)
    heads, kv_heads, dim = (4, 2, 16) if args.smoke else (32, 8, 128)
    n_tokens = 256 if args.smoke else 16384
    dtype = torch.bfloat16
    lengths = _lengths(n_tokens, torch.Generator().manual_seed(0))
    longest, batch = max(lengths), len(lengths)
    layer = _Layer(heads, kv_heads)
    shape = {"tokens": n_tokens, "docs": batch, "max_len": longest, "heads": heads, "kv_heads": kv_heads, "dim": dim}

    def leaf(*size):
        return torch.randn(*size, device=args.device, dtype=dtype, requires_grad=True)

    # packed: one row of all documents
    q, k, v = leaf(1, heads, n_tokens, dim), leaf(1, kv_heads, n_tokens, dim), leaf(1, kv_heads, n_tokens, dim)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=args.device)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(args.device)
    packed_kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest,
                         position_ids=position_ids)

    def packed():
        return fastft_attention_forward(layer, q, k, v, None, scaling=dim**-0.5, **packed_kwargs)[0]

    # padded: [docs, heads, longest, dim] with a boolean key-padding + causal mask
    qp, kp, vp = leaf(batch, heads, longest, dim), leaf(batch, kv_heads, longest, dim), leaf(batch, kv_heads, longest, dim)
    valid = torch.arange(longest, device=args.device)[None, :] < torch.tensor(lengths, device=args.device)[:, None]
    causal = torch.ones(longest, longest, dtype=torch.bool, device=args.device).tril()
    mask = (causal[None, None] & valid[:, None, None, :])

    def padded():
        return sdpa_attention_forward(layer, qp, kp, vp, mask, scaling=dim**-0.5)[0]

    # attention FLOPs on real tokens (causal: half the square), 4·d per score fwd, 2.5x for fwd+bwd
    flops_fwd = sum(2 * 2 * heads * dim * n * n // 2 for n in lengths)
    for provider, fn, grads in (("fastft", packed, [q, k, v]), ("sdpa padded", padded, [qp, kp, vp])):
        if args.providers and provider not in args.providers:
            continue
        for mode in args.modes:
            row = harness.measure(rec, op="attention", provider=provider, mode=mode, shape=shape, dtype=dtype,
                                  forward=fn, grads_of=grads,
                                  flops={"fwd": flops_fwd, "bwd": int(2.5 * flops_fwd) - flops_fwd,
                                         "full": int(2.5 * flops_fwd)}[mode])
            if row and row.get("ms"):
                row["real_tokens_per_s"] = round(n_tokens / (row["ms"] * 1e-3))
    print(f"wrote {rec.save()}")
    return rec.rows


if __name__ == "__main__":
    main(sys.argv[1:])
