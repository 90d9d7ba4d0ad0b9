"""What every benchmark script shares: arguments, timing, peak memory and provenance-stamped rows.

Timing on CUDA is `triton.testing.do_bench` (CUDA events, L2 flushed between reps), reporting
the median and the 20th/80th percentiles. On the CPU (the `--smoke` mode of the test suite)
a few wall-clock reps stand in: those numbers only prove that the script runs.
Rows are appended as JSON lines; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
from typing import Callable, Iterable

import torch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
MODES = ("fwd", "bwd", "full")


def parse_args(description: str, argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes and few reps on any device: proves the script runs")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR,
                        help="directory for the JSON-lines results (default: benchmarks/results)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fwd,bwd,full")
    parser.add_argument("--providers", default="", help="comma-separated subset of providers (default: all available)")
    args = parser.parse_args(None if argv is None else list(argv))
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        parser.error(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    args.providers = [p for p in args.providers.split(",") if p]
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def liger_importable() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def liger_available() -> bool:
    """Liger can run here: installed, and a GPU (its kernels are CUDA-only)."""
    return torch.cuda.is_available() and liger_importable()


def time_ms(fn: Callable[[], object], smoke: bool, grad_to_none: list[torch.Tensor] | None = None
            ) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn()."""
    if torch.cuda.is_available() and not smoke:
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                    quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    times = []
    for _ in range(3 if smoke else 10):
        for t in grad_to_none or []:
            t.grad = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]


def peak_memory_bytes(fn: Callable[[], object]) -> int | None:
    """Peak device memory fn() allocates above what was allocated before it (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def mode_callable(mode: str, forward: Callable[[], torch.Tensor], grads_of: list[torch.Tensor]
                  ) -> Callable[[], object]:
    """The function to time for a mode: forward only, backward only (graph kept), or both."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward()
        return run
    out = forward()
    grad_out = torch.ones_like(out) if out.numel() == 1 else torch.randn_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, grads_of, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), grads_of, grad_out)


def copy_bandwidth_gbps(nbytes: int, smoke: bool) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written per second): the memory ceiling."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), smoke)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=pathlib.Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=pathlib.Path(__file__).resolve().parent, timeout=10)
        commit = out.stdout.strip() or os.environ.get("FASTFT_COMMIT", "unknown")
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("FASTFT_COMMIT", "unknown")


def provenance() -> dict:
    import triton

    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        liger_version = version("liger-kernel")
    except Exception:  # not installed, or installed without metadata
        liger_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": tf_version,
        "liger_kernel": liger_version,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }


class Recorder:
    """Collects rows, stamps each with provenance, appends them to OUT/<name>.jsonl."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.path = pathlib.Path(args.out) / f"{name}{'_smoke' if args.smoke else ''}.jsonl"
        self.smoke = args.smoke
        self.stamp = provenance()
        self.rows: list[dict] = []

    def add(self, **row) -> dict:
        row = {**row, "smoke": self.smoke, **self.stamp}
        self.rows.append(row)
        keys = ("op", "provider", "mode", "shape", "dtype", "ms", "gbps", "tflops", "peak_mib")
        print("  ".join(f"{k}={row[k]}" for k in keys if row.get(k) is not None), flush=True)
        return row

    def save(self) -> pathlib.Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        return self.path


def measure(rec: Recorder, *, op: str, provider: str, mode: str, shape: dict, dtype: torch.dtype,
            forward: Callable[[], torch.Tensor], grads_of: list[torch.Tensor],
            bytes_moved: int | None = None, flops: int | None = None, **extra) -> dict | None:
    """Time and measure one (provider, mode) and record the row; a provider that fails is recorded
    with its error instead of aborting the other providers."""
    try:
        fn = mode_callable(mode, forward, grads_of)
        median, p20, p80 = time_ms(fn, rec.smoke, grad_to_none=grads_of)
        peak = peak_memory_bytes(fn)
    except Exception as exc:  # recorded, so that one broken peer does not hide the others
        return rec.add(op=op, provider=provider, mode=mode, shape=shape, dtype=str(dtype).replace("torch.", ""),
                       error=f"{type(exc).__name__}: {exc}"[:500], **extra)
    finally:
        for t in grads_of:
            t.grad = None
    return rec.add(
        op=op, provider=provider, mode=mode, shape=shape, dtype=str(dtype).replace("torch.", ""),
        ms=round(median, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
        gbps=round(bytes_moved / (median * 1e-3) / 1e9, 1) if bytes_moved else None,
        tflops=round(flops / (median * 1e-3) / 1e12, 1) if flops else None,
        peak_mib=round(peak / 2**20, 1) if peak is not None else None, **extra,
    )


def compiled(fn: Callable, smoke: bool) -> Callable | None:
    """torch.compile'd fn, or None in smoke runs (compilation would dominate the test suite)."""
    if smoke:
        return None
    return torch.compile(fn)
