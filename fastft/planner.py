"""Memory you can predict before you rent a GPU: `fastft.plan(config)` and `fastft plan RECIPE`.

A plan is one optimizer step of the recipe run on fake tensors, on a CPU, in a few seconds to a
minute, measured by torch's own memory tracker:

  1. the model is built as the trainer builds it (fastft.train.build_model) on the meta device,
     without weights: LoRA applied, fastft.patch'ed, MLPs tiled. A hub name whose config.json
     is neither a local folder nor in the hub cache is built from PUBLISHED (the shape fields of
     the published config.json of the models fastft's recipes name);
  2. wrapped as the trainer wraps it: activation checkpointing (offload included), then FSDP2
     over a fake process group of W ranks (torch's "fake" backend: collectives do nothing);
  3. materialised as fake tensors (FakeTensorMode: shapes, dtypes, storage sizes, no data) and
     run for one step on a micro-batch shaped like the collator's (every row one document of
     data.max_seq_len tokens, the longest the recipe allows): forward, backward, gradient
     clipping, the fused AdamW step with its states, zero_grad, as the trainer's loop does. The
     optimizer states exist before the step (the steady state from step 2 on; the first step's
     peak, without them during its backward, is derived and reported too); with gradient
     accumulation the gradients exist too (FSDP2: the unsharded accumulation of an earlier
     micro-batch, which is run first);
  4. tracked by torch.distributed._tools.mem_tracker.MemTracker (FSDPMemTracker under FSDP2):
     every storage is attributed to parameters, buffers, gradients, activations (made in the
     forward or a recomputation), temporaries (made in the backward) or optimizer states, per
     module, forward and backward. Two things are added to torch's trackers here (_Located): the
     place of the peak (the innermost module running, and the phase), and per-module peak updates
     in O(depth) instead of O(modules) per op, which makes an 8B model plannable in a minute.

What is planned is the GPU's run: bf16 (train.precision auto on CUDA), the fastft attention's
varlen path (through torch's varlen op, whose fake implementation exists), the fused kernels'
custom ops (their fake implementations allocate what the kernels allocate). The fake tensors live
on the CPU device (FakeTensorMode on a CPU-only build cannot run a CUDA backward), so autocast is
the CPU's bf16 autocast: its op lists are not CUDA's, but the models' memory-relevant casts (norms,
softmax, the loss's upcast) are explicit in their code, and linear layers run in bf16 under both.

Not seen by the tracker (so not in the plan): memory inside an op that is not one of its outputs
(cuBLAS and FlashAttention workspaces: a few MiB), the CUDA context (outside
torch.cuda.max_memory_allocated, but on the device: RESERVE below keeps room for it) and the
caching allocator's fragmentation (reserved minus allocated). gpu.sh records planned against
torch.cuda.max_memory_allocated for every end-to-end row when a GPU is lent.

The trainer uses it (`preflight`, `report_measured`): on CUDA, before loading the weights, it
prints the planned peak, and stops when the plan does not fit, listing what would fit with the
planned peak of each; after step 1 it prints measured against planned.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from copy import deepcopy
from unittest import mock

import torch

from fastft.config import ConfigError, FinetuneConfig, load_config, validate

PLAN_VERSION = 1  # bump when what a plan counts changes; recorded with every table

GiB = 2**30
# Device memory (bytes torch.cuda reports as total_memory) of the GPUs the goals name, and what a
# plan leaves free of it: the CUDA context and cuBLAS workspace (about 0.5 GiB) and the caching
# allocator's fragmentation, which the tracker cannot see.
GPU_MEMORY = {"H100": 85_029_158_912, "H200": 150_754_820_096, "B200": 191_476_334_592}
RESERVE = 2 * GiB

# Shape fields of published config.json files (what sets the memory: widths, depths, heads,
# vocabularies, tying), for building the recipes' models where the hub cannot be reached.
_LLAMA3 = dict(model_type="llama", vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
               rms_norm_eps=1e-5, num_key_value_heads=8)
PUBLISHED = {
    "meta-llama/Llama-3.2-1B": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, head_dim=64, tie_word_embeddings=True),
    "meta-llama/Llama-3.1-8B": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, head_dim=128, tie_word_embeddings=False),
    "Qwen/Qwen3-0.6B": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                            num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                            tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=40960),
    "Qwen/Qwen3-8B": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                          num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=40960),
    "mistralai/Mistral-7B-v0.3": dict(model_type="mistral", vocab_size=32768, hidden_size=4096,
                                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=8, head_dim=128, sliding_window=None,
                                      max_position_embeddings=32768, rope_theta=1000000.0),
    "google/gemma-3-1b-pt": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152,
                                 intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                                 num_key_value_heads=1, head_dim=256, sliding_window=512,
                                 query_pre_attn_scalar=256, max_position_embeddings=32768,
                                 tie_word_embeddings=True),
}


class PlanError(ValueError):
    """A recipe that cannot be planned: the message says why and what to do."""


class PlanDoesNotFit(ConfigError):
    """The plan's peak exceeds the device's memory; the message lists what would fit."""


# -- torch's trackers, with the peak located ----------------------------------------------------

def _trackers():
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    KwargsModTracker = _kwargs_mod_tracker()

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

        def mark(self, name: str) -> None:
            """Keep the current snapshot under `name` (the step's milestones)."""
            self.marks[name] = self.get_tracker_snapshot("current")

        def _phase(self) -> str:
            return "optimizer" if self._in_opt else "backward" if self._mod_tracker.is_bw else "forward"

        def _update_peak_stats(self, peak_state) -> None:
            if len(self.memory_tracking) != self._indexed:  # a module ran for the first time
                self._by_fqn = {s.mod_fqn: s for s in self.memory_tracking.values()}
                self._indexed = len(self.memory_tracking)
            parents = self._mod_tracker.parents
            for dev, snap in self._curr_mem_snap.items():
                total = snap[_TOTAL_KEY]
                for fqn in parents:
                    stats = self._by_fqn.get(fqn)
                    if stats is not None and peak_state in stats.snapshots and stats.local_peak.get(dev, 0) < total:
                        stats.local_peak[dev] = total
                        stats.snapshots[peak_state][-1][dev] = deepcopy(snap)
                on_device = total - sum(v for k, v in snap.items() if k in self.host)
                phase = self._phase()
                self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), on_device)
                if on_device > self.device_peak:
                    self.device_peak = on_device
                    self._peak_mem[dev] = total
                    self._peak_mem_snap[dev] = deepcopy(snap)
                    self.where = (_module_name(max(parents - {"Global"}, key=len, default="")), phase)

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


