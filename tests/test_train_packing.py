"""The trainer and packing: which attention path its configurations take, and the models it must
not pack.

With the CPU reference varlen backend registered (tests/varlen_reference.py: flash-attn's rules,
16-bit inputs), each of the trainer's GPU configurations takes the varlen path in every layer,
as the path counters it logs after step 1 (metrics.jsonl, kind "attention") show: fp32 master
weights under bf16 autocast (single-GPU full fine-tuning), bf16 weights, LoRA (bf16 frozen base)
and FSDP2 with bf16 parameters, on 1 and on 2 gloo processes. Only attention is patched here
(the fused norms and loss have their own trainer tests) and the data is a small SFT file, so a
run costs about a second.

A model the packed probe finds unsafe to pack (a remote-code look-alike whose attention ignores
packing) is trained on padded batches, and the start-up log says so; data.batching='flat'
(padding-free rows, explicitly asked for) is refused with a ConfigError naming the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import varlen_reference
from fastft import attention
from fastft.config import ConfigError
from fastft.train import finetune
from remote_like import RemoteLikeConfig, RemoteLikeForCausalLM
from helpers.recipes import ROOT, tiny

# The path the counters must show: the reference backend on a CPU, a GPU's own varlen kernel there.
VARLEN = "varlen/reference" if not torch.cuda.is_available() else next(
    (f"varlen/{b.name}" for b in attention.varlen_backends() if "cuda" in b.devices), "varlen (no CUDA backend)")
ONLY_ATTENTION = {"rms_norm": False, "layer_norm": False, "cross_entropy": False, "lora": False}
CONFIGURATIONS = {
    "fp32 masters + bf16 autocast": dict(train={"precision": "bf16"}),
    "bf16 weights": dict(train={"precision": "bf16"}, model={"dtype": "bfloat16"}),
    "LoRA": dict(train={"precision": "bf16"}, lora={"enabled": True, "r": 4, "alpha": 8}),
    "FSDP2 (1 process)": dict(train={"precision": "bf16"}, distributed={"fsdp": True}),
}


def sft_file(path):
    rows = [{"prompt": f"question {i}: what is {i} plus {i}?", "response": f"it is {2 * i}. " * (1 + i % 4)}
            for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe(tmp_path, name, **sections):
    data = {"source": sft_file(tmp_path / "sft.jsonl"), "format": "sft", "max_seq_len": 64, "batch_size": 2}
    r = tiny(tmp_path / name, data=data, optim={"warmup_steps": 0}, train={"max_steps": 1, "eval_batches": 0},
             model={"patch": True, "patch_options": dict(ONLY_ATTENTION)})
    for section, values in sections.items():
        r.setdefault(section, {}).update(values)
    return r


def attention_record(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    found = [r for r in records if r["kind"] == "attention"]
    assert len(found) == 1, records
    return found[0]


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_trainer_configurations_take_the_varlen_path(tmp_path, name):
    with varlen_reference.registered():
        result = finetune(recipe(tmp_path, "run", **CONFIGURATIONS[name]))
    record = attention_record(tmp_path / "run")
    assert record["step"] == 1 and record["layers"] == 2 and sum(record["paths"].values()) == 2, record
    assert set(record["paths"]) == {VARLEN}, record
    assert result.model.fastft_report.packing_safe


WORKER = """
import json, os, sys
sys.path.insert(0, {tests!r})
import varlen_reference
from fastft.train import finetune
with varlen_reference.registered():
    finetune(json.loads(sys.argv[1]))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a 2-process gloo run on CPUs")
def test_fsdp2_two_processes_take_the_varlen_path(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests")))
    r = recipe(tmp_path, "run", train={"precision": "bf16"})
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           json.dumps(r)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    record = attention_record(tmp_path / "run")
    assert record["paths"] == {"varlen/reference": 2} and record["layers"] == 2, record


def _register_remote_like():
    try:
        AutoConfig.register(RemoteLikeConfig.model_type, RemoteLikeConfig)
        AutoModelForCausalLM.register(RemoteLikeConfig, RemoteLikeForCausalLM)
    except ValueError:  # registered by an earlier test
        pass


def test_a_packing_unsafe_model_is_trained_padded(tmp_path, capsys):
    _register_remote_like()
    r = recipe(tmp_path, "run", model={"config": {"model_type": RemoteLikeConfig.model_type}, "patch_options": {}},
               logging={"quiet": False})
    result = finetune(r)
    report = result.model.fastft_report
    assert report.packing.startswith("unsafe: ") and "kept" in str(report), str(report)
    out = capsys.readouterr().out
    assert "packing off, padded batches instead: this model is not safe to pack (unsafe: " in out, out
    assert "data: padded: " in out and "padded rows per micro-batch" in out, out
    assert result.status == "finished"


def test_packing_is_refused_with_flat_batching(tmp_path):
    _register_remote_like()
    r = recipe(tmp_path, "run", model={"config": {"model_type": RemoteLikeConfig.model_type}, "patch": False},
               data={"batching": "flat", "token_budget": 128})
    with pytest.raises(ConfigError, match="not safe to pack .*--data.batching=padded"):
        finetune(r)
