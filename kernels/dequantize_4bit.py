"""4-bit (NF4 / FP4) blockwise weights, and the base GEMMs of the LoRA ops over them.

Math (Dettmers et al. 2023, "QLoRA"; bitsandbytes' blockwise k-bit quantization): a frozen weight
W [O, K] is flattened row-major and cut into blocks of `blocksize` (64) values; each value is
stored as a 4-bit index q into a 16-entry table `code` (NF4: the quantiles of N(0, 1) scaled to
[-1, 1]; FP4: a 1-3-0 float format), each block keeps its absolute maximum, and
    W[i] = code[q[i]] · absmax[i // blocksize]          (fp32 product, one rounding to the dtype)
Two indices share a byte, the first in the high nibble. Double quantization stores absmax itself
as 8-bit indices into a second 256-entry table, in blocks of 256 with fp32 scales, around its mean:
    absmax[j] = code2[a[j]] · absmax2[j // 256] + offset
So a parameter costs 4 bits, plus 32/64 bits of absmax (0.5 bit a parameter) or, nested, 8/64
plus 32/(64·256) bits (about 0.127): 4.13 bits in all (bitsandbytes' own layout, read as is).

Where the bytes go, and why there is no Triton dequantization kernel here: the LoRA ops (lora.py,
lora_mlp.py) dequantize one weight just before its GEMM, into a [O, K] tensor of the compute dtype
that is freed right after it (and dequantized again in the backward for dX; it is never saved).
A dequantization pass reads O·K/2 bytes of indices and writes 2·O·K bytes of bf16: at Llama-8B's
MLP (O = 14336, K = 4096) 147 MB, about 31 us at the H200's 4.8 TB/s, against 0.69 ms for the
2·N·K·O-FLOP GEMM it feeds at N = 4096 tokens (bf16 dense, ~700 TFLOP/s). bitsandbytes' CUDA
kernel is a streaming kernel of that kind already; a Triton one could at best match it, moving
about 4% of the GEMM's time (benchmarks/NOTES.md has the prediction and the GPU row that measures
bitsandbytes' dequantization bandwidth). What would move the needle is dequantizing inside the
GEMM's operand loads (no [O, K] round trip through memory), which has to beat cuBLAS at
compute-bound shapes first: not without a GPU measurement.

Dequantization therefore runs bitsandbytes' own op (`torch.ops.bitsandbytes.dequantize_4bit`, its
CUDA kernel on the GPU, its CPU code here) whenever bitsandbytes has registered it, and the
torch reference below otherwise; the two agree bit for bit (tests/test_qlora_layers.py). This file
needs torch only: bitsandbytes registers its ops when it is imported by whoever built the weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Quant4bit(NamedTuple):
    """A 4-bit weight as the ops take it: bitsandbytes' packed indices and quantization state, and
    the dtype to dequantize into (the layer's compute dtype). `shape` is W's [out, in]."""
    data: Tensor                 # packed indices, any storage dtype (bitsandbytes' quant_storage)
    absmax: Tensor               # [blocks] fp32, or uint8 indices into nested_code when nested
    code: Tensor                 # [16] fp32: the NF4 or FP4 table
    shape: tuple[int, int]
    blocksize: int
    quant_type: str              # "nf4" or "fp4"
    dtype: torch.dtype           # compute dtype: what dequantize_4bit returns
    nested_absmax: Tensor | None = None   # [blocks / nested_blocksize] fp32
    nested_code: Tensor | None = None     # [256] fp32
    offset: Tensor | None = None          # [] fp32
    nested_blocksize: int = 256

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def with_dtype(self, dtype: torch.dtype) -> "Quant4bit":
        return self._replace(dtype=dtype)


def is_quantized(weight) -> bool:
    return isinstance(weight, Quant4bit)


def quantized_nbytes(q: Quant4bit) -> int:
    """Bytes a 4-bit weight occupies (indices and quantization state), for memory planning."""
    tensors = (q.data, q.absmax, q.code, q.nested_absmax, q.nested_code, q.offset)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ------------------------------------------------------------------------------------------------
# Reference: the formulas of the module docstring in plain torch (fp32 products, one rounding).
# ------------------------------------------------------------------------------------------------
def block_scales_reference(q: Quant4bit) -> Tensor:
    """absmax [blocks] in fp32 (undoing double quantization)."""
    if not q.nested:
        return q.absmax.float()
    scales = q.nested_absmax.float().repeat_interleave(q.nested_blocksize)[: q.absmax.numel()]
    return q.nested_code.float()[q.absmax.long()] * scales + q.offset.float()


def dequantize_4bit_reference(q: Quant4bit, dtype: torch.dtype | None = None) -> Tensor:
    """W [out, in] in `dtype` (default q.dtype)."""
    n = q.shape[0] * q.shape[1]
    packed = q.data.reshape(-1).view(torch.uint8)
    index = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]
    scales = block_scales_reference(q).repeat_interleave(q.blocksize)[:n]
    return (q.code.float()[index.long()] * scales).to(dtype or q.dtype).reshape(q.shape)


# ------------------------------------------------------------------------------------------------
# Dequantization: bitsandbytes' ops when registered, else the reference.
# ------------------------------------------------------------------------------------------------
def _bitsandbytes_ops():
    ops = torch.ops.bitsandbytes
    return ops if hasattr(ops, "dequantize_4bit") and hasattr(ops, "dequantize_blockwise") else None


def dequantize_4bit(q: Quant4bit, dtype: torch.dtype | None = None) -> Tensor:
    """W [out, in] in `dtype` (default q.dtype, the compute dtype): a new tensor."""
    dtype = dtype or q.dtype
    ops = _bitsandbytes_ops()
    if ops is None or q.data.device.type not in ("cpu", "cuda", "meta"):
        return dequantize_4bit_reference(q, dtype)
    absmax = q.absmax
    if q.nested:  # what bitsandbytes' matmul_4bit does before its GEMM
        absmax = ops.dequantize_blockwise.default(q.absmax, q.nested_absmax, q.nested_code, q.nested_blocksize,
                                                  torch.float32) + q.offset
    return ops.dequantize_4bit.default(q.data, absmax, q.blocksize, q.quant_type, list(q.shape), dtype)


# ------------------------------------------------------------------------------------------------
# The base products of a (possibly 4-bit) frozen weight, as the LoRA ops use them. For a dense
# weight they are the plain GEMMs (x and W share a dtype). For a 4-bit weight W is dequantized into
# the compute dtype c right here and freed on return; the product runs in c and lands in x's dtype,
# as bitsandbytes' Linear4bit computes it (x cast to c, the GEMM in c, the result cast back). When
# c is x's dtype (the fast case) the accumulating forms are one GEMM with its epilogue add.
# ------------------------------------------------------------------------------------------------
def linear_reference(x: Tensor, w, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, W, b); for a 4-bit W, bitsandbytes' Linear4bit: in the compute dtype, cast back."""
    if not is_quantized(w):
        return torch.nn.functional.linear(x, w, bias)
    c = w.dtype
    return torch.nn.functional.linear(x.to(c), dequantize_4bit(w), None if bias is None else bias.to(c)).to(x.dtype)


def base_product(x: Tensor, w, bias: Tensor | None = None) -> Tensor:
    """x·Wᵀ (+ b), [N, O] in x's dtype."""
    if not is_quantized(w):
        return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    c = w.dtype
    wd = dequantize_4bit(w)
    xc = x.to(c)
    out = torch.mm(xc, wd.t()) if bias is None else torch.addmm(bias.to(c), xc, wd.t())
    return out.to(x.dtype)


def base_product_into(y: Tensor, x: Tensor, w) -> Tensor:
    """y += x·Wᵀ in place (y [N, O])."""
    if not is_quantized(w):
        return y.addmm_(x, w.t())
    wd = dequantize_4bit(w)
    if w.dtype == x.dtype == y.dtype:
        return y.addmm_(x, wd.t())
    return y.add_(torch.mm(x.to(w.dtype), wd.t()))


def base_grad(dy: Tensor, w) -> Tensor:
    """dY·W, [N, K] in dY's dtype."""
    if not is_quantized(w):
        return torch.mm(dy, w.to(dy.dtype))
    return torch.mm(dy.to(w.dtype), dequantize_4bit(w)).to(dy.dtype)


def base_grad_into(dx: Tensor, dy: Tensor, w) -> Tensor:
    """dX += dY·W in place."""
    if not is_quantized(w):
        return dx.addmm_(dy, w.to(dx.dtype))
    wd = dequantize_4bit(w)
    if w.dtype == dy.dtype == dx.dtype:
        return dx.addmm_(dy, wd)
    return dx.add_(torch.mm(dy.to(w.dtype), wd))


# ------------------------------------------------------------------------------------------------
# In an op's schema (kernels/_common.py: tensors and ints, no objects) a projection's weight is a
# run of tensors, one for a dense W and 3 (6 when nested) for a 4-bit one, and META_FIELDS ints.
# ------------------------------------------------------------------------------------------------
META_FIELDS = 7  # kind (0 dense, 1 4-bit), out, in, blocksize, quant type, nested blocksize (0: not nested), dtype


def flatten_weight(w) -> tuple[list[Tensor], list[int]]:
    if not is_quantized(w):
        return [w], [0] * META_FIELDS
    extra = [w.nested_absmax, w.nested_code, w.offset] if w.nested else []
    meta = [1, w.shape[0], w.shape[1], w.blocksize, QUANT_TYPES.index(w.quant_type),
            w.nested_blocksize if w.nested else 0, COMPUTE_DTYPES.index(w.dtype)]
    return [w.data, w.absmax, w.code, *extra], meta


def unflatten_weight(tensors: list[Tensor], start: int, meta: list[int]):
    """(the weight whose tensors begin at tensors[start], how many tensors it took)."""
    kind, out, inp, blocksize, quant_type, nested_blocksize, dtype = meta
    if kind == 0:
        return tensors[start], 1
    n = 6 if nested_blocksize else 3
    data, absmax, code, *nested = tensors[start: start + n]
    return Quant4bit(data, absmax, code, (out, inp), blocksize, QUANT_TYPES[quant_type], COMPUTE_DTYPES[dtype],
                     *nested, nested_blocksize=nested_blocksize or 256), n