def _kwargs_mod_tracker():
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
    "OptState": "optimizer states", "Other": "inputs", "Inputs": "inputs",
}


def _categories(snapshot: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for device_snap in snapshot.values():
        for key, value in device_snap.items():
            name = _CATEGORY.get(getattr(key, "value", key))
            if name is not None and value:
                out[name] = out.get(name, 0) + value
    return out


# -- the model's configuration, without the hub ---------------------------------------------------

def resolve_model(config: FinetuneConfig) -> tuple[dict, str]:
    """(the transformers config as a dict with model_type, where it came from) for the recipe's
    model: model.config, a local folder, the hub cache, PUBLISHED, or the hub, in that order."""
    m = config.model
    if m.name is None:
        return dict(m.config), "model.config"
    from transformers import AutoConfig

    local = os.path.isdir(os.path.expanduser(m.name))
    attempts = [("local files", dict(local_files_only=True))]
    if local or m.name not in PUBLISHED:
        attempts.append(("the hub", {}))
    errors = []
    for source, kwargs in attempts:
        if source == "the hub" and m.name in PUBLISHED:
            break
        try:
            hf = AutoConfig.from_pretrained(os.path.expanduser(m.name), trust_remote_code=m.trust_remote_code, **kwargs)
        except (OSError, ValueError) as exc:
            errors.append(f"{source}: {str(exc).splitlines()[0][:120]}")
            continue
        fields = hf.to_dict()
        for key in ("architectures", "transformers_version", "_name_or_path", "auto_map", "dtype", "torch_dtype"):
            fields.pop(key, None)
        return fields, f"{m.name} ({source})"
    if m.name in PUBLISHED:
        return dict(PUBLISHED[m.name]), f"{m.name} (fastft.planner.PUBLISHED: the published config's shape fields)"
    raise PlanError(f"model.name={m.name!r}: no config.json found ({'; '.join(errors)}). Give a local folder, "
                    "fill the hub cache (HF_HUB_OFFLINE=1 then uses it), give the shape as model.config, or use "
                    f"one of {sorted(PUBLISHED)}")


class _VocabOnly:
    """What build_model reads from a tokenizer when the model's config names its vocabulary."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


# -- one plan ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """What one optimizer step needs on each GPU (bytes)."""

    model: str
    provider: str  # "fastft" or "hf"
    world_size: int
    rows: int  # micro-batch rows
    tokens: int  # tokens per row
    peak: int  # the step's peak, per GPU (steady state: optimizer states exist)
    where: str  # the innermost module running at the peak
    phase: str  # "forward", "backward" or "optimizer"
    at_peak: dict[str, int]  # by category at the peak
    phase_peaks: dict[str, int]
    first_step_peak: int  # step 1: its forward and backward run before the optimizer states exist
    state: dict[str, int]  # by category after the optimizer step, before zero_grad (parameters, gradients, states)
    activations: int  # activation bytes the forward leaves for the backward (after autocast's cache is freed)
    module_activations: dict[str, int]  # per module: activation bytes its forward leaves behind
    setup: dict  # what was planned: precision, checkpointing, FSDP, patching
    seconds: float = 0.0  # how long planning took
    roofline: dict | None = None  # fastft.planner.estimate_time's figures (a model: see there)

    def fits(self, capacity: int, reserve: int = RESERVE) -> bool:
        return self.peak + reserve <= capacity

    def record(self) -> dict:
        """The JSON line."""
        out = {"plan_version": PLAN_VERSION, **dataclasses.asdict(self)}
        out.pop("module_activations")
        out["peak_gib"] = round(self.peak / GiB, 3)
        return out

    def lines(self) -> list[str]:
        setup = self.setup
        head = (f"fastft plan: {self.model}, provider {self.provider}, {self.world_size} GPU(s), micro-batch "
                f"{self.rows} x {self.tokens} tokens, {setup['training']}, {setup['precision']}, activation "
                f"checkpointing {setup['activation_checkpointing']}" + (", FSDP2" if setup["fsdp"] else "")
                + (f", tiled MLP {setup['tiled_mlp']}" if setup.get("tiled_mlp", "off") != "off" else ""))
        out = [head, f"  peak per GPU: {size(self.peak)} in the {self.phase} of {self.where} "
                     f"(first step: {size(self.first_step_peak)})"]
        out.append("  at the peak: " + ", ".join(f"{k} {size(v)}" for k, v in
                                                 sorted(self.at_peak.items(), key=lambda kv: -kv[1]) if v))
        out.append(f"  kept for the backward: {size(self.activations)}; phase peaks: "
                   + ", ".join(f"{k} {size(v)}" for k, v in self.phase_peaks.items()))
        if self.roofline:
            r = self.roofline
            out.append(f"  roofline model on {r['gpu']} (a model, not a measurement): step {r['step_ms']:.1f} ms, "
                       f"{r['tokens_per_s']:,.0f} tokens/s per GPU, MFU {100 * r['mfu']:.1f}%")
        out.append(f"  planned in {self.seconds:.1f} s on this CPU ({setup['source']})")
        return out


def size(nbytes: float) -> str:
    """Bytes as GiB (or MiB below one GiB) for the printed plans."""
    return f"{nbytes / GiB:.2f} GiB" if abs(nbytes) >= GiB else f"{nbytes / 2**20:.1f} MiB"


def _as_config(config) -> FinetuneConfig:
    if isinstance(config, FinetuneConfig):
        return validate(copy.deepcopy(config))
    return load_config(config)


def _setup(config: FinetuneConfig, world_size: int) -> dict:
    """The trainer's precision and parallelism decisions (fastft/train.py) as they fall on CUDA."""
    d, t, m = config.distributed, config.train, config.model
    fsdp = bool(d.fsdp) or (d.fsdp is None and world_size > 1)
    bf16 = t.precision in ("bf16", "auto")  # auto is bf16 on CUDA
    param_dtype = d.param_dtype if d.param_dtype != "auto" else ("bfloat16" if bf16 else "float32")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
    if m.dtype != "auto":
        weights = dtypes[m.dtype]
    else:
        weights = torch.bfloat16 if (config.lora.enabled and bf16 and not fsdp) else torch.float32
    return {"fsdp": fsdp, "weights": weights, "param_dtype": param_dtype, "autocast": bf16 and not fsdp,
            "fused": config.optim.fused if config.optim.fused is not None else True,
            "precision": (f"weights {str(weights).removeprefix('torch.')}"
                          + (f", FSDP2 params {param_dtype}" if fsdp else ", bf16 autocast" if bf16 and not fsdp else "")),
            "training": f"LoRA r={config.lora.r}" if config.lora.enabled else "full fine-tuning",
            "activation_checkpointing": d.activation_checkpointing, "tiled_mlp": m.tiled_mlp}


def _planned_config(config: FinetuneConfig, provider: str, rows: int | None, tokens: int | None):
    """The recipe as planned: its model's config resolved, the provider's patching, the rows."""
    if provider not in ("fastft", "hf"):
        raise PlanError(f"provider={provider!r}: use 'fastft' (the recipe as fastft trains it) or 'hf' (the same "
                        "recipe unpatched: Hugging Face eager with SDPA, materialised logits)")
    config = copy.deepcopy(config)
    fields, source = resolve_model(config)
    config.model.name, config.model.config = None, fields
    if provider == "hf":
        config.model.patch, config.model.tiled_mlp, config.model.attn_implementation = False, "off", "sdpa"
    data = config.data
    if tokens is not None:
        if data.batching == "flat":
            data.token_budget = tokens
        else:
            data.max_seq_len = tokens
    if rows is not None:
        data.batch_size = rows
    return config, source


def _tokenizer(config: FinetuneConfig):
    vocab = config.model.config.get("vocab_size")
    if vocab is not None:
        return _VocabOnly(vocab)
    from fastft.train import load_tokenizer

    return load_tokenizer(config)  # the built-in tokenizers need no download


def _micro_batch(config: FinetuneConfig, provider: str, vocab: int) -> tuple[dict, int]:
    """(the collator's micro-batch, one document per row, as real CPU tensors; tokens per row)."""
    from fastft.data import collate_packed

    data = config.data
    rows, width = (1, data.token_budget) if data.batching == "flat" else (data.batch_size, data.max_seq_len)
    doc = {"input_ids": [3 % vocab] * width, "labels": [3 % vocab] * width}
    batch = collate_packed([[doc]] * rows, pad_id=0, row_len=width)
    if provider == "hf" or data.batching == "padded":
        # Full rows of one document: no padding, so no attention mask (transformers skips an
        # all-ones mask too) and no varlen keys (the unpatched model runs SDPA).
        for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            batch.pop(key)
    return batch, width


@contextlib.contextmanager
def _planning(world_size: int, fsdp: bool):
    """Process-wide state a plan needs, undone after: a fake process group of W ranks (FSDP2),
    the fastft attention dispatched as on CUDA, and two places where fake tensors would change
    what is computed:
    - DTensor's sharding propagation reuses the active fake mode, so the global-shape tensors it
      makes to find output shapes would count as this rank's memory; given a fresh mode, the
      tracker skips them, as torch intends;
    - transformers reads position_ids to detect packed rows (masking_utils.
      find_packed_sequence_indices) and, unable to read fake ones, assumes packing and builds a
      [B, 1, T, T] mask; the planned rows hold one document each, for which the real call finds
      none."""
    import torch.distributed as dist
    from torch.distributed.tensor import _sharding_prop
    from transformers import masking_utils

    from fastft import attention

    started = False
    if fsdp:
        if not dist.is_initialized():
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
            started = True
        elif dist.get_backend() != "fake" or dist.get_world_size() != world_size:
            raise PlanError("fastft.plan with FSDP2 needs its own (fake) process group: run it in a process without "
                            "one (fastft.planner.plan_in_subprocess does)")
    try:
        with attention.as_on_gpu(), _kernels_as_on_gpu(), \
                mock.patch.object(_sharding_prop, "detect_fake_mode", lambda *a, **k: None), \
                mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None):
            yield
    finally:
        if started:
            dist.destroy_process_group()


