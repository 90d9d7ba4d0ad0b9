"""Worker for tests/test_lora_fsdp.py: a tiny PEFT Llama, decoder blocks fully_shard'ed (FSDP2,
gloo, CPU), fused LoRA vs plain PEFT: the same loss and the same LoRA gradients on every rank."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

import fastft  # noqa: E402
from numerics import ModelRun, assert_runs_within_eager, float64_twin  # noqa: E402
from helpers.lora import FACTOR, lora_pair  # noqa: E402


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from fastft.patching import lora as lora_patch

    calls = {"mlp": 0, "linear": 0}
    fused_mlp, fused_linear = lora_patch.lora_mlp, lora_patch.lora_linear

    def count(kind, fn):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapper

    lora_patch.lora_mlp, lora_patch.lora_linear = count("mlp", fused_mlp), count("linear", fused_linear)
    patched, plain = lora_pair()
    report = fastft.patch(patched, cross_entropy=False)
    assert any(e.replacement.startswith("lora_mlp") for e in report.entries)
    calls.update(mlp=0, linear=0)  # the MLP probe at patch time ran the layers once
    results = []
    truth = float64_twin(plain)  # the tolerance rule's truth (tests/numerics.py), sharded the same way
    for model in (patched, plain, truth):
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        torch.manual_seed(1 + rank)
        ids = torch.randint(3, 128, (2, 9))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        results.append(ModelRun(loss.detach(), grads))
        if model is patched:  # the fused kernels ran on the unsharded weights (no DTensor fallback)
            assert calls == {"mlp": 2, "linear": 8}, calls
    got, eager, exact = results
    assert_runs_within_eager(got, eager, exact, torch.float32, FACTOR)
    if rank == 0:
        print("FSDP2 OK", len(got.grads))
    try:  # QLoRA in the same processes (tests/_qlora_fsdp_worker.py), when bitsandbytes is installed
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:
        from _qlora_fsdp_worker import check_qlora

        n = check_qlora(rank, dist.get_world_size())
        if rank == 0:
            print("QLoRA FSDP2 OK", n)
    dist.barrier()  # no rank tears its group down while another still runs a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
