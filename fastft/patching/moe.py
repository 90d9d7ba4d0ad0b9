"""Mixture-of-experts blocks through fastft.kernels.moe_experts: found by structure, decided by probes,
replaced per instance, reversible, reported.

What is replaced. The experts module of a MoE block: a module holding exactly two 3-D parameters, a
gate-up stack [E, 2I, H] and a down stack [E, H, I] (or both transposed, [E, H, 2I] / [E, I, H]),
called as experts(hidden [N, H], top_k_index [N, K], top_k_weights [N, K]) -> [N, H] (transformers
5's fused experts: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoe, GraniteMoeShared and more). It
gets an instance `forward` running the grouped-GEMM kernel with an ExpertsSpec found by probing:
the module is called on a random probe (tokens, distinct random experts, random weights) and its
output compared with the per-expert reference for each candidate (gate/up concatenated or
interleaved, activation silu / gelu-tanh / gelu, argument order); the matching spec then runs
through the kernel on the same probe and must agree again before anything is installed. The
parameters, their names and the module tree stay as they are (state dicts, PEFT and FSDP2 see the
same model); under FSDP2 the experts belong to their decoder block's unit, whose pre-forward hook
has gathered the stacks before the experts' forward reads them.

LoRA on experts. PEFT's `target_parameters` (e.g. ["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]) wraps the experts in ParamWrappers (one per targeted stack, nested);
their forward folds scale·B·A into a whole new weight stack per call. Here the outermost wrapper
gets an instance forward that hands the factors to the kernel instead (A [r·E, in] viewed as
[E, r, in], B [out, r·E] as [E, out, r], never copied), verified against PEFT's own forward on a
probe with random B (restored after). In any state the kernel does not compute (adapters
disabled or merged, several active adapters) PEFT's forward runs, which still ends in the fused
experts forward with the merged weights.

What is kept, and why.
- The router runs as the model's own module. Its routing is found by probing and reported (a
  RouterSpec: softmax or sigmoid scores, top-k, renormalised or not; top-k-then-softmax is the
  renormalised softmax), but not re-implemented: torch.topk's choice among tied scores is
  unspecified (it differs between CPU and CUDA), bf16 router logits tie often, so a fused top-k
  could not be exact; the router is a [N, H]·[H, E] GEMM and a few small ops (under 1% of the
  layer at Qwen3-30B-A3B shapes); and transformers records `router_logits` for the aux loss from
  the router module's output.
- Shared experts (Qwen2-MoE's `shared_expert` with its sigmoid gate, GraniteMoeShared's
  `shared_mlp`) are ordinary gated MLPs: with LoRA they take the fused LoRA MLP path
  (fastft/patching/lora.py), otherwise their nn.Linear layers run on cuBLAS; the report names them.
- Experts with biases, non-gated experts, or any module the probe does not match stay on
  transformers' experts, named in the report with the reason.

Padding and the aux loss. The model-level pre-forward hook reads the batch's real tokens (the
`attention_mask` of a padded batch, or the mask the trainer passes with `set_real_tokens` for a
packed batch whose rows end in padding) and the experts route padding tokens to no expert (they
cost nothing; their outputs are 0, and no real token depends on them). The load-balancing aux
loss stays the model's own function: with an attention_mask the model already excludes padding;
for a packed batch the model-level hook recomputes it with the model's own
`load_balancing_loss_func` over the real tokens (checked first against the model's aux loss over
all tokens) and corrects the loss by router_aux_loss_coef times the difference.

Helpers shared with other patches: `is_lora_layer`, `is_param_wrapper` (PEFT's ParamWrapper, which
fastft.expert_parallel also walks) and the meta-device `random_copy` are in
fastft/patching/probe.py; the DTensor check is fastft.collectives.is_dtensor.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn

from fastft.collectives import is_dtensor
from fastft.kernels.activations import ACTIVATIONS
from fastft.kernels.moe import LAYOUTS, ExpertLoRA, concatenated, moe_experts, moe_experts_reference
from fastft.patching.probe import is_lora_layer, is_param_wrapper, random_copy

FORWARD_ATTR = "_fastft_moe_forward"
LORA_ATTR = "fastft_moe_lora"  # on PEFT ParamWrappers that this patch fuses (fastft/patching/lora.py skips them)
EXPERT_PARALLEL_ATTR = "_fastft_expert_parallel"  # set by fastft.expert_parallel
_PROBE_TOKENS = 11


@dataclass(frozen=True)
class ExpertsSpec:
    gate_up: str          # parameter names on the experts module
    down: str
    transposed: bool      # [E, H, 2I] / [E, I, H] stacks
    layout: str           # gate/up rows: "concatenated" or "interleaved"
    activation: str
    index_first: bool     # forward(hidden, top_k_index, top_k_weights), else (hidden, weights, index)

    def describe(self) -> str:
        parts = [self.activation, self.layout]
        if self.transposed:
            parts.append("transposed")
        return ", ".join(parts)


@dataclass(frozen=True)
class RouterSpec:
    scoring: str          # "softmax" or "sigmoid" over all experts, then top-k
    normalize: bool       # top-k weights renormalised to sum 1 (== softmax over the top-k logits)
    top_k: int
    num_experts: int

    def describe(self) -> str:
        text = f"{self.scoring} → top-{self.top_k} of {self.num_experts}"
        if self.normalize:
            text += ", renormalised" + (f" (= softmax of the top-{self.top_k} logits)" if self.scoring == "softmax" else "")
        return text


# ------------------------------------------------------------------------------------------------
# Finding experts modules by structure.
# ------------------------------------------------------------------------------------------------
def expert_stacks(module: nn.Module) -> tuple[str, str, bool] | None:
    """(gate_up name, down name, transposed) when the module's own parameters are exactly a gated
    experts pair: [E, 2I, H] + [E, H, I], or [E, H, 2I] + [E, I, H]."""
    params = dict(module.named_parameters(recurse=False))
    stacks = {n: tuple(p.shape) for n, p in params.items() if p.dim() == 3}
    if len(stacks) != 2 or len(params) != 2:
        return None
    (n1, s1), (n2, s2) = stacks.items()
    for (gu, a), (dn, b) in (((n1, s1), (n2, s2)), ((n2, s2), (n1, s1))):
        if a[0] != b[0]:
            continue
        if a[1] == 2 * b[2] and a[2] == b[1]:
            return gu, dn, False
        if a[2] == 2 * b[1] and a[1] == b[2]:
            return gu, dn, True
    return None


def _has_expert_like_params(module: nn.Module) -> bool:
    return sum(p.dim() == 3 for p in module.parameters(recurse=False)) >= 1


# ------------------------------------------------------------------------------------------------
# Probes.
# ------------------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _tolerance(dtype: torch.dtype) -> float:
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def _probe_routing(n_experts: int, device):
    k = min(2, n_experts)
    idx = torch.rand(_PROBE_TOKENS, n_experts, device=device).argsort(dim=-1)[:, :k]
    return idx, torch.rand(_PROBE_TOKENS, k, device=device)


def _logical(spec_names, transposed, module):
    gate_up, down = getattr(module, spec_names[0]), getattr(module, spec_names[1])
    if transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return gate_up, down


def _call(module: nn.Module, index_first: bool, x, idx, w):
    return module(x, idx, w) if index_first else module(x, w, idx)


def probe_experts(module: nn.Module, stacks: tuple[str, str, bool]) -> ExpertsSpec | str:
    """The ExpertsSpec reproducing module's forward on a random probe, verified through the kernel."""
    gu_name, dn_name, transposed = stacks
    first = getattr(module, gu_name)
    if first.is_meta:  # what the module computes does not depend on its values: a random CPU copy
        return probe_experts(random_copy(module), stacks)
    if is_dtensor(first):
        return "expert weights are sharded DTensors at patch time (patch before fully_shard)"
    gate_up, down = _logical((gu_name, dn_name), transposed, module)
    dtype, device = gate_up.dtype, gate_up.device
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            x = torch.randn(_PROBE_TOKENS, gate_up.shape[2], device=device).to(dtype)
            idx, w = _probe_routing(gate_up.shape[0], device)
            w = w.to(dtype)
            tol = _tolerance(dtype)
            for index_first in (True, False):
                try:
                    out = _call(module, index_first, x, idx, w)
                except Exception:  # noqa: BLE001 - the other argument order, or not an experts module
                    continue
                if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                    continue
                for layout in LAYOUTS:
                    for act in ACTIVATIONS:
                        ref = moe_experts_reference(x.float(), idx, w.float(), concatenated(gate_up.float(), layout),
                                                    down.float(), act)
                        if _rel(out, ref) > tol:
                            continue
                        spec = ExpertsSpec(gu_name, dn_name, transposed, layout, act, index_first)
                        fused = _fused(spec, module, x, idx, w, None)
                        err = _rel(fused, out)
                        if err > tol:
                            return f"the fused kernel disagrees with the module on the probe (rel. error {err:.2e})"
                        return spec
            return ("forward matches no candidate (gated experts with concatenated/interleaved gate-up, "
                    f"activation in {ACTIVATIONS}, called as (hidden, index, weights))")
    finally:
        for m, training in modes.items():
            m.training = training