@contextlib.contextmanager
def _kernels_as_on_gpu():
    """The fused kernels' custom ops (their fake implementations) rather than the torch references a
    CPU would run, where fastft.kernels offers the switch (issue 13's custom ops)."""
    from fastft.kernels import _common

    switch = getattr(_common, "as_on_gpu", None)
    with switch() if switch is not None else contextlib.nullcontext():
        yield


def kernels_plannable() -> bool:
    """Whether fastft.kernels' ops have fake implementations the planner can run."""
    from fastft.kernels import _common

    return hasattr(_common, "as_on_gpu")


def plan(config, *, world_size: int = 1, provider: str = "fastft", rows: int | None = None,
         tokens: int | None = None, gpu: str | None = None) -> Plan:
    """Plan one optimizer step of `config` (a FinetuneConfig, dict or YAML path) per GPU.

    world_size: GPUs (FSDP2 over a fake process group when > 1 or distributed.fsdp is set);
    provider "hf": the same recipe unpatched (HF eager: SDPA, materialised logits); rows, tokens:
    override data.batch_size and data.max_seq_len; gpu ("H100", "H200", "B200"): add a roofline
    estimate of the step's time (estimate_time).
    """
    start = time.perf_counter()
    config, source = _planned_config(_as_config(config), provider, rows, tokens)
    if provider == "fastft" and config.model.patch and not kernels_plannable():
        raise PlanError("the fastft provider plans the fused kernels through their custom ops' fake "
                        "implementations, which this fastft.kernels does not have yet (issue 13); plan "
                        "--provider hf, or the recipe with --model.patch=false")
    from fastft.train import batch_plan

    sizes = batch_plan(config, world_size)
    setup = _setup(config, world_size)
    setup["source"] = source
    with _planning(world_size, setup["fsdp"]):
        result = _run(config, provider, world_size, sizes, setup, gpu)
    result.seconds = time.perf_counter() - start
    return result


