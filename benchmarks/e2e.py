"""End-to-end training throughput per architecture: HF eager (SDPA, padded) vs HF + Liger vs fastft.

    python -m benchmarks.e2e [--smoke] [--models Llama-3.2-1B,Llama-3.1-8B] [--modes full,lora]
                             [--part 1/3] [--max-context] [--out DIR]

Each (model, mode, provider) builds a random-init model from the real shapes in
benchmarks/e2e_configs.py (bf16 on the GPU), trains `--warmup` then `--steps` optimizer steps on
the same synthetic documents (SQuAD-like: a 150-700-token prompt without loss, a 3-40-token
answer with loss), and records real tokens per second (padding excluded), MFU (fastft/flops.py's
convention; LoRA rows give both conventions), step time p50/p90 and peak memory.
Providers, on the same documents:
  hf       what a plain HF Trainer user gets: SDPA attention, one document per row, padded
  hf-kernels  the same with transformers' hub kernels in training mode (what `from_pretrained`
           gives by default since 5.25: Liger's RMSNorm, rotary, ... from kernels-community); the
           row's `hub_kernels` says which layers ran one (none: the hub was unreachable and not
           cached, as on a machine without network: that row then measures plain hf)
  liger    HF + Liger-Kernel applied to the instance, on the packed rows (when installed)
  trl      what a TRL SFTTrainer user gets with packing on (TRL 1.16): TRL's best-fit-decreasing
           packing and padding-free collator (one flat row with position_ids and cu_seq_lens), SDPA,
           and the loss from TRL's chunked log-prob LM head (add_fused_lm_head, fused_lm_head=True)
  fastft   fastft.patch'ed model on the packed rows (varlen attention, fused kernels)
Full fine-tuning trains every parameter with fused AdamW; LoRA is PEFT r=16 on all linear layers
(and, for MoE rows, on both expert stacks through PEFT's target_parameters);
QLoRA (`--modes qlora`, needs bitsandbytes) is the same LoRA over an NF4 base (double quantization,
bf16 compute) for every provider: the same bf16 model, its linear layers 4-bit and frozen. Not
prepare_model_for_kbit_training's fp32 upcast for the hf row: this harness runs no autocast, so
the upcast would put HF's whole residual stream, attention and LoRA in fp32, which is not what
`Trainer(bf16=True)` runs; no activation checkpointing for any provider.
`--max-context` finds, per provider, the longest single document that one LoRA step of
Llama-3.1-8B fits in GPU memory. `--smoke` runs every model's architecture at a tiny size for one
step on any device (the test suite runs it); its timings mean nothing.

Isolation: Liger's `_apply_liger_kernel_to_instance` also rebinds transformers' module-level names
(the model's RMSNorm and MLP classes, `apply_rotary_pos_emb`, the causal-LM forward), so every
model built after a Liger row in the same process would be partly Liger's. By default
(`--isolation process`) each (model, mode, provider) therefore runs in a fresh Python process;
`--isolation none` runs them in this one (the test suite's CPU smoke run of hf and fastft rows,
which patch per instance). Either way each row records what its model actually ran
(`census`: every module class, per-instance forwards, and the modeling module's names bound to
another package) and `foreign`: the providers other than its own whose code that census shows.
`--inspect` builds each provider's model and records its census without training.
"""

from __future__ import annotations

import gc
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import harness
from benchmarks.e2e_configs import BY_NAME, MODELS
from fastft.flops import mfu, training_flops

PROVIDERS = ("hf", "hf-kernels", "liger", "trl", "fastft")
# the packages whose code marks a model as (partly) a provider's
PROVIDER_PACKAGES = {"liger": "liger_kernel", "trl": "trl", "fastft": "fastft"}


def parse(argv):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(harness.RESULTS_DIR))
    parser.add_argument("--models", default="", help="comma-separated names from benchmarks/e2e_configs.py")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--seq", type=int, default=4096, help="tokens per packed row")
    parser.add_argument("--rows", type=int, default=1, help="packed rows per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--part", default="1/1", help="k/n: run the k-th of n slices of the model list")
    parser.add_argument("--max-context", action="store_true")
    parser.add_argument("--isolation", choices=("process", "none"), default="process",
                        help="process: each (model, mode, provider) in a fresh Python process (default)")
    parser.add_argument("--inspect", action="store_true", help="build each model and record its census; no training")
    parser.add_argument("--isolated-child", action="store_true", help=argparse.SUPPRESS)  # run_isolated's processes
    args = parser.parse_args(argv)
    if args.isolated_child:
        args.isolation = "process (own)"
    names = [n for n in args.models.split(",") if n] or [m.name for m in MODELS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(BY_NAME)}")
    k, n = (int(x) for x in args.part.split("/"))
    args.models = names[k - 1::n]
    args.modes = [m for m in args.modes.split(",") if m]
    args.providers = [p for p in args.providers.split(",") if p]
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.seq, args.steps, args.warmup = 96, 1, 0
    return args


