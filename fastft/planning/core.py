"""One plan: the recipe's model built, wrapped and run for one optimizer step on fake tensors
under torch's memory tracker (fastft/planning/__init__.py explains the plan)."""

from __future__ import annotations

import dataclasses
import time

import torch

from fastft.config import ConfigError, FinetuneConfig
from fastft.planning import workspace
from fastft.planning.roofline import estimate_time
from fastft.planning.setup import Setup, as_config, decide, planned_config, row_tokens
from fastft.planning.step import one_step, planning
from fastft.planning.tracking import categories, fsdp_ref, module_activations, trackers

PLAN_VERSION = 3  # bump when what a plan counts changes; recorded with every table (2: op workspaces, 4-bit; 3: gradient sums in place)

GiB = 2**30
# Device memory (bytes torch.cuda reports as total_memory) of the GPUs the goals name, and what a
# plan leaves free of it: the CUDA context and cuBLAS workspace (about 0.5 GiB) and the caching
# allocator's fragmentation, which the tracker cannot see.
GPU_MEMORY = {"H100": 85_029_158_912, "H200": 150_754_820_096, "B200": 191_476_334_592}
RESERVE = 2 * GiB


class PlanDoesNotFit(ConfigError):
    """The plan's peak exceeds the device's memory; the message lists what would fit."""