def _build(config: FinetuneConfig, provider: str, setup: dict):
    """The model on the meta device, wrapped as the trainer wraps it (section 4 of train.py)."""
    from fastft import distributed
    from fastft.train import build_model

    model, report = build_model(config, _tokenizer(config), setup["weights"], meta=True,
                                patch=provider == "fastft")
    d = config.distributed
    distributed.apply_activation_checkpointing(model, d.activation_checkpointing, d.checkpoint_every)
    if setup["fsdp"]:
        distributed.apply_fsdp(model, param_dtype=setup["param_dtype"], reduce_dtype=d.reduce_dtype,
                               reshard_after_forward=d.reshard_after_forward)
    if report is not None:
        setup["patched"] = sorted({e.kind for e in report.patched()})
    setup["blocks"] = _blocks_name(model)
    return model


def _one_step(config, provider, world_size, sizes, setup, observe: Callable):
    """Build, materialise as fake tensors and run one optimizer step of the trainer's loop under
    the context `observe(model, optimizer, batch)` returns; returns (that context, the exact
    parameter / gradient / optimizer-state bytes before zero_grad, the model)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastft import distributed
    from fastft.data import model_inputs

    model = _build(config, provider, setup)
    vocab = config.model.config.get("vocab_size") or len(_tokenizer(config))
    real_batch, _ = _micro_batch(config, provider, vocab)
    o = config.optim
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        model.to_empty(device="cpu")
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not setup["fsdp"] and hasattr(hf, "tie_weights"):
            hf.tie_weights()  # to_empty makes new tensors per module: tied embeddings would come apart
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=setup["fused"])
        batch = {k: fake.from_tensor(v) if torch.is_tensor(v) else v for k, v in real_batch.items()}
        targets = batch["num_target_tokens"] * sizes["accumulation"] * world_size
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if setup["autocast"] else contextlib.nullcontext
        loss_scale = float(world_size) if setup["fsdp"] else 1.0

        def micro_step(last: bool, mark=lambda name: None):
            if setup["fsdp"]:
                model.set_requires_gradient_sync(last)
            mark("start")
            with autocast():
                out = model(**model_inputs(batch), num_items_in_batch=targets)
            mark("forward")  # autocast's cache of cast weights is gone; what is left waits for backward
            (out.loss * loss_scale).backward()
            return out  # the loop keeps it (and, unpatched, its logits) until the next micro-batch

        # The optimizer states, as after step 1; the gradients of earlier micro-batches.
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=sizes["accumulation"] == 1 or setup["fsdp"])
        if sizes["accumulation"] > 1 and setup["fsdp"]:
            micro_step(last=False)
        observer = observe(model, optimizer, batch)
        mark = getattr(observer, "mark", lambda name: None)
        with observer:
            out = micro_step(last=True, mark=mark)
            mark("micro-batch")
            distributed.clip_grad_norm_(params, o.grad_clip)
            optimizer.step()
            mark("optimizer")
            # What the tracker holds after the step, before zero_grad: the exact state totals.
            state = _categories(observer.get_tracker_snapshot()) if hasattr(observer, "get_tracker_snapshot") else {}
            optimizer.zero_grad(set_to_none=True)
            del out
    return observer, state, model


def _run(config, provider, world_size, sizes, setup, gpu) -> Plan:
    Tracker, FSDPTracker = _trackers()
    d = config.distributed

    def observe(model, optimizer, batch):
        inputs = [v for v in batch.values() if torch.is_tensor(v)]
        if setup["fsdp"]:
            host = ("Sharded Param", "Sharded Grad", "OptState") if d.cpu_offload else ()
            tracker = FSDPTracker(model, optimizer, host=[_ref(h) for h in host])
            tracker.track_inputs(tuple(inputs))
        else:
            tracker = Tracker(model)
            tracker.track_external(model, optimizer, *inputs)
        return tracker

    tracker, state, _ = _one_step(config, provider, world_size, sizes, setup, observe)
    at_peak = _categories(tracker.get_tracker_snapshot("peak"))
    states = state.get("optimizer states", 0) if not d.cpu_offload else 0
    fwd_bwd = max(tracker.phase_peaks.get("forward", 0), tracker.phase_peaks.get("backward", 0))
    result = Plan(
        model=_model_name(config, setup), provider=provider, world_size=world_size, rows=sizes["micro_batch_rows"],
        tokens=_row_tokens(config), peak=tracker.device_peak, where=tracker.where[0], phase=tracker.where[1],
        at_peak=at_peak, phase_peaks=dict(tracker.phase_peaks),
        first_step_peak=max(fwd_bwd - states, tracker.phase_peaks.get("optimizer", 0)),
        state=state, module_activations=_module_activations(tracker),
        activations=(_categories(tracker.marks["forward"]).get("activations", 0)
                     - _categories(tracker.marks["start"]).get("activations", 0)),
        setup={k: v for k, v in setup.items() if k != "weights"} | {"weights": str(setup["weights"])})
    if gpu is not None:
        result.roofline = estimate_time(config, provider, world_size, gpu, sizes=sizes, setup=setup)
    return result


def _row_tokens(config: FinetuneConfig) -> int:
    return config.data.token_budget if config.data.batching == "flat" else config.data.max_seq_len


def _ref(value: str):
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType

    return next(r for r in _FSDPRefType if r.value == value)


def _model_name(config: FinetuneConfig, setup: dict) -> str:
    source = setup["source"]
    return source.split(" (")[0] if source != "model.config" else f"{config.model.config.get('model_type')} (model.config)"


def _module_activations(tracker) -> dict[str, int]:
    """Per module: activation bytes alive after its forward minus before (what it leaves behind,
    its output included), from MemTracker's per-module snapshots (first call of each module)."""
    from torch.distributed._tools.mem_tracker import _ModState, _MemRefType

    out = {}
    for stats in tracker.memory_tracking.values():
        pre, post = stats.snapshots.get(_ModState.PRE_FW), stats.snapshots.get(_ModState.POST_FW)
        if not pre or not post:
            continue
        act = lambda snap: sum(s.get(_MemRefType.ACT, 0) for s in snap.values())  # noqa: E731
        out[_module_name(stats.mod_fqn)] = act(post[0]) - act(pre[0])
    return out


