"""What an op holds inside beyond its outputs (its workspace), for the plan's peak.

torch's memory trackers see each op's outputs, not what the op allocates and frees before it
returns; under FakeTensorMode a fused custom op runs its fake implementation, which makes the
outputs only. Inside the fused ops that is large: the fused loss's chunk of logits (up to 1 GiB),
the LoRA MLP's [tokens, intermediate] temporaries, a 4-bit weight dequantized for its GEMM (QLoRA:
kernels/dequantize_4bit.py, W [O, K] in the compute dtype with its fp32 block scales, freed
after the GEMM, again in the backward for dX). So for each call of one of fastft's ops the plan
runs the op's own host code (kernels._common.HOST_CODE) once more, on meta tensors shaped like
the call's, its Triton launches recorded and dropped (recording_launches, keep=False: tensors die
where the host code drops them, as on the GPU), under torch's MemTracker: the workspace is the
peak of that run less its inputs and outputs, the bytes the GPU's allocator also holds there
(launch choices as for an H100: CAPABILITY). It is measured once per op and shape (cached).

bitsandbytes' 4-bit GEMM (Linear4bit's forward, unpatched) runs CUDA host code that cannot run
on meta tensors: its workspace is its dequantization, from fastft.quantization.gemm_4bit_workspace.
An op whose host code fails on meta tensors counts no workspace and is named in UNMEASURED.
"""

from __future__ import annotations

import functools

import torch
from torch.utils import _pytree as pytree

CAPABILITY, SM_COUNT = (9, 0), 132  # an H100 SXM: what the host code chooses launches for
_MEASURED: dict[tuple, int] = {}
UNMEASURED: dict[str, str] = {}  # op name -> why its workspace is not counted


def op_workspace(func, args: tuple, kwargs: dict) -> int:
    """Bytes one call of `func` (an OpOverload) holds inside beyond its outputs, on the GPU."""
    from fastft import quantization
    from fastft.kernels import _common

    schema = getattr(func, "_schema", None)
    host = _common.HOST_CODE.get(getattr(schema, "name", None))
    if host is None:
        return quantization.gemm_4bit_workspace(func, args, kwargs)
    key = (schema.name, _signature(args), _signature(kwargs))
    if key not in _MEASURED:
        try:
            _MEASURED[key] = measure(host, schema, args, kwargs)
        except Exception as exc:  # counted as 0, and said so
            UNMEASURED[schema.name] = f"{type(exc).__name__}: {str(exc)[:160]}"
            _MEASURED[key] = 0
    return _MEASURED[key]


def measure(host, schema, args: tuple, kwargs: dict) -> int:
    """Run `host` (an op's implementation) on meta copies of the call's tensors (seeds: host
    tensors of zeros, which the host code reads) with launches dropped, under MemTracker: its peak
    less the inputs and the outputs."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed._tools.mem_tracker import MemTracker

    from fastft.kernels._common import recording_launches

    names = [a.name for a in schema.arguments]
    with unset_fake_temporarily():
        margs = [_on_meta(a, n) for a, n in zip(args, names)]
        mkwargs = {k: _on_meta(v, k) for k, v in kwargs.items()}
        inputs = [t for t in pytree.tree_leaves((margs, mkwargs)) if isinstance(t, torch.Tensor)]
        tracker = MemTracker()
        tracker.track_external(*inputs)
        with recording_launches(CAPABILITY, SM_COUNT, keep=False), tracker:
            before = _total(tracker.get_tracker_snapshot())
            out = host(*margs, **mkwargs)
            peak = _total(tracker.get_tracker_snapshot("peak"))
        seen = {id(t.untyped_storage()) for t in inputs}
        outputs = {}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in seen:
                outputs[id(t.untyped_storage())] = t.untyped_storage().nbytes()
    return max(0, peak - before - sum(outputs.values()))


def _on_meta(value, name: str):
    host = name.startswith("seed")  # dropout seeds: read on the host (tolist), never on the device
    return pytree.tree_map_only(torch.Tensor, functools.partial(_meta_copy, host=host), value)


def _meta_copy(t: torch.Tensor, host: bool) -> torch.Tensor:
    if host:
        return torch.zeros(t.shape, dtype=t.dtype)
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _signature(value) -> tuple:
    leaves, spec = pytree.tree_flatten(value)
    return (str(spec), tuple((tuple(x.shape), tuple(x.stride()), x.dtype) if isinstance(x, torch.Tensor) else repr(x)
                             for x in leaves))


def _total(snapshot: dict) -> int:
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    return sum(dev.get(_TOTAL_KEY, 0) for dev in snapshot.values())
