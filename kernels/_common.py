"""Helpers shared by the kernel files: when to launch Triton, launch geometry, and the custom-op
pattern every fused op follows.

Nothing here knows about models; kernels/ depends on torch and triton only.

The custom-op pattern (`kernel_op`, `register_autograd`)
------------------------------------------------------
Every fused op is a `torch.library.custom_op` in the "fastft" namespace, so that torch.compile
(dynamo + AOTAutograd), FakeTensorMode and the meta device see one opaque operator with a known
output shape instead of tracing into host code and Triton launches:

    @kernel_op("rms_norm_fwd", fake=_rms_norm_fwd_fake)      # torch.ops.fastft.rms_norm_fwd
    def _rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, ...) -> tuple[Tensor, Tensor]:
        ...launch the Triton kernel...
    register_autograd(_rms_norm_fwd, backward=_rms_norm_bwd_rule, save=_rms_norm_save)

- The forward op returns everything the backward needs beyond the inputs (rstd, u, the
  pre-activations, or gradients made in the forward) as extra outputs: `setup_context` only sees
  inputs and outputs. The public functional API returns the user's output and drops the rest.
- The backward rule calls a second custom op (`<op>_bwd`) that launches the backward kernels, so
  that AOTAutograd traces the backward graph as well without looking inside it.
- Outputs are fresh tensors, never views of inputs (custom ops may not alias; see `as_rows` for
  why the ops return [rows, ...] and the functional API restores the caller's shape).
- A gradient an op does not compute comes back as an empty tensor (`absent()`), since a schema
  cannot return `Tensor?`; the backward rule, which asked for it or not, returns None instead.
- `fake=` gives the shape, dtype and device of every output from the inputs' metadata alone: what
  FakeTensorMode, the meta device and torch.compile use instead of running the op.
- Device types are cpu (Triton's interpreter) and cuda; the functional API decides before the
  op whether Triton runs at all (`use_triton`), and uses the torch reference when it does not.
Eager cost (measured on the CPU, torch 2.14): about 15 us of dispatch per op call, against 4 us
for a bare autograd.Function: small beside a GPU kernel launch queue, and the price of one code
path that compiles, fakes and runs eagerly.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

NAMESPACE = "fastft"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Run the fused custom op for these tensors, or fall back to the torch reference?

    On CUDA the kernel compiles; on the CPU it runs only under the interpreter (the test suite
    sets TRITON_INTERPRET=1). On the meta device the op runs its fake implementation, so that a
    meta (or FakeTensorMode) forward and backward allocates what the kernels would. Anywhere else
    the functional API uses the reference so that a patched model still runs, slower, on a CPU.
    """
    devices = {t.device.type for t in tensors if t is not None}
    if devices == {"cuda"} or devices == {"meta"}:
        return True
    return devices == {"cpu"} and (interpreting() or _AS_ON_GPU.get())


# fastft.plan (fastft/planning/) runs a model on fake CPU tensors under FakeTensorMode to plan what
# a GPU holds: inside `as_on_gpu()` CPU tensors take the custom ops (their fake implementations
# there) as CUDA tensors would, not the torch references, whose temporaries a GPU never allocates
# (and fastft/attention.py dispatches as on CUDA). Outside FakeTensorMode it would launch Triton
# on the CPU: for the planner only.
_AS_ON_GPU = contextvars.ContextVar("fastft_as_on_gpu", default=False)


def planning_as_on_gpu() -> bool:
    return _AS_ON_GPU.get()


@contextlib.contextmanager
def as_on_gpu():
    token = _AS_ON_GPU.set(True)
    try:
        yield
    finally:
        _AS_ON_GPU.reset(token)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when autocast is on for this device type, else None (the meta device
    has no autocast at all: asking torch.is_autocast_enabled("meta") raises)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def kernel_op(name: str, *, fake: Callable, mutates_args: tuple[str, ...] = ()) -> Callable:
    """Decorator: register fn as the custom op torch.ops.fastft.<name> (see the module docstring),
    for the cpu (interpreter) and cuda devices, with `fake` as its fake / meta implementation."""

    def register(fn: Callable):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=mutates_args,
                                     device_types=("cpu", "cuda"))
        op.register_fake(fake)
        HOST_CODE[f"{NAMESPACE}::{name}"] = fn
        return op

    return register


# Each op's implementation (its host code: torch ops and launches) by name ("fastft::lora_mlp"). A
# memory tracker sees an op's outputs only; fastft.plan runs this on meta tensors, its launches
# recorded (recording_launches, keep=False), to see what the op allocates and frees inside.
HOST_CODE: dict[str, Callable] = {}


def register_autograd(op, *, backward: Callable, save: Callable) -> None:
    """Make `op` differentiable: save(ctx, inputs, output) keeps what backward(ctx, *grads) needs.

    Gradients of outputs nobody used arrive as None (not materialised zeros): the extra outputs
    that only carry saved state cost nothing in the backward.
    """

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        save(ctx, inputs, output)

    op.register_autograd(backward, setup_context=setup_context)


def absent(like: torch.Tensor) -> torch.Tensor:
    """The empty tensor an op returns for an output it did not compute (a schema has no `Tensor?`)."""
    return like.new_empty(0)



# Read once at import: TRITON_INTERPRET must be set before triton is imported anyway.
INTERPRETER: tl.constexpr = tl.constexpr(interpreting())


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """x.to(DTYPE), rounding to nearest even as the GPU does.

    The interpreter (triton 3.9) truncates fp32 -> bf16 conversions toward zero, which would put
    a one-sided bias of up to 1 ulp into every bf16 output. Under the interpreter, round the fp32
    bits to the nearest even bf16 first (add 0x7FFF plus the lowest kept bit, clear the low 16
    bits: the standard bit trick; inf and NaN survive it), after which truncation is exact. On
    the GPU the branch is compiled away.
    """
    if INTERPRETER:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


