"""A roofline model of one optimizer step's time, from the same fake run as the memory plan."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from fastft.planning.setup import PlanError, Setup, as_config, decide, planned_config, row_tokens
from fastft.planning.step import module_group, one_step, planning
from fastft.planning.tracking import kwargs_mod_tracker, module_name


# -- a roofline model of the step's time ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GPUSpec:
    """Datasheet figures: dense bf16 tensor-core FLOP/s (fastft.flops.PEAK_BF16_FLOPS), fp32 (no
    tensor cores) FLOP/s, HBM bytes/s. NVIDIA's H100 SXM, H200 SXM and B200 datasheets."""

    bf16: float
    fp32: float
    bandwidth: float


GPUS = {"H100": GPUSpec(989e12, 67e12, 3.35e12), "H200": GPUSpec(989e12, 67e12, 4.8e12),
        "B200": GPUSpec(2250e12, 80e12, 8.0e12)}
# torch's roofline assumes 75% of the peak FLOP/s is reachable (torch.utils._runtime_estimation);
# kept. (torch's own flops_to_ns also halves the FLOPs into multiply-adds before dividing by a
# FLOP/s peak, which makes every matmul twice as fast as the datasheet allows; not kept.)
COMPUTE_EFFICIENCY = 0.75


def _roofline_estimator(spec: GPUSpec):
    """torch's RuntimeEstimator (module attribution, forward/backward split) with its roofline
    cost per op, max(FLOPs / (0.75 x peak), bytes read and written / bandwidth), pinned to `spec`
    (torch's version asks a CUDA device for its figures, and there is none on a planning CPU)."""
    import io

    import torch.utils._pytree as pytree
    from torch.distributed._tools.runtime_estimator import RuntimeEstimator
    from torch.utils._runtime_estimation import _IGNORE_OPS, get_num_bytes
    from torch.utils.flop_counter import flop_registry

    _register_flop_formulas()
    aten = torch.ops.aten
    _NO_TRAFFIC = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
                   aten.alias}

    class Roofline(RuntimeEstimator):
        @classmethod
        def _roofline(cls, func, args, kwargs):
            out = func(*args, **(kwargs or {}))
            packet = func._overloadpacket
            outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            # Views and factories move no data; nor do metadata queries (prim.device, sym sizes),
            # nor an allocation (empty*): torch's list, and ops that return no tensor.
            if packet in _IGNORE_OPS or packet in _NO_TRAFFIC or not outputs:
                return out, 0.0
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)] + outputs
            transfer = sum(get_num_bytes(t) for t in tensors) / spec.bandwidth
            compute = 0.0
            if packet in flop_registry:
                dtypes = {t.dtype for t in outputs if t.is_floating_point()}
                peak = spec.fp32 if dtypes == {torch.float32} else spec.bf16
                flops = flop_registry[packet](*args, **(kwargs or {}), out_val=out)
                compute = flops / (COMPUTE_EFFICIENCY * peak)
            return out, max(transfer, compute) * 1e3  # ms

        def __call__(self, estimate_mode_type: str):
            super().__call__(estimate_mode_type)
            self._estimate = type(self)._roofline
            return self

        def __exit__(self, *args):
            with contextlib.redirect_stdout(io.StringIO()):  # torch prints its total
                super().__exit__(*args)

    return Roofline()


_FLOPS_REGISTERED = False


def _register_flop_formulas() -> None:
    """FLOP formulas the roofline needs beyond torch's: the CPU's flash SDPA (what the unpatched
    model runs on fake CPU tensors, standing for the GPU's flash SDPA: torch's formula for that)
    and fastft's fused ops (kernels/*.py), where fastft.kernels has them as custom ops."""
    global _FLOPS_REGISTERED
    if _FLOPS_REGISTERED:
        return
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten  # the same leading arguments (grad_out,) query, key, value as the CUDA ops'
    flop_registry[aten._scaled_dot_product_flash_attention_for_cpu] = flop_registry[
        aten._scaled_dot_product_flash_attention]
    flop_registry[aten._scaled_dot_product_flash_attention_for_cpu_backward] = flop_registry[
        aten._scaled_dot_product_flash_attention_backward]
    # The op files whose torch.ops.fastft.* ops KERNEL_FLOPS prices register them on import.
    import fastft.kernels.fused_linear_cross_entropy  # noqa: F401
    import fastft.kernels.lora  # noqa: F401
    import fastft.kernels.lora_mlp  # noqa: F401

    for name, formula in KERNEL_FLOPS.items():
        if hasattr(torch.ops.fastft, name):
            flop_registry[getattr(torch.ops.fastft, name)] = formula
    _FLOPS_REGISTERED = True


# FLOPs of fastft's fused ops: their matmuls (2 per multiply-add), from kernels/<op>.py's math.
# The norms have none worth counting: the roofline prices them by the bytes they move.
def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _lora_projections(params, has_bias):
    """(W [O, I], A [r, I]) per projection of a flattened (W, b?, A, B, ...) list."""
    it, out = iter(params), []
    for bias in has_bias:
        w = next(it)
        if bias:
            next(it)
        a = next(it)
        next(it)
        out.append((w, a))
    return out


def _lora_linear_flops(x, params, has_bias, *args, out_val=None, **kwargs) -> int:
    n = _rows(x)  # y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ per projection
    return sum(2 * n * w.shape[0] * w.shape[1] + 2 * n * a.shape[0] * (w.shape[0] + w.shape[1])
               for w, a in _lora_projections(params, has_bias))


