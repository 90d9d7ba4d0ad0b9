"""The training loop: `fastft.finetune(config)`, one readable function top to bottom.

Sections of `_run`, in order (after nanochat's scripts/base_train.py and torchtitan's train.py,
re-written); each block with its own purpose is a small named function below it:
  1. config and processes    checked config, process group from torchrun (none for one process),
                             derived batch sizes (micro-batch x accumulation x ranks), precision
  2. tokenizer and model     pretrained (AutoModelForCausalLM) or built from a config with random
                             weights, 4-bit for QLoRA; LoRA (PEFT) as a model transform; then fastft.patch
  3. data                    fastft.data: this rank's packed micro-batches; val batches; eval prompts
  4. parallelism             from outside the model, in this order: activation checkpointing ->
                             torch.compile per block -> FSDP2 per block then root
  5. optimizer, schedule     AdamW (fused) or 8-bit AdamW (bitsandbytes), warm-up then cosine/linear decay
  6. resume                  the newest complete checkpoint (model, optimizer, schedule, data, RNG)
  7. the loop                `train_step` per optimizer step; metrics, evaluation, checkpoints, faults
  8. the end                 evaluation, export (HF folder or PEFT adapter; merged), curves.png, summary

Loss normalisation (gradient accumulation and data parallelism):
  The loss of an optimizer step is sum(token losses over all micro-batches and all ranks) / N,
  N = the all-reduced number of target tokens of the step. Each micro-batch calls the model with
  `num_items_in_batch=N` (Hugging Face's convention, also the fused loss's): the model returns its
  summed token loss / N, and the micro-batch losses' backward passes simply add up. Under FSDP2
  the gradient reduce-scatter averages over ranks (divides by the world size W), so each rank
  back-propagates W x its loss: the average of W x (rank sums / N) is the global sum / N, exactly
  the global per-token mean (logged losses are not scaled). So batch 16 x accumulation 1 ==
  batch 1 x accumulation 16 == 2 ranks x 8 rows. (FSDP2's gradient divide factor set to 1 would
  do the same, but needs ReduceOp.PREMUL_SUM, which gloo does not have.)

One all-reduce and one host sync per step:
  Besides FSDP2's own gathers and reduce-scatters, a step needs from the other ranks: its N (before
  the forward), the loss and the gradient norm (after the backward, before clipping), the token
  counts for the metrics and whether any rank was signalled to stop. All of it goes into one
  float64 vector, all-reduced once after the backward and read on the host once: the squared
  gradient norm is the sum of the ranks' squares (FSDP2's shards are disjoint), and N comes one
  step ahead, the next step's micro-batches being drawn (host data, counted without the model)
  before this step's all-reduce. Only the first step of a run reduces its N on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from typing import Callable, NamedTuple

import torch

from fastft import checkpoint as ckpt
from fastft import collectives, distributed, expert_parallel, flops, hub, metrics, planning, quantization, rundir
from fastft.config import ConfigError, FinetuneConfig, load_config, to_yaml, validate
from fastft.patching.moe import set_real_tokens


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the run stopped without writing a checkpoint of that state."""


@dataclasses.dataclass
class RunResult:
    status: str = "finished"  # "finished", "stopped" (train.run_steps reached), "interrupted" (signal)
    signal: int | None = None  # "interrupted": the signal this process received (None: another rank's)
    steps: int = 0  # optimizer steps done, in total (resumed ones included)
    losses: list[float] = dataclasses.field(default_factory=list)  # train loss of each step run here
    eval_before: dict | None = None  # {"val_loss", "exact_match", "f1", ...}
    eval_after: dict | None = None
    export_dir: str | None = None
    merged_dir: str | None = None  # checkpoint.export_merged: the merged bf16 HF folder
    checkpoint: str | None = None  # the newest complete checkpoint
    run_dir: str = ""
    plan: dict = dataclasses.field(default_factory=dict)  # the derived batch sizes
    curves: str | None = None  # <run_dir>/curves.png, when drawn
    model: object = dataclasses.field(default=None, repr=False)  # the trained model (FSDP2-sharded under torchrun)
    tokenizer: object = dataclasses.field(default=None, repr=False)


# -- 1. config and processes: derived sizes and the precision --------------------------------------

def batch_plan(config: FinetuneConfig, world_size: int) -> dict:
    """Micro-batch, accumulation and global batch, from the data section and the global batch."""
    data, train = config.data, config.train
    micro_rows = 1 if data.batching == "flat" else data.batch_size
    micro_tokens = data.token_budget if data.batching == "flat" else data.batch_size * data.max_seq_len
    if train.global_batch_tokens is not None:
        field, want, per = "train.global_batch_tokens", train.global_batch_tokens, micro_tokens * world_size
    elif train.global_batch_rows is not None:
        field, want, per = "train.global_batch_rows", train.global_batch_rows, micro_rows * world_size
    else:
        field, want, per = None, None, None
    if field is None:
        accumulation = 1
    else:
        if want % per or want < per:
            raise ConfigError(
                f"{field}={want} is not a multiple of one micro-batch on every rank ({per} = "
                f"{'data.batch_size x data.max_seq_len' if 'tokens' in field else 'data.batch_size'} x "
                f"{world_size} rank(s)); use e.g. {max(1, round(want / per)) * per}, or change data.batch_size"
            )
        accumulation = want // per
    return {"world_size": world_size, "micro_batch_rows": micro_rows, "micro_batch_tokens": micro_tokens,
            "accumulation": accumulation, "global_batch_rows": micro_rows * accumulation * world_size,
            "global_batch_tokens": micro_tokens * accumulation * world_size}


