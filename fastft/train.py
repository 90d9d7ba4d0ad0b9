"""The training loop: `fastft.finetune(config)`, one readable function top to bottom.

Sections, in order (after nanochat's scripts/base_train.py and torchtitan's train.py, re-written):
  1. config and processes    checked config, process group from torchrun (none for one process),
                             derived batch sizes (micro-batch x accumulation x ranks), printed
  2. tokenizer and model     pretrained (AutoModelForCausalLM) or built from a config with random
                             weights; LoRA (PEFT) as a model transform; then fastft.patch
  3. data                    fastft.data: this rank's packed micro-batches; val batches; eval prompts
  4. parallelism             from outside the model, in this order: activation checkpointing ->
                             torch.compile per block -> FSDP2 per block then root
  5. optimizer, schedule     AdamW (fused), warm-up then cosine/linear decay
  6. resume                  the newest complete checkpoint (model, optimizer, schedule, data, RNG)
  7. the loop                micro-batches -> loss / global target tokens -> backward -> clip ->
                             step; metrics, evaluation, checkpoints, faults
  8. the end                 evaluation, export (HF folder or PEFT adapter), summary

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time

import torch

from fastft import checkpoint as ckpt
from fastft import distributed, flops, metrics, planning, rundir
from fastft.config import ConfigError, FinetuneConfig, load_config, to_yaml, validate
from fastft.patching.moe import set_real_tokens


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the run stopped without writing a checkpoint of that state."""


@dataclasses.dataclass
class RunResult:
    status: str = "finished"  # "finished", "stopped" (train.run_steps reached), "interrupted" (signal)
    steps: int = 0  # optimizer steps done, in total (resumed ones included)
    losses: list[float] = dataclasses.field(default_factory=list)  # train loss of each step run here
    eval_before: dict | None = None  # {"val_loss", "exact_match", "f1", ...}
    eval_after: dict | None = None
    export_dir: str | None = None
    checkpoint: str | None = None  # the newest complete checkpoint
    run_dir: str = ""
    plan: dict = dataclasses.field(default_factory=dict)  # the derived batch sizes
    model: object = dataclasses.field(default=None, repr=False)  # the trained model (FSDP2-sharded under torchrun)
    tokenizer: object = dataclasses.field(default=None, repr=False)


# -- derived sizes -------------------------------------------------------------------------------

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

    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


# -- model and tokenizer -------------------------------------------------------------------------

