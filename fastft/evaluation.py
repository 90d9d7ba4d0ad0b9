"""Evaluation: the validation micro-batches of a run (dealt to the ranks so that the val loss does
not depend on their number) and SQuAD's exact match / F1 by greedy generation."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from fastft import collectives, distributed
from fastft.config import FinetuneConfig
from fastft.data import build_eval_prompts, build_train_batches, generate_answers, model_inputs, squad_metrics, to_device
from fastft.patching.moe import set_real_tokens


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


@torch.no_grad()
def evaluate(model, tokenizer, val: Validation, *, config, device, autocast) -> dict:
    """Val loss (per target token, over the val batches of all ranks) and SQuAD EM/F1 by greedy
    generation. Every rank generates the same prompts: under FSDP2 each forward is collective, so
    all ranks must run the same number of them (so the val batches are split evenly, and
    `val.weight` 0 marks a rank that runs a batch only to keep in step); identical inputs give
    identical stops."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed token loss, target tokens
    one = torch.tensor(1, device=device)
    for batch in val.batches:
        batch = to_device(batch, device)
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


def recorded(result: dict | None) -> dict | None:
    """An evaluation as the metrics log records it: without its sample answers."""
    return None if result is None else {k: v for k, v in result.items() if k != "sample"}
