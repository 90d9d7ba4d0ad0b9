"""One plan: the recipe's model built, wrapped and run for one optimizer step on fake tensors
under torch's memory tracker (fastft/planning/__init__.py explains the plan)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from collections.abc import Callable
from unittest import mock

import torch

from fastft.config import ConfigError, FinetuneConfig, load_config, validate
from fastft.planning import workspace
from fastft.planning.tracking import _categories, _module_activations, _module_name, _ref, _trackers

PLAN_VERSION = 3  # bump when what a plan counts changes; recorded with every table (2: op workspaces, 4-bit; 3: gradient sums in place)

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
    "Qwen/Qwen3-30B-A3B": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                               moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                               num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
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


# -- the model's configuration, without the hub ---------------------------------------------------

def resolve_model(config: FinetuneConfig) -> tuple[dict, str]:
    """(the transformers config as a dict with model_type, where it came from) for the recipe's
    model: model.config, a local folder, the hub cache, PUBLISHED, or the hub, in that order."""
    m = config.model
    if m.name is None:
        return dict(m.config), "model.config"
    from transformers import AutoConfig

    local = os.path.isdir(os.path.expanduser(m.name))
    errors = []
    for source, kwargs in (("local files", {"local_files_only": True}), ("the hub", {})):
        if source == "the hub" and (local or m.name in PUBLISHED):
            break  # a folder has no hub copy; a known name needs no network round trip
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
        return dict(PUBLISHED[m.name]), f"{m.name} (fastft.planning.PUBLISHED: the published config's shape fields)"
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
    roofline: dict | None = None  # fastft.planning.estimate_time's figures (a model: see there)

    def fits(self, capacity: int, reserve: int = RESERVE) -> bool:
        return self.peak + reserve <= capacity

    @classmethod
    def from_record(cls, record: dict) -> "Plan":
        """A plan back from its JSON line (without the per-module activations, which it omits)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"module_activations": {}, **{k: v for k, v in record.items() if k in names}})

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
        if "four_bit" in setup:
            q = setup["four_bit"]
            out.append(f"  4-bit base: {q['layers']} layers, {size(q['packed'])} packed (in parameters) and "
                       f"{size(q['states'])} of quantization states (in buffers); each GEMM's dequantized weight, "
                       "freed after it, is in the op workspace")
        if setup.get("optimizer", "adamw") != "adamw":
            paged = setup.get("paged_optimizer_states")
            out.append(f"  optimizer {setup['optimizer']}: bitsandbytes' 8-bit moments with fp32 scales per 256 (fp32 "
                       "moments below 4096 elements)" + ("" if paged is None else
                       f"; {size(paged)} of them paged (CUDA unified memory, evicted to the host under pressure; "
                       "counted here as on the device, outside torch.cuda.max_memory_allocated)"))
        if setup.get("workspace_unmeasured"):
            out.append("  op workspaces not measured (counted as none): "
                       + "; ".join(f"{k} ({v})" for k, v in setup["workspace_unmeasured"].items()))
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


GPU = torch.device("cuda")  # what the trainer's decisions are made for (no CUDA is touched)


def _setup(config: FinetuneConfig, world_size: int) -> dict:
    """The trainer's own precision decision (fastft.model.decide_precision) as it falls on CUDA."""
    from fastft.distributed import DistEnv
    from fastft.model import decide_precision, quantization_settings

    p = decide_precision(config, DistEnv(world_size=world_size, device=GPU))
    quant = quantization_settings(config, p)  # QLoRA's 4-bit settings, as the trainer takes them
    d, m = config.distributed, config.model
    return {"fsdp": p.fsdp, "weights": p.weights, "param_dtype": p.param_dtype, "autocast": p.autocast_on,
            "precision": (f"weights {str(p.weights).removeprefix('torch.')}"
                          + (f", FSDP2 params {p.param_dtype}" if p.fsdp else ", bf16 autocast" if p.autocast_on else "")),
            "training": (("QLoRA" if quant else "LoRA") + f" r={config.lora.r}" if config.lora.enabled
                         else "full fine-tuning") + (f" ({quant.describe()})" if quant else ""),
            "optimizer": config.optim.name, "_quant": quant,
            "activation_checkpointing": d.activation_checkpointing, "tiled_mlp": m.tiled_mlp,
            "_precision": p}


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
    from fastft.model import load_tokenizer

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
                            "one (fastft.planning.plan_in_subprocess does)")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(attention.as_on_gpu())  # attention and the kernels' ops as on CUDA
            for module, name, replacement in ((_sharding_prop, "detect_fake_mode", lambda *a, **k: None),
                                              (masking_utils, "find_packed_sequence_indices", lambda position_ids: None)):
                if hasattr(module, name):  # other torch / transformers versions may not have them
                    stack.enter_context(mock.patch.object(module, name, replacement))
            yield
    finally:
        if started:
            dist.destroy_process_group()


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
    from fastft.config import batch_plan

    sizes = batch_plan(config, world_size)
    setup = _setup(config, world_size)
    setup["source"] = source
    with _planning(world_size, setup["fsdp"]):
        result = _run(config, provider, world_size, sizes, setup, gpu)
    result.seconds = time.perf_counter() - start
    return result


