"""Find RMSNorm and LayerNorm modules by what they compute, and swap in the fused kernels.

A module is a candidate when it is a leaf whose only tensors are a 1-D `weight` and optionally a
1-D `bias` (or none at all, for a non-parametric LayerNorm such as OLMo's), and whose class name
says Norm or which carries an eps attribute. Its class name never decides what it computes:
a copy of it, with random weights on the CPU, is run on probe inputs and compared with the
references of rms_norm and layer_norm under each candidate spec (offset 0 or 1, eps from its
attribute or the usual values). The bf16 probes then fix the casting mode (where it rounds to
the input dtype). A module that matches no spec is left alone, and the report says so.

Probing runs once per (class, eps, shape) and needs only the module's code, so it also works on
a model built on the meta device (for `fastft patch-report`).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from fastft.kernels.layer_norm import layer_norm, layer_norm_reference
from fastft.kernels.rms_norm import rms_norm, rms_norm_reference

EPS_ATTRIBUTES = ("variance_epsilon", "eps", "epsilon", "layer_norm_eps", "rms_norm_eps", "norm_eps")
COMMON_EPS = (1e-5, 1e-6, 1e-8, 1e-12)
ORIGINAL = "_fastft_original"


@dataclass(frozen=True)
class NormSpec:
    kind: str            # "rms_norm" | "layer_norm"
    eps: float
    offset: float = 0.0
    casting: str = "llama"  # rms_norm only

    def describe(self) -> str:
        parts = [f"eps={self.eps:g}"]
        if self.offset:
            parts.append(f"offset={self.offset:g}")
        if self.kind == "rms_norm":
            parts.append(f"casting={self.casting}")
        return ", ".join(parts)


class _Fused(nn.Module):
    """Base of the fused norms: attributes it lacks are read from the original module, so code that
    reads e.g. `norm.variance_epsilon` keeps working."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get(ORIGINAL)
            if original is None:
                raise
            return getattr(original, name)


class FusedRMSNorm(_Fused):
    """RMSNorm through fastft.kernels.rms_norm; keeps the original's `weight` Parameter (same name)."""

    def __init__(self, original: nn.Module, spec: NormSpec):
        super().__init__()
        self.weight = original.weight
        self.eps, self.offset, self.casting = spec.eps, spec.offset, spec.casting
        object.__setattr__(self, ORIGINAL, original)  # kept for unpatch, not registered as a child

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.eps, self.offset, self.casting)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}, casting={self.casting!r}"


class FusedLayerNorm(_Fused):
    """LayerNorm through fastft.kernels.layer_norm; keeps the original's `weight`/`bias` Parameters."""

    def __init__(self, original: nn.Module, spec: NormSpec):
        super().__init__()
        self.weight = getattr(original, "weight", None)
        self.bias = getattr(original, "bias", None)
        self.eps, self.offset = spec.eps, spec.offset
        object.__setattr__(self, ORIGINAL, original)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return layer_norm(hidden_states, self.weight, self.bias, self.eps, self.offset)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, offset={self.offset}, bias={self.bias is not None}"


FUSED_CLASSES = {"rms_norm": FusedRMSNorm, "layer_norm": FusedLayerNorm}


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor | None]:
    tensors = dict(module.named_parameters(recurse=False))
    tensors.update(dict(module.named_buffers(recurse=False)))
    return tensors


def candidate(module: nn.Module) -> tuple[bool, str]:
    """(is it worth probing, why not): a leaf holding at most a 1-D weight and bias."""
    if list(module.children()) or hasattr(module, ORIGINAL):
        return False, ""
    tensors = _own_tensors(module)
    name = type(module).__name__
    looks_like_norm = ("norm" in name.lower() and not name.endswith("Head")) or any(
        hasattr(module, a) for a in EPS_ATTRIBUTES)
    if not looks_like_norm:
        return False, ""
    extra = sorted(set(tensors) - {"weight", "bias"})
    if extra:
        return False, f"holds {extra} besides weight/bias"
    if not tensors and "norm" not in name.lower():
        return False, ""
    weight = tensors.get("weight")
    if weight is not None and weight.dim() != 1:
        return False, f"{weight.dim()}-D weight {tuple(weight.shape)}: the fused norms take a 1-D weight"
    if weight is None and not tensors and "layernorm" not in name.lower() and "layer_norm" not in name.lower():
        return False, ""
    extra_args = _extra_forward_parameters(module)
    if extra_args:
        return False, f"forward takes {extra_args} besides the input (e.g. a gate): not a plain norm"
    return True, ""


def _extra_forward_parameters(module: nn.Module) -> list[str]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [p.name for p in positional[1:]]


def _eps_candidates(module: nn.Module) -> list[float]:
    for attr in EPS_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [float(value)]
    return list(COMMON_EPS)