# -- one plan ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """What one optimizer step needs on each GPU (bytes)."""

    model: str
    provider: str  # "fastft" or "hf"
    world_size: int
    rows: int  # micro-batch rows
    tokens: int  # tokens per row
    peak: int  # the step's peak, per GPU (steady state: optimizer states exist)
    where: str  # the innermost module running at the peak
    phase: str  # "forward", "backward" or "optimizer"
    at_peak: dict[str, int]  # by category at the peak
    phase_peaks: dict[str, int]
    first_step_peak: int  # step 1: its forward and backward run before the optimizer states exist
    state: dict[str, int]  # by category after the optimizer step, before zero_grad (parameters, gradients, states)
    activations: int  # activation bytes the forward leaves for the backward (after autocast's cache is freed)
    module_activations: dict[str, int]  # per module: activation bytes its forward leaves behind
    setup: dict  # what was planned: precision, checkpointing, FSDP, patching (setup.Setup's record, step.Found's)
    seconds: float = 0.0  # how long planning took
    roofline: dict | None = None  # fastft.planning.estimate_time's figures (a model: see there)

    def fits(self, capacity: int, reserve: int = RESERVE) -> bool:
        return self.peak + reserve <= capacity

    @classmethod
    def from_record(cls, record: dict) -> "Plan":
        """A plan back from its JSON line (without the per-module activations, which it omits)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"module_activations": {}, **{k: v for k, v in record.items() if k in names}})

    def record(self) -> dict:
        """The JSON line."""
        out = {"plan_version": PLAN_VERSION, **dataclasses.asdict(self)}
        out.pop("module_activations")
        out["peak_gib"] = round(self.peak / GiB, 3)
        return out

    def lines(self) -> list[str]:
        setup = self.setup
        head = (f"fastft plan: {self.model}, provider {self.provider}, {self.world_size} GPU(s), micro-batch "
                f"{self.rows} x {self.tokens} tokens, {setup['training']}, {setup['precision']}, activation "
                f"checkpointing {setup['activation_checkpointing']}" + (", FSDP2" if setup["fsdp"] else "")
                + (f", tiled MLP {setup['tiled_mlp']}" if setup.get("tiled_mlp", "off") != "off" else ""))
        out = [head, f"  peak per GPU: {size(self.peak)} in the {self.phase} of {self.where} "
                     f"(first step: {size(self.first_step_peak)})"]
        out.append("  at the peak: " + ", ".join(f"{k} {size(v)}" for k, v in
                                                 sorted(self.at_peak.items(), key=lambda kv: -kv[1]) if v))
        out.append(f"  kept for the backward: {size(self.activations)}; phase peaks: "
                   + ", ".join(f"{k} {size(v)}" for k, v in self.phase_peaks.items()))
        if "four_bit" in setup:
            q = setup["four_bit"]
            out.append(f"  4-bit base: {q['layers']} layers, {size(q['packed'])} packed (in parameters) and "
                       f"{size(q['states'])} of quantization states (in buffers); each GEMM's dequantized weight, "
                       "freed after it, is in the op workspace")
        if setup.get("optimizer", "adamw") != "adamw":
            paged = setup.get("paged_optimizer_states")
            out.append(f"  optimizer {setup['optimizer']}: bitsandbytes' 8-bit moments with fp32 scales per 256 (fp32 "
                       "moments below 4096 elements)" + ("" if paged is None else
                       f"; {size(paged)} of them paged (CUDA unified memory, evicted to the host under pressure; "
                       "counted here as on the device, outside torch.cuda.max_memory_allocated)"))
        if setup.get("workspace_unmeasured"):
            out.append("  op workspaces not measured (counted as none): "
                       + "; ".join(f"{k} ({v})" for k, v in setup["workspace_unmeasured"].items()))
        if self.roofline:
            r = self.roofline
            out.append(f"  roofline model on {r['gpu']} (a model, not a measurement): step {r['step_ms']:.1f} ms, "
                       f"{r['tokens_per_s']:,.0f} tokens/s per GPU, MFU {100 * r['mfu']:.1f}%")
        out.append(f"  planned in {self.seconds:.1f} s on this CPU ({setup['source']})")
        return out


def size(nbytes: float) -> str:
    """Bytes as GiB (or MiB below one GiB) for the printed plans."""
    return f"{nbytes / GiB:.2f} GiB" if abs(nbytes) >= GiB else f"{nbytes / 2**20:.1f} MiB"


def plan(config, *, world_size: int = 1, provider: str = "fastft", rows: int | None = None,
         tokens: int | None = None, gpu: str | None = None) -> Plan:
    """Plan one optimizer step of `config` (a FinetuneConfig, dict or YAML path) per GPU.

    world_size: GPUs (FSDP2 over a fake process group when > 1 or distributed.fsdp is set);
    provider "hf": the same recipe unpatched (HF eager: SDPA, materialised logits); rows, tokens:
    override data.batch_size and data.max_seq_len; gpu ("H100", "H200", "B200"): add a roofline
    estimate of the step's time (estimate_time).
    """
    start = time.perf_counter()
    config, source = planned_config(as_config(config), provider, rows, tokens)
    from fastft.config import batch_plan

    sizes = batch_plan(config, world_size)
    setup = decide(config, world_size, source)
    with planning(world_size, setup.fsdp):
        result = _run(config, provider, world_size, sizes, setup, gpu)
    result.seconds = time.perf_counter() - start
    return result


def _run(config: FinetuneConfig, provider: str, world_size: int, sizes: dict, setup: Setup, gpu: str | None) -> Plan:
    Tracker, FSDPTracker = trackers()
    d = config.distributed

    def observe(model, optimizer, batch):
        inputs = [v for v in batch.values() if torch.is_tensor(v)]
        if setup.fsdp:
            host = ("Sharded Param", "Sharded Grad", "OptState") if d.cpu_offload else ()
            tracker = FSDPTracker(model, optimizer, host=[fsdp_ref(h) for h in host])
            tracker.track_inputs(tuple(inputs))
        else:
            tracker = Tracker(model)
            tracker.track_external(model, optimizer, *inputs)
        from fastft import quantization

        tracker.track_buffers(quantization.state_tensors(model))  # the 4-bit layers' states
        return tracker

    tracker, state, _, found = one_step(config, provider, world_size, sizes, setup, observe)
    if tracker.unmeasured:
        found = dataclasses.replace(found, workspace_unmeasured={name: workspace.UNMEASURED[name]
                                                                 for name in sorted(tracker.unmeasured)})
    at_peak = categories(tracker.get_tracker_snapshot("peak"))
    states = state.get("optimizer states", 0) if not d.cpu_offload else 0
    fwd_bwd = max(tracker.phase_peaks.get("forward", 0), tracker.phase_peaks.get("backward", 0))
    result = Plan(
        model=_model_name(config, setup.source), provider=provider, world_size=world_size, rows=sizes["micro_batch_rows"],
        tokens=row_tokens(config), peak=tracker.device_peak, where=tracker.where[0], phase=tracker.where[1],
        at_peak=at_peak, phase_peaks=dict(tracker.phase_peaks),
        first_step_peak=max(fwd_bwd - states, tracker.phase_peaks.get("optimizer", 0)),
        state=state, module_activations=module_activations(tracker),
        activations=(categories(tracker.marks["forward"]).get("activations", 0)
                     - categories(tracker.marks["start"]).get("activations", 0)),
        setup=setup.record() | found.record() | {"weights": str(setup.weights)})
    if gpu is not None:
        result.roofline = estimate_time(config, provider, world_size, gpu, sizes=sizes, setup=setup)
    return result


def _model_name(config: FinetuneConfig, source: str) -> str:
    return source.split(" (")[0] if source != "model.config" else f"{config.model.config.get('model_type')} (model.config)"
