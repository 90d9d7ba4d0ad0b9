"""Probe helpers that more than one patch uses, and that never change a model (DESIGN.md, "Verify,
then report"): structural predicates for PEFT's LoRA modules, and the random copy a patch probes
when the module itself is on the meta device.

    is_lora_layer     a PEFT LoRA layer (Linear or ParamWrapper), by what it holds
    is_param_wrapper  a PEFT ParamWrapper (LoRA on a parameter, e.g. MoE expert stacks)
    random_copy       a CPU copy of a meta-device module with random parameters

Users: fastft/patching/lora.py, moe.py and tiled_mlp.py, fastft/expert_parallel.py and
fastft/checkpoint.py. `random_copy` and `is_lora_layer` were fastft/patching/lora.py's (the
former as `_random_copy`), `is_param_wrapper` was fastft/patching/moe.py's `_is_param_wrapper`;
the DTensor check they used is fastft.collectives.is_dtensor.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastft import quantization


def is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer, by what it holds."""
    return (hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict) and hasattr(module, "scaling"))


def is_param_wrapper(module: nn.Module | None) -> bool:
    """A PEFT ParamWrapper (`target_parameters`): a LoRA layer over one named parameter of its base."""
    return is_lora_layer(module) and isinstance(getattr(module, "parameter_name", None), str)


def random_copy(module: nn.Module) -> nn.Module:
    """A CPU copy of a meta-device module with random parameters (LoRA B included, so that the
    adapters' terms take part in the probe)."""
    # Parameter subclasses (bitsandbytes' Params4bit) cannot be deep-copied on meta: copy plain ones.
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters() if type(p) is not nn.Parameter}
    clone = copy.deepcopy(module, memo).to_empty(device="cpu")
    for m in clone.modules():  # instance forwards (fused layers) would still call the originals
        m.__dict__.pop("forward", None)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in clone.parameters():
            if p.dtype.is_floating_point:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)
    quantization.requantize_random(clone, generator)  # 4-bit layers: random weights, real states
    return clone
