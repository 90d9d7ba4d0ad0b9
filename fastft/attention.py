"""The `fastft` attention implementation: varlen FlashAttention for packed batches, SDPA otherwise.

Registered with transformers' AttentionInterface (the attention call) and AttentionMaskInterface
(the mask the model builds) under the name "fastft", then selected per model with
`model.set_attn_implementation("fastft")`: no modelling code is copied or monkey-patched.

One forward, one decision, one document structure:
- `install(model)` gives the causal-LM module a forward pre-hook and post-hook (per instance)
  that open a `ForwardState` for each forward. The state holds the batch's documents, computed
  once, when first asked for (`Documents`): from `cu_seq_lens_q/k` + `max_length_q/k` when the collator
  gives them (transformers' FlashAttentionKwargs names; no host sync), else from the runs of
  `position_ids` (a new document wherever a position is not its predecessor + 1, transformers'
  own packing rule): one device-to-host copy of position_ids per batch, none per layer. So no
  architecture has to forward these kwargs to its attention (GPTBigCode does not forward
  position_ids, Nemotron and StableLm do not forward cu_seq_lens), and recurrent mixers read
  the same documents (fastft/patching/recurrent.py).
- `decide()` is the one function that picks the path of an attention call: varlen, SDPA with a
  (document) mask, or eager (soft-capped scores, which SDPA cannot do). It sees everything that
  matters: the device, the dtype attention will actually see (the autocast dtype when autocast
  is on: fp32 master weights under bf16 autocast give bf16 queries), head dim, dropout, window,
  soft-cap, KV cache, padding, the registered varlen backends. A state asks it once per window
  size (full and sliding layers differ) and remembers the answer; the mask function and every
  attention call of the forward obey that answer. When the answer is varlen the mask function
  returns None (no [T, T] mask is ever built); when it is SDPA or eager the mask function builds
  the mask with the documents and the window in it.
- Activation checkpointing recomputes a block in the backward, after the forward's state is
  gone: the decoder blocks get a per-instance forward wrapper (`_block_forward`) that makes the
  recomputation re-enter the state of the forward it recomputes, so a recomputed layer takes
  the same path over the same documents (fastft's checkpointing and transformers', reentrant
  or not, 5.17 and 5.24).
- Every attention call is counted per layer and path (`ForwardState.count`, added to the model's
  counts when the forward ends, surfaced as `model.fastft_report.attention_calls`);
  recomputations come after that and are not counted twice.
- Compiled blocks (`compile_blocks`, distributed.compile): the block's own forward is compiled and
  this wrapper stays eager; the documents reach the block as the collator's cu_seq_lens (marked
  dynamic: one graph for any document count) and the forward's state, read through the
  thread-local: a block compiles once per kind of batch, not once a step (measured with torch
  2.14: benchmarks/compile_census.py, tests/test_compile_model.py).

Varlen backends (`VarlenBackend`, tried in order): the flash-attn package's
`flash_attn_varlen_func` (CUDA, 16-bit, head dim <= 256, window, soft-cap, GQA), then
`torch.nn.attention.varlen.varlen_attn` (torch >= 2.10; `is_causal=` in 2.10, `window_size=` from
2.11, `enable_gqa` from 2.12: handled here). `register_varlen_backend` puts another one first
(the tests register a per-document SDPA reference for the CPU, so that this dispatch and the
cu_seqlens plumbing run in CI exactly as on a GPU).

Calls that bypass the patched causal-LM module (the inner decoder called directly) have no
state: the mask function then never answers varlen, and the attention call narrows the mask it
gets to the documents it can find in its own kwargs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import sys
import threading
from collections import Counter
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, and_masks, eager_mask, sdpa_mask

from fastft.kernels import _common as _kernels_common
from fastft.kernels._common import autocast_dtype

NAME = "fastft"
HALF_DTYPES = frozenset((torch.float16, torch.bfloat16))


# -- varlen backends ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VarlenBackend:
    """A varlen attention kernel and what it can do.

    `fn(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, softcap, dropout)`: q [tokens, heads,
    dim], k/v [tokens, kv_heads, dim] (GQA: kv_heads divides heads), cu_* int32 [docs + 1],
    causal within each document, `window` the sliding window in tokens (None: full), returns
    [tokens, heads, dim]."""
    name: str
    fn: Callable
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype] = HALF_DTYPES
    max_head_dim: int = 256
    window: bool = True
    softcap: bool = False
    dropout: bool = False


def _flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, softcap, dropout, *, op):
    return op(q, k, v, cu_q, cu_k, max_q, max_k, dropout, softmax_scale=scale, causal=True,
              window_size=(window - 1 if window else -1, 0), softcap=softcap or 0.0)


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, softcap, dropout, *, op,
                  params: frozenset[str]):
    extra = {}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:  # torch >= 2.12
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if "window_size" in params:  # torch >= 2.11
        return op(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(window - 1 if window else -1, 0), **extra)
    dim = q.shape[-1]  # torch 2.10: is_causal, the default scale only
    if scale is not None and abs(scale - dim**-0.5) > 1e-12:
        q = q * (scale / dim**-0.5)
    return op(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True)


_REGISTERED: list[VarlenBackend] = []
_BUILTIN: tuple[VarlenBackend, ...] | None = None


def discover_backends() -> tuple[VarlenBackend, ...]:
    """The installed varlen kernels, found once per process (by the first `install`, at patch
    time): their imports and the torch op's signature are read here and bound into each backend's
    `fn`, so that a forward, traced or not, imports nothing and inspects nothing (dynamo breaks
    the graph at a failing import: issue 25). A plain global, not lru_cache: dynamo traces through
    an lru_cache'd function's body, imports included, whether its cache is warm or not."""
    global _BUILTIN
    if _BUILTIN is not None:
        return _BUILTIN
    found = []
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        pass
    else:
        found.append(VarlenBackend("flash_attn", functools.partial(_flash_attn, op=flash_attn_varlen_func),
                                   frozenset({"cuda"}), softcap=True, dropout=True))
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        pass
    else:
        params = frozenset(inspect.signature(varlen_attn).parameters)
        found.append(VarlenBackend("torch", functools.partial(_torch_varlen, op=varlen_attn, params=params),
                                   frozenset({"cuda"}), window="window_size" in params))
    _BUILTIN = tuple(found)
    return _BUILTIN


def varlen_backends() -> tuple[VarlenBackend, ...]:
    """The varlen backends of this process, in the order they are tried."""
    if _kernels_common.planning_as_on_gpu():
        return tuple(dataclasses.replace(b, devices=b.devices | {"cpu"}) for b in discover_backends() if b.name == "torch")
    return (*_REGISTERED, *discover_backends())


# fastft.plan (fastft/planning/) runs a model on fake CPU tensors to plan what a GPU holds: inside
# `as_on_gpu()` (the kernels' switch, kernels/_common.py) the one backend is torch's varlen op (its
# fake implementation exists; flash-attn's need not), taking CPU tensors as it would CUDA ones, so
# that the plan decides as a GPU run does.
as_on_gpu = _kernels_common.as_on_gpu


def register_varlen_backend(backend: VarlenBackend) -> None:
    """Try `backend` before the others (replacing one of the same name)."""
    unregister_varlen_backend(backend.name)
    _REGISTERED.insert(0, backend)


def unregister_varlen_backend(name: str) -> None:
    _REGISTERED[:] = [b for b in _REGISTERED if b.name != name]


# -- the decision ------------------------------------------------------------------------------

class Path(tuple):
    """(kind, backend, why): kind "varlen" | "sdpa" | "eager"; backend the varlen backend's name;
    why: what kept it off varlen ("" on varlen)."""

    def __new__(cls, kind: str, backend: str = "", why: str = ""):
        return super().__new__(cls, (kind, backend, why))

    kind = property(lambda self: self[0])
    backend = property(lambda self: self[1])
    why = property(lambda self: self[2])

    @property
    def label(self) -> str:
        return f"varlen/{self.backend}" if self.kind == "varlen" else self.kind


def decide(*, device: torch.device, dtype: torch.dtype, head_dim: int | None, dropout: float = 0.0,
           window: int | None = None, softcap: float | None = None, kv_cache: bool = False,
           padded: bool = False, backends: tuple[VarlenBackend, ...] | None = None) -> Path:
    """The attention path for these conditions (module docstring). `dtype` is what attention sees:
    the autocast dtype under autocast. `backends`: this process's (default) or others."""
    fallback = "eager" if softcap else "sdpa"
    if kv_cache:
        return Path(fallback, why="KV cache (decoding)")
    if padded:
        return Path(fallback, why="padded batch (attention_mask given)")
    why = "no varlen backend for this device"
    for backend in varlen_backends() if backends is None else backends:
        if device.type not in backend.devices:
            continue
        if dtype not in backend.dtypes:
            why = f"{backend.name}: {str(dtype).removeprefix('torch.')} (takes {_names(backend.dtypes)})"
        elif head_dim is not None and head_dim > backend.max_head_dim:
            why = f"{backend.name}: head dim {head_dim} > {backend.max_head_dim}"
        elif window and not backend.window:
            why = f"{backend.name}: no sliding window"
        elif softcap and not backend.softcap:
            why = f"{backend.name}: no soft-capping"
        elif dropout and not backend.dropout:
            why = f"{backend.name}: no attention dropout"
        else:
            return Path("varlen", backend.name)
    return Path(fallback, why=why)


