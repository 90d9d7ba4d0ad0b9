"""LoRA on MoE experts (PEFT's target_parameters on the 3-D expert stacks) through the grouped kernel's
rank-r terms, against PEFT itself: loss and every trainable gradient (the experts' and the attention's
adapters), fp32 and bf16 under the tolerance rule (float64 truth: unpatched PEFT with eager experts);
one stack targeted or both; PEFT's own forward when adapters are disabled or merged."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import fastft
from fastft.architectures import NATIVE
from fastft.patching import moe as moe_patch
from fastft.model import eager_experts
from numerics import assert_within_eager, float64_twin

FACTOR = 4.0
ARCH = {a.name: a for a in NATIVE}
BOTH = ["experts.gate_up_proj", "experts.down_proj"]


def peft_moe(name, targets, dtype, device, rank=4):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCH[name].tiny_config(intermediate_size=32))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], target_parameters=targets,
                        init_lora_weights=False)  # random B as well, so the adapters' terms take part
    peft = get_peft_model(model, config).to(device, dtype)
    if dtype == torch.float64:
        eager_experts(peft.get_base_model())
    return peft


def _run(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


CASES = [("Qwen3Moe", BOTH, torch.float32, False), ("Qwen3Moe", BOTH, torch.bfloat16, True),
         ("Qwen2Moe", ["experts.gate_up_proj"], torch.float32, False), ("Mixtral", ["experts.down_proj"], torch.bfloat16, False)]


@pytest.mark.parametrize("name,targets,dtype", [
    pytest.param(*c[:3], id=f"{c[0]}-{'+'.join(t.split('.')[-1] for t in c[1])}-{str(c[2])[6:]}",
                 marks=pytest.mark.slow if c[3] else ()) for c in CASES])
def test_fused_expert_lora_matches_peft(name, targets, dtype, device, monkeypatch):
    truth_model = peft_moe(name, targets, torch.float64, device)
    eager_model = peft_moe(name, targets, dtype, device)
    patched = peft_moe(name, targets, dtype, device)
    before = {n: p.detach().clone() for n, p in patched.named_parameters()}
    report = fastft.patch(patched, rms_norm=False, cross_entropy=False, attention=False)
    fused = [e for e in report.patched("lora") if e.replacement == "moe_experts + LoRA"]
    assert len(fused) == patched.config.num_hidden_layers, str(report)
    assert not [e for e in report.skipped("lora") if "ParamWrapper" in e.original], str(report)
    for n, p in patched.named_parameters():  # the LoRA probe put random B in and took it out again
        assert torch.equal(p, before[n]), n
    with_lora = []
    kernel = moe_patch.moe_experts
    monkeypatch.setattr(moe_patch, "moe_experts", lambda *a, **k: with_lora.append(
        (k["gate_up_lora"] is not None, k["down_lora"] is not None)) or kernel(*a, **k))
    ids = torch.randint(3, 128, (2, 11), device=device)
    truth, eager, got = (_run(m, ids) for m in (truth_model, eager_model, patched))
    expect = ("experts.gate_up_proj" in targets, "experts.down_proj" in targets)
    assert with_lora == [expect] * patched.config.num_hidden_layers, "the rank-r terms did not go through the kernel"
    assert_within_eager("loss", got[0], eager[0], truth[0], dtype, FACTOR)
    assert set(got[1]) == set(truth[1]) and any("experts" in n for n in truth[1])
    for n in truth[1]:
        assert_within_eager(f"d {n}", got[1][n], eager[1][n], truth[1][n], dtype, FACTOR)


def test_disabled_and_merged_adapters_take_peft_path(device, monkeypatch):
    """Disabled, fused, merged: each by the tolerance rule against PEFT (eager) and its float64
    twin (truth) in the same state."""
    model = peft_moe("Qwen3Moe", BOTH, torch.float32, device)
    reference = copy.deepcopy(model)
    twin = float64_twin(reference)
    fastft.patch(model, rms_norm=False, cross_entropy=False, attention=False)
    lora_calls = []
    original = moe_patch.lora_factors
    monkeypatch.setattr(moe_patch, "lora_factors", lambda *a: lora_calls.append(1) or original(*a))
    ids = torch.randint(3, 128, (1, 9), device=device)

    def check(name):
        got, eager, truth = (m(input_ids=ids).logits for m in (model, reference, twin))
        assert_within_eager(f"{name} logits", got, eager, truth, torch.float32, FACTOR)

    with torch.no_grad():
        with model.disable_adapter(), reference.disable_adapter(), twin.disable_adapter():
            check("disabled")
        assert lora_calls  # the fused forward looked, found the adapters disabled, and ran PEFT's
        check("fused")
        for m in (model, reference, twin):
            m.merge_adapter()
        check("merged")
