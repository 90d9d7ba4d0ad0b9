"""Load-time patching: `patch(model)`, `unpatch(model)`, `from_pretrained(name)`.

One generic mechanism (DESIGN.md): modules are found by structure and by what they compute,
replaced per instance (never a class attribute or a process-global function), recorded, and
reversible. Architecture differences are data (a NormSpec, a HeadSpec), found by probing.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fastft.patching import lora as lora_patch
from fastft.patching import loss as loss_patch
from fastft.patching import moe as moe_patch
from fastft.patching import norms
from fastft.patching.report import PatchEntry, PatchReport

OPTIONS = ("rms_norm", "layer_norm", "cross_entropy", "attention", "lora", "moe")
STATE = "_fastft_patch_state"


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _check_options(options: dict[str, Any]) -> dict[str, bool]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"fastft.patch: unknown option(s) {unknown}; the options are {list(OPTIONS)} "
                        "(each True or False)")
    for name, value in options.items():
        if not isinstance(value, bool):  # never silently truthy: lora=LoraConfig(...) is not lora=True
            hint = (" To add a LoRA adapter, use fastft.from_pretrained(..., lora=LoraConfig(...)) or wrap the "
                    "model with peft.get_peft_model first; patch's lora=True routes existing LoRA layers "
                    "through the fused kernels." if name == "lora" else "")
            raise TypeError(f"fastft.patch: option {name}={value!r} must be True or False, not "
                            f"{type(value).__name__}.{hint}")
    return {name: options.get(name, True) for name in OPTIONS}


def patch(model: nn.Module, **options: bool) -> PatchReport:
    """Patch a model in place with the fused kernels; returns what was replaced and what was not.

    Options (all default True): rms_norm, layer_norm, cross_entropy, attention, lora, moe. Patching a
    patched model first restores it, so options can be changed by patching again.
    """
    enabled = _check_options(options)
    if getattr(model, STATE, None) is not None:
        unpatch(model)
    hf = _hf_model(model)
    report = PatchReport(type(hf).__name__)
    state = {"norms": [], "attention": None, "loss": False, "lora": []}

    # Norms: every candidate module, probed for what it computes.
    for name, module in list(model.named_modules()):
        ok, why = norms.candidate(module)
        if not ok:
            if why:
                report.add("norm", name, type(module).__name__, reason=why)
            continue
        spec = norms.detect(module)
        if isinstance(spec, str):
            report.add("norm", name, type(module).__name__, reason=spec)
            continue
        if not enabled[spec.kind]:
            report.add(spec.kind, name, type(module).__name__, reason=f"{spec.kind}=False")
            continue
        fused = norms.replace(module, spec)
        model.set_submodule(name, fused)
        state["norms"].append(name)
        report.add(spec.kind, name, type(module).__name__, type(fused).__name__, spec.describe())

    # The loss: fused linear cross-entropy on the LM head.
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if not enabled["cross_entropy"]:
        pass
    elif head is None:
        report.add("cross_entropy", "", type(hf).__name__, reason="no output embeddings (LM head)")
    else:
        spec = loss_patch.detect(hf, head)
        if isinstance(spec, str):
            report.add("cross_entropy", "lm_head", type(head).__name__, reason=spec)
        else:
            loss_patch.install(hf, head, spec)
            state["loss"] = True
            report.add("cross_entropy", "lm_head", type(head).__name__, "fused_linear_cross_entropy",
                       spec.describe())

    # Attention: the registered "fastft" implementation.
    config = getattr(hf, "config", None)
    if enabled["attention"] and config is not None and hasattr(hf, "set_attn_implementation"):
        from fastft import attention

        attention.register()
        previous = getattr(config, "_attn_implementation", None)
        try:
            hf.set_attn_implementation(attention.NAME)
        except (ValueError, ImportError) as exc:
            report.add("attention", "", type(hf).__name__, reason=f"kept {previous}: {exc}"[:200])
        else:
            state["attention"] = previous
            report.add("attention", "", previous or "default", f"fastft ({attention.describe(config)})")

    # MoE: experts modules through the grouped-GEMM kernel (with their PEFT LoRA ParamWrappers).
    if enabled["moe"]:
        state["moe"] = moe_patch.install(model, hf, report)

    # LoRA: PEFT LoRA layers through the fused kernels (the LM head's adapter belongs to the loss).
    if enabled["lora"]:
        state["lora"] = lora_patch.install(model, report, skip={id(head)} if head is not None else set())
    if not report.patched():
        raise ValueError(f"fastft.patch: found nothing to patch in {type(hf).__name__}.\n{report}\n"
                         "If this model has RMSNorm/LayerNorm modules or an LM head fastft should handle, "
                         "the report above says why each was left alone.")
    object.__setattr__(model, STATE, state)
    model.fastft_report = report
    return report


def verify_loaded(model: nn.Module) -> str | None:
    """Finish patching a model that was patched on the meta device and has its weights now (the
    FSDP2 rank-0 load in fastft/train.py): the LM head's logit map, which only a forward with
    weights can check, is probed and the fused loss re-installed with it, or removed (the model's
    own loss then runs) if the probe refuses it. Under FSDP2 every rank must call this (the probe
    is a forward) with the root's parameters gathered (fastft.distributed.root_unsharded).
    Returns what it concluded, or None when there was nothing to check."""
    state = getattr(model, STATE, None)
    hf = _hf_model(model)
    spec = loss_patch.installed_spec(hf) if state and state["loss"] else None
    if spec is None or spec.verified:
        return None
    head = hf.get_output_embeddings()
    loss_patch.uninstall(hf)
    spec = loss_patch.detect(hf, head)
    entry = next(e for e in model.fastft_report.entries if e.kind == "cross_entropy" and e.replacement)
    if isinstance(spec, str):
        state["loss"] = False
        entry.replacement, entry.reason = "", spec
        return f"LM head loss: {spec}"
    loss_patch.install(hf, head, spec)
    entry.reason = spec.describe()
    return f"LM head loss: fused_linear_cross_entropy, logit map verified ({spec.describe() or 'plain'})"


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: original modules, forwards and attention implementation are restored."""
    state = getattr(model, STATE, None)
    if state is None:
        return model
    lora_patch.uninstall(model, state.get("lora", []))
    if state.get("moe"):
        moe_patch.uninstall(model, state["moe"])
    for name in state["norms"]:
        model.set_submodule(name, norms.restore(model.get_submodule(name)))
    hf = _hf_model(model)
    if state["loss"]:
        loss_patch.uninstall(hf)
    if state["attention"] is not None:
        hf.set_attn_implementation(state["attention"])
    object.__delattr__(model, STATE)
    model.__dict__.pop("fastft_report", None)
    return model