def documents(seq: int, rows: int, vocab: int, seed: int = 0) -> list[dict]:
    """SQuAD-like examples filling about rows x seq tokens: prompt without loss, answer with loss."""
    gen = torch.Generator().manual_seed(seed)
    small = seq < 1024
    docs, total = [], 0
    while total < rows * seq:
        prompt = int(torch.randint(20, 60, (1,), generator=gen)) if small else int(
            torch.randint(150, 700, (1,), generator=gen))
        answer = int(torch.randint(3, 40, (1,), generator=gen))
        n = min(prompt + answer, seq)
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        labels = [-100] * (n - answer) + ids[n - answer:]
        docs.append({"input_ids": ids, "labels": labels})
        total += n
    return docs


def batches(docs: list[dict], provider: str, seq: int, rows: int) -> list[dict]:
    """The packed micro-batches; for "hf" (and "hf-kernels") the same documents of each step, padded
    one per row."""
    from fastft.data import PackedBatches, collate_padded

    if provider == "trl":
        return trl_batches(docs, seq, rows)
    packer = PackedBatches(docs, pad_id=0, max_seq_len=seq, mode="packed", batch_size=rows, shuffle=False)
    if provider not in ("hf", "hf-kernels"):
        return list(packer)
    return [collate_padded([docs[i] for row in step for i in row], pad_id=0) for step in packer.plan()]


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _package(obj, default: str) -> str:
    """The top-level package of obj's code; `default`'s where obj names none (dynamo's resume
    functions, put in a modeling module's namespace by any earlier compile in the process, have
    __module__ None)."""
    return (getattr(obj, "__module__", None) or default).split(".")[0]


def census(model) -> dict:
    """What a built model runs: the classes of its modules, the forwards set on single instances
    (fastft's patching), and the names in its modeling modules that are bound to code of another
    package (Liger rebinds classes, functions and class forwards there)."""
    classes = sorted({_qualname(type(m)) for m in model.modules()})
    instance_forwards = sorted({_qualname(m.__dict__["forward"]) for m in model.modules() if "forward" in m.__dict__})
    rebound = {}
    for module_name in sorted({type(m).__module__ for m in model.modules()}):
        module = sys.modules.get(module_name)
        if module is None or not module_name.startswith("transformers."):
            continue
        for name, value in vars(module).items():
            if callable(value) and _package(value, module_name) in PROVIDER_PACKAGES.values():
                rebound[f"{module_name}.{name}"] = _qualname(value)
            if isinstance(value, type) and value.__module__ == module_name:
                forward = value.__dict__.get("forward")
                if forward is not None and _package(forward, module_name) in PROVIDER_PACKAGES.values():
                    rebound[f"{module_name}.{name}.forward"] = _qualname(forward)
    return {"classes": classes, "instance_forwards": instance_forwards, "rebound": rebound}


def providers_in(found: dict) -> set[str]:
    """The providers whose packages' code appears in a census."""
    names = [*found["classes"], *found["instance_forwards"], *found["rebound"].values()]
    return {provider for provider, package in PROVIDER_PACKAGES.items()
            if any(n == package or n.startswith(package + ".") for n in names)}


