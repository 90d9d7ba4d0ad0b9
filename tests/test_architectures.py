"""The architecture matrix: every native seed architecture, patched vs unpatched (DESIGN level 2),
and packed == one document at a time.

A tiny random model (2 layers) is built from the registry's config; the truth is the unpatched
model in float64; "eager" is the unpatched model in the test dtype; the patched model must be
within FACTOR x eager's error (tests/numerics.py) on the loss, the logits (called without labels)
and every parameter gradient. Model-level errors compound over layers, so the factor here is 4.

(The unpacked bfloat16 comparison is in the slow suite: the packed one below compares the patched
model with the unpacked one in bfloat16 too.) The same three models then take a packed batch (collate_packed's layout: 3 documents of
different lengths over 2 rows, restarting position_ids, cu_seq_lens, a padded tail): the
patched model runs it packed, the truth and eager run each document alone, and the loss (summed
token losses over the step's target count, as the trainer normalises), the documents' logits and
every parameter gradient (summed over the documents) must agree by the same rule. In bfloat16 the
CPU reference varlen backend (tests/varlen_reference.py) is registered, so the packed forward
takes the varlen dispatch a GPU takes (and the path counters must say so); in float32 it takes
SDPA with document masks (eager for soft-capped scores). Along the way: patching leaves every
parameter and buffer bit-for-bit as it was, and every entry the report claims runs (attention
calls counted per layer, the fused loss, each fused norm).
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastft
import varlen_reference
from fastft import attention as fastft_attention
from fastft.architectures import NATIVE
from fastft.data.collate import collate_packed, model_inputs
from fastft.model import eager_experts
from numerics import assert_within_eager

FACTOR = 4.0
SEQ = 8
LENGTHS = (4, 2, 3)  # rows [doc 1 | doc 2] and [doc 3 | tail]: few tokens, the interpreter's cost


def _batch(device):
    ids = torch.randint(3, 128, (2, SEQ), device=device)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt with no loss
    return ids, labels


def _run(model, ids, labels):
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return out.loss.detach(), logits, grads


def _documents():
    docs = []
    for n in LENGTHS:
        ids = torch.randint(3, 128, (n,))
        labels = ids.clone()
        labels[:1] = -100  # a prompt
        docs.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return docs


def _packed_run(model, batch, device, report, extra):
    """The packed step; and the report's counters of that one training forward + backward."""
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
    targets = batch["num_target_tokens"].to(device)
    model.zero_grad(set_to_none=True)
    report.reset_counts()
    out = model(**inputs, num_items_in_batch=targets, **extra)
    out.loss.backward()
    counted = (Counter(report.attention_calls), Counter(report.loss_calls))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    inputs.pop("labels")
    with torch.no_grad():
        logits = model(**inputs).logits
    real = [logits[0, :LENGTHS[0] + LENGTHS[1]], logits[1, :LENGTHS[2]]]  # the tail is not a document
    return (out.loss.detach(), torch.cat(real), grads), counted


def _alone_run(model, docs, targets, device, extra):
    """Each document alone, its summed token loss over the packed step's target count."""
    model.zero_grad(set_to_none=True)
    loss, logits = 0.0, []
    for doc in docs:
        ids = torch.tensor([doc["input_ids"]], device=device)
        labels = torch.tensor([doc["labels"]], device=device)
        labels[0, 0] = -100
        out = model(input_ids=ids, labels=labels, num_items_in_batch=targets.to(device), use_cache=False, **extra)
        out.loss.backward()
        loss = loss + out.loss.detach()
        logits.append(out.logits[0].detach())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss, torch.cat(logits), grads


def _assert_matches(what, got, eager, truth, dtype):
    assert_within_eager(f"{what} loss", got[0], eager[0], truth[0], dtype, FACTOR)
    assert_within_eager(f"{what} logits", got[1], eager[1], truth[1], dtype, FACTOR)
    assert set(got[2]) == set(truth[2]), f"{what}: gradients for different parameters"
    for name in truth[2]:
        assert_within_eager(f"{what} d {name}", got[2][name], eager[2][name], truth[2][name], dtype, FACTOR)


def _norm_calls(model, report):
    """Forward hooks counting the calls of every norm the report says it fused."""
    calls = {}
    for entry in report.patched("rms_norm") + report.patched("layer_norm"):
        calls[entry.module] = 0
        model.get_submodule(entry.module).register_forward_hook(
            lambda m, i, o, name=entry.module: calls.__setitem__(name, calls[name] + 1))
    return calls


