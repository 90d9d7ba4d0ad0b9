"""Every fastft kernel compiled for sm_80 (A100), sm_90 (H100/H200) and sm_100 (B200) on a machine
without a GPU, and what ptxas made of it.

    python -m benchmarks.compile_report [--targets 80,90,100] [--jobs 2] [--out benchmarks/COMPILE.md]
                                        [--json PATH] [--check] [--cache DIR]
    fastft bench --compile-report [the same options]

How a configuration is found: the host code of each op (the launchers in kernels/*.py) runs on
meta tensors at the benchmark shapes inside `kernels._common.recording_launches(capability)`,
which makes every launch choice for that GPU (block sizes, warps, stages, constexprs, the grid)
and records `kernel[grid](*args, **meta)` instead of running it. Triton's own JIT binder then
specialises the recorded arguments exactly as a launch on the GPU would (argument dtypes, 16-byte
alignment of pointers, integers divisible by 16 or equal to 1), and `triton.compile(ASTSource,
target=GPUTarget("cuda", cc, 32))` builds TTGIR, PTX and a cubin with the wheel's ptxas. So the
table is about the very kernels a GPU run launches, not hand-written signatures.

The cases (one benchmark shape each; constants below): the norms at six hidden sizes, every dtype
and casting mode; fused linear cross-entropy at four vocabularies and its options; LoRA linear
and MLP at the 1B/8B shapes, four ranks, with and without dropout, bf16 and fp32 adapters; the
same ops over 4-bit bases (QLoRA) at the 8B shapes, in a bf16 model (bf16 or fp32 compute) and
an fp32 one; the MoE experts layer (forward and backward, with and without LoRA on both expert
stacks) at the Qwen3-30B-A3B, OLMoE and Mixtral shapes, bf16 and fp32, at 8192 and 2048 tokens,
and expert-parallel (8 ranks); and the 4-bit dequantization, which launches no fastft kernel
(listed with the reason). The MoE routing needs no values: its host code sorts the expert ids with
device ops and sizes every grid at its upper bound from the shapes whenever it chooses for a GPU
(kernels/grouped_gemm.py: route), so its meta tensors are enough, as everywhere else.

What each cell reports, per target:
- registers per thread and ptxas's spill stores / loads in bytes (`ptxas -v`: spills land in the
  stack frame, so LOCAL can read 0 while a kernel spills), the stack frame, shared memory per
  program (static, from `cuobjdump --dump-resource-usage`, plus the dynamic size Triton launches
  with);
- theoretical occupancy: resident warps per SM over the maximum (64), from the register file
  (65,536 per SM in 4 sub-partitions, allocated per warp in units of 256), shared memory (plus the
  1 KB the driver reserves per block) and the 32-blocks-per-SM limit (CUDA C Programming Guide,
  "Compute Capabilities" tables, and the CUDA occupancy calculator's rules);
- how the global loads are vectorised, from the SASS (`cuobjdump -sass`): how many of the kernel's
  global-load instructions (LDG, LDGSTS) are 128 bits wide or wider, of all of them (the JSON
  rows also give the share of bytes). The narrow ones are mostly per-row scalars.
`--check` exits non-zero on a compile error, any spill, or shared memory above a target's limit
(the default test suite runs it for sm_90: tests/test_compile_report.py). Results are cached per
configuration under --cache, keyed by the kernel's source, the specialisation and the triton
version, so that a rerun compiles only what changed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "COMPILE.md"
DEFAULT_CACHE = pathlib.Path(tempfile.gettempdir()) / "fastft-compile-cache"


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits of one target (CUDA C Programming Guide, compute capability tables)."""
    name: str
    gpu: str
    sm_count: int            # for the persistent grids the host code sizes (H100 SXM, A100, B200)
    smem_per_sm: int         # bytes usable by blocks
    smem_per_block: int      # opt-in maximum per block
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    reserved_smem: int = 1024  # per block, taken by the driver


ARCHES = {
    80: Arch("sm_80", "A100", 108, 167936, 166912),
    90: Arch("sm_90", "H100/H200", 132, 233472, 232448),
    100: Arch("sm_100", "B200", 148, 233472, 232448),
}
STREAMING_OCCUPANCY = 0.5  # below this a memory-bound kernel is marked "low" (few loads in flight)


# ------------------------------------------------------------------------------------------------
# The configurations: each case runs one op's host code on meta tensors at one benchmark shape.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    op: str                  # the fused op whose host code runs
    label: tuple             # (("H", 4096), ("dtype", "bf16"), ...): the benchmark shape it stands for
    run: Callable[[], None]  # the host calls, on meta tensors
    memory_bound: bool | frozenset = True  # all its kernels stream memory, none, or these kernel names
    no_kernel: str = ""      # why an op whose cases launch no Triton kernel has nothing to compile


NORM_HIDDEN = (2048, 3072, 4096, 5120, 8192, 16384)
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
FLCE_VOCAB = (32000, 128256, 151936, 262144)
FLCE_OPTIONS = {"plain": {}, "softcap": {"softcap": 30.0}, "smoothing": {"label_smoothing": 0.1},
                "z_loss": {"z_loss": 1e-4}, "all": {"softcap": 30.0, "label_smoothing": 0.1, "z_loss": 1e-4}}
# (hidden, intermediate, q out, kv out) of the LoRA benchmark models
LORA_MODELS = {"Llama-3.2-1B": (2048, 8192, 2048, 512), "Llama-3.1-8B": (4096, 14336, 4096, 1024),
               "Qwen3-8B": (4096, 12288, 4096, 1024)}
