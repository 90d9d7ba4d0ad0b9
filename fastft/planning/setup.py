"""The recipe as planned and the trainer's decisions for it, made before any model is built: the
model's configuration resolved without the hub, the provider's patching and the row shape applied
(planned_config), the precision, QLoRA and optimizer decisions as the trainer makes them on CUDA
(Setup), and the collator's micro-batch (micro_batch). The lowest of the modules that plan a step
(fastft/planning/__init__.py names their order)."""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import TYPE_CHECKING

import torch

from fastft.config import FinetuneConfig, load_config, validate

if TYPE_CHECKING:
    from fastft.model import Precision
    from fastft.quantization import Settings

GPU = torch.device("cuda")  # what the trainer's decisions are made for (no CUDA is touched)

# Shape fields of published config.json files (what sets the memory: widths, depths, heads,
# vocabularies, tying), for building the recipes' models where the hub cannot be reached.
_LLAMA3 = dict(model_type="llama", vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
               rms_norm_eps=1e-5, num_key_value_heads=8)
PUBLISHED = {
    "meta-llama/Llama-3.2-1B": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, head_dim=64, tie_word_embeddings=True),
    "meta-llama/Llama-3.1-8B": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, head_dim=128, tie_word_embeddings=False),
    "Qwen/Qwen3-0.6B": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                            num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                            tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=40960),
    "Qwen/Qwen3-8B": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                          num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=40960),
    "Qwen/Qwen3-30B-A3B": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                               moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                               num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                               tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=40960),
    "mistralai/Mistral-7B-v0.3": dict(model_type="mistral", vocab_size=32768, hidden_size=4096,
                                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=8, head_dim=128, sliding_window=None,
                                      max_position_embeddings=32768, rope_theta=1000000.0),
    "google/gemma-3-1b-pt": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152,
                                 intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                                 num_key_value_heads=1, head_dim=256, sliding_window=512,
                                 query_pre_attn_scalar=256, max_position_embeddings=32768,
                                 tie_word_embeddings=True),
}



class PlanError(ValueError):
    """A recipe that cannot be planned: the message says why and what to do."""


# -- the model's configuration, without the hub ---------------------------------------------------

def resolve_model(config: FinetuneConfig) -> tuple[dict, str]:
    """(the transformers config as a dict with model_type, where it came from) for the recipe's
    model: model.config, a local folder, the hub cache, PUBLISHED, or the hub, in that order."""
    m = config.model
    if m.name is None:
        return dict(m.config), "model.config"
    from transformers import AutoConfig

    local = os.path.isdir(os.path.expanduser(m.name))
    errors = []
    for source, kwargs in (("local files", {"local_files_only": True}), ("the hub", {})):
        if source == "the hub" and (local or m.name in PUBLISHED):
            break  # a folder has no hub copy; a known name needs no network round trip
        try:
            hf = AutoConfig.from_pretrained(os.path.expanduser(m.name), trust_remote_code=m.trust_remote_code, **kwargs)
        except (OSError, ValueError) as exc:
            errors.append(f"{source}: {str(exc).splitlines()[0][:120]}")
            continue
        fields = hf.to_dict()
        for key in ("architectures", "transformers_version", "_name_or_path", "auto_map", "dtype", "torch_dtype"):
            fields.pop(key, None)
        return fields, f"{m.name} ({source})"
    if m.name in PUBLISHED:
        return dict(PUBLISHED[m.name]), f"{m.name} (fastft.planning.PUBLISHED: the published config's shape fields)"
    raise PlanError(f"model.name={m.name!r}: no config.json found ({'; '.join(errors)}). Give a local folder, "
                    "fill the hub cache (HF_HUB_OFFLINE=1 then uses it), give the shape as model.config, or use "
                    f"one of {sorted(PUBLISHED)}")


