"""Patching on the meta device (the FSDP2 rank-0 load of fastft/train.py): every decision that
needs no weights is taken there, identically on every rank (norm kinds, LoRA MLP blocks probed as
random CPU copies), and what needs weights (the LM head's logit map) is checked by
fastft.patching.verify_loaded once they are in. The two-process version of this path is
tests/test_distributed.py (it is the default load there)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import fastft
import fastft.patching
from fastft.architectures import NATIVE
from numerics import assert_within_eager, float64_twin


def build(name: str, meta: bool, lora: bool):
    arch = next(a for a in NATIVE if a.name == name)
    torch.manual_seed(0)
    with torch.device("meta") if meta else torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(arch.tiny_config())
    if lora:
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    return model


def load_weights(meta_model, real_model):
    """What distributed.load_from_rank0 does for sharded models, on one process."""
    meta_model.to_empty(device="cpu")
    meta_model.load_state_dict(real_model.state_dict())
    for module_name, module in meta_model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = real_model.get_submodule(module_name)._buffers[name].clone()


@pytest.mark.parametrize("name, lora", [("Gemma2", True), ("Granite", False), ("Llama", True)])
def test_meta_patch_then_verify_matches_the_loaded_model(name, lora):
    real = build(name, meta=False, lora=lora)
    reference = build(name, meta=False, lora=lora)  # unpatched twin, the truth
    patched_real = fastft.patch(real)
    meta = build(name, meta=True, lora=lora)
    report = fastft.patch(meta)
    # Structure-changing decisions on meta equal those made with weights.
    decisions = lambda r: sorted((e.kind, e.module, e.replacement) for e in r.entries)  # noqa: E731
    assert decisions(report) == decisions(patched_real)
    assert "checked when loaded" in next(e.reason for e in report.entries if e.kind == "cross_entropy")
    # The packed probe cannot run without weights: it ran on a CPU build of the config instead.
    assert report.packing == "safe (probed on a CPU build of its config: the model is on the meta device)"
    assert report.packing_safe
    assert patched_real.packing == "safe"

    load_weights(meta, real)
    said = fastft.patching.verify_loaded(meta)
    assert said is not None and "verified" in said, said
    entry = next(e for e in meta.fastft_report.entries if e.kind == "cross_entropy")
    assert entry.replacement and entry.reason == next(
        e.reason for e in patched_real.entries if e.kind == "cross_entropy")  # e.g. softcap=..., logit_scale=...
    assert fastft.patching.verify_loaded(meta) is None  # nothing left to check

    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, truth, got, patched_loss = (m(input_ids=ids, labels=ids).loss
                                           for m in (reference, float64_twin(reference), meta, real))
    assert_within_eager("loss", got, eager, truth, torch.float32)  # the tolerance rule
    # the same decisions and weights as the model patched with its weights: the same computation
    torch.testing.assert_close(got, patched_loss, rtol=0, atol=0)