def probe_router(block: nn.Module, experts: nn.Module, hidden: int, n_experts: int) -> tuple[str, RouterSpec | str]:
    """(child name, RouterSpec) of the router beside the experts: a child holding an [E, H] weight
    whose forward returns (logits [N, E], weights [N, K], index [N, K])."""
    for name, child in block.named_children():
        if child is experts:
            continue
        weight = getattr(child, "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (n_experts, hidden):
            continue
        if weight.is_meta:  # its routing does not depend on the weight's values: probe a random CPU copy
            child = random_copy(child)
            weight = child.weight
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
                torch.manual_seed(1)
                x = torch.randn(_PROBE_TOKENS, hidden, device=weight.device).to(weight.dtype)
                out = child(x)
        except Exception as exc:  # noqa: BLE001
            return name, f"router probe failed ({type(exc).__name__})"
        if not isinstance(out, tuple):
            return name, "router returns no (logits, weights, index) tuple"
        logits = next((t for t in out if torch.is_tensor(t) and t.shape == (_PROBE_TOKENS, n_experts)), None)
        index = next((t for t in out if torch.is_tensor(t) and not t.is_floating_point() and t.dim() == 2), None)
        weights = next((t for t in out if torch.is_tensor(t) and t.is_floating_point() and t.dim() == 2
                        and t is not logits and index is not None and t.shape == index.shape), None)
        if logits is None or index is None or weights is None:
            return name, "router outputs are not (logits [N, E], weights [N, K], index [N, K])"
        k = index.shape[1]
        for scoring in ("softmax", "sigmoid"):
            scores = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()
            top, top_idx = scores.topk(k, dim=-1)
            picked = scores.gather(1, index.long())
            if not torch.equal(top_idx.sort(-1).values, index.long().sort(-1).values):
                continue
            for normalize in (False, True):
                expect = picked / picked.sum(-1, keepdim=True) if normalize else picked
                if _rel(weights, expect) <= _tolerance(weights.dtype):
                    return name, RouterSpec(scoring, normalize, k, n_experts)
        return name, "router routing matches no candidate (softmax or sigmoid scores, top-k, renormalised or not)"
    return "", "no router child with an [E, H] weight beside the experts"


def shared_experts(block: nn.Module, layer: nn.Module | None, experts: nn.Module, router: str) -> str:
    """The shared experts beside the routed ones, by structure: MLP-like children (holding Linear
    layers) of the block other than the router and experts, a [1, H] Linear as their gate, and
    MLP-like siblings of the block in its decoder layer (GraniteMoeShared's shared_mlp)."""
    def mlps(parent, skip):
        return [n for n, c in parent.named_children() if c not in skip and n != router
                and any(isinstance(m, nn.Linear) for m in c.modules()) and not isinstance(c, nn.Linear)
                and not _has_expert_like_params(c) and "attn" not in n and "attention" not in type(c).__name__.lower()]
    inside = mlps(block, {experts})
    gates = [n for n, c in block.named_children() if isinstance(c, nn.Linear) and c.out_features == 1]
    outside = mlps(layer, {block}) if layer is not None else []
    parts = [f"{n}" + (f" (gate {gates[0]})" if gates else "") for n in inside]
    parts += [f"{n} (in the decoder layer)" for n in outside]
    if not parts:
        return ""
    return ("shared expert " + ", ".join(parts) + ": the LoRA patch's fused path when LoRA-adapted (lora_mlp, or "
            "lora_linear per layer for a fused gate_up), else its own nn.Linear layers")


# ------------------------------------------------------------------------------------------------
# The fused forward.
# ------------------------------------------------------------------------------------------------
class TokenState:
    """Which rows of the current forward are real tokens (a flat bool [N] or None: all), set by the
    model-level pre-forward hook and kept until the next forward (a checkpointed block recomputed
    in the backward sees the same rows)."""

    def __init__(self):
        self.pending: torch.Tensor | None = None
        self.current: torch.Tensor | None = None   # flat [N] bool
        self.shape: tuple[int, ...] | None = None  # the batch's [batch, seq]
        self.explicit = False

    def route_padding_nowhere(self, idx: torch.Tensor, n_experts: int) -> torch.Tensor:
        mask = self.current
        if mask is None or mask.numel() != idx.shape[0] or mask.device != idx.device:
            return idx
        return torch.where(mask[:, None], idx, torch.full_like(idx, n_experts))


def _fused(spec: ExpertsSpec, module: nn.Module, x, idx, w, loras, tokens: TokenState | None = None):
    gate_up, down = getattr(module, spec.gate_up), getattr(module, spec.down)
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    idx = idx.reshape(rows.shape[0], -1)
    w = w.reshape(idx.shape)
    ep = module.__dict__.get(EXPERT_PARALLEL_ATTR)
    n_experts = ep.num_experts if ep is not None else gate_up.shape[0]  # all experts, not the local ones
    if tokens is not None:
        idx = tokens.route_padding_nowhere(idx, n_experts)
    gate_up_lora, down_lora = loras if loras is not None else (None, None)
    if ep is not None:
        out = ep.forward(rows, idx, w, gate_up, down, spec, gate_up_lora, down_lora)
    else:
        out = moe_experts(rows, idx, w, gate_up, down, spec.activation, gate_up_lora=gate_up_lora,
                          down_lora=down_lora, layout=spec.layout, transposed=spec.transposed)
    return out.to(x.dtype).view(shape)


def _split_args(spec: ExpertsSpec, signature: inspect.Signature | None, args, kwargs):
    """(hidden, index, weights) from a call the way the module was probed, or None."""
    if kwargs:
        if signature is None:
            return None
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return None
        args, kwargs = tuple(bound.arguments.values()), {}
    if len(args) != 3:
        return None
    x, a, b = args
    idx, w = (a, b) if spec.index_first else (b, a)
    if not (torch.is_tensor(x) and torch.is_tensor(idx) and torch.is_tensor(w)) or idx.is_floating_point():
        return None
    return x, idx, w


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _experts_forward(module: nn.Module, spec: ExpertsSpec, original, tokens: TokenState):
    signature = _signature(original)

    def forward(*args, **kwargs):
        call = _split_args(spec, signature, args, kwargs)
        if call is None or is_dtensor(getattr(module, spec.gate_up)) or is_dtensor(getattr(module, spec.down)):
            return original(*args, **kwargs)
        return _fused(spec, module, *call, None, tokens)

    forward.__wrapped__ = original
    return forward


# ------------------------------------------------------------------------------------------------
# LoRA on experts (PEFT ParamWrapper chains).
# ------------------------------------------------------------------------------------------------
def _chain(wrapper: nn.Module) -> list[nn.Module]:
    chain = [wrapper]
    while is_param_wrapper(chain[-1].base_layer):
        chain.append(chain[-1].base_layer)
    return chain


def _lora_static_reason(chain: list[nn.Module], spec: ExpertsSpec) -> str:
    names = [w.parameter_name for w in chain]
    if len(set(names)) != len(names) or not set(names) <= {spec.gate_up, spec.down}:
        return f"LoRA ParamWrappers on {names}: only the experts' {spec.gate_up} / {spec.down} are fused"
    return ""


def lora_factors(chain: list[nn.Module], spec: ExpertsSpec, experts: nn.Module):
    """(gate_up ExpertLoRA or None, down ExpertLoRA or None) in the chain's state now, or None when
    PEFT's own forward must run (disabled or merged adapters, not exactly one active adapter)."""
    found = {}
    active_names = set()
    for wrapper in chain:
        if wrapper.disable_adapters or wrapper.merged:
            return None
        active = [a for a in wrapper.active_adapters if a in wrapper.lora_A.keys()]
        if len(active) != 1:
            return None
        name = active[0]
        active_names.add(name)
        a, b = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight
        if is_dtensor(a) or is_dtensor(b) or wrapper.lora_B[name].bias is not None:
            return None
        stack = getattr(experts, wrapper.parameter_name)
        n_exp = stack.shape[0]
        logical = stack.transpose(1, 2) if spec.transposed else stack            # [E, out, in]
        rank = a.shape[0] // n_exp
        if a.shape != (rank * n_exp, logical.shape[2]) or b.shape != (logical.shape[1], rank * n_exp):
            return None
        found[wrapper.parameter_name] = ExpertLoRA(a.view(n_exp, rank, a.shape[1]),
                                                   b.view(b.shape[0], rank, n_exp).permute(2, 0, 1),
                                                   float(wrapper.scaling[name]))
    if len(active_names) != 1:
        return None
    return found.get(spec.gate_up), found.get(spec.down)


def _lora_forward(wrapper: nn.Module, chain, experts: nn.Module, spec: ExpertsSpec, original, tokens: TokenState):
    signature = experts.__dict__[FORWARD_ATTR][1]  # the experts' own forward's, saved when it was replaced

    def forward(*args, **kwargs):
        call = _split_args(spec, signature, args, kwargs)
        loras = None if call is None else lora_factors(chain, spec, experts)
        if loras is None or is_dtensor(getattr(experts, spec.gate_up)):
            return original(*args, **kwargs)
        return _fused(spec, experts, *call, loras, tokens)

    forward.__wrapped__ = original
    return forward


def _probe_lora(chain, experts: nn.Module, spec: ExpertsSpec, fused_forward, original) -> str:
    """'' when the fused forward equals PEFT's on a probe with random B (restored after), else why."""
    stack = getattr(experts, spec.gate_up)
    if stack.is_meta:
        return ""  # verified on the experts alone; the factor layout is PEFT's, checked in tests
    saved = []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[stack.device] if stack.is_cuda else []):
            torch.manual_seed(2)
            for w in chain:
                for name in w.lora_B.keys():
                    weight = w.lora_B[name].weight
                    saved.append((weight, weight.detach().clone()))
                    weight.copy_(torch.randn_like(weight) / weight.shape[1] ** 0.5)
            gate_up, _ = _logical((spec.gate_up, spec.down), spec.transposed, experts)
            x = torch.randn(_PROBE_TOKENS, gate_up.shape[2], device=stack.device).to(stack.dtype)
            idx, w_ = _probe_routing(gate_up.shape[0], stack.device)
            args = (x, idx, w_.to(stack.dtype)) if spec.index_first else (x, w_.to(stack.dtype), idx)
            theirs = original(*args)
            ours = fused_forward(*args)
            err = _rel(ours, theirs)
            if err > _tolerance(stack.dtype):
                return f"fused LoRA experts disagree with PEFT on the probe (rel. error {err:.2e})"
            return ""
    except Exception as exc:  # noqa: BLE001
        return f"LoRA probe failed ({type(exc).__name__}: {str(exc)[:60]})"
    finally:
        with torch.no_grad():
            for weight, value in saved:
                weight.copy_(value)


