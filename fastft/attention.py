"""The `fastft` attention implementation: varlen FlashAttention for packed batches, SDPA otherwise.

Registered with transformers' AttentionInterface (the attention call) and AttentionMaskInterface
(the mask the model builds) under the name "fastft", then selected per model with
`model.set_attn_implementation("fastft")`: no modelling code is copied or monkey-patched.

Dispatch, per call (query/key/value arrive as [batch, heads, seq, head_dim]):
- CUDA, no KV cache (key length == query length), no 4-D mask, a varlen backend that can do
  what the layer asks (sliding window, soft-capping): varlen FlashAttention over the flattened
  batch with cu_seqlens. Documents are the packed batch's `cu_seq_lens_q/k` (transformers'
  FlashAttentionKwargs, from the collator) or, failing that, the runs of `position_ids` that
  restart at 0. cu_seqlens and max length are computed once per batch (cached on the
  position_ids tensor) and reused by every layer: one host sync per batch, none per layer.
  Backends, in order: the flash-attn package's `flash_attn_varlen_func`, then
  `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10; its signature changed from
  `is_causal=` in 2.10 to `window_size=` in 2.11 and grew `enable_gqa` in 2.12; handled here).
  The mask function returns None in that case, so no [T, T] mask is ever built.
- Everything else (CPU, KV-cache decoding, padded batches, no backend): transformers' SDPA with
  the mask transformers builds, narrowed to a block-diagonal causal mask when the batch is
  packed (transformers itself detects packing only when no KV cache exists, which a model with
  `use_cache=True` in its config always creates, so it cannot be relied on); attention logit
  soft-capping (Gemma 2), which SDPA cannot do, runs the model's own eager attention with an
  additive mask.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
from functools import lru_cache

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

NAME = "fastft"


# fastft.plan runs a model on fake CPU tensors to plan what a GPU holds: inside `as_on_gpu()` the
# dispatch below is the CUDA one, with torch's varlen op (whose fake implementation exists).
_AS_ON_GPU = contextvars.ContextVar("fastft_attention_as_on_gpu", default=False)


@contextlib.contextmanager
def as_on_gpu():
    token = _AS_ON_GPU.set(True)
    try:
        yield
    finally:
        _AS_ON_GPU.reset(token)


def _on_gpu(device: torch.device) -> bool:
    return device.type == "cuda" or _AS_ON_GPU.get()


def varlen_backend() -> str | None:
    """'flash_attn', 'torch' or None: which varlen kernel this process can call."""
    return "torch" if _AS_ON_GPU.get() else _detected_backend()


@lru_cache(maxsize=None)
def _detected_backend() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
        return "flash_attn"
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        return "torch"
    except ImportError:
        return None


@lru_cache(maxsize=None)
def _torch_varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _softcap(config) -> float | None:
    return getattr(config, "attn_logit_softcapping", None) if config is not None else None


def varlen_supports(config, sliding_window: int | None = None, softcap: float | None = None) -> bool:
    """Whether the varlen backend can run this layer exactly."""
    backend = varlen_backend()
    if backend == "flash_attn":
        return True
    if backend != "torch":
        return False
    params = _torch_varlen_params()
    if softcap:
        return False
    if sliding_window and "window_size" not in params:
        return False
    return True


def _layer_features(config) -> tuple[int | None, float | None]:
    window = getattr(config, "sliding_window", None) if config is not None else None
    return window, _softcap(config)


def fastft_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                attention_mask: torch.Tensor | None = None, config=None, device="cpu", **kwargs):
    """None where varlen attention will run (no mask is built), else SDPA's or eager's mask."""
    device = torch.device(device)
    window, softcap = _layer_features(config)
    if (_on_gpu(device) and attention_mask is None and q_offset == 0 and q_length == kv_length
            and _half(kwargs.get("dtype"), device) is not None and varlen_supports(config, window, softcap)):
        return None
    if softcap:  # the eager path adds the mask to the scores
        return eager_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                          device=device, **kwargs)
    kwargs.pop("dtype", None)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                     device=device, **kwargs)


# FlashAttention kernels take 16-bit inputs and head dims up to 256.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _half(dtype: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The 16-bit dtype attention runs in: `dtype` itself, or under autocast to a 16-bit dtype the
    autocast dtype (SDPA is on autocast's 16-bit list; fp32 master weights give fp32 q/k/v here,
    since the rotary embedding's fp32 cos/sin promote them), else None."""
    if dtype in HALF_DTYPES:
        return dtype
    if torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) in HALF_DTYPES:
        return torch.get_autocast_dtype(device.type)
    return None
MAX_HEAD_DIM = 256