def _hidden_size(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.shape[0]
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    return None


def _probe_copy(module: nn.Module, dtype: torch.dtype, gen: torch.Generator) -> nn.Module:
    """A CPU copy with random parameters of the given dtype (meta modules get storage first)."""
    if any(t.is_meta for t in _own_tensors(module).values() if t is not None):
        probe = copy.deepcopy(module).to_empty(device="cpu")
    else:
        probe = copy.deepcopy(module).cpu()
    with torch.no_grad():
        for p in probe.parameters(recurse=False):
            p.data = (torch.randn(p.shape, generator=gen) * 0.5 + 1.0).to(dtype)
    return probe


def _close(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return False
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    return bool(err <= rtol)


def _references(spec: NormSpec, probe: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = getattr(probe, "weight", None)
    if spec.kind == "rms_norm":
        return rms_norm_reference(x, weight, spec.eps, spec.offset, spec.casting)
    return layer_norm_reference(x, weight, getattr(probe, "bias", None), spec.eps, spec.offset)


_SPEC_CACHE: dict[tuple, NormSpec | str] = {}


def detect(module: nn.Module) -> NormSpec | str:
    """The NormSpec this module computes, or a string saying why none fits."""
    hidden = _hidden_size(module)
    if hidden is None:
        return "hidden size unknown (no 1-D weight or normalized_shape)"
    has_weight = isinstance(getattr(module, "weight", None), torch.Tensor)
    has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
    eps_list = _eps_candidates(module)
    key = (type(module), tuple(eps_list), hidden, has_weight, has_bias)
    if key not in _SPEC_CACHE:
        _SPEC_CACHE[key] = _detect_uncached(module, hidden, eps_list, has_weight, has_bias)
    return _SPEC_CACHE[key]


def _detect_uncached(module, hidden, eps_list, has_weight, has_bias) -> NormSpec | str:
    gen = torch.Generator().manual_seed(0)  # never the global RNG: patching must not shift a run's seed
    probe = _probe_copy(module, torch.float32, gen)
    # A normal-scale and a tiny-scale input: the second makes eps visible.
    xs = [torch.randn(4, hidden, generator=gen) * 2 + 0.5, torch.randn(4, hidden, generator=gen) * 1e-3]
    kinds = ["layer_norm"] if has_bias else ["rms_norm", "layer_norm"]
    if not has_weight:
        kinds = ["layer_norm"]
    try:
        with torch.no_grad():
            outs = [probe(x) for x in xs]
    except Exception as exc:  # its forward wants other arguments: not a plain norm
        return f"probe call failed ({type(exc).__name__}: {str(exc)[:80]})"
    match = None
    for kind in kinds:
        for eps in eps_list:
            for offset in (0.0, 1.0) if has_weight else (0.0,):
                spec = NormSpec(kind, eps, offset)
                if all(_close(o, _references(spec, probe, x), 1e-5) for o, x in zip(outs, xs)):
                    match = spec
                    break
            if match:
                break
        if match:
            break
    if match is None:
        return "computes neither RMSNorm nor LayerNorm on probe inputs"
    if match.kind == "layer_norm":
        return match
    return _detect_casting(module, match, hidden, gen)


def _detect_casting(module: nn.Module, spec: NormSpec, hidden: int, gen: torch.Generator) -> NormSpec | str:
    """Which rounding points: probe bf16 input with fp32 weights (mixed precision) and bf16 weights."""
    x = (torch.randn(8, hidden, generator=gen) * 2).to(torch.bfloat16)
    best, best_err = None, float("inf")
    for casting in ("llama", "gemma", "none"):
        candidate_spec = NormSpec("rms_norm", spec.eps, spec.offset, casting)
        worst = 0.0
        for weight_dtype in (torch.float32, torch.bfloat16):
            probe = _probe_copy(module, weight_dtype, gen)
            try:
                with torch.no_grad():
                    out = probe(x)
            except Exception:  # some modules refuse mixed dtypes: judge on the other probe
                continue
            ref = _references(candidate_spec, probe, x)
            if out.dtype != ref.dtype or out.shape != ref.shape:
                worst = float("inf")
                break
            worst = max(worst, ((out.double() - ref.double()).norm() / ref.double().norm()).item())
        if worst < best_err:
            best, best_err = candidate_spec, worst
    if best is None or best_err > 1e-2:
        return f"RMSNorm, but its bf16 rounding matches no casting mode (best error {best_err:.1e})"
    return best


def replace(module: nn.Module, spec: NormSpec) -> nn.Module:
    return FUSED_CLASSES[spec.kind](module, spec)


def restore(fused: nn.Module) -> nn.Module:
    """The original module, holding the fused module's current Parameters."""
    original = getattr(fused, ORIGINAL)
    for name, param in fused.named_parameters(recurse=False):
        setattr(original, name, param)
    return original
