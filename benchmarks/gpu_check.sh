#!/usr/bin/env bash
# The one command for a GPU machine (DESIGN.md, "On a GPU"): build for this card only, run the GPU tests
# (CUDA and compiled Triton), compute-sanitizer on small cases of each CUDA kernel, the benchmarks at real sizes,
# and a report with card, driver, versions, commit and every figure. Must finish in under 8 minutes.
#   usage: benchmarks/gpu_check.sh [OUT_DIR] [family ...]     (families: losses corruption attention train)
# Peers that are pure Python (liger-kernel, cut-cross-entropy) are installed with --no-deps from .wheels/ if present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
shift || true
FAMILIES=${*:-losses corruption attention train}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
DATE=$(date -u +%Y-%m-%d)
REPORT="$OUT/gpu-check-${GPU}-${DATE}.md"
T0=$(date +%s)
step() { echo; echo "## $1 (t=$(( $(date +%s) - T0 ))s)"; }
{
echo "# gpu_check report"
echo
echo "- date: $(date -u +%FT%TZ)"
echo "- commit: ${LMOBJ_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
echo "- card: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader)"
echo "- nvcc: $(nvcc --version | tail -1)"
echo "- families: $FAMILIES"
$PY -c "import torch, triton, sys; print(f'- python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}')"

step "build (this card only)"
CAP=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=$CAP FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
echo "TORCH_CUDA_ARCH_LIST=$CAP"
LMOBJ_SKIP_EXT=1 $PY -m pip install --quiet --no-build-isolation --no-deps -e . 2>&1 | tail -3
$PY setup.py --quiet build_ext --inplace 2>&1 | grep -v "^$" | tail -5
if ls .wheels/*.whl >/dev/null 2>&1; then $PY -m pip install --quiet --no-deps .wheels/*.whl 2>&1 | tail -2; fi
$PY -m lmobj_kernels.cli info | head -40

step "GPU tests"
TESTS=""
for f in $FAMILIES; do [ -f "tests/test_$f.py" ] && TESTS="$TESTS tests/test_$f.py"; done
timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider $TESTS 2>&1 | tail -30

step "lmobj verify --device cuda"
timeout 60 $PY -m lmobj_kernels.cli verify --device cuda 2>&1 | tail -40

step "compute-sanitizer (memcheck) on small cases"
if command -v compute-sanitizer >/dev/null; then
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 $PY benchmarks/sanitize_cases.py $FAMILIES 2>&1 \
    | grep -v "^========= COMPUTE-SANITIZER" | tail -15
  echo "compute-sanitizer exit: ${PIPESTATUS[0]}"
else
  echo "compute-sanitizer not found"
fi

step "benchmarks (--gpu)"
for f in $FAMILIES; do
  if [ -f "benchmarks/bench_$f.py" ]; then
    echo "### bench_$f"
    timeout 300 $PY benchmarks/bench_$f.py --gpu --out "$OUT" 2>&1 | tail -40
  fi
done
step "done"
} 2>&1 | tee "$REPORT"
echo "report: $REPORT"
