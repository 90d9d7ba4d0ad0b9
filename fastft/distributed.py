"""Parallelism, applied from outside the model in a fixed order (DESIGN.md; after torchtitan's
`parallelize` and `apply_fsdp`, re-written here):

    init()                          process group from torchrun's environment (none for one process)
    apply_activation_checkpointing  per decoder block: "full" (every block), "selective" (every n-th)
                                    or "offload" (every block, its saved input in host memory:
                                    fastft/offload.py)
    apply_compile                   torch.compile per decoder block (in place: parameter names kept)
    apply_fsdp                      fully_shard per decoder block, then the root; MixedPrecisionPolicy
                                    (bf16 params, fp32 reduce), reshard-after-forward, CPU offload
    load_from_rank0                 for a model built on the meta device and sharded: allocate the
                                    shards, then broadcast rank 0's full weights into them

The decoder blocks are found by structure, not by architecture: the largest nn.ModuleList of
identical module classes (Llama's `model.layers`, GPT-2's `transformer.h`, a PEFT-wrapped model's
the same list further down).

One process without torchrun needs no process group: `init()` returns world_size 1 and the
trainer skips FSDP (unless `distributed.fsdp=true`, which then starts a 1-process gloo/nccl group).

This module is told what to wrap and never asks a later layer: the collectives (all_reduce_sum,
barrier, broadcast_object, is_dtensor, local_grad_square) live in fastft/collectives.py, and
under expert parallelism the caller passes apply_fsdp the expert units
(fastft.expert_parallel.expert_units) with their mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from fastft import attention, collectives


@dataclasses.dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False  # this module started the process group (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init(backend: str | None = None, *, force: bool = False, timeout_minutes: int = 30) -> DistEnv:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

    Without those variables and without `force`, nothing is started (one process). With `force`
    and no torchrun, a 1-process group on a free local port is started (FSDP2 on one device).
    """
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    env = DistEnv(rank, world, local_rank, device)
    if dist.is_initialized():
        env.rank, env.world_size = dist.get_rank(), dist.get_world_size()
        return env
    if world == 1 and not force:
        return env
    if "MASTER_ADDR" not in os.environ:  # forced single process: a private rendezvous
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    backend = backend or ("nccl" if cuda else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=device if cuda else None)
    env.rank, env.world_size, env.initialized_here = dist.get_rank(), dist.get_world_size(), True
    return env


def shutdown(env: DistEnv) -> None:
    if env.initialized_here and dist.is_initialized():
        # Every rank reaches this point before any tears down: a rank that destroys its group
        # while gloo still runs another rank's last collective can abort at exit.
        collectives.barrier()
        dist.destroy_process_group()


# -- finding the decoder blocks ----------------------------------------------------------------

def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the repeated blocks: the longest ModuleList whose items share one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                # Prefer blocks holding parameters (not lists of activations or dropouts).
                if any(True for _ in module[0].parameters()):
                    best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no repeated decoder blocks (an nn.ModuleList of one module "
                         "class) found; FSDP2 wrapping, activation checkpointing and compile work per block")
    return best


# -- activation checkpointing ------------------------------------------------------------------

def _checkpointed_forward(block: nn.Module, original):
    from torch.utils.checkpoint import checkpoint

    from fastft.attention import in_this_forward

    def forward(*args, **kwargs):  # the recomputation runs in this forward's attention state
        return checkpoint(in_this_forward(original), *args, use_reentrant=False, **kwargs)

    return forward


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> int:
    """Recompute blocks' activations in the backward. mode "full": every block; "selective":
    every `every`-th block (torchtitan's layer-selective option: a memory/compute trade-off in
    between); "offload": every block, with the input each keeps for its recomputation in pinned
    host memory (fastft.offload.BlockOffload). The block's forward is wrapped per instance, so
    parameter names (state dicts, PEFT, save_pretrained) do not change. Returns the number of
    blocks wrapped."""
    if mode == "none":
        return 0
    _, blocks = decoder_blocks(model)
    if mode == "offload":
        from fastft.offload import BlockOffload

        offload = BlockOffload()
        for i, block in enumerate(blocks):
            block.forward = offload.wrap(i, block.forward)
        return len(blocks)
    wrapped = 0
    for i, block in enumerate(blocks):
        if mode == "full" or (mode == "selective" and i % every == 0):
            block.forward = _checkpointed_forward(block, block.forward)
            wrapped += 1
    return wrapped