def _module_name(fqn: str) -> str:
    """ModTracker names modules from the root's class ("LlamaForCausalLM.model.layers.0"); the
    plan uses the model's own names ("model.layers.0"), "(model)" for the root."""
    return fqn.partition(".")[2] or "(model)"


# -- a roofline model of the step's time ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GPUSpec:
    """Datasheet figures: dense bf16 tensor-core FLOP/s (fastft.flops.PEAK_BF16_FLOPS), fp32 (no
    tensor cores) FLOP/s, HBM bytes/s. NVIDIA's H100 SXM, H200 SXM and B200 datasheets."""

    bf16: float
    fp32: float
    bandwidth: float


GPUS = {"H100": GPUSpec(989e12, 67e12, 3.35e12), "H200": GPUSpec(989e12, 67e12, 4.8e12),
        "B200": GPUSpec(2250e12, 80e12, 8.0e12)}
# torch's roofline assumes 75% of the peak FLOP/s is reachable (torch.utils._runtime_estimation);
# kept. (torch's own flops_to_ns also halves the FLOPs into multiply-adds before dividing by a
# FLOP/s peak, which makes every matmul twice as fast as the datasheet allows; not kept.)
COMPUTE_EFFICIENCY = 0.75


def _roofline_estimator(spec: GPUSpec):
    """torch's RuntimeEstimator (module attribution, forward/backward split) with its roofline
    cost per op, max(FLOPs / (0.75 x peak), bytes read and written / bandwidth), pinned to `spec`
    (torch's version asks a CUDA device for its figures, and there is none on a planning CPU)."""
    import io

    import torch.utils._pytree as pytree
    from torch.distributed._tools.runtime_estimator import RuntimeEstimator
    from torch.utils._runtime_estimation import _IGNORE_OPS, get_num_bytes
    from torch.utils.flop_counter import flop_registry

    _register_flop_formulas()
    aten = torch.ops.aten
    _NO_TRAFFIC = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
                   aten.alias}

    class Roofline(RuntimeEstimator):
        @classmethod
        def _roofline(cls, func, args, kwargs):
            out = func(*args, **(kwargs or {}))
            packet = func._overloadpacket
            outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            # Views and factories move no data; nor do metadata queries (prim.device, sym sizes),
            # nor an allocation (empty*): torch's list, and ops that return no tensor.
            if packet in _IGNORE_OPS or packet in _NO_TRAFFIC or not outputs:
                return out, 0.0
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)] + outputs
            transfer = sum(get_num_bytes(t) for t in tensors) / spec.bandwidth
            compute = 0.0
            if packet in flop_registry:
                dtypes = {t.dtype for t in outputs if t.is_floating_point()}
                peak = spec.fp32 if dtypes == {torch.float32} else spec.bf16
                flops = flop_registry[packet](*args, **(kwargs or {}), out_val=out)
                compute = flops / (COMPUTE_EFFICIENCY * peak)
            return out, max(transfer, compute) * 1e3  # ms

        def __call__(self, estimate_mode_type: str):
            super().__call__(estimate_mode_type)
            self._estimate = type(self)._roofline
            return self

        def __exit__(self, *args):
            with contextlib.redirect_stdout(io.StringIO()):  # torch prints its total
                super().__exit__(*args)

    return Roofline()


_FLOPS_REGISTERED = False


def _register_flop_formulas() -> None:
    """FLOP formulas the roofline needs beyond torch's: the CPU's flash SDPA (what the unpatched
    model runs on fake CPU tensors, standing for the GPU's flash SDPA: torch's formula for that)
    and fastft's custom ops (kernel_flops in fastft.kernels, where the kernels declare them)."""
    global _FLOPS_REGISTERED
    if _FLOPS_REGISTERED:
        return
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    aten = torch.ops.aten  # the same leading arguments (grad_out,) query, key, value as the CUDA ops'
    flop_registry[aten._scaled_dot_product_flash_attention_for_cpu] = flop_registry[
        aten._scaled_dot_product_flash_attention]
    flop_registry[aten._scaled_dot_product_flash_attention_for_cpu_backward] = flop_registry[
        aten._scaled_dot_product_flash_attention_backward]
    import fastft.kernels

    for op, formula in getattr(fastft.kernels, "FLOP_FORMULAS", {}).items():
        register_flop_formula(op)(formula)
    _FLOPS_REGISTERED = True


def estimate_time(config, provider: str = "fastft", world_size: int = 1, gpu: str = "H100", *,
                  sizes: dict | None = None, setup: dict | None = None) -> dict:
    """A roofline model of one optimizer step on `gpu` from a fake run of the same step: predicted
    step time, tokens/s per GPU and MFU (fastft.flops' convention), and the time per module.

    It is a model: each op costs max(FLOPs / (0.75 x datasheet peak), bytes in and out / datasheet
    bandwidth), ops do not overlap, kernels launch for free, collectives are not counted (torch's
    RuntimeEstimator does not model communication), and attention FLOPs are torch's formulas (the
    full T x T, causal or not, for either provider). Its value is the ratio of two plans (fastft
    against HF eager) and where the time goes, not the absolute figure.
    """
    from fastft import flops

    if gpu not in GPUS:
        raise PlanError(f"gpu={gpu!r}: the roofline knows {sorted(GPUS)}")
    if sizes is None:
        config, _ = _planned_config(_as_config(config), provider, None, None)
        from fastft.train import batch_plan

        sizes, setup = batch_plan(config, world_size), _setup(config, world_size)
    spec = GPUS[gpu]
    marks: dict[str, float] = {}

    def observe(model, optimizer, batch):
        estimator = _roofline_estimator(spec)("operator-level-cost-model")
        estimator._mod_tracker = _kwargs_mod_tracker()(model)
        estimator.mark = lambda name: marks.setdefault(name, estimator.total_runtime)
        return estimator

    with _planning(world_size, setup["fsdp"]):
        estimator, _, model = _one_step(config, provider, world_size, sizes, setup, observe)
        trained, frozen = flops.matmul_parameters(model)
        layers, d_attn = flops.attention_dims(flops.text_config(model))
        blocks = _blocks_name(model)
    micro_ms, opt_ms = marks["micro-batch"], marks["optimizer"] - marks["micro-batch"]
    step_ms = sizes["accumulation"] * micro_ms + opt_ms
    rows, width = sizes["micro_batch_rows"], _row_tokens(config)
    tokens = rows * width * sizes["accumulation"]  # per GPU and step
    work = flops.step_flops(trained, frozen, tokens, layers, d_attn, flops.causal_pairs([width] * rows)
                            * sizes["accumulation"])
    per_module: dict[str, float] = {}
    for fqn, times in estimator.mod_runtimes.items():
        key = _module_group(_module_name(fqn), blocks)
        if key is not None:
            per_module[key] = per_module.get(key, 0.0) + times.get("fw", 0.0) + times.get("bw", 0.0)
    return {"gpu": gpu, "step_ms": step_ms, "micro_batch_ms": micro_ms, "optimizer_ms": opt_ms,
            "tokens_per_s": tokens / (step_ms / 1e3), "mfu": work["flops"] / (step_ms / 1e3) / spec.bf16,
            "per_module_ms": dict(sorted(per_module.items(), key=lambda kv: -kv[1])[:12]),
            "note": "roofline model (torch RuntimeEstimator, datasheet peaks): not a measurement"}


