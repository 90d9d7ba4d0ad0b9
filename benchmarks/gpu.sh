#!/usr/bin/env bash
# One prepared GPU run: the test suite compiled on the GPU, then every kernel benchmark.
#
#   bash benchmarks/gpu.sh RESULTS_DIR
#
# For one H100 with no network, in under 8 minutes. Runs from the checkout (PYTHONPATH), with
# the wheels the device lacks (liger-kernel, datasets) installed from ./.whl when carried
# (../shared/tools/gpu-wheels.sh fetches them). Results: RESULTS_DIR/*.jsonl, logs, a summary.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu.sh RESULTS_DIR}
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
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s; tail:"; tail -n 3 "$OUT/$name.log" | sed 's/^/   /'
  [ $rc -eq 0 ] || status=1
}
# The whole default suite, kernels compiled (the architecture matrix included); -x would hide
# later failures, so it runs to the end within its limit.
step tests 210 python3 -m pytest -q -p no:cacheprovider tests
step bench_rms_norm 50 python3 -m benchmarks.kernels.rms_norm --out "$OUT"
step bench_layer_norm 50 python3 -m benchmarks.kernels.layer_norm --out "$OUT"
step bench_fused_linear_cross_entropy 120 python3 -m benchmarks.kernels.fused_linear_cross_entropy --out "$OUT"
step bench_attention 30 python3 -m benchmarks.kernels.attention --out "$OUT"
step bench_lora 120 python3 -m benchmarks.kernels.lora --out "$OUT"
step report 30 python3 -m benchmarks.report "$OUT"
cat "$OUT/report.log"
exit $status
