"""The benchmark shared by rms_norm.py and layer_norm.py: four providers, three modes, one ceiling.

The ceiling is the device-to-device copy bandwidth measured in the same run (issue target:
fwd+bwd at >= 85% of it). Bytes counted are the fewest any implementation must move:
fwd reads x, writes y (2·N·H·b); bwd reads x and dy, writes dx (3·N·H·b); full is both.
"""

from __future__ import annotations

from typing import Callable

import torch

from benchmarks import harness

FULL_SHAPES = [(16384, 2048), (16384, 4096), (16384, 8192)]
SMOKE_SHAPES = [(64, 128)]


def run(op: str, argv, providers: Callable[[int, torch.dtype, str, bool], dict[str, Callable]]) -> list[dict]:
    """providers(hidden, dtype, device, smoke) -> {name: fn(x) -> y} for modules built once per shape."""
    args = harness.parse_args(f"{op} kernel benchmark", argv)
    rec = harness.Recorder(op, args)
    dtype = torch.bfloat16
    shapes = SMOKE_SHAPES if args.smoke else FULL_SHAPES
    copy_bytes = 2 * shapes[-1][0] * shapes[-1][1] * dtype.itemsize * 8  # well past L2 (50 MB on H100)
    rec.add(op="copy", provider="torch", mode="d2d", shape={"bytes": copy_bytes}, dtype="bfloat16",
            gbps=round(harness.copy_bandwidth_gbps(copy_bytes, args.smoke), 1))
    for n_rows, hidden in shapes:
        x = torch.randn(n_rows, hidden, dtype=dtype, device=args.device, requires_grad=True)
        elem = n_rows * hidden * dtype.itemsize
        for name, fn in providers(hidden, dtype, args.device, args.smoke).items():
            if args.providers and name not in args.providers:
                continue
            params = [p for p in getattr(fn, "parameters", lambda: [])()]
            for mode in args.modes:
                harness.measure(rec, op=op, provider=name, mode=mode, shape={"N": n_rows, "H": hidden}, dtype=dtype,
                                forward=lambda: fn(x), grads_of=[x, *params],
                                bytes_moved={"fwd": 2, "bwd": 3, "full": 5}[mode] * elem)
    print(f"wrote {rec.save()}")
    return rec.rows
