"""A patched model is a plain nn.Module: it trains in HF Trainer and TRL's SFTTrainer, and saves
as a plain Hugging Face checkpoint. Inside SFTTrainer (TRL 1.16), which fastft kernels run is
counted: the norms, the attention and the LoRA kernels do, with TRL's packing off and on; the
fused loss does not (TRL computes the loss with its own chunked log-prob head). README.md's
drop-in section says the same."""

from __future__ import annotations

import collections
import copy
import json
import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

import fastft
from fastft.architectures import NATIVE
from numerics import assert_curves_within_eager, assert_within_eager, float64_twin

LLAMA = next(a for a in NATIVE if a.name == "Llama")
GPT2_TOKENIZER = pathlib.Path(__file__).resolve().parents[2] / "shared" / "assets" / "tokenizers" / "gpt2"


def _dataset(n=16, seq=16):
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 64, (seq,), generator=g)
        labels = ids.clone()
        labels[:4] = -100
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(seq, dtype=torch.long)})
    return rows


def _train(model, tmp_path, name):
    args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), data_collator=default_data_collator)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_hf_trainer_losses_match_unpatched(tmp_path):
    base = AutoModelForCausalLM.from_config(LLAMA.tiny_config())
    patched, twin = copy.deepcopy(base), float64_twin(base)
    report = fastft.patch(patched)
    assert report.count("cross_entropy") == 1
    plain = _train(base, tmp_path, "plain")
    fast = _train(patched, tmp_path, "fast")
    truth = _train(twin, tmp_path, "float64")  # the tolerance rule's truth: the unpatched run in float64
    assert len(plain) == len(fast) == 6
    assert fast[-1] < fast[0], f"loss did not fall: {fast}"
    assert_curves_within_eager("losses", fast, plain, truth)


