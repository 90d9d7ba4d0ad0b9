"""Step time and per-step collectives of fastft's training loop under torchrun.

    python -m benchmarks.trainer_step [--nproc 2] [--steps 40] [--repo DIR] [--hidden 256]

Runs `fastft.finetune` on the built-in data with a random-init Llama (FSDP2 over `--nproc`
processes: gloo on CPUs, nccl on GPUs), counts the `torch.distributed.all_reduce` calls and the
host syncs (`Tensor.item` / `tolist` called from fastft's own code: torch's non-fused AdamW reads
each parameter's step counter, a CPU tensor, with `item`) made inside each training step, and prints the median and
p20/p80 of the step time (the loop's own `step_s`, steps after the first 5). `--repo` times
another checkout (e.g. the commit before a loop change) with the same settings; its loop must
have the same metrics.jsonl. Timings on a shared machine are only comparable within one run of
this script: the two checkouts are run alternately, `--rounds` times each.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

WORKER = r'''
import json, os, sys, torch, torch.distributed as dist
counts = {"all_reduce": 0, "host_sync": 0}
original_all_reduce = dist.all_reduce
def all_reduce(*args, **kwargs):
    counts["all_reduce"] += 1
    return original_all_reduce(*args, **kwargs)
dist.all_reduce = all_reduce
for name in ("item", "tolist"):  # the loop's own reads (fastft's files), not torch's bookkeeping
    original = getattr(torch.Tensor, name)
    def counted(self, *args, _original=original, **kwargs):
        if "/fastft/" in sys._getframe(1).f_code.co_filename:
            counts["host_sync"] += 1
        return _original(self, *args, **kwargs)
    setattr(torch.Tensor, name, counted)
import fastft.train as train
per_step = []
if hasattr(train, "train_step"):  # the loop's one step is a function: count inside it
    original_step = train.train_step
    def train_step(*args, **kwargs):
        before = dict(counts)
        out = original_step(*args, **kwargs)
        per_step.append({k: counts[k] - before[k] for k in counts})
        return out
    train.train_step = train_step
recipe = json.loads(sys.argv[1])
train.finetune(recipe)
if int(os.environ.get("RANK", "0")) == 0:
    json.dump({"per_step": per_step, "whole_run": counts}, open(sys.argv[2], "w"))
'''


def recipe(args, run_dir: str) -> dict:
    return {
        "model": {"config": {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": 3 * args.hidden,
                             "num_hidden_layers": args.layers, "num_attention_heads": 4, "num_key_value_heads": 4},
                  "patch": False},
        "data": {"max_seq_len": 256, "batch_size": 4},
        "train": {"max_steps": args.steps, "global_batch_rows": 8 * args.nproc, "eval_every": 0, "eval_generate": 0,
                  "eval_batches": 1, "eval_before": False, "precision": "fp32"},
        "checkpoint": {"export": False},
        "logging": {"run_dir": run_dir, "quiet": True, "progress_bar": False, "tensorboard": False, "plot": False},
    }


def run(args, repo: pathlib.Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script = pathlib.Path(tmp) / "worker.py"
        script.write_text(WORKER)
        rec = recipe(args, str(pathlib.Path(tmp) / "run"))
        if "plot" not in (repo / "fastft" / "config.py").read_text():  # a checkout from before logging.plot
            rec["logging"].pop("plot")
        if "builtin_examples" in (repo / "fastft" / "data" / "recipe.py").read_text():
            rec["data"]["builtin_examples"] = 2000  # less to tokenize at start-up
        out = pathlib.Path(tmp) / "counts.json"
        env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS=str(args.threads))
        env.pop("TRITON_INTERPRET", None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               str(script), json.dumps(rec), str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp, timeout=1800)
        if proc.returncode:
            raise SystemExit(f"{repo}: torchrun failed\n{proc.stderr[-4000:]}")
        lines = [json.loads(line) for line in (pathlib.Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        times = [r["step_s"] for r in lines if r["kind"] == "train"][5:]
        return {"times": times, **json.loads(out.read_text())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repo", type=pathlib.Path, default=None, help="another checkout to time the same way")
    args = parser.parse_args(argv)
    repos = {"this checkout": ROOT, **({str(args.repo): args.repo} if args.repo is not None else {})}
    times: dict[str, list[float]] = {name: [] for name in repos}
    last: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, repo in repos.items():
            last[name] = run(args, repo)
            times[name] += last[name]["times"]
    for name, values in times.items():
        values = sorted(values)
        counts = last[name]
        print(f"{name}: step time median {1e3 * statistics.median(values):.1f} ms, p20 "
              f"{1e3 * values[len(values) // 5]:.1f} ms, p80 {1e3 * values[4 * len(values) // 5]:.1f} ms "
              f"({len(values)} steps, {args.nproc} processes, {args.threads} thread(s) each); whole run "
              f"({args.steps} steps, start-up and final evaluation included): {counts['whole_run']}")
        if counts["per_step"]:
            steady = counts["per_step"][1:]
            print(f"  per training step after the first: all_reduce calls {sorted({c['all_reduce'] for c in steady})}"
                  f", host syncs {sorted({c['host_sync'] for c in steady})}; first step {counts['per_step'][0]}")


if __name__ == "__main__":
    main()
