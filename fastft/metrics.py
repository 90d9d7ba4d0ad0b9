"""Training metrics: FLOPs and MFU, peak memory, and where the numbers go (JSON lines, TensorBoard).

FLOP convention (model FLOPs, not hardware FLOPs: activation-checkpointing recompute is not counted)
----------------------------------------------------------------------------------------------------
Per optimizer step, over all ranks:

    FLOPs = 6 * N_train * T  +  4 * N_frozen * T  +  6 * n_layers * d_attn * sum_over_documents(L^2)

- T: tokens processed (every position of every micro-batch, padding of packed rows included).
- N_train / N_frozen: parameters that take part in matrix multiplies (all parameters except the
  input embedding table, a lookup; a tied LM head counts once, as the head), trainable or frozen.
  Each costs 2 FLOPs per token forward, 2 for the input gradient, 2 for the weight gradient: 6 for
  a trained weight (Kaplan et al. 2020's 6N), 4 for a frozen one (no weight gradient). So full
  fine-tuning is the usual 6N; LoRA counts 4 per frozen base weight plus 6 per adapter weight,
  the work actually needed (reporting LoRA at 6N would inflate MFU by about 1.5x).
- Attention scores and values: 2 matmuls of 2 * L^2 * d_attn FLOPs each per layer forward for
  a document of L tokens, halved for causality, times 3 for forward + backward: 6 * d_attn * L^2
  per layer (PaLM's 12 * n_layers * d_attn * T per token without the causal halving; documents
  in a packed row do not attend to each other, hence the sum over documents of L^2).
MFU = FLOPs / step time / (peak dense bf16 FLOP/s of one device * devices), the peak from
PEAK_BF16_FLOPS by device name; None on a CPU or an unknown device (printed "n/a").
"""

from __future__ import annotations

import json
import pathlib
import resource
import time

import torch

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s. Most specific first.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


def matmul_params(model) -> tuple[int, int]:
    """(trainable, frozen) parameters that take part in matmuls (see the module docstring)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = set()
    if embedding is not None and not (head is not None and head.weight is embedding.weight):
        skip.add(id(embedding.weight))
    trainable = frozen = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        n = p.numel()
        if hasattr(p, "_local_tensor") or type(p).__name__ == "DTensor":  # FSDP2 shard: count the full size
            n = p.shape.numel()
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return trainable, frozen


def attention_dims(config) -> tuple[int, int]:
    """(n_layers, d_attn = query heads * head dim) from a transformers config."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    return layers, heads * head_dim


def document_lengths_squared(batch: dict) -> int:
    """sum of L^2 over the attention segments of a micro-batch."""
    if "cu_seq_lens_q" in batch:
        lengths = batch["cu_seq_lens_q"].diff().to(torch.int64)
        return int((lengths * lengths).sum())
    if "attention_mask" in batch:
        lengths = batch["attention_mask"].sum(-1).to(torch.int64)
        return int((lengths * lengths).sum())
    b, t = batch["input_ids"].shape
    return b * t * t


def step_flops(n_train: int, n_frozen: int, tokens: int, layers: int, d_attn: int, sum_l2: int) -> float:
    return 6.0 * n_train * tokens + 4.0 * n_frozen * tokens + 6.0 * layers * d_attn * sum_l2


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
