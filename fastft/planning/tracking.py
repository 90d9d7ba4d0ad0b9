"""torch's memory trackers, extended for planning: the place of the peak, per-module peaks in
O(depth), frozen parameters, keyword inputs (fastft/planning/__init__.py explains the plan)."""

from __future__ import annotations

import weakref
from copy import deepcopy

import torch

from fastft.planning.workspace import UNMEASURED, op_workspace


# -- torch's trackers, with the peak located ----------------------------------------------------

def trackers():
    """(Tracker, FSDPTracker): torch's MemTracker and FSDPMemTracker with the peak located (the
    classes are made on first use: torch's private tracker modules load only when a plan runs)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch._guards import active_fake_mode
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType, _ModState
    from torch.utils import _pytree as pytree

    KwargsModTracker = kwargs_mod_tracker()

    class _Located:
        """Records where each new peak happens; updates the running modules' peaks in O(depth).

        torch's _update_peak_stats walks every module tracked so far after every op (O(ops x
        modules): minutes for an 8B model); the modules it updates are those in ModTracker's
        `parents`, which this looks up by name instead. `host` names categories that live in
        host memory (FSDP2 CPU offload): the device peak excludes them."""

        host: frozenset = frozenset()

        def _locate_init(self):
            self.where, self.phase_peaks, self.device_peak = ("", ""), {}, 0
            self._by_fqn, self._indexed = {}, -1
            self.marks: dict[str, dict] = {}
            self.unmeasured: set[str] = set()  # ops run whose workspace could not be measured
            self._deferred, self._pending = None, None  # a gradient sum's held peak updates (_is_accumulation)

        def track_buffers(self, tensors) -> None:
            """Tensors held with the model that are neither parameters nor buffers (the 4-bit layers'
            quantization states), counted as buffers: whole on every rank, never trained."""
            for t in tensors:
                self._update_and_maybe_create_winfos(t, self._ref_class.BUFFER)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self._settle_accumulation()
            summing = self._is_accumulation(func, args, kwargs)
            if summing:
                self._deferred = []
            try:
                out = super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                deferred, self._deferred = self._deferred, None
            if summing and deferred:
                self._pending = (weakref.ref(args[0].untyped_storage()), deferred)
            if out is not NotImplemented and active_fake_mode() is self._fake_mode_on_entry:
                nbytes = op_workspace(func, args, kwargs or {})
                if nbytes:
                    self._count_workspace(nbytes, next(t.device for t in pytree.tree_leaves((args, kwargs))
                                                       if isinstance(t, torch.Tensor)))
                elif UNMEASURED and getattr(getattr(func, "_schema", None), "name", None) in UNMEASURED:
                    self.unmeasured.add(func._schema.name)
            return out

        def _count_workspace(self, nbytes: int, device) -> None:
            """An op's workspace (workspace.py): alive with its outputs before it returns, a peak
            candidate of its own, gone after."""
            snap = self._curr_mem_snap.setdefault(device, dict.fromkeys(self._ref_class, 0))
            snap[WORKSPACE] = nbytes
            snap[_TOTAL_KEY] = snap.get(_TOTAL_KEY, 0) + nbytes
            self._update_peak_stats(_ModState.PEAK_BW if self._mod_tracker.is_bw else _ModState.PEAK_FW)
            snap[_TOTAL_KEY] -= nbytes
            del snap[WORKSPACE]

        # The autograd engine sums the gradients a tensor gets from two uses (a tied embedding and
        # lm_head, a residual join) into the first one in place (old_var.add_(var)) when that one
        # is dense and the engine holds its last reference (torch/csrc/autograd/input_buffer.cpp,
        # accumulate), but out of place (old_var + var) when either is a tensor subclass or a
        # dispatch mode is active: always, under this tracker and FakeTensorMode. Traced, that sum
        # holds one gradient more than the GPU does for the instant of the add (for a tied
        # embedding, a [vocab, hidden] fp32 buffer). So a backward add.Tensor of two same-shaped
        # tensors, the first dense and not a view (a view's base holds its storage too: the engine
        # sums out of place), with grad mode off, has its peak update held back until the next op:
        # if by then the first has died, as the engine's in-place sum leaves it, the held update is
        # dropped (the memory just before, both operands alive, was counted then); else it is
        # applied as it was. A C++ backward formula's own out-of-place sum whose first operand dies
        # with it passes the same test: its instant extra is not counted.
        def _is_accumulation(self, func, args, kwargs) -> bool:
            return (func is torch.ops.aten.add.Tensor and not kwargs and len(args) == 2 and self._mod_tracker.is_bw
                    and not torch.is_grad_enabled() and all(isinstance(t, torch.Tensor) for t in args)
                    and args[0].shape == args[1].shape and args[0].dtype == args[1].dtype
                    and _dense(args[0]) and not args[0]._is_view())

        def _settle_accumulation(self) -> None:
            if self._pending is None:
                return
            (first, deferred), self._pending = self._pending, None
            if first() is not None:  # alive: the engine's sum was out of place too
                for update in deferred:
                    self._record_peak(*update)

        def __exit__(self, *args):
            self._settle_accumulation()
            return super().__exit__(*args)

        def mark(self, name: str) -> None:
            """Keep the current snapshot under `name` (the step's milestones)."""
            self.marks[name] = self.get_tracker_snapshot("current")

        def _phase(self) -> str:
            return "optimizer" if self._in_opt else "backward" if self._mod_tracker.is_bw else "forward"

        def _update_peak_stats(self, peak_state) -> None:
            if self._deferred is not None:  # inside a gradient sum: held back (_is_accumulation), as it is now
                self._deferred.append((peak_state, set(self._mod_tracker.parents), self._phase(),
                                       deepcopy(self._curr_mem_snap)))
                return
            self._settle_accumulation()
            self._record_peak(peak_state, self._mod_tracker.parents, self._phase(), self._curr_mem_snap)

        def _record_peak(self, peak_state, parents, phase, snapshot) -> None:
            if len(self.memory_tracking) != self._indexed:  # a module ran for the first time
                self._by_fqn = {s.mod_fqn: s for s in self.memory_tracking.values()}
                self._indexed = len(self.memory_tracking)
            for dev, snap in snapshot.items():
                total = snap[_TOTAL_KEY]
                for fqn in parents:
                    stats = self._by_fqn.get(fqn)
                    if stats is not None and peak_state in stats.snapshots and stats.local_peak.get(dev, 0) < total:
                        stats.local_peak[dev] = total
                        stats.snapshots[peak_state][-1][dev] = deepcopy(snap)
                on_device = total - sum(v for k, v in snap.items() if k in self.host)
                self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), on_device)
                if on_device > self.device_peak:
                    self.device_peak = on_device
                    self._peak_mem[dev] = total
                    self._peak_mem_snap[dev] = deepcopy(snap)
                    self.where = (module_name(max(parents - {"Global"}, key=len, default="")), phase)

    class Tracker(_Located, MemTracker):
        def __init__(self, model):
            super().__init__()
            self._locate_init()
            self._mod_tracker = KwargsModTracker(model)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # torch's version registers a gradient hook on every parameter, which raises for a
            # frozen one (a LoRA base): hook only those that train.
            memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for p in module.parameters():
                    if p.requires_grad and self._param_to_grad_hook_handles.get(p, None) is None:
                        self._param_to_grad_hook_handles[p] = (
                            p.register_hook(self._on_grad),
                            p.register_post_accumulate_grad_hook(lambda q: self._on_grad(q.grad)))
            return memory

        def _on_grad(self, grad) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    class FSDPTracker(_Located, FSDPMemTracker):
        def __init__(self, model, optimizer, host=()):
            super().__init__(model, optimizer)
            self._locate_init()
            self._mod_tracker = KwargsModTracker(model)
            self.host = frozenset(host)

    return Tracker, FSDPTracker