_CU_CACHE: dict[str, object] = {}


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32, [docs + 1]) over the flattened batch and the longest document.

    A document starts wherever position_ids is 0. Cached on the tensor (same object, same version),
    so the layers of one forward share a single computation and a single host sync.
    """
    key = (id(position_ids), position_ids.data_ptr(), position_ids._version, tuple(position_ids.shape))
    if _CU_CACHE.get("key") == key:
        return _CU_CACHE["value"]
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    if starts.numel() == 0 or starts[0].item() != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_full((1,), flat.numel())]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item())
    _CU_CACHE.update(key=key, value=(cu, max_len), ref=position_ids)
    return cu, max_len


def _document_ids(query: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """[B, T] document index of each token when the batch is packed (several documents in a row), else None."""
    batch, _, seq, _ = query.shape
    key = None
    if kwargs.get("cu_seq_lens_q") is not None:
        cu = kwargs["cu_seq_lens_q"]
        key = ("cu", id(cu), cu._version)
        if _DOC_CACHE.get("key") == key:
            return _DOC_CACHE["value"]
        tokens = torch.arange(batch * seq, device=cu.device)
        doc = torch.bucketize(tokens, cu[1:].to(tokens.dtype), right=True).view(batch, seq)
    elif kwargs.get("position_ids") is not None and kwargs["position_ids"].numel() == batch * seq:
        position_ids = kwargs["position_ids"]
        key = ("pos", id(position_ids), position_ids._version)
        if _DOC_CACHE.get("key") == key:
            return _DOC_CACHE["value"]
        doc = (position_ids.reshape(batch, seq) == 0).cumsum(-1)
    else:
        return None
    packed = bool((doc != doc[:, :1]).any())  # one host sync per batch, then cached
    value = doc if packed else None
    _DOC_CACHE.update(key=key, value=value, ref=kwargs.get("cu_seq_lens_q", kwargs.get("position_ids")))
    return value


_DOC_CACHE: dict[str, object] = {}


def _with_document_mask(attention_mask: torch.Tensor | None, doc: torch.Tensor, query: torch.Tensor):
    """The layer's mask narrowed to causal attention within each document."""
    seq = doc.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc.device).tril()
    allowed = (doc[:, None, :, None] == doc[:, None, None, :]) & causal  # [B, 1, T, T]
    if attention_mask is None:
        return allowed
    if attention_mask.dtype == torch.bool:
        return attention_mask & allowed
    return attention_mask.masked_fill(~allowed, torch.finfo(attention_mask.dtype).min)


def _documents(query: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    batch, _, seq, _ = query.shape
    if kwargs.get("cu_seq_lens_q") is not None:
        cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k", kwargs["cu_seq_lens_q"])
        return (cu_q.to(torch.int32), cu_k.to(torch.int32), int(kwargs["max_length_q"]),
                int(kwargs.get("max_length_k", kwargs["max_length_q"])))
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.numel() == batch * seq:
        cu, max_len = cu_seqlens_from_position_ids(position_ids)
        return cu, cu, max_len, max_len
    cu = torch.arange(0, (batch + 1) * seq, seq, device=query.device, dtype=torch.int32)
    return cu, cu, seq, seq


def _varlen(query, key, value, scaling, sliding_window, softcap, kwargs) -> torch.Tensor:
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    cu_q, cu_k, max_q, max_k = _documents(query, kwargs)
    # [B, H, T, D] -> [B*T, H, D]
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (query, key, value))
    left = sliding_window - 1 if sliding_window else -1
    if varlen_backend() == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, softmax_scale=scaling, causal=True,
                                     window_size=(left, 0), softcap=softcap or 0.0)
    else:
        from torch.nn.attention.varlen import varlen_attn

        params = _torch_varlen_params()
        extra = {}
        if kv_heads != heads:
            if "enable_gqa" in params:
                extra["enable_gqa"] = True
            else:
                k = k.repeat_interleave(heads // kv_heads, dim=1)
                v = v.repeat_interleave(heads // kv_heads, dim=1)
        if "window_size" in params:  # torch >= 2.11
            out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, window_size=(left, 0), **extra)
        else:  # torch 2.10: is_causal, default scale only
            if scaling is not None and abs(scaling - dim**-0.5) > 1e-12:
                q = q * (scaling / dim**-0.5)
            out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True)
    return out.reshape(batch, seq, heads, dim)


def fastft_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, **kwargs):
    """AttentionInterface function: returns (output [batch, seq, heads, head_dim], None)."""
    half = _half(query.dtype, query.device)
    if (_on_gpu(query.device) and attention_mask is None and key.shape[2] == query.shape[2] and dropout == 0.0
            and half is not None and query.shape[-1] <= MAX_HEAD_DIM and varlen_supports(getattr(module, "config", None), sliding_window, softcap)):
        query, key, value = (t.to(half) for t in (query, key, value))  # as autocast casts SDPA's inputs
        return _varlen(query, key, value, scaling, sliding_window, softcap, kwargs), None
    if key.shape[2] == query.shape[2]:
        doc = _document_ids(query, kwargs)
        if doc is not None:
            attention_mask = _with_document_mask(attention_mask, doc, query)
    if softcap:
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"fastft attention: {type(module).__name__} asks for logit soft-capping, which SDPA "
                               "cannot do, and its module has no eager_attention_forward; use "
                               "attn_implementation='eager' for this model")
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     sliding_window=sliding_window, softcap=softcap, **kwargs)
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> None:
    AttentionInterface.register(NAME, fastft_attention_forward)
    AttentionMaskInterface.register(NAME, fastft_mask)


def describe(config) -> str:
    """What the fastft attention does for this config on this machine (for the PatchReport)."""
    window, softcap = _layer_features(config)
    backend = varlen_backend()
    if backend and varlen_supports(config, window, softcap):
        what = f"varlen FlashAttention ({'flash-attn' if backend == 'flash_attn' else 'torch varlen_attn'})"
    elif backend:
        what = "SDPA (the varlen backend cannot do this model's " + ("soft-capping" if softcap else "window") + ")"
    else:
        what = "SDPA with block-diagonal masks (no CUDA varlen backend here)"
    if softcap:
        what += "; soft-capped scores run the model's eager attention off flash-attn"
    if window:
        what += f"; sliding window {window}"
    return what
