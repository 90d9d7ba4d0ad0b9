"""Benchmark: fused linear cross-entropy (LM head + loss) against its peers and the matmul floor.

    python -m benchmarks.kernels.fused_linear_cross_entropy [--smoke] [--out DIR]

Providers, each over the modes fwd / bwd / full (harness.MODES):
  fastft          fastft.kernels.fused_linear_cross_entropy ("fwd" runs under no_grad: loss only)
  torch           Hugging Face's eager path: logits = x @ W^T, upcast to fp32, F.cross_entropy
  torch.compile   the same function through torch.compile (skipped in the CPU smoke run)
  liger           LigerFusedLinearCrossEntropyLoss, where liger-kernel and CUDA are present
  trl             TRL's chunked log-prob head (trl.kernels.ChunkedLogProbFunction, what SFTTrainer
                  computes its loss with since TRL 1.x, through add_fused_lm_head): the valid rows,
                  vocabulary chunks of TRL's own width (32768), loss = -mean log p(target)
and one row op="matmul3", provider="torch.matmul": the three matmuls X W^T, dZ W, dZ^T X at
the same shape and dtype, the floor that a fused op can approach (2 N H V FLOPs each).

Note on fastft's "bwd" rows: fastft computes its gradients inside the forward (scalar losses),
so the first backward only scales them; the harness's "bwd" mode calls backward repeatedly on a
retained graph, which makes fastft recompute them (4 matmuls). Compare "full" for the real cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import harness
from fastft.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

OP = "fused_linear_cross_entropy"
FULL_SHAPES = [  # (N tokens, H hidden, V vocab): Llama-3 8B head, Qwen2 1.5B-ish head
    (8192, 4096, 128256),
    (4096, 2048, 151936),
]
SMOKE_SHAPES = [(64, 64, 512)]


def torch_eager_loss(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # What HF eager does: lm_head in the model dtype, then ForCausalLMLoss upcasts to fp32.
    return F.cross_entropy((x @ w.t()).float(), y, ignore_index=-100)


def trl_chunked_loss():
    """TRL's chunked log-prob loss as SFTTrainer's fused LM head runs it, or None without TRL."""
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        return None

    def loss(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        valid = y != -100  # TRL scores the valid positions only (on Triton devices)
        log_probs = ChunkedLogProbFunction.apply(x[valid], w, None, y[valid], 1.0, chunk, None, 1.0, ("log_probs",))[0]
        return -log_probs.sum() / valid.sum().clamp(min=1)

    return loss


def _inputs(N, H, V, dtype, device):
    x = torch.randn(N, H, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(V, H, device=device) * H**-0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), device=device)
    y[torch.rand(N, device=device) < 0.1] = -100  # a few ignored tokens, as in SFT
    return x, w, y


def _matmul3(rec, N, H, V, dtype, device, shape):
    """Time X W^T, dZ W, dZ^T X with torch.matmul into preallocated outputs."""
    try:
        x = torch.randn(N, H, dtype=dtype, device=device)
        w = torch.randn(V, H, dtype=dtype, device=device)
        dz = torch.randn(N, V, dtype=dtype, device=device)
        z, dx, dw = torch.empty_like(dz), torch.empty_like(x), torch.empty_like(w)

        def three():
            torch.matmul(x, w.t(), out=z)
            torch.matmul(dz, w, out=dx)
            torch.matmul(dz.t(), x, out=dw)

        median, p20, p80 = harness.time_ms(three, rec.smoke)
        rec.add(op="matmul3", provider="torch.matmul", mode="full", shape=shape,
                dtype=str(dtype).replace("torch.", ""), ms=round(median, 4), p20_ms=round(p20, 4),
                p80_ms=round(p80, 4), tflops=round(6 * N * H * V / (median * 1e-3) / 1e12, 1))
    except Exception as exc:  # out of memory on a small card: record it, go on
        rec.add(op="matmul3", provider="torch.matmul", mode="full", shape=shape,
                dtype=str(dtype).replace("torch.", ""), error=f"{type(exc).__name__}: {exc}"[:500])
    finally:
        x = w = dz = z = dx = dw = None  # free the [N, V] buffers before the providers run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None) -> None:
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    rec = harness.Recorder(OP, args)
    device = args.device
    dtype = torch.bfloat16
    shapes = SMOKE_SHAPES if args.smoke else FULL_SHAPES

    providers = {"fastft": lambda x, w, y: fused_linear_cross_entropy(x, w, y),
                 "torch": torch_eager_loss}
    compiled = harness.compiled(torch_eager_loss, args.smoke)
    if compiled is not None:
        providers["torch.compile"] = compiled
    if harness.liger_available():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        providers["liger"] = lambda x, w, y: liger(w, x, y)
    trl_loss = trl_chunked_loss()
    if trl_loss is not None:
        providers["trl"] = trl_loss
    if args.providers:
        providers = {k: v for k, v in providers.items() if k in args.providers}

    for N, H, V in shapes:
        shape = {"N": N, "H": H, "V": V}
        if not args.providers or "torch.matmul" in args.providers:
            _matmul3(rec, N, H, V, dtype, device, shape)
        x, w, y = _inputs(N, H, V, dtype, device)
        for name, fn in providers.items():
            for mode in args.modes:
                flops = {"fwd": 2, "bwd": 4, "full": 6}[mode] * N * H * V
                extra = {"note": "bwd recomputes (grads are made in forward)"} if (
                    name == "fastft" and mode == "bwd") else {}
                harness.measure(rec, op=OP, provider=name, mode=mode, shape=shape, dtype=dtype,
                                forward=lambda fn=fn: fn(x, w, y), grads_of=[x, w], flops=flops,
                                **extra)
        del x, w, y
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"wrote {rec.save()}")


if __name__ == "__main__":
    main()
