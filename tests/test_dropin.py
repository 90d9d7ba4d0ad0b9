"""A patched model is a plain nn.Module: it trains in HF Trainer and TRL's SFTTrainer, and saves
as a plain Hugging Face checkpoint."""

from __future__ import annotations

import copy
import json
import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

import fastft
from fastft.architectures import NATIVE

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
    patched = copy.deepcopy(base)
    report = fastft.patch(patched)
    assert report.count("cross_entropy") == 1
    plain = _train(base, tmp_path, "plain")
    fast = _train(patched, tmp_path, "fast")
    assert len(plain) == len(fast) == 6
    assert fast[-1] < fast[0], f"loss did not fall: {fast}"
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=2e-4, atol=2e-4)


@pytest.mark.skipif(not GPT2_TOKENIZER.is_dir(), reason="shared assets (GPT-2 tokenizer) not present")
def test_trl_sft_trainer_trains_a_patched_model(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    tokenizer.pad_token = tokenizer.eos_token
    config = LLAMA.tiny_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, head_dim=8,
                               pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    data = Dataset.from_list([{"prompt": f"Question {i}: what is {i} plus one?", "completion": f" {i + 1}."}
                              for i in range(16)])

    def run(model, name):
        args = trl.SFTConfig(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             seed=0, data_seed=0, max_length=32, disable_tqdm=True)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    patched = copy.deepcopy(base)
    fastft.patch(patched)
    plain, fast = run(base, "plain"), run(patched, "fast")
    assert len(fast) == 4 and fast[-1] < fast[0]
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=2e-4, atol=2e-4)


def test_save_pretrained_round_trip_is_a_plain_hf_checkpoint(tmp_path):
    model = AutoModelForCausalLM.from_config(LLAMA.tiny_config()).eval()
    ids = torch.randint(3, 128, (1, 10))
    reference = model(input_ids=ids).logits
    fastft.patch(model)
    model.save_pretrained(tmp_path / "ckpt")
    for path in (tmp_path / "ckpt").iterdir():
        if path.suffix in (".json", ".txt", ".md"):
            assert "fastft" not in path.read_text().lower(), f"{path.name} mentions fastft"
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config.get("attn_implementation") in (None, "sdpa", "eager")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert not any("Fused" in type(m).__name__ for m in loaded.modules())
    torch.testing.assert_close(loaded(input_ids=ids).logits, reference)
    # and fastft.from_pretrained loads the same folder patched
    fast = fastft.from_pretrained(tmp_path / "ckpt", rms_norm=True, attention=False).eval()
    assert fast.fastft_report.count("rms_norm") == 5 and fast.config._attn_implementation != "fastft"
    torch.testing.assert_close(fast(input_ids=ids).logits, reference, rtol=1e-4, atol=1e-5)


def test_bad_options_and_nothing_to_patch():
    model = AutoModelForCausalLM.from_config(LLAMA.tiny_config())
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rmsnorm'\]"):
        fastft.patch(model, rmsnorm=False)
    with pytest.raises(ValueError, match="found nothing to patch"):
        fastft.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    report = fastft.patch(model, rms_norm=False, attention=False)
    assert report.count("rms_norm") == 0 and report.count("cross_entropy") == 1
    assert "rms_norm=False" in str(report)
