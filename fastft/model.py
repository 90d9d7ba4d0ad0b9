"""The model as a run trains it, and the decisions made before it is built: the precision (which
dtype the weights, FSDP2's compute copy and autocast take), the tokenizer, QLoRA's 4-bit settings,
the model itself (pretrained or random, quantized, LoRA applied, fastft-patched, MLPs tiled; on
the meta device for the FSDP2 rank-0 load) and whether its batches may be packed.

The trainer (fastft/train.py), the memory planner (fastft/planning/) and the tests build through
these same functions, so that what is planned and tested is what is trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple

import torch

from fastft import distributed, hub, patching, quantization
from fastft.config import ConfigError, FinetuneConfig
from fastft.patching import packed_probe, tiled_mlp


# -- precision ---------------------------------------------------------------------------------------

class Precision(NamedTuple):
    fsdp: bool  # FSDP2 wraps the model
    weights: torch.dtype  # as loaded / built
    param_dtype: str  # FSDP2's compute copy of the parameters
    autocast_on: bool  # bf16 autocast around forward (one process: FSDP2 casts instead)

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.autocast_on else contextlib.nullcontext()


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def decide_precision(config: FinetuneConfig, env: distributed.DistEnv) -> Precision:
    """bf16 on CUDA (or when asked), fp32 on a CPU; fp32 master weights for everything trained,
    frozen LoRA bases in bf16 on one GPU (no FSDP)."""
    d, t = config.distributed, config.train
    fsdp = bool(d.fsdp) or (d.fsdp is None and env.world_size > 1)
    if not fsdp and (d.cpu_offload or not d.reshard_after_forward):
        raise ConfigError("distributed.cpu_offload / reshard_after_forward need FSDP2: run several processes "
                          "under torchrun, or set distributed.fsdp=true")
    bf16 = t.precision == "bf16" or (t.precision == "auto" and env.device.type == "cuda")
    param_dtype = d.param_dtype if d.param_dtype != "auto" else ("bfloat16" if bf16 else "float32")
    if config.model.dtype != "auto":
        weights = _DTYPES[config.model.dtype]
    else:
        weights = torch.bfloat16 if (config.lora.enabled and bf16 and not fsdp) else torch.float32
    return Precision(fsdp, weights, param_dtype, autocast_on=bf16 and not fsdp)


# -- tokenizer and model ---------------------------------------------------------------------------

def load_tokenizer(config: FinetuneConfig):
    """model.tokenizer: "words", "byte", or a hub name / folder (None: the model's own; for the
    built-in data without a model, the built-in word-level tokenizer)."""
    from fastft.data import byte_level_tokenizer, word_level_tokenizer

    m = config.model
    source = m.tokenizer or (m.name if m.name is not None else "words" if config.data.source == "builtin" else "byte")
    if source == "words":
        return word_level_tokenizer()
    if source == "byte":
        return byte_level_tokenizer()
    from transformers import AutoTokenizer

    field = "model.tokenizer" if m.tokenizer else "model.name"
    tokenizer = hub.load(AutoTokenizer.from_pretrained, source, field, "tokenizer", trust_remote_code=m.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_settings(config: FinetuneConfig, precision: Precision):
    """QLoRA's 4-bit settings (fastft/quantization.py), or None. compute_dtype "auto": bf16 when
    training in bf16 (the activations' dtype under autocast or FSDP2's param_dtype), else the
    weights' dtype."""
    m = config.model
    if m.quantization == "none":
        return None
    bf16 = precision.autocast_on or (precision.fsdp and precision.param_dtype == "bfloat16")
    return quantization.settings(m.quantization, m.double_quant, m.compute_dtype,
                                 torch.bfloat16 if bf16 else precision.weights)


def eager_experts(model) -> None:
    """transformers' per-expert loop in place of its grouped_mm experts, which have no float64
    kernel: for float64 reference runs (and tests/numerics.py's float64 twins)."""
    if getattr(model, "get_experts_implementation", lambda: None)() not in (None, "eager"):
        model.set_experts_implementation("eager")


