"""The optimizer and its learning-rate schedule, as the trainer and the memory planner build them."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastft import quantization
from fastft.config import ConfigError, FinetuneConfig
from fastft.model import Precision


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of optim.lr after `step` optimizer steps: linear warm-up, then decay to min_ratio."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Optimization(NamedTuple):
    params: list  # the trained parameters, in the model's order
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    fused: bool  # torch's fused AdamW
    warmup: int  # warm-up steps


def build_optimizer(model, config: FinetuneConfig, precision: Precision, device: torch.device) -> Optimization:
    """AdamW (or an 8-bit AdamW) over the trained parameters, no weight decay on norms and biases,
    and its schedule."""
    o, t = config.optim, config.train
    params = [p for p in model.parameters() if p.requires_grad]
    fused = o.fused if o.fused is not None else (device.type == "cuda" or not precision.fsdp)
    optimizer = make_optimizer(o, [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], fused)
    warmup = o.warmup_steps if o.warmup_steps is not None else round(0.05 * t.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, warmup=warmup, total=t.max_steps, schedule=o.schedule, min_ratio=o.min_lr_ratio))
    return Optimization(params, optimizer, scheduler, fused, warmup)


def make_optimizer(o, groups: list[dict], fused: bool) -> torch.optim.Optimizer:
    """optim.name: "adamw" is torch's AdamW (fused where torch supports it); "adamw_8bit" and
    "paged_adamw_8bit" are bitsandbytes' AdamW with blockwise 8-bit moments (Dettmers et al. 2022,
    "8-bit Optimizers via Block-wise Quantization": 2 bytes a parameter instead of 8; paged: the
    states in CUDA unified memory, evicted to the host under memory pressure). Their states are
    tensors in the optimizer's state dict, so checkpoints save and resume them as AdamW's. Under
    FSDP2 they are refused: bitsandbytes' update ops take plain tensors, not DTensor shards."""
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for group in groups for p in group["params"]):
        raise ConfigError(f"optim.name={o.name}: bitsandbytes' 8-bit optimizers update plain tensors, not FSDP2's "
                          "DTensor shards; under FSDP2 (several processes, or distributed.fsdp=true) use optim.name=adamw")
    bnb = quantization.require_bitsandbytes(f"optim.name={o.name}")
    cls = bnb.optim.PagedAdamW8bit if o.name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, **kwargs)