def from_pretrained(name_or_path: str, *model_args, **kwargs) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(...)`, then `patch`; fastft options go to `patch`.

    `lora` is either a patch option (True/False: route LoRA layers through the fused kernels) or a
    PEFT config (e.g. `peft.LoraConfig(r=16, target_modules="all-linear")`): the adapter is added
    with `peft.get_peft_model` (the result is a PeftModel, with only the adapter trainable) and its
    layers are then patched onto the fused LoRA path.
    """
    from transformers import AutoModelForCausalLM

    options = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTIONS}
    adapter = None
    if "lora" in options and not isinstance(options["lora"], bool):
        adapter = options.pop("lora")
        try:
            from peft import PeftConfig
        except ImportError as exc:
            raise TypeError(f"fastft.from_pretrained: lora={adapter!r} needs peft (pip install peft)") from exc
        if not isinstance(adapter, PeftConfig):
            raise TypeError(f"fastft.from_pretrained: lora={adapter!r} must be True/False or a peft config such as "
                            f"peft.LoraConfig(r=16, target_modules='all-linear'), not {type(adapter).__name__}")
    _check_options(options)  # before the (possibly long) load
    model = AutoModelForCausalLM.from_pretrained(name_or_path, *model_args, **kwargs)
    if adapter is not None:
        from peft import get_peft_model

        model = get_peft_model(model, adapter)
    patch(model, **options)
    return model


__all__ = ["OPTIONS", "PatchEntry", "PatchReport", "from_pretrained", "patch", "unpatch"]