def load_tokenizer(config: FinetuneConfig):
    from fastft.data import byte_level_tokenizer

    m = config.model
    source = m.tokenizer or (m.name if m.name is not None else "byte")
    if source == "byte":
        return byte_level_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=m.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(config: FinetuneConfig, tokenizer, dtype: torch.dtype, *, meta: bool = False, patch: bool = True):
    """The transformers model (pretrained or random), LoRA applied, fastft-patched. meta=True
    builds the same structure on the meta device (no weights: the FSDP2 rank-0 load)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = config.model
    kwargs = {"dtype": dtype, "trust_remote_code": m.trust_remote_code}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.name is not None and not meta:
        model = AutoModelForCausalLM.from_pretrained(m.name, **kwargs)
    else:
        if m.name is not None:
            hf_config = AutoConfig.from_pretrained(m.name, trust_remote_code=m.trust_remote_code)
        else:
            fields = dict(m.config)
            model_type = fields.pop("model_type")
            fields.setdefault("vocab_size", len(tokenizer))
            if fields["vocab_size"] < len(tokenizer):
                raise ConfigError(f"model.config.vocab_size={fields['vocab_size']} is smaller than the tokenizer "
                                  f"({len(tokenizer)} tokens); leave it out to use the tokenizer's size")
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                fields.setdefault(name, getattr(tokenizer, name))
            hf_config = AutoConfig.for_model(model_type, **fields)
        with torch.device("meta") if meta else contextlib.nullcontext():
            # A float64 reference run starts from the same random weights as a float32 one.
            init = {**kwargs, "dtype": torch.float32} if dtype == torch.float64 else kwargs
            model = AutoModelForCausalLM.from_config(hf_config, **init).to(dtype)
        if m.name is not None:  # what from_pretrained would also read: eos ids etc. for generation and export
            from transformers import GenerationConfig

            with contextlib.suppress(OSError):
                model.generation_config = GenerationConfig.from_pretrained(m.name)
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


# -- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, tokenizer, val_batches, prompts, golds, *, config, device, autocast, weight=1.0) -> dict:
    """Val loss (per target token, over the val batches of all ranks) and SQuAD EM/F1 by greedy
    generation. Every rank generates the same prompts: under FSDP2 each forward is collective, so
    all ranks must run the same number of them (so the val batches are split evenly, and `weight`
    0 marks a rank that runs a batch only to keep in step); identical inputs give identical stops."""
    from fastft.data import generate_answers, model_inputs, squad_metrics

    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed token loss, target tokens
    one = torch.tensor(1, device=device)
    for batch in val_batches:
        batch = _to_device(batch, device)
        with autocast():
            set_real_tokens(model, batch.get("real_tokens"))
            out = model(**model_inputs(batch), num_items_in_batch=one)  # the summed token loss
        total[0] += weight * out.loss.double()
        total[1] += weight * batch["num_target_tokens"].double()
    distributed.all_reduce_sum(total)
    tokens = int(total[1].item())
    result = {"val_loss": (total[0] / tokens).item() if tokens else None, "val_tokens": tokens}
    if prompts:
        with autocast(), distributed.root_unsharded(model):
            answers = generate_answers(model, tokenizer, prompts, max_new_tokens=config.data.eval_max_new_tokens,
                                       batch_size=config.data.eval_batch_size)
        result.update(squad_metrics(answers, golds, unanswerable_answer=config.data.unanswerable_answer))
        result["sample"] = [(qid, answer, list(golds[qid])) for qid, answer in list(answers.items())[:3]]
    model.train(was_training)
    return result


def _eval_line(name: str, result: dict | None) -> str:
    if result is None:
        return f"{name}: (not evaluated)"
    line = f"{name}: val loss " + ("n/a (no val batches)" if result["val_loss"] is None else f"{result['val_loss']:.4f}")
    if "exact_match" in result:
        line += f", SQuAD EM {result['exact_match']:.1f} F1 {result['f1']:.1f} on {result['count']} questions"
    return line


# -- signals -------------------------------------------------------------------------------------

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


# -- the run -------------------------------------------------------------------------------------

def finetune(config: FinetuneConfig | dict | str | None = None) -> RunResult:
    """Fine-tune as `config` says (a FinetuneConfig, a dict tree, a YAML path, or None for the
    built-in default). Launch under torchrun for several processes. Returns a RunResult."""
    # 1. config and processes -------------------------------------------------------------------
    if isinstance(config, FinetuneConfig):
        validate(config)
    else:
        config = load_config(config)
    env = distributed.init(config.distributed.backend, force=bool(config.distributed.fsdp),
                           timeout_minutes=config.distributed.timeout_minutes)
    try:
        return _run(config, env)
    finally:
        distributed.shutdown(env)


def _run(config: FinetuneConfig, env: distributed.DistEnv) -> RunResult:
    import datasets

    from fastft.data import build_eval_prompts, build_train_batches, model_inputs

    c, t, o, d = config, config.train, config.optim, config.distributed
    warmup = o.warmup_steps if o.warmup_steps is not None else round(0.05 * t.max_steps)
    datasets.disable_progress_bars()  # the start-up report says what the data step did
    log = print if env.is_main and not c.logging.quiet else (lambda *a, **k: None)
    device = env.device
    cuda = device.type == "cuda"
    plan = batch_plan(config, env.world_size)  # raises before any work on a bad global batch
    use_fsdp = bool(d.fsdp) or (d.fsdp is None and env.world_size > 1)
    if not use_fsdp and (d.cpu_offload or not d.reshard_after_forward):
        raise ConfigError("distributed.cpu_offload / reshard_after_forward need FSDP2: run several processes "
                          "under torchrun, or set distributed.fsdp=true")
    bf16 = t.precision == "bf16" or (t.precision == "auto" and cuda)
    param_dtype = d.param_dtype if d.param_dtype != "auto" else ("bfloat16" if bf16 else "float32")
    # Weights: fp32 masters for trained weights; frozen LoRA bases in bf16 on one GPU (no FSDP).
    if c.model.dtype != "auto":
        weight_dtype = _DTYPES[c.model.dtype]
    else:
        weight_dtype = torch.bfloat16 if (c.lora.enabled and bf16 and not use_fsdp) else torch.float32
    autocast_on = bf16 and not use_fsdp  # FSDP2's MixedPrecisionPolicy casts instead
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast_on else contextlib.nullcontext
    run_dir = rundir.prepare(config, env)  # never another run's folder, unless resuming or told to overwrite
    if env.is_main:
        resumed = bool(c.checkpoint.resume or c.checkpoint.resume_from)
        name = "config.resume.yaml" if resumed and os.path.exists(os.path.join(run_dir, "config.yaml")) else "config.yaml"
        with open(os.path.join(run_dir, name), "w", encoding="utf-8") as f:
            f.write(to_yaml(config))

    # 2. tokenizer and model --------------------------------------------------------------------
    memory_plan = planning.preflight(config, env, log)  # on CUDA: the planned peak; stops here if it cannot fit
    torch.manual_seed(t.seed)  # the same random init on every rank (FSDP2 shards what each rank holds)
    tokenizer = load_tokenizer(config)
    rank0_load = use_fsdp and env.world_size > 1 and d.load == "rank0"
    full_model = None
    if rank0_load:  # the full weights on rank 0's CPU only; every rank builds and patches on meta
        if env.is_main:
            full_model, _ = build_model(config, tokenizer, weight_dtype, patch=False)
        try:
            model, patch_report = build_model(config, tokenizer, weight_dtype, meta=True)
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"distributed.load=rank0: this model cannot be built on the meta device "
                              f"({type(exc).__name__}: {str(exc)[:200]}); use --distributed.load=every_rank "
                              "(each rank then loads the whole model before sharding)") from exc
    else:
        model, patch_report = build_model(config, tokenizer, weight_dtype)
    torch.manual_seed(t.seed + 1)  # what follows draws the same, however the model was built
    n_trained, n_frozen = flops.matmul_parameters(model)
    layers, d_attn = flops.attention_dims(flops.text_config(model))

    # 3. data -----------------------------------------------------------------------------------
    train_batches, data_report = build_train_batches(c.data, tokenizer, rank=env.rank, world_size=env.world_size)
    eval_data = dataclasses.replace(c.data, source=c.data.eval_source or c.data.source,
                                    train_split=c.data.eval_split, streaming=False)
    # The first eval_batches micro-batches of the one-process plan (rounded up to a multiple of the
    # world size: under FSDP2 every rank must run as many forwards), dealt to the ranks: the val
    # loss does not depend on the number of processes.
    val_source, _ = build_train_batches(eval_data, tokenizer, rank=0, world_size=1)
    n_val = -(-t.eval_batches // env.world_size) * env.world_size
    val_all = [b for _, b in zip(range(n_val), val_source)]
    usable = len(val_all) - len(val_all) % env.world_size
    if val_all and usable == 0:  # fewer val batches than ranks: all run the first, rank 0 counts it
        val_batches, val_weight = val_all[:1], 1.0 if env.is_main else 0.0
    else:
        val_batches, val_weight = val_all[:usable][env.rank :: env.world_size], 1.0
    if getattr(train_batches, "map_style", False) and len(train_batches) == 0:
        raise ConfigError(f"data: no training micro-batches for rank {env.rank} of {env.world_size} (the data makes "
                          f"{train_batches.stats.micro_batches}); use more data, or a smaller data.batch_size")
    prompts, golds = [], {}
    if t.eval_generate:
        prompts, golds = build_eval_prompts(dataclasses.replace(c.data, eval_examples=t.eval_generate), tokenizer)

    # 4. parallelism, from outside the model: experts split -> activation checkpointing -> compile -> FSDP2
    if not (use_fsdp and d.cpu_offload) and not rank0_load:
        model.to(device)
    ep_mesh = _apply_expert_parallel(model, d.expert_parallel, env, log)
    n_ac = distributed.apply_activation_checkpointing(model, d.activation_checkpointing, d.checkpoint_every)
    if d.compile:
        distributed.apply_compile(model)
    if use_fsdp:
        distributed.apply_fsdp(model, param_dtype=param_dtype, reduce_dtype=d.reduce_dtype,
                               reshard_after_forward=d.reshard_after_forward, cpu_offload=d.cpu_offload,
                               expert_mesh=ep_mesh["dp"] if ep_mesh is not None else None)
    ep_params = _expert_parameters(model) if ep_mesh is not None else []  # FSDP2's, so after fully_shard
    if rank0_load:
        distributed.load_from_rank0(model, full_model, device, cpu_offload=d.cpu_offload)
        del full_model
        if patch_report is not None:  # what only a forward with weights can check (the loss's logit map)
            import fastft.patching

            with distributed.root_unsharded(model):
                verified = fastft.patching.verify_loaded(model)
            if verified:
                log(f"patch, with the weights loaded: {verified}")
    model.train()

    # 5. optimizer and schedule -----------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in params if p.ndim < 2]
    fused = o.fused if o.fused is not None else (cuda or not use_fsdp)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, warmup=warmup, total=t.max_steps, schedule=o.schedule, min_ratio=o.min_lr_ratio))

    # 6. resume ---------------------------------------------------------------------------------
    start_step, data_state = 0, {"epoch": 0, "consumed": 0}
    resume_path = c.checkpoint.resume_from or (ckpt.latest(run_dir) if c.checkpoint.resume else None)
    if c.checkpoint.resume and resume_path is None:
        log(f"resume: no complete checkpoint in {ckpt.checkpoint_dir(run_dir)}; starting from step 0")
    if resume_path is not None:
        state = ckpt.load(resume_path, model, optimizer, scheduler=scheduler, env=env)
        start_step = state["step"]
        if state["world_size"] == env.world_size:
            data_state = state["data"]
        log(f"resume: {resume_path} (step {start_step})")
    stream = BatchStream(train_batches, **data_state)

    # The start-up report: everything derived, printed once.
    log(f"fastft train: {env.world_size} process(es) on {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
        + f"; run folder {run_dir}")
    kernels = ("compiled Triton kernels" if cuda else "Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1"
               else "kernels' torch reference fallback (set TRITON_INTERPRET=1 for the Triton kernels)")
    log(f"model: {c.model.name or 'random init from config ' + str(c.model.config.get('model_type'))}, "
        f"{n_trained + n_frozen:,.0f} matmul params ({n_trained:,.0f} trained)"
        + (f", LoRA r={c.lora.r}" if c.lora.enabled else ", full fine-tuning")
        + (f"; patched: {len(patch_report.patched())} modules, {kernels}" if patch_report is not None else "; not patched"))
    for line in data_report.lines:
        log(line)
    log(f"batch: micro-batch {plan['micro_batch_rows']} rows ({plan['micro_batch_tokens']} tokens) x accumulation "
        f"{plan['accumulation']} x {env.world_size} rank(s) = {plan['global_batch_rows']} rows / "
        f"{plan['global_batch_tokens']} tokens per optimizer step; {t.max_steps} steps")
    log(f"precision: weights {str(weight_dtype).removeprefix('torch.')}, "
        + (f"FSDP2 params {param_dtype} / reduce {d.reduce_dtype}, reshard_after_forward={d.reshard_after_forward}"
           f", cpu_offload={d.cpu_offload}" if use_fsdp else ("bf16 autocast" if autocast_on else "no autocast"))
        + f"; activation checkpointing: {d.activation_checkpointing} ({n_ac} blocks); compile: {d.compile}")
    peak = flops.peak_flops(device)
    log(f"optimizer: AdamW lr {o.lr} (fused={fused}), warm-up {warmup} steps then {o.schedule} to "
        f"{o.min_lr_ratio}x, clip {o.grad_clip}; MFU peak: "
        + (f"{peak / 1e12:.0f} TFLOP/s per device" if peak else "n/a on this device"))

    # 7. the loop -------------------------------------------------------------------------------
    result = RunResult(steps=start_step, run_dir=run_dir, plan=plan, model=model, tokenizer=tokenizer)
    mlog = metrics.MetricsLog(run_dir, enabled=env.is_main, tensorboard=c.logging.tensorboard,
                              append=resume_path is not None)
    mlog.write("start", start_step, plan=plan, world_size=env.world_size, n_trained=n_trained, n_frozen=n_frozen)
    evaluate_now = lambda: evaluate(model, tokenizer, val_batches, prompts, golds, config=c, device=device,  # noqa: E731
                                    autocast=autocast, weight=val_weight)
    if t.eval_before and start_step == 0:
        result.eval_before = evaluate_now()
        mlog.write("eval", 0, **{k: v for k, v in result.eval_before.items() if k != "sample"})
        log(_eval_line("before training", result.eval_before))
    bar = None
    if env.is_main and c.logging.progress_bar and not c.logging.quiet:
        from tqdm import tqdm

        bar = tqdm(total=t.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
    last_step = t.max_steps if t.run_steps is None else min(t.max_steps, start_step + t.run_steps)
    step = start_step
    loss_scale = float(env.world_size) if use_fsdp else 1.0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with StopFlag() as stop:
        while step < last_step:
            step_start = time.perf_counter()
            micro_batches = [next(stream) for _ in range(plan["accumulation"])]
            # The step's global number of target tokens: every micro-batch loss is divided by it.
            targets = torch.stack([b["num_target_tokens"] for b in micro_batches]).sum().to(device)
            targets = distributed.all_reduce_sum(targets).clamp(min=1)
            loss_sum = torch.zeros((), device=device)
            pairs = tokens = 0.0
            for i, batch in enumerate(micro_batches):
                if use_fsdp:  # reduce-scatter the gradients once, after the last micro-batch
                    model.set_requires_gradient_sync(i == len(micro_batches) - 1)
                tokens += float(batch["document_lengths"].sum())  # real tokens, padding excluded
                pairs += flops.causal_pairs(batch["document_lengths"])
                batch = _to_device(batch, device)
                set_real_tokens(model, batch.get("real_tokens"))  # MoE: packed tails skip the experts
                with autocast():
                    out = model(**model_inputs(batch), num_items_in_batch=targets)
                (out.loss * loss_scale).backward()  # loss_scale = W under FSDP2 (see the module docstring)
                loss_sum += out.loss.detach().float()
            loss = distributed.all_reduce_sum(loss_sum).item()
            if not math.isfinite(loss):
                good = ckpt.latest(run_dir)
                raise TrainingDiverged(
                    f"step {step + 1}: the loss is {loss}; stopped before the optimizer step. "
                    + (f"The last good checkpoint is {good} (resume with --checkpoint.resume=true and a lower "
                       "optim.lr)." if good else "No checkpoint was written (set checkpoint.every to keep one)."))
            grad_norm = distributed.clip_grad_norm_(params, o.grad_clip, ep_params,
                                                    ep_mesh["ep"].get_group() if ep_mesh is not None else None).item()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            result.steps = step
            result.losses.append(loss)
            if step - start_step in (1, 2):  # measured against planned (step 1 has no optimizer states before its step)
                planning.report_measured(memory_plan, device, log, step, first_step=step == 1)

            # Metrics: global tokens over the step's wall time (includes the loss sync above).
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - step_start
            counts = distributed.all_reduce_sum(torch.tensor([tokens, pairs], dtype=torch.float64, device=device))
            work = flops.step_flops(n_trained, n_frozen, counts[0].item(), layers, d_attn, counts[1].item())
            mfu = flops.mfu(work["flops"], seconds, device, env.world_size)
            memory, memory_kind = metrics.peak_memory_gib(device)
            record = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": counts[0].item() / seconds,
                      "mfu": mfu, "mfu_6n": flops.mfu(work["flops_6n"], seconds, device, env.world_size),
                      "step_s": seconds, "peak_memory_gib": memory, "memory_kind": memory_kind,
                      "target_tokens": int(targets.item()), "epoch": stream.epoch}
            if step % c.logging.log_every == 0 or step == last_step:
                mlog.write("train", step, **record)
            if bar is not None:
                bar.set_postfix_str(f"loss {loss:.3f} lr {lr:.1e} gnorm {grad_norm:.2f} "
                                    f"tok/s {record['tokens_per_s']:,.0f} MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} "
                                    f"mem {memory:.2f}GiB", refresh=False)
                bar.update(1)

            if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
                evaluation = evaluate_now()
                mlog.write("eval", step, **{k: v for k, v in evaluation.items() if k != "sample"})
                (bar.write if bar is not None else log)(_eval_line(f"step {step}", evaluation))
            if c.checkpoint.every and step % c.checkpoint.every == 0:
                result.checkpoint = str(ckpt.save(run_dir, step, model, optimizer, scheduler=scheduler,
                                                  data_state=stream.state(), keep=c.checkpoint.keep, env=env))
            signalled = torch.tensor(0 if stop.signal is None else 1, device=device)
            if distributed.all_reduce_max(signalled).item():
                result.status = "interrupted"
                break
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
        saved = ckpt.latest(run_dir)
        if saved is None or int(saved.name.split("_")[1]) != step:
            saved = ckpt.save(run_dir, step, model, optimizer, scheduler=scheduler, data_state=stream.state(),
                              keep=c.checkpoint.keep, env=env)
        result.checkpoint = str(saved)
        log(f"{result.status} at step {step} of {t.max_steps}: checkpoint {saved}; continue with "
            "--checkpoint.resume=true")
        mlog.write("end", step, status=result.status, checkpoint=str(saved))
        mlog.close()
        return result
    if c.checkpoint.every and (result.checkpoint is None or not result.checkpoint.endswith(f"{step:08d}")):
        result.checkpoint = str(ckpt.save(run_dir, step, model, optimizer, scheduler=scheduler,
                                          data_state=stream.state(), keep=c.checkpoint.keep, env=env))
    result.eval_after = evaluate_now()
    mlog.write("eval", step, **{k: v for k, v in result.eval_after.items() if k != "sample"})
    if c.checkpoint.export:
        out = ckpt.export(os.path.join(run_dir, "export"), model, tokenizer, env=env)
        result.export_dir = str(out) if out is not None else None
    mlog.write("end", step, status=result.status, eval_before=_plain(result.eval_before),
               eval_after=_plain(result.eval_after), export=result.export_dir)
    mlog.close()
    _summary(log, result)
    return result


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


def _plain(result: dict | None) -> dict | None:
    return None if result is None else {k: v for k, v in result.items() if k != "sample"}


def _summary(log, result: RunResult) -> None:
    losses = result.losses
    if losses:
        k = max(1, min(10, len(losses) // 10))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        log(f"train loss: {first:.4f} (mean of the first {k} steps) -> {last:.4f} (last {k})")
    log(_eval_line("val before", result.eval_before))
    log(_eval_line("val after ", result.eval_after))
    after = result.eval_after or {}
    if "exact_match" in after:
        if after["exact_match"] == 0.0:
            log("EM is 0: no answer matched a gold span exactly (F1 counts partial word overlaps). A tiny model "
                "trained from scratch for a few hundred steps learns the answer format before it learns to copy "
                "the span; longer runs or a pretrained model do better.")
        for qid, answer, gold in after.get("sample") or []:
            log(f"  {qid}: answered {answer!r}, gold {gold}")
    if result.export_dir:
        log(f"exported to {result.export_dir}")
