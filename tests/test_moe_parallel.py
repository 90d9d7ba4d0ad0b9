"""MoE under torch.distributed on CPU processes (gloo): expert parallelism (all-to-all dispatch and
combine) and FSDP2 (experts sharded with their block, or the split experts over the ranks that hold
the same ones) give the one-process loss and gradients; tests/_moe_parallel_worker.py does the work.
One 2-process run in the default suite (EP=2 with LoRA on the experts, all three runs of the
worker); 2 processes without LoRA and 4 processes (EP=4, and EP=2 x 2 replicas) are slow."""

import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(processes: int, *args: str) -> str:
    torchrun = shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        f"--nproc_per_node={processes}", f"--master_port={_free_port()}", str(HERE / "_moe_parallel_worker.py"), *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=HERE)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout


needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


@needs_dist
def test_expert_parallel_and_fsdp2_two_processes_match_one():
    assert "MOE PARALLEL OK world=2 ep=2 lora=True" in _run(2, "2", "lora")


@needs_dist
@pytest.mark.slow
@pytest.mark.parametrize("processes,ep,lora", [(2, "2", ""), (4, "4", ""), (4, "2", "lora"), (4, "4", "lora")])
def test_expert_parallel_more_processes_match_one(processes, ep, lora):
    out = _run(processes, ep, *([lora] if lora else []))
    assert f"MOE PARALLEL OK world={processes} ep={ep} lora={bool(lora)}" in out


# -- the trainer -----------------------------------------------------------------------------------
TINY_MOE = dict(model_type="qwen3_moe", hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_experts=4,
                num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.01,
                max_position_embeddings=256, tie_word_embeddings=False)


def _moe_recipe(run_dir, **sections):
    from helpers.recipes import tiny

    train = {"max_steps": 3, **sections.pop("train", {})}
    recipe = tiny(run_dir, model={"config": dict(TINY_MOE), "patch": True,
                                  "patch_options": {"rms_norm": False, "cross_entropy": False}},
                  train=train, **sections)
    return recipe


def test_trainer_runs_a_packed_moe_model_through_the_fused_experts(tmp_path, monkeypatch):
    """One process, packed batches (whose row tails the experts skip), the aux loss in the loss."""
    from fastft.patching import moe as moe_patch
    from fastft.train import finetune

    seen = []
    original = moe_patch.set_real_tokens
    monkeypatch.setattr("fastft.train.set_real_tokens", lambda m, mask: seen.append(mask) or original(m, mask))
    result = finetune(_moe_recipe(tmp_path, train={"max_steps": 2, "eval_batches": 1}, data={"max_seq_len": 64}))
    assert result.status == "finished" and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.model.fastft_report.count("moe") == 2
    assert seen and all(mask is not None and mask.dtype == torch.bool for mask in seen)


@needs_dist
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU (gloo) comparison")
def test_trainer_expert_parallel_two_processes_match_one(tmp_path):
    from helpers.torchrun import assert_run_within_eager, float64_run, torchrun

    from fastft.train import finetune

    common = dict(train={"global_batch_rows": 4, "max_steps": 3, "eval_batches": 2},
                  data={"batch_size": 2, "max_seq_len": 128})
    single = finetune(_moe_recipe(tmp_path / "one", **common))
    sharded = torchrun(tmp_path, _moe_recipe(tmp_path / "two", distributed={"expert_parallel": 2, "load": "every_rank"},
                                             **common))
    truth = float64_run(tmp_path, model={"config": dict(TINY_MOE), "patch": False}, **common)  # unpatched, float64
    assert_run_within_eager(sharded, single, truth)


@pytest.mark.parametrize("fields,message", [
    ({"expert_parallel": 0}, "distributed.expert_parallel=0: input should be greater than 0"),
    ({"expert_parallel": 2}, "load=every_rank"),
    ({"expert_parallel": 2, "load": "every_rank", "fsdp": False}, "runs on FSDP2"),
])
def test_expert_parallel_config_errors_name_the_fix(tmp_path, fields, message):
    from fastft.config import ConfigError, from_dict, validate

    from helpers.recipes import tiny

    recipe = tiny(tmp_path, distributed=fields)
    with pytest.raises(ConfigError, match=message):
        validate(from_dict(recipe))
    recipe = tiny(tmp_path, distributed={"expert_parallel": 2, "load": "every_rank"}, checkpoint={"every": 5})
    with pytest.raises(ConfigError, match="checkpoint.every=0"):
        validate(from_dict(recipe))
