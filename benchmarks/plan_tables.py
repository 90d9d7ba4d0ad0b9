"""Planned GPU memory (fastft.planning): issue 15's goals and the end-to-end models' table, fastft
against HF eager, made on a CPU. Every figure is a plan, a prediction until a GPU measures it
(benchmarks/gpu.sh records planned against torch.cuda.max_memory_allocated for the e2e rows:
benchmarks/plan_check.py).

    python -m benchmarks.plan_tables [--part goals,qlora,e2e,harness,checks,scaling] [--out benchmarks/PLAN.md]

Plans are cached in benchmarks/results/plans/cache.jsonl (one JSON line per plan, keyed by recipe,
provider, GPUs and row length, and the planner's PLAN_VERSION), so that a rerun plans only what
is new; --fresh ignores the cache. Model shapes are benchmarks/e2e_configs.py's (the published
config.json fields; no download).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import time

from benchmarks.e2e_configs import BY_NAME
from fastft import planning
from fastft.config import load_config

HERE = pathlib.Path(__file__).resolve().parent
CACHE = HERE / "results" / "plans" / "cache.jsonl"  # not results/*.jsonl: those are benchmark rows
H100 = planning.GPU_MEMORY["H100"]
GB24 = 24 * 10**9  # a 24 GB card (RTX 4090, L4, A10: 22.0-23.6 GiB as torch reports them): its nominal size
GiB = 2**30

# (provider, recipe overrides): how each column trains.
SETTINGS = {
    "HF eager": ("hf", {"distributed": {"activation_checkpointing": "none"}}),
    "HF eager + AC": ("hf", {"distributed": {"activation_checkpointing": "full"}}),
    "fastft": ("fastft", {"distributed": {"activation_checkpointing": "none"}}),
    "fastft + AC": ("fastft", {"distributed": {"activation_checkpointing": "full"}}),
    "fastft + tiled MLP": ("fastft", {"distributed": {"activation_checkpointing": "none"}, "model": {"tiled_mlp": 1024}}),
    "fastft long": ("fastft", {"distributed": {"activation_checkpointing": "offload"}, "model": {"tiled_mlp": "auto"}}),
}
E2E_MODELS = ["Llama-3.2-1B", "Llama-3.1-8B", "Qwen3-8B", "Gemma-3-1B", "Mistral-7B-v0.3"]
LENGTHS = [4096, 32768, 131072]


def recipe(model: str, mode: str, setting: str, *, rows: int = 1, tokens: int = 4096, harness: bool = False,
           layers: bool = False, optim: str = "adamw") -> tuple[dict, str]:
    """(the recipe tree, provider). mode: "full", "lora" or "qlora" (LoRA over an NF4 base with
    double quantization). harness: the e2e benchmark's own setup (bf16 weights and AdamW states, no
    checkpointing, its reduced depths); else the trainer's (fp32 master weights for full
    fine-tuning, bf16 autocast). optim: optim.name (adamw_8bit: bitsandbytes' 8-bit states)."""
    spec = BY_NAME[model]
    provider, extra = SETTINGS[setting]
    shape = {"model_type": spec.model_type, **spec.shape}
    depth = (spec.full_layers if mode == "full" else spec.lora_layers) if layers else None
    if depth:  # the harness's reduced depth for rows that would not fit one GPU whole
        shape["num_hidden_layers"] = depth
    tree = {"model": {"config": shape, **({"dtype": "bfloat16"} if harness else {}),
                      **({"quantization": "nf4"} if mode == "qlora" else {})},
            "lora": {"enabled": mode != "full", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "data": {"batching": "packed", "batch_size": rows, "max_seq_len": tokens},
            "train": {"precision": "bf16"}, **({"optim": {"name": optim}} if optim != "adamw" else {})}
    for section, values in extra.items():
        tree.setdefault(section, {}).update(values)
    return tree, provider


class Cache:
    def __init__(self, path: pathlib.Path, fresh: bool):
        """Rows of another PLAN_VERSION are dropped from the file: they can never be read again."""
        self.path, self.rows = path, {}
        if path.is_file() and not fresh:
            lines = path.read_text().splitlines()
            for line in lines:
                row = json.loads(line)
                if json.loads(row["key"]).get("plan_version") == planning.PLAN_VERSION:
                    self.rows[row["key"]] = row["value"]
            if len(self.rows) < len(lines):
                path.write_text("".join(json.dumps({"key": k, "value": v}) + "\n" for k, v in self.rows.items()))

    def get(self, key: dict, make):
        k = json.dumps({**key, "plan_version": planning.PLAN_VERSION}, sort_keys=True)
        if k not in self.rows:
            start = time.perf_counter()
            value = make()
            print(f"  planned {key.get('what', '')} in {time.perf_counter() - start:.0f} s", flush=True)
            self.rows[k] = value
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": k, "value": value}) + "\n")
        return self.rows[k]


def _plan(cache: Cache, tree: dict, provider: str, world_size: int = 1) -> dict:
    key = {"what": "plan", "tree": tree, "provider": provider, "world_size": world_size}

    def make():
        try:
            return planning.plan(load_config(tree), world_size=world_size, provider=provider).record()
        except planning.PlanError as exc:
            return {"error": str(exc)[:200]}

    return cache.get(key, make)


def _longest(cache: Cache, model: str, mode: str, setting: str, known: dict[int, dict], world_size: int = 1,
             capacity: int = H100) -> int:
    tree, provider = recipe(model, mode, setting)
    key = {"what": "max_context", "tree": tree, "provider": provider, "world_size": world_size, "capacity": capacity}

    def make():
        plans = {t: planning.Plan.from_record(r) for t, r in known.items() if "error" not in r}
        return planning.max_context(load_config(tree), capacity=capacity, world_size=world_size, provider=provider,
                                    known=plans).longest

    return cache.get(key, make)


def _gib(record: dict, capacity: int = H100) -> str:
    if "error" in record:
        return "n/a"
    fits = record["peak"] + planning.RESERVE <= capacity
    return f"{record['peak'] / GiB:.1f}" + ("" if fits else "*")


def goals(cache: Cache) -> list[str]:
    out = ["## Goals (planned)", "",
           f"One H100 80 GB ({H100 / GiB:.2f} GiB, of which {planning.RESERVE / GiB:.0f} GiB are left for the CUDA "
           "context and fragmentation). Peaks per GPU in GiB; * = does not fit.", "",
           "### Llama-3.1-8B, LoRA r=16 on all linear layers, bf16: the longest packed row", "",
           "| setup | peak at 4k | 32k | 128k | longest row that fits | goal |", "|---|---:|---:|---:|---:|---|"]
    for setting in ("HF eager", "HF eager + AC", "fastft + AC", "fastft long"):
        known = {t: _plan(cache, *recipe("Llama-3.1-8B", "lora", setting, tokens=t)) for t in LENGTHS}
        longest = _longest(cache, "Llama-3.1-8B", "lora", setting, known)
        goal = "" if setting.startswith("HF") else ("met (>= 128k)" if longest >= 131072 else "missed (< 128k)")
        out.append(f"| {setting} | " + " | ".join(_gib(known[t]) for t in LENGTHS) + f" | {longest:,} | {goal} |")
    out += ["", "### Llama-3.2-1B full fine-tuning at 4096-token rows: planned peak, fastft against HF eager", "",
            "fastft: as patched (fused norms, loss, varlen attention), no checkpointing, like HF eager; "
            "+ tiled MLP: the MLP recomputed per 1024-token chunk (model.tiled_mlp=1024: one more MLP forward "
            "per step); + AC: activation checkpointing on every block.", "",
            "Both sides train the same recipe; the optimizer step holds the weights, their gradients and "
            "the optimizer states whatever the activations do: a missed goal's cell gives that floor as a "
            "fraction of HF eager's peak, below which no activation saving goes.", "",
            "| precision | optimizer | rows x tokens | HF eager | fastft | fastft + tiled MLP | fastft + AC | goal (<= 0.6) |",
            "|---|---|---|---:|---:|---:|---:|---|"]
    cases = [(False, "adamw", 1), (False, "adamw", 8), (False, "adamw_8bit", 1), (True, "adamw", 1), (True, "adamw", 8)]
    labels = {False: "trainer: fp32 master weights, bf16 autocast", True: "bf16 weights and states"}
    for harness, optim, rows in cases:
        hf = _plan(cache, *recipe("Llama-3.2-1B", "full", "HF eager", rows=rows, harness=harness, optim=optim))
        cells, met = [], []
        for setting in ("fastft", "fastft + tiled MLP", "fastft + AC"):
            ft = _plan(cache, *recipe("Llama-3.2-1B", "full", setting, rows=rows, harness=harness, optim=optim))
            if "error" in hf or "error" in ft:
                cells.append("n/a")
                continue
            ratio = ft["peak"] / hf["peak"]
            cells.append(f"{_gib(ft)} ({ratio:.2f}x)")
            if ratio <= 0.6:
                met.append(setting)
        goal = f"met by {', '.join(met)}" if met else "missed"
        if not met and "error" not in hf and "error" not in ft:  # what no activation saving goes below
            goal += f" (the optimizer step alone is {ft['phase_peaks']['optimizer'] / hf['peak']:.2f}x)"
        out.append(f"| {labels[harness]} | {optim} | {rows} x 4096 | {_gib(hf)} | " + " | ".join(cells) + f" | {goal} |")
    return out


def qlora(cache: Cache) -> list[str]:
    """Issue 15's QLoRA goal (>= 342k tokens on one 80 GB GPU) and issue 16's rows: the longest
    Llama-3.1-8B QLoRA row on 80 GB and on 24 GB, fastft against HF + PEFT + bitsandbytes."""
    out = ["## QLoRA goals (planned)", "",
           "Llama-3.1-8B, QLoRA r=16 on all linear layers (NF4 base with double quantization, bf16 compute, the "
           "adapters and their AdamW states in fp32), one packed row per step. HF eager + AC: HF + PEFT + "
           "bitsandbytes (SDPA, materialised logits, bitsandbytes' 4-bit GEMM), checkpointing every block; "
           "fastft long: offloaded checkpointing and the tiled MLP. Peaks per GPU in GiB on the 80 GB GPU "
           f"(* = does not fit); longest rows in tokens, on one H100 80 GB ({H100 / GiB:.2f} GiB) and on a "
           f"24 GB card ({GB24 / GiB:.2f} GiB), each less {planning.RESERVE / GiB:.0f} GiB.", "",
           "| setup | peak at 4k | 32k | 128k | longest on 80 GB | longest on 24 GB | goal (>= 342k on 80 GB) |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for setting in ("HF eager + AC", "fastft + AC", "fastft long"):
        known = {t: _plan(cache, *recipe("Llama-3.1-8B", "qlora", setting, tokens=t)) for t in LENGTHS}
        longest = {c: _longest(cache, "Llama-3.1-8B", "qlora", setting, known, capacity=c) for c in (H100, GB24)}
        goal = "" if setting.startswith("HF") else ("met" if longest[H100] >= 342_000 else "missed")
        out.append(f"| {setting} | " + " | ".join(_gib(known[t]) for t in LENGTHS)
                   + f" | {longest[H100]:,} | {longest[GB24]:,} | {goal} |")
    return out


def e2e(cache: Cache) -> list[str]:
    out = ["## The end-to-end models (planned)", "",
           "One packed row per step, one H100 80 GB, bf16 (full fine-tuning: fp32 master weights and AdamW "
           "states, bf16 autocast; LoRA r=16 on all linear layers, bf16 base). HF eager + AC: the unpatched "
           "model (SDPA, materialised logits) with activation checkpointing on every block; fastft long: "
           "offloaded activation checkpointing and the tiled MLP. Peaks per GPU in GiB; * = does not fit; "
           "longest: the longest row that fits (tokens).", "",
           "| model | mode | setup | 4k | 32k | 128k | longest |", "|---|---|---|---:|---:|---:|---:|"]
    for model in E2E_MODELS:
        for mode in ("full", "lora"):
            for setting in ("HF eager + AC", "fastft long"):
                known = {}
                for t in LENGTHS:
                    known[t] = _plan(cache, *recipe(model, mode, setting, tokens=t))
                    if "error" in known[t] or not known[t]["peak"] + planning.RESERVE <= H100:
                        break  # longer rows only need more
                longest = _longest(cache, model, mode, setting, known)
                cells = [_gib(known[t]) if t in known else "" for t in LENGTHS]
                out.append(f"| {model} | {mode} | {setting} | " + " | ".join(cells) + " | "
                           + (f"{longest:,}" if longest else "none: the state alone does not fit") + " |")
    return out


def harness_rows(cache: Cache) -> list[dict]:
    """What benchmarks/e2e.py runs on the GPU (its shapes, depths, bf16 weights, batches), planned:
    the values benchmarks/plan_check.py sets beside its measured peaks. HF rows are the harness's
    padded batches (one document per row) planned as full rows without an attention mask."""
    from benchmarks import e2e

    rows = []
    for model, mode in (("Llama-3.2-1B", "full"), ("Llama-3.1-8B", "lora"), ("Qwen3-0.6B", "full"),
                        ("Qwen3-0.6B", "lora"), ("Gemma-3-1B", "full"), ("Gemma-3-1B", "lora")):
        spec = BY_NAME[model]
        docs = e2e.documents(4096, 4, spec.shape["vocab_size"])
        for provider in ("hf", "fastft"):
            # The step with the most token slots (the harness cycles its steps; the peak is that one's).
            shapes = [max({tuple(b["input_ids"].shape) for b in e2e.batches(docs, provider, 4096, 1)},
                          key=lambda s: s[0] * s[1])]
            peaks = []
            for batch_rows, width in shapes:
                tree, _ = recipe(model, mode, "fastft" if provider == "fastft" else "HF eager", rows=batch_rows,
                                 tokens=width, harness=True, layers=True)
                peaks.append(_plan(cache, tree, provider))
            peak = max((p.get("peak", 0) for p in peaks), default=0)
            rows.append({"model": model, "mode": mode, "provider": provider, "seq": 4096, "rows": 1,
                         "planned_gib": round(peak / GiB, 3) if peak else None,
                         "shapes": [list(s) for s in shapes]})
    return rows


def checks(cache: Cache) -> list[str]:
    """Planned against exact activation bytes (planning.measure_activations) on small configs."""
    from fastft.architectures import TINY

    shape = {k: TINY[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "vocab_size")}
    cases = [("llama", "full", "none", {}), ("llama", "lora", "full", {}), ("qwen3", "full", "full", {"head_dim": 16}),
             ("gemma3_text", "lora", "none", {"head_dim": 16, "sliding_window": 8}),
             ("mistral", "full", "selective", {})]
    out = ["## Checks: planned against exact activation bytes (CPU)", "",
           "A real CPU forward of the same small config (2 layers, hidden 64), counting what it leaves for the "
           "backward (saved tensors through torch.autograd.graph.saved_tensors_hooks, ctx tensors, checkpointed "
           "blocks' keyword inputs, the outputs), against the plan; tests/test_plan.py asserts within 5%.", "",
           "| model | mode | checkpointing | provider | planned bytes | exact bytes | error |",
           "|---|---|---|---|---:|---:|---:|"]
    providers = ["hf", "fastft"]
    for model_type, mode, ac, extra in cases:
        for provider in providers:
            tree = {"model": {"config": {"model_type": model_type, **shape, **extra},
                              "patch_options": {"attention": False}},
                    "lora": {"enabled": mode == "lora", "r": 4}, "train": {"precision": "bf16"},
                    "data": {"batch_size": 2, "max_seq_len": 48}, "distributed": {"activation_checkpointing": ac}}

            def make():
                config = load_config(tree)
                return {"planned": planning.plan(config, provider=provider).activations,
                        "exact": planning.measure_activations(config, provider=provider)}

            r = cache.get({"what": "check", "tree": tree, "provider": provider}, make)
            err = (r["planned"] - r["exact"]) / r["exact"]
            out.append(f"| {model_type} | {mode} | {ac} | {provider} | {r['planned']:,} | {r['exact']:,} | "
                       f"{100 * err:+.2f}% |")
    out.append("\nfastft rows: the fused kernels' custom ops (the Triton interpreter in the real step); attention "
               "stays SDPA there, since the planned varlen op has no CPU implementation to count against.")
    return out


def scaling_lines() -> list[str]:
    tree, provider = recipe("Llama-3.1-8B", "lora", "fastft long")
    return planning.scaling(load_config(tree), [16384, 32768, 65536], provider=provider)


def readme_section() -> str:
    """benchmarks/README.md's planned part (benchmarks/report.py --readme): PLAN.md's goals."""
    path = HERE / "PLAN.md"
    if not path.is_file():
        return ""
    text = path.read_text()
    start = text.find("## Goals (planned)")
    if start < 0:
        return ""
    end = text.find("\n## ", start + 1)
    head = text.splitlines()[2] if len(text.splitlines()) > 2 else ""
    return ("\n## Planned memory (predictions, not measurements)\n\n" + head + "\n\nFrom [PLAN.md](PLAN.md), which "
            "also has the end-to-end models' table, the checks against exact counts and the scaling table.\n\n"
            + text[start:end if end > 0 else len(text)].replace("## Goals (planned)", "### Goals").replace("### Llama", "#### Llama"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="goals,qlora,e2e,harness,checks,scaling")
    parser.add_argument("--out", default=str(HERE / "PLAN.md"))
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args(argv)
    # On this CPU the checks' real step runs the fused kernels under the Triton interpreter, as
    # the GPU runs them compiled (without it they fall back to their torch references, which save
    # other tensors); before triton is imported (nothing above imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    cache = Cache(CACHE, args.fresh)
    parts = args.part.split(",")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import torch
    import transformers

    lines = ["# Planned memory (predictions, not measurements)", "",
             f"Generated by `python -m benchmarks.plan_tables --part {args.part}` with fastft.planning (PLAN_VERSION "
             f"{planning.PLAN_VERSION}) at commit {commit or 'unknown'}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, on a CPU ({platform.machine()}): one optimizer step per plan on fake "
             "tensors, tracked by torch's MemTracker (fastft/planning/__init__.py says what is and is not counted). "
             "Model shapes are the published config.json fields (benchmarks/e2e_configs.py), no weights. "
             "Measured figures will come from benchmarks/gpu.sh (plan_check.md: planned against "
             "torch.cuda.max_memory_allocated per e2e row).", ""]
    if "goals" in parts:
        lines += goals(cache) + [""]
    if "qlora" in parts:
        lines += qlora(cache) + [""]
    if "e2e" in parts:
        lines += e2e(cache) + [""]
    if "scaling" in parts:
        lines += ["## Does anything grow faster than the row? (planned)", "", "```", *scaling_lines(), "```", ""]
    if "checks" in parts:
        lines += checks(cache) + [""]
    if "harness" in parts:
        rows = harness_rows(cache)
        (HERE / "plan_e2e.json").write_text(json.dumps(rows, indent=1) + "\n")
        lines += ["## The e2e benchmark's rows (planned; gpu.sh sets the measured peak beside each)", "",
                  "| model | mode | provider | micro-batch shapes | planned GiB |", "|---|---|---|---|---:|"]
        lines += [f"| {r['model']} | {r['mode']} | {r['provider']} | {', '.join('x'.join(map(str, s)) for s in r['shapes'])} "
                  f"| {r['planned_gib']} |" for r in rows]
        lines.append("")
    pathlib.Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