# -- compile -----------------------------------------------------------------------------------

def apply_compile(model: nn.Module, backend: str | None = None) -> int:
    """torch.compile each decoder block in place (names unchanged): with fastft's attention, the
    block's own forward inside the attention's eager wrapper (attention.compile_blocks: its
    recomputation bookkeeping stays out of the graph), else the whole block (`nn.Module.compile`).
    Blocks are identical, so dynamo compiles one graph and reuses it. The fused kernels are custom ops
    (fastft/kernels): opaque nodes in the graph. backend None: inductor on a GPU, aot_eager on the
    CPU, where the ops run in Triton's interpreter (which only an eager backend calls)."""
    if backend is None:
        backend = "inductor" if any(p.is_cuda for p in model.parameters()) else "aot_eager"
    _, blocks = decoder_blocks(model)
    # with fastft's attention: the block's own forward, inside the attention's eager wrapper
    wrapped = {id(b) for b in attention.compile_blocks(
        model, lambda forward: torch.compile(forward, backend=backend, dynamic=False))}
    for block in blocks:
        if id(block) not in wrapped:
            block.compile(backend=backend, dynamic=False)
    return len(blocks)


# -- FSDP2 -------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def apply_fsdp(model: nn.Module, *, param_dtype: str = "bfloat16", reduce_dtype: str = "float32",
               reshard_after_forward: bool = True, cpu_offload: bool = False, expert_mesh=None,
               expert_units: Sequence[nn.Module] = ()) -> nn.Module:
    """fully_shard every decoder block, then the root (torchtitan's order: the root's group holds
    what is left, embeddings and head). The last block is not resharded after forward: its
    backward starts right away and would all-gather it again.

    Gradients: FSDP2's reduce-scatter averages over ranks (divides by the world size). The loop
    normalises the loss by the global token count and multiplies it by the world size before
    backward (fastft/train.py), so the average is the global per-token mean. (Setting the
    gradient divide factor to 1 instead would need ReduceOp.PREMUL_SUM, which gloo lacks.)
   
    Under expert parallelism (fastft/expert_parallel.py), pass `expert_mesh`, the 1-D mesh of the
    ranks that hold the same experts, and `expert_units`, the modules holding each layer's split
    experts with their LoRA wrappers (`fastft.expert_parallel.expert_units(model)`): each unit is
    fully_shard'ed over the mesh first, as its own unit, so that the blocks' FSDP2 groups (over all
    ranks) leave them out. Both or neither: a mesh without units would shard the split experts
    with their blocks, over ranks that hold different experts.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])
    kwargs = dict(mp_policy=mp)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())  # pinning needs a GPU
    expert_units = list(expert_units)
    if (expert_mesh is None) != (not expert_units):
        raise ValueError(f"apply_fsdp: expert_mesh {'given' if expert_mesh is not None else 'None'} with "
                         f"{len(expert_units)} expert_units; under expert parallelism pass both (the mesh of the "
                         "ranks holding the same experts and fastft.expert_parallel.expert_units(model)), else neither")
    for unit in expert_units:
        fully_shard(unit, mesh=expert_mesh, reshard_after_forward=reshard_after_forward, **kwargs)
    _, blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


def load_from_rank0(model: nn.Module, full: nn.Module | None, device: torch.device, cpu_offload: bool = False) -> None:
    """Give a meta-device model that apply_fsdp has sharded the weights of `full`, a model of the
    same structure that only rank 0 holds (None elsewhere), on its CPU: the shards are allocated
    (on the CPU under CPU offload, else on `device`) and filled by broadcasting rank 0's tensors
    (each rank keeps its slice), so no rank other than 0 ever holds the whole model. Buffers,
    persistent or not (rotary inverse frequencies), are broadcast too and live on `device`.
    After torchtitan's meta-device initialisation and torch.distributed.checkpoint's
    `broadcast_from_rank0` state-dict option."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=torch.device("cpu") if cpu_offload else device)
    state = full.state_dict() if full is not None else {}
    if state:  # only the parameters and buffers (a 4-bit layer also writes its quantization state:
        keys = set(model.state_dict())  # fastft.quantization.broadcast_states sends those)
        state = {k: v for k, v in state.items() if k in keys}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, buffer in module._buffers.items():
                if buffer is None:
                    continue
                if full is not None:
                    value = full.get_submodule(module_name)._buffers[name].to(device=device, dtype=buffer.dtype)
                else:
                    value = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
                dist.broadcast(value, src=0)
                module._buffers[name] = value