# ------------------------------------------------------------------------------------------------
# Real tokens and the aux loss (model-level hooks).
# ------------------------------------------------------------------------------------------------
def _tokens_of(args, kwargs) -> tuple[int, ...] | None:
    ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
    if torch.is_tensor(ids):
        return tuple(ids.shape)
    embeds = kwargs.get("inputs_embeds")
    return tuple(embeds.shape[:-1]) if torch.is_tensor(embeds) else None


def _pre_forward(tokens: TokenState):
    def hook(module, args, kwargs):
        shape = _tokens_of(args, kwargs)
        mask, pending = kwargs.get("attention_mask"), tokens.pending
        tokens.pending, tokens.current, tokens.explicit = None, None, False
        if torch.is_tensor(mask) and shape is not None and tuple(mask.shape) == shape:
            tokens.current, tokens.shape = mask.reshape(-1).bool(), shape
        elif pending is not None and shape is not None and tuple(pending.shape) == shape:
            tokens.current, tokens.shape, tokens.explicit = pending.reshape(-1).bool(), shape, True
        return None

    return hook


class AuxLoss:
    """The model's own load-balancing loss function, over real tokens (see the module docstring)."""

    def __init__(self, hf: nn.Module, tokens: TokenState):
        module = inspect.getmodule(type(hf))
        self.fn = getattr(module, "load_balancing_loss_func", None)
        config = getattr(hf, "config", None)
        self.num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
        self.top_k = getattr(config, "num_experts_per_tok", None)
        self.coef = getattr(config, "router_aux_loss_coef", None)
        self.tokens = tokens
        self.status = "unchecked"  # -> "verified", or why the model's aux loss is kept as it is

    def describe(self) -> str:
        if self.fn is None:
            return "the model's aux loss (if any) is kept: no load_balancing_loss_func beside its class"
        return ("aux loss: the model's own load_balancing_loss_func over real tokens (padding excluded: by the "
                "attention_mask, or the packed batch's real_tokens)")

    def hook(self, module, args, kwargs, out):
        if not self.tokens.explicit or self.fn is None or self.status not in ("unchecked", "verified"):
            return None
        aux, logits = _field(out, "aux_loss"), _field(out, "router_logits")
        if aux is None or not isinstance(logits, tuple) or not logits:
            return None
        if self.status == "unchecked":  # the model's own function reproduces its aux loss over all rows?
            mine = self.fn(logits, self.num_experts, self.top_k, None)
            ok = torch.is_tensor(mine) and abs(float(mine.detach()) - float(aux.detach())) <= 1e-4 * max(1.0, abs(float(aux.detach())))
            self.status = "verified" if ok else "load_balancing_loss_func does not reproduce the model's aux loss: kept"
            if not ok:
                return None
        mask = self.tokens.current.view(self.tokens.shape).long().to(logits[0].device)  # as an attention_mask
        real = self.fn(logits, self.num_experts, self.top_k, mask)
        loss = _field(out, "loss")
        if loss is not None and self.coef is not None:
            out["loss"] = loss + self.coef * (real.to(loss.device) - aux.to(loss.device))
        out["aux_loss"] = real
        return out


