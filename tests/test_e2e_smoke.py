"""The end-to-end benchmark runs every architecture for one step (tiny shapes, --smoke), and the
report renders its rows; timings are never asserted. Each row's model contains its own provider's
code only (benchmarks/e2e.py, census), and providers run in separate processes stay apart even
after Liger, which rebinds transformers' module-level names."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import e2e, report
from benchmarks.e2e_configs import MODELS

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_own_code_only(rows: list[dict]) -> None:
    for r in rows:
        own = e2e.providers_in(r["census"])
        assert r["foreign"] == [] and own == ({r["provider"]} - {"hf", "hf-kernels"}), (
            f"{r['model']} {r['mode']} {r['provider']}: runs code of {sorted(own)}: "
            f"{r['census']['rebound'] or [c for c in r['census']['classes'] if not c.startswith(('torch.', 'transformers.', 'peft.'))]}")


# Every architecture takes 2 minutes per mode on 2 cores: the default run keeps one model
# (test_e2e_smoke_one_model, every mode), -m slow all of them.
@pytest.mark.slow
@pytest.mark.parametrize("modes", ["full", "lora"])
def test_e2e_smoke_every_architecture(tmp_path, modes):
    # in one process: hf and fastft rows patch per instance (their census checks it)
    e2e.main(["--smoke", "--out", str(tmp_path), "--modes", modes, "--providers", "hf,fastft", "--isolation", "none"])
    rows = _rows(tmp_path / "e2e_smoke.jsonl")
    errors = [(r["model"], r["provider"], r["mode"], r["error"]) for r in rows if r.get("error")]
    assert not errors, errors
    _assert_own_code_only(rows)
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


def test_e2e_smoke_one_model(tmp_path):
    try:  # QLoRA rows too where bitsandbytes is installed
        import bitsandbytes  # noqa: F401
        modes = ["full", "lora", "qlora"]
    except ImportError:
        modes = ["full", "lora"]
    providers = ("hf", "fastft", "hf-kernels")
    e2e.main(["--smoke", "--out", str(tmp_path), "--modes", ",".join(modes), "--models", "Llama-3.2-1B",
              "--providers", ",".join(providers), "--isolation", "none"])
    rows = _rows(tmp_path / "e2e_smoke.jsonl")
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in providers for m in modes}
    assert not any(r.get("error") for r in rows), rows
    _assert_own_code_only(rows)
    for r in rows:  # the hub-kernel row says what loaded (on a CPU transformers maps nothing)
        assert ("hub_kernels" in r) == (r["provider"] == "hf-kernels")
        if r["provider"] == "hf-kernels":
            assert r["hub_kernels"] == {"status": "on", "layers": {}}, r["hub_kernels"]


@pytest.mark.skipif(not __import__("benchmarks.harness").harness.liger_importable(), reason="liger-kernel not installed")
def test_providers_in_separate_processes_stay_apart(tmp_path):
    """After a Liger row in the same process, an hf model is partly Liger's (the census catches
    it); with --isolation process (the default) every row runs only its own provider's code."""
    together, apart = tmp_path / "together", tmp_path / "apart"
    common = ["--smoke", "--inspect", "--models", "Llama-3.2-1B", "--modes", "full", "--providers", "liger,hf"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "benchmarks.e2e", *common, "--isolation", "none", "--out", str(together)],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    contaminated = {r["provider"]: r for r in _rows(together / "e2e_smoke.jsonl")}
    assert contaminated["hf"]["foreign"] == ["liger"]
    assert "transformers.models.llama.modeling_llama.LlamaRMSNorm" in contaminated["hf"]["census"]["rebound"]
    rows = e2e.main([*common, "--out", str(apart)])  # --isolation process
    assert {r["provider"] for r in rows} == {"liger", "hf"} and all(r["isolation"] == "process (own)" for r in rows)
    _assert_own_code_only(rows)


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


def test_census_reads_a_modeling_module_that_dynamo_has_written_into(monkeypatch):
    """An earlier torch.compile in the process leaves functions whose __module__ is None in the
    modeling module's namespace (dynamo's resume functions); the census reads past them (it
    raised AttributeError for every row once a compile had run: CI, after test_compile_model)."""
    from transformers import AutoModelForCausalLM

    from fastft.architectures import NATIVE

    model = AutoModelForCausalLM.from_config(next(a for a in NATIVE if a.name == "Llama").tiny_config())
    resume = lambda: None  # noqa: E731
    resume.__module__ = None
    monkeypatch.setattr(sys.modules[type(model).__module__], "__resume_at_0", resume, raising=False)
    found = e2e.census(model)
    assert found["rebound"] == {} and e2e.providers_in(found) == set()