@contextlib.contextmanager
def root_unsharded(model: nn.Module):
    """Keep the FSDP2 root's own parameters (embeddings, final norm, head) gathered, and leave
    every module resharded at the end. For
    fastft.patching.verify_loaded's probe (a forward, then the head's weight read), and for
    `generate` through a wrapper (PEFT's PeftModel.generate calls the inner model's generate, so
    the root's forward hooks never run); the blocks still gather and free through their own hooks."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    # A forward of the root itself inside the block would reshard it at its end (its
    # reshard_after_forward): keep it gathered until the block ends, then restore the setting.
    state = model._get_fsdp_state()
    # The root initialises FSDP's lazy state first: a forward inside this block that starts below the
    # root (the loss probe runs a PEFT model's inner HF model) would otherwise make that module act as
    # the root, and the next real forward fails ("FSDP requires running forward through the root").
    state._lazy_init()
    group = state._fsdp_param_group
    reshard = group is not None and group.post_forward_mesh_info is not None
    model.set_reshard_after_forward(False, recurse=False)
    model.unshard()
    try:
        yield
    finally:
        model.set_reshard_after_forward(reshard, recurse=False)
        # A forward also leaves the last block gathered (apply_fsdp does not reshard it after
        # forward): reshard every module, so that only the sharded parameters are registered
        # (an optimizer built next must see those).
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def expert_mesh(world_size: int, expert_parallel: int, device_type: str):
    """The ("dp", "ep") device mesh of expert parallelism: groups of `expert_parallel` consecutive
    ranks split the experts ("ep"), the ranks holding the same experts form the "dp" dimension."""
    from torch.distributed.device_mesh import init_device_mesh

    if world_size % expert_parallel:
        raise ValueError(f"distributed.expert_parallel={expert_parallel} does not divide the {world_size} processes")
    return init_device_mesh(device_type, (world_size // expert_parallel, expert_parallel), mesh_dim_names=("dp", "ep"))


def clip_grad_norm_(parameters, max_norm: float | None, expert_params=(), expert_group=None) -> torch.Tensor:
    """The global L2 norm of the gradients (clipped to `max_norm` when given), for plain tensors
    and for FSDP2's DTensor shards alike: the norm of sharded grads is a DTensor whose
    `full_tensor()` all-reduces the partial sums (as torchtitan's clip_grad_norm_ does). Under
    expert parallelism the split experts' parameters (`expert_params`, on their own mesh) are
    normed apart and their squares summed over `expert_group`, whose ranks hold different experts."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    split = {id(p) for p in expert_params}

    def norm(group):
        value = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0, error_if_nonfinite=False,
                                              foreach=None)
        return value.full_tensor() if isinstance(value, DTensor) else value

    groups = [[p for p in params if id(p) not in split], [p for p in params if id(p) in split]]
    total = norm(groups[0])
    if split:
        experts = norm(groups[1]).to(total.device) ** 2
        dist.all_reduce(experts, group=expert_group)
        total = (total ** 2 + experts).sqrt()
    if max_norm is not None:
        for group in groups:  # one mesh per call (a foreach op cannot mix DTensor meshes)
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=None)
    return total
