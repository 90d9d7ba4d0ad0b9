"""Training metrics: peak memory, where the numbers go (JSON lines, TensorBoard), the progress
bar, what a run prints (its start-up report, its attention paths, its evaluations, its summary),
and pictures of runs (curves.png, `fastft plot`).

FLOPs and MFU follow one convention for the trainer and the benchmarks: fastft/flops.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import time

import torch

from fastft import flops


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


# -- the loop's per-step record and progress bar ---------------------------------------------------

def step_record(out, n_params: tuple[float, float], layers: int, d_attn: int, device: torch.device,
                world_size: int, *, epoch: int) -> dict:
    """The metrics line of one step (fastft.train.StepResult `out`): loss, lr, grad norm, global
    real tokens per second, MFU (fastft/flops.py's convention and 6N), step time, peak memory."""

    work = flops.step_flops(*n_params, out.tokens, layers, d_attn, out.pairs)
    memory, memory_kind = peak_memory_gib(device)
    return {"loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm, "tokens_per_s": out.tokens / out.seconds,
            "mfu": flops.mfu(work["flops"], out.seconds, device, world_size),
            "mfu_6n": flops.mfu(work["flops_6n"], out.seconds, device, world_size), "step_s": out.seconds,
            "peak_memory_gib": memory, "memory_kind": memory_kind, "target_tokens": int(out.target_tokens),
            "epoch": epoch}


def progress_bar(total: int, initial: int, *, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)


def update_bar(bar, record: dict) -> None:
    if bar is None:
        return
    mfu = record["mfu"]
    bar.set_postfix_str(f"loss {record['loss']:.3f} lr {record['lr']:.1e} gnorm {record['grad_norm']:.2f} "
                        f"tok/s {record['tokens_per_s']:,.0f} MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} "
                        f"mem {record['peak_memory_gib']:.2f}GiB", refresh=False)
    bar.update(1)


# -- pictures of a run ---------------------------------------------------------------------------------

PANELS = [  # (title, record kind, keys, y label)
    ("loss", None, None, "loss per target token"),
    ("SQuAD EM / F1", "eval", ("exact_match", "f1"), "%"),
    ("learning rate", "train", ("lr",), "lr"),
    ("throughput", "train", ("tokens_per_s",), "real tokens / s (all ranks)"),
    ("peak memory", "train", ("peak_memory_gib",), "GiB"),
    ("gradient norm (before clipping)", "train", ("grad_norm",), "L2 norm"),
]
_NAMES = {"exact_match": "EM", "f1": "F1", "lr": "lr", "tokens_per_s": "tokens/s", "peak_memory_gib": "peak memory",
          "grad_norm": "grad norm"}
_told_about_matplotlib = False


def read_metrics(run_dir) -> list[dict]:
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir} a fastft run folder?)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r["kind"] == kind and r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _smooth(values: list[float]) -> list[float]:
    """A trailing mean over 2% of the points (at least 1): the trend of a noisy per-step series."""
    window = max(1, len(values) // 50)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _plot_series(ax, steps, values, *, colour, label, style="-", marker=None):
    """Per-step series: faint raw values and their trend; evaluation series: points joined."""
    if marker is None and len(values) > 50:
        ax.plot(steps, values, color=colour, lw=0.6, alpha=0.25)
        values = _smooth(values)
    ax.plot(steps, values, color=colour, ls=style, lw=1.5, marker=marker, ms=4, label=label)


def plot_runs(run_dirs, out, *, labels=None, log=print) -> str | None:
    """Draw the curves of one or several runs (overlaid, one colour per run) into the PNG `out`:
    train and val loss, EM/F1 at each evaluation, learning rate, tokens/s, peak memory and grad
    norm against step. Returns the path, or None (once saying how to get it) without matplotlib."""
    global _told_about_matplotlib
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if not _told_about_matplotlib:
            log("curves.png not drawn: matplotlib, a fastft dependency, is not installed (pip install "
                "matplotlib; then `fastft plot RUN_DIR` draws it from metrics.jsonl)")
            _told_about_matplotlib = True
        return None
    runs = [(str(label), read_metrics(d)) for label, d in zip(labels or [pathlib.Path(d).name for d in run_dirs],
                                                              run_dirs)]
    figure = Figure(figsize=(15, 8.5), layout="constrained")
    FigureCanvasAgg(figure)  # renders without pyplot: no global backend is set in the caller's process
    axes = figure.subplots(2, 3).flatten()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, kind, keys, ylabel) in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        for (label, records), colour in zip(runs, colours):
            if kind is None:  # the loss panel: train per step, val at each evaluation
                _plot_series(ax, *_series(records, "train", "loss"), colour=colour, label=f"{label} train")
                _plot_series(ax, *_series(records, "eval", "val_loss"), colour=colour, label=f"{label} val",
                             style="--", marker="o")
                continue
            for key, style in zip(keys, ("-", ":")):
                name = f"{label} {_NAMES[key]}" if len(keys) > 1 or len(runs) > 1 else _NAMES[key]
                _plot_series(ax, *_series(records, kind, key), colour=colour, label=name, style=style,
                             marker="o" if kind == "eval" else None)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if ax.has_data() and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    kinds = {r.get("memory_kind") for _, records in runs for r in records if r.get("memory_kind")}
    if kinds:
        axes[4].set_title("peak memory (" + ", ".join(sorted(kinds)) + ")")
    figure.suptitle("fastft: " + ", ".join(label for label, _ in runs))
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    return str(out)


