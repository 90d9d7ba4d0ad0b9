"""The fused LoRA MLP block against PEFT-wrapped Hugging Face MLPs (SwiGLU: Llama, with and without
bias; GeGLU: Gemma), fp32 and bf16, ranks 1..64, dropout with the kernels' mask on both sides;
the fused block saves less for backward than PEFT; the GPU benchmark script runs in smoke mode."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.func import functional_call

from fastft.architectures import NATIVE
from fastft.patching import lora as lora_patch
from fastft.patching.report import PatchReport
from numerics import check_against_reference, producer
from helpers.lora import SeededDropout

ARCH = {a.name: a for a in NATIVE}
PROJ = ("gate_proj", "up_proj", "down_proj")


def peft_mlp(arch, r, dropout, bias=False, rslora=False, hidden=48, inter=80):
    from transformers import AutoModelForCausalLM

    config = ARCH[arch].tiny_config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                                    **({"mlp_bias": True} if bias else {}))
    mlp = AutoModelForCausalLM.from_config(config).model.layers[0].mlp
    model = get_peft_model(mlp, LoraConfig(r=r, lora_alpha=16, target_modules=list(PROJ), lora_dropout=dropout,
                                           use_rslora=rslora))
    return model.train()


def _param_names(model, bias):
    names = {}
    for proj in PROJ:
        prefix = f"base_model.model.{proj}."
        names[f"{proj}_w"] = prefix + "base_layer.weight"
        names[f"{proj}_a"] = prefix + "lora_A.default.weight"
        names[f"{proj}_b"] = prefix + "lora_B.default.weight"
        if bias:
            names[f"{proj}_bias"] = prefix + "base_layer.bias"
    return names


CASES = [  # arch, rank, dropout, bias, rslora, activation
    ("Llama", 8, 0.0, False, False, "lora_mlp (silu)"),
    ("Llama", 1, 0.2, True, True, "lora_mlp (silu)"),
    ("Gemma", 16, 0.1, False, False, "lora_mlp (gelu_tanh)"),
    ("Llama", 64, 0.0, True, False, "lora_mlp (silu)"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-r{c[1]}-p{c[2]}{'-bias' if c[3] else ''}{'-rs' if c[4] else ''}"
                                             for c in CASES])
def test_fused_mlp_block_matches_peft_mlp(case, dtype, device):
    arch, r, p, bias, rslora, expected = case
    reference = peft_mlp(arch, r, p, bias, rslora)
    fused = copy.deepcopy(reference)
    if p > 0:
        for proj in PROJ:
            getattr(reference.base_model.model, proj).lora_dropout["default"] = SeededDropout(p)
    report = PatchReport("mlp")
    lora_patch.install(fused, report, skip=set())
    assert [e.replacement for e in report.patched()].count(expected) == 1, str(report)
    names = _param_names(reference, bias)
    inputs = {"x": torch.randn(37, 48)}
    for key, full in names.items():
        t = dict(reference.named_parameters())[full].detach()
        inputs[key] = torch.randn_like(t) * (0.3 if key.endswith("_b") else 1.0) / (t.shape[-1] ** 0.5 if t.dim() == 2 else 1)
    grads = ("x",) + tuple(k for k in names if k.endswith(("_a", "_b")))
    if bias:  # the base trainable too in the bias cases: dW, db
        grads += tuple(k for k in names if k.endswith(("_w", "_bias")))

    def call(module):
        def fn(x, **params):
            torch.manual_seed(3)  # the same dropout seeds, drawn gate, up, down on both sides
            return functional_call(module.to(device), {names[k]: v for k, v in params.items()}, (x,))
        return fn

    out = call(fused)(inputs["x"].to(device).requires_grad_(), **{k: v.to(device) for k, v in inputs.items() if k != "x"})
    # fp32 adapters above rank 32 do not fit the fused kernel's registers on a GPU (lora_mlp.py,
    # _fused_fits): the block then runs as three fused lora_linear ops, on every device
    assert ("fastft_lora_mlp" if r <= 32 else "fastft_lora_linear") in producer(out)
    check_against_reference(call(fused), call(reference), inputs, dtype, device, grad_names=grads)


def test_fused_mlp_saves_less_than_peft(device):
    from benchmarks.kernels.lora import saved_activation_bytes

    reference = peft_mlp("Llama", 8, 0.0, hidden=64, inter=256).to(device)
    fused = copy.deepcopy(reference)
    lora_patch.install(fused, PatchReport("mlp"), skip=set())
    x = torch.randn(96, 64, device=device, requires_grad=True)
    ours, theirs = saved_activation_bytes(lambda: fused(x), fused), saved_activation_bytes(lambda: reference(x), reference)
    # fused: x, g_base, u_base (+ rank-r); PEFT: x, g, act(g), u, h (+ rank-r)
    n, h, i = 96, 64, 256
    assert ours < theirs and ours <= 4 * (n * (h + 2 * i) + 3 * n * 8) + 4 * n * 8, (ours, theirs)
    assert theirs >= 4 * n * (h + 4 * i)


def test_lora_benchmark_smoke(tmp_path):
    from benchmarks.kernels import lora as lora_bench

    lora_bench.main(["--smoke", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "lora_smoke.jsonl").read_text().splitlines()]
    for op in ("lora_mlp", "lora_qkv"):
        providers = {r["provider"] for r in rows if r["op"] == op}
        assert {"fastft", "peft", "no lora (frozen base)"} <= providers, providers
        assert all(r.get("saved_mib") is not None for r in rows if r["op"] == op and r["mode"] == "full")
    try:  # the QLoRA rows, where bitsandbytes is installed
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:
        assert {r["provider"] for r in rows if r["op"] == "qlora_mlp"} == {"fastft", "peft", "no lora (4-bit base)"}
        assert any(r["op"] == "dequantize_4bit" and r.get("gbps") is not None for r in rows)
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["device"] and r["commit"]
