"""fastft.kernels: fused Triton kernels for fine-tuning. Depends on torch and triton only.

Each op lives in its own file with a plain-torch `*_reference`, Triton forward and backward
kernels, an autograd Function and the functional API exported here.
"""

from .fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from .layer_norm import layer_norm, layer_norm_reference
from .lora import lora_dropout, lora_linear, lora_linear_many, lora_linear_reference
from .lora_mlp import lora_mlp, lora_mlp_reference
from .moe import moe_experts, moe_experts_reference
from .rms_norm import rms_norm, rms_norm_reference

__all__ = [
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "layer_norm",
    "layer_norm_reference",
    "lora_dropout",
    "lora_linear",
    "lora_linear_many",
    "lora_linear_reference",
    "lora_mlp",
    "lora_mlp_reference",
    "moe_experts",
    "moe_experts_reference",
    "rms_norm",
    "rms_norm_reference",
]
