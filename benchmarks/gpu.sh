#!/usr/bin/env bash
# The prepared GPU run: the test suite compiled on the GPU, then the benchmarks.
#
#   bash benchmarks/gpu.sh RESULTS_DIR [PART]
#
# PART "kernels" (default, under 8 minutes on one H100): tests, then every kernel benchmark.
# PART "long" (under 8 minutes): offloaded checkpointing against full and save_on_cpu (8 of
# Llama-3.1-8B's layers, 32k tokens), then the longest-row goal: all 32 layers, LoRA, 131072
# tokens, offload + tiled MLP (peak and step time beside benchmarks/PLAN.md's plan).
# PART "e2e" (under 10 minutes): the end-to-end benchmark's headline rows (Llama-3.2-1B full
# fine-tuning, Llama-3.1-8B LoRA and QLoRA, all providers), the trainer itself at the Llama-3.2-1B shape
# (its metrics.jsonl: tokens/s, MFU, memory), then the other architectures while time lasts.
# PART "moe" (under 10 minutes): the MoE tests, layer benchmark and e2e rows (see its block).
# No network needed. Runs from the checkout (PYTHONPATH), with the wheels the device lacks
# (liger-kernel, datasets) installed from ./.whl when carried (../shared/tools/gpu-wheels.sh).
# Each step has its own limit and the whole run a deadline, so a hung step cannot eat the lease.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu.sh RESULTS_DIR [kernels|e2e|moe]}
PART=${2:-kernels}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastft-site .whl/*.whl \
    > "$OUT/wheels.log" 2>&1 && export PYTHONPATH="/tmp/fastft-site:$PYTHONPATH"
fi
export FASTFT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{ nvidia-smi; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"; } \
  > "$OUT/env.txt" 2>&1
DEADLINE=$((SECONDS + ${FASTFT_GPU_SECONDS:-470}))
status=0
step() {  # step NAME SECONDS CMD...: run within min(SECONDS, time left), log to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then echo "== $name skipped: deadline"; status=1; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s; tail:"; tail -n 3 "$OUT/$name.log" | sed 's/^/   /'
  [ $rc -eq 0 ] || status=1
}
if [ "$PART" = kernels ]; then
  # The default suite with kernels compiled (the architecture matrix and the varlen leak test
  # included); not -x, so that one failure does not hide the others.
  step tests 170 python3 -m pytest -q -p no:cacheprovider tests
  # The committed compile report's configurations loaded on this GPU: what the driver says beside
  # what benchmarks/COMPILE.md predicted; a configuration it called fine that fails is a bug there.
  # (483 sm_90 configurations since MoE and QLoRA joined: ~620 s of single-core compiles, 16 jobs)
  step compile_device 140 python3 -m benchmarks.compile_report --on-device --jobs 16 --check \
    --out "$OUT/COMPILE_device.md" --json "$OUT/compile_device.json"
  step bench_rms_norm 45 python3 -m benchmarks.kernels.rms_norm --out "$OUT"
  step bench_layer_norm 45 python3 -m benchmarks.kernels.layer_norm --out "$OUT"
  step bench_fused_linear_cross_entropy 100 python3 -m benchmarks.kernels.fused_linear_cross_entropy --out "$OUT"
  step bench_attention 30 python3 -m benchmarks.kernels.attention --out "$OUT"
  step bench_lora 120 python3 -m benchmarks.kernels.lora --out "$OUT"
elif [ "$PART" = e2e ]; then
  DEADLINE=$((SECONDS + ${FASTFT_GPU_SECONDS:-570}))
  step e2e_llama1b_full 120 python3 -m benchmarks.e2e --models Llama-3.2-1B --modes full --out "$OUT"
  step e2e_llama8b_lora 150 python3 -m benchmarks.e2e --models Llama-3.1-8B --modes lora --out "$OUT"
  # QLoRA: fastft vs HF + PEFT + bitsandbytes vs HF + Liger + PEFT + bitsandbytes, 4096-token rows
  # (needs bitsandbytes on the device; without it the rows record the ImportError).
  step e2e_llama8b_qlora 150 python3 -m benchmarks.e2e --models Llama-3.1-8B --modes qlora --seq 4096 --out "$OUT"
  step train_llama1b_shape 120 python3 -m fastft.cli train examples/bench_llama1b_shape.yaml \
    --train.max_steps=30 --logging.run_dir="$OUT/train_llama1b_shape"
  step e2e_others 200 python3 -m benchmarks.e2e --models Qwen3-0.6B,Gemma-3-1B,Qwen3-8B,Mistral-7B-v0.3,Gemma-2-2B,Phi-3-mini --out "$OUT"
  # Planned (fastft.planning, made on a CPU: benchmarks/plan_e2e.json) against the measured
  # torch.cuda.max_memory_allocated of every e2e row above: $OUT/plan_check.md.
  step plan_check 20 python3 -m benchmarks.plan_check "$OUT"
elif [ "$PART" = long ]; then
  step offload_32k 180 python3 -m benchmarks.offload --seq 32768 --layers 8 --out "$OUT"
  step long_128k 280 python3 -m benchmarks.offload --seq 131072 --layers 32 --tiled auto --modes offload \
    --warmup 1 --steps 2 --out "$OUT"
elif [ "$PART" = moe ]; then
  # MoE (issue 17): the MoE tests with the kernels compiled, the layer benchmark (Qwen3-30B-A3B and
  # Mixtral-8x7B shapes, full and expert LoRA, every provider), then the e2e rows of OLMoE-1B-7B
  # and Qwen3-30B-A3B (layers reduced to fit one GPU, as each row states), full and LoRA.
  DEADLINE=$((SECONDS + ${FASTFT_GPU_SECONDS:-570}))
  step tests_moe 120 python3 -m pytest -q -p no:cacheprovider tests/test_moe_kernel.py tests/test_moe_patch.py \
    tests/test_moe_lora.py
  step bench_moe 150 python3 -m benchmarks.kernels.moe --out "$OUT"
  step e2e_olmoe 130 python3 -m benchmarks.e2e --models OLMoE-1B-7B --out "$OUT"
  step e2e_qwen3_30b_a3b 150 python3 -m benchmarks.e2e --models Qwen3-30B-A3B --out "$OUT"
else
  echo "unknown PART $PART (kernels, e2e, long or moe)"; exit 2
fi
if [ "$PART" = e2e ]; then
  # Attention paths (issue 12): the trainer's step-1 counters (metrics.jsonl, kind "attention")
  # and every fastft e2e row's `attention_paths` must show the varlen path only.
  step attention_paths 30 python3 - "$OUT" <<'PY'
import json, pathlib, sys
out, bad = pathlib.Path(sys.argv[1]), []
def varlen_only(paths):
    return bool(paths) and all(p.startswith("varlen/") for p in paths)
metrics = out / "train_llama1b_shape" / "metrics.jsonl"
records = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.is_file() else []
paths = next((r["paths"] for r in records if r["kind"] == "attention"), None)
print("trainer:", paths)
if not varlen_only(paths or {}):
    bad.append(f"trainer run: {paths}")
for f in sorted(out.glob("e2e*.jsonl")):
    for row in map(json.loads, f.read_text().splitlines()):
        if row.get("op") != "e2e" or row.get("provider") != "fastft" or row.get("error"):
            continue
        paths = row.get("attention_paths")
        print(row["model"], row["mode"], paths)
        if not varlen_only(paths or {}):
            bad.append(f"{row['model']} {row['mode']}: {paths if paths is not None else 'no attention_paths recorded'}")
print("\n".join(["NOT VARLEN:", *bad]) if bad else "varlen everywhere")
sys.exit(1 if bad else 0)
PY
fi
step report 30 python3 -m benchmarks.report "$OUT"
cat "$OUT/report.md" 2>/dev/null | tail -n 60
exit $status
