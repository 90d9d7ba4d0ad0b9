"""Offloaded activation checkpointing (fastft/offload.py) == plain checkpointing, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from fastft import distributed
from fastft.architectures import NATIVE


def _arch(model_type):
    return next(a for a in NATIVE if a.model_type == model_type)


def _grads_after_steps(model, mode, batches):
    model = copy.deepcopy(model)
    n = distributed.apply_activation_checkpointing(model, mode)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return n, losses, grads, model


def _batches(vocab, n=2, rows=2, seq=24):
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (rows, seq))
        out.append({"input_ids": ids, "labels": ids, "use_cache": False})
    return out


def test_offload_is_bit_identical_to_full_checkpointing():
    from transformers import AutoModelForCausalLM

    config = _arch("llama").tiny_config(num_hidden_layers=3)
    model = AutoModelForCausalLM.from_config(config).train()
    batches = _batches(config.vocab_size)
    n_full, losses_full, grads_full, _ = _grads_after_steps(model, "full", batches)
    n_off, losses_off, grads_off, wrapped = _grads_after_steps(model, "offload", batches)
    assert n_full == n_off == 3
    for a, b in zip(losses_full, losses_off):
        assert torch.equal(a, b)
    assert grads_full.keys() == grads_off.keys() and grads_full
    for name in grads_full:
        assert torch.equal(grads_full[name], grads_off[name]), name
    # The inputs really went through the host copy: every block's [rows, seq, hidden] input, twice
    # (two steps), and all but the last block's were brought back ahead of their recomputation.
    offload = wrapped.model.layers[0].forward.__closure__
    handles = next(c.cell_contents for c in offload if type(c.cell_contents).__name__ == "BlockOffload")
    per_block = 2 * 24 * config.hidden_size * 4
    assert handles.bytes_offloaded == 2 * 3 * per_block
    assert handles.bytes_prefetched == 2 * 2 * per_block


def test_offload_with_lora_dropout_matches_full_checkpointing():
    """RNG-dependent blocks (LoRA dropout) recompute the same masks through the host copy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _arch("qwen3").tiny_config()
    base = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear")).train()
    for name, p in model.named_parameters():  # non-zero B so that the adapters take part
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batches = _batches(config.vocab_size, n=1)
    torch.manual_seed(1)
    _, losses_full, grads_full, _ = _grads_after_steps(model, "full", batches)
    torch.manual_seed(1)
    _, losses_off, grads_off, _ = _grads_after_steps(model, "offload", batches)
    assert torch.equal(losses_full[0], losses_off[0])
    for name in grads_full:
        assert torch.equal(grads_full[name], grads_off[name]), name


@pytest.mark.slow
def test_offload_benchmark_smoke(tmp_path):
    """benchmarks/offload.py runs (tiny model, one step per mode) and report.py reads its rows."""
    from benchmarks import offload, report

    rows = offload.main(["--smoke", "--out", str(tmp_path)])
    assert [r["provider"] for r in rows] == ["full", "offload", "save_on_cpu"] and all("ms" in r for r in rows)
    assert "offload" in report.main([str(tmp_path), "--smoke"])
