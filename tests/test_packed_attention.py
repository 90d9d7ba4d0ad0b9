"""Packed sequences attend only within their own document (issue 3's leak test).

On the CPU this runs the fastft attention's SDPA path with the block-diagonal mask transformers
builds from restarting position_ids; on a GPU the same test runs the varlen FlashAttention path
(no mask at all), so it checks both.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastft
from fastft.architectures import NATIVE

LENGTHS = [5, 7, 4]  # three documents in one row


def _packed(ids_per_doc, device):
    ids = torch.cat(ids_per_doc).unsqueeze(0).to(device)
    position_ids = torch.cat([torch.arange(len(d)) for d in ids_per_doc]).unsqueeze(0).to(device)
    cu = torch.tensor([0, *torch.tensor([len(d) for d in ids_per_doc]).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    return ids, position_ids, cu


@pytest.mark.parametrize("arch", [a for a in NATIVE if a.name in ("Llama", "Qwen3", "Mistral", "Gemma2")], ids=lambda a: a.name)
@pytest.mark.parametrize("pass_cu_seqlens", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_changing_one_document_leaves_the_others_bit_identical(arch, pass_cu_seqlens, dtype, device):
    """On a GPU, bf16 takes the varlen FlashAttention path (no mask) and fp32 the SDPA path."""
    model = AutoModelForCausalLM.from_config(arch.tiny_config()).to(device, dtype).eval()
    fastft.patch(model)
    docs = [torch.randint(3, 128, (n,)) for n in LENGTHS]
    changed = [docs[0], torch.randint(3, 128, (LENGTHS[1],)), docs[2]]

    def logits(documents):
        ids, position_ids, cu = _packed(documents, device)
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS)) \
            if pass_cu_seqlens else {}
        with torch.no_grad():
            return model(input_ids=ids, position_ids=position_ids, **extra).logits[0]

    a, b = logits(docs), logits(changed)
    first, second = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
    assert torch.equal(a[:first], b[:first]), "document 1 saw document 2"
    assert torch.equal(a[second:], b[second:]), "document 3 saw document 2"
    assert not torch.equal(a[first:second], b[first:second])

    # and each document's logits are those of the document run alone
    for k, doc in enumerate(docs):
        start = sum(LENGTHS[:k])
        with torch.no_grad():
            alone = model(input_ids=doc.unsqueeze(0).to(device)).logits[0]
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(a[start:start + len(doc)], alone, **tol)


def test_cu_seqlens_from_position_ids_computed_once_per_batch():
    from fastft.attention import cu_seqlens_from_position_ids

    position_ids = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    cu, max_len = cu_seqlens_from_position_ids(position_ids)
    assert cu.tolist() == [0, 3, 5, 7, 10] and cu.dtype == torch.int32 and max_len == 3
    assert cu_seqlens_from_position_ids(position_ids)[0] is cu  # cached: the next layer reuses it
    # a row that does not start at 0 is still cut at the row start
    cu2, _ = cu_seqlens_from_position_ids(torch.tensor([[4, 5, 0, 1]]))
    assert cu2.tolist() == [0, 2, 4]
