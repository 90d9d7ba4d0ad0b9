"""The architecture matrix: every native seed architecture, patched vs unpatched (DESIGN level 2).

A tiny random model (2 layers) is built from the registry's config; the truth is the unpatched
model in float64; "eager" is the unpatched model in the test dtype; the patched model must be
within FACTOR x eager's error (tests/numerics.py) on the loss, the logits (called without labels)
and every parameter gradient. Model-level errors compound over layers, so the factor here is 4.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastft
from fastft.architectures import NATIVE
from numerics import assert_within_eager

FACTOR = 4.0
SEQ = 12


def _batch(device):
    ids = torch.randint(3, 128, (2, SEQ), device=device)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt with no loss
    return ids, labels


def _run(model, ids, labels):
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return out.loss.detach(), logits, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", NATIVE, ids=lambda a: a.name.replace(" ", "_"))
def test_patched_matches_unpatched(arch, dtype, device):
    config = arch.tiny_config()
    base = AutoModelForCausalLM.from_config(config).eval()
    truth_model = copy.deepcopy(base).to(device, torch.float64)
    experts = getattr(truth_model, "get_experts_implementation", lambda: None)()
    if experts not in (None, "eager"):
        truth_model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    eager_model = copy.deepcopy(base).to(device, dtype)
    patched = copy.deepcopy(base).to(device, dtype)
    report = fastft.patch(patched)
    assert report.count("cross_entropy") == 1, str(report)
    assert report.count("rms_norm") + report.count("layer_norm") >= config.num_hidden_layers + 1, str(report)

    ids, labels = _batch(device)
    truth = _run(truth_model, ids, labels)
    eager = _run(eager_model, ids, labels)
    got = _run(patched, ids, labels)
    assert_within_eager("loss", got[0], eager[0], truth[0], dtype, FACTOR)
    assert_within_eager("logits", got[1], eager[1], truth[1], dtype, FACTOR)
    assert set(got[2]) == set(truth[2]), "gradients for different parameters"
    for name in truth[2]:
        assert_within_eager(f"d {name}", got[2][name], eager[2][name], truth[2][name], dtype, FACTOR)


@pytest.mark.parametrize("arch", [a for a in NATIVE if a.name in ("Llama", "Gemma2", "Granite", "Mixtral")],
                         ids=lambda a: a.name)
def test_unpatch_restores_the_original(arch, device):
    model = AutoModelForCausalLM.from_config(arch.tiny_config()).to(device).eval()
    ids, labels = _batch(device)
    before = model(input_ids=ids, labels=labels)
    classes = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attn = model.config._attn_implementation
    fastft.patch(model)
    assert set(model.state_dict()) == set(state), "patching changed the parameter names"
    fastft.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.config._attn_implementation == attn
    assert "forward" not in model.__dict__ and "forward" not in model.get_output_embeddings().__dict__
    after = model(input_ids=ids, labels=labels)
    assert torch.equal(before.loss, after.loss) and torch.equal(before.logits, after.logits)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_architectures_doc_is_current():
    """docs/ARCHITECTURES.md is generated from the registry and what patching reports today."""
    import pathlib

    from fastft.architectures import ARCHITECTURES, markdown

    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURES.md"
    assert doc.read_text() == markdown(), "regenerate with: python -m fastft.architectures"
    assert len(ARCHITECTURES) >= 46
