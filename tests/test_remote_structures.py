"""Structural patching reaches the remote-code architectures' module layouts (local look-alikes)."""

from __future__ import annotations

import copy

import pytest
import torch

import fastft
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
    report = fastft.patch(model)
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
    out, ref = model(input_ids=ids, labels=labels), reference(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    ref_grads = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[pname].grad, rtol=1e-4, atol=1e-6, msg=pname)
    # without labels, logits exactly as before
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_bf16_casting_detected_per_module():
    """ChatGLM's norm rounds once at the end (gemma casting); Llama-style rounds x̂ first."""
    glm = fastft.patch(RemoteLikeForCausalLM(norm="glm_rms"))
    llama = fastft.patch(RemoteLikeForCausalLM(norm="llama_rms"))
    assert {e.reason for e in glm.patched("rms_norm")} == {"eps=1e-05, casting=gemma"}
    assert {e.reason for e in llama.patched("rms_norm")} == {"eps=1e-06, casting=llama"}
