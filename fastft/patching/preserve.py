"""Probes never change a model: `preserved(model)` puts back every parameter, buffer and plain
attribute a probe forward could have touched.

Why it is needed: a forward may write to its own module. Baichuan 2's NormHead replaces its
weight's data by the row-normalised weight on its first eval-mode call (and flips a flag so that
later eval calls skip the normalisation); the loss probe is such a call. Rotary caches and
buffers get reassigned; `.training` flags are flipped by the probes themselves; bitsandbytes'
Linear4bit repacks its NF4 weight and QuantState for the CPU on an eval-mode no-grad call (after
which, in bitsandbytes 0.50, its backward is wrong).

How: before the probe, each module's parameter and buffer dictionaries, the `.data` of every
tensor in them (an alias: replacing `.data` leaves it pointing at the old storage) and its
version counter, the tensor's own Python attributes (copied), and the module's plain attributes
(bool/int/float/str/None: flags, counters); after the probe, all of them are restored, and plain
attributes the probe added are removed. A tensor written in place (its version counter moved,
storage unchanged) is restored from a clone, which is taken beforehand when the model's tensors
fit in CLONE_LIMIT bytes; for a bigger model an in-place write raises, naming the tensor, rather
than leaving it changed silently.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

CLONE_LIMIT = 1 << 30  # bytes of parameters + buffers up to which a probe works against clones
_PLAIN = (bool, int, float, str, type(None))


def _attributes(t: torch.Tensor) -> dict | None:
    """A tensor's own Python attributes, their objects copied (bitsandbytes' Params4bit keeps its
    QuantState there, and its CPU inference path repacks weight and state in place); the module a
    parameter points back to is kept by reference."""
    if not t.__dict__:
        return None
    return {k: v if isinstance(v, (nn.Module, torch.Tensor)) else copy.deepcopy(v) for k, v in t.__dict__.items()}


def _tensors(module: nn.Module):
    yield from ((n, t) for n, t in module._parameters.items() if t is not None)
    yield from ((n, t) for n, t in module._buffers.items() if t is not None)


@contextlib.contextmanager
def preserved(model: nn.Module):
    modules = list(model.modules())
    total = sum(t.numel() * t.element_size() for m in modules for _, t in _tensors(m) if not t.is_meta)
    clone = total <= CLONE_LIMIT
    saved = []
    for module in modules:
        tensors = [(name, t, t.data, t._version, t.detach().clone() if clone and not t.is_meta else None,
                    _attributes(t)) for name, t in _tensors(module)]
        plain = {k: v for k, v in module.__dict__.items() if isinstance(v, _PLAIN)}
        saved.append((module, dict(module._parameters), dict(module._buffers), tensors, plain))
    try:
        yield
    finally:
        unrestorable = []
        for module, parameters, buffers, tensors, plain in saved:
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
            for name, t, data, version, clone_, attributes in tensors:
                if t.data.data_ptr() != data.data_ptr() or t.shape != data.shape or t.dtype != data.dtype:
                    with torch.no_grad():
                        t.data = data
                if t._version != version and not t.is_meta:
                    if clone_ is not None:
                        with torch.no_grad():
                            t.data.copy_(clone_)
                    else:
                        unrestorable.append(f"{type(module).__name__}.{name}")
                if attributes is not None:
                    t.__dict__.clear()
                    t.__dict__.update(attributes)
            for key in [k for k, v in module.__dict__.items() if isinstance(v, _PLAIN) and k not in plain]:
                del module.__dict__[key]  # a flag the probe added
            module.__dict__.update(plain)
        if unrestorable:
            raise RuntimeError(f"fastft: a probe forward wrote into {unrestorable} in place, in a model too big to "
                               f"probe against clones (> {CLONE_LIMIT} bytes); patch with attention=False and "
                               "cross_entropy=False to skip the probes")
