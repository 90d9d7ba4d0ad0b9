"""The fastft attention's packed-batch machinery (fastft/attention.py): documents computed once
per forward, one path decision obeyed by the mask function and every attention call (under
autocast too), the sliding window kept on every path, activation checkpointing recomputing with
the same documents, and no leak when the model is called around the patched forward.

Packed == one document at a time for every architecture is the matrix's job
(tests/test_architectures.py); these tests pin the mechanisms on a few architectures chosen for
what they lack: GPTBigCode does not pass position_ids to its attention, Nemotron does not pass
cu_seq_lens, Mistral has a sliding window, Gemma 2 soft-caps its scores.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastft
import varlen_reference
from fastft import attention
from fastft.architectures import NATIVE
from fastft.distributed import apply_activation_checkpointing
from numerics import assert_within_eager, float64_twin, precision

LENGTHS = [5, 7, 4]  # three documents in one row
ARCH = {a.name: a for a in NATIVE}


def _packed(ids_per_doc, device="cpu", cu_seqlens=True):
    ids = torch.cat(ids_per_doc).unsqueeze(0).to(device)
    position_ids = torch.cat([torch.arange(len(d)) for d in ids_per_doc]).unsqueeze(0).to(device)
    lengths = [len(d) for d in ids_per_doc]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths)) \
        if cu_seqlens else {}
    return dict(input_ids=ids, position_ids=position_ids, use_cache=False, **extra)


def _model(name, dtype=torch.float32, **overrides):
    model = AutoModelForCausalLM.from_config(ARCH[name].tiny_config(**overrides)).to(dtype).eval()
    return model


def test_documents_from_position_ids_and_from_cu_seqlens():
    docs = attention.Documents.from_position_ids(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]), 2, 5)
    assert docs.cu_seqlens.tolist() == [0, 3, 5, 7, 10] and docs.cu_seqlens.dtype == torch.int32
    assert docs.max_length == 3 and docs.count == 4 and docs.packed
    assert docs.ids.tolist() == [[0, 0, 0, 1, 1], [2, 2, 3, 3, 3]]
    # transformers' rule: a new document wherever a position is not its predecessor + 1
    assert attention.Documents.from_position_ids(torch.tensor([[4, 5, 9, 10]]), 1, 4).cu_seqlens.tolist() == [0, 2, 4]
    plain = attention.Documents.from_position_ids(torch.arange(6).expand(2, 6), 2, 6)
    assert not plain.packed and plain.cu_seqlens.tolist() == [0, 6, 12]
    given = attention.Documents.from_cu_seqlens(torch.tensor([0, 3, 5, 10]), 5, 2, 5)
    assert given.max_length == 5 and given.count == 3 and given.ids.tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, 2]]


@pytest.mark.parametrize("name", ["GPTBigCode", "Nemotron"])
@pytest.mark.parametrize("cu_seqlens", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_documents_computed_once_per_forward_reach_every_layer(name, cu_seqlens, monkeypatch):
    """One Documents (the one host sync) per forward, whatever the architecture forwards to its
    attention; every layer then keeps the documents apart."""
    built = []
    for how in ("from_position_ids", "from_cu_seqlens"):
        original = getattr(attention.Documents, how).__func__
        monkeypatch.setattr(attention.Documents, how, classmethod(
            lambda cls, *a, _o=original, _h=how: built.append(_h) or _o(cls, *a)))
    model = _model(name)
    fastft.patch(model)
    docs = [torch.randint(3, 128, (n,)) for n in LENGTHS]
    changed = [torch.randint(3, 128, (LENGTHS[0],)), docs[1], docs[2]]
    built.clear()
    with torch.no_grad():
        a = model(**_packed(docs, cu_seqlens=cu_seqlens)).logits[0]
        assert built == ["from_cu_seqlens" if cu_seqlens else "from_position_ids"]
        b = model(**_packed(changed, cu_seqlens=cu_seqlens)).logits[0]
    assert torch.equal(a[LENGTHS[0]:], b[LENGTHS[0]:]), "documents 2 and 3 saw document 1"
    assert model.fastft_report.paths() == {"sdpa": 2 * 2}  # fp32 on a CPU: SDPA with document masks


def test_one_decision_under_autocast(monkeypatch):
    """fp32 master weights under bf16 autocast: attention sees bf16, so the decision is varlen,
    the mask function builds no mask, and every layer runs varlen (the inputs_embeds are fp32)."""
    built = []
    monkeypatch.setattr(attention, "sdpa_mask", lambda *a, **k: built.append("sdpa") or None)
    monkeypatch.setattr(attention, "eager_mask", lambda *a, **k: built.append("eager") or None)
    model = _model("Llama")
    docs = [torch.randint(3, 128, (n,)) for n in LENGTHS]
    with varlen_reference.registered():
        report = fastft.patch(model, rms_norm=False, cross_entropy=False)
        built.clear()
        report.reset_counts()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            model(**_packed(docs))
    assert built == [] and report.paths() == {"varlen/reference": 2}, (built, dict(report.attention_calls))


WINDOW = 4


def _windowed_reference(name, docs, dtype):
    """Each document alone through the unpatched model's eager attention (its own window mask),
    in dtype and in float64 (the tolerance rule's truth): (model, logits, truth logits)."""
    model = _model(name, dtype, sliding_window=WINDOW)
    model.set_attn_implementation("eager")

    def alone(m):
        return torch.cat([m(input_ids=d[None], use_cache=False).logits[0] for d in docs])

    with torch.no_grad():
        return model, alone(model), alone(float64_twin(model))


@pytest.mark.parametrize("route", ["sdpa mask", "varlen", "varlen backend without a window", "varlen refused"])
def test_the_sliding_window_is_never_lost(route, monkeypatch):
    """Documents longer than the window: packed == each alone through the eager window mask, on
    every path the decision can take, and when a call refuses the decided varlen path."""
    dtype = torch.float32 if route == "sdpa mask" else torch.bfloat16
    docs = [torch.randint(3, 128, (n,)) for n in (11, 9)]
    reference, want, truth = _windowed_reference("Mistral", docs, dtype)
    model = copy.deepcopy(reference)
    model.set_attn_implementation("sdpa")
    backend = varlen_reference.BACKEND
    if route == "varlen backend without a window":
        backend = attention.VarlenBackend("reference", varlen_reference.reference_varlen, frozenset({"cpu"}),
                                          window=False)
    if route == "varlen refused":
        monkeypatch.setattr(attention, "_varlen_refusal", lambda *a: "refused by the test")
    attention.register_varlen_backend(backend)
    try:
        report = fastft.patch(model, rms_norm=False, cross_entropy=False)
        report.reset_counts()
        with torch.no_grad():
            got = model(**_packed(docs)).logits[0]
    finally:
        attention.unregister_varlen_backend(backend.name)
    paths = set(report.paths())
    expected = {"sdpa mask": {"sdpa"}, "varlen": {"varlen/reference"},
                "varlen backend without a window": {"sdpa"},
                "varlen refused": {"sdpa (varlen refused: refused by the test)"}}[route]
    assert paths == expected, dict(report.attention_calls)
    # (a lost window changes the logits by O(1), far above the bound in either dtype)
    assert_within_eager("logits", got, want, truth, precision(reference))


@pytest.mark.parametrize("name", ["Llama", "Mistral", "Gemma2"])
@pytest.mark.parametrize("cu_seqlens", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_changing_one_document_leaves_the_others_bit_identical(name, cu_seqlens, dtype, device):
    """bf16 takes the varlen path (the reference backend on a CPU), fp32 SDPA (eager for Gemma 2)."""
    model = AutoModelForCausalLM.from_config(ARCH[name].tiny_config()).to(device, dtype).eval()
    with varlen_reference.registered():
        fastft.patch(model)
        docs = [torch.randint(3, 128, (n,)) for n in LENGTHS]
        changed = [docs[0], torch.randint(3, 128, (LENGTHS[1],)), docs[2]]
        with torch.no_grad():
            a = model(**_packed(docs, device, cu_seqlens)).logits[0]
            b = model(**_packed(changed, device, cu_seqlens)).logits[0]
    first, second = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
    assert torch.equal(a[:first], b[:first]), "document 1 saw document 2"
    assert torch.equal(a[second:], b[second:]), "document 3 saw document 2"
    assert not torch.equal(a[first:second], b[first:second])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("checkpointing", ["fastft (non-reentrant)", "fastft offload", "transformers (reentrant)"])
def test_activation_checkpointing_recomputes_with_the_same_documents(dtype, checkpointing):
    """GPTBigCode's attention gets no position_ids: the recomputed layers in the backward must
    re-enter the forward's documents (the decoder blocks' wrapper), or their gradients leak. The
    offloaded blocks recompute from an input brought back from the host (a new tensor): the
    forward's state travels with the recomputation, not with the input's storage."""
    base = _model("GPTBigCode", dtype, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    docs = [torch.randint(3, 128, (n,)) for n in LENGTHS]
    inputs = _packed(docs, cu_seqlens=False)
    labels = inputs["input_ids"].clone()
    grads = []
    with varlen_reference.registered():
        for recompute in (False, True):
            model = copy.deepcopy(base).train()
            report = fastft.patch(model, rms_norm=False, layer_norm=False)
            if recompute and checkpointing.startswith("fastft"):
                apply_activation_checkpointing(model, "offload" if "offload" in checkpointing else "full")
            elif recompute:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            report.reset_counts()
            model(**inputs, labels=labels).loss.backward()
            assert all(n == 1 for n in report.attention_calls.values()), dict(report.attention_calls)  # recomputations not counted
            grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0, msg=name)  # recomputation is exact


def test_calling_the_inner_decoder_directly_still_keeps_documents_apart():
    """No forward state (the patched causal-LM module is bypassed): the attention narrows the mask
    to the documents of its own kwargs, on the SDPA path."""
    model = _model("Llama")
    fastft.patch(model)
    docs = [torch.randint(3, 128, (n,)) for n in LENGTHS]
    changed = [torch.randint(3, 128, (LENGTHS[0],)), docs[1], docs[2]]
    with torch.no_grad():
        a = model.model(**_packed(docs, cu_seqlens=False)).last_hidden_state[0]
        b = model.model(**_packed(changed, cu_seqlens=False)).last_hidden_state[0]
    assert torch.equal(a[LENGTHS[0]:], b[LENGTHS[0]:])
