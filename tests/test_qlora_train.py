"""QLoRA through `fastft.finetune` on tiny models (CPU): the patched run (fused 4-bit LoRA kernels
under the interpreter) equals the unpatched PEFT + bitsandbytes run step for step by the tolerance
rule (truth: the same recipe in float64, the 4-bit values held dense), on packed batches; the loss
falls; resume continues exactly (the checkpoint holds the adapters and optimizer, the 4-bit base is
rebuilt); the exported adapter loads on the dense base with plain PEFT, and the merged export is a
plain bf16 HF folder; 8-bit optimizer states resume as AdamW's do; a missing extra is named."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

pytest.importorskip("bitsandbytes")

from fastft.config import ConfigError, load_config  # noqa: E402
from fastft.train import finetune  # noqa: E402
from numerics import assert_curves_within_eager, assert_within_eager, float64_twin  # noqa: E402
from helpers.recipes import FACTOR, tiny  # noqa: E402

# 64 wide so that every projection holds whole 64-value quantization blocks per row.
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False}
ARCHS = {"llama": {}, "qwen3": {"head_dim": 32}, "gemma3_text": {"head_dim": 32, "sliding_window": 64,
                                                                   "query_pre_attn_scalar": 32}}


def small_squad(folder: pathlib.Path, n: int = 48) -> str:
    """A SQuAD-layout JSON of the built-in data's first n examples: tokenizing the whole built-in set
    costs each run more than its training steps here."""
    from fastft.data.builtin import builtin_squad_records

    path = folder / "squad_small.json"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        rows = builtin_squad_records("train", num_examples=n)
        data = [{"title": r["title"], "paragraphs": [{"context": r["context"], "qas": [
            {"id": r["id"], "question": r["question"],
             "answers": [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"],
                                                                          r["answers"]["answer_start"])]}]}]}
                for r in rows]
        path.write_text(json.dumps({"data": data}))
    return str(path)


def qlora(run_dir, arch="llama", patch=True, dtype="auto", **sections):
    model = {"config": {"model_type": arch, **SMALL, **ARCHS[arch]}, "patch": patch, "dtype": dtype,
             "quantization": "nf4"}
    data = small_squad(pathlib.Path(run_dir).parent / "data")
    return tiny(run_dir, model={**model, **sections.pop("model", {})},
                lora={"enabled": True, "r": 4, "alpha": 8, **sections.pop("lora", {})},
                data={"max_seq_len": 128, "batch_size": 2, "source": data, "eval_source": data,
                      **sections.pop("data", {})},
                optim={"lr": 1e-2, "warmup_steps": 0, **sections.pop("optim", {})}, **sections)


def _curves(tmp_path, arch, steps, patch_options=None):
    """(patched, unpatched, float64 truth) loss curves of one QLoRA recipe."""
    runs = {}
    for name, patch, dtype in (("fused", True, "auto"), ("plain", False, "auto"), ("truth", False, "float64")):
        recipe = qlora(tmp_path / name, arch, patch, dtype, train={"max_steps": steps},
                       model={"patch_options": patch_options or {}})
        runs[name] = finetune(recipe)
    return runs


def test_qlora_patched_matches_peft_bitsandbytes_and_learns(tmp_path):
    """Llama, packed rows: fused == PEFT + bitsandbytes step for step, and the loss falls. The norm
    and loss kernels (tested in their own files) stay off here: under the interpreter they cost
    more than the whole 4-bit LoRA path; the slow tests below patch everything."""
    runs = _curves(tmp_path, "llama", 3, {"rms_norm": False, "cross_entropy": False})
    fused, plain, truth = runs["fused"], runs["plain"], runs["truth"]
    from fastft.quantization import is_4bit

    assert sum(is_4bit(m) for m in fused.model.modules()) == 7  # q, k, v, o, gate, up, down
    report = fused.model.fastft_report
    assert report.count("lora") == 8, str(report)  # 7 layers + the MLP block, all fused
    assert not report.skipped("lora"), str(report)
    assert_curves_within_eager("losses", fused.losses, plain.losses, truth.losses, FACTOR)
    assert fused.losses[-1] < fused.losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_qlora_other_architectures_match_peft_bitsandbytes(tmp_path, arch):
    runs = _curves(tmp_path, arch, 4)
    assert_curves_within_eager("losses", runs["fused"].losses, runs["plain"].losses, runs["truth"].losses, FACTOR)
    assert runs["fused"].losses[-1] < runs["fused"].losses[0]


def test_qlora_resume_export_and_merge(tmp_path):
    """Unpatched (the fused path is compared above): 2 steps, stop, resume to 4 == 4 in one go;
    the adapter loads with plain PEFT on the dense base; the merged folder is a bf16 HF model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fastft import quantization

    full = finetune(qlora(tmp_path / "full", patch=False, train={"max_steps": 4}))
    run = tmp_path / "resumed"
    first = finetune(qlora(run, patch=False, train={"max_steps": 4, "run_steps": 2}, checkpoint={"every": 2}))
    assert first.status == "stopped"
    second = finetune(qlora(run, patch=False, train={"max_steps": 4},
                            checkpoint={"resume": True, "export": True, "export_merged": True}))
    torch.testing.assert_close(torch.tensor(first.losses + second.losses), torch.tensor(full.losses), rtol=0, atol=0)
    step = run / "checkpoints" / "step_00000002"
    assert sum(f.stat().st_size for f in step.glob("*.distcp")) < 200_000  # adapters + optimizer, no base

    # The adapter in PEFT's format on the dense base: the 4-bit model's dequantized weights.
    trained = second.model
    base = trained.get_base_model()
    dense = AutoModelForCausalLM.from_config(base.config.__class__.from_dict(
        {k: v for k, v in base.config.to_dict().items() if k != "quantization_config"}))
    state = {}
    for name, module in base.named_modules():
        if quantization.is_4bit(module):
            state[f"{name}.weight"] = quantization.dense_weight(module)
        elif not list(module.children()) and "lora_" not in name:
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    dense.load_state_dict({k.replace(".base_layer", ""): v for k, v in state.items()})
    restored = PeftModel.from_pretrained(dense, second.export_dir).eval()
    ids = torch.randint(3, 200, (1, 12))
    trained.eval()
    with torch.no_grad():
        # The tolerance rule: eager = the trained 4-bit model, truth = its float64 twin (the same
        # 4-bit values, dense).
        want, truth = trained(input_ids=ids).logits, float64_twin(trained)(input_ids=ids).logits
        assert_within_eager("restored logits", restored(input_ids=ids).logits, want, truth, torch.float32)
        merged = AutoModelForCausalLM.from_pretrained(second.merged_dir)
        assert next(merged.parameters()).dtype == torch.bfloat16
        assert "quantization_config" not in json.loads((pathlib.Path(second.merged_dir) / "config.json").read_text())
        got = merged.float()(input_ids=ids).logits
        # bf16 weights: judged against the unmerged model run in bf16 (eager in that dtype)
        bf16 = restored.to(torch.bfloat16)(input_ids=ids).logits
    assert_within_eager("merged logits", got, bf16, truth, torch.bfloat16)