def _blocks_name(model) -> str:
    from fastft import distributed

    return _module_name(type(model).__name__ + "." + distributed.decoder_blocks(model)[0])


def _module_group(name: str, blocks: str) -> str | None:
    """Modules summed over the decoder blocks ("model.layers.*.mlp"): a block, its direct parts,
    and the modules outside the blocks (embeddings, final norm, head); None for containers."""
    if name.startswith(blocks + "."):
        rest = name[len(blocks) + 1:].split(".")
        return ".".join([blocks, "*", *rest[1:]]) if len(rest) <= 2 else None
    if name == "(model)" or blocks.startswith(name + ".") or name == blocks:
        return None
    return name


# -- the longest row, and how memory grows with it -----------------------------------------------

def _row_config(config: FinetuneConfig) -> FinetuneConfig:
    """One packed row per micro-batch and no accumulation: what "the longest row" means."""
    config = copy.deepcopy(config)
    config.data.batching, config.data.batch_size = "packed", 1
    config.train.global_batch_tokens = config.train.global_batch_rows = None
    return config


@dataclasses.dataclass
class ContextSearch:
    longest: int  # tokens in the longest row that fits (0: not even `granularity` tokens)
    capacity: int
    reserve: int
    plans: dict[int, Plan]  # every row length planned, by tokens

    def lines(self) -> list[str]:
        out = [f"longest packed row that fits {(self.capacity - self.reserve) / GiB:.1f} GiB "
               f"({self.capacity / GiB:.1f} GiB less {self.reserve / GiB:.1f} GiB reserve): {self.longest:,} tokens"]
        for tokens, p in sorted(self.plans.items()):
            out.append(f"  {tokens:>9,} tokens: peak {size(p.peak):>11s} ({p.phase} of {p.where})"
                       + ("" if p.fits(self.capacity, self.reserve) else "  does not fit"))
        return out