WORKSPACE = "Workspace"  # a snapshot's key for an op's workspace while it is counted


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (contiguous up to a permutation of its dimensions)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def kwargs_mod_tracker():
    """The KwargsModTracker class (torch's ModTracker, also seeing keyword inputs)."""
    from torch.distributed._tools.mod_tracker import ModTracker

    class KwargsModTracker(ModTracker):
        """torch's ModTracker, also seeing keyword inputs. It learns that a module's backward has
        ended from a gradient hook on the module's positional tensor inputs; transformers calls
        its attention and decoder layers with keywords only (self_attn(hidden_states=...)), so
        those would stay "running" until the whole backward ends, and every later backward op
        would be attributed to them. Here the model's modules get the same bookkeeping from a
        per-module pre-hook that sees keywords (nn.Module's global hooks do not)."""

        def __init__(self, model):
            super().__init__()
            self._model, self._own, self._handles = model, set(), []

        def __enter__(self):
            super().__enter__()
            self._get_mod_name(self._model)  # every module's name known before any hook asks (FSDPMemTracker's do)
            for module in self._model.modules():
                self._own.add(id(module))
                # prepended: it runs first, where the global hook it replaces would
                self._handles.append(module.register_forward_pre_hook(self._kwargs_pre_hook, with_kwargs=True,
                                                                      prepend=True))
            return self

        def __exit__(self, *args):
            for handle in self._handles:
                handle.remove()
            self._handles, self._own = [], set()
            super().__exit__(*args)

        def _fw_pre_hook(self, mod, input):
            if id(mod) not in self._own:
                super()._fw_pre_hook(mod, input)

        def _kwargs_pre_hook(self, mod, args, kwargs):
            super()._fw_pre_hook(mod, (args, kwargs))

    return KwargsModTracker


