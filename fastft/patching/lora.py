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
active adapters, `lora_bias`, `fan_in_fan_out` Conv1D bases, custom dropout modules, quantized
bases other than bitsandbytes' 4-bit ones) is left on PEFT's path and named in the PatchReport
with the reason.

QLoRA: a LoRA layer over a bitsandbytes 4-bit base (PEFT's `Linear4bit`; an nn.Linear subclass
whose weight holds packed NF4/FP4 values) takes the same fused path with the weight read as the
kernels' `Quant4bit` (fastft/quantization.py): the base product runs in the layer's compute dtype
(under autocast, the autocast dtype, as bitsandbytes' GEMM would) and lands in x's dtype, as
PEFT + bitsandbytes compute it, and the weight is dequantized only around its GEMMs.

The LM head's LoRA layer is left alone: the fused loss (fastft/patching/loss.py) reads its
adapter and includes the delta in fused_linear_cross_entropy.

Gated MLPs are routed as a block through `fastft.kernels.lora_mlp` when their three projections
are fusable LoRA layers: a module whose direct children include exactly three such layers, two
[H -> I] and one [I -> H], is probed once per (class, shapes) on random inputs (eval mode, no
grad) against the reference act(gate(x))·up(x) -> down for both gate/up assignments and each
activation (silu, gelu tanh, gelu erf); the match found becomes the block's instance forward.
A block on the meta device is probed as a CPU copy with random weights (what it computes does
not depend on their values). Anything else (non-gated MLPs, fused gate_up_proj layouts, a probe
without a match) keeps the per-layer lora_linear path, and the report says which. At call time
the block falls back to the module's own forward (whose layers are still fused one by one)
whenever one of its layers is not in a fusable state.

Under FSDP2 the block reads the gate/up/down weights directly, so it must run inside a module
that FSDP unshards as a unit: the decoder block that contains the MLP (how fastft.distributed
and torchtitan shard). A projection sharded on its own leaves a DTensor weight here, and then
the block's own forward runs (per-layer, PEFT's forward calling the base layers).

FSDP2: `fully_shard` on the decoder blocks (fastft.distributed) unshards a block's parameters in
its pre-forward hook, so inside the LoRA layer's forward `base_layer.weight` is the full tensor.
If a base weight is still a sharded DTensor when the fused forward runs (someone sharded the
Linear itself, whose hook would only run through `base_layer(x)`), the layer falls back to
PEFT's forward, which calls the base layer and so lets FSDP gather it.

Helpers shared with other patches live elsewhere: `is_lora_layer` and the meta-device `random_copy` in
fastft/patching/probe.py (the MoE patch uses them too), the DTensor check in
fastft.collectives.is_dtensor.
"""

from __future__ import annotations

import torch
from torch import nn

from fastft import collectives, quantization
from fastft.kernels._common import autocast_dtype
from fastft.kernels.activations import ACTIVATIONS
from fastft.kernels.lora import lora_linear
from fastft.kernels.lora_mlp import lora_mlp, lora_mlp_reference
from fastft.patching.probe import is_lora_layer, random_copy

FORWARD_ATTR = "_fastft_lora_forward"


def static_reason(module: nn.Module) -> str:
    """Why this LoRA layer cannot be fused in its current configuration, or '' when it can."""
    base = module.base_layer
    if not isinstance(base, nn.Linear) or getattr(module, "fan_in_fan_out", False):
        return f"base layer {type(base).__name__} is not an nn.Linear (e.g. Conv1D, embedding): kept on PEFT"
    if quantization.is_quantized_base(base):  # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear
        why = quantization.fused_4bit_reason(base)
        if why:
            return why
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
    if any(collectives.is_dtensor(t) for t in (w, a, bm)):
        return None
    drop = module.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
    four_bit = quantization.is_4bit(base)
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:  # as autocast runs the three nn.Linear calls
        w = quantization.quant4bit(base, dtype) if four_bit else w.to(dtype)
        x, a, bm = x.to(dtype), a.to(dtype), bm.to(dtype)
        b = None if b is None else b.to(dtype)
    elif four_bit:  # the base product in the compute dtype, landing in x's (bitsandbytes' Linear4bit)
        w = quantization.quant4bit(base, base.compute_dtype or x.dtype)
    elif x.dtype != w.dtype:
        return None
    if w is None:  # a 4-bit layer without its quantization state (not loaded yet)
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
    if quantization.is_4bit(module.base_layer):
        base = module.base_layer
        compute = base.compute_dtype or quantization.weight_dtype(base)
        parts.append(f"4-bit {base.weight.quant_type}, compute {str(compute).removeprefix('torch.')}")
    return ", ".join(parts)


def install_layer(module: nn.Module) -> None:
    original = module.forward
    module.forward = _fused_forward(module, original)
    setattr(module, FORWARD_ATTR, True)


def uninstall_layer(module: nn.Module) -> None:
    if module.__dict__.pop(FORWARD_ATTR, None):
        module.__dict__.pop("forward", None)


# ------------------------------------------------------------------------------------------------
# Gated MLP blocks.
# ------------------------------------------------------------------------------------------------
_PROBED: dict[tuple, tuple[str, str, str, str] | str] = {}


def _layer_shape(layer: nn.Module) -> tuple[int, int]:
    return layer.base_layer.in_features, layer.base_layer.out_features


def _input_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a LoRA layer's inputs come in: its base weight's (for a 4-bit base, the dtype it was
    quantized from)."""
    base = layer.base_layer
    return quantization.weight_dtype(base) if quantization.is_4bit(base) else base.weight.dtype


