#!/usr/bin/env bash
# On a CUDA machine: check every kernel against the float64 reference on the GPU, then run the benchmark.
# Usage: bash kernels/gpu_check.sh [RESULTS_DIR]   (default: $OUT, else kernels/gpu_results). Under 8 minutes.
# Writes tests.log, bench.md (the markdown table), bench.json and device.txt into RESULTS_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
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

# Make megatron_mixln.kernels importable when the package is not installed: kernels/ maps to that name
# (setup.py's package_dir). A meta-path finder in a throw-away sitecustomize leaves the environment as it is.
if ! "$PY" -c "import megatron_mixln.kernels" 2>/dev/null; then
  SHIM="$(mktemp -d)"
  cat > "$SHIM/sitecustomize.py" <<EOF
import importlib.abc, importlib.util, os, sys
_DIR = os.path.join("$(pwd)", "kernels")
class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "megatron_mixln.kernels":
            return importlib.util.spec_from_file_location(name, os.path.join(_DIR, "__init__.py"),
                                                          submodule_search_locations=[_DIR])
        return None
sys.meta_path.append(_KernelsFinder())
EOF
  export PYTHONPATH="$SHIM:$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$PY" -c "import megatron_mixln.kernels"; then
    echo "gpu_check: cannot import megatron_mixln.kernels; install the package with: $PY -m pip install --no-deps -e ."
    exit 1
  fi
fi

echo "== correctness: tests/test_kernels.py on the GPU against float64 =="
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$RESULTS/tests.log"
TESTS=${PIPESTATUS[0]}

echo "== benchmark =="
ELAPSED=$(( $(date +%s) - START ))
BUDGET=$(( 400 - ELAPSED )); [ "$BUDGET" -lt 60 ] && BUDGET=60
"$PY" -m megatron_mixln.kernels.bench --budget-s "$BUDGET" --out "$RESULTS/bench.json" | tee "$RESULTS/bench.md"
BENCH=${PIPESTATUS[0]}

echo "gpu_check: tests exit $TESTS, benchmark exit $BENCH, $(( $(date +%s) - START )) s; results in $RESULTS"
[ "$TESTS" -eq 0 ] && [ "$BENCH" -eq 0 ]