# Tracker categories -> the plan's.
_CATEGORY = {
    "Parameter": "parameters", "Sharded Param": "parameters", "Unsharded Param": "gathered parameters",
    "All Gather": "gathered parameters", "Buffer": "buffers", "Gradient": "gradients",
    "Sharded Grad": "gradients", "Unsharded Grad": "gradient buffers", "Reduce Scatter": "gradient buffers",
    "Activation": "activations", "Temp": "temporaries", "Optstate": "optimizer states",
    "OptState": "optimizer states", "Other": "inputs", "Inputs": "inputs", WORKSPACE: "op workspace",
}


def categories(snapshot: dict) -> dict[str, int]:
    """A tracker snapshot's bytes by the plan's categories (parameters, activations, ...)."""
    out: dict[str, int] = {}
    for device_snap in snapshot.values():
        for key, value in device_snap.items():
            name = _CATEGORY.get(getattr(key, "value", key))
            if name is not None and value:
                out[name] = out.get(name, 0) + value
    return out


def fsdp_ref(value: str):
    """FSDPMemTracker's category of that name ("Sharded Param", ...)."""
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType

    return next(r for r in _FSDPRefType if r.value == value)


def module_activations(tracker) -> dict[str, int]:
    """Per module: activation bytes alive after its forward minus before (what it leaves behind,
    its output included), from MemTracker's per-module snapshots (first call of each module)."""
    from torch.distributed._tools.mem_tracker import _ModState, _MemRefType

    out = {}
    for stats in tracker.memory_tracking.values():
        pre, post = stats.snapshots.get(_ModState.PRE_FW), stats.snapshots.get(_ModState.POST_FW)
        if not pre or not post:
            continue
        act = lambda snap: sum(s.get(_MemRefType.ACT, 0) for s in snap.values())  # noqa: E731
        out[module_name(stats.mod_fqn)] = act(post[0]) - act(pre[0])
    return out


def module_name(fqn: str) -> str:
    """ModTracker names modules from the root's class ("LlamaForCausalLM.model.layers.0"); the
    plan uses the model's own names ("model.layers.0"), "(model)" for the root."""
    return fqn.partition(".")[2] or "(model)"
