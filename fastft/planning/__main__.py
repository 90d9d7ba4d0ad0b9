"""`fastft plan` / `python -m fastft.planning`: see `--help`."""

from __future__ import annotations

import json
import sys

from fastft.config import ConfigError, load_config
from fastft.planning.core import GPU_MEMORY, PLAN_VERSION, RESERVE, GiB, plan
from fastft.planning.roofline import GPUS
from fastft.planning.search import fit_report, max_context, scaling
from fastft.planning.setup import PlanError


# -- command line ------------------------------------------------------------------------------

def _memory(text: str) -> int:
    """"80GiB", "80GB", "H100" -> bytes."""
    if text.upper() in GPU_MEMORY:
        return GPU_MEMORY[text.upper()]
    units = {"GIB": GiB, "GB": 10**9, "MIB": 2**20, "MB": 10**6, "": 1}
    for unit in sorted(units, key=len, reverse=True):
        if text.upper().endswith(unit):
            try:
                return int(float(text[: len(text) - len(unit)]) * units[unit])
            except ValueError:
                break
    raise PlanError(f"--gpu-memory {text!r}: give a size such as 80GiB or 80GB, or one of {sorted(GPU_MEMORY)}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="fastft plan", description="Plan the GPU memory of a recipe on this machine (no GPU, no weights): "
        "one optimizer step on fake tensors, tracked by torch's memory tracker. Overrides as for fastft train "
        "(--section.field=value).")
    parser.add_argument("recipe", nargs="?", default=None, help="a YAML recipe (none: the built-in default)")
    parser.add_argument("--world-size", type=int, default=1, help="GPUs (FSDP2 over a fake process group)")
    parser.add_argument("--gpu-memory", default="H100", help="per GPU: 80GiB, 80GB, or H100 / H200 / B200")
    parser.add_argument("--reserve", default=str(RESERVE), help="left free of --gpu-memory (CUDA context, fragmentation)")
    parser.add_argument("--max-context", action="store_true", help="the longest packed row that fits")
    parser.add_argument("--provider", default="fastft", choices=("fastft", "hf", "both"))
    parser.add_argument("--time", metavar="GPU", choices=sorted(GPUS), help="roofline estimate of the step")
    parser.add_argument("--scaling", metavar="T1,T2,...", help="per-module activations at these row lengths")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--fit", type=int, metavar="BYTES", help=argparse.SUPPRESS)  # the trainer's preflight
    from fastft.config import split_overrides

    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(rest)
    try:
        config = load_config(args.recipe, overrides)
        capacity, reserve = _memory(args.gpu_memory), _memory(args.reserve)
        if args.fit is not None:
            base, rows = fit_report(config, world_size=args.world_size, capacity=args.fit, reserve=reserve)
            print(json.dumps({"plan": base.record(), "alternatives": rows}))
            return 0
        providers = ("fastft", "hf") if args.provider == "both" else (args.provider,)
        for provider in providers:
            if args.scaling:
                lengths = [int(x) for x in args.scaling.split(",")]
                print("\n".join(scaling(config, lengths, world_size=args.world_size, provider=provider)))
            elif args.max_context:
                search = max_context(config, capacity=capacity, reserve=reserve, world_size=args.world_size,
                                     provider=provider)
                longest = search.plans.get(search.longest)
                record = {"plan_version": PLAN_VERSION, "provider": provider, "max_context": search.longest,
                          "capacity": capacity, "reserve": reserve,
                          "peaks": {t: p.peak for t, p in sorted(search.plans.items())},
                          "model": longest.model if longest else None}
                if not args.json:
                    print(f"fastft plan --max-context: {record['model']}, provider {provider}")
                    print("\n".join(search.lines()))
                print(json.dumps(record))
            else:
                result = plan(config, world_size=args.world_size, provider=provider, gpu=args.time)
                if not args.json:
                    print("\n".join(result.lines()))
                    usable = capacity - reserve
                    print(f"  {'fits' if result.fits(capacity, reserve) else 'does NOT fit'} in {usable / GiB:.1f} GiB "
                          f"({args.gpu_memory} less {reserve / GiB:.1f} GiB reserve)")
                print(json.dumps(result.record()))
    except (PlanError, ConfigError) as exc:
        print(f"fastft plan: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
