"""Parallelism, applied from outside the model in one order: the model to its device, the MoE
experts split over ranks (expert parallelism, fastft/expert_parallel.py), activation
checkpointing, torch.compile per block, FSDP2 per block then the root (fastft/distributed.py has
each piece); for the FSDP2 rank-0 load, the weights broadcast into the shards. The trainer calls
`parallelize`; the memory planner wraps through `wrap`, the same order.
"""

from __future__ import annotations

from typing import NamedTuple

from fastft import distributed, expert_parallel, patching, quantization
from fastft.config import DistributedConfig, FinetuneConfig
from fastft.model import Precision, rank0_load


class Parallelized(NamedTuple):
    checkpointed: int  # blocks under activation checkpointing
    expert_mesh: object  # the ("dp", "ep") device mesh of expert parallelism, or None
    clip_groups: list  # the trained parameters by device mesh (split experts apart): `clip_groups`


def parallelize(model, full, config: FinetuneConfig, precision: Precision, env: distributed.DistEnv, patch_report,
                log) -> Parallelized:
    """The trainer's wrapping, from outside the model: to the device -> experts split -> `wrap`
    (activation checkpointing -> compile -> FSDP2); then, for the rank-0 load, the weights
    broadcast into the shards; hub kernels when asked; training mode."""
    d, from_rank0 = config.distributed, rank0_load(config, precision, env)
    if not (precision.fsdp and d.cpu_offload) and not from_rank0:
        model.to(env.device)
    ep_mesh = _apply_expert_parallel(model, d.expert_parallel, env, log)
    n_ac = wrap(model, d, precision, expert_mesh=ep_mesh["dp"] if ep_mesh is not None else None)
    if from_rank0:
        distributed.load_from_rank0(model, full, env.device, cpu_offload=d.cpu_offload)
        quantization.broadcast_states(model, full, env.device)  # 4-bit layers: rank 0's quantization state
        if patch_report is not None:  # what only a forward with weights can check (the loss's logit map)
            with distributed.root_unsharded(model):
                verified = patching.verify_loaded(model)
            if verified:
                log(f"patch, with the weights loaded: {verified}")
    if config.model.hub_kernels:
        enable_hub_kernels(model, d.compile, log)
    model.train()
    return Parallelized(n_ac, ep_mesh, clip_groups(model, ep_mesh is not None))


def clip_groups(model, experts_split: bool) -> list[list]:
    """The trained parameters (FSDP2's, once wrapped) in groups of one device mesh each, the
    experts split over ranks in a group of their own: clip_grads_with_norm_'s foreach op takes one
    mesh at a time. In the model's order, as the optimizer takes them."""
    split = {id(p) for p in expert_parallel.expert_parameters(model)} if experts_split else set()
    trained = [p for p in model.parameters() if p.requires_grad]
    return [g for g in ([p for p in trained if id(p) not in split], [p for p in trained if id(p) in split]) if g]


def wrap(model, d: DistributedConfig, precision: Precision, *, compile: bool | None = None,
         cpu_offload: bool | None = None, expert_mesh=None) -> int:
    """Activation checkpointing -> torch.compile per block -> FSDP2 per block then the root, in
    this order (each wraps what the one before made). The memory planner wraps through here too,
    planning eager blocks with their shards on the device (compile=False, cpu_offload=False).
    Under expert parallelism, `expert_mesh` is the "dp" mesh the split experts are sharded over
    (their units found after checkpointing and compile, just before FSDP2). Returns the number of
    checkpointed blocks."""
    n_ac = distributed.apply_activation_checkpointing(model, d.activation_checkpointing, d.checkpoint_every)
    if d.compile if compile is None else compile:
        distributed.apply_compile(model)
    if precision.fsdp:
        distributed.apply_fsdp(model, param_dtype=precision.param_dtype, reduce_dtype=d.reduce_dtype,
                               reshard_after_forward=d.reshard_after_forward,
                               cpu_offload=d.cpu_offload if cpu_offload is None else cpu_offload,
                               expert_mesh=expert_mesh,
                               expert_units=expert_parallel.expert_units(model) if expert_mesh is not None else ())
    return n_ac


def enable_hub_kernels(model, compiled: bool, log) -> None:
    """model.hub_kernels: transformers' hub kernels for the layers fastft left alone, in training
    mode, once the model is on its device (fastft/patching/hub_kernels.py)."""
    log(f"transformers hub kernels: {patching.enable_hub_kernels(model, True, compiled)}")


def _apply_expert_parallel(model, degree: int, env, log):
    """Split the MoE experts over groups of `degree` ranks (fastft/expert_parallel.py): returns the
    ("dp", "ep") mesh, or None when degree is 1."""
    if degree == 1:
        return None
    mesh = distributed.expert_mesh(env.world_size, degree, env.device.type)
    # FSDP2 averages the experts over the D = W / degree ranks holding them, the loss is scaled by
    # W: 1/degree on their gradients gives the global mean (fastft/expert_parallel.py).
    layers = expert_parallel.apply_expert_parallel(model, mesh["ep"].get_group(), weight_grad_scale=1.0 / degree)
    log(f"expert parallel: {layers} MoE layers' experts split over groups of {degree} ranks "
        f"({env.world_size // degree} replica(s)), all-to-all dispatch")
    return mesh
