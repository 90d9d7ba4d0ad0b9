"""Transformers' hub kernels beside fastft's patches: one replacement per layer, and the report says which.

Since 5.25, `from_pretrained` kernelizes by default (`use_kernels`, off with `use_kernels=False`
or `USE_HUB_KERNELS=0`): Hugging Face's `kernels` package gives every module whose class is
tagged `kernel_layer_name` (RMSNorm, rotary, SiLU, gated-delta-net mixers, ...) an instance
`forward` loaded from a hub repository, where its mapping has one for the device and mode, and
pops the instance `forward` of every other tagged module. It does so again at each
`model.train()` / `model.eval()` that changes the mode. Left alone, that meets fastft in two ways:

- fastft would probe and wrap a hub forward instead of the layer's own (two replacements of one
  layer, the probe checking code fastft did not choose);
- a fastft forward on a tagged module (the recurrent mixers' document resets) would be dropped
  at the next `train()`, silently: packed rows would then leak between documents.

So, around `fastft.patch`:

1. `suspend` turns the model's hub kernels off (transformers' own `reset_kernels`): fastft probes
   and patches the layers' own forwards.
2. `claim` marks every tagged module that fastft gave a forward of its own: its class becomes a
   fastft subclass whose `kernel_condition` is false, which `kernels.kernelize` honours by
   skipping the module (the per-instance class swap FSDP2's `fully_shard` also makes; the
   transformers class itself is never changed). `release` swaps it back.
3. `resume` kernelizes again in the mode the model had: the layers fastft left alone keep their
   hub kernel (fastft has nothing better for them: rotary, SiLU, ...), the claimed ones are skipped.
   A kernel that cannot load (offline and not cached, no such device) leaves those layers on their
   own forward, and the report says why instead of raising.
4. `entries` lists, for the report, what runs on each tagged layer: the hub repository, or the
   layer's own forward.

`fastft.from_pretrained` and the trainer load with `use_kernels=False` and call `enable` only
when asked (`use_kernels=True`, `model.hub_kernels: true`): a hub kernel is code fetched at run
time by repository and version, outside the versions pyproject pins, and it needs the network or
a cache (README, "Transformers' hub kernels").
"""

from __future__ import annotations

from torch import nn

from fastft.patching.report import PatchEntry

REPO = "_kernel_repo"  # where `kernels` records the repository whose forward a module runs
CLAIMED_FROM = "_fastft_claimed_from"
_CLAIMED: dict[type, type] = {}


def tagged(module: nn.Module) -> bool:
    """Whether `kernels.kernelize` would replace or reset this module's forward."""
    return hasattr(type(module), "kernel_layer_name")


def uses_kernels(model: nn.Module) -> bool:
    return bool(getattr(model, "use_kernels", False)) and hasattr(model, "reset_kernels")


def suspend(model: nn.Module):
    """Turn the model's hub kernels off; returns the mode to `resume` them in (None: they were off)."""
    if not uses_kernels(model):
        return None
    mode = model.kernels_mode
    model.reset_kernels()  # every tagged module back on its class's forward (claimed ones stay skipped)
    return mode


def _never(module: nn.Module) -> bool:
    return False


def _claimed_class(cls: type) -> type:
    if cls not in _CLAIMED:
        _CLAIMED[cls] = type(cls.__name__, (cls,), {
            "kernel_condition": staticmethod(_never), CLAIMED_FROM: cls,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__qualname__} with a fastft forward: transformers' kernelize skips it "
                       "(fastft/patching/hub_kernels.py)."})
    return _CLAIMED[cls]


def claim(module: nn.Module) -> bool:
    """Keep fastft's forward on a tagged module through every later kernelize; True if claimed."""
    if not tagged(module) or CLAIMED_FROM in type(module).__dict__:
        return False
    module.__dict__.pop(REPO, None)
    module.__class__ = _claimed_class(type(module))
    return True


def claim_patched(model: nn.Module) -> list[str]:
    """Claim every tagged module that holds an instance forward after patching (only fastft's can:
    `suspend` took the hub's away); returns their names."""
    return [name for name, module in model.named_modules()
            if "forward" in module.__dict__ and REPO not in module.__dict__ and claim(module)]


def release(model: nn.Module) -> None:
    """Undo `claim` on `model` and every module in it."""
    for module in model.modules():
        original = type(module).__dict__.get(CLAIMED_FROM)
        if original is not None:
            module.__class__ = original


def resume(model: nn.Module, mode) -> str:
    """Kernelize again in `mode` (from `suspend`; None: nothing to do); returns "" or why not."""
    if mode is None:
        return ""
    try:
        model.set_use_kernels(True, mode=mode)
    except Exception as exc:  # offline and not cached, an unsupported device: the layers' own forwards
        model.reset_kernels()
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    return ""


def enable(model: nn.Module, training: bool | None = None, compiled: bool = False) -> str:
    """Hub kernels for the layers fastft left alone, on a model loaded without them (opt-in), for
    training (default: the model's training flag) and torch.compile; returns "" or why they are off."""
    if not hasattr(model, "set_use_kernels"):
        return "not a transformers PreTrainedModel"
    try:
        from kernels import Mode
    except ImportError as exc:
        return f"the kernels package is not installed ({exc})"
    claim_patched(model)
    mode = Mode.TRAINING if (model.training if training is None else training) else Mode.INFERENCE
    return resume(model, mode | Mode.TORCH_COMPILE if compiled else mode)


def _repository(repo) -> str:
    name = getattr(repo, "repo_id", None) or getattr(repo, "path", None) or type(repo).__name__
    layer = getattr(repo, "layer_name", None) or getattr(repo, "func_name", None)
    return f"hub {name}" + (f":{layer}" if layer else "")


def entries(model: nn.Module) -> list[PatchEntry]:
    """What runs on each tagged layer and tagged function: a hub kernel's repository, fastft's
    forward (claimed), or the layer's own forward ("" replacement)."""
    found = []
    for name, module in model.named_modules():
        for func_name, func in getattr(module, "_kernel_funcs", {}).items():
            repo = func.__dict__.get(REPO)
            found.append(PatchEntry("hub_kernel", f"{name}:{func_name}", func_name,
                                    _repository(repo) if repo is not None else "",
                                    "" if repo is not None else "its own forward"))
        if not tagged(module):
            continue
        layer = type(module).kernel_layer_name
        original = type(module).__dict__.get(CLAIMED_FROM)
        if original is not None:
            found.append(PatchEntry("hub_kernel", name, original.__name__, "fastft's forward",
                                    f"{layer}: transformers' kernelize skips it"))
        elif module.__dict__.get(REPO) is not None:
            found.append(PatchEntry("hub_kernel", name, type(module).__name__, _repository(module.__dict__[REPO]),
                                    layer))
        else:
            found.append(PatchEntry("hub_kernel", name, type(module).__name__, "", f"{layer}: its own forward"))
    return found
