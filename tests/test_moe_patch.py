"""The six seed MoE architectures (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoe,
GraniteMoeShared) through fastft's grouped experts: patched == unpatched (loss with the router aux
loss, the aux loss itself, logits on real tokens, every gradient) on a right-padded batch, and a
packed row of documents with a padded tail == the same documents one per row (attention-masked),
fp32 and bf16 under the tolerance rule (float64 truth: the unpatched model with transformers'
eager experts). Also: what the report says per architecture, that the kernel is what ran, that
patching leaves every parameter bit-identical and unpatching restores the model, and what is kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import fastft
from fastft.architectures import NATIVE
from fastft.data import collate_packed, collate_padded, model_inputs
from fastft.patching import moe as moe_patch
from fastft.model import eager_experts
from numerics import assert_within_eager, float64_twin

FACTOR = 4.0  # model-level errors compound over layers (as in tests/test_architectures.py)
MOE = ("Mixtral", "Qwen2Moe", "Qwen3Moe", "Olmoe", "GraniteMoe", "GraniteMoeShared")
ARCHS = [a for a in NATIVE if a.name in MOE]
# fp32 for every architecture and bf16 for one in the default suite; the rest of bf16 is slow.
def _cases(bf16_default: str):
    return [pytest.param(a, torch.float32, id=f"{a.name}-fp32") for a in ARCHS] + [
        pytest.param(a, torch.bfloat16, id=f"{a.name}-bf16", marks=() if a.name == bf16_default else pytest.mark.slow)
        for a in ARCHS]
LENGTHS = (5, 9, 4)
# The other patches are covered with these architectures by tests/test_architectures.py (and their
# interpreter time is most of a patched forward here); packed rows use transformers' own
# document mask from the restarting position_ids (fastft's attention has its own packing tests).
ONLY_MOE = dict(rms_norm=False, layer_norm=False, cross_entropy=False, attention=False, lora=False)


def _models(arch, dtype, device):
    base = AutoModelForCausalLM.from_config(arch.tiny_config(intermediate_size=32)).eval()
    truth = copy.deepcopy(base).to(device, torch.float64)
    eager_experts(truth)
    return base, truth, copy.deepcopy(base).to(device, dtype), copy.deepcopy(base).to(device, dtype)


def _documents():
    docs = []
    for n in LENGTHS:
        ids = torch.randint(3, 128, (n,)).tolist()
        docs.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})  # a 2-token prompt
    return docs


def _run(model, batch, packed=False):
    if packed:
        moe_patch.set_real_tokens(model, batch["real_tokens"])
    out = model(**model_inputs(batch), num_items_in_batch=batch["num_target_tokens"])
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():  # the fused loss returns no logits: a forward without labels
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
        logits = model(**inputs).logits
    return out.loss.detach(), out.aux_loss.detach(), logits, grads


def _counting(monkeypatch):
    calls = []
    original = moe_patch.moe_experts

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(moe_patch, "moe_experts", counted)
    return calls


def _compare(got, eager, truth, dtype, real_rows):
    """got/eager/truth: (loss, aux, logits, grads); logits compared on the real tokens."""
    assert_within_eager("loss", got[0], eager[0], truth[0], dtype, FACTOR)
    assert_within_eager("aux_loss", got[1], eager[1], truth[1], dtype, FACTOR)
    for name, rows in real_rows.items():
        assert_within_eager(f"logits {name}", got[2][rows[0]], eager[2][rows[1]], truth[2][rows[1]], dtype, FACTOR)
    assert set(got[3]) == set(truth[3]), "gradients for different parameters"
    for name in truth[3]:
        assert_within_eager(f"d {name}", got[3][name], eager[3][name], truth[3][name], dtype, FACTOR)


@pytest.mark.parametrize("arch,dtype", _cases("GraniteMoeShared"))
def test_moe_patched_matches_unpatched(arch, dtype, device, monkeypatch):
    """Right-padded batch with an attention_mask: padding goes to no expert in the patched model (its
    logits there differ and are not compared); everything the loss sees must match."""
    _, truth_model, eager_model, patched = _models(arch, dtype, device)
    report = fastft.patch(patched, **ONLY_MOE)
    layers = patched.config.num_hidden_layers
    assert report.count("moe") == layers, str(report)
    calls = _counting(monkeypatch)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate_padded(_documents(), pad_id=0).items()}
    truth, eager, got = (_run(m, batch) for m in (truth_model, eager_model, patched))
    assert len(calls) == 2 * layers, "the fused experts did not run in every MoE layer (loss and logits forwards)"
    real = {f"doc {i}": ((i, slice(0, n)), (i, slice(0, n))) for i, n in enumerate(LENGTHS)}
    _compare(got, eager, truth, dtype, real)


@pytest.mark.parametrize("arch,dtype", _cases("Qwen2Moe"))
def test_moe_packed_matches_one_document_at_a_time(arch, dtype, device):
    """One packed row of three documents and a 3-token padded tail (fastft's packed collator, its
    real_tokens handed to set_real_tokens) against the same documents one per row: the loss
    (cross-entropy plus the aux loss over real tokens only), each document's logits, every
    gradient. The references are the unpatched model on the one-per-row batch."""
    _, truth_model, eager_model, patched = _models(arch, dtype, device)
    fastft.patch(patched, **ONLY_MOE)
    docs = _documents()
    padded = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate_padded(docs, pad_id=0).items()}
    packed = {k: v.to(device) if torch.is_tensor(v) else v
              for k, v in collate_packed([docs], pad_id=0, row_len=sum(LENGTHS) + 3).items()}
    assert packed["real_tokens"].sum() == sum(LENGTHS)
    truth, eager = _run(truth_model, padded), _run(eager_model, padded)
    got = _run(patched, packed, packed=True)
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    real = {f"doc {i}": ((0, slice(s, s + n)), (i, slice(0, n))) for i, (s, n) in enumerate(zip(starts, LENGTHS))}
    _compare(got, eager, truth, dtype, real)


def test_packed_tail_is_left_out_of_the_aux_loss(device):
    """Without set_real_tokens the model's own aux loss counts the tail; with it, the real tokens."""
    arch = next(a for a in ARCHS if a.name == "Qwen3Moe")
    model = AutoModelForCausalLM.from_config(arch.tiny_config(intermediate_size=32)).to(device)
    twin = float64_twin(model)  # the tolerance rule's truth
    fastft.patch(model, **ONLY_MOE)
    batch = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in collate_packed([_documents()], pad_id=0, row_len=sum(LENGTHS) + 6).items()}
    with torch.no_grad():
        all_rows = model(**model_inputs(batch)).aux_loss
        moe_patch.set_real_tokens(model, batch["real_tokens"])
        real = model(**model_inputs(batch)).aux_loss
        again = model(**model_inputs(batch)).aux_loss  # the mask applies to one forward only
        n = sum(LENGTHS)  # the row without its tail
        expected, truth = (m(input_ids=batch["input_ids"][:, :n], position_ids=batch["position_ids"][:, :n],
                             use_cache=False).aux_loss for m in (model, twin))
    assert_within_eager("aux loss", real, expected, truth, torch.float32)
    assert not torch.allclose(all_rows, real)
    torch.testing.assert_close(again, all_rows, rtol=0, atol=0)  # the same forward again


