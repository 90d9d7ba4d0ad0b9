"""The end-to-end benchmark runs every architecture for one step (tiny shapes, --smoke), and the
report renders its rows; timings are never asserted."""

import json

import pytest

from benchmarks import e2e, report
from benchmarks.e2e_configs import MODELS


@pytest.mark.parametrize("modes", [
    "full",
    # LoRA for every architecture doubles the time: the default run keeps one model, -m slow all.
    pytest.param("lora", marks=pytest.mark.slow),
])
def test_e2e_smoke_every_architecture(tmp_path, modes):
    e2e.main(["--smoke", "--out", str(tmp_path), "--modes", modes, "--providers", "hf,fastft"])
    rows = [json.loads(line) for line in (tmp_path / "e2e_smoke.jsonl").read_text().splitlines()]
    errors = [(r["model"], r["provider"], r["mode"], r["error"]) for r in rows if r.get("error")]
    assert not errors, errors
    assert {(r["model"], r["mode"], r["provider"]) for r in rows} == {
        (m.name, mode, p) for m in MODELS for mode in modes.split(",") for p in ("hf", "fastft")}
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["real_tokens_per_step"] > 0 and r["device"] and r["commit"]
        # the padded HF batch holds the same real tokens in more slots than the packed one
    by_key = {(r["model"], r["mode"], r["provider"]): r for r in rows}
    for m in MODELS:
        hf, ours = by_key[(m.name, modes, "hf")], by_key[(m.name, modes, "fastft")]
        assert hf["real_tokens_per_step"] == ours["real_tokens_per_step"]
        assert hf["slots_per_step"] >= ours["real_tokens_per_step"]
    text = report.main([str(tmp_path), "--smoke"])
    assert "## End-to-end training" in text and "Llama-3.1-8B" in text


def test_e2e_smoke_lora_one_model(tmp_path):
    try:  # QLoRA rows too where bitsandbytes is installed
        import bitsandbytes  # noqa: F401
        modes = ["lora", "qlora"]
    except ImportError:
        modes = ["lora"]
    e2e.main(["--smoke", "--out", str(tmp_path), "--modes", ",".join(modes), "--models", "Llama-3.2-1B",
              "--providers", "hf,fastft"])
    rows = [json.loads(line) for line in (tmp_path / "e2e_smoke.jsonl").read_text().splitlines()]
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in ("hf", "fastft") for m in modes}
    assert not any(r.get("error") for r in rows), rows


def test_flops_convention():
    import torch
    from transformers import AutoModelForCausalLM

    from fastft.architectures import NATIVE
    from fastft.flops import matmul_parameters, training_flops

    arch = next(a for a in NATIVE if a.name == "Llama")
    model = AutoModelForCausalLM.from_config(arch.tiny_config())
    h, i, layers, vocab, kv = 64, 128, 2, 128, 2 * 16
    expected = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + vocab * h  # q,o + k,v + mlp; head
    assert matmul_parameters(model) == (expected, 0)
    f = training_flops(model, [10, 20])
    attention = 12 * layers * h * (10 * 11 / 2 + 20 * 21 / 2)
    assert f["flops"] == f["flops_6n"] == 6 * expected * 30 + attention
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    adapters, base = matmul_parameters(lora)  # (trained, frozen)
    assert base == expected and adapters == layers * 4 * (h + h)
    f = training_flops(lora, [30])
    assert f["flops"] < f["flops_6n"]
    assert torch.isclose(torch.tensor(f["flops_6n"] - f["flops"]), torch.tensor(2.0 * base * 30))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return
    from fastft import quantization

    fresh = AutoModelForCausalLM.from_config(arch.tiny_config())
    quantization.quantize_model(fresh, quantization.Settings("nf4", True, torch.float32))
    # the 4-bit (frozen) weights at their unpacked size; the LM head stays dense and trainable
    assert matmul_parameters(fresh) == (vocab * h, expected - vocab * h)