class Precision(NamedTuple):
    fsdp: bool  # FSDP2 wraps the model
    weights: torch.dtype  # as loaded / built
    param_dtype: str  # FSDP2's compute copy of the parameters
    autocast_on: bool  # bf16 autocast around forward (one process: FSDP2 casts instead)

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.autocast_on else contextlib.nullcontext()


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def decide_precision(config: FinetuneConfig, env: distributed.DistEnv) -> Precision:
    """bf16 on CUDA (or when asked), fp32 on a CPU; fp32 master weights for everything trained,
    frozen LoRA bases in bf16 on one GPU (no FSDP)."""
    d, t = config.distributed, config.train
    fsdp = bool(d.fsdp) or (d.fsdp is None and env.world_size > 1)
    if not fsdp and (d.cpu_offload or not d.reshard_after_forward):
        raise ConfigError("distributed.cpu_offload / reshard_after_forward need FSDP2: run several processes "
                          "under torchrun, or set distributed.fsdp=true")
    bf16 = t.precision == "bf16" or (t.precision == "auto" and env.device.type == "cuda")
    param_dtype = d.param_dtype if d.param_dtype != "auto" else ("bfloat16" if bf16 else "float32")
    if config.model.dtype != "auto":
        weights = _DTYPES[config.model.dtype]
    else:
        weights = torch.bfloat16 if (config.lora.enabled and bf16 and not fsdp) else torch.float32
    return Precision(fsdp, weights, param_dtype, autocast_on=bf16 and not fsdp)


class RunDir(NamedTuple):
    path: str
    config_file: str  # what this run wrote there: config.yaml, or config.resume.yaml when resuming


def prepare_run_dir(config: FinetuneConfig, env: distributed.DistEnv) -> RunDir:
    """The run folder (never another run's, unless resuming or told to overwrite), with the config."""
    run_dir = rundir.prepare(config, env)
    resumed = bool(config.checkpoint.resume or config.checkpoint.resume_from)
    name = "config.resume.yaml" if resumed and os.path.exists(os.path.join(run_dir, "config.yaml")) else "config.yaml"
    if env.is_main:
        rundir.write_config(run_dir, name, to_yaml(config))
    return RunDir(run_dir, name)


# -- 2. tokenizer and model --------------------------------------------------------------------------