def _field(out, name):
    if isinstance(out, dict) or hasattr(out, "keys"):
        return out.get(name) if hasattr(out, "get") else None
    return None


def set_real_tokens(model: nn.Module, mask: torch.Tensor | None) -> None:
    """The next forward's real tokens ([batch, seq] bool, e.g. a packed batch's `real_tokens`), for
    a model whose MoE experts fastft patched: padding is routed to no expert and left out of the aux
    loss. A forward with an attention_mask uses that instead. No-op for other models."""
    state = getattr(model, "_fastft_patch_state", None)
    moe = state.get("moe") if state else None
    if moe and "tokens" in moe and moe["experts"]:
        moe["tokens"].pending = mask


# ------------------------------------------------------------------------------------------------
# Install / uninstall.
# ------------------------------------------------------------------------------------------------
_PROBED: dict[tuple, ExpertsSpec | str] = {}


def _key(module: nn.Module, stacks) -> tuple:
    params = [getattr(module, n) for n in stacks[:2]]
    return (type(module), stacks, tuple(tuple(p.shape) for p in params), str(params[0].dtype))


def _parents(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    return {id(child): (name, parent) for name, parent in model.named_modules() for child in parent.children()}


def install(model: nn.Module, hf: nn.Module, report) -> dict:
    """Patch every experts module of model (and the PEFT ParamWrappers around them); returns the
    state `uninstall` needs. Reports every experts-like module, patched or not."""
    tokens = TokenState()
    state = {"experts": [], "lora": [], "hooks": [], "tokens": tokens}
    parents = _parents(model)
    for name, module in list(model.named_modules()):
        if is_lora_layer(module) or FORWARD_ATTR in module.__dict__:
            continue
        stacks = expert_stacks(module)
        if stacks is None:
            if sum(p.dim() == 3 for p in module.parameters(recurse=False)) >= 2:
                shapes = [tuple(p.shape) for p in module.parameters(recurse=False)]
                report.add("moe", name, type(module).__name__,
                           reason=f"parameters {shapes} are not one gated experts pair [E, 2I, H] + [E, H, I] "
                                  "(e.g. expert biases, non-gated experts): transformers' experts kept")
            continue
        key = _key(module, stacks)
        spec = _PROBED.get(key)
        if not isinstance(spec, ExpertsSpec):
            spec = probe_experts(module, stacks)
            _PROBED[key] = spec
        if isinstance(spec, str):
            report.add("moe", name, type(module).__name__, reason=f"{spec}: transformers' experts kept")
            continue
        original = module.forward
        module.forward = _experts_forward(module, spec, original, tokens)
        module.__dict__[FORWARD_ATTR] = (spec, _signature(original))
        state["experts"].append(name)
        report.add("moe", name, type(module).__name__, f"moe_experts ({spec.describe()})",
                   _describe_block(module, spec, parents))
    for name, module in list(model.named_modules()):
        if not is_param_wrapper(module) or is_param_wrapper(parents.get(id(module), ("", None))[1]):
            continue
        chain = _chain(module)
        experts = chain[-1].base_layer
        if FORWARD_ATTR not in experts.__dict__:
            continue
        spec = experts.__dict__[FORWARD_ATTR][0]
        why = _lora_static_reason(chain, spec)
        if not why:
            original = module.forward
            fused = _lora_forward(module, chain, experts, spec, original, tokens)
            why = _probe_lora(chain, experts, spec, fused, original)
        if why:
            report.add("lora", name, "lora.ParamWrapper", reason=f"{why}: PEFT's merged-weight path (its experts still fused)")
        else:
            module.forward = fused
            module.__dict__[FORWARD_ATTR] = (spec, None)
            state["lora"].append(name)
            report.add("lora", name, "lora.ParamWrapper", "moe_experts + LoRA",
                       "rank-r terms inside the grouped GEMMs: " + ", ".join(w.parameter_name for w in chain))
        for wrapper in chain:  # either way this patch owns them: fastft/patching/lora.py leaves them alone
            setattr(wrapper, LORA_ATTR, True)
    if state["experts"]:
        aux = AuxLoss(hf, tokens)
        state["hooks"] = [hf.register_forward_pre_hook(_pre_forward(tokens), with_kwargs=True),
                          hf.register_forward_hook(aux.hook, with_kwargs=True)]
        state["aux"] = aux
    return state


def _describe_block(experts: nn.Module, spec: ExpertsSpec, parents) -> str:
    """Router spec and shared experts of the experts' block, for the report."""
    block_name, block = parents.get(id(experts), ("", None))
    if block is None:
        return "no parent block"
    gate_up, _ = _logical((spec.gate_up, spec.down), spec.transposed, experts)
    router, rspec = probe_router(block, experts, gate_up.shape[2], gate_up.shape[0])
    layer = parents.get(id(block), ("", None))[1]
    parts = [f"router `{router}`: {rspec.describe() if isinstance(rspec, RouterSpec) else rspec} (the model's own module)"]
    shared = shared_experts(block, layer, experts, router)
    if shared:
        parts.append(shared)
    return "; ".join(parts)


def uninstall(model: nn.Module, state: dict) -> None:
    for handle in state.get("hooks", []):
        handle.remove()
    for name in state.get("lora", []) + state.get("experts", []):
        module = model.get_submodule(name)
        module.__dict__.pop(FORWARD_ATTR, None)
        module.__dict__.pop("forward", None)
    for module in model.modules():
        module.__dict__.pop(LORA_ATTR, None)
