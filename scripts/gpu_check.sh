#!/usr/bin/env bash
# Device check: GPU-marked tests, then the kernel benchmarks; results under $OUT.
#
#   OUT=/some/dir scripts/gpu_check.sh          # full bench (target: under 8 minutes in all)
#   QUICK=1 OUT=/some/dir scripts/gpu_check.sh  # fewer M values, top-3 tuning (about 3 minutes)
#   TEST_TIMEOUT / BENCH_TIMEOUT / ENGINE_TIMEOUT (seconds, default 150 / 210 / 150) bound the
#   three stages: 8.5 minutes at most, inside the device tool's 10-minute command limit.
#
# Writes $OUT/gpu_tests.txt + gpu_tests.xml (pytest), $OUT/kernels.json + kernels.md (bench),
# $OUT/env.txt, $OUT/engine.json + engine.md (engine bench, random 2B weights). Runs every
# step even when an earlier one fails; exits non-zero if any failed.
set -euo pipefail

: "${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
unset TRITON_INTERPRET  # compiled kernels only
export PYTHONUNBUFFERED=1

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

start=$(date +%s)
test_rc=0
# --continue-on-collection-errors: a module needing a package this machine lacks (fastapi) must
# not stop the GPU tests from running.
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest -m gpu -q tests/ --continue-on-collection-errors \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 \
  | tee "$OUT/gpu_tests.txt" || test_rc=$?
echo "gpu tests: rc=$test_rc in $(( $(date +%s) - start ))s"

bench_args=(--json "$OUT/kernels.json")
if [[ "${QUICK:-0}" == "1" ]]; then bench_args+=(--quick); fi
bench_rc=0
# The bench rewrites kernels.json after every section, so a timeout still leaves results.
timeout "${BENCH_TIMEOUT:-210}" "$PY" -m kernels.bench "${bench_args[@]}" 2>&1 \
  | tee "$OUT/kernels.md" || bench_rc=$?
echo "bench: rc=$bench_rc; total $(( $(date +%s) - start ))s"

# Engine end to end: random W8G128 weights at the real 2B shapes, built in memory.
engine_rc=0
timeout "${ENGINE_TIMEOUT:-150}" "$PY" -m server.engine.bench --random-2b --batches 1,64,256 \
  --prompt-len 512 --decode-tokens 64 --json "$OUT/engine.json" 2>&1 \
  | tee "$OUT/engine.md" || engine_rc=$?
echo "engine bench: rc=$engine_rc; total $(( $(date +%s) - start ))s"

if (( test_rc != 0 || bench_rc != 0 || engine_rc != 0 )); then exit 1; fi
