#!/usr/bin/env bash
# The one command for a GPU machine (DESIGN.md, "On a GPU"): build for this card only, run the GPU tests
# (CUDA and compiled Triton), compute-sanitizer on small cases of each CUDA kernel, the benchmarks at real sizes,
# and a report with card, driver, versions, commit and every figure. Finishes within GPU_CHECK_SECONDS (default
# 470, under DESIGN.md's 8 minutes): each stage gets a time cap, shrunk to what is left, and says when it was cut.
#   usage: benchmarks/gpu_check.sh [OUT_DIR] [family ...]     (families: losses corruption attention train)
#   GPU_CHECK_BENCH="family ...": benchmark only these (default: the families tested), e.g. to spend a short device
#   budget on the tests of a family whose kernels did not change since its last benchmark; "attention_tune" (not a
#   default) sweeps the attention block sizes (benchmarks/bench_attention_tune.py, ~3 min).
# Pure-Python peers (liger-kernel, cut-cross-entropy) are installed with --no-deps from .wheels/ when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
shift || true
FAMILIES=${*:-losses corruption attention train}
BENCH_FAMILIES=${GPU_CHECK_BENCH-$FAMILIES}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
REPORT="$OUT/gpu-check-${GPU}-$(date -u +%Y-%m-%d-%H%M).md"
T0=$(date +%s)
BUDGET=${GPU_CHECK_SECONDS:-470}
step() { echo; echo "## $1 (t=$(( $(date +%s) - T0 ))s)"; }
# cap CAP: the stage's limit in seconds, at most what is left of the budget (minus a reserve for the report)
cap() { local left=$(( BUDGET - ($(date +%s) - T0) - 10 )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
run_capped() { local c; c=$(cap "$1"); shift; timeout "$c" "$@"; local rc=$?; (( rc == 124 )) && echo "!! cut at ${c}s"; return $rc; }
export PYTHONUNBUFFERED=1
{
echo "# gpu_check report"
echo
echo "- date: $(date -u +%FT%TZ)"
echo "- commit: ${LMOBJ_COMMIT:-$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)}"
echo "- card: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader)"
echo "- nvcc: $(nvcc --version | tail -1)"
echo "- families: $FAMILIES (benchmarks: ${BENCH_FAMILIES:-none}); budget ${BUDGET}s"
$PY -c "import torch, triton, sys; print(f'- python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}')"

step "build (this card only)"
CAP=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=$CAP FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
echo "TORCH_CUDA_ARCH_LIST=$CAP"
LMOBJ_SKIP_EXT=1 $PY -m pip install --quiet --no-build-isolation --no-deps -e . 2>&1 | tail -3
BUILD_LOG=${TMPDIR:-/tmp}/lmobj-build.log  # not in OUT: a GPU machine returns few files
$PY setup.py --quiet build_ext --inplace > "$BUILD_LOG" 2>&1
BUILD_RC=$?
grep -E "error|warning: " "$BUILD_LOG" | head -20
if (( BUILD_RC != 0 )); then  # no extension: every stage would fail on it; the report says why instead
  echo "!! build failed (exit $BUILD_RC): no tests or benchmarks run"; tail -30 "$BUILD_LOG"
  FAMILIES="" BENCH_FAMILIES=""
fi
if ls .wheels/*.whl >/dev/null 2>&1; then $PY -m pip install --quiet --no-deps .wheels/*.whl 2>&1 | tail -2; fi
$PY -m lmobj_kernels.cli info | tr -d '\n ' | head -c 1500; echo

# Per-family caps (seconds) for the tests and the benchmarks: one slow family cannot starve the others. They add
# up to more than one budget: a run of every family spends it on the tests and cuts the benchmarks (each stage gets
# what is left, at least 5 s). Split a short device budget into calls, e.g. the tests of some families with
# GPU_CHECK_BENCH="", then the benchmarks alone with families "none"; GPU_CHECK_CAP_<family> (tests) and
# GPU_CHECK_BENCH_CAP_<family> override a cap.
declare -A TEST_CAP=([losses]=110 [corruption]=60 [attention]=320 [train]=90)  # attention: ~20 kernel variants compile
declare -A BENCH_CAP=([losses]=150 [corruption]=45 [attention]=110 [train]=150 [attention_tune]=240)
for f in "${!TEST_CAP[@]}"; do v="GPU_CHECK_CAP_$f"; TEST_CAP[$f]=${!v:-${TEST_CAP[$f]}}; done
for f in "${!BENCH_CAP[@]}"; do v="GPU_CHECK_BENCH_CAP_$f"; BENCH_CAP[$f]=${!v:-${BENCH_CAP[$f]}}; done
# GPU_CHECK_LOSSES_FULL=1: bench_losses --full (the torch.compile peers too, +~80 s)
declare -A BENCH_ARGS=([losses]="$([ "${GPU_CHECK_LOSSES_FULL:-0}" = 1 ] && echo --full)")

for f in $FAMILIES; do
  [ -f "tests/test_$f.py" ] || continue
  step "GPU tests: $f"
  # -v with only failures kept: a stage cut by its cap still names the tests that failed before the cut
  run_capped "${TEST_CAP[$f]:-60}" $PY -m pytest -v -m gpu -p no:cacheprovider -o addopts="" -rfE --tb=line \
    "tests/test_$f.py" 2>&1 | grep -E --line-buffered "FAILED|ERROR|Error|[0-9]+ (passed|failed)|^!!" | tail -40
done

step "compute-sanitizer (memcheck) on small cases"
if [ -z "$FAMILIES" ]; then
  echo "no families"
elif command -v compute-sanitizer >/dev/null; then
  run_capped 40 compute-sanitizer --tool memcheck --error-exitcode 3 $PY benchmarks/sanitize_cases.py $FAMILIES 2>&1 \
    | grep -v "^========= COMPUTE-SANITIZER" | tail -15
  echo "compute-sanitizer exit: ${PIPESTATUS[0]}"
else
  echo "compute-sanitizer not found"
fi

step "benchmarks (--gpu)"
for f in $BENCH_FAMILIES; do
  if [ -f "benchmarks/bench_$f.py" ]; then
    echo "### bench_$f"
    run_capped "${BENCH_CAP[$f]:-60}" $PY benchmarks/bench_$f.py --gpu ${BENCH_ARGS[$f]:-} --out "$OUT" 2>&1 | tail -150
  fi
done
step "done"
} 2>&1 | tee "$REPORT"
echo "report: $REPORT"
