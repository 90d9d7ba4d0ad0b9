"""One optimizer step of the trainer's loop on fake tensors: the process-wide state a plan needs
(planning), the model built and wrapped as the trainer does it (build), and the step itself under
whatever observes it (one_step: the memory tracker for core, the roofline estimator for roofline),
which returns what it found out (Found) with the observer."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from unittest import mock

import torch

from fastft.config import FinetuneConfig
from fastft.planning.setup import GPU, PlanError, Setup, micro_batch, tokenizer
from fastft.planning.tracking import categories, module_name


@dataclasses.dataclass(frozen=True)
class Found:
    """What the build and the step find out (Setup holds what was decided before them); record()
    is its part of Plan.setup."""

    patched: list[str] | None  # the kinds fastft.patch replaced (None: provider "hf", not patched)
    blocks: str  # the decoder blocks' module name ("model.layers")
    fused: bool  # the optimizer's fused step (fastft.optim.build_optimizer)
    four_bit: dict | None = None  # the 4-bit layers' bytes (fastft.quantization.four_bit_bytes), QLoRA only
    paged_optimizer_states: int | None = None  # bytes of a paged optimizer's states
    workspace_unmeasured: dict[str, str] | None = None  # ops whose workspace could not be measured (core adds it)

    def record(self) -> dict:
        """Its fields as Plan.setup names them, in Plan.setup's order; those not found left out."""
        out = {} if self.patched is None else {"patched": self.patched}
        out["blocks"] = self.blocks
        if self.four_bit is not None:
            out["four_bit"] = self.four_bit
        out["fused"] = self.fused
        if self.paged_optimizer_states is not None:
            out["paged_optimizer_states"] = self.paged_optimizer_states
        if self.workspace_unmeasured:
            out["workspace_unmeasured"] = self.workspace_unmeasured
        return out


@contextlib.contextmanager
def planning(world_size: int, fsdp: bool):
    """Process-wide state a plan needs, undone after: a fake process group of W ranks (FSDP2),
    the fastft attention dispatched as on CUDA, and two places where fake tensors would change
    what is computed:
    - DTensor's sharding propagation reuses the active fake mode, so the global-shape tensors it
      makes to find output shapes would count as this rank's memory; given a fresh mode, the
      tracker skips them, as torch intends;
    - transformers reads position_ids to detect packed rows (masking_utils.
      find_packed_sequence_indices) and, unable to read fake ones, assumes packing and builds a
      [B, 1, T, T] mask; the planned rows hold one document each, for which the real call finds
      none."""
    import torch.distributed as dist
    from torch.distributed.tensor import _sharding_prop
    from transformers import masking_utils

    from fastft import attention

    started = False
    if fsdp:
        if not dist.is_initialized():
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
            started = True
        elif dist.get_backend() != "fake" or dist.get_world_size() != world_size:
            raise PlanError("fastft.plan with FSDP2 needs its own (fake) process group: run it in a process without "
                            "one (fastft.planning.plan_in_subprocess does)")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(attention.as_on_gpu())  # attention and the kernels' ops as on CUDA
            for module, name, replacement in ((_sharding_prop, "detect_fake_mode", lambda *a, **k: None),
                                              (masking_utils, "find_packed_sequence_indices", lambda position_ids: None)):
                if hasattr(module, name):  # other torch / transformers versions may not have them
                    stack.enter_context(mock.patch.object(module, name, replacement))
            yield
    finally:
        if started:
            dist.destroy_process_group()



def build(config: FinetuneConfig, provider: str, setup: Setup):
    """(the model on the meta device, wrapped as the trainer wraps it (fastft.parallelize.wrap:
    planned eager, the shards on the device); the kinds patched, None when not patched)."""
    from fastft.model import build_model
    from fastft.parallelize import wrap

    model, report = build_model(config, tokenizer(config), setup.weights, meta=True,
                                patch=provider == "fastft", quant=setup.quant)
    wrap(model, config.distributed, setup.decision, compile=False, cpu_offload=False)
    return model, (None if report is None else sorted({e.kind for e in report.patched()}))