def load_tokenizer(config: FinetuneConfig):
    """model.tokenizer: "words", "byte", or a hub name / folder (None: the model's own; for the
    built-in data without a model, the built-in word-level tokenizer)."""
    from fastft.data import byte_level_tokenizer, word_level_tokenizer

    m = config.model
    source = m.tokenizer or (m.name if m.name is not None else "words" if config.data.source == "builtin" else "byte")
    if source == "words":
        return word_level_tokenizer()
    if source == "byte":
        return byte_level_tokenizer()
    from transformers import AutoTokenizer

    field = "model.tokenizer" if m.tokenizer else "model.name"
    tokenizer = hub.load(AutoTokenizer.from_pretrained, source, field, "tokenizer", trust_remote_code=m.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_settings(config: FinetuneConfig, precision: Precision):
    """QLoRA's 4-bit settings (fastft/quantization.py), or None. compute_dtype "auto": bf16 when
    training in bf16 (the activations' dtype under autocast or FSDP2's param_dtype), else the
    weights' dtype."""
    m = config.model
    if m.quantization == "none":
        return None
    bf16 = precision.autocast_on or (precision.fsdp and precision.param_dtype == "bfloat16")
    return quantization.settings(m.quantization, m.double_quant, m.compute_dtype,
                                 torch.bfloat16 if bf16 else precision.weights)


def eager_experts(model) -> None:
    """transformers' per-expert loop in place of its grouped_mm experts, which have no float64
    kernel: for float64 reference runs (and tests/numerics.py's float64 twins)."""
    if getattr(model, "get_experts_implementation", lambda: None)() not in (None, "eager"):
        model.set_experts_implementation("eager")


def build_model(config: FinetuneConfig, tokenizer, dtype: torch.dtype, *, meta: bool = False, patch: bool = True,
                quant=None):
    """The transformers model (pretrained or random), quantized (QLoRA: `quant`, from
    quantization_settings), LoRA applied, fastft-patched. meta=True builds the same structure on
    the meta device (no weights: the FSDP2 rank-0 load). A float64 reference run of a 4-bit recipe
    holds the 4-bit values dense in float64 (bitsandbytes has no float64 kernels)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = config.model
    if quant is None and m.quantization != "none":
        quant = quantization.settings(m.quantization, m.double_quant, m.compute_dtype, dtype)
    reference = quant is not None and dtype == torch.float64  # quantized from float32, then held dense
    kwargs = {"dtype": torch.float32 if reference else dtype, "trust_remote_code": m.trust_remote_code}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.name is not None and not meta:
        load = {"quantization_config": quant.bitsandbytes_config()} if quant is not None else {}
        # Hub kernels (transformers' default since 5.25) come later, if asked: enable_hub_kernels.
        model = hub.load(AutoModelForCausalLM.from_pretrained, m.name, "model.name", "model", **kwargs, **load,
                         use_kernels=False)
    else:
        if m.name is not None:
            hf_config = hub.load(AutoConfig.from_pretrained, m.name, "model.name", "model config",
                                 trust_remote_code=m.trust_remote_code)
        else:
            fields = dict(m.config)
            model_type = fields.pop("model_type")
            fields.setdefault("vocab_size", len(tokenizer))
            if fields["vocab_size"] < len(tokenizer):
                raise ConfigError(f"model.config.vocab_size={fields['vocab_size']} is smaller than the tokenizer "
                                  f"({len(tokenizer)} tokens); leave it out to use the tokenizer's size")
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                fields.setdefault(name, getattr(tokenizer, name))
            try:
                hf_config = AutoConfig.for_model(model_type, **fields)
            except ValueError as exc:
                raise ConfigError(f"model.config: {str(exc).splitlines()[0]}") from None
        with torch.device("meta") if meta else contextlib.nullcontext():
            # A float64 reference run starts from the same random weights as a float32 one.
            init = {**kwargs, "dtype": torch.float32} if dtype == torch.float64 else kwargs
            model = AutoModelForCausalLM.from_config(hf_config, **init).to(kwargs["dtype"])
        if m.name is not None:  # what from_pretrained would also read: eos ids etc. for generation and export
            from transformers import GenerationConfig

            with contextlib.suppress(OSError):
                model.generation_config = GenerationConfig.from_pretrained(m.name)
        if quant is not None:
            quantization.quantize_model(model, quant)
    if reference:
        quantization.dequantize_model(model, torch.float64)
        model.to(torch.float64)
    if dtype == torch.float64:
        eager_experts(model)
    if config.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lc = config.lora
        model = get_peft_model(model, LoraConfig(
            r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
            modules_to_save=lc.modules_to_save, target_parameters=lc.target_parameters, task_type="CAUSAL_LM"))
    report = None
    if m.patch and patch:
        import fastft

        report = fastft.patch(model, **m.patch_options)
    if m.tiled_mlp != "off":  # after patch: each chunk runs the (fused) MLP forward
        from fastft.patching import tiled_mlp

        tiled_mlp.apply(model, m.tiled_mlp, report)
    return model, report


def rank0_load(config: FinetuneConfig, precision: Precision, env: distributed.DistEnv) -> bool:
    return precision.fsdp and env.world_size > 1 and config.distributed.load == "rank0"


def build_models(config: FinetuneConfig, tokenizer, precision: Precision, env: distributed.DistEnv):
    """(model, patch report, full model or None). Under the FSDP2 rank-0 load, the full weights
    live on rank 0's CPU only (`full`) and every rank builds and patches the model on meta."""
    quant = quantization_settings(config, precision)
    if not rank0_load(config, precision, env):
        return (*build_model(config, tokenizer, precision.weights, quant=quant), None)
    full = build_model(config, tokenizer, precision.weights, patch=False, quant=quant)[0] if env.is_main else None
    try:
        model, report = build_model(config, tokenizer, precision.weights, meta=True, quant=quant)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"distributed.load=rank0: this model cannot be built on the meta device "
                          f"({type(exc).__name__}: {str(exc)[:200]}); use --distributed.load=every_rank "
                          "(each rank then loads the whole model before sharding)") from exc
    return model, report, full


# -- 3. data: validation -------------------------------------------------------------------------------

class Validation(NamedTuple):
    batches: list  # this rank's val micro-batches
    weight: float  # 0 on a rank that runs a batch only to keep in step with the others
    prompts: list  # (id, prompt ids) for EM/F1 by generation
    golds: dict  # id -> gold answers


