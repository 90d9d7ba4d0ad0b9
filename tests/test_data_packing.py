"""Packing: best-fit-decreasing invariants, collated batch layout, rank split, streaming, and the
key property: a packed batch gives the same per-document losses and gradients as the same
documents run one at a time."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from fastft.data.collate import collate_packed, collate_padded, model_inputs
from fastft.data.packing import PackedBatches, best_fit_decreasing
from numerics import ModelRun, assert_runs_within_eager, assert_within_eager, float64_twin, precision, run_model

IGNORE = -100


def make_docs(rng: random.Random, n: int, vocab: int = 50, max_len: int = 40, min_len: int = 2) -> list[dict]:
    """SFT-like documents: a prompt (labels -100) then a response (labels = ids)."""
    docs = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(vocab) for _ in range(length)]
        prompt = rng.randint(1, max(length - 1, 1))  # a 1-token document has no target at all
        docs.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return docs


# -- best-fit decreasing ------------------------------------------------------------------------
@pytest.mark.parametrize("capacity", [16, 64, 257])
def test_best_fit_decreasing_invariants(capacity):
    rng = random.Random(capacity)
    lengths = [rng.randint(1, capacity) for _ in range(500)]
    bins = best_fit_decreasing(lengths, capacity, seed=3)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths))), "every document exactly once"
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins), "no bin over capacity"
    # Best fit never leaves two bins that could be merged... at most one bin is at most half full.
    assert sum(sum(lengths[i] for i in b) <= capacity / 2 for b in bins) <= 1
    assert bins == best_fit_decreasing(lengths, capacity, seed=3), "deterministic for a seed"


def test_best_fit_decreasing_is_tight_on_a_known_case():
    # 6+4, 5+5, 7+3, 8+2: four full bins of 10; first fit in input order would need five.
    assert len(best_fit_decreasing([6, 5, 7, 8, 4, 5, 3, 2], 10)) == 4


def test_best_fit_decreasing_rejects_too_long_documents():
    with pytest.raises(ValueError, match=r"longer than the packing capacity 8 \(first: #1, 9 tokens\)"):
        best_fit_decreasing([3, 9], 8)


# -- collated layout ----------------------------------------------------------------------------
def check_packed_batch(batch: dict, rows: list[list[dict]], row_len: int | None) -> None:
    B, T = batch["input_ids"].shape
    assert B == len(rows) and (row_len is None or T == row_len)
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (B, T)
    cu = batch["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and torch.equal(cu, batch["cu_seq_lens_k"])
    assert cu[0] == 0 and cu[-1] == B * T and bool((cu[1:] > cu[:-1]).all())
    seg = (cu[1:] - cu[:-1]).tolist()
    assert batch["max_length_q"] == batch["max_length_k"] == max(seg)
    flat_pos = batch["position_ids"].reshape(-1)
    flat_ids = batch["input_ids"].reshape(-1)
    flat_labels = batch["labels"].reshape(-1)
    starts = cu[:-1].tolist()
    # Every segment's positions run 0..n-1: restart exactly at the cu_seq_lens boundaries.
    for s, n in zip(starts, seg):
        assert flat_pos[s : s + n].tolist() == list(range(n))
        assert flat_labels[s] == IGNORE, "a document's first label is -100: nothing crosses a boundary"
    # Documents appear in order with their ids and (first label aside) their labels.
    k = 0
    for r, docs in enumerate(rows):
        offset = 0
        for doc in docs:
            s = r * T + offset
            assert s == starts[k]
            n = len(doc["input_ids"])
            assert flat_ids[s : s + n].tolist() == doc["input_ids"]
            assert flat_labels[s + 1 : s + n].tolist() == doc["labels"][1:]
            offset += n
            k += 1
        if offset < T:  # the tail is one segment of padding with no labels
            k += 1
            assert (batch["labels"][r, offset:] == IGNORE).all()
    assert k == len(seg)
    assert int(batch["num_target_tokens"]) == int((batch["labels"][:, 1:] != IGNORE).sum())
    assert batch["document_lengths"].tolist() == [len(d["input_ids"]) for docs in rows for d in docs]


def test_collate_packed_layout():
    rng = random.Random(0)
    docs = make_docs(rng, 12, max_len=12)
    bins = best_fit_decreasing([len(d["input_ids"]) for d in docs], 24)
    rows = [[docs[i] for i in b] for b in bins]
    check_packed_batch(collate_packed(rows, pad_id=0, row_len=24), rows, 24)
    check_packed_batch(collate_packed(rows[:1], pad_id=0), rows[:1], None)


def test_collate_packed_masks_first_label_of_pretraining_style_documents():
    docs = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = collate_packed([docs], pad_id=0, row_len=7)
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 7]
    assert int(batch["num_target_tokens"]) == 3


def test_collate_padded_layout():
    docs = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    batch = collate_padded(docs, pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE], [IGNORE] * 4]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert int(batch["num_target_tokens"]) == 2 and "cu_seq_lens_q" not in batch
    assert batch["document_lengths"].tolist() == [3, 1]
    assert set(model_inputs(batch)) == {"input_ids", "labels", "position_ids", "attention_mask", "use_cache"}


# -- the batcher ---------------------------------------------------------------------------------
def documents_seen(batches) -> list[tuple[int, ...]]:
    """The documents in a sequence of packed or padded batches, recovered from cu_seq_lens / masks."""
    seen = []
    for batch in batches:
        ids = batch["input_ids"].reshape(-1)
        labels = batch["labels"].reshape(-1)
        if "cu_seq_lens_q" in batch:
            cu = batch["cu_seq_lens_q"].tolist()
            for s, e in zip(cu[:-1], cu[1:]):
                if (labels[s:e] != IGNORE).any():  # a real document (tails have no labels)
                    seen.append(tuple(ids[s:e].tolist()))
        else:
            for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
                seen.append(tuple(row[mask.bool()].tolist()))
    return seen


@pytest.mark.parametrize("mode", ["packed", "flat", "padded"])
def test_every_document_exactly_once_and_deterministic(mode):
    docs = make_docs(random.Random(1), 300, max_len=64)
    kwargs = dict(pad_id=0, max_seq_len=64, mode=mode, batch_size=3, token_budget=200, seed=7)
    batches = list(PackedBatches(docs, **kwargs))
    assert sorted(documents_seen(batches)) == sorted(tuple(d["input_ids"]) for d in docs)
    for batch in batches:
        B, T = batch["input_ids"].shape
        if mode == "packed":
            assert T == 64 and B <= 3
            check_packed_batch(batch, _rows_from(batch), 64)
        elif mode == "flat":
            assert B == 1 and T <= 200
        else:
            assert B <= 3 and T <= 64
    again = list(PackedBatches(docs, **kwargs))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    loader = PackedBatches(docs, **kwargs)
    loader.set_epoch(1)
    other = list(loader)
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other)), "epochs differ"


def _rows_from(batch: dict) -> list[list[dict]]:
    """Rebuild the rows' documents from a packed batch (for check_packed_batch)."""
    B, T = batch["input_ids"].shape
    cu = batch["cu_seq_lens_q"].tolist()
    rows: list[list[dict]] = [[] for _ in range(B)]
    ids, labels = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1)
    for s, e in zip(cu[:-1], cu[1:]):
        if (labels[s:e] != IGNORE).any():
            rows[s // T].append({"input_ids": ids[s:e].tolist(), "labels": labels[s:e].tolist()})
    return rows


def test_packing_efficiency_reported():
    docs = make_docs(random.Random(2), 400, max_len=100, min_len=10)
    packed = PackedBatches(docs, pad_id=0, max_seq_len=256, mode="packed", batch_size=4)
    padded = PackedBatches(docs, pad_id=0, max_seq_len=256, mode="padded", batch_size=4)
    line = packed.describe()
    assert "efficiency" in line and "400 documents" in line
    assert packed.stats.real_tokens == sum(len(d["input_ids"]) for d in docs)
    padded.describe()
    assert packed.stats.efficiency > 0.95 and packed.stats.efficiency > padded.stats.efficiency


@pytest.mark.parametrize("mode", ["packed", "flat", "padded"])
def test_ranks_split_without_overlap(mode):
    docs = make_docs(random.Random(3), 250, max_len=48)
    world = 3
    loaders = [PackedBatches(docs, pad_id=0, max_seq_len=48, mode=mode, batch_size=2, token_budget=96, seed=5,
                             rank=r, world_size=world) for r in range(world)]
    per_rank = [documents_seen(list(loader)) for loader in loaders]
    assert len({len(list(loader)) for loader in loaders}) == 1, "every rank runs the same number of steps"
    union = [d for seen in per_rank for d in seen]
    assert len(union) == len(set(union)), "no document on two ranks"  # the random docs are distinct
    dropped = loaders[0].stats.dropped_micro_batches
    assert dropped < world
    if dropped == 0:
        assert sorted(union) == sorted(tuple(d["input_ids"]) for d in docs)


def test_streaming_input_packs_per_buffer():
    docs = make_docs(random.Random(4), 200, max_len=32)
    stream = PackedBatches((d for d in docs), pad_id=0, max_seq_len=32, mode="packed", batch_size=2, buffer_size=64)
    assert sorted(documents_seen(list(stream))) == sorted(tuple(d["input_ids"]) for d in docs)
    assert stream.stats.documents == 200 and stream.stats.efficiency > 0.8


def test_streaming_dataset_and_map_style_dataset():
    datasets = pytest.importorskip("datasets")
    docs = make_docs(random.Random(5), 120, max_len=32)
    ds = datasets.Dataset.from_list(docs)
    expected = sorted(tuple(d["input_ids"]) for d in docs)
    assert sorted(documents_seen(list(PackedBatches(ds, pad_id=0, max_seq_len=32)))) == expected
    stream = ds.to_iterable_dataset()
    assert sorted(documents_seen(list(PackedBatches(stream, pad_id=0, max_seq_len=32, buffer_size=50)))) == expected


def test_bad_batcher_arguments_are_clear():
    docs = make_docs(random.Random(6), 4)
    with pytest.raises(ValueError, match="unknown batching mode 'rows'"):
        PackedBatches(docs, pad_id=0, max_seq_len=8, mode="rows")
    with pytest.raises(ValueError, match="token_budget >= max_seq_len"):
        PackedBatches(docs, pad_id=0, max_seq_len=64, mode="flat", token_budget=32)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        PackedBatches(docs, pad_id=0, max_seq_len=64, rank=2, world_size=2)


# -- the key property: packed == one at a time ------------------------------------------------------
def tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


def tiny_qwen2(attn: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = attn
    return Qwen2ForCausalLM(config)


def tiny_llama_patched(attn: str):
    """The fastft-patched Llama (fused RMSNorm / loss kernels, fastft attention). fp32: the kernels
    take fp32/bf16/fp16 only."""
    import fastft

    model = tiny_llama(attn)
    fastft.patch(model)
    return model


# Model factories: attention implementation -> (fresh random-init model, the dtype to test it in).
# fp64 where the model allows it, so that any difference left is a real one.
MODEL_FACTORIES = {
    "llama": lambda attn: tiny_llama(attn).double(),
    "qwen2": lambda attn: tiny_qwen2(attn).double(),
    "llama-patched": tiny_llama_patched,
}


def per_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over t of CE(logits[t], labels[t + 1]) for one sequence (the causal-LM shift)."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum")


def _per_document_losses(model, batch, bins, lengths, mode):
    """Per-document loss sums read off the packed logits at each document's offsets (stacked in
    document order)."""
    inputs = model_inputs(batch)
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits  # (a fused loss keeps none)
    logits = logits.reshape(-1, logits.shape[-1])
    labels = batch["labels"].reshape(-1)
    T = batch["input_ids"].shape[1]
    losses = {}
    for r, b in enumerate(bins if mode != "flat" else [[i for b in bins for i in b]]):
        offset = r * T
        for i in b:
            n = lengths[i]
            # Per document, with the document's own labels (first one aside: it is never a target).
            losses[i] = per_token_loss_sum(logits[offset : offset + n], labels[offset : offset + n])
            offset += n
    return torch.stack([losses[i] for i in range(len(lengths))])


def _alone_losses(model, docs):
    return torch.stack([per_token_loss_sum(model(input_ids=torch.tensor([d["input_ids"]]), use_cache=False).logits[0],
                                           torch.tensor(d["labels"])) for d in docs])


def _losses_and_grads(model, losses_fn) -> ModelRun:
    model.zero_grad(set_to_none=True)
    losses = losses_fn(model)
    losses.sum().backward()
    return ModelRun(losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(MODEL_FACTORIES))
@pytest.mark.parametrize("mode", ["packed", "flat"])
def test_packed_batch_matches_documents_one_at_a_time(family, attn, mode):
    """Per-document losses and every gradient of a packed batch against the same documents run one
    at a time, by the tolerance rule (tests/numerics.py): truth = one at a time, float64, SDPA;
    eager = one at a time in the model's own precision and attention; packed must be within
    FACTOR x eager's error. A real difference (cross-document attention, a wrong position, a loss
    term across a boundary) moves the losses by 1e-2 and more. transformers' eager attention takes
    its softmax in float32, so it is judged at float32's floor even for a float64 model."""
    model = MODEL_FACTORIES[family](attn).train()
    dtype = precision(model) if attn == "eager" else next(model.parameters()).dtype
    truth_model = float64_twin(model)
    truth_model.config._attn_implementation = "sdpa"
    rng = random.Random(f"{family}-{attn}-{mode}")
    docs = make_docs(rng, 7, vocab=64, max_len=14, min_len=1)
    docs[0]["labels"] = list(docs[0]["input_ids"])  # a pretraining-style document: first label not -100
    lengths = [len(d["input_ids"]) for d in docs]
    bins = best_fit_decreasing(lengths, 40 if mode == "flat" else 16, seed=0)
    rows = [[docs[i] for i in b] for b in bins]
    if mode == "flat":
        rows = [[doc for row in rows for doc in row]]  # one padding-free row
    batch = collate_packed(rows, pad_id=0, row_len=None if mode == "flat" else 16)

    got = _losses_and_grads(model, lambda m: _per_document_losses(m, batch, bins, lengths, mode))
    eager = _losses_and_grads(model, lambda m: _alone_losses(m, docs))
    truth = _losses_and_grads(truth_model, lambda m: _alone_losses(m, docs))
    assert_runs_within_eager(got, eager, truth, dtype)
    # transformers' own loss on the packed batch (mean over targets, times the target count) is the
    # sum of the per-document sums: no loss term crosses a document boundary.
    hf_sum = model(**model_inputs(batch)).loss * batch["num_target_tokens"]
    assert_within_eager("transformers' packed loss", hf_sum, eager.loss.sum(), truth.loss.sum(), precision(model))


def _exact_loss_sum(out, labels):
    """The summed next-token loss from the logits, in float64 (transformers' own loss rounds the
    logits to float32 first)."""
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).double()
    return F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("family", list(MODEL_FACTORIES))
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(family):
    """The trainer's view: the same documents as one packed batch or one padded batch (attention
    mask), loss from the model (mean over targets) times num_target_tokens: same sum, same grads,
    by the tolerance rule: truth = the padded batch on a float64 unpatched twin with the loss taken
    in float64; eager = the padded batch on the model itself; packed within FACTOR x eager's error."""
    model = MODEL_FACTORIES[family]("sdpa").train()
    docs = make_docs(random.Random(f"padded-{family}"), 6, vocab=64, max_len=12, min_len=2)
    packed = collate_packed([docs[:3], docs[3:]], pad_id=0, row_len=40)
    padded = collate_padded(docs, pad_id=0)
    assert int(packed["num_target_tokens"]) == int(padded["num_target_tokens"])
    n = padded["num_target_tokens"]
    summed = lambda out: out.loss * n  # noqa: E731
    got = run_model(model, summed, **model_inputs(packed))
    eager = run_model(model, summed, **model_inputs(padded))
    inputs = model_inputs(padded)
    labels = inputs.pop("labels")
    truth = run_model(float64_twin(model), lambda out: _exact_loss_sum(out, labels), **inputs)
    assert_runs_within_eager(got, eager, truth, precision(model))


def test_packed_batch_without_use_cache_false_is_not_isolated():
    """Documents why model_inputs() sets use_cache=False: on transformers 5.24 a causal LM whose
    config has use_cache=True builds a cache even in training, and then ignores the packed
    position_ids (full causal mask across documents). If transformers changes this, the test
    says so; use_cache=False stays correct either way."""
    model = tiny_llama("sdpa").double().train()
    docs = make_docs(random.Random(9), 2, vocab=64, max_len=8, min_len=4)
    batch = collate_packed([docs], pad_id=0)
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "use_cache"}
    isolated = model(**model_inputs(batch)).logits
    leaky = model(**inputs).logits
    n = len(docs[0]["input_ids"])
    assert torch.allclose(isolated[:, :n], leaky[:, :n])  # the first document sees nothing else anyway
    if torch.allclose(isolated[:, n:], leaky[:, n:]):
        pytest.skip("this transformers version isolates packed documents even with a cache")