def _mlp_layers(module: nn.Module) -> tuple[str, str, str] | str | None:
    """(first [H->I], second [H->I], down [I->H]) child names; None when not that shape; a reason
    for a gated MLP with a fused gate_up projection."""
    loras = {n: c for n, c in module.named_children() if is_lora_layer(c) and FORWARD_ATTR in c.__dict__}
    shapes = {n: _layer_shape(c) for n, c in loras.items()}
    has_activation = any(not list(c.parameters()) for c in module.children())  # e.g. act_fn
    if len(loras) == 2 and has_activation:
        (n1, (i1, o1)), (n2, (i2, o2)) = shapes.items()
        if (o1, i1) == (2 * i2, o2) or (o2, i2) == (2 * i1, o1):
            return "fused gate_up layout (one adapter over both halves): per-layer lora_linear"
    if len(loras) != 3:
        return None
    for down, (i, h) in shapes.items():
        ups = [n for n, s in shapes.items() if n != down and s == (h, i)]
        if len(ups) == 2:
            return ups[0], ups[1], down
    return None


def _layer_tuple(layer: nn.Module, x: torch.Tensor):
    ops = fused_operands(layer, x)
    if ops is None:
        return None
    x, w, b, a, bm, s, p = ops
    return x, (w, b, a, bm, s), p


def _probe_mlp(module: nn.Module, names: tuple[str, str, str]) -> tuple[str, str, str, str] | str:
    first = getattr(module, names[0])
    w = first.base_layer.weight
    if w.is_meta:  # what the block computes does not depend on its values: probe a random CPU copy
        return _probe_mlp(random_copy(module), names)
    dtype = _input_dtype(first)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[w.device] if w.is_cuda else []):
            x = torch.randn(2, 3, _layer_shape(first)[0], device=w.device).to(dtype)
            out = module(x)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                return "forward does not map x to a tensor of its shape"
            tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
            for gate, up in ((names[0], names[1]), (names[1], names[0])):
                layers = [_layer_tuple(getattr(module, n), x) for n in (gate, up, names[2])]
                if any(t is None for t in layers):
                    return "a projection is not in a fusable state"
                for act in ACTIVATIONS:
                    ref = lora_mlp_reference(x.float(), *[tuple(t.float() if isinstance(t, torch.Tensor) else t
                                                               for t in lt[1]) for lt in layers], act)
                    if ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item() <= tol:
                        return gate, up, names[2], act
    except Exception as exc:  # a forward that wants more than x
        return f"probe failed ({type(exc).__name__}: {str(exc)[:60]})"
    finally:
        for m, training in modes.items():
            m.training = training
    return "forward is not down(act(gate(x))·up(x)) for silu/gelu: per-layer lora_linear"


def _mlp_forward(module: nn.Module, spec: tuple[str, str, str, str], original):
    gate, up, down, act = spec

    def forward(x, *args, **kwargs):
        layers = None if (args or kwargs) else [_layer_tuple(getattr(module, n), x) for n in (gate, up, down)]
        if layers is None or any(t is None for t in layers):
            return original(x, *args, **kwargs)
        xc = layers[0][0]
        with torch.autocast(xc.device.type, enabled=False):
            return lora_mlp(xc, layers[0][1], layers[1][1], layers[2][1], act, tuple(t[2] for t in layers))

    forward.__wrapped__ = original
    return forward


def install_mlps(model: nn.Module, report) -> list[str]:
    patched = []
    for name, module in model.named_modules():
        if is_lora_layer(module) or "forward" in module.__dict__:
            continue
        names = _mlp_layers(module)
        if names is None:
            continue
        if isinstance(names, str):
            report.add("lora", name, type(module).__name__, reason=names)
            continue
        key = (type(module), names, tuple(_layer_shape(getattr(module, n)) for n in names),
               str(getattr(module, names[0]).base_layer.weight.dtype), str(_input_dtype(getattr(module, names[0]))))
        spec = _PROBED.get(key)
        if spec is None or isinstance(spec, str):
            spec = _probe_mlp(module, names)
            _PROBED[key] = spec
        if isinstance(spec, str):
            report.add("lora", name, type(module).__name__, reason=spec)
            continue
        module.forward = _mlp_forward(module, spec, module.forward)
        setattr(module, FORWARD_ATTR, True)
        patched.append(name)
        report.add("lora", name, type(module).__name__, f"lora_mlp ({spec[3]})",
                   f"gate={spec[0]}, up={spec[1]}, down={spec[2]}")
    return patched


def install(model: nn.Module, report, skip: set[int]) -> list[str]:
    """Route every fusable LoRA Linear of model through lora_linear; returns the patched names.
    `skip` holds id()s of modules another patch owns (the LM head)."""
    patched = []
    for name, module in model.named_modules():
        if not is_lora_layer(module):
            continue
        kind = f"lora.{type(module).__name__}"
        if getattr(module, "fastft_moe_lora", False):
            continue  # a PEFT ParamWrapper on MoE experts: fastft/patching/moe.py fuses and reports it
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
    return patched + install_mlps(model, report)


def uninstall(model: nn.Module, names: list[str]) -> None:
    for name in names:
        uninstall_layer(model.get_submodule(name))
