"""fastft.patch on PEFT models routes LoRA layers through the fused kernels: the same losses and
gradients as plain PEFT (dropout included, with the kernels' mask on both sides), the report names
what stays on PEFT, unpatch restores, adapters save in PEFT format, a short training run matches."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import fastft
from fastft.patching import lora as lora_patch
from helpers.lora import ALL_LINEAR, ARCH, FACTOR, lora_pair
from numerics import (ModelRun, assert_curves_within_eager, assert_runs_within_eager, assert_within_eager, float64_twin,
                      run_model)



def _run(model, ids, labels) -> ModelRun:
    torch.manual_seed(123)  # the same dropout masks on every side
    return run_model(model, input_ids=ids, labels=labels)




def _batch():
    ids = torch.randint(3, 128, (2, 11))
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels


@pytest.mark.parametrize("arch,dropout,mlp", [("Llama", 0.0, "lora_mlp (silu)"), ("Qwen2", 0.1, "lora_mlp (silu)"),
                                              ("Gemma", 0.0, "lora_mlp (gelu_tanh)"), ("Phi3", 0.0, None)])
def test_patched_lora_model_matches_peft(arch, dropout, mlp):
    """Every LoRA Linear fused; gated MLPs as blocks (SwiGLU, GeGLU); Qwen2's q/k/v biases; Phi3's
    fused qkv_proj and gate_up_proj layouts (per layer: the report names the MLP as kept)."""
    targets = ALL_LINEAR if arch != "Phi3" else ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    patched, plain = lora_pair(arch, targets=targets, dropout=dropout, seed_dropout=dropout > 0)
    report = fastft.patch(patched, cross_entropy=False)
    n_layers = ARCH[arch].tiny_config().num_hidden_layers
    assert sum(e.replacement == "lora_linear" for e in report.entries) == len(targets) * n_layers, str(report)
    if mlp:
        assert sum(e.replacement == mlp for e in report.entries) == n_layers, str(report)
    else:
        assert sum("gate_up" in e.reason for e in report.skipped("lora")) == n_layers, str(report)
    ids, labels = _batch()
    got, eager, truth = (_run(m, ids, labels) for m in (patched, plain, float64_twin(plain)))
    assert sum("lora_A" in n for n in got.grads) == len(targets) * n_layers
    assert_runs_within_eager(got, eager, truth, torch.float32, FACTOR)


def test_report_unpatch_and_unsupported_layers():
    model, _ = lora_pair(targets=["q_proj", "v_proj", "lm_head"])
    # one DoRA layer: mixed configurations on one model through a second adapter on o_proj
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["o_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "dora"])
    report = fastft.patch(model)
    lora = {e.module.split("model.layers.")[-1]: e for e in report.entries if e.kind == "lora"}
    assert all(e.replacement == "lora_linear" for k, e in lora.items() if k.endswith(("q_proj", "v_proj")))
    assert "DoRA" in lora["0.self_attn.o_proj"].reason
    assert "loss" in next(e for k, e in lora.items() if k.endswith("lm_head")).reason
    assert report.count("cross_entropy") == 1
    fused = [m for m in model.modules() if lora_patch.FORWARD_ATTR in m.__dict__]
    assert len(fused) == 4
    fastft.unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_disabled_or_merged_adapters_take_peft_path():
    """Each by the tolerance rule against plain PEFT (eager) and its float64 twin (truth), in the
    same state: adapters disabled (the base layers), fused, merged (PEFT's path on W + sBA),
    unmerged again (fused). The norms are fused throughout."""
    patched, plain = lora_pair(targets=["q_proj", "down_proj"])
    twin = float64_twin(plain)
    fastft.patch(patched, cross_entropy=False)
    ids, _ = _batch()
    with torch.no_grad(), patched.disable_adapter(), plain.disable_adapter(), twin.disable_adapter():
        assert_within_eager("disabled logits", patched(input_ids=ids).logits, plain(input_ids=ids).logits,
                            twin(input_ids=ids).logits, torch.float32, FACTOR)
    with torch.no_grad():
        for m in (patched, plain, twin):
            m.eval()
        eager, truth = plain(input_ids=ids).logits, twin(input_ids=ids).logits
        assert_within_eager("fused logits", patched(input_ids=ids).logits, eager, truth, torch.float32, FACTOR)
        patched.base_model.merge_adapter()
        assert_within_eager("merged logits", patched(input_ids=ids).logits, eager, truth, torch.float32, FACTOR)
        patched.base_model.unmerge_adapter()
        assert_within_eager("unmerged logits", patched(input_ids=ids).logits, eager, truth, torch.float32, FACTOR)


def test_adapter_keys_and_round_trip(tmp_path):
    patched, plain = lora_pair()
    keys_before = set(patched.state_dict())
    fastft.patch(patched)
    assert set(patched.state_dict()) == keys_before
    patched.save_pretrained(tmp_path / "fused")
    plain.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "fused" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "plain" / "adapter_model.safetensors"))
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(ARCH["Llama"].tiny_config())
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "fused").eval()
    ids, _ = _batch()
    with torch.no_grad():  # the same adapter values on the same PEFT path: exact
        torch.testing.assert_close(loaded(input_ids=ids).logits, plain.eval()(input_ids=ids).logits, rtol=0, atol=0)


def test_training_run_matches_peft():
    """Four AdamW steps, fused LoRA (and the fused loss) vs plain PEFT: the same loss curve."""
    patched, plain = lora_pair(dropout=0.05, seed_dropout=True)
    truth = float64_twin(plain)
    fastft.patch(patched)
    curves = []
    for model in (patched, plain, truth):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(5)
        batches = [_batch() for _ in range(4)]
        losses = []
        for step, (ids, labels) in enumerate(batches):
            torch.manual_seed(100 + step)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0]
    assert_curves_within_eager("losses", *curves, FACTOR)


def test_bf16_model_with_fp32_adapters():
    """PEFT's default on a bf16 model keeps the adapters in fp32: the fused layer follows PEFT."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(ARCH["Llama"].tiny_config()).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    plain = copy.deepcopy(model)
    fastft.patch(model, cross_entropy=False)
    ids, labels = _batch()
    got, eager, truth = (_run(m, ids, labels) for m in (model, plain, float64_twin(plain)))
    for name, g in got.grads.items():
        assert g.dtype == eager.grads[name].dtype == torch.float32
    assert_runs_within_eager(got, eager, truth, torch.bfloat16, FACTOR)  # the bf16 base rounds what flows through
