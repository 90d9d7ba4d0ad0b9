"""The trainer's side of the planner: the preflight before the weights load, measured against
planned after the first steps, and the planner's own check against a real CPU step."""

from __future__ import annotations

import json
import os
import sys

import torch

from fastft.config import FinetuneConfig
from fastft.planning.core import RESERVE, GiB, PlanDoesNotFit
from fastft.planning.search import fit_message
from fastft.planning.setup import PlanError, as_config, decide, micro_batch, planned_config, tokenizer


# -- the trainer's side ------------------------------------------------------------------------

def device_capacity(device: torch.device) -> int | None:
    """Bytes of memory of a CUDA device; None elsewhere (no check)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def plan_in_subprocess(config: FinetuneConfig, *, world_size: int, capacity: int, reserve: int = RESERVE,
                       timeout: float = 1800) -> dict:
    """`python -m fastft.planning --fit` in a fresh CPU-only process (its own fake process group and
    fake tensors, nothing of it left in the trainer): {"plan": record, "alternatives": [...]}."""
    import subprocess
    import tempfile

    from fastft.config import to_yaml

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this fastft's parent
    with tempfile.TemporaryDirectory() as tmp:
        recipe = os.path.join(tmp, "recipe.yaml")
        with open(recipe, "w", encoding="utf-8") as f:
            f.write(to_yaml(config))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
        env.pop("TRITON_INTERPRET", None)
        proc = subprocess.run([sys.executable, "-m", "fastft.planning", recipe, "--world-size", str(world_size),
                               "--fit", str(capacity), "--reserve", str(reserve), "--json"],
                              capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise PlanError((proc.stderr.strip().splitlines() or ["(no output)"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def preflight(config: FinetuneConfig, env, log) -> dict | None:
    """Before the weights load, on CUDA: the planned peak per GPU, printed; PlanDoesNotFit, with
    the planned alternatives, when it exceeds the device. Rank 0 plans, every rank gets the
    verdict. A plan that cannot be made is logged, and training goes on."""
    from fastft import collectives

    capacity = device_capacity(env.device)
    if capacity is None:
        return None
    result, error = None, None
    if env.is_main:
        try:
            result = plan_in_subprocess(config, world_size=env.world_size, capacity=capacity)
        except Exception as exc:  # the plan is advice: never a reason not to train
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
    result, error = collectives.broadcast_object((result, error))
    if result is None:
        log(f"memory plan: not made ({error}); training without it")
        return None
    p = result["plan"]
    log(f"memory plan: {p['peak'] / GiB:.2f} GiB per GPU at the peak (the {p['phase']} of {p['where']}; first step "
        f"{p['first_step_peak'] / GiB:.2f} GiB) of {capacity / GiB:.1f} GiB; planned in {p['seconds']:.0f} s by fastft.plan")
    if result["alternatives"]:
        raise PlanDoesNotFit(fit_message(p, result["alternatives"], capacity, RESERVE))
    return p


def report_measured(planned: dict | None, device: torch.device, log, step: int, *, first_step: bool) -> None:
    """After a step: torch.cuda.max_memory_allocated against the plan (the first step's peak for
    the run's step 1, which has no optimizer states before its optimizer step; else the steady one,
    less the optimizer states a paged optimizer keeps outside the allocator)."""
    if planned is None or device.type != "cuda":
        return
    measured = torch.cuda.max_memory_allocated(device)
    # bitsandbytes' paged optimizer states live in CUDA unified memory, which the allocator does not count
    paged = 0 if first_step else planned.get("setup", {}).get("paged_optimizer_states", 0)
    want = (planned["first_step_peak"] if first_step else planned["peak"]) - paged
    log(f"memory after step {step}: {measured / GiB:.2f} GiB measured (max_memory_allocated) against "
        f"{want / GiB:.2f} GiB planned ({100 * (measured - want) / want:+.1f}%)"
        + (f", leaving out {paged / GiB:.2f} GiB of paged optimizer states (unified memory)" if paged else ""))


def measure_activations(config, provider: str = "fastft") -> int:
    """The planner's check: the exact activation bytes a real CPU forward of `config` (random
    weights: keep it small) leaves for the backward, to compare with Plan.activations. Counted:
    every storage saved for backward (through torch.autograd.graph.saved_tensors_hooks), the
    tensors custom autograd nodes keep on their ctx (the fused loss keeps its gradients there),
    the checkpointed blocks' keyword inputs (checkpoint holds them for the recomputation) and the
    outputs the loop holds; each storage once; parameters, buffers (4-bit layers' quantization
    states with them) and the batch excluded."""
    from fastft import distributed
    from fastft.data import model_inputs
    from fastft.model import build_model
    from fastft.parallelize import wrap

    planned, _ = planned_config(as_config(config), provider, None, None)
    setup = decide(planned, 1)
    model, _ = build_model(planned, tokenizer(planned), setup.weights, patch=provider == "fastft")
    d = planned.distributed
    # as the trainer wraps it, in one process: activation checkpointing, eager, no FSDP2
    wrap(model, d, setup.decision._replace(fsdp=False), compile=False)
    model.train()
    batch, _ = micro_batch(planned, provider, model.config.vocab_size)
    storage = lambda t: t.untyped_storage()  # noqa: E731
    from fastft import quantization

    held = [*model.parameters(), *model.buffers(), *quantization.state_tensors(model)]  # the model's, not activations
    excluded = {storage(t).data_ptr() for t in held}
    excluded |= {storage(v).data_ptr() for v in batch.values() if torch.is_tensor(v)}
    kept: dict[int, int] = {}

    def keep(t):
        if torch.is_tensor(t) and storage(t).data_ptr() not in excluded:
            kept[storage(t).data_ptr()] = storage(t).nbytes()

    def pack(t):
        keep(t)
        return t

    def keep_kwargs(module, args, kwargs):
        for value in kwargs.values():
            for t in value if isinstance(value, tuple) else (value,):
                keep(t)

    handles = []
    if d.activation_checkpointing != "none":
        handles = [b.register_forward_pre_hook(keep_kwargs, with_kwargs=True) for b in distributed.decoder_blocks(model)[1]]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = model(**model_inputs(batch), num_items_in_batch=batch["num_target_tokens"])
    for handle in handles:
        handle.remove()
    keep(out.loss)
    keep(getattr(out, "logits", None))
    seen, stack = set(), [out.loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            for t in value if isinstance(value, (tuple, list)) else (value,):
                keep(t)
        stack.extend(n for n, _ in node.next_functions)
    return sum(kept.values())