def test_8bit_optimizer_states_resume_like_adamw(tmp_path):
    """Full fine-tuning with bitsandbytes' AdamW8bit (the embedding is large enough to get 8-bit
    states): 2 + 2 resumed steps == 4 steps, and the state is uint8."""
    data = small_squad(tmp_path / "data")
    common = dict(model={"config": {"model_type": "llama", **SMALL}, "patch": False}, optim={"name": "adamw_8bit"},
                  data={"max_seq_len": 128, "batch_size": 2, "source": data, "eval_source": data})
    full = finetune(tiny(tmp_path / "full", train={"max_steps": 4}, **common))
    run = tmp_path / "resumed"
    first = finetune(tiny(run, train={"max_steps": 4, "run_steps": 2}, checkpoint={"every": 2}, **common))
    second = finetune(tiny(run, train={"max_steps": 4}, checkpoint={"resume": True}, **common))
    torch.testing.assert_close(torch.tensor(first.losses + second.losses), torch.tensor(full.losses), rtol=0, atol=0)
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(run / "checkpoints" / "step_00000002")).read_metadata()
    dtypes = {getattr(m, "properties", None) and m.properties.dtype for k, m in metadata.state_dict_metadata.items()
              if k.startswith("optim.state.") and k.endswith(".state1")}
    assert torch.uint8 in dtypes, dtypes


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="2-process FSDP2 comparison runs on CPUs (gloo)")
def test_qlora_fsdp2_two_processes_match_one_process(tmp_path):
    """The trainer's QLoRA under FSDP2 with the rank-0 load (the default): the same losses as one
    process. (The default suite checks the same on the model level with 2 processes, adapter
    gradients included: tests/_qlora_fsdp_worker.py.)"""
    from helpers.torchrun import torchrun

    common = dict(train={"global_batch_rows": 4, "max_steps": 3}, model={"patch_options": {"rms_norm": False}})
    single = finetune(qlora(tmp_path / "one", **common))
    sharded = torchrun(tmp_path, qlora(tmp_path / "two", checkpoint={"export": True, "export_merged": True}, **common))
    truth = finetune(qlora(tmp_path / "truth", patch=False, dtype="float64", **common))
    assert_curves_within_eager("losses", sharded["losses"], single.losses, truth.losses, FACTOR)
    assert (pathlib.Path(sharded["export"]) / "adapter_model.safetensors").is_file()
    assert (tmp_path / "two" / "merged" / "model.safetensors").is_file()  # gathered from the shards


def test_config_errors_name_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match="lora.enabled=true"):
        load_config({"model": {"quantization": "nf4"}})
    with pytest.raises(ConfigError, match="model.quantization"):
        load_config({"model": {"quantization": "int4"}, "lora": {"enabled": True}})
    with pytest.raises(ConfigError, match="export_merged"):
        load_config({"checkpoint": {"export_merged": True}})
    import builtins

    real = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ConfigError, match=r'pip install "fastft\[qlora\]"'):
        load_config({"model": {"quantization": "nf4"}, "lora": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"optim.name=adamw_8bit.*fastft\[qlora\]"):
        load_config({"optim": {"name": "adamw_8bit"}})
