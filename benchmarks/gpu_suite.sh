#!/usr/bin/env bash
# The device suite: one call on a GPU machine, everything the CPU machine cannot check, within 8 minutes.
#
#   bash benchmarks/gpu_suite.sh            # on a CUDA machine, from the repository root; results under $OUT
#   bash benchmarks/gpu_suite.sh --dry-run  # anywhere: each step's CPU part (CI runs this so the suite cannot rot)
#
# Made for the GPU image as it is: python3 with CUDA torch (2.11+), Triton (3.6+), nvcc, pytest and transformers
# installed, nothing downloadable. Steps, each time-boxed, each logged; a failing step does not stop the others:
#   1. build   the CUDA extension (csrc/*.cu for this GPU's architecture) with pip's editable install, no network
#   2. tests   every test marked `gpu` (kernels against their references at real shapes, the compile gate's
#              register/spill table against what the GPU's driver reports, the compiled CUDA statistics op)
#   3. bench   masked_ffn, ffn_stats and the pruned models on a reduced grid, timed by triton.testing.do_bench
# Results: $OUT/gpu_suite.log (every step's output and its exit status), the benchmark CSVs and PNGs, and
# $OUT/gpu_suite.tar.gz with all of it. The CSVs start from the committed benchmarks/results/*_cuda.csv, so they
# come back with every earlier GPU run plus this one's rows (copy them over the committed ones). Exit status: 0 when
# every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0 BENCH=1
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --no-bench) BENCH=0 ;;  # build and tests only (a second call when the benchmarks already came back)
    *) echo "gpu_suite.sh: unknown option $arg (--dry-run, --no-bench)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_suite_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$OUT/gpu_suite.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
START=$(date +%s)
BUDGET=${GPU_SUITE_BUDGET:-450}  # seconds for all steps: 7.5 minutes, inside the 8 the suite is given
FAILED=()

say() { echo "[gpu_suite +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: run with a time box (never past the suite's budget), log, record a failure
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then say "SKIP $name: the suite's ${BUDGET}s are spent"; FAILED+=("$name(skipped)"); return; fi
  say "RUN  $name (at most ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  if (( rc == 0 )); then say "OK   $name in $(( $(date +%s) - t0 ))s"
  else say "FAIL $name: exit $rc after $(( $(date +%s) - t0 ))s$( ((rc == 124)) && echo ' (time box)')"; FAILED+=("$name"); fi
}

say "mode: $([ $DRY = 1 ] && echo 'dry run (CPU parts only)' || echo 'GPU')"
step env 60 "$PY" -c "
import torch, sys
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)
try:
    import triton; print('triton', triton.__version__)
except ImportError as e: print('triton missing:', e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, 'sm_%d%d' % (p.major, p.minor), p.multi_processor_count, 'SMs', round(p.total_memory / 2**30), 'GiB')
elif not $DRY:
    sys.exit('no CUDA device')
"

# 1. the CUDA extension: built here, for this GPU only (SKILLKERN_CUDA_ARCHS), as a user's install would
if [ $DRY = 1 ]; then
  step build 120 "$PY" -c "import skillkern._ext as e; print('extension:', e.available() or e.unavailable_reason())"
else
  ARCH=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}{p.minor}')" 2>/dev/null || echo 90)
  export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
  # setup.py directly (in place): pip's editable install falls back to an isolated build that wants the network
  step build 150 env SKILLKERN_REQUIRE_EXT=1 SKILLKERN_CUDA_ARCHS="$ARCH" MAX_JOBS=16 \
    "$PY" setup.py -q build_ext --inplace
  step ext-check 30 "$PY" -c "
import torch, skillkern._ext as e
assert e.available(), e.unavailable_reason()
assert e.has_op('stats_update', torch.device('cuda')), 'no CUDA kernel of stats_update in the build'
print('compiled stats_update has a CUDA kernel')"
fi
# the package imports from the checkout in any case (the editable install points here too)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. the GPU tests (on the CPU they are collected and skip: the dry run checks they still import)
step tests 160 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_masked_ffn.py tests/test_ffn_stats.py \
  tests/test_stats_update_triton.py tests/test_csrc_cuda.py tests/test_library.py tests/test_prune.py \
  tests/test_compile_gate.py tests/test_scoring_fused.py tests/test_stats_moments.py

# 3. benchmarks on a reduced grid (the dry run: the smallest shape, one timing, on the CPU)
if [ $DRY = 1 ]; then
  DEV=cpu
  M_ARGS=(--shapes bert-base --rows 1 --keep 0.02 --budget 0.01 --min-repeats 1 --max-repeats 1)
  F_ARGS=(--shapes bert-base --rows 64 --repeats 1 --modes counts)
  P_ARGS=(--models roberta-base --batches 1 --seqs 32 --repeats 1 --providers sliced)
else
  DEV=cuda
  M_ARGS=(--dtype float16 --quick --budget 0.3)
  F_ARGS=(--quick --repeats 10 --modes sums,counts,moments)
  P_ARGS=(--models roberta-base,llama-style --batches 1,32 --seqs 128 --repeats 10)
fi
[ $DRY = 1 ] || cp benchmarks/results/*_cuda.csv "$WORK"/ 2>/dev/null  # earlier GPU runs: rows are added to them
if [ $BENCH = 1 ]; then
step bench_masked_ffn 90 "$PY" benchmarks/bench_masked_ffn.py --device $DEV "${M_ARGS[@]}" --out "$WORK/masked_ffn_$DEV.csv"
step bench_ffn_stats 60 "$PY" benchmarks/bench_ffn_stats.py --device $DEV "${F_ARGS[@]}" --out "$WORK/ffn_stats_$DEV.csv"
step bench_pruned_model 75 "$PY" benchmarks/bench_pruned_model.py --device $DEV "${P_ARGS[@]}" --out "$WORK/pruned_model_$DEV.csv"
fi

# results: at most 8 files come back from a device call, so the CSVs and PNGs, plus everything in one archive
cp "$WORK"/*.csv "$WORK"/*.png "$OUT"/ 2>/dev/null
tar -czf "$OUT/gpu_suite.tar.gz" -C "$WORK" . 2>/dev/null
rm -rf "$WORK"
if (( ${#FAILED[@]} )); then say "done: failed steps: ${FAILED[*]}"; exit 1; fi
say "done: every step passed"
