"""Expert parallelism: the experts of every MoE layer split over the ranks of an expert-parallel
group, tokens sent to the rank that holds their expert and back with torch.distributed's all-to-all
(GShard, Lepikhin et al. 2020; torchtitan and NeMo AutoModel do the same on top of FSDP).

With an expert-parallel group of N ranks, rank i keeps experts [i·E/N, (i+1)·E/N) of each layer (its
slices of the stacked gate-up / down weights and of their LoRA factors become the parameters; the
names stay the same). In a layer's forward each rank, for its own tokens:
    1. sorts its (token, k) slots by the rank that owns their expert (a stable sort on the device);
    2. dispatch: sends those rows of its hidden states (and the local expert id) there
       (all_to_all_single; one all-to-all of the per-rank counts first);
    3. runs the received rows through its local experts with the grouped kernel (top-1, weight 1);
    4. combine: sends the outputs back (all_to_all_single), and sums Σ_k w_(n,k)·y_(n,k) locally, so
       the routing weights and their gradients never leave the rank.
Backward runs the same exchanges in reverse (the autograd of an all-to-all is the all-to-all with
the split sizes swapped). Slots whose expert id is E (padding) are sent nowhere.

Host syncs: one per layer per direction. all_to_all_single takes the split sizes as Python ints,
so the per-rank counts are read on the host after their all-to-all. DeepEP's kernels (GPU-initiated,
with the counts kept on the device) remove that sync and overlap the exchange with the GEMMs; it is
not installable here. Swapping it in means replacing `dispatch` (one function: it sends the rows
and returns them with a `combine` closure that brings the outputs back).

Gradients: an expert's weight gradient on its rank sums the contributions of every token that was
routed to it from all N ranks. The dense parameters' gradients are each rank's own; reducing them
(FSDP2's reduce-scatter, or an all-reduce) is the caller's. `weight_grad_scale` multiplies the expert
weights' gradients inside the kernel, for the trainer's convention (fastft/train.py: the loss is
multiplied by the world size W and FSDP2 averages over its mesh; the experts, sharded by FSDP2 over
the D = W/N ranks that hold the same experts, would be N times too large, so the scale is 1/N).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from fastft.kernels.moe import moe_experts
from fastft.patching import moe as moe_patch
from fastft.patching.probe import is_param_wrapper


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; backward: the same with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all_dispatch(rows: torch.Tensor, local_idx: torch.Tensor, send_counts: torch.Tensor,
                        group) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Send rows [S, H] (sorted by destination rank, send_counts[r] of them to rank r) and their
    local expert ids [S]; returns (received rows [R, H], their local expert ids [R], combine), where
    combine(y [R, H]) returns the outputs of the sent rows [S, H], in the order they were sent."""
    size = dist.get_world_size(group)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()  # the host sync (module docstring)
    x = _AllToAll.apply(rows, recv, send, group)
    idx = torch.empty(sum(recv), dtype=local_idx.dtype, device=local_idx.device)
    dist.all_to_all_single(idx, local_idx.contiguous(), recv, send, group=group)
    assert len(send) == size

    def combine(y: torch.Tensor) -> torch.Tensor:
        return _AllToAll.apply(y, send, recv, group)

    return x, idx, combine


# The one function to swap (DeepEP on GPUs): same signature as all_to_all_dispatch.
dispatch = all_to_all_dispatch


