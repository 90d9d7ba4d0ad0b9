"""PEFT LoRA layers through the fused LoRA kernels, found by structure, per instance, reversible.

A PEFT LoRA Linear is recognised by what it holds, not by its class: a `base_layer` that is an
nn.Linear, `lora_A`/`lora_B` ModuleDicts, a `scaling` dict and `lora_dropout` modules. Such a
layer gets an instance-level `forward` (the module, its class and its parameters stay as they
are, so `save_pretrained` writes the same PEFT-format keys and FSDP2 sees the same tree) that
calls `fastft.kernels.lora_linear` whenever the layer is in a state the kernel computes exactly:
adapters enabled and unmerged, one plain LoRA adapter active, no LoRA bias, dropout an
nn.Dropout or Identity. In any other state at call time (adapters disabled, merged, a second
adapter activated later, `adapter_names=` mixed batches) PEFT's own forward runs. What cannot be
fused when patching (DoRA and every other LoRA variant PEFT registers in `lora_variant`, several
active adapters, `lora_bias`, `fan_in_fan_out` Conv1D bases, custom dropout modules) is left on
PEFT's path and named in the PatchReport with the reason.

The LM head's LoRA layer is left alone: the fused loss (fastft/patching/loss.py) reads its
adapter and includes the delta in fused_linear_cross_entropy.

Gated MLPs whose gate/up/down projections are all fusable LoRA layers are routed as a block
through `fastft.kernels.lora_mlp` (see fastft/patching/lora_mlp.py... in this file: `_MLPBlock`).

FSDP2: `fully_shard` on the decoder blocks (fastft.distributed) unshards a block's parameters in
its pre-forward hook, so inside the LoRA layer's forward `base_layer.weight` is the full tensor.
If a base weight is still a sharded DTensor when the fused forward runs (someone sharded the
Linear itself, whose hook would only run through `base_layer(x)`), the layer falls back to
PEFT's forward, which calls the base layer and so lets FSDP gather it.
"""

from __future__ import annotations

import torch
from torch import nn

from fastft.kernels import lora_linear

FORWARD_ATTR = "_fastft_lora_forward"


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(t, DTensor)


def is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer, by what it holds."""
    return (hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict) and hasattr(module, "scaling"))


def static_reason(module: nn.Module) -> str:
    """Why this LoRA layer cannot be fused in its current configuration, or '' when it can."""
    base = module.base_layer
    if not isinstance(base, nn.Linear) or getattr(module, "fan_in_fan_out", False):
        return f"base layer {type(base).__name__} is not an nn.Linear (e.g. Conv1D, embedding): kept on PEFT"
    active = [a for a in module.active_adapters if a in module.lora_A.keys()]
    if len(active) > 1:
        return f"{len(active)} LoRA adapters active: kept on PEFT"
    for name in active:
        variant = getattr(module, "lora_variant", {}).get(name)
        if variant is not None:
            return f"LoRA variant {type(variant).__name__} (e.g. DoRA): kept on PEFT"
        if getattr(module, "use_dora", {}).get(name, False):
            return "DoRA: kept on PEFT"
        if module.lora_B[name].bias is not None:
            return "lora_bias=True: kept on PEFT"
        if not isinstance(module.lora_A[name], nn.Linear) or not isinstance(module.lora_B[name], nn.Linear):
            return f"adapter modules {type(module.lora_A[name]).__name__}: kept on PEFT"
        drop = module.lora_dropout[name]
        if not isinstance(drop, (nn.Dropout, nn.Identity)):
            return f"dropout module {type(drop).__name__}: kept on PEFT"
    return ""


def fused_operands(module: nn.Module, x: torch.Tensor):
    """(x, W, b, A, B, scale, p) for the fused call in the layer's state now, or None when PEFT's
    forward must run (see module docstring)."""
    if module.disable_adapters or module.merged:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A.keys()]
    if len(active) != 1 or static_reason(module):
        return None
    name = active[0]
    base = module.base_layer
    w, b = base.weight, base.bias
    a, bm = module.lora_A[name].weight, module.lora_B[name].weight
    if any(_is_dtensor(t) for t in (w, a, bm)):
        return None
    drop = module.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # as autocast runs the three nn.Linear calls
        dtype = torch.get_autocast_dtype(device_type)
        x, w, a, bm = x.to(dtype), w.to(dtype), a.to(dtype), bm.to(dtype)
        b = None if b is None else b.to(dtype)
    elif x.dtype != w.dtype:
        return None
    return x, w, b, a, bm, float(module.scaling[name]), p


def _fused_forward(module: nn.Module, original):
    def forward(x, *args, **kwargs):
        ops = None if (args or kwargs) else fused_operands(module, x)
        if ops is None:
            return original(x, *args, **kwargs)
        x, w, b, a, bm, scale, p = ops
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, w, a, bm, scale, b, p)

    forward.__wrapped__ = original
    return forward


def describe(module: nn.Module) -> str:
    active = [a for a in module.active_adapters if a in module.lora_A.keys()]
    if not active:
        return "no active adapter yet"
    name = active[0]
    drop = module.lora_dropout[name]
    parts = [f"r={module.lora_A[name].weight.shape[0]}", f"scale={float(module.scaling[name]):g}"]
    if isinstance(drop, nn.Dropout) and drop.p > 0:
        parts.append(f"dropout={drop.p:g}")
    if module.base_layer.bias is not None:
        parts.append("bias")
    return ", ".join(parts)


def install_layer(module: nn.Module) -> None:
    original = module.forward
    module.forward = _fused_forward(module, original)
    setattr(module, FORWARD_ATTR, True)


def uninstall_layer(module: nn.Module) -> None:
    if module.__dict__.pop(FORWARD_ATTR, None):
        module.__dict__.pop("forward", None)


def install(model: nn.Module, report, skip: set[int]) -> list[str]:
    """Route every fusable LoRA Linear of model through lora_linear; returns the patched names.
    `skip` holds id()s of modules another patch owns (the LM head)."""
    patched = []
    for name, module in model.named_modules():
        if not is_lora_layer(module):
            continue
        kind = f"lora.{type(module).__name__}"
        if id(module) in skip:
            report.add("lora", name, kind, reason="LM head: its adapter is fused into the loss (cross_entropy)")
            continue
        if "forward" in module.__dict__:
            report.add("lora", name, kind, reason="forward already replaced on the instance: left alone")
            continue
        why = static_reason(module)
        if why:
            report.add("lora", name, kind, reason=why)
            continue
        install_layer(module)
        patched.append(name)
        report.add("lora", name, kind, "lora_linear", describe(module))
    return patched


def uninstall(model: nn.Module, names: list[str]) -> None:
    for name in names:
        uninstall_layer(model.get_submodule(name))