LORA_RANKS = (8, 16, 64, 128)
LORA_DROPOUT = (0.0, 0.05)
LORA_ADAPTER_DTYPES = ("bfloat16", "float32")  # in the model's dtype, or PEFT's default fp32 adapters
ROWS = 8192  # tokens per call: only the grid depends on it
# 4-bit bases (QLoRA) at the 8B shapes: (x dtype, compute dtype) pairs: the model's dtype for both
# (bitsandbytes' compute dtype "auto"), fp32 compute under a bf16 model, an fp32 model
QLORA_MODELS = ("Llama-3.1-8B", "Qwen3-8B")
QLORA_DTYPES = (("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("float32", "float32"))
QUANT_TYPES = ("nf4", "fp4")
# (hidden, expert intermediate, experts, top-k) of the MoE benchmark and e2e models
MOE_MODELS = {"Qwen3-30B-A3B": (2048, 768, 128, 8), "OLMoE-1B-7B": (2048, 1024, 64, 8),
              "Mixtral-8x7B": (4096, 14336, 8, 2)}
# the benchmark's 8192 tokens, and one packed 2048-token row (Qwen3-30B-A3B's experts then average
# 128 rows: 64-row blocks)
MOE_TOKENS = (8192, 2048)
MOE_RANKS = (0, 16, 64)  # 0: no expert LoRA, experts trained; r: LoRA on both stacks, experts frozen
MOE_DTYPES = ("bfloat16", "float32")
MOE_EXPERT_PARALLEL = {"Qwen3-30B-A3B": 8}  # examples/squad_qwen3_30b_a3b_lora.yaml's 8-way split
MOE_STREAMING = frozenset({"_combine_kernel"})  # the grouped GEMMs are compute-bound, the combine streams


def _meta(*shape, dtype="bfloat16"):
    import torch

    return torch.empty(*shape, dtype=getattr(torch, dtype), device="meta")


def _kernel_module(name: str):
    """fastft.kernels.<name>, the op's module."""
    import importlib

    return importlib.import_module(f"fastft.kernels.{name}")


def norm_cases(dtypes=FLOAT_DTYPES) -> Iterator[Case]:
    ln, rms = _kernel_module("layer_norm"), _kernel_module("rms_norm")

    for hidden in NORM_HIDDEN:
        for dtype in dtypes:
            for casting in rms.CASTING_MODES:
                offset = 1.0 if casting == "gemma" else 0.0

                def run_rms(hidden=hidden, dtype=dtype, casting=casting, offset=offset):
                    x, w = _meta(ROWS, hidden, dtype=dtype), _meta(hidden, dtype=dtype)
                    y, rstd = rms.rms_norm_forward(x, w, 1e-6, offset, casting)
                    for compute_dw in (True, False):  # trained norm weights, or frozen (LoRA)
                        rms.rms_norm_backward(y, x, w, rstd, offset, casting, compute_dw)

                yield Case("rms_norm", (("H", hidden), ("dtype", dtype), ("casting", casting)), run_rms)
            for affine in ("weight+bias", "weight", "none"):

                def run_ln(hidden=hidden, dtype=dtype, affine=affine):
                    x = _meta(ROWS, hidden, dtype=dtype)
                    w = _meta(hidden, dtype=dtype) if affine != "none" else None
                    b = _meta(hidden, dtype=dtype) if affine == "weight+bias" else None
                    y, mean, rstd = ln.layer_norm_forward(x, w, b, 1e-5, 0.0)
                    for trained in (True, False):
                        ln.layer_norm_backward(y, x, w, b, mean, rstd, 0.0, trained and w is not None,
                                               trained and b is not None)

                yield Case("layer_norm", (("H", hidden), ("dtype", dtype), ("affine", affine)), run_ln)


def flce_cases() -> Iterator[Case]:
    import torch

    flce = _kernel_module("fused_linear_cross_entropy")

    hidden = 4096
    for vocab in FLCE_VOCAB:
        for dtype in ("bfloat16", "float32"):
            for name, options in FLCE_OPTIONS.items():
                if dtype == "float32" and name not in ("plain", "all"):
                    continue

                def run(vocab=vocab, dtype=dtype, options=options):
                    x, w = _meta(ROWS, hidden, dtype=dtype), _meta(vocab, hidden, dtype=dtype)
                    labels = torch.empty(ROWS, dtype=torch.int64, device="meta")
                    one = torch.ones(1, dtype=torch.float32, device="meta")
                    opts = (-100, options.get("label_smoothing", 0.0), options.get("softcap"), 1.0,
                            options.get("z_loss", 0.0),
                            flce._chunk_rows(ROWS, vocab, x.element_size(), None))
                    flce._forward(x, w, None, labels, one, "mean", *opts, True, True, False)   # training
                    flce._forward(x, w, None, labels, one, "mean", *opts, False, False, False)  # eval
                    flce._forward(x, w, None, labels, one, "none", *opts, False, False, False)
                    per_row = torch.ones(ROWS, dtype=torch.float32, device="meta")
                    flce._backward_op(x, w, None, labels, per_row, *opts, True, True, False)   # "none"'s backward

                yield Case("fused_linear_cross_entropy", (("V", vocab), ("dtype", dtype), ("options", name)), run)


def _quant4bit(out_f: int, in_f: int, quant_type: str = "nf4", nested: bool = True, dtype: str = "bfloat16"):
    """A frozen 4-bit weight on meta in bitsandbytes' layout (kernels/dequantize_4bit.py: Quant4bit):
    packed indices, blocks of 64, absmax fp32 or (nested) uint8 with blocks of 256 fp32 scales."""
    import torch

    dq = _kernel_module("dequantize_4bit")
    blocks = out_f * in_f // 64
    nested_state = (_meta(-(-blocks // 256), dtype="float32"), _meta(256, dtype="float32"),
                    torch.empty((), dtype=torch.float32, device="meta")) if nested else ()
    return dq.Quant4bit(torch.empty(out_f * in_f // 2, 1, dtype=torch.uint8, device="meta"),
                        torch.empty(blocks, dtype=torch.uint8 if nested else torch.float32, device="meta"),
                        _meta(16, dtype="float32"), (out_f, in_f), 64, quant_type, getattr(torch, dtype),
                        *nested_state)


def _lora_layers(shapes, rank: int, adapter: str, x_dtype: str, compute: str | None) -> list:
    """(W, b, A, B) on meta for each (out, in) projection, no bias; W dense in x's dtype, or 4-bit
    (NF4, double quantization) dequantizing into `compute`."""
    return [(_meta(out_f, in_f, dtype=x_dtype) if compute is None else _quant4bit(out_f, in_f, dtype=compute),
             None, _meta(rank, in_f, dtype=adapter), _meta(out_f, rank, dtype=adapter)) for out_f, in_f in shapes]


def _frozen_base_needs(lora, layers) -> list[bool]:
    """What a LoRA backward computes with the base frozen: dX, then per tensor of params (the 4-bit
    ops) the adapters' only, or per projection [W, b, A, B] (the dense ops)."""
    params, has_bias, weight_meta = lora.flatten_projections(layers)
    if not any(lora.is_quantized(layer[0]) for layer in layers):
        return [True] + [False, False, True, True] * len(layers)
    _, widths = lora.quant_projections(params, has_bias, weight_meta)
    return [True] + [need for n in widths for need in [False] * n + [True, True]]


def _run_lora_projections(shapes, rank, p, adapter, x_dtype="bfloat16", compute=None):
    """One lora_linear op (lora_linear_4bit with a compute dtype for 4-bit bases) over projections
    of one input (shapes: (out, in) each), forward and backward."""
    import torch

    lora = _kernel_module("lora")
    x = _meta(ROWS, shapes[0][1], dtype=x_dtype)
    layers = _lora_layers(shapes, rank, adapter, x_dtype, compute)
    params, has_bias, weight_meta = lora.flatten_projections(layers)
    n = len(shapes)
    adapters = ([2.0] * n, [p] * n, torch.arange(n))
    needs = _frozen_base_needs(lora, layers)
    if compute is None:
        ys, us = lora._lora_forward(x, params, has_bias, *adapters)
        lora._lora_backward(ys, x, params, has_bias, us, *adapters, needs)
    else:
        ys, us = lora._lora_4bit_forward(x, params, has_bias, weight_meta, *adapters)
        lora._lora_4bit_backward(ys, x, params, has_bias, weight_meta, us, *adapters, needs)


def _run_lora_linear(hidden, inter, q_out, kv_out, rank, p, adapter, x_dtype="bfloat16", compute=None):
    # q/k/v of one input as one op; o_proj and down_proj as single projections
    for shapes in ([(q_out, hidden), (kv_out, hidden), (kv_out, hidden)], [(hidden, q_out)], [(hidden, inter)]):
        _run_lora_projections(shapes, rank, p, adapter, x_dtype, compute)


def _run_lora_mlp(hidden, inter, rank, p, adapter, x_dtype="bfloat16", compute=None):
    import torch

    lora, lora_mlp = _kernel_module("lora"), _kernel_module("lora_mlp")
    x = _meta(ROWS, hidden, dtype=x_dtype)
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
    layers = _lora_layers(shapes, rank, adapter, x_dtype, compute)
    if not lora_mlp._fused_fits(x, *(layer[2] for layer in layers)):  # what lora_mlp does then: 3 lora_linear ops
        for shape in shapes:
            _run_lora_projections([shape], rank, p, adapter, x_dtype, compute)
        return
    params, has_bias, weight_meta = lora.flatten_projections(layers)
    adapters = ("silu", [p] * 3, torch.arange(3), [2.0] * 3)
    needs = _frozen_base_needs(lora, layers)
    if compute is None:
        y, *saved = lora_mlp._mlp_forward(x, params, has_bias, *adapters)
        lora_mlp._mlp_backward(y, x, *saved, params, has_bias, *adapters, needs)
    else:
        y, *saved = lora_mlp._mlp_4bit_forward(x, params, has_bias, weight_meta, *adapters)
        lora_mlp._mlp_4bit_backward(y, x, *saved, params, has_bias, weight_meta, *adapters, needs)


def lora_cases() -> Iterator[Case]:
    import torch

    for model, (hidden, inter, q_out, kv_out) in LORA_MODELS.items():
        for rank in LORA_RANKS:
            for p in LORA_DROPOUT:
                for adapter in LORA_ADAPTER_DTYPES:
                    label = (("model", model), ("r", rank), ("dropout", p), ("adapter", adapter))
                    yield Case("lora_linear", label, functools.partial(
                        _run_lora_linear, hidden, inter, q_out, kv_out, rank, p, adapter), memory_bound=False)
                    yield Case("lora_mlp", label, functools.partial(_run_lora_mlp, hidden, inter, rank, p, adapter),
                               memory_bound=False)

    def run_dropout():  # the mask's definition (lora_dropout), used by tests and references
        _kernel_module("lora")._apply_dropout(_meta(ROWS, 4096), 0.1, torch.zeros(1, dtype=torch.int64))

    yield Case("lora_dropout", (("H", 4096), ("dtype", "bfloat16")), run_dropout)


def qlora_cases(quick: bool = False) -> Iterator[Case]:
    """The LoRA ops over 4-bit bases (NF4, double quantization: the quantization state only reaches
    the dequantization, below) at the 8B shapes, every rank, dropout and adapter dtype. Their
    kernels are the dense LoRA ones (only an fp32 model's x adds configurations); quick: Llama-3.1-8B,
    compute in the model's dtype, rank 16 (the fp32 model's kernels compile slowly: the rest of them
    are checked through the committed table)."""
    for model in QLORA_MODELS[:1] if quick else QLORA_MODELS:
        hidden, inter, q_out, kv_out = LORA_MODELS[model]
        for x_dtype, compute in [d for d in QLORA_DTYPES if d[0] == d[1]] if quick else QLORA_DTYPES:
            for rank in (16,) if quick else LORA_RANKS:
                for p in LORA_DROPOUT:
                    for adapter in LORA_ADAPTER_DTYPES:
                        label = (("model", model), ("r", rank), ("dropout", p), ("adapter", adapter),
                                 ("x", x_dtype), ("compute", compute))
                        yield Case("lora_linear_4bit", label, functools.partial(
                            _run_lora_linear, hidden, inter, q_out, kv_out, rank, p, adapter, x_dtype, compute),
                            memory_bound=False)
                        yield Case("lora_mlp_4bit", label, functools.partial(
                            _run_lora_mlp, hidden, inter, rank, p, adapter, x_dtype, compute), memory_bound=False)


DEQUANTIZE_NO_KERNEL = (
    "bitsandbytes' own op (`torch.ops.bitsandbytes.dequantize_4bit`, its CUDA kernel on a GPU) or the torch "
    "reference: fastft has no Triton dequantization kernel (kernels/dequantize_4bit.py and benchmarks/NOTES.md "
    "say why), so there is nothing of fastft's to compile. The cases still run the host code on meta tensors, "
    "so that a Triton kernel added there is compiled and checked here at once.")


def dequantize_cases() -> Iterator[Case]:
    """Every weight of an 8B layer dequantized (what the 4-bit LoRA ops do before each base GEMM)."""

    def run(shapes, quant_type, nested, dtype):
        dq = _kernel_module("dequantize_4bit")
        for out_f, in_f in shapes:
            dq.dequantize_4bit(_quant4bit(out_f, in_f, quant_type, nested, dtype))

    for model in QLORA_MODELS:
        hidden, inter, q_out, kv_out = LORA_MODELS[model]
        shapes = [(q_out, hidden), (kv_out, hidden), (hidden, q_out), (inter, hidden), (hidden, inter)]
        for quant_type in QUANT_TYPES:
            for nested in (False, True):
                for dtype in ("bfloat16", "float32"):
                    yield Case("dequantize_4bit", (("model", model), ("quant", quant_type), ("double quant", nested),
                                                   ("dtype", dtype)),
                               functools.partial(run, shapes, quant_type, nested, dtype),
                               no_kernel=DEQUANTIZE_NO_KERNEL)


def _expert_lora(n_exp: int, out_f: int, in_f: int, rank: int, dtype: str):
    """ExpertLoRA views of PEFT's target_parameters factors as fastft/patching/moe.py's lora_factors
    takes them, never copied: A [r·E, in] as [E, r, in], B [out, r·E] (column j·E + e) as [E, out, r]."""
    a = _meta(n_exp * rank, in_f, dtype=dtype).view(n_exp, rank, in_f)
    b = _meta(out_f, rank * n_exp, dtype=dtype).view(out_f, rank, n_exp).permute(2, 0, 1)
    return a, b


def _run_moe(hidden, inter, n_exp, top_k, tokens, rank, dtype, routing_dtype=None):
    """One MoE experts layer, forward and backward, as the moe_experts op runs it (transformers 5's
    [E, 2I, H] / [E, H, I] stacks, gate rows first, SiLU). The routing (topk ids) is on meta too: the
    host code sorts it with device ops and sizes every grid at its upper bound from the shapes alone
    (kernels/grouped_gemm.py: route), as on a GPU, so no routing values are needed here."""
    import torch

    moe = _kernel_module("moe")
    x = _meta(tokens, hidden, dtype=dtype)
    topk_idx = torch.empty(tokens, top_k, dtype=torch.int64, device="meta")
    topk_w = _meta(tokens, top_k, dtype=routing_dtype or dtype)
    gate_up, down = _meta(n_exp, 2 * inter, hidden, dtype=dtype), _meta(n_exp, hidden, inter, dtype=dtype)
    a_gu, b_gu = _expert_lora(n_exp, 2 * inter, hidden, rank, dtype) if rank else (None, None)
    a_d, b_d = _expert_lora(n_exp, hidden, inter, rank, dtype) if rank else (None, None)
    block_m = moe.op_block_m(x, topk_idx, gate_up)
    options = ("silu", "concatenated", 2.0, 2.0, 1.0, block_m)
    out, gu, xa, hd = moe._moe_forward(x, topk_idx, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d, *options)
    # the gradients of x, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d: stacks trained, or only the adapters
    needs = [True, True, not rank, not rank] + [bool(rank)] * 4
    moe._moe_backward(out, x, topk_idx, topk_w, gate_up, down, a_gu, b_gu, a_d, b_d, gu, xa, hd, *options, needs)


def moe_cases(quick: bool = False) -> Iterator[Case]:
    """The experts layer at the MoE models' shapes; quick: Qwen3-30B-A3B (both row blocks), bf16
    and fp32, without LoRA and at the benchmark's rank 16."""
    ranks = MOE_RANKS[:2] if quick else MOE_RANKS
    for model, (hidden, inter, n_exp, top_k) in list(MOE_MODELS.items())[:1] if quick else MOE_MODELS.items():
        for tokens in MOE_TOKENS:
            for dtype in MOE_DTYPES:
                for rank in ranks:
                    label = (("model", model), ("tokens", tokens), ("dtype", dtype), ("expert LoRA r", rank or "none"))
                    yield Case("moe_experts", label, functools.partial(
                        _run_moe, hidden, inter, n_exp, top_k, tokens, rank, dtype), memory_bound=MOE_STREAMING)
    # expert parallelism (fastft/expert_parallel.py): each rank runs its E/ep local experts on the
    # slots it received, top-1 with fp32 unit weights (the routing weights are applied after the
    # combine); uniform routing brings each rank tokens·K rows
    for model, ep in {} if quick else MOE_EXPERT_PARALLEL.items():
        hidden, inter, n_exp, top_k = MOE_MODELS[model]
        for rank in MOE_RANKS:
            label = (("model", f"{model} EP{ep}"), ("tokens", 8192), ("dtype", "bfloat16"),
                     ("expert LoRA r", rank or "none"))
            yield Case("moe_experts", label, functools.partial(
                _run_moe, hidden, inter, n_exp // ep, 1, 8192 * top_k, rank, "bfloat16", "float32"),
                memory_bound=MOE_STREAMING)


def cases(quick: bool = False) -> list[Case]:
    """Every case; quick, the default test's set (every kernel family, within its time): the norms in
    bf16 only (fp16 and fp32 norms are the same kernels with other conversions), the loss and the
    dense LoRA ops in all their dtypes, one model each of the 4-bit LoRA ops and MoE (qlora_cases,
    moe_cases). The test also checks that the committed COMPILE.md is the full sweep of this code."""
    return [*norm_cases(("bfloat16",) if quick else FLOAT_DTYPES), *flce_cases(), *lora_cases(), *qlora_cases(quick),
            *dequantize_cases(), *moe_cases(quick)]


# ------------------------------------------------------------------------------------------------
# From a recorded launch to a compile spec, exactly as triton's JIT would specialise it.
# ------------------------------------------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


@functools.lru_cache(maxsize=None)
def _binder(kernel, capability: int):
    """(backend, triton's argument binder) of a kernel for a target: built once, used per launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def launch_spec(launch, capability: int) -> dict:
    """The kernel, signature, constexprs, attributes and options triton's JIT would compile."""
    kernel = launch.kernel
    backend, binder = _binder(kernel, capability)
    kwargs = dict(launch.meta)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return {
        "module": kernel.fn.__module__, "name": kernel.fn.__name__, "source": kernel.cache_key,
        "signature": signature,
        "constexprs": sorted([list(k), _jsonable(v)] for k, v in constexprs.items()),
        "attrs": sorted([list(k), _jsonable(v)] for k, v in attrs.items() if v),
        "options": {k: _jsonable(v) for k, v in sorted(options.items())},
        "capability": capability,
    }


def config_id(spec: dict) -> str:
    """The launch configuration without the target and the toolchain: stable across triton versions."""
    key = {k: spec[k] for k in ("name", "signature", "constexprs", "attrs")}
    key["options"] = {k: v for k, v in spec["options"].items() if k in ("num_warps", "num_stages", "maxnreg")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def describe(spec: dict) -> str:
    """`BLOCK=4096 CASTING=0 · 16 warps · X,W,Y bf16 RSTD fp32 · R not /16`."""
    import importlib

    kernel = getattr(importlib.import_module(spec["module"]), spec["name"])
    names = kernel.arg_names
    consts = " ".join(f"{names[k[0]]}={v}" for k, v in spec["constexprs"])  # integers equal to 1 included
    pointers = defaultdict(list)
    for name, ty in spec["signature"].items():
        if ty.startswith("*"):
            pointers[ty[1:]].append(name)
    divisible = {names[k[0]] for k, _ in spec["attrs"]}
    unspecialised = {p.name for p in kernel.params if p.do_not_specialize}  # row counts, seeds: on purpose
    unaligned = [n for n, ty in spec["signature"].items()
                 if ty[0] in "iu" and n not in divisible and n not in unspecialised]
    warps = spec["options"].get("num_warps", 4)
    stages = spec["options"].get("num_stages")
    maxnreg = spec["options"].get("maxnreg")
    parts = [consts, f"{warps} warps" + (f", {stages} stage{'s' if stages != 1 else ''}" if stages else "")
             + (f", maxnreg {maxnreg}" if maxnreg else ""),
             " ".join(f"{','.join(v)} {k}" for k, v in pointers.items())]
    if unaligned:
        parts.append(f"{', '.join(unaligned)} not /16")
    return " · ".join(p for p in parts if p)


# ------------------------------------------------------------------------------------------------
# Compiling one spec (in a worker process) and reading its resources.
# ------------------------------------------------------------------------------------------------
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_GLOBAL_LOAD = re.compile(r"\b(LDGSTS|LDG|UTMALDG)((?:\.[A-Z0-9_]+)*)")


def load_widths(sass: str) -> dict[int, int]:
    """{bits: instruction count} of the global loads in SASS (LDG, LDGSTS; a TMA load counts as 128)."""
    widths: dict[int, int] = defaultdict(int)
    for op, suffix in _GLOBAL_LOAD.findall(sass):
        if op == "UTMALDG":
            widths[128] += 1
            continue
        sizes = [int(s) for s in re.findall(r"\.(?:U|S)?(8|16|32|64|128|256)\b", suffix)]
        widths[max(sizes) if sizes else 32] += 1
    return dict(widths)


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def compile_spec(spec: dict, on_device: bool = False) -> dict:
    """Compile one spec; registers, spills, stack, shared memory and load widths, or the error.
    on_device: also load it on this machine's GPU and add what the driver says (device_regs,
    device_spills), or the error it gives (out of resources, say) as device_error."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel = getattr(importlib.import_module(spec["module"]), spec["name"])
    target = GPUTarget("cuda", spec["capability"], 32)
    options = make_backend(target).parse_options(dict(spec["options"]))
    constexprs = {tuple(k): v for k, v in spec["constexprs"]}
    attrs = {tuple(k): v for k, v in spec["attrs"]}
    knobs.nvidia.dump_ptxas_log = True        # ptxas -v's report, printed by triton's make_cubin
    knobs.compilation.always_compile = True   # so that ptxas runs (our own cache stands in front)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, spec["signature"], constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as exc:  # a compile error is a result: the table and --check report it
        return {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
    seconds = time.perf_counter() - start
    ptxas = log.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    spill = _PTXAS_SPILL.search(ptxas)
    regs_ptxas = _PTXAS_REGS.search(ptxas)
    resources = _RESOURCE.search(usage)
    if spill is None or resources is None:
        return {"error": f"could not read the resources: ptxas said {ptxas[-500:]!r}, cuobjdump {usage[-500:]!r}"}
    regs, stack, shared, local = (int(v) for v in resources.groups())
    device = {}
    if on_device:
        try:
            compiled._init_handles()  # cuModuleLoad + the function's attributes, as a first launch does
            device = {"device_regs": compiled.n_regs, "device_spills": compiled.n_spills}
        except Exception as exc:  # the report said it fits and the GPU says otherwise: a bug in this check
            device = {"device_error": f"{type(exc).__name__}: {exc}"[:500]}
    return {**device,
        "regs": regs, "regs_ptxas": int(regs_ptxas.group(1)) if regs_ptxas else None, "stack": stack,
        "local": local, "spill_stores": int(spill.group(2)), "spill_loads": int(spill.group(3)),
        "shared_static": shared, "shared_dynamic": int(compiled.metadata.shared),
        "num_warps": options.num_warps, "loads": load_widths(sass), "compile_s": round(seconds, 2),
    }


def occupancy(result: dict, arch: Arch) -> float:
    """Theoretical occupancy: resident warps per SM / max warps (the CUDA occupancy calculator's rules)."""
    warps = result["num_warps"]
    regs_per_warp = math.ceil(max(result["regs"], 1) * 32 / 256) * 256
    warps_by_regs = (arch.regs_per_sm // 4 // regs_per_warp) * 4  # 4 sub-partitions of the register file
    smem = result["shared_static"] + result["shared_dynamic"] + arch.reserved_smem
    blocks = min(warps_by_regs // warps, arch.smem_per_sm // smem, arch.max_warps // warps, arch.max_blocks)
    return blocks * warps / arch.max_warps


def vector_share(loads: dict) -> float | None:
    """Share of the bytes the global-load instructions move in 128-bit or wider ones."""
    total = sum(int(bits) * n for bits, n in loads.items())
    return None if total == 0 else sum(int(bits) * n for bits, n in loads.items() if int(bits) >= 128) / total


def problems(result: dict, arch: Arch) -> list[str]:
    """What --check fails on: a compile error, any spill, shared memory over the block limit (and,
    --on-device, the GPU refusing to load it or reporting spills)."""
    if "error" in result:
        return [f"compile error: {result['error'][:300]}"]
    out = []
    if "device_error" in result:
        out.append(f"the GPU refused it: {result['device_error'][:300]}")
    if result.get("device_spills"):
        out.append(f"the GPU reports {result['device_spills']} spilled registers")
    if result["spill_stores"] or result["spill_loads"]:
        out.append(f"spills {result['spill_stores']} B stores / {result['spill_loads']} B loads")
    smem = result["shared_static"] + result["shared_dynamic"]
    if smem > arch.smem_per_block:
        out.append(f"shared memory {smem} B > {arch.smem_per_block} B")
    return out


def _cache_key(spec: dict) -> str:
    import triton

    return hashlib.sha256((json.dumps(spec, sort_keys=True) + triton.__version__).encode()).hexdigest()[:24]


def _cached_compile(item: tuple[dict, str, bool]) -> dict:
    spec, cache, on_device = item
    path = pathlib.Path(cache) / f"{_cache_key(spec)}{'.device' if on_device else ''}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = compile_spec(spec, on_device)
    if "error" not in result:  # errors are recomputed: they may come from a broken toolchain
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
    return result


# ------------------------------------------------------------------------------------------------
# The whole report.
# ------------------------------------------------------------------------------------------------
def nvidia_backend_missing() -> str | None:
    """Why this triton cannot compile for NVIDIA GPUs, or None when it can."""
    try:
        import triton
        import triton.backends
    except ImportError as exc:
        return f"triton is not importable: {exc}"
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        return f"triton {triton.__version__} has no NVIDIA backend"
    try:
        _tool("ptxas"), _tool("cuobjdump")
    except Exception as exc:  # a wheel without the CUDA tools
        return f"triton {triton.__version__} ships no ptxas/cuobjdump: {exc}"
    return None


def collect(targets: list[int], quick: bool = False) -> tuple[list[dict], dict[str, dict], list[dict]]:
    """Run every case's host code for every target: (rows, specs by cache key, ops without a
    kernel). A row is one (op, config, target) with the labels of the op's cases that launch it
    (a kernel that several ops launch, such as the LoRA kernels under the dense and the 4-bit ops,
    is listed under each, compiled once). An op whose cases launch no kernel at all is listed
    apart ({"op", "no_kernel": why, "labels"}), and fails unless its cases say why."""
    import triton.runtime.jit

    from fastft.kernels._common import recording_launches

    rows: dict[tuple[str, str, str, int], dict] = {}
    specs = {}
    silent: dict[str, dict] = {}
    launched_ops = set()
    for case in cases(quick):
        for cap in targets:
            with recording_launches((cap // 10, cap % 10), ARCHES[cap].sm_count) as launches:
                case.run()
            if launches:
                launched_ops.add(case.op)
            else:
                entry = silent.setdefault(case.op, {"op": case.op, "no_kernel": case.no_kernel, "labels": []})
                if case.label not in entry["labels"]:
                    entry["labels"].append(case.label)
            for launch in launches:
                if not isinstance(launch.kernel, triton.runtime.jit.JITFunction):
                    raise RuntimeError("the kernels were built for Triton's interpreter: run the compile report "
                                       "without TRITON_INTERPRET=1")
                spec = launch_spec(launch, cap)
                key = _cache_key(spec)
                specs[key] = spec
                row = rows.setdefault((case.op, spec["name"], config_id(spec), cap), {
                    "op": case.op, "kernel": spec["name"], "module": spec["module"], "config": config_id(spec),
                    "target": cap,
                    "launch": describe(spec), "key": key, "labels": [],
                    "memory_bound": case.memory_bound if isinstance(case.memory_bound, bool)
                    else spec["name"] in case.memory_bound})
                if case.label not in row["labels"]:
                    row["labels"].append(case.label)
    no_kernel = [entry for op, entry in silent.items() if op not in launched_ops]
    unexplained = [entry["op"] for entry in no_kernel if not entry["no_kernel"]]
    if unexplained:
        raise RuntimeError(f"the cases of {unexplained} launched no kernel: a broken case, or give the reason "
                           "(Case.no_kernel)")
    return list(rows.values()), specs, no_kernel


def run(targets: list[int], jobs: int, cache: pathlib.Path, quick: bool = False,
        on_device: bool = False) -> tuple[list[dict], list[dict]]:
    """(compiled rows, ops without a kernel): collect, then compile every spec (cached)."""
    rows, specs, no_kernel = collect(targets, quick)
    keys = sorted(specs)
    todo = [(specs[k], str(cache), on_device) for k in keys]
    if jobs > 1 and len(todo) > 1:
        import multiprocessing

        # fork is quick; a process that will touch the GPU is spawned (CUDA does not survive a fork)
        context = multiprocessing.get_context("spawn" if on_device else "fork")
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            results = dict(zip(keys, pool.map(_cached_compile, todo, chunksize=4)))
    else:
        results = {k: _cached_compile(item) for k, item in zip(keys, todo)}
    for row in rows:
        result = results[row["key"]]
        arch = ARCHES[row["target"]]
        row["result"] = result
        row["problems"] = problems(result, arch)
        if "error" not in result:
            row["occupancy"] = occupancy(result, arch)
            row["vector_share"] = vector_share(result["loads"])
            row["low_occupancy"] = row["memory_bound"] and row["occupancy"] < STREAMING_OCCUPANCY
    return rows, no_kernel


def _labels_text(labels: list[tuple]) -> str:
    """The benchmark shapes a config serves: each field's values, e.g. `H 3072, 4096 · bf16 · llama`."""
    fields: dict[str, list] = {}
    for label in labels:
        for k, v in label:
            values = fields.setdefault(k, [])
            if v not in values:
                values.append(v)
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    return " · ".join(f"{k} {', '.join(str(short.get(v, v)) for v in vs)}" for k, vs in fields.items())


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    r = row["result"]
    if "error" in r:
        return "**compile error**"
    smem = (r["shared_static"] + r["shared_dynamic"]) / 1024
    spill = r["spill_stores"] + r["spill_loads"]
    wide = sum(n for bits, n in r["loads"].items() if int(bits) >= 128)
    low = row["low_occupancy"]
    return (f"{r['regs']} · {'**' if spill else ''}{r['spill_stores']}/{r['spill_loads']}{'**' if spill else ''} · "
            f"{r['stack']} · {smem:.1f}K · {'**' if low else ''}{row['occupancy']:.0%}{'**' if low else ''} · "
            f"{wide}/{sum(r['loads'].values())}")


def markdown(rows: list[dict], targets: list[int], no_kernel: list[dict] = ()) -> str:
    import triton

    try:
        ptxas = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True).stdout.strip()
        ptxas = ptxas.splitlines()[-1]
    except Exception:
        ptxas = "unknown"
    by_config: dict[tuple[str, str, str], dict[int, dict]] = defaultdict(dict)
    for row in rows:
        by_config[(row["op"], row["kernel"], row["config"])][row["target"]] = row
    failures = [(r, p) for r in rows for p in r["problems"]]
    low = [r for r in rows if r.get("low_occupancy")]
    out = [
        "# Compile report: every kernel launch configuration, compiled for the GPU without one",
        "",
        "Generated by `python -m benchmarks.compile_report` (also `fastft bench --compile-report`); do not edit.",
        f"Toolchain: triton {triton.__version__}, {ptxas}. Kernel sources: {sources_hash(rows)}. "
        "How the configurations are found and what each "
        "figure means: the docstring of benchmarks/compile_report.py. Predictions drawn from this table: "
        "benchmarks/NOTES.md.",
        "",
        "Each cell, per target: **registers per thread · spill stores/loads (bytes) · stack (bytes) · shared "
        "memory per program · theoretical occupancy · global-load instructions of 128 bits or wider / all of them** "
        "(the narrow ones are mostly per-row scalars: a label, rstd, a scale). "
        f"Bold: a spill, or a memory-bound kernel below {STREAMING_OCCUPANCY:.0%} occupancy. "
        "`not /16`: integer arguments the JIT cannot assume divisible by 16 at that shape.",
        "",
        f"{len({key[1:] for key in by_config})} configurations x {len(targets)} targets "
        f"({len(by_config)} rows: a kernel configuration launched by several ops is listed under each); "
        f"{len(failures)} problems (compile errors, spills, shared memory over the limit); "
        f"{len(low)} memory-bound cells below {STREAMING_OCCUPANCY:.0%} occupancy.",
    ]
    for problem_row, problem in failures:
        out.append(f"- **{problem_row['kernel']}** ({problem_row['op']}: {problem_row['launch']}) on "
                   f"{ARCHES[problem_row['target']].name}: {problem}")
    ops = []
    for row in rows:
        if row["op"] not in ops:
            ops.append(row["op"])
    for op in ops:
        out += ["", f"## {op}", "",
                "| kernel | launch | used at | " + " | ".join(f"{ARCHES[t].name} ({ARCHES[t].gpu})" for t in targets)
                + " | id |",
                "|---|---|---|" + "---|" * len(targets) + "---|"]
        configs = [(k, v) for k, v in by_config.items() if k[0] == op]
        for (_, kernel, cid), per_target in sorted(configs,
                                                   key=lambda kv: (kv[0][1], next(iter(kv[1].values()))["launch"])):
            first = next(iter(per_target.values()))
            out.append(f"| `{kernel}` | {first['launch']} | {_labels_text(first['labels'])} | "
                       + " | ".join(_cell(per_target.get(t)) for t in targets) + f" | {cid} |")
    for entry in no_kernel:
        out += ["", f"## {entry['op']}", "", f"No Triton kernel at {_labels_text(entry['labels'])}: {entry['no_kernel']}"]
    return "\n".join(out) + "\n"


def sources_hash(rows: list[dict]) -> str:
    """A hash of the kernel files whose kernels the rows compile: COMPILE.md is stale once one changes."""
    import importlib

    files = sorted({importlib.import_module(m).__file__ for m in {r["module"] for r in rows}})
    digest = hashlib.sha256()
    for f in files:
        digest.update(pathlib.Path(f).name.encode() + pathlib.Path(f).read_bytes())
    return digest.hexdigest()[:16]


def committed_ids(path: pathlib.Path) -> set[str]:
    """The config ids of a generated COMPILE.md (its last column)."""
    ids = set()
    for line in path.read_text().splitlines():
        m = re.match(r"\|.*\| ([0-9a-f]{10}) \|$", line)
        if m:
            ids.add(m.group(1))
    return ids


def committed_problems(path: pathlib.Path) -> list[str]:
    """Why a committed COMPILE.md no longer describes the code (empty when fresh): its configuration
    ids against every sm_90 configuration the host code launches (enumerated, not compiled), its
    kernel-source hash, and its own problem count."""
    if not path.is_file():
        return ["missing"]
    text = path.read_text()
    rows, _, no_kernel = collect([90])
    ours, theirs = {r["config"] for r in rows}, committed_ids(path)
    out = []
    if ours != theirs:
        out.append(f"{len(ours - theirs)} configurations launched by the code are missing from it and "
                   f"{len(theirs - ours)} in it are no longer launched")
    missing_ops = [op for op in {r["op"] for r in rows} | {e["op"] for e in no_kernel} if f"\n## {op}\n" not in text]
    if missing_ops:
        out.append(f"it has no section for {sorted(missing_ops)}")
    if f"Kernel sources: {sources_hash(rows)}." not in text:
        out.append("the kernel sources changed since it was generated")
    if not re.search(r"; 0 problems", text):
        out.append("it lists problems (compile errors, spills or shared memory over a limit)")
    return out


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="80,90,100", help="compute capabilities, e.g. 90 or 80,90,100")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiler processes")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the Markdown table ('' for none)")
    parser.add_argument("--json", default="", help="also write every row as JSON here")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="per-configuration result cache")
    parser.add_argument("--check", action="store_true", help="exit 1 on a compile error, spill or smem overflow")
    parser.add_argument("--committed", default="", help="also fail unless this COMPILE.md is fresh: the code's "
                                                        "configurations (all of them, sm_90) and kernel sources, and "
                                                        "no problems")
    parser.add_argument("--quick", action="store_true", help="the norms in bf16 only (the default test's set)")
    parser.add_argument("--on-device", action="store_true", help="on a GPU machine: also load every configuration "
                        "and record the driver's registers and spills (--targets defaults to this GPU's)")
    args = parser.parse_args(argv)
    if args.on_device and args.targets == parser.get_default("targets"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--on-device needs a CUDA GPU")
        major, minor = torch.cuda.get_device_capability()
        args.targets = f"{major}{minor}"
    try:
        args.targets = [int(t) for t in args.targets.split(",") if t]
    except ValueError:
        parser.error(f"--targets {args.targets!r}: give compute capabilities such as 80,90,100")
    unknown = [t for t in args.targets if t not in ARCHES]
    if unknown:
        parser.error(f"--targets: {unknown} unknown; choose from {sorted(ARCHES)}")
    return args


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_report: TRITON_INTERPRET=1 builds the kernels for the interpreter; unset it to compile "
              "for a GPU", file=sys.stderr)
        return 2
    reason = nvidia_backend_missing()
    if reason:
        print(f"compile_report: {reason}; install the triton wheel for Linux x86-64 (it ships ptxas and cuobjdump)",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows, no_kernel = run(args.targets, args.jobs, pathlib.Path(args.cache), args.quick, args.on_device)
    text = markdown(rows, args.targets, no_kernel)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    if args.json:  # the compiled rows, then one row (kernel None) per op that launches no kernel
        extra = [{**entry, "kernel": None, "problems": []} for entry in no_kernel]
        pathlib.Path(args.json).write_text(json.dumps(rows + extra, indent=1, default=str))
    failures = [(r, p) for r in rows for p in r["problems"]]
    n_configs = len({(r["kernel"], r["config"]) for r in rows})
    print(f"compile_report: {n_configs} configurations x {len(args.targets)} targets in "
          f"{time.perf_counter() - start:.0f} s; {len(failures)} problems"
          + (f"; wrote {args.out}" if args.out else ""))
    for row, problem in failures:
        print(f"  {row['kernel']} ({row['op']}) [{row['launch']}] on {ARCHES[row['target']].name}: {problem}")
    status = 0
    if args.committed:
        stale = committed_problems(pathlib.Path(args.committed))
        for problem in stale:
            print(f"compile_report: {args.committed}: {problem}; regenerate it with python -m benchmarks.compile_report",
                  file=sys.stderr)
        status = 1 if stale else 0
    if args.check and failures:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
