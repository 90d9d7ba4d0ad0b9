"""Structural patching reaches the remote-code architectures' module layouts (local look-alikes)."""

from __future__ import annotations

import copy

import pytest
import torch

import fastft
from numerics import assert_runs_within_eager, assert_within_eager, float64_twin, run_model
from remote_like import RemoteLikeForCausalLM

# name: (look-alike overrides, expected norm kind and casting, fused loss expected?, loss spec check)
VARIANTS = {
    "Aquila": (dict(norm="llama_rms"), ("rms_norm", "llama"), True),
    "Baichuan-7B": (dict(norm="bare_rms_epsilon", qkv_bias=False), ("rms_norm", "llama"), True),
    "Baichuan2-13B (NormHead)": (dict(norm="bare_rms_epsilon", norm_head=True), ("rms_norm", "llama"), True),
    "Baichuan2-13B (NormHead + z-loss)": (dict(norm="bare_rms_epsilon", norm_head=True, z_loss_weight=1e-3),
                                          ("rms_norm", "llama"), False),
    "ChatGLM": (dict(norm="glm_rms", seq_first=True, head_name="transformer.output_layer"), ("rms_norm", "gemma"),
                True),
    "DeciLM": (dict(norm="llama_rms", num_hidden_layers=3, attention_layers=[True, False, True]),
               ("rms_norm", "llama"), True),
    "InternLM": (dict(norm="llama_rms", qkv_bias=True), ("rms_norm", "llama"), True),
    "InternLM2": (dict(norm="llama_rms", norm_names=("attention_norm", "ffn_norm"), head_name="output"),
                  ("rms_norm", "llama"), True),
    "Jais": (dict(norm="layernorm", norm_names=("ln_1", "ln_2"), tied=True, post_head_scale=0.3),
             ("layer_norm", None), True),
    "MiniCPM 1": (dict(norm="llama_rms", tied=True, pre_head_scale=0.25), ("rms_norm", "llama"), True),
    "Orion": (dict(norm="layernorm"), ("layer_norm", None), True),
    "Phi3Small": (dict(norm="layernorm", tied=True, post_head_scale=1 / 8), ("layer_norm", None), True),
    "Solar Pro": (dict(norm="llama_rms"), ("rms_norm", "llama"), True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_remote_structure_is_patched_and_matches(name):
    overrides, (kind, casting), fused_loss = VARIANTS[name]
    model = RemoteLikeForCausalLM(**overrides)
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = fastft.patch(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "patching changed a parameter"
    # Its attention is its own code: the packed probe finds that fastft's function is never called
    # and that documents leak, so the report keeps its attention and marks it packing-unsafe.
    kept = report.skipped("attention")
    assert not report.patched("attention") and "no attention layer called the fastft function" in kept[0].reason
    assert report.packing.startswith("unsafe: ") and "gradient of document 2 reaches document 1" in report.packing
    n_norms = sum(1 for m in reference.modules() if "norm" in type(m).__name__.lower() and m is not
                  reference.get_output_embeddings())
    assert report.count(kind) == n_norms, str(report)
    if casting:
        assert all(f"casting={casting}" in e.reason for e in report.patched(kind)), str(report)
    assert report.count("cross_entropy") == int(fused_loss), str(report)
    if not fused_loss:
        assert "z-loss" in report.skipped("cross_entropy")[0].reason

    ids = torch.randint(0, 96, (2, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    norm_calls = {e.module: 0 for e in report.patched(kind)}
    for name in norm_calls:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: norm_calls.__setitem__(n, 1))
    # The loss, every gradient and (called without labels) the logits, by the tolerance rule: eager
    # = the unpatched model, truth = its float64 twin.
    got, eager, truth = (run_model(m, input_ids=ids, labels=labels, logits_inputs={"input_ids": ids})
                         for m in (model, reference, float64_twin(reference)))
    assert all(norm_calls.values()) and report.loss_calls["fused"] == int(fused_loss)  # what the report claims ran
    assert_runs_within_eager(got, eager, truth, torch.float32)


def test_bf16_casting_detected_per_module():
    """ChatGLM's norm rounds once at the end (gemma casting); Llama-style rounds x̂ first."""
    glm = fastft.patch(RemoteLikeForCausalLM(norm="glm_rms"))
    llama = fastft.patch(RemoteLikeForCausalLM(norm="llama_rms"))
    assert {e.reason for e in glm.patched("rms_norm")} == {"eps=1e-05, casting=gemma"}
    assert {e.reason for e in llama.patched("rms_norm")} == {"eps=1e-06, casting=llama"}


def test_normhead_is_fused_with_its_normalisation_and_its_weight_left_alone():
    """Baichuan 2's NormHead normalises its weight rows in place on its first eval-mode call, and
    the loss probe is an eval-mode call: patching must leave the rows as they were, fuse the
    normalisation into the loss, and give the head the gradient through the normalisation."""
    model = RemoteLikeForCausalLM(norm="bare_rms_epsilon", norm_head=True)
    model.get_output_embeddings().weight.data.mul_(3.0)  # rows far from unit length
    reference = copy.deepcopy(model)
    report = fastft.patch(model)
    head = model.get_output_embeddings()
    assert torch.equal(head.weight, reference.get_output_embeddings().weight) and head.first_flag
    assert "normalised head rows" in report.patched("cross_entropy")[0].reason
    ids = torch.randint(0, 96, (2, 10))
    name = next(n for n, p in model.named_parameters() if p is head.weight)
    got, eager, truth = (run_model(m, input_ids=ids, labels=ids).grads[name]
                         for m in (model, reference, float64_twin(reference)))
    assert_within_eager("d head", got, eager, truth, torch.float32)
