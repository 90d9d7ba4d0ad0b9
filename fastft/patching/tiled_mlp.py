"""Tiled MLP: a gated MLP run over chunks of the tokens, so that its [tokens, intermediate]
activations exist one chunk at a time, in the forward and in the backward.

Why. A gated MLP (SwiGLU, GeGLU) keeps its pre-activations for the backward: the fused LoRA MLP
kernel g_base and u_base, PEFT's eager MLP g, act(g), u and h, each [T, I]. With I = 3.5 H
(Llama-3.1-8B: H = 4096, I = 14336) that is 7-14x the block's input; at 128k tokens, 2 x 128k x
14336 x 2 bytes = 7 GiB for one layer, and a checkpointed block still materialises it while it
recomputes. Tiled, the MLP holds one chunk's worth, and the longest row that fits grows.

How. y = cat over chunks of checkpoint(mlp, x_c), x_c the chunks of x flattened to [tokens, H]
(torch.split: the chunks' input gradients are concatenated once, not summed as padded copies).
Each chunk's forward saves only its input (a view of x); its backward recomputes that chunk
alone (non-reentrant checkpoint: RNG and autocast restored, so dropout masks match, and it nests
inside block-level activation checkpointing). The cost is one more MLP forward per step. The
idea is Arctic Long Sequence Training's TiledMLP (Bekman et al. 2025) and Unsloth's tiled MLP.

Exactness. A gated MLP is token-wise, so each token's output is the untiled one's; weight
gradients are the same per-token terms summed in another order. Which modules: found by
structure (two [H -> I] projections and one [I -> H] among the children, nn.Linear or PEFT LoRA
layers, and a parameterless activation), then probed: tiled == untiled on a random input (a
random CPU copy for a module on the meta device), within the probe tolerance the LoRA MLP probe
uses. What fails is left untiled and named in the report.

Through the fused kernels: the wrapper calls the module's forward as it is when tiling is applied
(fastft.patch's fused LoRA MLP block, or the module's own forward), once per chunk; so apply it
after fastft.patch.

Chunking ("model.tiled_mlp"): "off"; an int, tokens per chunk; or "auto": untiled up to
max(4096, H) tokens (short rows pay nothing), then chunks of that many tokens, and from 8 such
chunks on, 8 chunks of T / 8. Why 8: at a long row's peak (a block recomputing in the backward)
the MLP's chunk transients, about 5 x chunk x I x 2 bytes (g, u, and their gradients), then weigh
what the block's other [T, H] transients weigh (some 10 x T x H x 2 bytes) when the chunk is
T x H x 2 / (5 I), about T / 9 for I = 3.5 H: smaller chunks save little more, and each chunk is
one more round of launches (and of ops for the planner to trace). The chunk size is decided at
each call from the number of tokens it gets.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastft.patching import hub_kernels

STATE = "_fastft_tiled_mlp"
AUTO_MIN_CHUNK = 4096
AUTO_CHUNKS = 8
_PROBED: dict[tuple, str] = {}  # (class, projection shapes, dtype, fused forward?) -> the probe's verdict


def chunk_tokens(setting: str | int, tokens: int, hidden: int) -> int:
    """Tokens per chunk for a call with `tokens` tokens (>= tokens: run untiled)."""
    if setting == "off":
        return tokens
    chunk = max(AUTO_MIN_CHUNK, hidden, -(-tokens // AUTO_CHUNKS)) if setting == "auto" else int(setting)
    if chunk < 1:
        raise ValueError(f"model.tiled_mlp={setting!r}: tokens per chunk must be >= 1")
    return chunk


def gated_hidden(module: nn.Module) -> int | None:
    """H when the module has two [H -> I] projections, one [I -> H] and a parameterless child
    (the activation) among its children, else None."""
    shapes = []
    for child in module.children():
        base = getattr(child, "base_layer", child)  # a PEFT LoRA layer wraps its nn.Linear
        if isinstance(base, nn.Linear):
            shapes.append((base.in_features, base.out_features))
    if len(shapes) != 3 or not any(not list(c.parameters()) for c in module.children()):
        return None
    return next((h for i, h in shapes if sum(1 for s in shapes if s == (h, i)) == 2), None)


def _tiled(original, setting, hidden: int):
    def forward(x, *args, **kwargs):
        if args or kwargs or not isinstance(x, torch.Tensor):
            return original(x, *args, **kwargs)
        tokens = x.numel() // x.shape[-1]
        chunk = chunk_tokens(setting, tokens, hidden)
        if chunk >= tokens:
            return original(x)
        flat = x.reshape(tokens, x.shape[-1])
        outs = [checkpoint(original, part, use_reentrant=False) for part in flat.split(chunk)]
        return torch.cat(outs).view(*x.shape[:-1], -1)

    forward.__wrapped__ = original
    return forward


def _input_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the MLP's inputs come in: its first projection's weight's (a 4-bit one's: the dtype
    it was quantized from, not its packed uint8)."""
    from fastft import quantization

    base = next(getattr(c, "base_layer", c) for c in module.children()
                if isinstance(getattr(c, "base_layer", c), nn.Linear))
    return quantization.weight_dtype(base) if quantization.is_4bit(base) else base.weight.dtype