def validation_data(config: FinetuneConfig, tokenizer, env: distributed.DistEnv) -> Validation:
    """The first train.eval_batches micro-batches of the one-process plan of the eval split
    (rounded up to a multiple of the world size: under FSDP2 every rank must run as many
    forwards), dealt to the ranks, so the val loss does not depend on the number of processes;
    and the questions for EM/F1."""
    from fastft.data import build_eval_prompts, build_train_batches

    data, t = config.data, config.train
    eval_data = dataclasses.replace(data, source=data.eval_source or data.source, train_split=data.eval_split,
                                    streaming=False)
    source, _ = build_train_batches(eval_data, tokenizer, rank=0, world_size=1,
                                    field="data.eval_source" if data.eval_source else "data.source")
    n = -(-t.eval_batches // env.world_size) * env.world_size
    batches = [b for _, b in zip(range(n), source)]
    usable = len(batches) - len(batches) % env.world_size
    if batches and usable == 0:  # fewer val batches than ranks: all run the first, rank 0 counts it
        mine, weight = batches[:1], 1.0 if env.is_main else 0.0
    else:
        mine, weight = batches[:usable][env.rank :: env.world_size], 1.0
    prompts, golds = [], {}
    if t.eval_generate:
        prompts, golds = build_eval_prompts(dataclasses.replace(data, eval_examples=t.eval_generate), tokenizer)
    return Validation(mine, weight, prompts, golds)


def batching_for(data, model, patch_report) -> tuple[object, list[str]]:
    """The data section to use: packed batches only for a model the packed probe found safe to
    pack (fastft/patching/packed_probe.py; run here when the model is not patched); otherwise
    padded batches with a start-up line saying why, or a ConfigError for data.batching='flat'
    (padding-free rows cannot be padded instead). Returns (data config, start-up lines)."""
    if data.batching == "padded":
        return data, []
    if patch_report is not None:
        safe, verdict = patch_report.packing_safe, patch_report.packing
    else:
        from fastft.patching import _hf_model, packed_probe

        result = packed_probe.run(model, _hf_model(model))
        safe, verdict = result.verdict == "safe", f"{result.verdict}: {result.why}"
    if safe:
        return data, []
    if data.batching == "flat":
        raise ConfigError(f"data.batching='flat' packs documents into shared rows, but this model is not safe to "
                          f"pack ({verdict}); use --data.batching=padded")
    return dataclasses.replace(data, batching="padded"), [
        f"data: packing off, padded batches instead: this model is not safe to pack ({verdict})"]


# -- 4. parallelism ----------------------------------------------------------------------------------

def parallelize(model, full, config: FinetuneConfig, precision: Precision, env: distributed.DistEnv, patch_report,
                log) -> tuple[int, object, list]:
    """Experts split -> activation checkpointing -> compile -> FSDP2 (then, for the rank-0 load,
    the weights are broadcast into the shards). Returns (checkpointed blocks, the expert-parallel
    mesh or None, the split experts' parameters)."""
    d, from_rank0 = config.distributed, rank0_load(config, precision, env)
    if not (precision.fsdp and d.cpu_offload) and not from_rank0:
        model.to(env.device)
    ep_mesh = _apply_expert_parallel(model, d.expert_parallel, env, log)
    n_ac = distributed.apply_activation_checkpointing(model, d.activation_checkpointing, d.checkpoint_every)
    if d.compile:
        distributed.apply_compile(model)
    if precision.fsdp:
        distributed.apply_fsdp(model, param_dtype=precision.param_dtype, reduce_dtype=d.reduce_dtype,
                               reshard_after_forward=d.reshard_after_forward, cpu_offload=d.cpu_offload,
                               expert_mesh=ep_mesh["dp"] if ep_mesh is not None else None,
                               expert_units=expert_parallel.expert_units(model) if ep_mesh is not None else ())
    ep_params = _expert_parameters(model) if ep_mesh is not None else []  # FSDP2's, so after fully_shard
    if from_rank0:
        distributed.load_from_rank0(model, full, env.device, cpu_offload=d.cpu_offload)
        quantization.broadcast_states(model, full, env.device)  # 4-bit layers: rank 0's quantization state
        if patch_report is not None:  # what only a forward with weights can check (the loss's logit map)
            import fastft.patching

            with distributed.root_unsharded(model):
                verified = fastft.patching.verify_loaded(model)
            if verified:
                log(f"patch, with the weights loaded: {verified}")
    if config.model.hub_kernels:
        enable_hub_kernels(model, d.compile, log)
    model.train()
    return n_ac, ep_mesh, ep_params


def enable_hub_kernels(model, compiled: bool, log) -> None:
    """model.hub_kernels: transformers' hub kernels for the layers fastft left alone, in training
    mode, once the model is on its device (fastft/patching/hub_kernels.py)."""
    import fastft.patching

    log(f"transformers hub kernels: {fastft.patching.enable_hub_kernels(model, True, compiled)}")


def _apply_expert_parallel(model, degree: int, env, log):
    """Split the MoE experts over groups of `degree` ranks (fastft/expert_parallel.py): returns the
    ("dp", "ep") mesh, or None when degree is 1."""
    if degree == 1:
        return None
    from fastft import expert_parallel

    mesh = distributed.expert_mesh(env.world_size, degree, env.device.type)
    # FSDP2 averages the experts over the D = W / degree ranks holding them, the loss is scaled by
    # W: 1/degree on their gradients gives the global mean (fastft/expert_parallel.py).
    layers = expert_parallel.apply_expert_parallel(model, mesh["ep"].get_group(), weight_grad_scale=1.0 / degree)
    log(f"expert parallel: {layers} MoE layers' experts split over groups of {degree} ranks "
        f"({env.world_size // degree} replica(s)), all-to-all dispatch")
    return mesh


def _expert_parameters(model):
    from fastft.expert_parallel import expert_parameters

    return expert_parameters(model)


# -- 5. optimizer and schedule ---------------------------------------------------------------------

def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of optim.lr after `step` optimizer steps: linear warm-up, then decay to min_ratio."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model, config: FinetuneConfig, precision: Precision, device: torch.device):
    """(params, AdamW, schedule, fused, warm-up steps): no weight decay on norms and biases."""
    o, t = config.optim, config.train
    params = [p for p in model.parameters() if p.requires_grad]
    fused = o.fused if o.fused is not None else (device.type == "cuda" or not precision.fsdp)
    optimizer = make_optimizer(o, [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], fused)
    warmup = o.warmup_steps if o.warmup_steps is not None else round(0.05 * t.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, warmup=warmup, total=t.max_steps, schedule=o.schedule, min_ratio=o.min_lr_ratio))
    return params, optimizer, scheduler, fused, warmup


def make_optimizer(o, groups: list[dict], fused: bool) -> torch.optim.Optimizer:
    """optim.name: "adamw" is torch's AdamW (fused where torch supports it); "adamw_8bit" and
    "paged_adamw_8bit" are bitsandbytes' AdamW with blockwise 8-bit moments (Dettmers et al. 2022,
    "8-bit Optimizers via Block-wise Quantization": 2 bytes a parameter instead of 8; paged: the
    states in CUDA unified memory, evicted to the host under memory pressure). Their states are
    tensors in the optimizer's state dict, so checkpoints save and resume them as AdamW's. Under
    FSDP2 they are refused: bitsandbytes' update ops take plain tensors, not DTensor shards."""
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for group in groups for p in group["params"]):
        raise ConfigError(f"optim.name={o.name}: bitsandbytes' 8-bit optimizers update plain tensors, not FSDP2's "
                          "DTensor shards; under FSDP2 (several processes, or distributed.fsdp=true) use optim.name=adamw")
    bnb = quantization.require_bitsandbytes(f"optim.name={o.name}")
    cls = bnb.optim.PagedAdamW8bit if o.name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, **kwargs)


