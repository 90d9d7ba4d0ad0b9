"""Worker for tests/test_moe_parallel.py (gloo, CPU, torchrun): a tiny Qwen3-MoE (8 experts, top-2)
patched by fastft, against the same model in one process on the whole global batch (computed here,
on every rank, from the same seed): the loss and every gradient must match, by the tolerance rule
(tests/numerics.py: eager = that one-process run, truth = its unpatched float64 twin).

    python _moe_parallel_worker.py EP [lora]
EP: the expert-parallel degree (1: no expert parallelism). The ranks split the global batch (one row
each, of different lengths: a padded batch with an attention_mask). The runs:
  1. expert parallelism alone (EP > 1): experts split over groups of EP ranks, gradients summed
     by hand (the experts' over their replicas, the dense ones over every rank);
  2. FSDP2 (fastft.distributed.apply_fsdp) with the trainer's loss convention (loss × world size,
     FSDP2 averages) and the split experts sharded over the ranks holding the same experts,
     weight_grad_scale = 1/EP (EP > 1);
  3. FSDP2 with the experts sharded with their decoder block (always).
The router aux loss is off: it is not additive over ranks (each rank's is over its own tokens).
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import fastft  # noqa: E402
from fastft import distributed  # noqa: E402
from fastft.architectures import NATIVE  # noqa: E402
from fastft.expert_parallel import apply_expert_parallel, expert_parameters, expert_units  # noqa: E402
from fastft.patching import moe as moe_patch  # noqa: E402
from numerics import ModelRun, assert_runs_within_eager, float64_twin  # noqa: E402

ONLY_MOE = dict(rms_norm=False, layer_norm=False, cross_entropy=False, attention=False)


def build(lora: bool):
    arch = next(a for a in NATIVE if a.name == "Qwen3Moe")
    torch.manual_seed(0)
    config = arch.tiny_config(num_experts=8, intermediate_size=32, output_router_logits=False)
    model = AutoModelForCausalLM.from_config(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                                                 target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    return model


def global_batch(world: int):
    g = torch.Generator().manual_seed(123)
    lengths = [5 + 3 * r for r in range(world)]
    width = max(lengths)
    ids = torch.randint(3, 128, (world, width), generator=g)
    mask = torch.zeros(world, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return ids, mask, labels, (labels[:, 1:] != -100).sum()


def trained(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def split_view(name, full, first, n, n_experts):
    if name.endswith("lora_A.default.weight"):
        r = full.shape[0] // n_experts
        return full.view(n_experts, r, -1)[first:first + n].reshape(n * r, -1)
    if name.endswith("lora_B.default.weight"):
        r = full.shape[1] // n_experts
        return full.view(full.shape[0], r, n_experts)[:, :, first:first + n].reshape(full.shape[0], -1)
    return full[first:first + n]


def check(label, got: ModelRun, eager: ModelRun, truth: ModelRun, split, first, n, n_experts):
    """`got` (this rank's experts, `n` from `first`, for the names in `split`) against the
    one-process runs, viewed the same way."""
    def view(run):
        return ModelRun(run.loss, {name: split_view(name, g, first, n, n_experts) if name in split else g
                                   for name, g in run.grads.items()})

    assert_runs_within_eager(got, view(eager), view(truth), torch.float32, context=f"{label}: ")


def fsdp_run(ep_size, lora, world, rank, forward, eager, truth, n_experts):
    model = build(lora)
    fastft.patch(model, **ONLY_MOE)
    expert_mesh = None
    if ep_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world // ep_size, ep_size), mesh_dim_names=("dp", "ep"))
        apply_expert_parallel(model, mesh["ep"].get_group(), weight_grad_scale=1.0 / ep_size)
        expert_mesh = mesh["dp"]
    split = {n for n, p in trained(model).items() if any(p is q for q in expert_parameters(model))} \
        if ep_size > 1 else set()
    distributed.apply_fsdp(model, param_dtype="float32", expert_mesh=expert_mesh,
                           expert_units=expert_units(model) if expert_mesh is not None else ())
    calls = []
    import fastft.expert_parallel as ep_module
    kernels = moe_patch.moe_experts, ep_module.moe_experts
    moe_patch.moe_experts = lambda *a, **k: calls.append(1) or kernels[0](*a, **k)
    ep_module.moe_experts = lambda *a, **k: calls.append(1) or kernels[1](*a, **k)
    try:
        loss = forward(model)
        (loss * world).backward()
    finally:
        moe_patch.moe_experts, ep_module.moe_experts = kernels
    assert len(calls) == model.config.num_hidden_layers, f"fused experts ran {len(calls)} times"
    grads = {n: p.grad.full_tensor() for n, p in trained(model).items()}
    total = loss.detach().clone()
    dist.all_reduce(total)
    n_local = n_experts // ep_size
    check("FSDP2" + (f" + expert parallel {ep_size}" if ep_size > 1 else " (experts in their block)"),
          ModelRun(total, grads), eager, truth, split, (rank % ep_size) * n_local, n_local, n_experts)


def one_process(model, ids, mask, labels, targets) -> ModelRun:
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=targets).loss
    loss.backward()
    return ModelRun(loss.detach(), {n: p.grad for n, p in trained(model).items()})


def main():
    ep_size = int(sys.argv[1])
    lora = len(sys.argv) > 2 and sys.argv[2] == "lora"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids, mask, labels, targets = global_batch(world)

    # The one-process reference (the whole batch) and its float64 twin, the truth.
    reference = build(lora)
    fastft.patch(reference, **ONLY_MOE)
    eager, truth = (one_process(m, ids, mask, labels, targets) for m in (reference, float64_twin(reference)))
    n_experts = reference.config.num_experts
    mine = slice(rank, rank + 1)

    def forward(model):
        return model(input_ids=ids[mine], attention_mask=mask[mine], labels=labels[mine], num_items_in_batch=targets).loss

    if ep_size > 1:
        # 1. expert parallelism alone: groups of ep_size consecutive ranks each hold all experts;
        # the ranks with the same place in their group ("replicas") hold the same experts.
        ep_groups = [dist.new_group(list(range(g, g + ep_size))) for g in range(0, world, ep_size)]
        replica_groups = [dist.new_group(list(range(j, world, ep_size))) for j in range(ep_size)]
        model = build(lora)
        fastft.patch(model, **ONLY_MOE)
        apply_expert_parallel(model, ep_groups[rank // ep_size])
        split = {n for n, p in trained(model).items() if any(p is q for q in expert_parameters(model))}
        assert split, "no expert parameters were split"
        loss = forward(model)
        loss.backward()
        grads = {n: p.grad for n, p in trained(model).items()}
        for n, g in grads.items():  # experts: sum over their replicas; dense: over every rank
            dist.all_reduce(g, group=replica_groups[rank % ep_size] if n in split else None)
        total = loss.detach().clone()
        dist.all_reduce(total)
        n_local = n_experts // ep_size
        check("expert parallel", ModelRun(total, grads), eager, truth, split, (rank % ep_size) * n_local, n_local,
              n_experts)

    # 2. FSDP2, the trainer's convention: with the split experts (EP > 1), and with the experts
    # sharded with their block (always).
    for ep in sorted({ep_size, 1}, reverse=True):
        fsdp_run(ep, lora, world, rank, forward, eager, truth, n_experts)
    if rank == 0:
        print(f"MOE PARALLEL OK world={world} ep={ep_size} lora={lora}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