# -- what a run prints ------------------------------------------------------------------------------

def startup_report(log, config, env, run_dir: str, plan: dict, precision, quant, patch_report, data_report,
                   n_params: tuple[float, float], n_ac: int, fused: bool, warmup: int,
                   qlora_report: list[str] = ()) -> None:
    """Everything a run derived (fastft/train.py), printed once: `precision` is fastft.model's
    Precision, `quant` the 4-bit settings or None."""
    c, d, o, device = config, config.distributed, config.optim, env.device
    n_trained, n_frozen = n_params
    cuda = device.type == "cuda"
    log(f"fastft train: {env.world_size} process(es) on {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else "") + f"; run folder {run_dir}")
    kernels = ("compiled Triton kernels" if cuda else "Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1"
               else "kernels' torch reference fallback (set TRITON_INTERPRET=1 for the Triton kernels)")
    log(f"model: {c.model.name or 'random init from config ' + str(c.model.config.get('model_type'))}, "
        f"{n_trained + n_frozen:,.0f} matmul params ({n_trained:,.0f} trained)"
        + (f", LoRA r={c.lora.r}" if c.lora.enabled else ", full fine-tuning")
        + (f" over a 4-bit base ({quant.describe()})" if quant is not None else "")
        + (f"; patched: {len(patch_report.patched())} modules, {kernels}" if patch_report is not None else "; not patched"))
    for line in qlora_report + data_report.lines:
        log(line)
    log(f"batch: micro-batch {plan['micro_batch_rows']} rows ({plan['micro_batch_tokens']} tokens) x accumulation "
        f"{plan['accumulation']} x {env.world_size} rank(s) = {plan['global_batch_rows']} rows / "
        f"{plan['global_batch_tokens']} tokens per optimizer step; {c.train.max_steps} steps")
    log(f"precision: weights {str(precision.weights).removeprefix('torch.')}, "
        + (f"FSDP2 params {precision.param_dtype} / reduce {d.reduce_dtype}, reshard_after_forward="
           f"{d.reshard_after_forward}, cpu_offload={d.cpu_offload}" if precision.fsdp
           else ("bf16 autocast" if precision.autocast_on else "no autocast"))
        + f"; activation checkpointing: {d.activation_checkpointing} ({n_ac} blocks); compile: {d.compile}")
    peak = flops.peak_flops(device)
    log(f"optimizer: {'AdamW' if o.name == 'adamw' else o.name} lr {o.lr}" + (f" (fused={fused})" if o.name == "adamw" else "")
        + f", warm-up {warmup} steps then {o.schedule} to "
        f"{o.min_lr_ratio}x, clip {o.grad_clip}; MFU peak: "
        + (f"{peak / 1e12:.0f} TFLOP/s per device" if peak else "n/a on this device"))


def log_attention_paths(patch_report, mlog, step: int, log) -> None:
    """After the first step: which path each attention call took (the PatchReport's counters)."""
    if patch_report is None:
        return
    log(f"attention in step {step}: {patch_report.paths_line()}")
    layers = {layer for layer, _ in patch_report.attention_calls}
    mlog.write("attention", step, paths=dict(patch_report.paths()), layers=len(layers))


def eval_line(name: str, result: dict | None) -> str:
    if result is None:
        return f"{name}: (not evaluated)"
    line = f"{name}: val loss " + ("n/a (no val batches)" if result["val_loss"] is None else f"{result['val_loss']:.4f}")
    if "exact_match" in result:
        line += f", SQuAD EM {result['exact_match']:.1f} F1 {result['f1']:.1f} on {result['count']} questions"
    return line


def summary(log, result) -> None:
    """The end of a finished run (fastft.train.RunResult `result`): losses, evaluations, where things went."""
    losses = result.losses
    if losses:
        k = max(1, min(10, len(losses) // 10))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        log(f"train loss: {first:.4f} (mean of the first {k} steps) -> {last:.4f} (last {k})")
    log(eval_line("val before", result.eval_before))
    log(eval_line("val after ", result.eval_after))
    for qid, answer, gold in (result.eval_after or {}).get("sample") or []:
        log(f"  {qid}: answered {answer!r}, gold {gold}")
    if result.curves:
        log(f"curves: {result.curves}")
    if result.export_dir:
        log(f"exported to {result.export_dir}")
    if result.merged_dir:
        log(f"merged into a bf16 model: {result.merged_dir}")