# -- 6. resume -----------------------------------------------------------------------------------------

class BatchStream:
    """Micro-batches over epochs, with a position that checkpoints save: (epoch, consumed)."""

    def __init__(self, batches, epoch: int = 0, consumed: int = 0):
        self.batches, self.epoch, self.consumed = batches, epoch, consumed
        self._iter = None

    def _start(self):
        self.batches.set_epoch(self.epoch)
        self._iter = iter(self.batches)
        for _ in range(self.consumed):  # resume mid-epoch: the plan is seeded, so this replays it
            next(self._iter)

    def __next__(self) -> dict:
        if self._iter is None:
            self._start()
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch, self.consumed = self.epoch + 1, 0
            self._start()
            batch = next(self._iter)  # an empty epoch raises StopIteration: no data for this rank
        self.consumed += 1
        return batch

    def take(self, n: int) -> list[dict]:
        return [next(self) for _ in range(n)]

    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}


def resume(config: FinetuneConfig, run_dir: str, model, optimizer, scheduler, env, log) -> tuple[int, dict, bool]:
    """(start step, data position, resumed) from checkpoint.resume_from, or the newest complete
    checkpoint of the run folder when checkpoint.resume is set."""
    c = config.checkpoint
    path = c.resume_from or (ckpt.latest(run_dir) if c.resume else None)
    if c.resume and path is None:
        log(f"resume: no complete checkpoint in {ckpt.checkpoint_dir(run_dir)}; starting from step 0")
    if path is None:
        return 0, {"epoch": 0, "consumed": 0}, False
    state = ckpt.load(path, model, optimizer, scheduler=scheduler, env=env)
    log(f"resume: {path} (step {state['step']})")
    data = state["data"] if state["world_size"] == env.world_size else {"epoch": 0, "consumed": 0}
    return state["step"], data, True


def startup_report(log, config: FinetuneConfig, env, run_dir: str, plan: dict, precision: Precision, patch_report,
                   data_report, n_params: tuple[float, float], n_ac: int, fused: bool, warmup: int,
                   qlora_report: list[str] = ()) -> None:
    """Everything derived, printed once."""
    c, d, o, device = config, config.distributed, config.optim, env.device
    n_trained, n_frozen = n_params
    quant = quantization_settings(c, precision)
    cuda = device.type == "cuda"
    log(f"fastft train: {env.world_size} process(es) on {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else "") + f"; run folder {run_dir}")
    kernels = ("compiled Triton kernels" if cuda else "Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1"
               else "kernels' torch reference fallback (set TRITON_INTERPRET=1 for the Triton kernels)")
    log(f"model: {c.model.name or 'random init from config ' + str(c.model.config.get('model_type'))}, "
        f"{n_trained + n_frozen:,.0f} matmul params ({n_trained:,.0f} trained)"
        + (f", LoRA r={c.lora.r}" if c.lora.enabled else ", full fine-tuning")
        + (f" over a 4-bit base ({quant.describe()})" if quant is not None else "")
        + (f"; patched: {len(patch_report.patched())} modules, {kernels}" if patch_report is not None else "; not patched"))
    for line in qlora_report + data_report.lines:
        log(line)
    log(f"batch: micro-batch {plan['micro_batch_rows']} rows ({plan['micro_batch_tokens']} tokens) x accumulation "
        f"{plan['accumulation']} x {env.world_size} rank(s) = {plan['global_batch_rows']} rows / "
        f"{plan['global_batch_tokens']} tokens per optimizer step; {c.train.max_steps} steps")
    log(f"precision: weights {str(precision.weights).removeprefix('torch.')}, "
        + (f"FSDP2 params {precision.param_dtype} / reduce {d.reduce_dtype}, reshard_after_forward="
           f"{d.reshard_after_forward}, cpu_offload={d.cpu_offload}" if precision.fsdp
           else ("bf16 autocast" if precision.autocast_on else "no autocast"))
        + f"; activation checkpointing: {d.activation_checkpointing} ({n_ac} blocks); compile: {d.compile}")
    peak = flops.peak_flops(device)
    log(f"optimizer: {'AdamW' if o.name == 'adamw' else o.name} lr {o.lr}" + (f" (fused={fused})" if o.name == "adamw" else "")
        + f", warm-up {warmup} steps then {o.schedule} to "
        f"{o.min_lr_ratio}x, clip {o.grad_clip}; MFU peak: "
        + (f"{peak / 1e12:.0f} TFLOP/s per device" if peak else "n/a on this device"))


# -- 7. the loop: one optimizer step ---------------------------------------------------------------

class Step(NamedTuple):
    """What a training step needs that does not change from step to step."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list
    autocast: Callable
    device: torch.device
    fsdp: bool
    loss_scale: float  # W under FSDP2 (see the module docstring), else 1
    grad_clip: float | None
    clip_groups: list  # the trained parameters by device mesh (split experts apart): a foreach op takes one


class StepResult(NamedTuple):
    loss: float  # global per-target-token loss of the step
    grad_norm: float  # before clipping
    lr: float
    tokens: float  # real tokens of the step, all ranks (padding excluded)
    pairs: float  # causal (query, key) pairs, all ranks
    stop: bool  # some rank was signalled
    next_targets: float  # target tokens of the next step's micro-batches, all ranks
    seconds: float
    target_tokens: float  # of this step


def target_tokens(micro_batches: list[dict]) -> float:
    return float(sum(int(b["num_target_tokens"]) for b in micro_batches))


def global_target_tokens(micro_batches: list[dict], device: torch.device) -> float:
    """The all-reduced target tokens of a step on its own: only for a run's first step."""
    total = torch.tensor([target_tokens(micro_batches)], dtype=torch.float64, device=device)
    return collectives.all_reduce_sum(total).tolist()[0]


def train_step(s: Step, micro_batches: list[dict], targets: float, upcoming: list[dict], stop: StopFlag) -> StepResult:
    """Forward and backward of every micro-batch (loss / the step's global target tokens), the
    step's one all-reduce and one host sync, then clip and step. Raises TrainingDiverged, before
    the optimizer step, when the loss is not finite."""
    from fastft.data import model_inputs

    start = time.perf_counter()
    normalizer = torch.tensor(max(int(targets), 1), device=s.device)
    loss_sum = torch.zeros((), device=s.device)
    tokens = pairs = 0.0
    for i, batch in enumerate(micro_batches):
        if s.fsdp:  # reduce-scatter the gradients once, after the last micro-batch
            s.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        tokens += float(batch["document_lengths"].sum())  # real tokens, padding excluded (host data)
        pairs += flops.causal_pairs(batch["document_lengths"])
        batch = _to_device(batch, s.device)
        set_real_tokens(s.model, batch.get("real_tokens"))  # MoE: packed tails skip the experts
        with s.autocast():
            out = s.model(**model_inputs(batch), num_items_in_batch=normalizer)
        (out.loss * s.loss_scale).backward()
        loss_sum += out.loss.detach().float()
    signalled = float(stop.signal is not None)  # read after the backward: a signal during this step stops after it
    host = torch.tensor([tokens, pairs, signalled, target_tokens(upcoming)], dtype=torch.float64)
    stats = torch.cat([collectives.local_grad_square(s.params, s.device).reshape(1), loss_sum.double().reshape(1),
                       host.to(s.device, non_blocking=True)])
    grad_square, loss, tokens, pairs, stopped, next_targets = collectives.all_reduce_sum(stats).tolist()
    if not math.isfinite(loss):
        raise TrainingDiverged(f"the loss is {loss}")
    grad_norm = math.sqrt(grad_square)
    if s.grad_clip is not None:
        for group in s.clip_groups:
            torch.nn.utils.clip_grads_with_norm_(group, s.grad_clip, torch.tensor(grad_norm), foreach=None)
    lr = s.scheduler.get_last_lr()[0]
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, lr, tokens, pairs, stopped > 0, next_targets, time.perf_counter() - start,
                      targets)


