#!/usr/bin/env bash
# The CUDA paths checked in one command, in under 8 minutes on one GPU:
#   1. the CUDA tests (every test that needs a GPU; the rest of the suite is CPU and runs anywhere),
#   2. `dclang bench` on examples/kd_dml.kt and examples/dml4.kt with every variant, CUDA ones
#      included (fused+bf16, fused+cudagraph, compile, HFTA),
#   3. packed-search throughput: `dclang search --hfta --pack K` for K = 1, 4, 8, 16 on 3-node
#      ResNet32 trials (CIFAR-100-shaped random images: no download, no network), the goal
#      being K = 8 at least 4x the trials per hour of K = 1,
#   4. operations and seconds per union step of K = 1, 2, 4, 8 three-node ResNet32 trials
#      against one trial alone (benchmarks/pack_ops.py on benchmarks/graphs/three_resnet32.kt),
# and writes everything to one JSON (default benchmarks/gpu.json) with the card's name.
#
#   benchmarks/gpu.sh [OUT.json]
#
# Each part has its own time limit (GPU_SH_LIMITS, seconds: tests, each bench, the search
# runs); a part that fails or runs out of time is recorded as such and the others still run.
# Run from the repository root with the Python that has dclang installed ($PYTHON, default python).
set -uo pipefail

OUT="${1:-benchmarks/gpu.json}"
PYTHON="${PYTHON:-python}"
read -r LIMIT_TESTS LIMIT_BENCH LIMIT_PACK LIMIT_OPS <<<"${GPU_SH_LIMITS:-90 80 250 60}"
WORK="$(mktemp -d -t dclang-gpu.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: PyTorch sees no CUDA GPU here; nothing to check" >&2
    exit 2
fi

# part(NAME, LIMIT, command...): run with a time limit, keep its output and exit code
part() {
    local name="$1" limit="$2"; shift 2
    echo "== $name (at most ${limit}s): $*" >&2
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
    local rc=$?
    echo "$rc $(( $(date +%s) - t0 ))" >"$WORK/$name.rc"
    tail -n 3 "$WORK/$name.err" >&2
}

# 1. the CUDA tests: those the CPU suite skips for want of a GPU
part tests "$LIMIT_TESTS" "$PYTHON" -m pytest -q -x -rs -k "cuda or CUDA or gpu" \
    tests/test_accelerate.py tests/test_data.py tests/test_train.py tests/test_search_pack.py tests/test_union.py

# 2. every variant of `dclang bench`, on the GPU
for graph in kd_dml dml4; do
    part "bench_$graph" "$LIMIT_BENCH" "$PYTHON" -m dclang bench "examples/$graph.kt" --device cuda \
        --steps 10 --warmup 3 --json
done

# 3. packed search throughput, K = 1, 4, 8, 16 (one worker each): trials finished in a 50 s window
part pack "$LIMIT_PACK" "$PYTHON" benchmarks/pack_throughput.py --runs 1:1,1:4,1:8,1:16 --device cuda --hfta \
    --model resnet32 --data npz --train-images 2304 --trials 1000 --epochs 2 --window 50 --timeout 65 \
    --json "$WORK/pack.json"

# 4. operations and seconds per union step, against one trial alone
part pack_ops "$LIMIT_OPS" "$PYTHON" benchmarks/pack_ops.py --graph benchmarks/graphs/three_resnet32.kt \
    --packs 1,2,4,8 --device cuda --hfta --steps 10

"$PYTHON" benchmarks/gpu_report.py "$WORK" "$OUT" "$(( $(date +%s) - started ))"