def _assert_report_ran(report, counted, norm_calls, dtype, config, device):
    """In the packed training forward every attention layer the report names called fastft
    once, on the path the decision gives for this device and dtype (on a CPU: varlen through the
    reference backend in bf16, SDPA with document masks in fp32, eager for soft-capped scores),
    every recurrent mixer reset its state, the fused loss ran once and every fused norm ran."""
    attention_calls, loss_calls = counted
    attention = {e.module for e in report.patched("attention")}
    layers = {layer for layer, path in attention_calls if not path.startswith("recurrent")}
    assert layers == attention, (layers, str(report))
    paths = {path for _, path in attention_calls if not path.startswith("recurrent")}
    if attention:
        f = fastft_attention.ModelFeatures.of(config)
        want = {fastft_attention.decide(device=torch.device(device), dtype=dtype, head_dim=f.head_dim, window=w,
                                        softcap=f.softcap).label for w in {None, getattr(config, "sliding_window", None)}}
        assert paths <= want, (paths, want, dict(attention_calls))
        if device == "cpu":
            assert paths == ({"varlen/reference"} if dtype == torch.bfloat16 else {"eager" if f.softcap else "sdpa"})
    assert all(n == 1 for n in attention_calls.values()), dict(attention_calls)
    mixers = {e.module for e in report.patched("recurrent")}
    assert {layer for layer, path in attention_calls if path.startswith("recurrent")} == mixers
    assert loss_calls["fused"] == 1
    assert norm_calls and all(n > 0 for n in norm_calls.values()), norm_calls


def _models(arch, dtype, device):
    """(config, float64 truth, eager, patched + its report), patching checked bit-for-bit."""
    config = arch.tiny_config()
    base = AutoModelForCausalLM.from_config(config).eval()
    truth_model = copy.deepcopy(base).to(device, torch.float64)
    eager_experts(truth_model)  # grouped_mm has no float64 kernel
    eager_model = copy.deepcopy(base).to(device, dtype)
    patched = copy.deepcopy(base).to(device, dtype)
    before = {k: v.clone() for k, v in patched.state_dict().items()}
    report = fastft.patch(patched)
    after = patched.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items()), \
        "patching changed a parameter or buffer"
    assert report.count("cross_entropy") == 1, str(report)
    assert report.count("rms_norm") + report.count("layer_norm") >= config.num_hidden_layers + 1, str(report)
    assert report.packing_safe, str(report)
    return config, truth_model, eager_model, patched, report


def _check_unpacked(truth_model, eager_model, patched, dtype, device):
    ids, labels = _batch(device)
    _assert_matches("unpacked", _run(patched, ids, labels), _run(eager_model, ids, labels),
                    _run(truth_model, ids, labels), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", NATIVE, ids=lambda a: a.name.replace(" ", "_"))
def test_patched_matches_unpatched(arch, dtype, device):
    """Unpacked (float32 here; bfloat16 in the slow test below: the packed bfloat16 check already
    compares the patched model with the unpatched one) and packed vs one document at a time."""
    with varlen_reference.registered():
        config, truth_model, eager_model, patched, report = _models(arch, dtype, device)
        if dtype == torch.float32:
            _check_unpacked(truth_model, eager_model, patched, dtype, device)

        docs = _documents()
        batch = collate_packed([docs[:2], docs[2:]], pad_id=0, row_len=LENGTHS[0] + LENGTHS[1])
        norm_calls = _norm_calls(patched, report)
        # A MoE router's auxiliary loss is a statistic of the whole batch, not of each document:
        # the packed comparison is of the cross-entropy (the unpacked one includes it).
        extra = {"output_router_logits": False} if getattr(config, "output_router_logits", False) else {}
        got, counted = _packed_run(patched, batch, device, report, extra)
        _assert_report_ran(report, counted, norm_calls, dtype, config, device)
        targets = batch["num_target_tokens"]
        _assert_matches("packed vs one at a time", got, _alone_run(eager_model, docs, targets, device, extra),
                        _alone_run(truth_model, docs, targets, device, extra), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("arch", NATIVE, ids=lambda a: a.name.replace(" ", "_"))
def test_patched_matches_unpatched_unpacked_bf16(arch, device):
    with varlen_reference.registered():
        _, truth_model, eager_model, patched, _ = _models(arch, torch.bfloat16, device)
        _check_unpacked(truth_model, eager_model, patched, torch.bfloat16, device)


@pytest.mark.parametrize("arch", [a for a in NATIVE if a.name in ("Llama", "Gemma2", "Granite", "Mixtral", "Bamba")],
                         ids=lambda a: a.name)
def test_unpatch_restores_the_original(arch, device):
    model = AutoModelForCausalLM.from_config(arch.tiny_config()).to(device).eval()
    ids, labels = _batch(device)
    before = model(input_ids=ids, labels=labels)
    classes = {n: type(m) for n, m in model.named_modules()}
    forwards = {n for n, m in model.named_modules() if "forward" in m.__dict__}
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attn = model.config._attn_implementation
    fastft.patch(model)
    assert set(model.state_dict()) == set(state), "patching changed the parameter names"
    fastft.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.config._attn_implementation == attn
    assert {n for n, m in model.named_modules() if "forward" in m.__dict__} == forwards
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
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
