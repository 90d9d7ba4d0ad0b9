"""Runs of the trainer in two processes (torchrun, gloo, CPU) and their comparison with one process."""

import json
import os
import subprocess
import sys

from fastft.train import finetune
from helpers.recipes import ROOT, tiny
from numerics import assert_curves_within_eager

WORKER = """
import json, sys
from fastft.train import finetune
recipe = json.loads(sys.argv[1])
result = finetune(recipe)
import torch.distributed as dist
if int(__import__("os").environ["RANK"]) == 0:
    json.dump({"losses": result.losses, "plan": result.plan, "status": result.status,
               "eval": result.eval_after, "export": result.export_dir}, open(sys.argv[2], "w"))
"""


def float64_run(tmp_path, **sections):
    """The truth for a training-curve comparison (tests/numerics.py): the one-process run of the
    same recipe with float64 weights (its losses and its final val_loss)."""
    model = {**sections.get("model", {}), "dtype": "float64"}
    recipe = tiny(tmp_path / "float64", **{**sections, "model": model})
    recipe["train"]["eval_generate"] = 0  # only the losses are needed
    return finetune(recipe)


def assert_run_within_eager(sharded: dict, single, truth) -> None:
    """The sharded run's loss curve and final val_loss within FACTOR x the one-process run's error
    against the float64 run (tests/numerics.py)."""
    assert_curves_within_eager("losses", sharded["losses"], single.losses, truth.losses)
    assert_curves_within_eager("val_loss", [sharded["eval"]["val_loss"]], [single.eval_after["val_loss"]],
                               [truth.eval_after["val_loss"]])


def torchrun(tmp_path, recipe, nproc=2, timeout=240):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out_file = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), json.dumps(recipe), str(out_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return json.loads(out_file.read_text())
