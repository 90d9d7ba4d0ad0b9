"""Probes never change a model: `preserved(model)` puts back every parameter, buffer and plain
attribute a probe forward could have touched.

Why it is needed: a forward may write to its own module. Baichuan 2's NormHead replaces its
weight's data by the row-normalised weight on its first eval-mode call (and flips a flag so that
later eval calls skip the normalisation); the loss probe is such a call. Rotary caches and
buffers get reassigned; `.training` flags are flipped by the probes themselves.

How: before the probe, each module's parameter and buffer dictionaries, the `.data` of every
tensor in them (an alias: replacing `.data` leaves it pointing at the old storage) and its
version counter, and the module's plain attributes (bool/int/float/str/None: flags, counters);
after the probe, all of them are restored. A tensor written in place (its version counter moved,
storage unchanged) is restored from a clone, which is taken beforehand when the model's tensors
fit in CLONE_LIMIT bytes; for a bigger model an in-place write raises, naming the tensor, rather
than leaving it changed silently.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

CLONE_LIMIT = 1 << 30  # bytes of parameters + buffers up to which a probe works against clones
_PLAIN = (bool, int, float, str, type(None))


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
        tensors = [(name, t, t.data, t._version, t.detach().clone() if clone and not t.is_meta else None)
                   for name, t in _tensors(module)]
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
            for name, t, data, version, copy in tensors:
                if t.data.data_ptr() != data.data_ptr() or t.shape != data.shape or t.dtype != data.dtype:
                    with torch.no_grad():
                        t.data = data
                if t._version != version and not t.is_meta:
                    if copy is not None:
                        with torch.no_grad():
                            t.data.copy_(copy)
                    else:
                        unrestorable.append(f"{type(module).__name__}.{name}")
            module.__dict__.update(plain)
        if unrestorable:
            raise RuntimeError(f"fastft: a probe forward wrote into {unrestorable} in place, in a model too big to "
                               f"probe against clones (> {CLONE_LIMIT} bytes); patch with attention=False and "
                               "cross_entropy=False to skip the probes")