class ExpertParallel:
    """Per experts module: which experts are local, and the layer's expert-parallel forward."""

    def __init__(self, group, num_experts: int, weight_grad_scale: float = 1.0):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_experts = num_experts
        self.n_local = num_experts // self.size
        self.first = self.rank * self.n_local
        self.weight_grad_scale = weight_grad_scale

    def forward(self, rows, idx, w, gate_up, down, spec, gate_up_lora, down_lora) -> torch.Tensor:
        n_tokens, top_k = idx.shape
        flat = idx.reshape(-1)
        owner = torch.div(flat, self.n_local, rounding_mode="floor")   # == size for padding (id E)
        order = torch.sort(owner, stable=True).indices
        counts = torch.zeros(self.size + 1, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, owner, torch.ones_like(owner))
        send_counts = counts[: self.size]
        n_send = int(counts[: self.size].sum())
        sent = order[:n_send]                                          # slots that have an expert
        x_recv, idx_recv, combine = dispatch(rows[sent // top_k], flat[sent] - owner[sent] * self.n_local,
                                             send_counts, self.group)
        y = moe_experts(x_recv, idx_recv[:, None], torch.ones(x_recv.shape[0], 1, dtype=torch.float32,
                                                              device=x_recv.device),
                        gate_up, down, spec.activation, gate_up_lora=gate_up_lora, down_lora=down_lora,
                        layout=spec.layout, transposed=spec.transposed, weight_grad_scale=self.weight_grad_scale)
        y_back = combine(y)                                             # [n_send, H]
        slots = y_back.new_zeros(flat.shape[0], y_back.shape[1]).index_copy(0, sent, y_back)
        out = (slots.view(n_tokens, top_k, -1).float() * w.float()[..., None]).sum(1)
        return out.to(rows.dtype)


def _slice_lora(wrapper: nn.Module, first: int, n_local: int, n_experts: int) -> None:
    """Keep the local experts' rows of A [r·E, in] (expert-major) and columns of B [out, r·E]
    (rank-major: column j·E + e) in every adapter of a PEFT ParamWrapper."""
    for name in wrapper.lora_A.keys():
        a, b = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
        rank = a.shape[0] // n_experts
        with torch.no_grad():
            a_local = a.view(n_experts, rank, -1)[first:first + n_local].reshape(n_local * rank, -1).clone()
            b_local = b.view(b.shape[0], rank, n_experts)[:, :, first:first + n_local].reshape(b.shape[0], -1).clone()
        wrapper.lora_A[name].weight = nn.Parameter(a_local, requires_grad=a.requires_grad)
        wrapper.lora_B[name].weight = nn.Parameter(b_local, requires_grad=b.requires_grad)
    wrapper.num_experts = n_local


def apply_expert_parallel(model: nn.Module, group=None, weight_grad_scale: float = 1.0) -> int:
    """Split the experts of every fastft-patched MoE layer of `model` over `group` (default: the
    world). Call after fastft.patch (on the full model every rank holds) and before FSDP2. Returns
    the number of experts modules split."""
    group = group if group is not None else dist.group.WORLD
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    parents = {id(c): p for p in model.modules() for c in p.children()}
    split = 0
    for name, module in model.named_modules():
        entry = module.__dict__.get(moe_patch.FORWARD_ATTR)
        if entry is None or not isinstance(entry[0], moe_patch.ExpertsSpec) or entry[1] is None:
            continue  # (LoRA wrappers carry the experts' spec with no signature: handled below)
        spec = entry[0]
        n_experts = getattr(module, spec.gate_up).shape[0]
        if n_experts % size:
            raise ValueError(f"expert parallelism over {size} ranks: {name} has {n_experts} experts, not a multiple "
                             f"of {size}; choose distributed.expert_parallel dividing {n_experts}")
        ep = ExpertParallel(group, n_experts, weight_grad_scale)
        for stack in (spec.gate_up, spec.down):
            p = getattr(module, stack)
            local = p.detach()[ep.first:ep.first + ep.n_local].clone()
            setattr(module, stack, nn.Parameter(local, requires_grad=p.requires_grad))
        if hasattr(module, "num_experts"):
            module.num_experts = ep.n_local
        wrapper = parents.get(id(module))
        while wrapper is not None and is_param_wrapper(wrapper):
            _slice_lora(wrapper, ep.first, ep.n_local, n_experts)
            wrapper = parents.get(id(wrapper))
        module.__dict__[moe_patch.EXPERT_PARALLEL_ATTR] = ep
        split += 1
    if not split:
        raise ValueError("expert parallelism: no fastft-patched MoE experts in this model (patch it first, with "
                         "moe=True); for a dense model set distributed.expert_parallel=1")
    return split


def expert_units(model: nn.Module) -> list[nn.Module]:
    """The modules holding each split layer's experts: the outermost PEFT ParamWrapper around the
    experts when they carry LoRA (their factors were split too), else the experts module."""
    parents = {id(c): p for p in model.modules() for c in p.children()}
    units = []
    for module in model.modules():
        if moe_patch.EXPERT_PARALLEL_ATTR not in module.__dict__:
            continue
        unit = module
        while is_param_wrapper(parents.get(id(unit))):
            unit = parents[id(unit)]
        units.append(unit)
    return units


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters expert parallelism split (each rank holds different values under one name)."""
    return [p for unit in expert_units(model) for p in unit.parameters()]
