"""Training FLOPs and MFU: one convention, used by the trainer (fastft/train.py) and the
benchmarks (benchmarks/e2e.py).

Model FLOPs, not hardware FLOPs: activation-checkpointing recompute is not counted, and neither
are the padding slots of a batch (only real tokens of real documents).

Per optimizer step, over all ranks, for T real tokens:

    FLOPs = 6 · N_trained · T  +  4 · N_frozen · T  +  12 · n_layers · d_attn · P

- N_trained / N_frozen: parameters that multiply activations (every Linear, the LM head included,
  tied or not, counted once; experts at their active share top_k / num_experts; embedding
  lookups, norm weights and biases are not matmuls), split by requires_grad. Each costs 2 FLOPs
  per token forward, 2 for the input gradient and 2 for the weight gradient: 6 for a trained
  weight (the 6N of Kaplan et al. 2020, "Scaling Laws", Appendix), 4 for a frozen one (no weight
  gradient). Full fine-tuning is the usual 6N; LoRA counts 4 per frozen base weight plus 6 per
  adapter weight ("LoRA convention"), the work actually needed.
- P: the (query, key) pairs that causal attention computes, n(n+1)/2 for a document of n tokens,
  summed over documents (packed documents do not attend to each other). Per pair and layer,
  2 · d_attn FLOPs in QKᵀ and 2 · d_attn in PV forward, 3x for forward + backward (PaLM,
  Chowdhery et al. 2022, Appendix B, counts the same 12 · n_layers · d_attn without the
  causal halving). d_attn = query heads · head dim.

The "6N convention" (what most papers and NeMo-style tables use) counts 6 · (N_trained + N_frozen)
whatever is frozen; LoRA runs report both (`flops` and `flops_6n`).

MFU = FLOPs / step seconds / (peak dense bf16 FLOP/s of one device · devices), the peak from
PEAK_BF16_FLOPS by device name; None on a CPU or an unknown device (printed "n/a").
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets. Most specific first.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a device (default: the current CUDA device); None on a CPU."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_FLOPS if key in name), None)


def text_config(model: nn.Module):
    """The transformers config of the language model (inside a PEFT wrapper, or a multimodal config's text part)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def matmul_parameters(model: nn.Module) -> tuple[float, float]:
    """(N_trained, N_frozen): parameters that multiply activations, experts at their active
    share, 4-bit weights at their unpacked size. Under FSDP2 a parameter is a DTensor shard: its
    full size is counted."""
    config = text_config(model)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    active = (top_k / experts) if experts and top_k else 1.0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} - {id(head_weight)}
    from fastft.quantization import is_4bit

    # A 4-bit weight is stored packed, two values a byte: count the values it multiplies by.
    four_bit = {id(m.weight): m.in_features * m.out_features for m in model.modules() if is_4bit(m)}
    trained = frozen = 0.0
    seen: set[int] = set()
    for p in model.parameters():
        if p.dim() < 2 or id(p) in seen or id(p) in lookups:
            continue
        seen.add(id(p))
        n = four_bit.get(id(p)) or p.shape.numel() * (active if p.dim() == 3 and experts else 1.0)  # a DTensor's full shape
        if p.requires_grad:
            trained += n
        else:
            frozen += n
    return trained, frozen


def attention_dims(config) -> tuple[int, int]:
    """(n_layers, d_attn = query heads · head dim) from a transformers config."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    return layers, heads * head_dim


def causal_pairs(document_lengths: Iterable[int] | torch.Tensor) -> float:
    """Σ n(n+1)/2 over documents: the (query, key) pairs causal attention computes."""
    if torch.is_tensor(document_lengths):
        n = document_lengths.to(torch.float64)
        return float((n * (n + 1) / 2).sum())
    return float(sum(n * (n + 1) / 2 for n in document_lengths))


def step_flops(trained: float, frozen: float, tokens: float, layers: int, d_attn: int,
               pairs: float) -> dict[str, float]:
    """{"flops": this module's convention, "flops_6n": 6 · all matmul parameters}; they differ
    only when some matmul parameters are frozen (LoRA)."""
    attention = 12.0 * layers * d_attn * pairs
    return {"flops": (6.0 * trained + 4.0 * frozen) * tokens + attention,
            "flops_6n": 6.0 * (trained + frozen) * tokens + attention}


def training_flops(model: nn.Module, document_lengths: list[int]) -> dict[str, float]:
    """FLOPs of one training step of `model` over these documents (see step_flops)."""
    trained, frozen = matmul_parameters(model)
    layers, d_attn = attention_dims(text_config(model))
    return step_flops(trained, frozen, sum(document_lengths), layers, d_attn, causal_pairs(document_lengths))


def mfu(flops: float, seconds: float, device: torch.device | str | None = None, devices: int = 1) -> float | None:
    peak = peak_flops(device)
    return None if peak is None or seconds <= 0 else flops / seconds / (peak * devices)