# ------------------------------------------------------------------------------------------------
# Launch choices. Every block size, warp count and constexpr is a pure function of the target's
# compute capability (None: the interpreter), the shapes and the dtypes, and every launch goes
# through `launch`, so that benchmarks/compile_report.py can run the host code on meta tensors
# for a chosen capability, collect exactly the launches a GPU would make, and compile them for
# sm_80/sm_90/sm_100 on a machine without a GPU.
# ------------------------------------------------------------------------------------------------
class Launch(NamedTuple):
    """One kernel launch as the host code makes it: kernel[grid](*args, **meta)."""
    kernel: object
    grid: tuple
    args: tuple
    meta: dict


class _Target(NamedTuple):
    capability: tuple[int, int]
    sm_count: int
    launches: list
    run: bool = False


_RECORDING: contextvars.ContextVar[_Target | None] = contextvars.ContextVar("fastft_recording", default=None)


class _Dropped(list):
    def append(self, item) -> None:  # nothing kept: tensors die where the host code drops them
        pass


@contextlib.contextmanager
def recording_launches(capability: tuple[int, int], sm_count: int, keep: bool = True, run: bool = False):
    """Within this block the host code chooses for `capability` (and `sm_count` SMs) and records
    its launches in the yielded list instead of running them: call the launchers on meta tensors.
    keep=False: skip the launches without keeping them (nor their tensors: memory planning).
    run=True also launches them: under the interpreter, how a test runs a GPU's launch choices."""
    token = _RECORDING.set(_Target(tuple(capability), sm_count, [] if keep else _Dropped(), run))
    try:
        yield _RECORDING.get().launches
    finally:
        _RECORDING.reset(token)


def launch(kernel, grid: tuple, *args, **meta) -> None:
    recording = _RECORDING.get()
    if recording is not None:
        recording.launches.append(Launch(kernel, tuple(grid), args, meta))
        if not recording.run:
            return
    kernel[grid](*args, **meta)


@functools.lru_cache(maxsize=None)
def _device_properties(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def capability_of(device: torch.device) -> tuple[int, int] | None:
    """The compute capability to choose launches for: the GPU's, None under the interpreter."""
    recording = _RECORDING.get()
    if recording is not None:
        return recording.capability
    if device.type == "cuda":
        return _device_properties(device.index if device.index is not None else torch.cuda.current_device())[0]
    return None


def fp32_dot(capability: tuple[int, int] | None, *tensors: torch.Tensor) -> bool:
    """Whether a kernel's tl.dot takes fp32 operands (FP32_DOT, with input_precision="ieee": exact
    products, no tf32): always under the interpreter (capability None; its bf16 dot is wrong), and
    on a GPU for fp32 or mixed-dtype operands. One rule for every kernel file."""
    dtypes = {t.dtype for t in tensors}
    return capability is None or len(dtypes) > 1 or torch.float32 in dtypes or torch.float64 in dtypes


@triton.jit
def dot(acc, a, b, FP32_DOT: tl.constexpr):
    """acc + a·b: in fp32 ("ieee") under FP32_DOT (fp32_dot), else the tensor cores' dot
    accumulating into acc."""
    if FP32_DOT:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, acc)


def persistent_programs(device: torch.device, n_rows: int, per_sm: int = 4) -> int:
    """Programs for a grid-stride loop over rows: enough to fill the GPU, and no more.

    Under the interpreter each program costs Python time, so a few suffice.
    """
    recording = _RECORDING.get()
    if recording is not None:
        return max(1, min(n_rows, per_sm * recording.sm_count))
    if device.type == "cuda":
        sms = _device_properties(device.index if device.index is not None else torch.cuda.current_device())[1]
        return max(1, min(n_rows, per_sm * sms))
    return max(1, min(n_rows, 4))


def row_block(capability: tuple[int, int] | None, n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that holds one whole row of n_cols in registers.

    Eight elements per thread keeps loads 16 bytes wide for bf16 and registers in check up to
    hidden size 32768 (32 warps x 32 threads x 32 elements).
    """
    block = triton.next_power_of_2(n_cols)
    num_warps = min(32, max(1, block // 256))
    return block, num_warps


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View x as [rows, last dim] with unit stride along the last dim (copies only if it must).

    The ops' autograd Functions take x as given, work on these rows and return fresh [rows, ...]
    outputs; the functional APIs restore the caller's leading shape outside the Function. A view
    returned from inside a custom Function may not be modified in place by the caller (autograd
    refuses it, since its view+inplace handling would bypass the custom backward), and models do
    write into projection outputs in place (Falcon's attention does).
    """
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_row_op_inputs(op: str, x: torch.Tensor, **params: torch.Tensor | None) -> None:
    """Errors for a row-wise op (a norm): x's dtype, and every per-column parameter 1-D of x's last size."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: unsupported dtype {x.dtype}; use float32, bfloat16 or float16")
    hidden = x.shape[-1]
    for name, t in params.items():
        if t is not None and (t.dim() != 1 or t.shape[0] != hidden):
            raise ValueError(f"{op}: {name} shape {tuple(t.shape)} does not match the last dimension of x "
                             f"{tuple(x.shape)}; pass a 1-D {name} of size {hidden}")


def sum_partials(partial: torch.Tensor | None, n_rows: int, like: torch.Tensor) -> torch.Tensor | None:
    """Reduce a [programs, H] fp32 partial (per-program sums of a parameter's gradient) to like's dtype."""
    if partial is None:
        return None
    return partial.sum(0).to(like.dtype) if n_rows > 0 else torch.zeros_like(like)