def _names(dtypes) -> str:
    return "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def attention_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype attention computes in: the autocast dtype when autocast is on for the device."""
    return autocast_dtype(device.type) or dtype


DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "attn_dropout", "attention_probs_dropout_prob")


@dataclasses.dataclass(frozen=True)
class ModelFeatures:
    """What the decision needs from the model's config (read once at install)."""
    head_dim: int | None
    softcap: float | None
    dropout: float

    @classmethod
    def of(cls, config) -> ModelFeatures:
        heads = getattr(config, "num_attention_heads", None)
        dims = [getattr(config, "head_dim", None), getattr(config, "v_head_dim", None)]
        if getattr(config, "qk_nope_head_dim", None) is not None:  # MLA (MiniCPM3, DeepSeek)
            dims.append(config.qk_nope_head_dim + (getattr(config, "qk_rope_head_dim", 0) or 0))
        dims = [d for d in dims if isinstance(d, int)]
        if not dims and heads and getattr(config, "hidden_size", None):
            dims = [config.hidden_size // heads]
        dropout = max(float(getattr(config, name, 0.0) or 0.0) for name in DROPOUT_FIELDS)
        return cls(max(dims) if dims else None, getattr(config, "attn_logit_softcapping", None) or None, dropout)


# -- documents ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Documents:
    """The documents of a [batch, seq] batch, as one flattened token sequence."""
    cu_seqlens: torch.Tensor   # int32 [count + 1], over the batch·seq tokens
    max_length: int
    count: int
    batch: int
    seq: int

    @property
    def packed(self) -> bool:
        return self.count > self.batch

    @property
    def ids(self) -> torch.Tensor:
        """[batch, seq] int32: the document of each token (unique over the batch)."""
        tokens = torch.arange(self.batch * self.seq, device=self.cu_seqlens.device, dtype=torch.int32)
        return (torch.bucketize(tokens, self.cu_seqlens[1:], right=True).to(torch.int32)
                .view(self.batch, self.seq))

    @classmethod
    def from_cu_seqlens(cls, cu: torch.Tensor, max_length: int | None, batch: int, seq: int) -> Documents:
        cu = cu.to(torch.int32)
        if max_length is None:
            max_length = int((cu[1:] - cu[:-1]).max())  # the one host sync
        return cls(cu, int(max_length), cu.numel() - 1, batch, seq)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, batch: int, seq: int) -> Documents:
        """A document starts at each row start and wherever a position is not its predecessor + 1."""
        device = position_ids.device
        pos = position_ids.detach().expand(batch, seq).to("cpu")  # the one host sync (none on a CPU)
        starts = torch.ones(batch, seq, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        first = torch.nonzero(starts.reshape(-1)).flatten()
        cu = torch.cat([first, torch.tensor([batch * seq])]).to(torch.int32)
        return cls(cu.to(device, non_blocking=True), int((cu[1:] - cu[:-1]).max()), cu.numel() - 1, batch, seq)


# -- the per-forward state ---------------------------------------------------------------------

class ForwardState:
    """One forward's documents and decisions (module docstring)."""

    def __init__(self, features: ModelFeatures, counts: Counter, names: dict[int, str], training: bool,
                 kv_cache: bool, padded: bool, documents: Callable[[], Documents | None]):
        self.features, self.counts, self.names = features, counts, names
        self.training, self.kv_cache, self.padded = training, kv_cache, padded
        self._documents_fn, self._documents = documents, None
        self.calls: Counter = Counter()  # this forward's attention calls, folded into counts at its end
        self.paths: dict[int | None, Path] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    @property
    def documents(self) -> Documents | None:
        if self._documents_fn is not None:
            self._documents, self._documents_fn = self._documents_fn(), None
        return self._documents

    @property
    def packed(self) -> bool:
        docs = self.documents
        return docs is not None and docs.packed

    def path(self, window: int | None, device: torch.device, dtype: torch.dtype) -> Path:
        """The decision for layers with this window, taken by whoever asks first in this forward."""
        window = window or None
        if window not in self.paths:
            f = self.features
            self.paths[window] = decide(device=device, dtype=attention_dtype(device, dtype), head_dim=f.head_dim,
                                        dropout=f.dropout if self.training else 0.0, window=window, softcap=f.softcap,
                                        kv_cache=self.kv_cache, padded=self.padded)
        return self.paths[window]

    def document_mask(self, window: int | None, query: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, T] bool: causal within each document (one per row when the batch is not
        packed) and within the window; built once per forward and window."""
        key = (window, query.device)
        if key not in self._masks:
            docs = self.documents
            ids = docs.ids if docs is not None else torch.zeros(query.shape[0], query.shape[2], dtype=torch.int32)
            self._masks[key] = _document_mask(ids.to(query.device), window)
        return self._masks[key]

    def count(self, module: torch.nn.Module, path: str) -> None:
        """One call of `module` on `path` in this forward. Kept per forward and added to the
        model's counts when the forward ends (`install`'s post-hook): a recomputation in the
        backward (activation checkpointing) comes after that and is not counted, with no question
        to the autograd engine, which a compiled block could not ask (a graph break per call). In
        a compiled block this is a mutation of a Python object that dynamo replays each run."""
        self.calls[(self.names.get(id(module), type(module).__name__), path)] += 1

    def fold(self) -> None:
        self.counts.update(self.calls)
        self.calls.clear()


_LOCAL = threading.local()


def current() -> ForwardState | None:
    return getattr(_LOCAL, "state", None)


@contextlib.contextmanager
def active(state: ForwardState | None):
    previous = current()
    _LOCAL.state = state
    try:
        yield state
    finally:
        _LOCAL.state = previous


def _document_mask(doc: torch.Tensor, window: int | None) -> torch.Tensor:
    seq = doc.shape[1]
    q = torch.arange(seq, device=doc.device)
    allowed = q[None, :] <= q[:, None]
    if window:
        allowed &= q[:, None] - q[None, :] < window
    return (doc[:, None, :, None] == doc[:, None, None, :]) & allowed  # [B, 1, T, T]


# -- the mask function -------------------------------------------------------------------------

def fastft_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None, config=None,
                device="cpu", local_size: int | None = None, **kwargs):
    """AttentionMaskInterface function: None where the forward's decision is varlen (no mask is
    built), else SDPA's boolean or eager's additive mask, with the documents and the window in it."""
    device = torch.device(device)
    dtype = kwargs.get("dtype") or torch.float32
    state = current()
    if mask_function is not None:
        kwargs["mask_function"] = mask_function
    path = None
    if state is not None and state.features is not None:
        path = state.path(local_size, device, dtype)
        if path.kind == "varlen":
            return None
        if state.packed and q_length == kv_length and q_offset == 0:
            doc = state.documents.ids.to(device)
            base = kwargs.get("mask_function")
            same_doc = lambda b, h, q, kv: doc[b, q] == doc[b, kv]  # noqa: E731
            kwargs["mask_function"] = same_doc if base is None else and_masks(base, same_doc)
            kwargs["allow_is_causal_skip"] = False
    kind = path.kind if path is not None else ("eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa")
    if kind == "eager":  # the eager path adds the mask to the scores
        kwargs.pop("allow_is_causal_skip", None)
        return eager_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                          device=device, dtype=dtype, **{k: v for k, v in kwargs.items() if k != "dtype"})
    kwargs.pop("dtype", None)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                     device=device, local_size=local_size, **kwargs)


# -- the attention call ------------------------------------------------------------------------

def fastft_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, **kwargs):
    """AttentionInterface function: returns (output [batch, seq, heads, head_dim], None)."""
    state = current()
    if state is None or state.features is None:  # no forward state: narrow the mask to the kwargs' documents
        return _sdpa_or_eager(module, query, key, value, _with_kwargs_documents(attention_mask, query, kwargs),
                              dropout, scaling, sliding_window, softcap, kwargs)
    path = state.path(sliding_window, query.device, query.dtype)
    if path.kind == "varlen":
        backend = next(b for b in varlen_backends() if b.name == path.backend)
        refusal = _varlen_refusal(backend, module, query, key, dropout, kwargs)
        if not refusal:
            state.count(module, path.label)
            return _varlen(backend, query, key, value, scaling, sliding_window, softcap, dropout,
                           state.documents), None
        # Exact all the same: the documents and the window go into a mask built here.
        attention_mask = state.document_mask(sliding_window, query) if key.shape[2] == query.shape[2] else None
        state.count(module, f"sdpa (varlen refused: {refusal})")
    else:
        if attention_mask is None and key.shape[2] == query.shape[2] and (state.packed or sliding_window):
            attention_mask = state.document_mask(sliding_window, query)  # no mask came through the model
        state.count(module, path.kind)
    return _sdpa_or_eager(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                          kwargs)


def _varlen_refusal(backend: VarlenBackend, module, query, key, dropout, kwargs) -> str:
    """Why this call cannot run the decided varlen path after all ('' when it can): what the
    forward-level decision could not see (a dropout only the module knows, a position bias)."""
    if dropout and not backend.dropout:
        return "attention dropout"
    if query.shape[-1] > backend.max_head_dim:
        return f"head dim {query.shape[-1]}"
    if key.shape[2] != query.shape[2]:
        return "key length != query length"
    if kwargs.get("position_bias") is not None:
        return "position bias"
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        return "not causal"
    return ""


def _varlen(backend: VarlenBackend, query, key, value, scaling, window, softcap, dropout, docs: Documents | None):
    batch, heads, seq, dim = query.shape
    if docs is None:  # one document per row
        docs = Documents(torch.arange(0, (batch + 1) * seq, seq, device=query.device, dtype=torch.int32), seq,
                         batch, batch, seq)
    dtype = attention_dtype(query.device, query.dtype)
    v_dim = value.shape[-1]
    if v_dim < dim:  # MLA's value head is narrower: pad it (as transformers does for flash-attn)
        value = torch.nn.functional.pad(value, (0, dim - v_dim))
    # [B, H, T, D] -> [B*T, H, D]
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim).to(dtype) for t in (query, key, value))
    cu = docs.cu_seqlens.to(query.device)
    out = backend.fn(q, k, v, cu, cu, docs.max_length, docs.max_length, scaling, window or None, softcap or None,
                     dropout)
    out = out.reshape(batch, seq, heads, dim)[..., :v_dim]
    return out if autocast_dtype(query.device.type) is not None else out.to(query.dtype)


def _sdpa_or_eager(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, kwargs):
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


def _with_kwargs_documents(attention_mask, query, kwargs):
    """Without a forward state: the mask narrowed to the documents of the call's own kwargs."""
    batch, _, seq, _ = query.shape
    if kwargs.get("cu_seq_lens_q") is not None:
        docs = Documents.from_cu_seqlens(kwargs["cu_seq_lens_q"], kwargs.get("max_length_q"), batch, seq)
    elif kwargs.get("position_ids") is not None and kwargs["position_ids"].numel() in (seq, batch * seq):
        docs = Documents.from_position_ids(kwargs["position_ids"], batch, seq)
    else:
        return attention_mask
    if not docs.packed:
        return attention_mask
    allowed = _document_mask(docs.ids, None)
    if attention_mask is None:
        return allowed
    if attention_mask.dtype == torch.bool:
        return attention_mask & allowed
    return attention_mask.masked_fill(~allowed, torch.finfo(attention_mask.dtype).min)