def count_fastft_kernels(monkeypatch) -> collections.Counter:
    """Counts, from now on, the calls of the fastft kernels a patched model can make: rms_norm (the
    norm modules), fused_linear_cross_entropy (the loss), the "fastft" attention function (and the
    calls that saw packed documents: cu_seq_lens or restarting position_ids), lora_linear/lora_mlp."""
    from transformers import AttentionInterface

    import fastft.patching.lora as lora
    import fastft.patching.loss as loss
    import fastft.patching.norms as norms

    counts: collections.Counter = collections.Counter()

    def counted(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    for module, name in ((norms, "rms_norm"), (loss, "fused_linear_cross_entropy"), (lora, "lora_linear"),
                         (lora, "lora_mlp")):
        counted(module, name)
    attention = AttentionInterface._global_mapping["fastft"]

    def counted_attention(module, query, key, value, attention_mask, **kwargs):
        counts["attention"] += 1
        positions = kwargs.get("position_ids")
        restarts = positions is not None and bool((positions[..., 1:] == 0).any())
        counts["attention_packed"] += kwargs.get("cu_seq_lens_q") is not None or restarts
        return attention(module, query, key, value, attention_mask, **kwargs)
    monkeypatch.setitem(AttentionInterface._global_mapping, "fastft", counted_attention)
    return counts


def _sft_run(trl, model, tokenizer, data, path, *, steps, packing):
    args = trl.SFTConfig(output_dir=str(path), max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-3,
                         logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, data_seed=0,
                         max_length=32, disable_tqdm=True, packing=packing)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture
def sft_setup():
    trl = pytest.importorskip("trl")
    if not GPT2_TOKENIZER.is_dir():
        pytest.skip("shared assets (GPT-2 tokenizer) not present")
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    tokenizer.pad_token = tokenizer.eos_token
    config = LLAMA.tiny_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, head_dim=8,
                               pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    data = Dataset.from_list([{"prompt": f"Question {i}: what is {i} plus one?", "completion": f" {i + 1}."}
                              for i in range(16)])
    return trl, tokenizer, config, data


def test_trl_sft_trainer_trains_a_patched_model(tmp_path, sft_setup, monkeypatch):
    """Padded batches (SFTTrainer's default): the same losses as unpatched; norms and attention run
    through fastft, the loss through TRL's head."""
    trl, tokenizer, config, data = sft_setup
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    patched, twin = copy.deepcopy(base), float64_twin(base)
    report = fastft.patch(patched)
    assert report.count("cross_entropy") == 1  # patched, and yet (below) never called by SFTTrainer
    plain = _sft_run(trl, base, tokenizer, data, tmp_path / "plain", steps=4, packing=False)
    truth = _sft_run(trl, twin, tokenizer, data, tmp_path / "float64", steps=4, packing=False)
    counts = count_fastft_kernels(monkeypatch)
    fast = _sft_run(trl, patched, tokenizer, data, tmp_path / "fast", steps=4, packing=False)
    assert len(fast) == 4 and fast[-1] < fast[0]
    assert_curves_within_eager("losses", fast, plain, truth)
    layers = config.num_hidden_layers
    assert counts["rms_norm"] >= 4 * (2 * layers + 1) and counts["attention"] >= 4 * layers, counts
    assert counts["attention_packed"] == 0 and counts["fused_linear_cross_entropy"] == 0, counts


def test_trl_packing_runs_fastft_attention_on_documents_and_lora_kernels(tmp_path, sft_setup, monkeypatch):
    """packing=True (TRL 1.16: best-fit-decreasing, padding-free rows with position_ids and cu_seq_lens)
    and a LoRA model patched by fastft: every attention call sees the packed documents, the LoRA
    layers run fastft's kernels, and still TRL's head computes the loss."""
    from peft import LoraConfig, get_peft_model

    trl, tokenizer, config, data = sft_setup
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    fastft.patch(model)
    counts = count_fastft_kernels(monkeypatch)
    losses = _sft_run(trl, model, tokenizer, data, tmp_path / "packed", steps=2, packing=True)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert counts["attention"] > 0 and counts["attention_packed"] == counts["attention"], counts
    assert counts["rms_norm"] > 0 and counts["lora_linear"] >= 2 * 2 * config.num_hidden_layers, counts
    assert counts["fused_linear_cross_entropy"] == 0, counts


def test_e2e_benchmark_trl_provider_smoke(tmp_path):
    """benchmarks/e2e.py's trl provider (TRL's packing, padding-free collator and chunked log-prob
    head) trains on the same documents as the others."""
    pytest.importorskip("trl")
    from benchmarks import e2e

    rows = e2e.main(["--smoke", "--out", str(tmp_path), "--modes", "full", "--models", "Llama-3.2-1B",
                     "--providers", "hf,trl", "--isolation", "none"])
    by = {r["provider"]: r for r in rows}
    assert not any(r.get("error") for r in rows), rows
    assert all(r["foreign"] == [] for r in rows)  # one process, each model its own provider's code only
    assert by["trl"]["real_tokens_per_step"] == by["hf"]["real_tokens_per_step"] > 0
    assert by["trl"]["slots_per_step"] == by["trl"]["real_tokens_per_step"]  # padding-free: no padding slots


def test_save_pretrained_round_trip_is_a_plain_hf_checkpoint(tmp_path):
    model = AutoModelForCausalLM.from_config(LLAMA.tiny_config()).eval()
    ids = torch.randint(3, 128, (1, 10))
    reference = model(input_ids=ids).logits
    truth = float64_twin(model)(input_ids=ids).logits
    fastft.patch(model)
    model.save_pretrained(tmp_path / "ckpt")
    for path in (tmp_path / "ckpt").iterdir():
        if path.suffix in (".json", ".txt", ".md"):
            assert "fastft" not in path.read_text().lower(), f"{path.name} mentions fastft"
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config.get("attn_implementation") in (None, "sdpa", "eager")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert not any("Fused" in type(m).__name__ for m in loaded.modules())
    # the same weights through the same transformers code: bit for bit
    torch.testing.assert_close(loaded(input_ids=ids).logits, reference, rtol=0, atol=0)
    # and fastft.from_pretrained loads the same folder patched
    fast = fastft.from_pretrained(tmp_path / "ckpt", rms_norm=True, attention=False).eval()
    assert fast.fastft_report.count("rms_norm") == 5 and fast.config._attn_implementation != "fastft"
    assert_within_eager("logits", fast(input_ids=ids).logits, reference, truth, torch.float32)


def test_bad_options_and_nothing_to_patch():
    model = AutoModelForCausalLM.from_config(LLAMA.tiny_config())
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rmsnorm'\]"):
        fastft.patch(model, rmsnorm=False)
    with pytest.raises(ValueError, match="found nothing to patch"):
        fastft.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    report = fastft.patch(model, rms_norm=False, attention=False)
    assert report.count("rms_norm") == 0 and report.count("cross_entropy") == 1
    assert "rms_norm=False" in str(report)
