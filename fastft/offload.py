"""Offloaded activation checkpointing: each checkpointed block's input waits in host memory.

With activation checkpointing a decoder block keeps only its input for the backward, where it
recomputes its forward; at long rows those inputs are what is left on the GPU: n_layers x tokens
x hidden x 2 bytes (32 GiB for Llama-3.1-8B at 128k tokens). `distributed.activation_checkpointing
= "offload"` moves them to pinned host memory:

  forward    torch.utils.checkpoint (non-reentrant) saves the block's positional inputs with
             `_make_saved_tensor`, i.e. through the saved-tensor hooks active around the call
             (checkpoint's own hooks only cover what runs inside the block). `BlockOffload.pack`
             is that hook: it copies the tensor into pinned host memory on a side stream, after
             the side stream has waited for the compute stream, and `record_stream` keeps the
             GPU block from being reused until the copy has run; the compute stream never waits.
  backward   when the gradient reaches block i's output (a tensor hook, i.e. just before block
             i recomputes), the inputs of block i - 1 start coming back on the side stream, so
             they travel while block i recomputes and runs its backward. `unpack` (block i's
             recomputation asking for its input) makes the compute stream wait for that copy's
             event; the last block, which nothing precedes, fetches on demand.

The copies are exact, so losses and gradients are bit-identical to plain checkpointing (tested
on the CPU, where the host copy is an ordinary CPU tensor and there are no streams).
torch.autograd.graph.save_on_cpu(pin_memory=True) is the simple version of the same idea: its
copies run on the compute stream (the forward waits for each device-to-host copy, the
recomputation for each host-to-device copy), which is the overlap this module adds.
Under FakeTensorMode (fastft.plan) a fake tensor has no data: the host copy is its metadata only,
and the device copy is allocated when it is brought back, which is what the GPU holds.
Keyword arguments (position embeddings, masks: the same tensors for every block) stay where they
are; checkpoint keeps them by reference, not through the hooks.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.checkpoint import checkpoint


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)


class _Offloaded:
    """One saved input: its host copy (or, when fake, its metadata) and, while it is being
    brought back, the device copy and the event that marks it ready."""

    __slots__ = ("shape", "stride", "dtype", "device", "host", "ready", "on_device", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.shape, self.stride, self.dtype, self.device = tensor.shape, tensor.stride(), tensor.dtype, tensor.device
        self.host = self.ready = self.on_device = None


class BlockOffload:
    """The saved-tensor hooks and prefetch of one model's offloaded blocks (one per model)."""

    def __init__(self):
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.packed: dict[int, weakref.WeakSet] = {}  # block index -> its inputs of the current graph
        self.bytes_offloaded = 0  # total copied to the host (a counter, for tests and logs)
        self.bytes_prefetched = 0

    # -- hooks ---------------------------------------------------------------------------------
    def pack(self, index: int, tensor: torch.Tensor):
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return tensor
        handle = _Offloaded(tensor)
        self.packed.setdefault(index, weakref.WeakSet()).add(handle)
        if _is_fake(tensor):  # fastft.plan: the host copy costs no device memory
            return handle
        cuda = tensor.is_cuda and self.stream is not None
        handle.host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=cuda)
        if cuda:
            self.stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(self.stream):
                handle.host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)  # its GPU memory is not reused before the copy ran
        else:
            handle.host.copy_(tensor)
        self.bytes_offloaded += tensor.numel() * tensor.element_size()
        return handle

    def unpack(self, handle):
        if not isinstance(handle, _Offloaded):
            return handle
        if handle.on_device is None:
            self._bring_back(handle)
        tensor, handle.on_device = handle.on_device, None
        if handle.ready is not None:
            torch.cuda.current_stream(tensor.device).wait_event(handle.ready)
            handle.ready = None
        return tensor

    def prefetch(self, index: int) -> None:
        """Start bringing block `index`'s inputs back (called as block index + 1 starts its backward)."""
        for handle in list(self.packed.get(index, ())):
            if handle.on_device is None:
                self._bring_back(handle)
                self.bytes_prefetched += handle.on_device.numel() * handle.on_device.element_size()

    def _bring_back(self, handle: _Offloaded) -> None:
        if handle.host is None:  # fake: allocate what the copy would fill
            handle.on_device = torch.empty_strided(handle.shape, handle.stride, dtype=handle.dtype,
                                                   device=handle.device)
            return
        device = torch.empty(handle.shape, dtype=handle.dtype, device=handle.device)
        if device.is_cuda and self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(device.device))  # `device` may be reused memory
            with torch.cuda.stream(self.stream):
                device.copy_(handle.host, non_blocking=True)
                handle.ready = torch.cuda.Event()
                handle.ready.record(self.stream)
        else:
            device.copy_(handle.host)
        handle.on_device = device

    # -- the block's forward ---------------------------------------------------------------------
    def wrap(self, index: int, original):
        """`original` (a block's forward) checkpointed, its saved inputs offloaded."""

        from fastft.attention import in_this_forward

        def forward(*args, **kwargs):
            # The recomputation runs in this forward's attention state: its input comes back from
            # the host as a new tensor, which the blocks' memory of inputs (attention.py) cannot
            # recognise; without the state, packed rows would recompute on another attention path.
            with torch.autograd.graph.saved_tensors_hooks(lambda t: self.pack(index, t), self.unpack):
                out = checkpoint(in_this_forward(original), *args, use_reentrant=False, **kwargs)
            first = out if isinstance(out, torch.Tensor) else next(
                (o for o in (out if isinstance(out, (tuple, list)) else ()) if isinstance(o, torch.Tensor)), None)
            if index > 0 and first is not None and first.requires_grad:
                first.register_hook(lambda grad: self.prefetch(index - 1))
            return out

        return forward