def trl_batches(docs: list[dict], seq: int, rows: int) -> list[dict]:
    """TRL's own data path on the same documents: pack_dataset(..., "bfd") into sequences of `seq`
    tokens, `rows` of them per step through SFTTrainer's padding-free collator; each forward asks
    for TRL's fused LM head (the flag rides in the batch, model_inputs passes it on)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    packed = pack_dataset(Dataset.from_list([{"input_ids": d["input_ids"], "labels": d["labels"]} for d in docs]),
                          seq, "bfd")
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    out = []
    for start in range(0, len(packed), rows):
        batch = collate([packed[i] for i in range(start, min(start + rows, len(packed)))])
        batch.pop("seq_idx", None)  # for linear-attention layers only
        batch["num_target_tokens"] = (batch["labels"][:, 1:] != -100).sum()
        batch["fused_lm_head"] = True
        out.append(batch)
    return out


def build(spec, mode: str, provider: str, device: str, smoke: bool):
    from transformers import AutoModelForCausalLM

    import fastft

    if smoke:
        from fastft.architectures import NATIVE

        arch = next(a for a in NATIVE if a.model_type == spec.model_type)
        config = arch.tiny_config()
        dtype = torch.float32
    else:
        config = spec.config(mode)
        dtype = torch.bfloat16
    with torch.device(device):
        try:  # what a plain HF user gets: SDPA where the architecture supports it, else its default
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        except ValueError:  # e.g. Gemma 2 (soft-capped attention scores)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    model.config.use_cache = False
    if mode == "qlora":
        _qlora_base(model)
    if mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        experts = dict(target_parameters=["experts.gate_up_proj", "experts.down_proj"]) if spec.lora_experts else {}
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                                 **experts))
    if provider == "trl":  # as SFTTrainer does: on the model inside the PEFT wrapper
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model() if mode == "lora" else model,
                          outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer asks for
    if provider == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model.get_base_model() if mode != "full" else model)
    elif provider == "fastft":
        fastft.patch(model)
    elif provider == "hf-kernels":
        model.bench_hub_kernels = hub_kernels(model.get_base_model() if mode != "full" else model)
    model.train()
    return model


def hub_kernels(model) -> dict:
    """Kernelize as transformers' from_pretrained does by default, in training mode; returns what
    loaded: {"status": "on" or why not, "layers": {hub repository: layers running it}}."""
    from collections import Counter

    from kernels import Mode

    from fastft.patching import hub_kernels as hub

    try:
        model.set_use_kernels(True, mode=Mode.TRAINING)
        status = "on"
    except Exception as exc:  # no network on the device and nothing cached: the row is plain hf
        status = f"off: {type(exc).__name__}: {exc}"[:300]
    used = Counter(e.replacement for e in hub.entries(model) if e.replacement.startswith("hub "))
    return {"status": status, "layers": dict(used)}


def _qlora_base(model) -> None:
    """Every linear layer but the head in NF4 through bitsandbytes, frozen (as from_pretrained with
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=bf16) holds it)."""
    from fastft import quantization

    quantization.quantize_model(model, quantization.Settings("nf4", True, next(model.parameters()).dtype))


def train_steps(model, step_batches: list[dict], warmup: int, steps: int, device: str) -> list[float]:
    from fastft.data import model_inputs
    from fastft.patching.moe import set_real_tokens

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    times = []
    for i in range(warmup + steps):
        batch = step_batches[i % len(step_batches)]
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        total = batch.pop("num_target_tokens")
        set_real_tokens(model, batch.get("real_tokens"))  # MoE under fastft: packed row tails skip the experts
        loss = model(**model_inputs(batch), num_items_in_batch=total).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss {loss.item()} at step {i}")
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_one(rec, spec, mode, provider, args, docs):
    shape = {"seq": args.seq, "rows": args.rows, "layers": spec.layers_note(mode)}
    base = dict(op="e2e", model=spec.name, provider=provider, mode=mode, shape=shape,
                dtype="float32" if args.smoke else "bfloat16")
    model = None
    try:
        _free()
        model = build(spec, mode, provider, args.device, args.smoke)
        found = census(model)
        base.update(census=found, foreign=sorted(providers_in(found) - {provider}), isolation=args.isolation)
        if hasattr(model, "bench_hub_kernels"):
            base.update(hub_kernels=model.bench_hub_kernels)
        if args.inspect:
            return rec.add(**base)
        if args.device == "cuda":  # the peak of training with the model in memory (QLoRA builds in bf16 first)
            torch.cuda.reset_peak_memory_stats()
        step_batches = batches(docs, provider, args.seq, args.rows)
        times = train_steps(model, step_batches, args.warmup, args.steps, args.device)
        attention = getattr(model.config, "_attn_implementation", None)
        # FLOPs of an average step: all documents' work divided by the number of steps they fill.
        n_steps = len(step_batches)
        flops = {k: v / n_steps for k, v in
                 training_flops(model, [len(d["input_ids"]) for d in docs]).items()}
    except Exception as exc:  # OOM or a provider that cannot run this model: recorded, not fatal
        oom = isinstance(exc, torch.cuda.OutOfMemoryError)
        return rec.add(**base, error=("OOM: " if oom else "") + f"{type(exc).__name__}: {exc}"[:400])
    finally:
        del model
    real_tokens = sum(len(d["input_ids"]) for d in docs) / n_steps
    p50 = statistics.median(times)
    p90 = sorted(times)[min(len(times) - 1, int(0.9 * len(times)))]
    row = rec.add(
        **base, attention=attention, ms=round(p50 * 1e3, 2), p90_ms=round(p90 * 1e3, 2), tokens_per_s=round(real_tokens / p50),
        slots_per_step=sum(b["input_ids"].numel() for b in step_batches) / n_steps,
        real_tokens_per_step=round(real_tokens),
        mfu=_round(mfu(flops["flops"], p50)), mfu_6n=_round(mfu(flops["flops_6n"], p50)),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None,
    )
    return row


def _round(x):
    return None if x is None else round(x, 4)


def max_context(rec, args):
    """Longest single document one LoRA step of Llama-3.1-8B fits, per provider (doubling search)."""
    spec = BY_NAME["Llama-3.1-8B"]
    for provider in args.providers:
        if provider == "liger" and not harness.liger_available():
            continue
        best, seq = None, 4096
        while seq <= 262144:
            docs = [{"input_ids": torch.randint(3, 1000, (seq,)).tolist(), "labels": torch.randint(3, 1000, (seq,)).tolist()}]
            try:
                _free()
                model = build(spec, "lora", provider, args.device, False)
                train_steps(model, batches(docs, provider, seq, 1), 0, 1, args.device)
                best = seq
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                model = None
            seq *= 2
        rec.add(op="e2e_max_context", model=spec.name, provider=provider, mode="lora", shape={"r": 16},
                dtype="bfloat16", max_seq=best)


def _child_argv(args, models: str, modes: str, provider: str, max_context: bool = False) -> list[str]:
    argv = ["--isolated-child", "--out", str(args.out), "--models", models, "--modes", modes, "--providers", provider,
            "--seq", str(args.seq), "--rows", str(args.rows), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    return argv + ["--smoke"] * args.smoke + ["--inspect"] * args.inspect + ["--max-context"] * max_context


def run_isolated(args) -> list[dict]:
    """Each (model, mode, provider) in a fresh Python process (see the module docstring); the rows
    they append to OUT/e2e*.jsonl are returned. A process that dies is recorded as an error row."""
    rec = harness.Recorder("e2e", args)
    jobs = []  # (model, mode, provider, child argv)
    if args.max_context and args.device == "cuda":
        jobs += [("Llama-3.1-8B", "lora", p, _child_argv(args, "", "", p, max_context=True)) for p in args.providers]
    jobs += [(name, mode, provider, _child_argv(args, name, mode, provider))
             for name in args.models for mode in args.modes for provider in args.providers]
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = rec.path.read_text().splitlines() if rec.path.is_file() else []
    for name, mode, provider, argv in jobs:
        if provider == "liger" and not (harness.liger_available() or (args.inspect and harness.liger_importable())):
            continue
        proc = subprocess.run([sys.executable, "-m", "benchmarks.e2e", *argv], cwd=root, env=env)
        if proc.returncode != 0:
            rec.add(op="e2e", model=name, provider=provider, mode=mode, isolation="process (own)",
                    error=f"the benchmark process exited with {proc.returncode}")
    if rec.rows:
        rec.save()
    lines = rec.path.read_text().splitlines() if rec.path.is_file() else []
    return [json.loads(line) for line in lines[len(before):] if line.strip()]


def main(argv=None):
    args = parse(argv)
    if args.isolation == "process" and not args.isolated_child:
        rows = run_isolated(args)
        print(f"{len(rows)} rows, each (model, mode, provider) in its own process")
        return rows
    rec = harness.Recorder("e2e", args)
    if args.max_context and args.device == "cuda":
        max_context(rec, args)
    for name in args.models:
        spec = BY_NAME[name]
        vocab = 128 if args.smoke else spec.shape["vocab_size"]
        docs = documents(args.seq, args.rows * (args.warmup + args.steps if args.smoke else 4), vocab)
        for mode in args.modes:
            for provider in args.providers:
                if provider == "liger" and not (harness.liger_available() or
                                                (args.inspect and harness.liger_importable())):
                    continue
                run_one(rec, spec, mode, provider, args, docs)
    print(f"wrote {rec.save()}")
    return rec.rows


if __name__ == "__main__":
    main(sys.argv[1:])
