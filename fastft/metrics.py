"""Training metrics: peak memory, and where the numbers go (JSON lines, TensorBoard).

FLOPs and MFU follow one convention for the trainer and the benchmarks: fastft/flops.py.
"""

from __future__ import annotations

import json
import pathlib
import resource
import time

import torch


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """(GiB, what it measures): CUDA peak allocated, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_peak_rss"


class MetricsLog:
    """JSON lines in `<run_dir>/metrics.jsonl` (one object per record; a `kind` field says
    train/eval/start/end), and TensorBoard scalars when the package is installed. Rank 0 only."""

    def __init__(self, run_dir, *, enabled: bool, tensorboard: bool = True, append: bool = False):
        self.enabled = enabled
        self.file = None
        self.writer = None
        if not enabled:
            return
        run_dir = pathlib.Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSON lines only
                self.writer = None

    def write(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
