"""Offloaded activation checkpointing against plain checkpointing and torch's save_on_cpu.

    python -m benchmarks.offload [--smoke] [--seq 32768] [--layers 8] [--modes full,offload,save_on_cpu]
                                 [--tiled auto] [--out DIR]

A Llama-3.1-8B-shaped model (its width, `--layers` of its 32 layers, random bf16 weights), LoRA
r=16 on every linear layer, fastft-patched, one packed row of `--seq` tokens; per mode, the step
time (median of the timed steps) and torch.cuda.max_memory_allocated:
  full         activation checkpointing on every block (each block's input stays on the GPU)
  offload      fastft's: the inputs in pinned host memory, copies on a side stream, each brought
               back one block ahead of its recomputation (fastft/offload.py)
  save_on_cpu  the simple version: full checkpointing under torch.autograd.graph.save_on_cpu
               (pin_memory=True): the same bytes moved, on the compute stream
The claim to check: offload's step time within a few percent of full's (the copies hidden behind
the compute) and below save_on_cpu's, at full's peak less the blocks' inputs. With `--tiled
auto` (model.tiled_mlp) and all 32 layers at 131072 tokens it is issue 15's goal run: the
longest-row configuration fastft.planning plans (benchmarks/PLAN.md), measured.
`--smoke` runs a tiny model on any device for one step: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from benchmarks import harness
from benchmarks.e2e_configs import BY_NAME


def build(seq_layers: int, smoke: bool, device: str, tiled: str = "off"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import fastft

    if smoke:
        from fastft.architectures import NATIVE

        config, dtype = next(a for a in NATIVE if a.model_type == "llama").tiny_config(), torch.float32
    else:
        config, dtype = BY_NAME["Llama-3.1-8B"].config("lora"), torch.bfloat16
        config.num_hidden_layers = seq_layers
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    fastft.patch(model)
    from fastft.patching import tiled_mlp

    tiled_mlp.apply(model, tiled)
    return model.train()


def run(mode: str, args) -> dict:
    from fastft import distributed
    from fastft.data import collate_packed, model_inputs

    model = build(args.layers, args.smoke, args.device, args.tiled)
    distributed.apply_activation_checkpointing(model, "offload" if mode == "offload" else "full")
    vocab = model.config.vocab_size
    seq = 64 if args.smoke else args.seq
    doc = {"input_ids": torch.randint(3, vocab, (seq,)).tolist(), "labels": torch.randint(3, vocab, (seq,)).tolist()}
    batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in collate_packed([[doc]], pad_id=0).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=args.device == "cuda")
    around = (lambda: torch.autograd.graph.save_on_cpu(pin_memory=args.device == "cuda")) if mode == "save_on_cpu" \
        else contextlib.nullcontext
    times = []
    steps = 1 if args.smoke else args.warmup + args.steps
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with around():
            loss = model(**model_inputs(batch), num_items_in_batch=batch["num_target_tokens"]).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if args.smoke or i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    ordered = sorted(times)
    quantile = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 2)  # noqa: E731
    return {"ms": round(statistics.median(times) * 1e3, 2), "p20_ms": quantile(0.2), "p80_ms": quantile(0.8),
            "peak_gib": None if peak is None else round(peak, 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(harness.RESULTS_DIR))
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--modes", default="full,offload,save_on_cpu")
    parser.add_argument("--tiled", default="off", help="model.tiled_mlp: off, auto or tokens per chunk")
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rec = harness.Recorder("offload", args)
    for mode in args.modes.split(","):
        shape = {"seq": 64 if args.smoke else args.seq, "layers": args.layers, "model": "Llama-3.1-8B width",
                 "tiled_mlp": args.tiled}
        try:
            result = run(mode, args)
        except Exception as exc:  # an OOM or a failure is a row, not the end of the run
            rec.add(op="offload", provider=mode, mode="full", shape=shape, dtype="bfloat16",
                    error=f"{type(exc).__name__}: {exc}"[:300])
        else:
            rec.add(op="offload", provider=mode, mode="full", shape=shape, dtype="bfloat16", **result)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"wrote {rec.save()}")
    return rec.rows


if __name__ == "__main__":
    main(sys.argv[1:])
