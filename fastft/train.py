"""The training loop: `fastft.finetune(config)`, one readable function top to bottom.

Sections of `_run`, in order (after nanochat's scripts/base_train.py and torchtitan's train.py,
re-written). The loop is a sink: what it builds comes from the modules named here, which the
planner and the tests import too (nothing in the package imports this one but the CLI and the
package's re-export):
  1. config and processes    checked config, process group from torchrun (none for one process),
                             derived batch sizes (config.batch_plan), precision (model.py), the run
                             folder (rundir.claim: discarded again if the run fails before a result)
  2. tokenizer and model     model.py: pretrained (AutoModelForCausalLM) or built from a config with
                             random weights, 4-bit for QLoRA; LoRA (PEFT) as a model transform; then
                             fastft.patch
  3. data                    fastft.data: this rank's packed micro-batches; evaluation.py: val
                             batches, eval prompts
  4. parallelism             parallelize.py, from outside the model, in this order: experts split ->
                             activation checkpointing -> torch.compile per block -> FSDP2 per block then root
  5. optimizer, schedule     optim.py: AdamW (fused) or 8-bit AdamW (bitsandbytes), warm-up then
                             cosine/linear decay
  6. resume                  checkpoint.resume: the newest complete checkpoint (model, optimizer,
                             schedule, data, RNG); metrics.startup_report prints what was derived
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

import dataclasses
import math
import os
import signal
import time
from typing import Callable, NamedTuple

import torch

from fastft import checkpoint as ckpt
from fastft import collectives, distributed, flops, metrics, planning, quantization, rundir
from fastft.config import ConfigError, FinetuneConfig, batch_plan, load_config, validate
from fastft.data import BatchStream, build_train_batches, model_inputs, to_device
from fastft.evaluation import evaluate, recorded, validation_data
from fastft.model import Precision, batching_for, build_models, decide_precision, load_tokenizer, quantization_settings
from fastft.optim import build_optimizer
from fastft.parallelize import parallelize
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


# -- the loop: one optimizer step -----------------------------------------------------------------

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
    start = time.perf_counter()
    normalizer = torch.tensor(max(int(targets), 1), device=s.device)
    loss_sum = torch.zeros((), device=s.device)
    tokens = pairs = 0.0
    for i, batch in enumerate(micro_batches):
        if s.fsdp:  # reduce-scatter the gradients once, after the last micro-batch
            s.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        tokens += float(batch["document_lengths"].sum())  # real tokens, padding excluded (host data)
        pairs += flops.causal_pairs(batch["document_lengths"])
        batch = to_device(batch, s.device)
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
    try:
        plan = batch_plan(config, env.world_size)  # these two raise before any work, no run folder made
        precision = decide_precision(config, env)
        with rundir.claim(config, env) as run:  # a run stopped before its first result leaves nothing behind
            return _run(config, env, plan, precision, run.path)
    finally:
        distributed.shutdown(env)


def _run(config: FinetuneConfig, env: distributed.DistEnv, plan: dict, precision: Precision, run_dir: str) -> RunResult:
    import datasets

    # 1. config and processes (the derived sizes, the precision and the run folder: finetune) ----
    c, t = config, config.train
    datasets.disable_progress_bars()  # the start-up report says what the data step did
    log = print if env.is_main and not c.logging.quiet else (lambda *a, **k: None)
    device = env.device

    # 2. tokenizer and model --------------------------------------------------------------------
    memory_plan = planning.preflight(config, env, log)  # on CUDA: the planned peak; stops here if it cannot fit
    torch.manual_seed(t.seed)  # the same random init on every rank (FSDP2 shards what each rank holds)
    tokenizer = load_tokenizer(config)
    model, patch_report, full_model = build_models(config, tokenizer, precision, env)
    quant = quantization_settings(config, precision)
    qlora_report = quantization.prepare(model, quant)  # 4-bit bases
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

    # 4. parallelism, from outside the model: experts split -> checkpointing -> compile -> FSDP2 ---
    wrapped = parallelize(model, full_model, config, precision, env, patch_report, log)
    del full_model

    # 5. optimizer and schedule -----------------------------------------------------------------
    opt = build_optimizer(model, config, precision, device)

    # 6. resume ---------------------------------------------------------------------------------
    start_step, data_state, resumed = ckpt.resume(c.checkpoint, run_dir, model, opt.optimizer, opt.scheduler, env, log)
    stream = BatchStream(train_batches, **data_state)
    metrics.startup_report(log, config, env, run_dir, plan, precision, quant, patch_report, data_report, n_params,
                           wrapped.checkpointed, opt.fused, opt.warmup, qlora_report)

    # 7. the loop -------------------------------------------------------------------------------
    result = RunResult(steps=start_step, run_dir=run_dir, plan=plan, model=model, tokenizer=tokenizer)
    mlog = metrics.MetricsLog(run_dir, enabled=env.is_main, tensorboard=c.logging.tensorboard, append=resumed)
    mlog.write("start", start_step, plan=plan, world_size=env.world_size, n_trained=n_params[0], n_frozen=n_params[1])
    autocast = lambda: precision.autocast(device)  # noqa: E731

    def evaluate_now(step: int, name: str | None) -> dict:
        evaluation = evaluate(model, tokenizer, val, config=c, device=device, autocast=autocast)
        mlog.write("eval", step, **recorded(evaluation))
        if name is not None:
            (bar.write if bar is not None else log)(metrics.eval_line(name, evaluation))
        return evaluation

    def checkpoint_now(step: int, data_position: dict) -> str:
        return ckpt.save_unless_saved(run_dir, step, model, opt.optimizer, scheduler=opt.scheduler,
                                      data_state=data_position, keep=c.checkpoint.keep, env=env)

    bar = metrics.progress_bar(t.max_steps, start_step, enabled=env.is_main and c.logging.progress_bar
                               and not c.logging.quiet)
    if t.eval_before and start_step == 0:
        result.eval_before = evaluate_now(0, "before training")
    if patch_report is not None:
        patch_report.reset_counts()  # from here on: what the training steps run
    last_step = t.max_steps if t.run_steps is None else min(t.max_steps, start_step + t.run_steps)
    step_context = Step(model, opt.optimizer, opt.scheduler, opt.params, autocast, device, precision.fsdp,
                        loss_scale=float(env.world_size) if precision.fsdp else 1.0, grad_clip=c.optim.grad_clip,
                        clip_groups=wrapped.clip_groups)
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
                metrics.log_attention_paths(patch_report, mlog, step, bar.write if bar is not None else log)
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
                result.checkpoint = checkpoint_now(step, data_position)
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
    if (result.status == "interrupted" or step < t.max_steps) and wrapped.expert_mesh is not None:
        result.status = result.status if result.status == "interrupted" else "stopped"
        log(f"{result.status} at step {step} of {t.max_steps}: no checkpoint (split experts are not checkpointed yet)")
        mlog.write("end", step, status=result.status)
        mlog.close()
        return result
    if result.status == "interrupted" or step < t.max_steps:
        result.status = result.status if result.status == "interrupted" else "stopped"
        result.checkpoint = checkpoint_now(step, data_position)
        log(f"{result.status} at step {step} of {t.max_steps}: checkpoint {result.checkpoint}; continue with "
            "--checkpoint.resume=true")
        mlog.write("end", step, status=result.status, checkpoint=result.checkpoint)
    else:
        if c.checkpoint.every:
            result.checkpoint = checkpoint_now(step, data_position)
        result.eval_after = evaluate_now(step, None)  # printed by the summary
        if c.checkpoint.export:
            exported = ckpt.export(os.path.join(run_dir, "export"), model, tokenizer, env=env)
            result.export_dir = str(exported) if exported is not None else None
        if c.checkpoint.export_merged:  # the adapter merged into a bf16 model (a 4-bit base dequantized)
            merged = ckpt.export_merged(os.path.join(run_dir, "merged"), model, tokenizer, env=env)
            result.merged_dir = str(merged) if merged is not None else None
        mlog.write("end", step, status=result.status, eval_before=recorded(result.eval_before),
                   eval_after=recorded(result.eval_after), export=result.export_dir)
    mlog.close()
    if env.is_main and c.logging.plot:
        result.curves = metrics.plot_runs([run_dir], os.path.join(run_dir, "curves.png"), log=log)
    if result.status == "finished":
        metrics.summary(log, result)
    return result