def log_attention_paths(patch_report, mlog, step: int, log) -> None:
    """After the first step: which path each attention call took (the PatchReport's counters)."""
    if patch_report is None:
        return
    log(f"attention in step {step}: {patch_report.paths_line()}")
    layers = {layer for layer, _ in patch_report.attention_calls}
    mlog.write("attention", step, paths=dict(patch_report.paths()), layers=len(layers))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def save_unless_saved(run_dir: str, step: int, s: Step, stream_state: dict, config: FinetuneConfig, env) -> str:
    """The checkpoint of `step`: the newest complete one when it is of this step, else a new one."""
    saved = ckpt.latest(run_dir)
    if saved is None or int(saved.name.split("_")[1]) != step:
        saved = ckpt.save(run_dir, step, s.model, s.optimizer, scheduler=s.scheduler, data_state=stream_state,
                          keep=config.checkpoint.keep, env=env)
    return str(saved)


# -- evaluation ----------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, tokenizer, val: Validation, *, config, device, autocast) -> dict:
    """Val loss (per target token, over the val batches of all ranks) and SQuAD EM/F1 by greedy
    generation. Every rank generates the same prompts: under FSDP2 each forward is collective, so
    all ranks must run the same number of them (so the val batches are split evenly, and
    `val.weight` 0 marks a rank that runs a batch only to keep in step); identical inputs give
    identical stops."""
    from fastft.data import generate_answers, model_inputs, squad_metrics

    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed token loss, target tokens
    one = torch.tensor(1, device=device)
    for batch in val.batches:
        batch = _to_device(batch, device)
        with autocast():
            set_real_tokens(model, batch.get("real_tokens"))
            out = model(**model_inputs(batch), num_items_in_batch=one)  # the summed token loss
        total[0] += val.weight * out.loss.double()
        total[1] += val.weight * batch["num_target_tokens"].double()
    loss_sum, tokens = collectives.all_reduce_sum(total).tolist()
    result = {"val_loss": loss_sum / tokens if tokens else None, "val_tokens": int(tokens)}
    if val.prompts:
        with autocast(), distributed.root_unsharded(model):
            answers = generate_answers(model, tokenizer, val.prompts, max_new_tokens=config.data.eval_max_new_tokens,
                                       batch_size=config.data.eval_batch_size)
        result.update(squad_metrics(answers, val.golds, unanswerable_answer=config.data.unanswerable_answer))
        result["sample"] = [(qid, answer, list(val.golds[qid])) for qid, answer in list(answers.items())[:3]]
    model.train(was_training)
    return result


