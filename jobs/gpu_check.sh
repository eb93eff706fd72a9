#!/usr/bin/env bash
# The scorer's GPU checks in one command (docs/benchmarks.md, "GPU"), from the repository root
# of a machine with one CUDA GPU:  bash jobs/gpu_check.sh
# 1. the machine (nvidia-smi; the bench's own machine line);
# 2. the CUDA scorer against the reference loop (tests/test_fastscore.py, fp32 and bf16), and
#    one forward's CUDA memory against `scorer.forward_memory` (tests/test_memory_guard.py);
# 3. Clotho evaluation size, 1,045 audios x 5,225 captions = 5.5M pairs, in process: rows
#    (b) fp32, (c) bf16 and (d) bf16-refined with pairs/s and shares of the same run's matmul
#    rates (bf16: the tensor-core rate);
# 4. the variants that may pay on a GPU (torch.compile, CUDA graphs, rows per forward), on a
#    256 x 1,280 slice so that their compile times fit;
# 5. jobs/score_matrix.py on a one-GPU embedded Ray over a synthetic index of the same size,
#    bf16 and bf16-refined, when `import ray` works (a bare GPU image may lack Ray: see
#    docs/benchmarks.md for carrying it).
# Each step goes on when one before it fails; logs go to $OUT (the device tool's folder) or
# runs/gpu_check. The package needs no install: PYTHONPATH is the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
py="${PYTHON:-python3}"
step() {  # step NAME CMD...: run CMD, its output to the console and $out/NAME.txt
    local name="$1"
    shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$out/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}
clotho=(--device cuda --precision bf16 --audios 1045 --captions 5225 --rounds 1)
step gpu nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step cuda_test "$py" -m pytest -q -s -p no:cacheprovider tests/test_fastscore.py tests/test_memory_guard.py -k cuda
step rows "$py" jobs/bench_scoring.py --only rows "${clotho[@]}" --naive-pairs 20000
step ablations "$py" jobs/bench_scoring.py --only rows --device cuda --precision bf16 --audios 256 --captions 1280 \
    --rounds 2 --naive-pairs 4096 --ablations
if "$py" -c "import ray" 2>/dev/null; then
    step job "$py" jobs/bench_scoring.py --only job "${clotho[@]}" --job-precisions bf16 bf16-refined --job-block 1024
else
    echo "=== job: skipped, this Python cannot import ray (docs/benchmarks.md, GPU: carrying Ray)" | tee "$out/job.txt"
fi
