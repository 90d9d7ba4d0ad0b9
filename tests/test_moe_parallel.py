"""MoE under torch.distributed on CPU processes (gloo): expert parallelism (all-to-all dispatch and
combine) and FSDP2 (experts sharded with their block, or the split experts over the ranks that hold
the same ones) give the one-process loss and gradients; tests/_moe_parallel_worker.py does the work.
2 processes in the default suite (EP=2; and FSDP2 without EP, with LoRA on the experts); 4
processes (EP=4, and EP=2 x 2 replicas) are slow."""

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
def test_expert_parallel_two_processes_match_one():
    assert "MOE PARALLEL OK world=2 ep=2 lora=False" in _run(2, "2")


@needs_dist
def test_fsdp2_experts_with_their_block_and_lora_two_processes():
    assert "MOE PARALLEL OK world=2 ep=1 lora=True" in _run(2, "1", "lora")


@needs_dist
@pytest.mark.slow
@pytest.mark.parametrize("ep,lora", [("4", ""), ("2", "lora"), ("4", "lora")])
def test_expert_parallel_four_processes_match_one(ep, lora):
    assert f"MOE PARALLEL OK world=4 ep={ep} lora={bool(lora)}" in _run(4, ep, *([lora] if lora else []))
