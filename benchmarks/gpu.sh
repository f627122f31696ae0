#!/usr/bin/env bash
# The CUDA paths and the GPU goals of issue 18 checked in one command, in under 6 minutes on one
# GPU, with nothing to download (CIFAR-100-shaped random images):
#   tests      every CUDA test (the rest of the suite is CPU and runs anywhere)
#   bench_kd   `dclang bench examples/kd_dml.kt`: every option combination `dclang run` chooses among;
#              goal: what it picks by itself >= 3x the reference engine's step
#   pack_ops   a union step of K = 1, 8, 16 three-ResNet32 trials (benchmarks/pack_ops.py), with
#              HFTA alone, with CUDA graphs, and with bf16 + channels-last + CUDA graphs;
#              goals: <= 1.0 ms per trial-step at K = 16, <= 1.5 ms at K = 8 (the fastest variant)
#   plan       `dclang search --plan` for examples/search3.kt, T = 1500, E = 200, one GPU; goal <= 6 h
#   run_kd     `dclang run examples/kd_dml.kt` for one epoch without flags: what autotune chose, steps/s
#   compile    `dclang bench examples/kd_dml.kt --variants fused+compile` (torch.compile on CUDA, a
#              frozen teacher in the step), with what time is left
#   bench_dml4 `dclang bench examples/dml4.kt` (HFTA's case: four ResNet32), if time is left
# then benchmarks/gpu_report.py writes one JSON (default benchmarks/gpu.json) and prints each goal
# with its figure and met / not met.
#
#   PYTHON=python3 benchmarks/gpu.sh [OUT.json]
#
# Each part runs under its own time limit, cut to what is left of GPU_SH_BUDGET (seconds, default
# 345); a part that fails or runs out of time is recorded as such, and the others still run.
# Adapt the packed-trial and plan options in PACK_OPS_FLAGS and PLAN_FLAGS. Run from the
# repository root.
set -uo pipefail

OUT="${1:-benchmarks/gpu.json}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET="${GPU_SH_BUDGET:-345}"
PACK_OPS_FLAGS="${PACK_OPS_FLAGS:---variants hfta,hfta+cudagraph,hfta+bf16+channels_last+cudagraph}"
PLAN_FLAGS="${PLAN_FLAGS:---pack 16 --hfta --precision bf16 --channels-last --cuda-graph}"
WORK="$(mktemp -d -t dclang-gpu.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # dclang from this checkout, installed or not

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: PyTorch sees no CUDA GPU here; nothing to check" >&2
    exit 2
fi

# part NAME LIMIT command...: run with min(LIMIT, what is left of the budget) seconds, keep its
# output and exit code; a part with under 15 s left is recorded as not run
part() {
    local name="$1" limit="$2"; shift 2
    local left=$(( BUDGET - ($(date +%s) - started) ))
    (( limit > left )) && limit=$left
    if (( limit < 15 )); then
        echo "== $name: not run, ${left}s of the ${BUDGET}s budget left" >&2
        echo "skipped $left" >"$WORK/$name.rc"
        return
    fi
    echo "== $name (at most ${limit}s): $*" >&2
    local t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
    local rc=$?
    echo "$rc $(( $(date +%s) - t0 ))" >"$WORK/$name.rc"
    echo "   exit $rc after $(( $(date +%s) - t0 ))s; $(tail -n 1 "$WORK/$name.err")" >&2
}

"$PYTHON" benchmarks/make_cifar_like_npz.py "$WORK/cifar_like.npz" --train 2304 --test 256
NPZ=(--set data.dataset=npz --set "data.path=$WORK/cifar_like.npz" --set data.val_split=256)

part tests 75 "$PYTHON" -m pytest -q -rs -p no:cacheprovider -k "cuda or CUDA or gpu" \
    tests/test_accelerate.py tests/test_autotune.py tests/test_data.py tests/test_train.py \
    tests/test_search_pack.py tests/test_union.py tests/test_evaluate.py

part bench_kd 55 "$PYTHON" -m dclang bench examples/kd_dml.kt --device cuda --steps 10 --warmup 5 --json \
    --variants "$("$PYTHON" - <<'EOF'
# every variant but torch.compile's (its own part, last: it takes minutes to compile)
from dclang.api import check_file
from dclang.bench import variant_specs
import torch
specs, _ = variant_specs(check_file("examples/kd_dml.kt").graph, torch.device("cuda"))
print(",".join(name for name, _, _ in specs if "compile" not in name))
EOF
)"

# shellcheck disable=SC2086  # the flags are words
part pack_ops 100 "$PYTHON" benchmarks/pack_ops.py --graph benchmarks/graphs/three_resnet32.kt --packs 1,8,16 \
    --device cuda --steps 10 $PACK_OPS_FLAGS --json "$WORK/pack_ops.json"

# shellcheck disable=SC2086
part plan 75 "$PYTHON" -m dclang search --plan --template examples/search3.kt --trials 1500 --epochs 200 \
    --device cuda $PLAN_FLAGS

part run_kd 55 "$PYTHON" -m dclang run examples/kd_dml.kt --device cuda --epochs 1 \
    -o "$WORK/run_kd" "${NPZ[@]}"
cp "$WORK/run_kd/summary.json" "$WORK/run_kd.summary.json" 2>/dev/null

part compile 90 "$PYTHON" -m dclang bench examples/kd_dml.kt --device cuda --steps 5 --warmup 2 --json \
    --variants fused+compile

part bench_dml4 40 "$PYTHON" -m dclang bench examples/dml4.kt --device cuda --steps 10 --warmup 5 --json \
    --variants "fused+hfta,fused+cudagraph,fused+hfta+cudagraph,fused+hfta+bf16+channels_last+cudagraph"

"$PYTHON" benchmarks/gpu_report.py "$WORK" "$OUT" "$(( $(date +%s) - started ))"
