"""The packed probe: a patch is verified before it is reported, attention and packing included.

One packed row of two short documents (restarting position_ids, as the packed collators give),
run through the model as it will run (eval mode, no cache), answers:
  (a) which layers called fastft's attention function, against the model's attention layers
      (modules named like attention that hold their own projections): a layer that did not
      call it keeps its own attention, and the report says so ("kept <impl>");
  (b) is document 2 independent of document 1? Its logits must equal those of document 2 run
      alone (median relative error per token within PROBE_TOLERANCE of the dtype: a cross-
      document leak changes every token, a rounding flip of a MoE router only one), both when
      the documents come from position_ids and from cu_seq_lens_q/k (the trainer's collator
      gives both), with use_cache=False as the trainer's batches say (a leak only with the
      model's default cache, as transformers' own SDPA masks have, is noted in the verdict);
      and the gradient of document 2's logits with respect to document 1's input
      embeddings must be exactly zero (no path carries anything across; masked scores give
      exact zeros, not small numbers). A model failing (b) is packing-unsafe: the trainer then
      pads (fastft/train.py).
The probe runs under fastft.patching.preserve.preserved (nothing it touches stays changed), in
eval mode, with the global RNG untouched. A model on the meta device (the FSDP2 rank-0 load) is
probed as a CPU build of its config with random weights, its attention and recurrent mixers
patched the same way (norms, loss and LoRA are per token and need no probe here), when it has
at most BUILD_LIMIT parameters; a bigger one stays unverified, and so is not packed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections import Counter

import torch
from torch import nn

from fastft import attention
from fastft.patching import recurrent
from fastft.patching.preserve import preserved

LENGTHS = (5, 6)
BUILD_LIMIT = 200_000_000
# Median relative error per token of document 2, packed vs alone. Loose on purpose: a leak or a
# position that does not restart moves every token by tens of percent, while the same document in
# a longer row may legitimately round differently (bitsandbytes' 4-bit matmul takes another kernel
# for one row than for many: 4e-3 in fp32). The exact test is the gradient's.
PROBE_TOLERANCE = {torch.float32: 1e-2, torch.float64: 1e-6}  # 16-bit dtypes: 5e-2
_ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)


@dataclasses.dataclass
class ProbeResult:
    verdict: str                 # "safe", "unsafe" or "unverified"
    why: str
    calls: Counter = dataclasses.field(default_factory=Counter)  # (layer, path) -> calls in the packed forward
    attention_layers: list[str] = dataclasses.field(default_factory=list)
    where: str = ""              # "" (the model itself) or how it was probed instead

    @property
    def fastft_layers(self) -> set[str]:
        return {layer for layer, path in self.calls if not path.startswith("recurrent")}

    @property
    def missing(self) -> list[str]:
        called = self.fastft_layers
        return [name for name in self.attention_layers if name not in called]


def attention_layers(model: nn.Module) -> list[str]:
    """Modules that look like attention layers: an attention-like class name and a projection of
    their own (nn.Linear, or GPT-2's Conv1D); the outermost of nested ones."""
    found = []
    for name, module in model.named_modules():
        if not _ATTENTION_NAME.search(type(module).__name__) or any(name.startswith(f + ".") for f in found):
            continue
        if any(isinstance(c, nn.Linear) or type(c).__name__ == "Conv1D" for c in module.children()):
            found.append(name)
    return found


def run(model: nn.Module, hf: nn.Module) -> ProbeResult:
    """The packed probe of `model` (a PEFT wrapper or the transformers model `hf` itself)."""
    params = list(hf.parameters())
    if not params:
        return ProbeResult("unverified", "the model has no parameters")
    if any(p.is_meta for p in params):
        n = sum(p.numel() for p in params)
        if n > BUILD_LIMIT:
            return ProbeResult("unverified", f"on the meta device with {n:,} parameters (more than {BUILD_LIMIT:,} "
                               "for a CPU probe build); load the weights on every rank to probe it")
        try:
            proxy = _cpu_build(hf)
        except Exception as exc:  # a class that cannot be built from its config alone
            return ProbeResult("unverified", f"on the meta device, and a CPU build of its config failed "
                               f"({type(exc).__name__}: {str(exc)[:120]})")
        result = _probe(proxy, proxy)
        result.where = "a CPU build of its config: the model is on the meta device"
        return result
    return _probe(model, hf)


def _cpu_build(hf: nn.Module) -> nn.Module:
    import copy

    config = copy.deepcopy(hf.config)
    generator_state = torch.random.get_rng_state()
    try:
        with torch.device("cpu"):
            proxy = type(hf)(config)
    finally:
        torch.random.set_rng_state(generator_state)
    if attention.installed(hf) is not None and hasattr(proxy, "set_attn_implementation"):
        from fastft import distributed

        proxy.set_attn_implementation(attention.NAME)
        attention.install(proxy, _blocks(distributed, proxy), config)
    if any(recurrent.FORWARD_ATTR in m.__dict__ for m in hf.modules()):
        recurrent.install(proxy, _NullReport())
    return proxy.eval()


def _blocks(distributed, model):
    try:
        return list(distributed.decoder_blocks(model)[1])
    except ValueError:
        return []


class _NullReport:
    def add(self, *args, **kwargs):
        pass


@contextlib.contextmanager
def _eval_without_rng(model: nn.Module, device: torch.device):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def _logits(out) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def _median_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).median().item()