def register() -> None:
    AttentionInterface.register(NAME, fastft_attention_forward)
    AttentionMaskInterface.register(NAME, fastft_mask)


# -- per-instance installation -----------------------------------------------------------------

INSTALLED = "_fastft_attention"


@dataclasses.dataclass
class Installed:
    """What `install` added to a model, for `uninstall`; `counts` are the attention calls per
    (layer, path) since install (or the last `reset_counts`)."""
    features: ModelFeatures | None
    counts: Counter
    names: dict[int, str]
    handles: list
    blocks: list
    signature: inspect.Signature | None = None  # of the model's forward
    inners: list = dataclasses.field(default_factory=list)  # per block: what its wrapper calls


def call_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """All arguments of a call by name (a forward's **kwargs flattened in)."""
    arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def _batch_shape(arguments: dict) -> tuple[int, int] | None:
    for name in ("input_ids", "inputs_embeds"):
        t = arguments.get(name)
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return t.shape[0], t.shape[1]
    return None


def _has_past(arguments: dict) -> bool:
    for name in ("cache", "past_key_values", "past_key_value"):
        cache = arguments.get(name)
        if cache is None:
            continue
        length = getattr(cache, "get_seq_length", None)
        if length is None:
            return bool(cache)
        with contextlib.suppress(Exception):
            if length() > 0:
                return True
    return False


