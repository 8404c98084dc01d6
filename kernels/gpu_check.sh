#!/usr/bin/env bash
# On a CUDA machine: the kernel benchmark (each kernel's bandwidth as a fraction of the measured copy bandwidth,
# beside torch, Liger and apex where installed), then every kernel against the float64 reference on the GPU.
# Usage: bash kernels/gpu_check.sh [RESULTS_DIR]   (default: $OUT, else kernels/gpu_results). Under 8 minutes.
# scripts/gpu_check.sh runs this as its kernel part (with a 35 s benchmark budget), before the training benchmark.
# Writes tests.log, bench.md (the markdown table), bench.json and device.txt into RESULTS_DIR.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
RESULTS="${1:-${OUT:-kernels/gpu_results}}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
START=$(date +%s)

# Kernels compiled for the GPU, not the interpreter; tests/conftest.py only sets these when they are unset.
export TRITON_INTERPRET=0 MIXLN_TEST_DEVICE=cuda PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"

{ nvidia-smi -L 2>/dev/null; date -u; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"; } | tee "$RESULTS/device.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PY; nothing to check." | tee -a "$RESULTS/device.txt"
  exit 1
fi

# Make megatron_mixln.kernels importable when the package is not installed: megatron_mixln/kernels.py finds
# the kernels/ folder beside the package in a source tree.
if ! "$PY" -c "import megatron_mixln.kernels" 2>/dev/null; then
  PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONPATH
  if ! "$PY" -c "import megatron_mixln.kernels"; then
    # No index on an offline GPU machine: no build isolation (it would fetch setuptools), no dependencies.
    echo "gpu_check: cannot import megatron_mixln.kernels from $(pwd); run this from the repository root, or install" \
         "the package with: $PY -m pip install --no-deps --no-build-isolation --no-index -e ."
    exit 1
  fi
fi

echo "== benchmark =="
# First, so that a run cut short still has the measurements: its shapes come in target order (bench.py,
# shape_plan) and bench.json is rewritten after each. KERNEL_BENCH_BUDGET_S: its time budget (default 200 s);
# KERNEL_BENCH_ARGS: more benchmark arguments, e.g. "--providers eager unfused liger apex" to leave torch.compile out.
BUDGET="${KERNEL_BENCH_BUDGET_S:-200}"; [ "$BUDGET" -lt 20 ] && BUDGET=20
# shellcheck disable=SC2086  # KERNEL_BENCH_ARGS is a list of arguments
"$PY" -m megatron_mixln.kernels.bench --budget-s "$BUDGET" --out "$RESULTS/bench.json" ${KERNEL_BENCH_ARGS:-} \
  | tee "$RESULTS/bench.md"
BENCH=${PIPESTATUS[0]}

echo "== correctness: tests/test_kernels.py on the GPU against float64 =="
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$RESULTS/tests.log"
TESTS=${PIPESTATUS[0]}

echo "gpu_check: tests exit $TESTS, benchmark exit $BENCH, $(( $(date +%s) - START )) s; results in $RESULTS"
[ "$TESTS" -eq 0 ] && [ "$BENCH" -eq 0 ]
