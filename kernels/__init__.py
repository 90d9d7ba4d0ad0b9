"""fastft.kernels: fused Triton kernels for fine-tuning. Depends on torch and triton only.

Each op lives in its own file with a plain-torch `*_reference`, Triton forward and backward
kernels, its torch.library custom ops (torch.ops.fastft.*) and the functional API exported here.
"""

# Imported under any other name, this package defines nothing. That happens when the repository
# root is on sys.path and something looks up Hugging Face's `kernels` package by its name
# (transformers' is_kernels_available imports it when it finds no metadata): registering the
# custom ops a second time would replace fastft.kernels' registrations, and transformers, finding
# no version here, treats Hugging Face's package as absent.
if __name__ == "fastft.kernels":
    from .dequantize_4bit import Quant4bit, dequantize_4bit, dequantize_4bit_reference
    from .fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
    from .layer_norm import layer_norm, layer_norm_reference
    from .lora import lora_dropout, lora_linear, lora_linear_many, lora_linear_reference
    from .lora_mlp import lora_mlp, lora_mlp_reference
    from .moe import moe_experts, moe_experts_reference
    from .rms_norm import rms_norm, rms_norm_reference

    __all__ = [
        "Quant4bit",
        "dequantize_4bit",
        "dequantize_4bit_reference",
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
