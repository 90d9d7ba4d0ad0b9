"""Memory you can predict before you rent a GPU: `fastft.plan(config)` and `fastft plan RECIPE`.

A plan is one optimizer step of the recipe run on fake tensors, on a CPU, in a few seconds to a
minute, measured by torch's own memory tracker:

  1. the model is built as the trainer builds it (fastft.model.build_model) on the meta device,
     without weights: quantized (QLoRA), LoRA applied, fastft.patch'ed, MLPs tiled. A hub name
     whose config.json is neither a local folder nor in the hub cache is built from PUBLISHED
     (the shape fields of the published config.json of the models fastft's recipes name);
  2. wrapped as the trainer wraps it (fastft.parallelize.wrap): activation checkpointing (offload
     included), then FSDP2 over a fake process group of W ranks (torch's "fake" backend:
     collectives do nothing);
  3. materialised as fake tensors (FakeTensorMode: shapes, dtypes, storage sizes, no data; a
     4-bit layer's packed uint8 weight and bitsandbytes' quantization state at their real size,
     fastft.quantization.planned_states) and
     run for one step on a micro-batch shaped like the collator's (every row one document of
     data.max_seq_len tokens, the longest the recipe allows): forward, backward, gradient
     clipping, the fused AdamW step with its states, zero_grad, as the trainer's loop does. The
     optimizer states exist before the step (the steady state from step 2 on; the first step's
     peak, without them during its backward, is derived and reported too); with gradient
     accumulation the gradients exist too (FSDP2: the unsharded accumulation of an earlier
     micro-batch, which is run first);
  4. tracked by torch.distributed._tools.mem_tracker.MemTracker (FSDPMemTracker under FSDP2):
     every storage is attributed to parameters, buffers, gradients, activations (made in the
     forward or a recomputation), temporaries (made in the backward) or optimizer states, per
     module, forward and backward. Added to torch's trackers here (tracking.py): the place of the
     peak (the innermost module running, and the phase); per-module peak updates in O(depth)
     instead of O(modules) per op, which makes an 8B model plannable in a minute; gradient hooks
     on trainable parameters only (torch's raise on a frozen LoRA base); module tracking that
     sees keyword inputs (transformers calls its layers with keywords only); the 4-bit layers'
     quantization states, counted as buffers (whole on every rank, never trained); and each op's
     workspace (workspace.py): what a fused op allocates and frees before it returns (the fused
     loss's logits chunk, the LoRA MLP's [tokens, intermediate] temporaries, a 4-bit weight
     dequantized around its GEMM), measured from the op's own host code on meta tensors and
     counted, category "op workspace", while the op runs; and the autograd engine's in-place
     gradient sums (a tied embedding's two gradients, a residual join): under any dispatch mode
     the engine sums out of place, holding one gradient more than the GPU's run for that instant
     (for a tied embedding, a [vocab, hidden] fp32 buffer), so such a sum's peak is dropped when
     the engine would have summed in place (tracking._Located._is_accumulation: the first
     operand dense, not a view, and dead after the sum).

Provider "fastft" is the recipe as fastft trains it; "hf" the same recipe unpatched (Hugging
Face eager: SDPA attention, materialised logits, rows without padding), in an HF-Trainer-style
loop that keeps only the loss (fastft's loop keeps the model's output, logits included, until
the next micro-batch).

Modules (files), each importing only those before it (function-local imports included; the
acyclic_siblings contract in pyproject.toml checks it): workspace (what an op holds inside) ->
tracking (torch's trackers, extended) -> setup (the recipe as planned, `resolve_model`, and the
trainer's decisions before the step: the frozen `Setup`) -> step (the build and the one fake
step, returning what it found: the frozen `Found`) -> roofline (`estimate_time`: a time model) ->
core (one plan: `Plan`, `plan`) -> search (`max_context`, `scaling`, what would fit) -> trainer
(`preflight`, `report_measured`, `measure_activations`: the exact count the plan is checked
against) -> __main__ (`fastft plan`). What one module takes from another has a public name.

What is planned is the GPU's run: bf16 (train.precision auto on CUDA), the fastft attention's
varlen path (through torch's varlen op, whose fake implementation exists), the fused kernels'
custom ops (their fake implementations allocate what the kernels allocate). The fake tensors live
on the CPU device (FakeTensorMode on a CPU-only build cannot run a CUDA backward), so autocast is
the CPU's bf16 autocast: its op lists are not CUDA's, but the models' memory-relevant casts (norms,
softmax, the loss's upcast) are explicit in their code, and linear layers run in bf16 under both.

QLoRA (model.quantization nf4 / fp4): the base's linear layers are bitsandbytes 4-bit layers,
planned at their packed size (parameters) with their quantization states (buffers: absmax, and
with double quantization its 8-bit indices, scales, table and offset; bitsandbytes' layout,
tests/test_plan.py checks it byte for byte against a quantized CPU model). The fused 4-bit LoRA
ops dequantize one weight at a time into the compute dtype around its GEMM (forward, and again
in the backward for dX): that transient W [O, K] and its fp32 block scales are in the op's
workspace, as are those of bitsandbytes' own 4-bit GEMM for provider "hf" (HF + PEFT +
bitsandbytes). optim.name adamw_8bit / paged_adamw_8bit run bitsandbytes' own optimizers on the
fake tensors: uint8 moments and one fp32 scale per 256 elements each for parameters of 4096
elements or more, fp32 moments below; paged states are counted as on the device (they are,
during the optimizer step) and reported apart, being outside torch.cuda.max_memory_allocated.

Planned as eager: distributed.compile (torch.compile's fusions save less). Not seen by the
tracker (so not in the plan): memory inside an op that is not one of its outputs, for torch's
own ops (cuBLAS and FlashAttention workspaces: a few MiB) and for an op whose host code cannot
run on meta tensors (none of fastft's today: the MoE experts op routes on the device, so its
sorted-row temporaries are counted too; the plan would name such an op in
Plan.setup["workspace_unmeasured"]), the CUDA context (outside
torch.cuda.max_memory_allocated, but on the device: RESERVE below keeps room for it) and the
caching allocator's fragmentation (reserved minus allocated). gpu.sh records planned against
torch.cuda.max_memory_allocated for every end-to-end row when a GPU is lent.

The trainer uses it (`preflight`, `report_measured`): on CUDA, before loading the weights, it
prints the planned peak, and stops when the plan does not fit, listing what would fit with the
planned peak of each; after step 1 it prints measured against planned.
"""

from __future__ import annotations

from fastft.planning.core import GPU_MEMORY, PLAN_VERSION, RESERVE, Plan, PlanDoesNotFit, plan, size
from fastft.planning.roofline import GPUS, estimate_time
from fastft.planning.search import ContextSearch, alternatives, fit_report, max_context, scaling
from fastft.planning.setup import PUBLISHED, PlanError, resolve_model
from fastft.planning.trainer import (device_capacity, measure_activations, plan_in_subprocess, preflight,
                                     report_measured)

__all__ = ["GPUS", "GPU_MEMORY", "PLAN_VERSION", "PUBLISHED", "RESERVE", "ContextSearch", "Plan", "PlanDoesNotFit",
           "PlanError", "alternatives", "device_capacity", "estimate_time", "fit_report",
           "max_context", "measure_activations", "plan", "plan_in_subprocess", "preflight", "report_measured",
           "resolve_model", "scaling", "size"]