EXPECTED_ROUTING = {
    "Mixtral": "softmax → top-2 of 4, renormalised",
    "Qwen2Moe": "softmax → top-2 of 4 (",
    "Qwen3Moe": "softmax → top-2 of 4 (",
    "Olmoe": "softmax → top-2 of 4 (",
    "GraniteMoe": "softmax → top-2 of 4, renormalised",
    "GraniteMoeShared": "softmax → top-2 of 4, renormalised",
}
EXPECTED_SHARED = {"Qwen2Moe": "shared expert shared_expert (gate shared_expert_gate)",
                   "GraniteMoeShared": "shared expert shared_mlp (in the decoder layer)"}


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_report_names_routing_and_shared_experts(arch):
    """tiny configs: norm_topk_prob is off for Qwen2/3-MoE and OLMoE, Mixtral and Granite renormalise."""
    model = AutoModelForCausalLM.from_config(arch.tiny_config())
    report = fastft.patch(model)
    entries = report.patched("moe")
    assert entries and all(e.replacement == "moe_experts (silu, concatenated)" for e in entries), str(report)
    assert all(EXPECTED_ROUTING[arch.name] in e.reason for e in entries), entries[0].reason
    shared = EXPECTED_SHARED.get(arch.name)
    assert all((shared in e.reason) if shared else "shared expert" not in e.reason for e in entries), entries[0].reason