def max_context(config, *, capacity: int = GPU_MEMORY["H100"], reserve: int = RESERVE, world_size: int = 1,
                provider: str = "fastft", granularity: int = 1024, start: int = 4096,
                limit: int = 1 << 24) -> ContextSearch:
    """The longest packed row (tokens, a multiple of `granularity`) one optimizer step of `config`
    fits in `capacity` bytes per GPU, less `reserve`: a bisection on planned peaks, with the next
    row length guessed by interpolating the peaks planned so far (regula falsi; memory is close
    to linear in the row length) and bisection when a guess does not shrink the bracket."""
    config = _row_config(_as_config(config))
    plans: dict[int, Plan] = {}

    def fits(tokens: int) -> bool:
        if tokens not in plans:
            plans[tokens] = plan(config, world_size=world_size, provider=provider, rows=1, tokens=tokens)
        return plans[tokens].fits(capacity, reserve)

    def guess(a: int, b: int) -> int:  # where the line through the peaks at a and b meets the budget
        pa, pb = plans[a].peak, plans[b].peak
        slope = (pb - pa) / (b - a) if b != a else 0
        target = a + (capacity - reserve - pa) / slope if slope > 0 else 2 * b
        return int(target // granularity * granularity)

    lo, hi = 0, None
    t = max(granularity, start // granularity * granularity)
    while fits(t) and hi is None:  # grow: double, then extrapolate
        lo = t
        known = sorted(plans)
        nxt = guess(known[-2], known[-1]) if len(known) > 1 else 2 * t
        t = min(limit, max(nxt + granularity, t + granularity))
        if t >= limit:
            break
    if t not in plans or not plans[t].fits(capacity, reserve):
        hi = t
    if lo == 0:  # even the first guess does not fit: shrink
        while hi > granularity:
            t = max(granularity, hi // 2 // granularity * granularity)
            if fits(t):
                lo = t
                break
            hi = t
        if lo == 0:
            return ContextSearch(0, capacity, reserve, plans)
    while hi is not None and hi - lo > granularity:
        t = guess(lo, hi)
        if not lo < t < hi:
            t = (lo + hi) // 2 // granularity * granularity
        if t <= lo:
            t = lo + granularity
        if fits(t):
            lo = t
        else:
            hi = t
    return ContextSearch(lo, capacity, reserve, plans)


def scaling(config, lengths: list[int], *, world_size: int = 1, provider: str = "fastft") -> list[str]:
    """Per-module activation bytes against the row length (one packed row), summed over the
    decoder blocks, with each module's growth exponent p (bytes ~ c0 + c T^p): from the
    increments between consecutive lengths, p = log(d_last / d_first) / log(T_last / T_first)
    for lengths in a geometric sequence (constants, such as the weights autocast casts, cancel).
    1 is linear; above about 1.05 something grows faster."""
    config = _row_config(_as_config(config))
    plans = [plan(config, world_size=world_size, provider=provider, rows=1, tokens=t) for t in lengths]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(plans):
        blocks = p.setup.get("blocks", "")
        for name, value in p.module_activations.items():
            key = _module_group(name, blocks) if blocks else name
            if key is None and name != "(model)":
                continue
            key = key or "(model)"
            groups.setdefault(key, [0] * len(plans))[i] += value
    header = f"{'module (summed over blocks)':44s}" + "".join(f"{t:>12,}" for t in lengths) + "  exponent"
    out = [f"activation bytes kept for the backward (MiB) against row length, {plans[0].model}, provider {provider}",
           header]
    for key, values in sorted(groups.items(), key=lambda kv: -kv[1][-1]):
        if values[-1] < 2**20 and key != "(model)":
            continue
        exponent = _growth(lengths, values)
        flag = "  <- faster than linear" if exponent > 1.05 else ""
        out.append(f"{key:44s}" + "".join(f"{v / 2**20:12.1f}" for v in values) + f"  {exponent:8.2f}{flag}")
    out.append(f"{'peak per GPU':44s}" + "".join(f"{p.peak / 2**20:12.1f}" for p in plans))
    return out


def _growth(lengths: list[int], values: list[int]) -> float:
    if len(lengths) >= 3:
        first, last = values[1] - values[0], values[-1] - values[-2]
        if first > 0 and last > 0:
            return math.log(last / first) / math.log(lengths[-1] / lengths[1])
    elif values[0] > 0 and values[-1] > 0:
        return math.log(values[-1] / values[0]) / math.log(lengths[-1] / lengths[0])
    return float("nan")


# -- what would fit ------------------------------------------------------------------------------

def alternatives(config: FinetuneConfig, world_size: int) -> list[tuple[str, list[str], int]]:
    """(what, the overrides that do it, GPUs) for each change that lowers the peak, in the order
    a user would try them."""
    d, data, out = config.distributed, config.data, []
    if d.activation_checkpointing in ("none", "selective"):
        out.append(("activation checkpointing on every block", ["--distributed.activation_checkpointing=full"], world_size))
    if d.activation_checkpointing != "offload":
        out.append(("offloaded activation checkpointing", ["--distributed.activation_checkpointing=offload"], world_size))
    if config.model.tiled_mlp == "off" and config.model.patch:
        out.append(("tiled MLP", ["--model.tiled_mlp=auto"], world_size))
    if not config.lora.enabled:
        out.append(("LoRA r=16 instead of full fine-tuning", ["--lora.enabled=true"], world_size))
    rows_field = "data.token_budget" if data.batching == "flat" else "data.max_seq_len"
    rows_value = data.token_budget if data.batching == "flat" else data.max_seq_len
    if rows_value >= 2:
        out.append((f"half the row length ({rows_value // 2} tokens)", [f"--{rows_field}={rows_value // 2}"], world_size))
    if data.batching != "flat" and data.batch_size >= 2:
        out.append((f"half the micro-batch ({data.batch_size // 2} rows; accumulation makes up the global batch)",
                    [f"--data.batch_size={data.batch_size // 2}"], world_size))
    out.append((f"{2 * world_size} GPUs (FSDP2)", [], 2 * world_size))
    out.append(("FSDP2 CPU offload (parameters, gradients, optimizer states in host memory)",
                ["--distributed.fsdp=true", "--distributed.cpu_offload=true"], world_size))
    return out


QLORA_NOTE = "QLoRA (4-bit base weights): not plannable yet, 4-bit training arrives with issue 16"


def _overridden(config: FinetuneConfig, overrides: list[str]) -> FinetuneConfig:
    return load_config(config.to_dict(), overrides) if overrides else copy.deepcopy(config)


def fit_report(config, *, world_size: int, capacity: int, reserve: int = RESERVE, provider: str = "fastft",
               base: Plan | None = None) -> tuple[Plan, list[dict]]:
    """The plan and, when it does not fit, each alternative planned: [{"what", "overrides",
    "world_size", "peak" or "error", "fits"}]."""
    config = _as_config(config)
    base = base or plan(config, world_size=world_size, provider=provider)
    rows = []
    if not base.fits(capacity, reserve):
        for what, overrides, gpus in alternatives(config, world_size):
            row = {"what": what, "overrides": overrides, "world_size": gpus}
            try:
                alt = plan(_overridden(config, overrides), world_size=gpus, provider=provider)
                row.update(peak=alt.peak, fits=alt.fits(capacity, reserve))
            except (PlanError, ConfigError, RuntimeError, ValueError) as exc:
                row.update(error=f"{type(exc).__name__}: {str(exc)[:160]}", fits=False)
            rows.append(row)
        rows.append({"what": QLORA_NOTE, "overrides": [], "world_size": world_size, "fits": False,
                     "error": "issue 16"})
    return base, rows


def fit_message(base: dict, rows: list[dict], capacity: int, reserve: int) -> str:
    lines = [f"the memory plan does not fit: {base['peak'] / GiB:.1f} GiB per GPU planned (in the {base['phase']} of "
             f"{base['where']}), {(capacity - reserve) / GiB:.1f} GiB usable ({capacity / GiB:.1f} GiB less "
             f"{reserve / GiB:.1f} GiB for the CUDA context and fragmentation). Planned alternatives:"]
    for row in rows:
        how = " ".join(row["overrides"]) or ("torchrun --nproc_per_node " + str(row["world_size"]) if row["world_size"] > 1 else "")
        if "peak" in row:
            lines.append(f"  {'fits ' if row['fits'] else 'no   '} {row['peak'] / GiB:6.1f} GiB  {row['what']}: {how}")
        else:
            lines.append(f"  {'':5s} {'':>6s}      {row['what']}" + (f" ({row['error']})" if row.get("error") != "issue 16" else ""))
    lines.append("(fastft plan RECIPE prints the full plan; the planner is fastft/planner.py)")
    return "\n".join(lines)


# -- the trainer's side ------------------------------------------------------------------------

def device_capacity(device: torch.device) -> int | None:
    """Bytes of memory of a CUDA device; None elsewhere (no check)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def plan_in_subprocess(config: FinetuneConfig, *, world_size: int, capacity: int, reserve: int = RESERVE,
                       timeout: float = 1800) -> dict:
    """`python -m fastft.planner --fit` in a fresh CPU-only process (its own fake process group and
    fake tensors, nothing of it left in the trainer): {"plan": record, "alternatives": [...]}."""
    import subprocess
    import tempfile

    from fastft.config import to_yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this fastft, installed or not
    with tempfile.TemporaryDirectory() as tmp:
        recipe = os.path.join(tmp, "recipe.yaml")
        with open(recipe, "w", encoding="utf-8") as f:
            f.write(to_yaml(config))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
        env.pop("TRITON_INTERPRET", None)
        proc = subprocess.run([sys.executable, "-m", "fastft.planner", recipe, "--world-size", str(world_size),
                               "--fit", str(capacity), "--reserve", str(reserve), "--json"],
                              capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise PlanError((proc.stderr.strip().splitlines() or ["(no output)"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def preflight(config: FinetuneConfig, env, log) -> dict | None:
    """Before the weights load, on CUDA: the planned peak per GPU, printed; PlanDoesNotFit, with
    the planned alternatives, when it exceeds the device. Rank 0 plans, every rank gets the
    verdict. A plan that cannot be made is logged, and training goes on."""
    from fastft import distributed

    capacity = device_capacity(env.device)
    if capacity is None:
        return None
    result, error = None, None
    if env.is_main:
        try:
            result = plan_in_subprocess(config, world_size=env.world_size, capacity=capacity)
        except Exception as exc:  # the plan is advice: never a reason not to train
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
    result, error = distributed.broadcast_object((result, error))
    if result is None:
        log(f"memory plan: not made ({error}); training without it")
        return None
    p = result["plan"]
    log(f"memory plan: {p['peak'] / GiB:.2f} GiB per GPU at the peak (the {p['phase']} of {p['where']}; first step "
        f"{p['first_step_peak'] / GiB:.2f} GiB) of {capacity / GiB:.1f} GiB; planned in {p['seconds']:.0f} s by fastft.plan")
    if result["alternatives"]:
        raise PlanDoesNotFit(fit_message(p, result["alternatives"], capacity, RESERVE))
    return p


def report_measured(planned: dict | None, device: torch.device, log, step: int, *, first_step: bool) -> None:
    """After a step: torch.cuda.max_memory_allocated against the plan (the first step's peak for
    the run's step 1, which has no optimizer states before its optimizer step; else the steady one)."""
    if planned is None or device.type != "cuda":
        return
    measured = torch.cuda.max_memory_allocated(device)
    want = planned["first_step_peak"] if first_step else planned["peak"]
    log(f"memory after step {step}: {measured / GiB:.2f} GiB measured (max_memory_allocated) against "
        f"{want / GiB:.2f} GiB planned ({100 * (measured - want) / want:+.1f}%)")


# -- command line ------------------------------------------------------------------------------

def _memory(text: str) -> int:
    """"80GiB", "80GB", "H100" -> bytes."""
    if text.upper() in GPU_MEMORY:
        return GPU_MEMORY[text.upper()]
    units = {"GIB": GiB, "GB": 10**9, "MIB": 2**20, "MB": 10**6, "": 1}
    for unit in sorted(units, key=len, reverse=True):
        if text.upper().endswith(unit):
            try:
                return int(float(text[: len(text) - len(unit)]) * units[unit])
            except ValueError:
                break
    raise PlanError(f"--gpu-memory {text!r}: give a size such as 80GiB or 80GB, or one of {sorted(GPU_MEMORY)}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="fastft plan", description="Plan the GPU memory of a recipe on this machine (no GPU, no weights): "
        "one optimizer step on fake tensors, tracked by torch's memory tracker. Overrides as for fastft train "
        "(--section.field=value).")
    parser.add_argument("recipe", nargs="?", default=None, help="a YAML recipe (none: the built-in default)")
    parser.add_argument("--world-size", type=int, default=1, help="GPUs (FSDP2 over a fake process group)")
    parser.add_argument("--gpu-memory", default="H100", help="per GPU: 80GiB, 80GB, or H100 / H200 / B200")
    parser.add_argument("--reserve", default=str(RESERVE), help="left free of --gpu-memory (CUDA context, fragmentation)")
    parser.add_argument("--max-context", action="store_true", help="the longest packed row that fits")
    parser.add_argument("--provider", default="fastft", choices=("fastft", "hf", "both"))
    parser.add_argument("--time", metavar="GPU", choices=sorted(GPUS), help="roofline estimate of the step")
    parser.add_argument("--scaling", metavar="T1,T2,...", help="per-module activations at these row lengths")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--fit", type=int, metavar="BYTES", help=argparse.SUPPRESS)  # the trainer's preflight
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.recipe, overrides)
        capacity, reserve = _memory(args.gpu_memory), _memory(args.reserve)
        if args.fit is not None:
            base, rows = fit_report(config, world_size=args.world_size, capacity=args.fit, reserve=reserve)
            print(json.dumps({"plan": base.record(), "alternatives": rows}))
            return 0
        providers = ("fastft", "hf") if args.provider == "both" else (args.provider,)
        for provider in providers:
            if args.scaling:
                lengths = [int(x) for x in args.scaling.split(",")]
                print("\n".join(scaling(config, lengths, world_size=args.world_size, provider=provider)))
            elif args.max_context:
                search = max_context(config, capacity=capacity, reserve=reserve, world_size=args.world_size,
                                     provider=provider)
                longest = search.plans.get(search.longest)
                record = {"plan_version": PLAN_VERSION, "provider": provider, "max_context": search.longest,
                          "capacity": capacity, "reserve": reserve,
                          "peaks": {t: p.peak for t, p in sorted(search.plans.items())},
                          "model": longest.model if longest else None}
                if not args.json:
                    print(f"fastft plan --max-context: {record['model']}, provider {provider}")
                    print("\n".join(search.lines()))
                print(json.dumps(record))
            else:
                result = plan(config, world_size=args.world_size, provider=provider, gpu=args.time)
                if not args.json:
                    print("\n".join(result.lines()))
                    usable = capacity - reserve
                    print(f"  {'fits' if result.fits(capacity, reserve) else 'does NOT fit'} in {usable / GiB:.1f} GiB "
                          f"({args.gpu_memory} less {reserve / GiB:.1f} GiB reserve)")
                print(json.dumps(result.record()))
    except (PlanError, ConfigError) as exc:
        print(f"fastft plan: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
