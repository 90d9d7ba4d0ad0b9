"""RMSNorm fwd/bwd/full: fastft vs HF eager (LlamaRMSNorm) vs torch.compile vs Liger.

    python -m benchmarks.kernels.rms_norm [--smoke] [--out DIR]
"""

from __future__ import annotations

import sys

import torch

from benchmarks import harness
from benchmarks.kernels import _norms
from fastft.kernels.rms_norm import rms_norm, rms_norm_reference


class _Norm(torch.nn.Module):
    def __init__(self, fn, hidden, dtype, device):
        super().__init__()
        self.fn = fn
        self.weight = torch.nn.Parameter(torch.rand(hidden, dtype=dtype, device=device) + 0.5)

    def forward(self, x):
        return self.fn(x, self.weight, 1e-6)


def providers(hidden, dtype, device, smoke):
    out = {
        "fastft": _Norm(rms_norm, hidden, dtype, device),
        "torch": _Norm(rms_norm_reference, hidden, dtype, device),
    }
    compiled = harness.compiled(_Norm(rms_norm_reference, hidden, dtype, device), smoke)
    if compiled is not None:
        out["torch.compile"] = compiled
    if harness.liger_available():
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        out["liger"] = LigerRMSNorm(hidden, eps=1e-6).to(device=device, dtype=dtype)
    return out


def main(argv=None):
    return _norms.run("rms_norm", argv, providers)


if __name__ == "__main__":
    main(sys.argv[1:])