def test_patch_leaves_parameters_bit_identical_and_unpatch_restores(device):
    arch = next(a for a in ARCHS if a.name == "Qwen2Moe")
    model = AutoModelForCausalLM.from_config(arch.tiny_config()).to(device).eval()
    ids = torch.randint(3, 128, (2, 7), device=device)
    before = model(input_ids=ids, labels=ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fastft.patch(model, attention=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"patching changed {k}"
    experts = model.model.layers[0].mlp.experts
    assert "forward" in experts.__dict__
    fastft.unpatch(model)
    assert not any("forward" in m.__dict__ or moe_patch.FORWARD_ATTR in m.__dict__ for m in model.modules())
    assert not model._forward_pre_hooks and not model._forward_hooks
    after = model(input_ids=ids, labels=ids)
    assert torch.equal(before.loss, after.loss) and torch.equal(before.logits, after.logits)


class ReluExperts(nn.Module):
    """Gated experts with an activation outside the candidates: the probe must refuse them."""

    def __init__(self, n_experts=4, hidden=16, inter=8):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(n_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.randn(n_experts, hidden, inter))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for k in range(top_k_index.shape[1]):
            gu = torch.einsum("nh,nih->ni", hidden_states, self.gate_up_proj[top_k_index[:, k]])
            g, u = gu.chunk(2, dim=-1)
            y = torch.einsum("ni,nhi->nh", torch.relu(g) * u, self.down_proj[top_k_index[:, k]])
            out += top_k_weights[:, k, None] * y
        return out


class BiasedExperts(ReluExperts):
    def __init__(self):
        super().__init__()
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(4, 16))


class Holder(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts
        self.norm = nn.LayerNorm(16)


def test_unmatched_experts_are_kept_with_the_reason():
    report = fastft.patch(Holder(ReluExperts()), cross_entropy=False, attention=False)
    (entry,) = report.skipped("moe")
    assert "matches no candidate" in entry.reason and "transformers' experts kept" in entry.reason
    report = fastft.patch(Holder(BiasedExperts()), cross_entropy=False, attention=False)
    (entry,) = report.skipped("moe")
    assert "not one gated experts pair" in entry.reason


def test_probe_finds_argument_order_and_interleaved_layout():
    class Interleaved(ReluExperts):
        def forward(self, hidden_states, top_k_weights, top_k_index):  # the other argument order
            gu = self.gate_up_proj
            concat = torch.cat([gu[:, 0::2], gu[:, 1::2]], dim=1)
            from fastft.kernels.moe import moe_experts_reference
            return moe_experts_reference(hidden_states, top_k_index, top_k_weights, concat, self.down_proj, "gelu_tanh")

    module = Interleaved()
    spec = moe_patch.probe_experts(module, moe_patch.expert_stacks(module))
    assert isinstance(spec, moe_patch.ExpertsSpec), spec
    assert (spec.layout, spec.activation, spec.index_first) == ("interleaved", "gelu_tanh", False)
