"""fastft.patch on PEFT models: LoRA layers keep working, and a LoRA adapter on the LM head is
included in the fused loss (its delta and its gradients), unlike a loss on the base head alone."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import fastft
from fastft.architectures import NATIVE
from numerics import ModelRun, assert_runs_within_eager, float64_twin, run_model

LLAMA = next(a for a in NATIVE if a.name == "Llama")


def _peft_pair(targets, dropout=0.0, **lora):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LLAMA.tiny_config())
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, **lora))
    with torch.no_grad():  # non-zero B, as after some training, so the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model, copy.deepcopy(model)


def _run(model, ids, labels, seed=0) -> ModelRun:
    torch.manual_seed(seed)  # the same dropout masks on every side
    return run_model(model, input_ids=ids, labels=labels)


FACTOR = 4.0  # model-level errors compound over layers (as in the architecture matrix)


@pytest.mark.parametrize("targets,dropout", [(["q_proj", "v_proj"], 0.0), (["q_proj", "lm_head"], 0.0),
                                             (["v_proj", "lm_head"], 0.3)],
                         ids=["attention-lora", "lm-head-lora", "lm-head-lora-dropout"])
def test_patched_peft_model_matches_peft(targets, dropout):
    patched, plain = _peft_pair(targets, dropout)
    # With dropout, the fused LoRA layers draw their own (seeded, exact) masks, not nn.Dropout's:
    # keep them on PEFT here so that both sides draw the same masks; this test is about the loss.
    report = fastft.patch(patched, lora=dropout == 0)
    assert report.count("cross_entropy") == 1 and report.count("rms_norm") == 5, str(report)
    patched.train()
    plain.train()
    ids = torch.randint(3, 128, (2, 12))
    labels = ids.clone()
    labels[:, :3] = -100
    got, eager, truth = (_run(m, ids, labels) for m in (patched, plain, float64_twin(plain)))
    assert any("lora_A" in n for n in got.grads)
    assert_runs_within_eager(got, eager, truth, torch.float32, FACTOR)
    ref_loss = eager.loss
    if "lm_head" in targets:  # the adapter's delta is in the loss: without it the loss differs
        with patched.disable_adapter():
            torch.manual_seed(0)
            assert not torch.allclose(patched(input_ids=ids, labels=labels).loss, ref_loss)


def test_unsupported_head_adapters_stay_on_peft_and_are_named():
    model, _ = _peft_pair(["q_proj", "lm_head"], use_dora=True)
    report = fastft.patch(model)
    assert report.count("cross_entropy") == 0
    assert "DoRA" in report.skipped("cross_entropy")[0].reason


def test_adapter_saved_from_patched_model_loads_on_unpatched(tmp_path):
    patched, plain = _peft_pair(["q_proj", "v_proj", "lm_head"])
    fastft.patch(patched)
    patched.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(LLAMA.tiny_config())  # same init seed as _peft_pair's base
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    ids = torch.randint(3, 128, (1, 9))
    # the same adapter values on the same PEFT path (patching never changes a parameter): exact
    torch.testing.assert_close(loaded(input_ids=ids).logits, plain.eval()(input_ids=ids).logits, rtol=0, atol=0)
