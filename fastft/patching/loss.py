"""The training loss through fused_linear_cross_entropy, so that the full logits never exist.

How it hooks in, per instance and without copying any modelling code:
- the LM head (`get_output_embeddings()`) gets an instance-level `forward` that, while a fused
  call is under way, records its input (the final hidden states, after whatever the model did to
  them, e.g. MiniCPM's scaling) and returns an empty [..., 0] tensor instead of [..., V] logits;
- the causal-LM module gets an instance-level `forward` that, when called with `labels` (or
  `shift_labels`), runs the original forward with labels=None under that capture, then computes
  the loss with the fused op from the recorded hidden states and the head's weight. Without
  labels the original forward runs untouched and returns the logits exactly as before.

What happens to the logits after the head (Gemma 2's soft-capping, Granite's division by
`logits_scaling`, Cohere's `logit_scale`) is read from the config as candidates and verified by
one probe forward on two tokens at patch time: the probe records the head's raw output and the
model's final logits and keeps the candidate map that reproduces one from the other (MiniCPM3
also has a `logits_scaling` field, but applies it before the head: the probe tells them apart).

The loss equals Hugging Face's ForCausalLMLoss: labels shifted left by one (pad with -100), or
`shift_labels` as given; mean over non-ignored tokens, or sum / num_items_in_batch when the
trainer passes num_items_in_batch. A MoE model's router auxiliary loss is added as its forward
would (`router_aux_loss_coef * aux_loss`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastft.attention import call_arguments
from fastft.flops import text_config
from fastft.patching.preserve import preserved
from fastft.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

TAP = "_fastft_head_tap"
FORWARD = "_fastft_loss_forward"


@dataclass(frozen=True)
class HeadSpec:
    normalize_weight: bool = False   # Baichuan 2's NormHead: rows L2-normalised before the product
    logit_scale: float = 1.0
    softcap: float | None = None
    verified: bool = True            # False when built on the meta device (no probe forward)

    def describe(self) -> str:
        parts = []
        if self.normalize_weight:
            parts.append("normalised head rows")
        if self.logit_scale != 1.0:
            parts.append(f"logit_scale={self.logit_scale:g}")
        if self.softcap:
            parts.append(f"softcap={self.softcap:g}")
        if not self.verified:
            parts.append("logit map checked when loaded with weights")
        return ", ".join(parts)


class _HeadTap:
    """State of the LM head's instance forward: pass through, or record the input and skip."""

    def __init__(self, head: nn.Module):
        self.head = head
        self.original_forward = head.forward
        self.capturing = False
        self.recording = False   # probe: record input and output, compute normally
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.capturing:
            self.inputs.append(hidden)
            return hidden.new_empty(*hidden.shape[:-1], 0)
        out = self.original_forward(hidden, *args, **kwargs)
        if self.recording:
            self.inputs.append(hidden)
            self.outputs.append(out)
        return out


def _candidate_maps(config) -> list[tuple[float, float | None]]:
    scales = {1.0}
    if getattr(config, "logit_scale", None):
        scales.add(float(config.logit_scale))
    if getattr(config, "logits_scaling", None):
        scales.add(1.0 / float(config.logits_scaling))
    caps = [None]
    if getattr(config, "final_logit_softcapping", None):
        caps.append(float(config.final_logit_softcapping))
    return [(s, c) for s in sorted(scales, key=lambda s: s != 1.0) for c in caps]


