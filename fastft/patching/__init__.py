"""Load-time patching: `patch(model)`, `unpatch(model)`, `from_pretrained(name)`.

One generic mechanism (DESIGN.md): modules are found by structure and by what they compute,
replaced per instance (never a class attribute or a process-global function), recorded, and
reversible. Architecture differences are data (a NormSpec, a HeadSpec), found by probing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastft import attention, quantization
from fastft.patching import hub_kernels
from fastft.patching import lora as lora_patch
from fastft.patching import packed_probe, recurrent
from fastft.patching import loss as loss_patch
from fastft.patching import moe as moe_patch
from fastft.patching import norms
from fastft.patching.report import PatchEntry, PatchReport

OPTIONS = ("rms_norm", "layer_norm", "cross_entropy", "attention", "lora", "moe")
STATE = "_fastft_patch_state"


def hf_model(model: nn.Module) -> nn.Module:
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
    hf = hf_model(model)
    report = PatchReport(type(hf).__name__)
    # transformers' hub kernels off while fastft probes and patches the layers' own forwards, then
    # back on for the layers fastft left alone (fastft/patching/hub_kernels.py).
    hub_mode = hub_kernels.suspend(hf)
    state = {"norms": [], "attention": None, "recurrent": [], "loss": False, "moe": [], "lora": []}
    object.__setattr__(model, STATE, state)
    quantization.keep_layout(model)  # before any probe runs a bitsandbytes forward (fastft/quantization.py)
    try:
        _patch(model, hf, enabled, report, state)
    except BaseException:
        unpatch(model)
        raise
    if not report.patched():
        unpatch(model)
        raise ValueError(f"fastft.patch: found nothing to patch in {type(hf).__name__}.\n{report}\n"
                         "If this model has RMSNorm/LayerNorm modules or an LM head fastft should handle, "
                         "the report above says why each was left alone.")
    hub_kernels.claim_patched(hf)
    report_hub_kernels(hf, report, hub_kernels.resume(hf, hub_mode))
    report.reset_counts()  # the probes' forwards are not training calls
    model.fastft_report = report
    return report


def enable_hub_kernels(model: nn.Module, training: bool | None = None, compiled: bool = False) -> str:
    """transformers' hub kernels for the layers a patched model's fastft patches left alone (opt-in:
    `from_pretrained(use_kernels=True)`, the trainer's model.hub_kernels), once the model is on the
    device it trains on; the patch report says what runs. Returns the report's hub-kernel line."""
    hf = hf_model(model)
    report = getattr(model, "fastft_report", None) or PatchReport(type(hf).__name__)
    report_hub_kernels(hf, report, hub_kernels.enable(hf, training, compiled))
    return report.hub_kernels


def report_hub_kernels(hf: nn.Module, report: PatchReport, failed: str = "") -> None:
    """The report's hub-kernel rows and line: what transformers' kernelize runs now, per tagged layer."""
    if hub_kernels.uses_kernels(hf):
        mode = str(hf.kernels_mode).removeprefix("Mode.").lower()
        report.hub_kernels = (f"on (mode {mode}; model.train()/eval() kernelizes again, fastft's layers are "
                              "skipped)")
        report.hub_entries = hub_kernels.entries(hf)
    else:
        report.hub_kernels = f"off: {failed}" if failed else "off"
        report.hub_entries = [e for e in hub_kernels.entries(hf) if e.replacement == "fastft's forward"]


def _patch(model: nn.Module, hf: nn.Module, enabled: dict[str, bool], report: PatchReport, state: dict) -> None:
    # Attention (the registered "fastft" implementation) and recurrent mixers get the per-forward
    # document state; then the packed probe says which layers call fastft's attention and whether
    # packing is safe. It runs before the per-token kernels below are swapped in: norms, the loss
    # and LoRA act on each token alone (and have probes of their own), so they cannot carry
    # anything from one document to the next, and the probe stays cheap under the interpreter.
    if enabled["attention"]:
        state["attention"], state["recurrent"] = _install_attention(hf, getattr(hf, "config", None), report)
    _verify_attention_and_packing(model, hf, report, state)

    # The loss: fused linear cross-entropy on the LM head (probed before the norms are swapped in,
    # so that its probe forward runs the model's own norms: cheaper under the interpreter).
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
            loss_patch.install(hf, head, spec, report.loss_calls)
            state["loss"] = True
            report.add("cross_entropy", "lm_head", type(head).__name__, "fused_linear_cross_entropy",
                       spec.describe())

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

    # MoE: experts modules through the grouped-GEMM kernel (with their PEFT LoRA ParamWrappers).
    if enabled["moe"]:
        state["moe"] = moe_patch.install(model, hf, report)

    # LoRA: PEFT LoRA layers through the fused kernels (the LM head's adapter belongs to the loss).
    if enabled["lora"]:
        state["lora"] = lora_patch.install(model, report, skip={id(head)} if head is not None else set())


def _install_attention(hf: nn.Module, config, report: PatchReport) -> tuple[str | None, list[str]]:
    """Select "fastft" attention, give the model its per-forward document state (and the
    decoder blocks their recompute-safe wrapper) and the recurrent mixers their document resets.
    Returns (the previous attention implementation or None, the patched mixers)."""
    from fastft import distributed

    previous = None
    if config is None or not hasattr(hf, "set_attn_implementation"):
        report.add("attention", "", type(hf).__name__,
                   reason="kept: not a transformers PreTrainedModel (no set_attn_implementation)")
    else:
        attention.register()
        previous = getattr(config, "_attn_implementation", None) or "eager"
        try:  # where transformers refuses a dynamic change it only warns: the packed probe finds out
            hf.set_attn_implementation(attention.NAME)
        except (ValueError, ImportError) as exc:
            report.add("attention", "", previous, reason=f"kept {previous}: {exc}"[:200])
            previous = None
    mixers = recurrent.install(hf, report)
    if previous is not None or mixers:
        try:
            blocks = list(distributed.decoder_blocks(hf)[1])
        except ValueError:
            blocks = []
        installed = attention.install(hf, blocks, config if previous is not None else None)
        installed.counts = report.attention_calls
    return previous, mixers


def _verify_attention_and_packing(model: nn.Module, hf: nn.Module, report: PatchReport, state: dict) -> None:
    """The packed probe: the attention entries say which layers call fastft's function, and
    `report.packing` whether packed batches are safe (fastft/patching/packed_probe.py)."""
    result = packed_probe.run(model, hf)
    where = f" (probed on {result.where})" if result.where else ""
    previous = state["attention"]
    if previous is not None:
        config = hf.config
        called, missing = result.fastft_layers, result.missing
        if result.verdict == "unverified" and not result.calls:
            report.add("attention", "", previous, f"fastft ({attention.describe(config, *_device_dtype(hf))})",
                       f"not verified: {result.why}")
        elif not called:
            warned = "" if config._attn_implementation == attention.NAME else (
                "; transformers refused to change it dynamically")
            report.add("attention", "", previous, reason=f"kept {previous}: no attention layer called the fastft "
                       f"function in a packed probe (the model's code does not read attn_implementation{warned})")
            if config._attn_implementation == attention.NAME:
                hf.set_attn_implementation(previous)
            state["attention"] = None
            if not state["recurrent"]:
                attention.uninstall(hf)
        else:
            modules = dict(hf.named_modules())
            what = f"fastft ({attention.describe(config, *_device_dtype(hf))})"
            for layer in sorted(called, key=_natural):
                report.add("attention", layer, type(modules[layer]).__name__ if layer in modules else layer, what,
                           f"called in the packed probe{where}")
            for layer in missing:
                report.add("attention", layer, type(modules[layer]).__name__, reason=f"kept {previous}: this layer "
                           "did not call the fastft function in the packed probe")
    report.packing = result.verdict if result.verdict == "safe" else f"{result.verdict}: {result.why}"
    if result.verdict == "safe":
        report.packing += where + (f"; {result.why.split('; ', 1)[1]}" if "; only with" in result.why else "")


def _device_dtype(hf: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(hf.parameters(), None)
    return (p.device, p.dtype) if p is not None and not p.is_meta else (torch.device("cpu"), torch.float32)


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def verify_loaded(model: nn.Module) -> str | None:
    """Finish patching a model that was patched on the meta device and has its weights now (the
    FSDP2 rank-0 load in fastft/train.py): the LM head's logit map, which only a forward with
    weights can check, is probed and the fused loss re-installed with it, or removed (the model's
    own loss then runs) if the probe refuses it. Under FSDP2 every rank must call this (the probe
    is a forward) with the root's parameters gathered (fastft.distributed.root_unsharded).
    Returns what it concluded, or None when there was nothing to check."""
    state = getattr(model, STATE, None)
    hf = hf_model(model)
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
    loss_patch.install(hf, head, spec, model.fastft_report.loss_calls)
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
    hf = hf_model(model)
    hub_mode = hf.kernels_mode if hub_kernels.uses_kernels(hf) else None
    hub_kernels.release(hf)
    recurrent.uninstall(hf, state.get("recurrent", []))
    attention.uninstall(hf)
    if state["attention"] is not None:
        hf.set_attn_implementation(state["attention"])
    for name in state["norms"]:
        model.set_submodule(name, norms.restore(model.get_submodule(name)))
    if state["loss"]:
        loss_patch.uninstall(hf)
    object.__delattr__(model, STATE)
    model.__dict__.pop("fastft_report", None)
    hub_kernels.resume(hf, hub_mode)  # the restored layers get the hub kernels the others have
    return model


def from_pretrained(name_or_path: str, *model_args, **kwargs) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(...)`, then `patch`; fastft options go to `patch`.

    `lora` is either a patch option (True/False: route LoRA layers through the fused kernels) or a
    PEFT config (e.g. `peft.LoraConfig(r=16, target_modules="all-linear")`): the adapter is added
    with `peft.get_peft_model` (the result is a PeftModel, with only the adapter trainable) and its
    layers are then patched onto the fused LoRA path.

    transformers' hub kernels (its `use_kernels`, on by default since 5.25) are off unless
    `use_kernels=True`: then they run on the layers fastft leaves alone (rotary, activations, ...),
    applied after patching, and the report names each; one that cannot load is reported, not raised.

    QLoRA: `quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...)` (transformers' own
    argument; needs `pip install "fastft[qlora]"`) loads the linear layers in 4 bits, and with
    `lora=LoraConfig(...)` their LoRA layers run fused over the 4-bit weights. The model is made
    ready for training as fastft/quantization.py's `prepare` says; `model.fastft_quantization`
    holds what it did, in words.
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
    if quantization.wants_bitsandbytes(kwargs.get("quantization_config")):
        quantization.require_bitsandbytes("fastft.from_pretrained(quantization_config=BitsAndBytesConfig(...))")
    # Hub kernels only when asked, and after fastft's patches (fastft/patching/hub_kernels.py):
    # loading never fetches kernel code, and a kernel that cannot load is a report line, not a raise.
    use_kernels = kwargs.pop("use_kernels", None) is True
    model = AutoModelForCausalLM.from_pretrained(name_or_path, *model_args, use_kernels=False, **kwargs)
    if adapter is not None:
        from peft import get_peft_model

        model = get_peft_model(model, adapter)
    notes = quantization.prepare(model)  # 4-bit bases: what training needs (fastft/quantization.py)
    patch(model, **options)
    if use_kernels:
        enable_hub_kernels(model)
    if notes:
        model.fastft_quantization = notes
    return model


__all__ = ["OPTIONS", "PatchEntry", "PatchReport", "enable_hub_kernels", "from_pretrained", "patch", "unpatch"]