def _probe(module: nn.Module, hidden: int) -> str:
    """'' when tiling this module reproduces it on a random input, else why not."""
    weight = next(module.parameters())
    if weight.is_meta:
        from fastft.patching.probe import random_copy

        return _probe(random_copy(module), hidden)
    dtype = _input_dtype(module)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
            x = torch.randn(2, 5, hidden, device=weight.device).to(dtype)
            plain = module(x)
            tiled = _tiled(module.forward, 3, hidden)(x)
    except Exception as exc:  # a forward that wants more than x
        return f"probe failed ({type(exc).__name__}: {str(exc)[:60]})"
    finally:
        for m, training in modes.items():
            m.training = training
    if not isinstance(plain, torch.Tensor) or plain.shape != x.shape:
        return "forward does not map x to a tensor of its shape"
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5
    err = ((tiled.float() - plain.float()).norm() / plain.float().norm().clamp_min(1e-30)).item()
    return "" if err <= tol else f"tiled != untiled on the probe (relative error {err:.1e}): not token-wise"


def apply(model: nn.Module, setting: str | int, report=None) -> list[str]:
    """Tile every gated MLP of `model` (see the module docstring). Returns the tiled modules'
    names; with a PatchReport, adds what was tiled and what was not, and why."""
    if setting == "off":
        return []
    chunk_tokens(setting, 1, 1)  # refuse a bad setting before touching the model
    tiled = []
    for name, module in model.named_modules():
        hidden = None if STATE in module.__dict__ else gated_hidden(module)
        if hidden is None:
            continue
        linears = [getattr(c, "base_layer", c) for c in module.children()]
        key = (type(module), tuple((m.in_features, m.out_features) for m in linears if isinstance(m, nn.Linear)),
               _input_dtype(module), "forward" in module.__dict__)
        if key not in _PROBED:  # one probe per kind of MLP (a meta module's probe builds a full-size copy)
            _PROBED[key] = _probe(module, hidden)
        why = _PROBED[key]
        if why:
            if report is not None:
                report.add("tiled_mlp", name, type(module).__name__, reason=why)
            continue
        previous = module.__dict__.get("forward")  # fastft.patch's fused forward, if any
        module.forward = _tiled(module.forward, setting, hidden)
        module.__dict__[STATE] = previous
        hub_kernels.claim(module)  # a tagged MLP keeps its tiles through transformers' kernelize
        tiled.append(name)
        if report is not None:
            chunk = (f"rows over {max(AUTO_MIN_CHUNK, hidden)} tokens in chunks of that many, at most {AUTO_CHUNKS}"
                     if setting == "auto" else f"{setting}-token chunks")
            report.add("tiled_mlp", name, type(module).__name__, "tiled", chunk)
    return tiled


def remove(model: nn.Module) -> None:
    """Undo `apply`: each tiled module gets back the forward it had."""
    for module in model.modules():
        if STATE in module.__dict__:
            previous = module.__dict__.pop(STATE)
            if previous is None:
                module.__dict__.pop("forward", None)
                hub_kernels.release(module)
            else:
                module.forward = previous