def one_step(config, provider: str, world_size: int, sizes: dict, setup: Setup, observe: Callable):
    """Build, materialise as fake tensors and run one optimizer step of the trainer's loop under
    the context `observe(model, optimizer, batch)` returns; returns (that context, the exact
    parameter / gradient / optimizer-state bytes before zero_grad, the model, what the build and
    the step found)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from fastft import collectives
    from fastft.data import model_inputs
    from fastft.optim import build_optimizer

    model, patched = build(config, provider, setup)
    blocks = blocks_name(model)
    vocab = config.model.config.get("vocab_size") or len(tokenizer(config))
    real_batch, _ = micro_batch(config, provider, vocab)
    four_bit = paged = None
    o = config.optim
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        model.to_empty(device="cpu")
        if setup.quant is not None:  # 4-bit layers: packed weights and their quantization states at real size
            from fastft import quantization

            quantization.planned_states(model, setup.quant, setup.weights)
            four_bit = quantization.four_bit_bytes(model)
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not setup.fsdp and hasattr(hf, "tie_weights"):
            hf.tie_weights()  # to_empty makes new tensors per module: tied embeddings would come apart
        model.train()
        with unset_fake_temporarily():  # bitsandbytes' 8-bit optimizers make their quantization maps from
            # Python floats (create_dynamic_map) as they are built, which fake tensors cannot give
            params, optimizer, _, fused, _ = build_optimizer(model, config, setup.decision, GPU)
        batch = {k: fake.from_tensor(v) if torch.is_tensor(v) else v for k, v in real_batch.items()}
        targets = batch["num_target_tokens"] * sizes["accumulation"] * world_size
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if setup.autocast else contextlib.nullcontext
        loss_scale = float(world_size) if setup.fsdp else 1.0

        def micro_step(last: bool, mark=lambda name: None):
            if setup.fsdp:
                model.set_requires_gradient_sync(last)
            mark("start")
            with autocast():
                out = model(**model_inputs(batch), num_items_in_batch=targets)
            mark("forward")  # autocast's cache of cast weights is gone; what is left waits for backward
            (out.loss * loss_scale).backward()
            # fastft's loop keeps the output until the next micro-batch (unpatched, its logits
            # too); an HF Trainer's compute_loss (and benchmarks/e2e.py) keeps only the loss.
            return out if provider == "fastft" else None

        # The optimizer states, as after step 1; the gradients of earlier micro-batches.
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=sizes["accumulation"] == 1 or setup.fsdp)
        if sizes["accumulation"] > 1 and setup.fsdp:
            micro_step(last=False)
        observer = observe(model, optimizer, batch)
        mark = getattr(observer, "mark", lambda name: None)
        with observer:
            out = micro_step(last=True, mark=mark)
            mark("micro-batch")
            if o.grad_clip is not None:  # as train_step: the local squared norm, one all-reduce, the clip
                norm = collectives.all_reduce_sum(collectives.local_grad_square(params, torch.device("cpu"))).sqrt()
                torch.nn.utils.clip_grads_with_norm_(params, o.grad_clip, norm, foreach=None)
            optimizer.step()
            mark("optimizer")
            # What the tracker holds after the step, before zero_grad: the exact state totals.
            state = categories(observer.get_tracker_snapshot()) if hasattr(observer, "get_tracker_snapshot") else {}
            if getattr(optimizer, "is_paged", False):
                from fastft import quantization

                paged = quantization.paged_state_bytes(optimizer)
            optimizer.zero_grad(set_to_none=True)
            del out
    found = Found(patched=patched, blocks=blocks, fused=fused, four_bit=four_bit,
                  paged_optimizer_states=paged)
    return observer, state, model, found


# -- module names ------------------------------------------------------------------------------

def blocks_name(model) -> str:
    """The decoder blocks' module name as the plan names modules ("model.layers")."""
    from fastft import distributed

    return module_name(type(model).__name__ + "." + distributed.decoder_blocks(model)[0])


def module_group(name: str, blocks: str) -> str | None:
    """Modules summed over the decoder blocks ("model.layers.*.mlp"): a block, its direct parts,
    and the modules outside the blocks (embeddings, final norm, head); None for containers."""
    if name.startswith(blocks + "."):
        rest = name[len(blocks) + 1:].split(".")
        return ".".join([blocks, "*", *rest[1:]]) if len(rest) <= 2 else None
    if name == "(model)" or blocks.startswith(name + ".") or name == blocks:
        return None
    return name