def _eval_line(name: str, result: dict | None) -> str:
    if result is None:
        return f"{name}: (not evaluated)"
    line = f"{name}: val loss " + ("n/a (no val batches)" if result["val_loss"] is None else f"{result['val_loss']:.4f}")
    if "exact_match" in result:
        line += f", SQuAD EM {result['exact_match']:.1f} F1 {result['f1']:.1f} on {result['count']} questions"
    return line


def _plain(result: dict | None) -> dict | None:
    return None if result is None else {k: v for k, v in result.items() if k != "sample"}


# -- signals -------------------------------------------------------------------------------------------

class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -- the run -----------------------------------------------------------------------------------------

def finetune(config: FinetuneConfig | dict | str | None = None) -> RunResult:
    """Fine-tune as `config` says (a FinetuneConfig, a dict tree, a YAML path, or None for the
    built-in default). Launch under torchrun for several processes. Returns a RunResult."""
    config = validate(config) if isinstance(config, FinetuneConfig) else load_config(config)
    env = distributed.init(config.distributed.backend, force=bool(config.distributed.fsdp),
                           timeout_minutes=config.distributed.timeout_minutes)
    made: list[RunDir] = []
    try:
        return _run(config, env, made)
    except BaseException:
        if made and env.is_main:  # stopped before its first result: leave no empty run behind
            rundir.discard_unused(*made[0])
        raise
    finally:
        distributed.shutdown(env)