def _lora_linear_bwd_flops(dys, x, params, has_bias, us, scales, dropouts, seeds, needs, *args, out_val=None,
                           **kwargs) -> int:
    n, total = _rows(x), 0  # dX = dY·W (+ dW = dYᵀ·X when the base trains); four rank-r products
    for i, (w, a) in enumerate(_lora_projections(params, has_bias)):
        total += 2 * n * w.shape[0] * w.shape[1] * (int(needs[0]) + int(needs[1 + 4 * i]))
        total += 4 * n * a.shape[0] * (w.shape[0] + w.shape[1])
    return total


def _lora_mlp_flops(x, params, has_bias, *args, out_val=None, **kwargs) -> int:
    return _lora_linear_flops(x, params, has_bias)  # gate, up and down, each a LoRA linear


def _lora_mlp_bwd_flops(dy, x, g, u, xa_g, xa_u, hd, params, has_bias, activation, dropouts, seeds, scales,
                        needs, *args, out_val=None, **kwargs) -> int:
    return _lora_linear_bwd_flops(None, x, params, has_bias, None, None, None, None, needs)


def _flce_flops(hidden, weight, *args, out_val=None, **kwargs) -> int:
    """Logits X·Wᵀ, and with them (in the forward op) dX = dA·W and dW = dAᵀ·X when asked."""
    need_dx = kwargs.get("need_dx", args[10] if len(args) > 10 else True)
    need_dw = kwargs.get("need_dw", args[11] if len(args) > 11 else True)
    return 2 * _rows(hidden) * hidden.shape[-1] * weight.shape[0] * (1 + int(need_dx) + int(need_dw))


def _flce_bwd_flops(hidden, weight, *args, out_val=None, **kwargs) -> int:
    """The recomputing backward op: the logits again, then dX and dW as asked."""
    need_dx = kwargs.get("need_dx", args[9] if len(args) > 9 else True)
    need_dw = kwargs.get("need_dw", args[10] if len(args) > 10 else True)
    return 2 * _rows(hidden) * hidden.shape[-1] * weight.shape[0] * (1 + int(need_dx) + int(need_dw))


KERNEL_FLOPS = {"lora_linear": _lora_linear_flops, "lora_linear_bwd": _lora_linear_bwd_flops,
                "lora_mlp": _lora_mlp_flops, "lora_mlp_bwd": _lora_mlp_bwd_flops,
                "fused_linear_cross_entropy": _flce_flops, "fused_linear_cross_entropy_bwd": _flce_bwd_flops}


def estimate_time(config, provider: str = "fastft", world_size: int = 1, gpu: str = "H100", *,
                  sizes: dict | None = None, setup: Setup | None = None) -> dict:
    """A roofline model of one optimizer step on `gpu` from a fake run of the same step: predicted
    step time, tokens/s per GPU and MFU (fastft.flops' convention), and the time per module.

    It is a model: each op costs max(FLOPs / (0.75 x datasheet peak), bytes in and out / datasheet
    bandwidth), ops do not overlap, kernels launch for free, collectives are not counted (torch's
    RuntimeEstimator does not model communication), and attention FLOPs are torch's formulas (the
    full T x T, causal or not, for either provider). Its value is the ratio of two plans (fastft
    against HF eager) and where the time goes, not the absolute figure.
    """
    from fastft import flops

    if gpu not in GPUS:
        raise PlanError(f"gpu={gpu!r}: the roofline knows {sorted(GPUS)}")
    if sizes is None:
        config, _ = planned_config(as_config(config), provider, None, None)
        from fastft.config import batch_plan

        sizes, setup = batch_plan(config, world_size), decide(config, world_size)
    spec = GPUS[gpu]
    marks: dict[str, float] = {}

    def observe(model, optimizer, batch):
        estimator = _roofline_estimator(spec)("operator-level-cost-model")
        estimator._mod_tracker = kwargs_mod_tracker()(model)
        estimator.mark = lambda name: marks.setdefault(name, estimator.total_runtime)
        return estimator

    with planning(world_size, setup.fsdp):
        estimator, _, model, found = one_step(config, provider, world_size, sizes, setup, observe)
        trained, frozen = flops.matmul_parameters(model)
        layers, d_attn = flops.attention_dims(flops.text_config(model))
    micro_ms, opt_ms = marks["micro-batch"], marks["optimizer"] - marks["micro-batch"]
    step_ms = sizes["accumulation"] * micro_ms + opt_ms
    rows, width = sizes["micro_batch_rows"], row_tokens(config)
    tokens = rows * width * sizes["accumulation"]  # per GPU and step
    work = flops.step_flops(trained, frozen, tokens, layers, d_attn, flops.causal_pairs([width] * rows)
                            * sizes["accumulation"])
    per_module: dict[str, float] = {}
    for fqn, times in estimator.mod_runtimes.items():
        key = module_group(module_name(fqn), found.blocks)
        if key is not None:
            per_module[key] = per_module.get(key, 0.0) + times.get("fw", 0.0) + times.get("bw", 0.0)
    return {"gpu": gpu, "step_ms": step_ms, "micro_batch_ms": micro_ms, "optimizer_ms": opt_ms,
            "tokens_per_s": tokens / (step_ms / 1e3), "mfu": work["flops"] / (step_ms / 1e3) / spec.bf16,
            "per_module_ms": dict(sorted(per_module.items(), key=lambda kv: -kv[1])[:12]),
            "note": "roofline model (torch RuntimeEstimator, datasheet peaks): not a measurement"}