def build_model(config: FinetuneConfig, tokenizer, dtype: torch.dtype, *, meta: bool = False, patch: bool = True,
                quant=None):
    """The transformers model (pretrained or random), quantized (QLoRA: `quant`, from
    quantization_settings), LoRA applied, fastft-patched. meta=True builds the same structure on
    the meta device (no weights: the FSDP2 rank-0 load). A float64 reference run of a 4-bit recipe
    holds the 4-bit values dense in float64 (bitsandbytes has no float64 kernels)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = config.model
    if quant is None and m.quantization != "none":
        quant = quantization.settings(m.quantization, m.double_quant, m.compute_dtype, dtype)
    reference = quant is not None and dtype == torch.float64  # quantized from float32, then held dense
    kwargs = {"dtype": torch.float32 if reference else dtype, "trust_remote_code": m.trust_remote_code}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.name is not None and not meta:
        load = {"quantization_config": quant.bitsandbytes_config()} if quant is not None else {}
        # Hub kernels (transformers' default since 5.25) come later, if asked: enable_hub_kernels.
        model = hub.load(AutoModelForCausalLM.from_pretrained, m.name, "model.name", "model", **kwargs, **load,
                         use_kernels=False)
    else:
        if m.name is not None:
            hf_config = hub.load(AutoConfig.from_pretrained, m.name, "model.name", "model config",
                                 trust_remote_code=m.trust_remote_code)
        else:
            fields = dict(m.config)
            model_type = fields.pop("model_type")
            fields.setdefault("vocab_size", len(tokenizer))
            if fields["vocab_size"] < len(tokenizer):
                raise ConfigError(f"model.config.vocab_size={fields['vocab_size']} is smaller than the tokenizer "
                                  f"({len(tokenizer)} tokens); leave it out to use the tokenizer's size")
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                fields.setdefault(name, getattr(tokenizer, name))
            try:
                hf_config = AutoConfig.for_model(model_type, **fields)
            except ValueError as exc:
                raise ConfigError(f"model.config: {str(exc).splitlines()[0]}") from None
        with torch.device("meta") if meta else contextlib.nullcontext():
            # A float64 reference run starts from the same random weights as a float32 one.
            init = {**kwargs, "dtype": torch.float32} if dtype == torch.float64 else kwargs
            model = AutoModelForCausalLM.from_config(hf_config, **init).to(kwargs["dtype"])
        if m.name is not None:  # what from_pretrained would also read: eos ids etc. for generation and export
            from transformers import GenerationConfig

            with contextlib.suppress(OSError):
                model.generation_config = GenerationConfig.from_pretrained(m.name)
        if quant is not None:
            quantization.quantize_model(model, quant)
    if reference:
        quantization.dequantize_model(model, torch.float64)
        model.to(torch.float64)
    if dtype == torch.float64:
        eager_experts(model)
    if config.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lc = config.lora
        model = get_peft_model(model, LoraConfig(
            r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
            modules_to_save=lc.modules_to_save, target_parameters=lc.target_parameters, task_type="CAUSAL_LM"))
    report = None
    if m.patch and patch:
        report = patching.patch(model, **m.patch_options)
    if m.tiled_mlp != "off":  # after patch: each chunk runs the (fused) MLP forward
        tiled_mlp.apply(model, m.tiled_mlp, report)
    return model, report


def rank0_load(config: FinetuneConfig, precision: Precision, env: distributed.DistEnv) -> bool:
    return precision.fsdp and env.world_size > 1 and config.distributed.load == "rank0"


def build_models(config: FinetuneConfig, tokenizer, precision: Precision, env: distributed.DistEnv):
    """(model, patch report, full model or None). Under the FSDP2 rank-0 load, the full weights
    live on rank 0's CPU only (`full`) and every rank builds and patches the model on meta."""
    quant = quantization_settings(config, precision)
    if not rank0_load(config, precision, env):
        return (*build_model(config, tokenizer, precision.weights, quant=quant), None)
    full = build_model(config, tokenizer, precision.weights, patch=False, quant=quant)[0] if env.is_main else None
    try:
        model, report = build_model(config, tokenizer, precision.weights, meta=True, quant=quant)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"distributed.load=rank0: this model cannot be built on the meta device "
                          f"({type(exc).__name__}: {str(exc)[:200]}); use --distributed.load=every_rank "
                          "(each rank then loads the whole model before sharding)") from exc
    return model, report, full


# -- batching: packed only where the model is safe to pack ----------------------------------------

def batching_for(data, model, patch_report) -> tuple[object, list[str]]:
    """The data section to use: packed batches only for a model the packed probe found safe to
    pack (fastft/patching/packed_probe.py; run here when the model is not patched); otherwise
    padded batches with a start-up line saying why, or a ConfigError for data.batching='flat'
    (padding-free rows cannot be padded instead). Returns (data config, start-up lines)."""
    if data.batching == "padded":
        return data, []
    if patch_report is not None:
        safe, verdict = patch_report.packing_safe, patch_report.packing
    else:
        result = packed_probe.run(model, patching.hf_model(model))
        safe, verdict = result.verdict == "safe", f"{result.verdict}: {result.why}"
    if safe:
        return data, []
    if data.batching == "flat":
        raise ConfigError(f"data.batching='flat' packs documents into shared rows, but this model is not safe to "
                          f"pack ({verdict}); use --data.batching=padded")
    return dataclasses.replace(data, batching="padded"), [
        f"data: packing off, padded batches instead: this model is not safe to pack ({verdict})"]
