"""Training FLOPs and MFU, one convention for the trainer and the benchmarks.

Per trained token (Kaplan et al. 2020 "Scaling Laws", Appendix; PaLM, Chowdhery et al. 2022,
Appendix B, for the attention term):
    matmuls:    6 · N    N = parameters that multiply activations: every Linear (the LM head
                         included, tied or not), experts counted at top_k / num_experts; the input
                         embedding is a lookup and is not counted
    attention:  12 · L · d_attn per (query, key) pair that causal attention computes: a document
                         of n tokens has n(n+1)/2 pairs; 4 FLOPs per pair and head dim forward
                         (2 in QKᵀ, 2 in PV), 3x for forward + backward (the backward does twice
                         the forward's work). So 6 · L · d_attn · Σ n(n+1) per step.
LoRA (frozen base): the base still runs forward (2·N) and backward to the activations (2·N) but
computes no weight gradient, so the matmul term is 4·N_base + 6·N_lora ("LoRA convention").
The "6N convention" (what most papers and NeMo-style tables use) counts 6·N_base + 6·N_lora
whatever is frozen; both are reported for LoRA runs.

MFU = achieved FLOPs per second / the device's peak dense bf16 rate (table below; None where
unknown, e.g. the CPU).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' datasheets.
PEAK_BF16_FLOPS = {
    "H100": 989e12,   # SXM; the PCIe card is 756e12
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "B200": 2250e12,
}


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    if "H100" in device_name and "PCIe" in device_name:
        return 756e12
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def matmul_parameters(model: nn.Module) -> tuple[float, float]:
    """(N_base, N_lora): parameters that multiply activations, experts at their active share."""
    config = _config(model)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    active = (top_k / experts) if experts and top_k else 1.0
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = lora = 0.0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.dim() < 2 or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embeddings and (head is None or p is not getattr(head, "weight", None)):
            continue
        n = p.numel() * (active if p.dim() == 3 and experts else 1.0)
        if "lora_" in name:
            lora += n
        else:
            base += n
    return base, lora  # a tied head's matrix was counted once, as the head (its one matmul)


def attention_flops(model: nn.Module, document_lengths: Iterable[int]) -> float:
    """12 · L · d_attn · Σ_docs n(n+1)/2: causal attention, fwd + bwd, for these documents."""
    config = _config(model)
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 0)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    pairs = sum(n * (n + 1) / 2 for n in document_lengths)
    return 12.0 * layers * heads * head_dim * pairs


def training_flops(model: nn.Module, document_lengths: list[int], lora: bool | None = None) -> dict[str, float]:
    """FLOPs of one training step over these documents: {"flops": ..., "flops_6n": ...}."""
    base, lora_params = matmul_parameters(model)
    if lora is None:
        lora = lora_params > 0
    tokens = sum(document_lengths)
    attention = attention_flops(model, document_lengths)
    six_n = 6.0 * (base + lora_params) * tokens + attention
    if not lora:
        return {"flops": six_n, "flops_6n": six_n}
    return {"flops": (4.0 * base + 6.0 * lora_params) * tokens + attention, "flops_6n": six_n}


def mfu(flops: float, seconds: float, device: torch.device | str | None = None) -> float | None:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = peak_flops(torch.cuda.get_device_name(device))
    return None if peak is None or seconds <= 0 else flops / seconds / peak
