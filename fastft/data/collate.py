"""Collators: encoded examples -> one micro-batch, a dict of tensors (the trainer's contract).

Every batch:
  input_ids      [B, T] int64
  labels         [B, T] int64, -100 where there is no loss (unshifted: the model's causal-LM loss
                 scores logits[t] against labels[t + 1])
  position_ids   [B, T] int64, restarting at 0 for every document
  num_target_tokens  0-dim int64: labels != -100 after the causal shift (labels[:, 1:]), for
                 normalising a loss summed over micro-batches
  document_lengths   [docs] int64: the real documents' lengths (padding excluded), for counting
                 tokens and attention FLOPs (fastft/flops.py)
These (and real_tokens below) are bookkeeping, not model inputs: `model_inputs(batch)` drops them.
Padded batches (`collate_padded`, one example per row, right padding) add
  attention_mask [B, T] int64, 1 on real tokens
Packed batches (`collate_packed`, several documents per row) add, instead of a mask,
  cu_seq_lens_q, cu_seq_lens_k  [docs + 1] int32: cumulative document lengths over the flattened
                 B * T tokens (transformers' FlashAttentionKwargs names), the row tails included
  max_length_q, max_length_k    python int: the longest of those segments
  real_tokens    [B, T] bool, False on the row tails (bookkeeping: the trainer hands it to
                 fastft.patching.moe.set_real_tokens, so MoE experts skip the tails and the
                 router aux loss leaves them out, as an attention_mask does for padded batches)
A row's padded tail is a document of its own (positions 0.., labels -100, pad ids), so real tokens
never attend to it and every one of the B * T slots belongs to exactly one segment.

Label shift across documents: the model scores logits[t] against labels[t + 1]. In a packed row
the last token of document i is followed by the first token of document i + 1, so the first
token of every document gets label -100 (it is never a target: nothing precedes it). Then no
loss term crosses a document boundary. In SFT it is a prompt token (-100) anyway; the collator
enforces it for every input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastft.data.tokenize import IGNORE_INDEX

PACKED_ATTENTION_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _num_targets(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def collate_padded(examples: Sequence[dict], *, pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """One example per row, right-padded to the longest (rounded up to `pad_to_multiple_of`)."""
    if not examples:
        raise ValueError("collate_padded got no examples")
    width = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    labels[:, 0] = IGNORE_INDEX
    position_ids = torch.arange(width, dtype=torch.long).expand(batch, width).clone()
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "num_target_tokens": _num_targets(labels),
        "document_lengths": torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.long),
    }


def collate_packed(rows: Sequence[Sequence[dict]], *, pad_id: int, row_len: int | None = None) -> dict:
    """Several documents per row, each row filled to `row_len` (None: the longest row's length,
    e.g. the padding-free single row). See the module docstring for the layout."""
    if not rows or not all(rows):
        raise ValueError("collate_packed needs at least one row and no empty rows")
    used = [sum(len(d["input_ids"]) for d in docs) for docs in rows]
    width = max(used) if row_len is None else row_len
    if max(used) > width:
        raise ValueError(f"a packed row holds {max(used)} tokens, more than row_len={width}; pack with that capacity")
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    real_tokens = torch.zeros((batch, width), dtype=torch.bool)
    segment_lengths: list[int] = []
    document_lengths: list[int] = []
    for row, docs in enumerate(rows):
        offset = 0
        for doc in docs:
            n = len(doc["input_ids"])
            input_ids[row, offset : offset + n] = torch.as_tensor(doc["input_ids"], dtype=torch.long)
            labels[row, offset : offset + n] = torch.as_tensor(doc["labels"], dtype=torch.long)
            labels[row, offset] = IGNORE_INDEX  # nothing may predict a document's first token
            position_ids[row, offset : offset + n] = torch.arange(n)
            segment_lengths.append(n)
            document_lengths.append(n)
            offset += n
        real_tokens[row, :offset] = True
        if offset < width:  # the tail: its own segment, never attended by real tokens
            position_ids[row, offset:] = torch.arange(width - offset)
            segment_lengths.append(width - offset)
    cu_seq_lens = torch.zeros(len(segment_lengths) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.cumsum(torch.tensor(segment_lengths, dtype=torch.int32), 0)
    max_length = max(segment_lengths)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens.clone(),
        "max_length_q": max_length,
        "max_length_k": max_length,
        "num_target_tokens": _num_targets(labels),
        "document_lengths": torch.tensor(document_lengths, dtype=torch.long),
        "real_tokens": real_tokens,
    }


BOOKKEEPING_KEYS = ("num_target_tokens", "document_lengths", "real_tokens")


def model_inputs(batch: dict) -> dict:
    """The keyword arguments for a Hugging Face causal LM's forward: the batch minus the trainer's
    bookkeeping (BOOKKEEPING_KEYS), plus `use_cache=False`.

    use_cache=False matters for packed batches with the stock sdpa/eager attention: transformers
    (checked on 5.24) builds the block-diagonal mask from restarting position_ids only when there
    is no attention_mask and no cache, and a causal LM whose config has use_cache=True creates a
    cache even in training. With a cache, packed documents would attend to each other.
    """
    inputs = {k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS}
    inputs["use_cache"] = False
    return inputs


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (copied without a host sync: the host tensors are not reused
    before the copy is done, the collator making new ones for every micro-batch)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