class VocabOnly:
    """What build_model reads from a tokenizer when the model's config names its vocabulary."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


# -- the recipe as planned ----------------------------------------------------------------------

def as_config(config) -> FinetuneConfig:
    """A validated copy of a FinetuneConfig, or one loaded from a dict or YAML path."""
    if isinstance(config, FinetuneConfig):
        return validate(copy.deepcopy(config))
    return load_config(config)


def planned_config(config: FinetuneConfig, provider: str, rows: int | None, tokens: int | None):
    """The recipe as planned: its model's config resolved, the provider's patching, the rows."""
    if provider not in ("fastft", "hf"):
        raise PlanError(f"provider={provider!r}: use 'fastft' (the recipe as fastft trains it) or 'hf' (the same "
                        "recipe unpatched: Hugging Face eager with SDPA, materialised logits)")
    config = copy.deepcopy(config)
    fields, source = resolve_model(config)
    config.model.name, config.model.config = None, fields
    if provider == "hf":
        config.model.patch, config.model.tiled_mlp, config.model.attn_implementation = False, "off", "sdpa"
    data = config.data
    if tokens is not None:
        if data.batching == "flat":
            data.token_budget = tokens
        else:
            data.max_seq_len = tokens
    if rows is not None:
        data.batch_size = rows
    return config, source


def tokenizer(config: FinetuneConfig):
    """What build_model needs of a tokenizer: the vocabulary size when the model's config names it."""
    vocab = config.model.config.get("vocab_size")
    if vocab is not None:
        return VocabOnly(vocab)
    from fastft.model import load_tokenizer

    return load_tokenizer(config)  # the built-in tokenizers need no download


def micro_batch(config: FinetuneConfig, provider: str, vocab: int) -> tuple[dict, int]:
    """(the collator's micro-batch, one document per row, as real CPU tensors; tokens per row)."""
    from fastft.data import collate_packed

    data = config.data
    rows, width = (1, data.token_budget) if data.batching == "flat" else (data.batch_size, data.max_seq_len)
    doc = {"input_ids": [3 % vocab] * width, "labels": [3 % vocab] * width}
    batch = collate_packed([[doc]] * rows, pad_id=0, row_len=width)
    if provider == "hf" or data.batching == "padded":
        # Full rows of one document: no padding, so no attention mask (transformers skips an
        # all-ones mask too) and no varlen keys (the unpatched model runs SDPA).
        for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            batch.pop(key)
    return batch, width


def row_tokens(config: FinetuneConfig) -> int:
    """Tokens per micro-batch row."""
    return config.data.token_budget if config.data.batching == "flat" else config.data.max_seq_len



# -- the trainer's decisions, before the step ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setup:
    """What is decided before the step: the trainer's own precision decision
    (fastft.model.decide_precision) as it falls on CUDA, QLoRA's 4-bit settings as the trainer
    takes them (fastft.model.quantization_settings), and the recipe's choices the plan reports.
    record() is its part of Plan.setup (fastft.planning.step.Found adds what the step finds)."""

    decision: Precision
    quant: Settings | None  # None: no 4-bit base
    training: str  # "LoRA r=16", "QLoRA r=16 (nf4, ...)", "full fine-tuning"
    optimizer: str
    activation_checkpointing: str
    tiled_mlp: str
    source: str | None = None  # where the model's config came from (resolve_model)

    @property
    def fsdp(self) -> bool:
        return self.decision.fsdp

    @property
    def weights(self) -> torch.dtype:
        return self.decision.weights

    @property
    def autocast(self) -> bool:
        return self.decision.autocast_on

    @property
    def precision(self) -> str:
        p = self.decision
        return (f"weights {str(p.weights).removeprefix('torch.')}"
                + (f", FSDP2 params {p.param_dtype}" if p.fsdp else ", bf16 autocast" if p.autocast_on else ""))

    def record(self) -> dict:
        """Its fields as Plan.setup names them, in Plan.setup's order (the weights' dtype, which
        Plan.setup puts last, apart)."""
        out = {"fsdp": self.fsdp, "param_dtype": self.decision.param_dtype, "autocast": self.autocast,
               "precision": self.precision, "training": self.training, "optimizer": self.optimizer,
               "activation_checkpointing": self.activation_checkpointing, "tiled_mlp": self.tiled_mlp}
        return out if self.source is None else out | {"source": self.source}


def decide(config: FinetuneConfig, world_size: int, source: str | None = None) -> Setup:
    """The trainer's decisions for `config` (as planned_config returns it) on `world_size` GPUs."""
    from fastft.distributed import DistEnv
    from fastft.model import decide_precision, quantization_settings

    p = decide_precision(config, DistEnv(world_size=world_size, device=GPU))
    quant = quantization_settings(config, p)
    return Setup(decision=p, quant=quant,
                 training=(("QLoRA" if quant else "LoRA") + f" r={config.lora.r}" if config.lora.enabled
                           else "full fine-tuning") + (f" ({quant.describe()})" if quant else ""),
                 optimizer=config.optim.name, activation_checkpointing=config.distributed.activation_checkpointing,
                 tiled_mlp=config.model.tiled_mlp, source=source)
