"""The longest row that fits, how memory grows with the row, and what would make a plan fit."""

from __future__ import annotations

import copy
import dataclasses
import math

from fastft.config import ConfigError, FinetuneConfig, load_config
from fastft.planning.core import GPU_MEMORY, RESERVE, GiB, Plan, plan, size
from fastft.planning.setup import PlanError, as_config
from fastft.planning.step import module_group


# -- the longest row, and how memory grows with it -----------------------------------------------

def _row_config(config: FinetuneConfig) -> FinetuneConfig:
    """One packed row per micro-batch and no accumulation: what "the longest row" means."""
    config = copy.deepcopy(config)
    config.data.batching, config.data.batch_size = "packed", 1
    config.train.global_batch_tokens = config.train.global_batch_rows = None
    return config


@dataclasses.dataclass
class ContextSearch:
    longest: int  # tokens in the longest row that fits (0: not even `granularity` tokens)
    capacity: int
    reserve: int
    plans: dict[int, Plan]  # every row length planned, by tokens

    def lines(self) -> list[str]:
        out = [f"longest packed row that fits {(self.capacity - self.reserve) / GiB:.1f} GiB "
               f"({self.capacity / GiB:.1f} GiB less {self.reserve / GiB:.1f} GiB reserve): {self.longest:,} tokens"]
        for tokens, p in sorted(self.plans.items()):
            out.append(f"  {tokens:>9,} tokens: peak {size(p.peak):>11s} ({p.phase} of {p.where})"
                       + ("" if p.fits(self.capacity, self.reserve) else "  does not fit"))
        return out