def _probe(model: nn.Module, hf: nn.Module) -> ProbeResult:
    embeddings = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor):
        weight = next(hf.parameters())
    device, dtype = weight.device, weight.dtype
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(getattr(hf, "config", None), "vocab_size", 64)
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, max(4, min(int(vocab), 200)), (n,), generator=generator) for n in LENGTHS]
    first, total = LENGTHS[0], sum(LENGTHS)
    ids = torch.cat(docs).unsqueeze(0).to(device)
    positions = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0).to(device)
    cu = torch.tensor([0, first, total], dtype=torch.int32, device=device)
    packed_keys = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    installed = attention.installed(hf)
    counts = Counter()
    saved_counts = installed.counts if installed is not None else None
    tol = PROBE_TOLERANCE.get(dtype, 5e-2)
    leaf = {}

    def capture(module, inputs, output):  # document 1's input embeddings as a leaf of the graph
        leaf["x"] = output.detach().requires_grad_(True)
        return leaf["x"]

    with preserved(model), _eval_without_rng(model, device):
        if installed is not None:
            installed.counts = counts
        handle = embeddings.register_forward_hook(capture) if embeddings is not None else None
        try:
            try:
                with torch.enable_grad():
                    packed = _logits(model(input_ids=ids, position_ids=positions, use_cache=False))
            finally:
                if handle is not None:
                    handle.remove()
            calls = Counter(counts)
            with torch.no_grad():
                alone = _logits(model(input_ids=docs[1].unsqueeze(0).to(device), use_cache=False))[0]
                try:
                    with_cu = _logits(model(input_ids=ids, position_ids=positions, use_cache=False, **packed_keys))
                except TypeError as exc:
                    return ProbeResult("unsafe", f"its forward does not take the packed collator's cu_seq_lens_q/k "
                                       f"({str(exc)[:100]})", calls, attention_layers(hf))
                with_cache = _logits(model(input_ids=ids, position_ids=positions))  # the model's default use_cache
            if "x" in leaf and packed.requires_grad:
                weights = torch.randn(packed[0, first:].shape, generator=generator).to(packed.device)
                grad, = torch.autograd.grad((packed[0, first:] * weights).sum(), leaf["x"], allow_unused=True)
                crossed = 0.0 if grad is None else grad[0, :first].abs().max().item()
            else:
                crossed = None
        except Exception as exc:  # a forward that wants more than input_ids and position_ids
            return ProbeResult("unverified", f"the packed probe forward failed ({type(exc).__name__}: "
                               f"{str(exc)[:120]})", counts, attention_layers(hf))
        finally:
            if installed is not None:
                installed.counts = saved_counts
    errors = {"position_ids": _median_rel(packed[0, first:], alone), "cu_seq_lens": _median_rel(with_cu[0, first:], alone)}
    layers = attention_layers(hf)
    leaks = [f"document 2's logits with packed {k} differ from it alone by {e:.1e} (median per token, tolerance "
             f"{tol:g})" for k, e in errors.items() if not e <= tol]
    if crossed:
        leaks.append(f"the gradient of document 2 reaches document 1's embeddings (max {crossed:.1e})")
    if leaks:
        return ProbeResult("unsafe", "; ".join(leaks), calls, layers)
    how = "outputs and gradients" if crossed is not None else "outputs (no input embeddings to take gradients at)"
    why = f"document 2 of a packed row is independent of document 1 ({how})"
    if not _median_rel(with_cache[0, first:], alone) <= tol:  # transformers' own masks ignore packing with a cache
        why += ("; only with use_cache=False (as fastft's trainer passes): with the model's default cache its own "
                "attention lets packed documents see each other")
    return ProbeResult("safe", why, calls, layers)
