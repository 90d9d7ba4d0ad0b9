"""The gated MLPs' activations and their derivatives, shared by the dense LoRA MLP (lora_mlp.py)
and the experts (moe.py): h = act(g) ⊙ u, and in the backward dg = dh ⊙ u ⊙ act'(g).

Closed forms, in fp32 inside the kernels (σ the logistic sigmoid, Φ and φ the standard normal's
cdf and density):
    silu       act(g) = g·σ(g)                         act'(g) = σ(g)·(1 + g·(1 − σ(g)))
    gelu_tanh  act(g) = ½·g·(1 + t),                   act'(g) = ½·(1 + t) + ½·g·(1 − t²)·k·(1 + 3c·g²)
               t = tanh(k·(g + c·g³)), k = √(2/π), c = 0.044715 (Hendrycks & Gimpel 2016)
    gelu       act(g) = g·Φ(g)                         act'(g) = Φ(g) + g·φ(g)
The reference is torch's own (F.silu, F.gelu), what transformers' MLPs run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
ACT_ID = {name: i for i, name in enumerate(ACTIVATIONS)}  # the kernels' ACT constexpr


def activation_reference(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")


@triton.jit
def _tanh(z):
    # tanh from exp (libdevice tanh is unavailable in the interpreter): 1 - 2/(e^{2z} + 1);
    # its absolute error near 0 (~1e-7) is harmless here, where it is added to 1.
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@triton.jit
def act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32; ACT is ACT_ID[activation]."""
    if ACT == 0:  # silu
        sig = 1.0 / (1.0 + tl.exp(-g))
        return g * sig, sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:  # gelu, tanh approximation
        k: tl.constexpr = 0.7978845608028654  # sqrt(2/pi)
        t = _tanh(k * (g + 0.044715 * g * g * g))
        return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * g * g)
    else:  # gelu, erf form
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        return g * cdf, cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
