"""The collectives and DTensor checks every layer may use: torch only, a leaf (DESIGN.md, "The
house"). Each collective is a no-op in one process (no process group, or a group of one), so the
same code runs with and without torchrun.

    all_reduce_sum      sum a tensor over the ranks, in place
    barrier             wait for every rank
    broadcast_object    a picklable object from rank `src` to every rank
    is_dtensor          whether a tensor is a DTensor (FSDP2's shards)
    local_grad_square   Σ g² over this rank's gradient entries (FSDP2 shards: the rank's own slice)

These lived in fastft/distributed.py (the collectives), fastft/train.py (`_local_grad_square`),
fastft/patching/lora.py and fastft/quantization.py (`_is_dtensor`); they are here so that
quantization and patching need not import distributed.py, which imports them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]
    return obj


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(t, DTensor)


def local_grad_square(params: list, device: torch.device) -> torch.Tensor:
    """Σ g² over this rank's gradient entries, float64 on `device` (FSDP2's DTensor shards are
    disjoint, so the ranks' sums add up to the global squared norm: all_reduce_sum it)."""
    grads = [p.grad.to_local() if is_dtensor(p.grad) else p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False, foreach=None)
    return norm.to(device=device, dtype=torch.float64) ** 2