def _build(config: FinetuneConfig, provider: str, setup: dict):
    """The model on the meta device, wrapped as the trainer wraps it (fastft.parallelize.wrap:
    planned eager, the shards on the device)."""
    from fastft.model import build_model
    from fastft.parallelize import wrap

    model, report = build_model(config, _tokenizer(config), setup["weights"], meta=True,
                                patch=provider == "fastft", quant=setup["_quant"])
    wrap(model, config.distributed, setup["_precision"], compile=False, cpu_offload=False)
    if report is not None:
        setup["patched"] = sorted({e.kind for e in report.patched()})
    setup["blocks"] = _blocks_name(model)
    return model


def _one_step(config, provider, world_size, sizes, setup, observe: Callable):
    """Build, materialise as fake tensors and run one optimizer step of the trainer's loop under
    the context `observe(model, optimizer, batch)` returns; returns (that context, the exact
    parameter / gradient / optimizer-state bytes before zero_grad, the model)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from fastft import collectives
    from fastft.data import model_inputs
    from fastft.optim import build_optimizer

    model = _build(config, provider, setup)
    vocab = config.model.config.get("vocab_size") or len(_tokenizer(config))
    real_batch, _ = _micro_batch(config, provider, vocab)
    o = config.optim
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        model.to_empty(device="cpu")
        if setup["_quant"] is not None:  # 4-bit layers: packed weights and their quantization states at real size
            from fastft import quantization

            quantization.planned_states(model, setup["_quant"], setup["weights"])
            setup["four_bit"] = quantization.four_bit_bytes(model)
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not setup["fsdp"] and hasattr(hf, "tie_weights"):
            hf.tie_weights()  # to_empty makes new tensors per module: tied embeddings would come apart
        model.train()
        with unset_fake_temporarily():  # bitsandbytes' 8-bit optimizers make their quantization maps from
            # Python floats (create_dynamic_map) as they are built, which fake tensors cannot give
            params, optimizer, _, setup["fused"], _ = build_optimizer(model, config, setup["_precision"], GPU)
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
            # fastft's loop keeps the output until the next micro-batch (unpatched, its logits
            # too); an HF Trainer's compute_loss (and benchmarks/e2e.py) keeps only the loss.
            return out if provider == "fastft" else None

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
            if o.grad_clip is not None:  # as train_step: the local squared norm, one all-reduce, the clip
                norm = collectives.all_reduce_sum(collectives.local_grad_square(params, torch.device("cpu"))).sqrt()
                torch.nn.utils.clip_grads_with_norm_(params, o.grad_clip, norm, foreach=None)
            optimizer.step()
            mark("optimizer")
            # What the tracker holds after the step, before zero_grad: the exact state totals.
            state = _categories(observer.get_tracker_snapshot()) if hasattr(observer, "get_tracker_snapshot") else {}
            if getattr(optimizer, "is_paged", False):
                from fastft import quantization

                setup["paged_optimizer_states"] = quantization.paged_state_bytes(optimizer)
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
        from fastft import quantization

        tracker.track_buffers(quantization.state_tensors(model))  # the 4-bit layers' states
        return tracker

    tracker, state, _ = _one_step(config, provider, world_size, sizes, setup, observe)
    if tracker.unmeasured:
        setup["workspace_unmeasured"] = {name: workspace.UNMEASURED[name] for name in sorted(tracker.unmeasured)}
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
        setup={k: v for k, v in setup.items() if k != "weights" and not k.startswith("_")}
        | {"weights": str(setup["weights"])})
    if gpu is not None:
        from fastft.planning.roofline import estimate_time

        result.roofline = estimate_time(config, provider, world_size, gpu, sizes=sizes, setup=setup)
    return result


def _row_tokens(config: FinetuneConfig) -> int:
    return config.data.token_budget if config.data.batching == "flat" else config.data.max_seq_len


def _model_name(config: FinetuneConfig, setup: dict) -> str:
    source = setup["source"]
    return source.split(" (")[0] if source != "model.config" else f"{config.model.config.get('model_type')} (model.config)"




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