def max_context(config, *, capacity: int = GPU_MEMORY["H100"], reserve: int = RESERVE, world_size: int = 1,
                provider: str = "fastft", granularity: int = 1024, start: int = 4096, limit: int = 1 << 22,
                known: dict[int, Plan] | None = None) -> ContextSearch:
    """The longest packed row (tokens, a multiple of `granularity`) one optimizer step of `config`
    fits in `capacity` bytes per GPU, less `reserve`: a bisection on planned peaks, the next row
    length guessed where the line through the nearest planned peaks meets the budget (regula
    falsi: memory is close to linear in the row length), halving when a guess does not shrink the
    bracket. `known`: plans of one row at some lengths already made (for this config)."""
    config = _row_config(as_config(config))
    plans: dict[int, Plan] = dict(known or {})
    usable = capacity - reserve

    def fits(tokens: int) -> bool:
        if tokens not in plans:
            plans[tokens] = plan(config, world_size=world_size, provider=provider, rows=1, tokens=tokens)
        return plans[tokens].peak <= usable

    def guess(a: int, b: int) -> int:  # where the line through the peaks at a and b meets the budget
        slope = (plans[b].peak - plans[a].peak) / (b - a)
        return int((a + (usable - plans[a].peak) / slope) // granularity * granularity) if slope > 0 else 2 * b

    if not plans:
        fits(max(granularity, start // granularity * granularity))
    lo = max((t for t in plans if fits(t)), default=0)
    hi = min((t for t in plans if not fits(t)), default=None)
    while hi is None and lo < limit:  # grow: extrapolate from the two longest rows planned
        longest = sorted(plans)[-2:]
        t = min(limit, max(guess(*longest) if len(longest) == 2 else 2 * lo, lo + granularity))
        if fits(t):
            lo = t
        else:
            hi = t
    while lo == 0 and hi > granularity:  # not even the first row fits: shrink
        t = max(granularity, hi // 2 // granularity * granularity)
        if fits(t):
            lo = t
        else:
            hi = t
    while lo > 0 and hi is not None and hi - lo > granularity:
        t = guess(lo, hi)
        if not lo < t < hi:
            t = max(lo + granularity, (lo + hi) // 2 // granularity * granularity)
        if fits(t):
            lo = t
        else:
            hi = t
    return ContextSearch(lo, capacity, reserve, plans)


def scaling(config, lengths: list[int], *, world_size: int = 1, provider: str = "fastft") -> list[str]:
    """Per-module activation bytes against the row length (one packed row), summed over the
    decoder blocks, with each module's growth exponent p (bytes ~ c0 + c T^p): from the
    increments between consecutive lengths, p = log(d_last / d_first) / log(T_last / T_first)
    for lengths in a geometric sequence (constants, such as the weights autocast casts, cancel).
    1 is linear; above about 1.05 something grows faster."""
    config = _row_config(as_config(config))
    plans = [plan(config, world_size=world_size, provider=provider, rows=1, tokens=t) for t in lengths]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(plans):
        blocks = p.setup.get("blocks", "")
        for name, value in p.module_activations.items():
            key = module_group(name, blocks) if blocks else name
            if key is None and name != "(model)":
                continue
            key = key or "(model)"
            groups.setdefault(key, [0] * len(plans))[i] += value
    width = max([44, *(len(k) + 2 for k in groups)])  # the module column fits its longest name
    header = f"{'module (summed over blocks)':{width}s}" + "".join(f"{t:>12,}" for t in lengths) + "  exponent"
    out = [f"activation bytes kept for the backward (MiB) against row length, {plans[0].model}, provider {provider}",
           header]
    for key, values in sorted(groups.items(), key=lambda kv: -kv[1][-1]):
        if values[-1] < 2**20 and key != "(model)":
            continue
        exponent = _growth(lengths, values)
        flag = "  <- faster than linear" if exponent > 1.05 else ""
        out.append(f"{key:{width}s}" + "".join(f"{v / 2**20:12.1f}" for v in values) + f"  {exponent:8.2f}{flag}")
    out.append(f"{'peak per GPU':{width}s}" + "".join(f"{p.peak / 2**20:12.1f}" for p in plans))
    return out


def _growth(lengths: list[int], values: list[int]) -> float:
    if len(lengths) >= 3:
        first, last = values[1] - values[0], values[-1] - values[-2]
        if first > 0 and last > 0:
            return math.log(last / first) / math.log(lengths[-1] / lengths[1])
    elif values[0] > 0 and values[-1] > 0:
        return math.log(values[-1] / values[0]) / math.log(lengths[-1] / lengths[0])
    return float("nan")


# -- what would fit ------------------------------------------------------------------------------

def alternatives(config: FinetuneConfig, world_size: int) -> list[tuple[str, list[str], int]]:
    """(what, the overrides that do it, GPUs) for each change that lowers the peak, in the order
    a user would try them."""
    d, data, out = config.distributed, config.data, []
    if d.activation_checkpointing in ("none", "selective"):
        out.append(("activation checkpointing on every block", ["--distributed.activation_checkpointing=full"], world_size))
    if d.activation_checkpointing != "offload":
        out.append(("offloaded activation checkpointing", ["--distributed.activation_checkpointing=offload"], world_size))
    if config.model.tiled_mlp == "off" and config.model.patch:
        out.append(("tiled MLP", ["--model.tiled_mlp=auto"], world_size))
    if not config.lora.enabled:
        out.append(("LoRA r=16 instead of full fine-tuning", ["--lora.enabled=true"], world_size))
    if config.model.quantization == "none":
        out.append(("QLoRA: the base frozen in 4 bits (NF4) under LoRA", ["--model.quantization=nf4"]
                    + ([] if config.lora.enabled else ["--lora.enabled=true"]), world_size))
    if config.optim.name == "adamw" and world_size == 1 and not d.fsdp:  # bitsandbytes' update ops take no DTensor
        out.append(("8-bit AdamW states (bitsandbytes)", ["--optim.name=adamw_8bit"], world_size))
    rows_field = "data.token_budget" if data.batching == "flat" else "data.max_seq_len"
    rows_value = data.token_budget if data.batching == "flat" else data.max_seq_len
    if rows_value >= 2:
        out.append((f"half the row length ({rows_value // 2} tokens)", [f"--{rows_field}={rows_value // 2}"], world_size))
    if data.batching != "flat" and data.batch_size >= 2:
        out.append((f"half the micro-batch ({data.batch_size // 2} rows; accumulation makes up the global batch)",
                    [f"--data.batch_size={data.batch_size // 2}"], world_size))
    out.append((f"{2 * world_size} GPUs (FSDP2)", [], 2 * world_size))
    out.append(("FSDP2 CPU offload (parameters, gradients, optimizer states in host memory)",
                ["--distributed.fsdp=true", "--distributed.cpu_offload=true"], world_size))
    return out


def _overridden(config: FinetuneConfig, overrides: list[str]) -> FinetuneConfig:
    return load_config(config.to_dict(), overrides) if overrides else copy.deepcopy(config)


def fit_report(config, *, world_size: int, capacity: int, reserve: int = RESERVE, provider: str = "fastft",
               base: Plan | None = None) -> tuple[Plan, list[dict]]:
    """The plan and, when it does not fit, each alternative planned: [{"what", "overrides",
    "world_size", "peak" or "error", "fits"}]."""
    config = as_config(config)
    base = base or plan(config, world_size=world_size, provider=provider)
    rows = []
    if not base.fits(capacity, reserve):
        for what, overrides, gpus in alternatives(config, world_size):
            row = {"what": what, "overrides": overrides, "world_size": gpus}
            try:
                alt = plan(_overridden(config, overrides), world_size=gpus, provider=provider)
                row.update(peak=alt.peak, fits=alt.fits(capacity, reserve))
            except (PlanError, ConfigError, RuntimeError, ValueError) as exc:
                row.update(error=f"{type(exc).__name__}: {str(exc)[:160]}", fits=False)
            rows.append(row)
    return base, rows


def fit_message(base: dict, rows: list[dict], capacity: int, reserve: int) -> str:
    lines = [f"the memory plan does not fit: {base['peak'] / GiB:.1f} GiB per GPU planned (in the {base['phase']} of "
             f"{base['where']}), {(capacity - reserve) / GiB:.1f} GiB usable ({capacity / GiB:.1f} GiB less "
             f"{reserve / GiB:.1f} GiB for the CUDA context and fragmentation). Planned alternatives:"]
    for row in rows:
        how = " ".join(row["overrides"]) or ("torchrun --nproc_per_node " + str(row["world_size"]) if row["world_size"] > 1 else "")
        if "peak" in row:
            lines.append(f"  {'fits ' if row['fits'] else 'no   '} {row['peak'] / GiB:6.1f} GiB  {row['what']}: {how}")
        else:
            lines.append(f"  {'':5s} {'':>6s}      {row['what']}" + (f" ({row['error']})" if row.get("error") else ""))
    lines.append("(fastft plan RECIPE prints the full plan; the planner is fastft/planning/)")
    return "\n".join(lines)