def state_for(installed: Installed, module: torch.nn.Module, args: tuple, kwargs: dict) -> ForwardState:
    """The ForwardState of one forward call of the installed model."""
    try:
        arguments = call_arguments(installed.signature, args, kwargs) if installed.signature else dict(kwargs)
    except TypeError:  # a call the signature does not take: its own forward will say so
        arguments = dict(kwargs)
    shape = _batch_shape(arguments)
    mask = arguments.get("attention_mask")
    padded = isinstance(mask, torch.Tensor) and mask.dim() == 2
    kv_cache = _has_past(arguments)

    if not torch.compiler.is_compiling():  # into a compiled block: one graph for any document count
        for name in ("cu_seq_lens_q", "cu_seq_lens_k"):  # (traced, the whole model: dynamo's own choice)
            if isinstance(arguments.get(name), torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(arguments[name], 0)

    def documents() -> Documents | None:
        if shape is None or kv_cache or padded:
            return None
        batch, seq = shape
        if arguments.get("cu_seq_lens_q") is not None:
            return Documents.from_cu_seqlens(arguments["cu_seq_lens_q"], arguments.get("max_length_q"), batch, seq)
        position_ids = arguments.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == seq:
            return Documents.from_position_ids(position_ids, batch, seq)
        return None

    return ForwardState(installed.features, installed.counts, installed.names, module.training, kv_cache, padded,
                        documents)


class _Inner:
    """What fastft's block wrapper calls: the block's own forward, or its compiled form
    (compile_blocks)."""

    def __init__(self, original):
        self.original = self.run = original


def _block_forward(block: torch.nn.Module, inner: _Inner, memory: _BlockMemory):
    """A decoder block's instance forward: make a recomputation of the block in the backward
    (activation checkpointing) run in the state of the forward it recomputes. Two ways in:
    - the checkpoint wraps this forward (fastft.distributed's checkpointing, and transformers
      up to 5.17, which checkpoints the layer's __call__): the recomputation calls it again,
      with the same input (or, reentrant, a detached alias of it): `memory` finds the state;
    - the checkpoint is inside the class's forward (transformers 5.24 wraps it in
      `forward_with_checkpointing`, which calls the layer's own `_gradient_checkpointing_func`):
      for the duration of the call that function is wrapped so that what it recomputes runs in
      this state."""

    def forward(*args, **kwargs):
        x = next((a for a in args if isinstance(a, torch.Tensor)), kwargs.get("hidden_states"))
        state = current()
        if state is None:
            with active(memory.recall(x)):
                return inner.run(*args, **kwargs)
        memory.remember(x, state)
        checkpointing = block.__dict__.get("_gradient_checkpointing_func")
        if checkpointing is None:
            return inner.run(*args, **kwargs)
        block.__dict__["_gradient_checkpointing_func"] = _in_state_checkpointing(checkpointing, state)
        try:
            return inner.run(*args, **kwargs)
        finally:
            block.__dict__["_gradient_checkpointing_func"] = checkpointing

    forward.__wrapped__ = inner.original
    return forward


def _in_state_checkpointing(checkpointing, state: ForwardState):
    def checkpoint(function, *args, **kwargs):
        return checkpointing(_in_state(function, state), *args, **kwargs)

    return checkpoint


def _in_state(function, state: ForwardState | None):
    def run(*args, **kwargs):
        with active(state):
            return function(*args, **kwargs)

    return run


def in_this_forward(function):
    """`function` bound to the running forward's state (none: `function` itself), for a
    checkpoint to recompute in the backward: the recomputation then takes the forward's attention
    decision and documents whatever its inputs are (an offloaded block's input comes back from
    the host as a new tensor, which _BlockMemory cannot recognise)."""
    state = current()
    return function if state is None else _in_state(function, state)


class _BlockMemory:
    """Block input -> the ForwardState it belonged to, for the last CAPACITY forwards. Keyed by
    storage: non-reentrant checkpointing recomputes with the same tensor, reentrant with a
    detached alias of a saved one (whose Python object may be gone: no weak references). A block
    input's storage is remembered anew by every forward that uses it, so a reused address never
    finds an older forward's state."""

    CAPACITY = 64

    def __init__(self):
        self._map: collections.OrderedDict[tuple, ForwardState] = collections.OrderedDict()

    @staticmethod
    def _key(x) -> tuple | None:
        from torch._subclasses.fake_tensor import FakeTensor

        if not isinstance(x, torch.Tensor) or x.device.type == "meta":
            return None
        storage = x.untyped_storage()
        # a fake tensor (the planner's) has no address (data_ptr is deprecated there): its storage
        # object stands for it, alive as long as the storage is
        where = id(storage) if isinstance(x, FakeTensor) else storage.data_ptr()
        return (x.device, where, x.storage_offset(), tuple(x.shape), x.dtype)

    def remember(self, x, state: ForwardState) -> None:
        key = self._key(x)
        if key is None:
            return
        self._map.pop(key, None)
        self._map[key] = state
        while len(self._map) > self.CAPACITY:
            self._map.popitem(last=False)

    def recall(self, x) -> ForwardState | None:
        return self._map.get(self._key(x))


def install(model: torch.nn.Module, blocks: list[torch.nn.Module], config) -> Installed:
    """Give `model` (the causal-LM module) the per-forward state hooks and its decoder `blocks`
    the recompute-safe forward wrapper. Returns what `uninstall` undoes."""
    discover_backends()  # at patch time, never inside a forward
    installed = Installed(ModelFeatures.of(config) if config is not None else None, Counter(),
                          {id(m): n for n, m in model.named_modules()}, [], [], inspect.signature(model.forward))
    stack: list[ForwardState | None] = []

    def pre(module, args, kwargs):
        stack.append(current())
        _LOCAL.state = state_for(installed, module, args, kwargs)

    def post(module, args, kwargs, output=None):
        state = current()
        if state is not None:
            state.fold()
        _LOCAL.state = stack.pop() if stack else None

    installed.handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
    installed.handles.append(model.register_forward_hook(post, with_kwargs=True, always_call=True))
    for block in blocks:
        if "forward" not in block.__dict__:
            inner = _Inner(block.forward)
            block.forward = _block_forward(block, inner, _BlockMemory())
            installed.blocks.append(block)
            installed.inners.append(inner)
    setattr(model, INSTALLED, installed)
    return installed


def uninstall(model: torch.nn.Module) -> None:
    installed = model.__dict__.pop(INSTALLED, None)
    if installed is None:
        return
    for handle in installed.handles:
        handle.remove()
    for block in installed.blocks:
        block.__dict__.pop("forward", None)


def installed(model: torch.nn.Module) -> Installed | None:
    return model.__dict__.get(INSTALLED)


def compile_blocks(model: torch.nn.Module, compile_fn: Callable) -> list[torch.nn.Module]:
    """Compile the own forward of every decoder block that has fastft's wrapper (anywhere in
    `model`), leaving the wrapper eager: its bookkeeping for recomputations keys block inputs by
    their storage address, which dynamo cannot trace (a graph break) and, traced, would guard on
    every step (a recompile). Returns the blocks compiled so."""
    done = []
    for module in model.modules():
        inst = installed(module)
        for block, inner in zip(inst.blocks, inst.inners) if inst is not None else ():
            inner.run = compile_fn(inner.original)
            done.append(block)
    return done


# -- reporting ---------------------------------------------------------------------------------

# The GPU backends as documented (docs/ARCHITECTURES.md), whatever this process has installed.
DOCUMENTED_BACKENDS = (VarlenBackend("flash_attn", _flash_attn, frozenset({"cuda"}), softcap=True, dropout=True),
                       VarlenBackend("torch", _torch_varlen, frozenset({"cuda"})))


def describe(config, device: torch.device, dtype: torch.dtype) -> str:
    """Which path the fastft attention takes in training for this model: on a GPU in bf16 (bf16
    weights, or fp32 masters under bf16 autocast: how models train) and here (its current device
    and dtype), by the same `decide` the forward uses (packed batches, no cache)."""
    features = ModelFeatures.of(config)
    window = getattr(config, "sliding_window", None) or None
    parts = []
    for where, dev, dt in (("CUDA bf16", torch.device("cuda"), torch.bfloat16), ("here", device, dtype)):
        paths = {decide(device=dev, dtype=dt, head_dim=features.head_dim, window=w, softcap=features.softcap,
                        dropout=features.dropout) for w in ({None, window} if window else {None})}
        text = ", ".join(sorted(p.label if p.kind == "varlen" else f"{p.label} ({p.why})" for p in paths))
        if where == "here":
            text = f"{dev.type} {str(dt).removeprefix('torch.')}: {text}"
        parts.append(f"{where}: {text}")
        if where == "CUDA bf16" and device.type == "cuda" and dt == dtype:
            break
    if window:
        parts.append(f"sliding window {window}")
    return "; ".join(parts)