def _run(config: FinetuneConfig, env: distributed.DistEnv, made: list) -> RunResult:
    import datasets

    from fastft.data import build_train_batches

    # 1. config and processes -------------------------------------------------------------------
    c, t = config, config.train
    datasets.disable_progress_bars()  # the start-up report says what the data step did
    log = print if env.is_main and not c.logging.quiet else (lambda *a, **k: None)
    device = env.device
    plan = batch_plan(config, env.world_size)  # raises before any work on a bad global batch
    precision = decide_precision(config, env)
    made.append(prepare_run_dir(config, env))
    run_dir = made[-1].path

    # 2. tokenizer and model --------------------------------------------------------------------
    memory_plan = planning.preflight(config, env, log)  # on CUDA: the planned peak; stops here if it cannot fit
    torch.manual_seed(t.seed)  # the same random init on every rank (FSDP2 shards what each rank holds)
    tokenizer = load_tokenizer(config)
    model, patch_report, full_model = build_models(config, tokenizer, precision, env)
    qlora_report = quantization.prepare(model, quantization_settings(config, precision))  # 4-bit bases
    torch.manual_seed(t.seed + 1)  # what follows draws the same, however the model was built
    n_params = flops.matmul_parameters(model)
    layers, d_attn = flops.attention_dims(flops.text_config(model))

    # 3. data -----------------------------------------------------------------------------------
    data, packing_note = batching_for(c.data, model, patch_report)
    train_batches, data_report = build_train_batches(data, tokenizer, rank=env.rank, world_size=env.world_size)
    data_report.lines += packing_note
    if getattr(train_batches, "map_style", False) and len(train_batches) == 0:
        raise ConfigError(f"data: no training micro-batches for rank {env.rank} of {env.world_size} (the data makes "
                          f"{train_batches.stats.micro_batches}); use more data, or a smaller data.batch_size")
    val = validation_data(dataclasses.replace(config, data=data), tokenizer, env)

    # 4. parallelism, from outside the model: activation checkpointing -> compile -> FSDP2 ----------
    n_ac, ep_mesh, ep_params = parallelize(model, full_model, config, precision, env, patch_report, log)
    del full_model

    # 5. optimizer and schedule -----------------------------------------------------------------
    params, optimizer, scheduler, fused, warmup = build_optimizer(model, config, precision, device)

    # 6. resume ---------------------------------------------------------------------------------
    start_step, data_state, resumed = resume(config, run_dir, model, optimizer, scheduler, env, log)
    stream = BatchStream(train_batches, **data_state)
    startup_report(log, config, env, run_dir, plan, precision, patch_report, data_report, n_params, n_ac, fused, warmup,
                   qlora_report)

    # 7. the loop -------------------------------------------------------------------------------
    result = RunResult(steps=start_step, run_dir=run_dir, plan=plan, model=model, tokenizer=tokenizer)
    mlog = metrics.MetricsLog(run_dir, enabled=env.is_main, tensorboard=c.logging.tensorboard, append=resumed)
    mlog.write("start", start_step, plan=plan, world_size=env.world_size, n_trained=n_params[0], n_frozen=n_params[1])
    autocast = lambda: precision.autocast(device)  # noqa: E731

    def evaluate_now(step: int, name: str | None) -> dict:
        evaluation = evaluate(model, tokenizer, val, config=c, device=device, autocast=autocast)
        mlog.write("eval", step, **_plain(evaluation))
        if name is not None:
            (bar.write if bar is not None else log)(_eval_line(name, evaluation))
        return evaluation

    bar = metrics.progress_bar(t.max_steps, start_step, enabled=env.is_main and c.logging.progress_bar
                               and not c.logging.quiet)
    if t.eval_before and start_step == 0:
        result.eval_before = evaluate_now(0, "before training")
    if patch_report is not None:
        patch_report.reset_counts()  # from here on: what the training steps run
    last_step = t.max_steps if t.run_steps is None else min(t.max_steps, start_step + t.run_steps)
    split = {id(p) for p in ep_params}
    clip_groups = [g for g in ([p for p in params if id(p) not in split], [p for p in params if id(p) in split]) if g]
    step_context = Step(model, optimizer, scheduler, params, autocast, device, precision.fsdp,
                        loss_scale=float(env.world_size) if precision.fsdp else 1.0, grad_clip=c.optim.grad_clip,
                        clip_groups=clip_groups)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step, data_position = start_step, stream.state()
    micro_batches = stream.take(plan["accumulation"]) if step < last_step else []
    targets = global_target_tokens(micro_batches, device) if micro_batches else 0.0
    with StopFlag() as stop:
        while step < last_step:
            data_position = stream.state()  # after this step's micro-batches: what a checkpoint of it resumes from
            upcoming = stream.take(plan["accumulation"]) if step + 1 < last_step else []
            try:
                out = train_step(step_context, micro_batches, targets, upcoming, stop)
            except TrainingDiverged as exc:
                good = ckpt.latest(run_dir)
                raise TrainingDiverged(
                    f"step {step + 1}: {exc}; stopped before the optimizer step. "
                    + (f"The last good checkpoint is {good} (resume with --checkpoint.resume=true and a lower "
                       "optim.lr)." if good else "No checkpoint was written (set checkpoint.every to keep one).")
                ) from None
            step += 1
            result.steps = step
            result.losses.append(out.loss)
            if step == start_step + 1:
                log_attention_paths(patch_report, mlog, step, bar.write if bar is not None else log)
            if step - start_step in (1, 2):  # measured against planned (step 1 has no optimizer states before its step)
                planning.report_measured(memory_plan, device, log, step, first_step=step == 1)
            micro_batches, targets = upcoming, out.next_targets
            record = metrics.step_record(out, n_params, layers, d_attn, device, env.world_size, epoch=stream.epoch)
            if step % c.logging.log_every == 0 or step == last_step:
                mlog.write("train", step, **record)
            metrics.update_bar(bar, record)
            if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
                evaluate_now(step, f"step {step}")
            if c.checkpoint.every and step % c.checkpoint.every == 0:
                result.checkpoint = save_unless_saved(run_dir, step, step_context, data_position, config, env)
            if out.stop:
                result.status = "interrupted"
                break
    # A signal after the last step's check (during its checkpoint or evaluation, or the last step of
    # train.run_steps) still stopped an unfinished run: "interrupted", not "stopped", so that the
    # exit status says a signal ended it (fastft/cli.py). A finished run stays finished.
    if stop.signal is not None and step < t.max_steps:
        result.status = "interrupted"
    result.signal = stop.signal if result.status == "interrupted" else None
    if bar is not None:
        bar.close()

    # 8. the end --------------------------------------------------------------------------------
    if (result.status == "interrupted" or step < t.max_steps) and ep_mesh is not None:
        result.status = result.status if result.status == "interrupted" else "stopped"
        log(f"{result.status} at step {step} of {t.max_steps}: no checkpoint (split experts are not checkpointed yet)")
        mlog.write("end", step, status=result.status)
        mlog.close()
        return result
    if result.status == "interrupted" or step < t.max_steps:
        result.status = result.status if result.status == "interrupted" else "stopped"
        result.checkpoint = save_unless_saved(run_dir, step, step_context, data_position, config, env)
        log(f"{result.status} at step {step} of {t.max_steps}: checkpoint {result.checkpoint}; continue with "
            "--checkpoint.resume=true")
        mlog.write("end", step, status=result.status, checkpoint=result.checkpoint)
    else:
        if c.checkpoint.every:
            result.checkpoint = save_unless_saved(run_dir, step, step_context, data_position, config, env)
        result.eval_after = evaluate_now(step, None)  # printed by the summary
        if c.checkpoint.export:
            exported = ckpt.export(os.path.join(run_dir, "export"), model, tokenizer, env=env)
            result.export_dir = str(exported) if exported is not None else None
        if c.checkpoint.export_merged:  # the adapter merged into a bf16 model (a 4-bit base dequantized)
            merged = ckpt.export_merged(os.path.join(run_dir, "merged"), model, tokenizer, env=env)
            result.merged_dir = str(merged) if merged is not None else None
        mlog.write("end", step, status=result.status, eval_before=_plain(result.eval_before),
                   eval_after=_plain(result.eval_after), export=result.export_dir)
    mlog.close()
    if env.is_main and c.logging.plot:
        result.curves = metrics.plot_runs([run_dir], os.path.join(run_dir, "curves.png"), log=log)
    if result.status == "finished":
        _summary(log, result)
    return result


def _summary(log, result: RunResult) -> None:
    losses = result.losses
    if losses:
        k = max(1, min(10, len(losses) // 10))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        log(f"train loss: {first:.4f} (mean of the first {k} steps) -> {last:.4f} (last {k})")
    log(_eval_line("val before", result.eval_before))
    log(_eval_line("val after ", result.eval_after))
    for qid, answer, gold in (result.eval_after or {}).get("sample") or []:
        log(f"  {qid}: answered {answer!r}, gold {gold}")
    if result.curves:
        log(f"curves: {result.curves}")
    if result.export_dir:
        log(f"exported to {result.export_dir}")
    if result.merged_dir:
        log(f"merged into a bf16 model: {result.merged_dir}")
