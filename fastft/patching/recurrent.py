"""Document resets for recurrent sequence mixers (the Mamba2 layers of hybrid models: Bamba).

A Mamba mixer carries a state along the sequence (a causal depthwise conv1d over the last
`d_conv` tokens, then the SSM recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t), so in a
packed row document 2 starts from document 1's state unless the state is reset at each document
start. The mixer is found by structure (a module holding an `A_log` parameter and a `conv1d`
child), and gets a per-instance forward that reads the forward's documents (fastft.attention's
ForwardState, computed once per batch) and, when the batch is packed:

- where the mamba kernels are installed (`mamba_ssm` and `causal_conv1d`, CUDA): passes
  `seq_idx` ([batch, seq] int32, the document of each token), which transformers' Mamba2 mixers
  hand to `causal_conv1d_fn`, `mamba_chunk_scan_combined` and `mamba_split_conv1d_scan_combined`
  through their **kwargs; those kernels restart the conv window and the SSM state wherever
  seq_idx changes (mamba_ssm's ssd_combined: the state is not carried across a change of
  seq_idx; causal_conv1d: taps from another sequence are zero);
- elsewhere (the torch path, whose chunked scan has no seq_idx: transformers 5.24 refuses it,
  5.17 silently drops it): runs the mixer's own forward on the documents as separate rows,
  [documents, longest document, hidden] with zero right-padding, and scatters the result back.
  Each document then starts from the zero state exactly as if it ran alone (the mixer is causal,
  so the padding after a document cannot reach it). Costs documents x longest-document slots
  instead of batch x seq: a row of one long and many short documents pays for the padding.

Decoding (a cache holding earlier tokens) and unpacked batches run the mixer untouched; an
empty cache that use_cache=True made for a packed training batch is not written.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from fastft import attention

FORWARD_ATTR = "_fastft_recurrent_forward"
CACHE_ARGUMENTS = ("cache", "cache_params", "past_key_values")


def is_mixer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "A_log", None), nn.Parameter) and isinstance(
        getattr(module, "conv1d", None), nn.Conv1d)


def kernels_available(device: torch.device) -> bool:
    """Whether the mamba kernels that honour seq_idx would run on this device."""
    return (device.type == "cuda" and importlib.util.find_spec("mamba_ssm") is not None
            and importlib.util.find_spec("causal_conv1d") is not None)


def _per_document(original, hidden: torch.Tensor, docs: attention.Documents, kwargs: dict) -> torch.Tensor:
    """The mixer over each document as its own row (module docstring)."""
    batch, seq, width = hidden.shape
    cu = docs.cu_seqlens.to(hidden.device, torch.long)
    offsets = torch.arange(docs.max_length, device=hidden.device)
    lengths = cu[1:] - cu[:-1]
    source = (cu[:-1, None] + offsets).clamp(max=batch * seq - 1)  # [docs, longest]
    valid = offsets < lengths[:, None]
    rows = hidden.reshape(batch * seq, width)[source] * valid[..., None].to(hidden.dtype)
    out = original(hidden_states=rows, **kwargs)
    # Token t of document d sits at d * longest + (t - start of d) in the per-document layout.
    doc = docs.ids.reshape(-1).to(torch.long)
    position = torch.arange(batch * seq, device=hidden.device) - cu[doc]
    return out.reshape(docs.count * docs.max_length, -1)[doc * docs.max_length + position].view(batch, seq, -1)


def _mixer_forward(module: nn.Module, original):
    def forward(*args, **kwargs):
        if "hidden_states" in kwargs:
            hidden = kwargs.pop("hidden_states")
        else:
            hidden, args = args[0], args[1:]
        state = attention.current()
        docs = state.documents if state is not None and not state.kv_cache else None
        if docs is None or not docs.packed or args:
            return original(hidden, *args, **kwargs)
        # A packed row is trained on, never decoded from: an (empty) cache the model made because
        # of use_cache=True is left out, so the mixer runs its training path.
        kwargs.update({k: None for k in CACHE_ARGUMENTS if k in kwargs})
        if kernels_available(hidden.device):
            state.count(module, "recurrent/seq_idx")
            return original(hidden, seq_idx=docs.ids, **kwargs)
        state.count(module, "recurrent/per-document")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("attention_mask", "position_ids", "seq_idx")
                  and not k.startswith(("cu_seq_lens", "max_length"))}
        return _per_document(original, hidden, docs, kwargs)

    forward.__wrapped__ = original
    return forward


def install(model: nn.Module, report) -> list[str]:
    """Give every recurrent mixer of `model` the document-reset forward; returns their names."""
    names = []
    for name, module in model.named_modules():
        if not is_mixer(module):
            continue
        kind = type(module).__name__
        if "forward" in module.__dict__:
            report.add("recurrent", name, kind, reason="forward already replaced on the instance: left alone")
            continue
        module.forward = _mixer_forward(module, module.forward)
        setattr(module, FORWARD_ATTR, True)
        names.append(name)
        report.add("recurrent", name, kind, "document resets",
                   "seq_idx to the mamba kernels on CUDA where installed, else the mixer per document")
    return names


def uninstall(model: nn.Module, names: list[str]) -> None:
    for name in names:
        module = model.get_submodule(name)
        if module.__dict__.pop(FORWARD_ATTR, None):
            module.__dict__.pop("forward", None)
