"""LayerNorm (with bias) fwd/bwd/full: fastft vs torch eager (nn.LayerNorm) vs torch.compile vs Liger.

    python -m benchmarks.kernels.layer_norm [--smoke] [--out DIR]
"""

from __future__ import annotations

import sys

import torch

from benchmarks import harness
from benchmarks.kernels import _norms
from fastft.kernels.layer_norm import layer_norm


class _FastLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps)


def providers(hidden, dtype, device, smoke):
    def make(cls):
        return cls(hidden, eps=1e-5, device=device, dtype=dtype)

    out = {"fastft": make(_FastLayerNorm), "torch": make(torch.nn.LayerNorm)}
    compiled = harness.compiled(make(torch.nn.LayerNorm), smoke)
    if compiled is not None:
        out["torch.compile"] = compiled
    if harness.liger_available():
        from liger_kernel.transformers.layer_norm import LigerLayerNorm

        out["liger"] = LigerLayerNorm(hidden, eps=1e-5, bias=True).to(device=device, dtype=dtype)
    return out


def main(argv=None):
    return _norms.run("layer_norm", argv, providers)


if __name__ == "__main__":
    main(sys.argv[1:])