def _apply_map(z: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    z = z * scale
    return cap * torch.tanh(z / cap) if cap else z


def lora_parts(head: nn.Module):
    """(base Linear, lora_A, lora_B, dropout, scaling) of a PEFT LoRA layer with one plain adapter
    active; None for a plain head; a string saying why when the adapter cannot be fused."""
    if not (hasattr(head, "base_layer") and hasattr(head, "lora_A")):
        return None
    if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return head.base_layer, None, None, None, 0.0
    active = [a for a in head.active_adapters if a in head.lora_A.keys()]
    if not active:
        return head.base_layer, None, None, None, 0.0
    if len(active) > 1:
        return f"{len(active)} LoRA adapters active on the LM head"
    name = active[0]
    if name in getattr(head, "lora_variant", {}):
        return f"LoRA variant {type(head.lora_variant[name]).__name__} (e.g. DoRA) on the LM head"
    if head.lora_B[name].bias is not None:
        return "LoRA with bias on the LM head"
    return head.base_layer, head.lora_A[name], head.lora_B[name], head.lora_dropout[name], head.scaling[name]


def head_operands(head: nn.Module, spec: HeadSpec, hidden: torch.Tensor):
    """(x, W, b) with logits = x·Wᵀ + b for the flattened hidden states [N, H].

    A LoRA adapter on the head adds s·B·A·x: stacking [x, s·A·drop(x)] against [W, B] gives
    x·Wᵀ + s·(A·drop(x))·Bᵀ in one product, so the fused loss includes the adapter's delta and
    its gradients reach A and B (the cost: a [V, H + r] copy of the head weight per step).
    """
    parts = lora_parts(head)
    base = head if parts is None else parts[0]
    weight = F.normalize(base.weight, dim=-1) if spec.normalize_weight else base.weight
    bias = getattr(base, "bias", None)
    if parts is None or parts[1] is None:
        return hidden, weight, bias
    _, lora_a, lora_b, dropout, scaling = parts
    low_rank = lora_a(dropout(hidden.to(lora_a.weight.dtype))) * scaling  # [N, r]
    return (torch.cat([hidden, low_rank.to(hidden.dtype)], dim=-1),
            torch.cat([weight, lora_b.weight.to(weight.dtype)], dim=1), bias)


def detect(model: nn.Module, head: nn.Module) -> HeadSpec | str:
    """How the head and what follows it turn hidden states into logits, or why we cannot fuse it."""
    parts = lora_parts(head)
    if isinstance(parts, str):
        return parts + ": kept unfused"
    weight = getattr(head if parts is None else parts[0], "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return f"LM head {type(head).__name__} has no 2-D weight"
    config = text_config(model)
    maps = _candidate_maps(config)
    if weight.is_meta:  # no weights to probe with: assume a plain head, verify when loaded for real
        if not isinstance(head if parts is None else parts[0], nn.Linear):
            return f"LM head {type(head).__name__} is not an nn.Linear (cannot verify on the meta device)"
        return HeadSpec(verified=False)
    tap = _HeadTap(head)
    head.forward = tap
    tap.recording = True
    ids = torch.arange(1, 7, device=weight.device).remainder(weight.shape[0]).unsqueeze(0)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout in the probe: its logits must be a function of its hidden states
    try:
        return _probe(model, head, tap, ids, weight, maps, config)
    finally:
        for m, training in modes.items():
            m.training = training


def _probe(model, head, tap, ids, weight, maps, config) -> HeadSpec | str:
    # The forward runs under `preserved`: a head that rewrites its own weight on its first eval
    # call (Baichuan 2's NormHead normalises its rows in place) gets it back before the candidate
    # maps below are compared with the original weight.
    try:
        with preserved(model), torch.no_grad(), torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
            out = model(input_ids=ids, labels=ids, use_cache=False)
    except Exception as exc:  # a model whose forward wants more than input_ids
        return f"probe forward failed ({type(exc).__name__}: {str(exc)[:80]})"
    finally:
        del head.forward
    if len(tap.inputs) != 1:
        return f"LM head called {len(tap.inputs)} times in one forward (expected once)"
    hidden, raw = tap.inputs[0], tap.outputs[0].float()
    final = (out.logits if hasattr(out, "logits") else out[1]).float()
    tol = 2e-2 if weight.dtype in (torch.bfloat16, torch.float16) else 1e-4
    flat = hidden.reshape(-1, hidden.shape[-1])
    for normalize in (False, True):
        x, w, b = head_operands(head, HeadSpec(normalize_weight=normalize), flat)
        if _rel(raw.reshape(-1, raw.shape[-1]), F.linear(x.float(), w.float(), None if b is None else b.float())) <= tol:
            break
    else:
        return f"LM head {type(head).__name__} computes neither x·Wᵀ nor x·normalize(W)ᵀ"
    spec = None
    for scale, cap in maps:
        if final.shape == raw.shape and _rel(final, _apply_map(raw, scale, cap)) <= tol:
            spec = HeadSpec(normalize_weight=normalize, logit_scale=scale, softcap=cap)
            break
    else:  # a constant factor the config names otherwise (muP width multipliers): fit it
        scale = ((final * raw).sum() / (raw * raw).sum().clamp_min(1e-30)).item() if final.shape == raw.shape else 0
        if scale and _rel(final, raw * scale) <= tol:
            spec = HeadSpec(normalize_weight=normalize, logit_scale=scale)
    if spec is None:
        return "logits after the head match no scale or soft-cap: left to the model's own loss"
    # The model's own loss on the probe must be cross-entropy on those logits (plus a MoE aux loss).
    with torch.no_grad():
        ours = causal_lm_loss(hidden, head, spec, ids, None, None, op=fused_linear_cross_entropy_reference)
        aux = getattr(out, "aux_loss", None)
        if aux is not None and getattr(config, "router_aux_loss_coef", None) is not None:
            ours = ours + config.router_aux_loss_coef * aux.float()
    theirs = out.loss if hasattr(out, "loss") else out[0]
    if theirs is None or abs(float(theirs) - float(ours)) > tol * max(1.0, abs(float(theirs))):
        return (f"the model's own loss ({float(theirs):.4f}) is not cross-entropy on its logits ({float(ours):.4f}), "
                "e.g. an extra z-loss term: left to the model's own loss")
    return spec


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def install(model: nn.Module, head: nn.Module, spec: HeadSpec, counts: dict | None = None) -> None:
    """Give the causal-LM module and its head the instance forwards described in the docstring;
    `counts["fused"]` counts the forwards whose loss the fused op computed."""
    tap = _HeadTap(head)
    head.forward = tap
    original = model.forward
    signature = inspect.signature(original)
    config = text_config(model)

    def forward(*args, **kwargs):
        arguments = call_arguments(signature, args, kwargs)
        labels = arguments.pop("labels", None)
        shift_labels = arguments.get("shift_labels")
        if labels is None and shift_labels is None:
            return original(*args, **kwargs)
        return_dict = arguments.pop("return_dict", None)
        tap.capturing, tap.inputs = True, []
        try:
            out = original(labels=None, return_dict=True, **arguments)
        finally:
            tap.capturing = False
        if len(tap.inputs) != 1:
            raise RuntimeError(f"fastft: the LM head ran {len(tap.inputs)} times in one forward; "
                               "call fastft.unpatch(model) or patch with cross_entropy=False")
        loss = causal_lm_loss(tap.inputs.pop(), head, spec, labels, shift_labels,
                              arguments.get("num_items_in_batch"), arguments.get("ignore_index", -100))
        if counts is not None:
            counts["fused"] += 1
        aux = getattr(out, "aux_loss", None)
        if aux is not None and getattr(config, "router_aux_loss_coef", None) is not None:
            loss = loss + config.router_aux_loss_coef * aux.to(loss.device)
        # A new output of the same class, so that fields keep their order: loss first, no logits.
        out = type(out)(loss=loss, **{k: v for k, v in out.items() if k not in ("loss", "logits")})
        return out if return_dict is not False else out.to_tuple()

    forward.__signature__ = signature
    forward.__wrapped__ = original
    model.forward = forward
    setattr(model, FORWARD, (head, tap, spec))


def installed_spec(model: nn.Module) -> HeadSpec | None:
    state = model.__dict__.get(FORWARD)
    return None if state is None else state[2]


def uninstall(model: nn.Module) -> bool:
    state = model.__dict__.pop(FORWARD, None)
    if state is None:
        return False
    head = state[0]
    model.__dict__.pop("forward", None)
    head.__dict__.pop("forward", None)
    return True


def causal_lm_loss(hidden: torch.Tensor, head: nn.Module, spec: HeadSpec, labels: torch.Tensor | None,
                   shift_labels: torch.Tensor | None, num_items_in_batch, ignore_index: int = -100,
                   op=fused_linear_cross_entropy) -> torch.Tensor:
    """HF's ForCausalLMLoss, fused: shift, flatten, then the LM head and cross-entropy in one op."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = shift_labels.reshape(-1).to(flat.device)
    if targets.shape[0] != flat.shape[0]:
        raise ValueError(f"fastft: {targets.shape[0]} labels for {flat.shape[0]} hidden positions; labels must "
                         "have the shape of input_ids")
    flat, weight, bias = head_operands(head, spec, flat)
    return op(
        flat, weight, targets, bias=bias, ignore_index=ignore_index,
        reduction="sum" if num_items_in_batch is not None else "mean",
        softcap=spec.softcap, logit_scale=spec.logit_scale, normalizer=num_items_in_batch,
    )
