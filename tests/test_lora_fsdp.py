"""Fused LoRA under FSDP2: decoder blocks fully_shard'ed on 2 CPU processes (gloo); the fused
layers and MLP blocks run on the unsharded weights inside each block's forward and give PEFT's
loss and gradients (tests/_lora_fsdp_worker.py does the work); with bitsandbytes installed, the
same processes check QLoRA's rank-0 load and sharded 4-bit bases too (tests/_qlora_fsdp_worker.py)."""

import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_fused_lora_under_fsdp2_two_processes():
    here = pathlib.Path(__file__).resolve().parent
    torchrun = shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc_per_node=2", f"--master_port={_free_port()}", str(here / "_lora_fsdp_worker.py")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=here)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "FSDP2 OK" in out.stdout
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return
    assert "QLoRA FSDP2 OK" in out.stdout  # the 4-bit run (tests/_qlora_fsdp_worker.py)
