"""QLoRA under FSDP2 (run by tests/_lora_fsdp_worker.py in the same 2 gloo processes, to share their
start-up): a tiny PEFT Llama over bitsandbytes 4-bit bases, loaded as the trainer's rank-0 load
does it (rank 0 quantizes the model; every rank builds the same structure on the meta device,
patches it, shards it, and receives the packed weights by broadcast and the quantization states
by broadcast_states). The sharded, fused model's loss and adapter gradients on both ranks'
batches equal one process's unsharded PEFT + bitsandbytes model on the same global batch, by the
tolerance rule against the float64 twin (the 4-bit values dense)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

import fastft
from fastft import distributed, quantization
from fastft.architectures import NATIVE
from numerics import ModelRun, assert_runs_within_eager, float64_twin

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
QUANT = quantization.Settings("nf4", True, torch.float32)


def _model(meta: bool):
    torch.manual_seed(0)
    config = next(a for a in NATIVE if a.name == "Llama").tiny_config(**CONFIG)
    with torch.device("meta") if meta else torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config)
    quantization.quantize_model(model, QUANT)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    if not meta:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    return model


def _batches(world: int):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 128, (2, 9), generator=g) for _ in range(world)]


def _run(model, ids_list) -> ModelRun:
    """The mean of the batches' losses, and its gradients."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for ids in ids_list:
        loss = model(input_ids=ids, labels=ids).loss / len(ids_list)
        loss.backward()
        total = total + loss.detach()
    grads = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            grads[n] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.detach().clone()
    return ModelRun(torch.as_tensor(total), grads)


def check_qlora(rank: int, world: int) -> int:
    from fastft.patching import lora as lora_patch

    full = _model(meta=False) if rank == 0 else None
    reference = _model(meta=False)  # every rank: the one-process runs, unsharded
    sharded = _model(meta=True)
    report = fastft.patch(sharded, cross_entropy=False)
    assert report.count("lora") == 16 and not report.skipped("lora"), str(report)  # 14 layers + 2 MLP blocks
    for layer in sharded.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    distributed.load_from_rank0(sharded, full, torch.device("cpu"))
    assert quantization.broadcast_states(sharded, full, torch.device("cpu")) == 14
    calls = {"n": 0}
    fused = lora_patch.lora_mlp

    def counting(*args, **kwargs):
        calls["n"] += 1
        return fused(*args, **kwargs)

    lora_patch.lora_mlp = counting
    batches = _batches(world)
    # FSDP2 averages the gradients over ranks: the mean over the ranks' batches, as one process's.
    got = _run(sharded, [batches[rank]])
    lora_patch.lora_mlp = fused
    assert calls["n"] == 2, calls  # both MLP blocks ran fused on the gathered 4-bit weights
    loss = got.loss.clone()
    dist.all_reduce(loss)
    got = ModelRun(loss / world, got.grads)
    truth_model = float64_twin(reference)
    eager, truth = _run(reference, batches), _run(truth_model, batches)
    got.grads = {n.replace("_fsdp_wrapped_module.", ""): g for n, g in got.grads.items()}
    assert_runs_within_eager(got, eager, truth, torch.float32, 4.0, context="QLoRA FSDP2: ")
    return len(got.grads)
