"""Tiled MLP (fastft/patching/tiled_mlp.py): equal loss and every gradient to the untiled MLP,
one chunk of [tokens, intermediate] activations at a time, through the fused LoRA MLP kernel."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from fastft.architectures import NATIVE
from fastft.patching import tiled_mlp
from fastft.patching.report import PatchReport
from numerics import assert_runs_within_eager, float64_twin, precision, run_model


def _arch(model_type):
    return next(a for a in NATIVE if a.model_type == model_type)


def _batch(vocab, rows=2, seq=21):
    ids = torch.randint(3, vocab, (rows, seq))
    return {"input_ids": ids, "labels": ids, "use_cache": False}


@pytest.mark.parametrize("model_type", ["llama", "gemma"])  # SwiGLU, GeGLU (gelu tanh)
def test_tiled_equals_untiled_full_finetuning(model_type):
    from transformers import AutoModelForCausalLM

    config = _arch(model_type).tiny_config()
    model = AutoModelForCausalLM.from_config(config).train()
    batch = _batch(config.vocab_size)
    truth = run_model(float64_twin(model), **batch)
    eager = run_model(model, **batch)
    tiled = copy.deepcopy(model)
    report = PatchReport("test")
    names = tiled_mlp.apply(tiled, 5, report)  # 42 tokens in chunks of 5: 9 chunks, the last of 2
    assert names == [f"model.layers.{i}.mlp" for i in range(config.num_hidden_layers)]
    assert len(report.patched("tiled_mlp")) == len(names)
    assert_runs_within_eager(run_model(tiled, **batch), eager, truth, precision(model))
    tiled_mlp.remove(tiled)
    assert all("forward" not in m.__dict__ for m in tiled.modules())


needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="QLoRA needs bitsandbytes")


@pytest.mark.parametrize("quantization", ["none", pytest.param("nf4", marks=[needs_bitsandbytes, pytest.mark.slow])])
def test_tiled_fused_lora_mlp_equals_untiled(quantization):
    """LoRA on every linear (over a 4-bit NF4 base: QLoRA), fastft.patch'ed (the fused LoRA MLP
    kernel under the interpreter), then tiled: each chunk runs the fused block; equal to the
    untiled patched model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import fastft

    config = _arch("llama").tiny_config()
    base = AutoModelForCausalLM.from_config(config)
    if quantization != "none":
        from fastft import quantization as q

        q.quantize_model(base, q.settings(quantization, True, "auto", torch.float32))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = _batch(config.vocab_size)
    truth = run_model(float64_twin(model), **batch)
    eager = run_model(model, **batch)
    fastft.patch(model)
    fused_mlps = [e.module for e in model.fastft_report.patched("lora") if e.replacement.startswith("lora_mlp")]
    assert fused_mlps
    names = tiled_mlp.apply(model, 8)
    assert sorted(names) == sorted(fused_mlps)
    calls = []
    import fastft.patching.lora as lora_patch

    original = lora_patch.lora_mlp

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    lora_patch.lora_mlp = counting
    try:
        got = run_model(model, **batch)
    finally:
        lora_patch.lora_mlp = original
    # 42 tokens in chunks of 8 per layer: 6 chunks, forward and the recomputation in the backward
    assert sorted(calls) == sorted([8, 8, 8, 8, 8, 2] * (2 * config.num_hidden_layers))
    assert_runs_within_eager(got, eager, truth, precision(model))


@needs_bitsandbytes
def test_fused_qlora_mlp_is_tiled():
    """Over a 4-bit base (QLoRA) the fused LoRA MLP is tiled too: its probe (tiled == untiled on a
    random input, in the input dtype, not the packed weight's uint8) passes; the slow test above
    checks the loss and every gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import fastft
    from fastft import quantization as q

    config = _arch("llama").tiny_config(num_hidden_layers=1)
    base = AutoModelForCausalLM.from_config(config)
    q.quantize_model(base, q.settings("nf4", True, "auto", torch.float32))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    fastft.patch(model)
    report = PatchReport("test")
    assert tiled_mlp.apply(model, 3, report) == ["base_model.model.model.layers.0.mlp"], str(report)


def test_one_chunk_of_intermediate_activations_is_saved():
    """What the backward keeps: no [tokens, intermediate] tensor of the whole row once tiled."""
    from transformers import AutoModelForCausalLM

    config = _arch("llama").tiny_config(num_hidden_layers=1, vocab_size=200)
    model = AutoModelForCausalLM.from_config(config).train()
    batch = _batch(config.vocab_size, rows=1, seq=40)
    weights = {p.data_ptr() for p in model.parameters()}

    def saved_widths(m):
        shapes = []

        def pack(t):
            if t.data_ptr() not in weights:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(**batch).loss.backward()
        return [s for s in shapes if s and s[-1] == config.intermediate_size]

    assert any(s[-2] == 40 for s in saved_widths(model))  # untiled: the whole row's g, u, act(g)
    tiled_mlp.apply(model, 8)
    # Tiled, the forward keeps no [*, intermediate] tensor (each chunk keeps its input only); the
    # backward recomputes one chunk at a time (inside checkpoint's own hooks, not seen here).
    assert saved_widths(model) == []


def test_auto_tiles_long_rows_only():
    assert tiled_mlp.chunk_tokens("auto", 4096, 2048) == 4096  # one chunk: untiled
    assert tiled_mlp.chunk_tokens("auto", 20000, 4096) == 4096
    assert tiled_mlp.chunk_tokens("auto", 20000, 8192) == 8192
    assert tiled_mlp.chunk_tokens("auto", 131072, 4096) == 131072 // 8  # at most 8 chunks
    assert tiled_mlp.chunk_tokens("off", 131072, 4096) == 131072
    with pytest.raises(ValueError, match="tiled_mlp"):
        tiled_mlp.apply(nn.Linear(2, 2), 0)


class _MixesTokens(nn.Module):
    """Gated-MLP-shaped but not token-wise: tiling would change it, so it must stay untiled."""

    def __init__(self, h=8, i=16):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, i), nn.Linear(h, i), nn.Linear(i, h)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x).cumsum(-2))


def test_probe_refuses_a_module_that_is_not_token_wise():
    block = nn.Sequential()
    block.mlp = _MixesTokens()
    report = PatchReport("test")
    assert tiled_mlp.apply(block, 2, report) == []
    (entry,) = report.skipped("tiled_mlp")
    assert "not token-wise" in entry.reason and "forward" not in block.mlp.__dict__


def test_config_field():
    from fastft.config import ConfigError, load_config

    assert load_config(None, ["--model.tiled_mlp=auto"]).model.tiled_mlp == "auto"
    assert load_config(None, ["--model.tiled_mlp=8192"]).model.tiled_mlp == 8192
    with pytest.raises(ConfigError, match="model.tiled_mlp"):
        load_config(None, ["--model.tiled_mlp=sometimes"])
