#!/usr/bin/env bash
# make gpu-check: the one prepared run for a bare GPU machine (no network), inside 9 minutes.
#
#   scripts/gpu_check.sh [--long] [--dry-run]
#
#   1. build: fastcore with the machine's own torch (pip install --no-build-isolation
#      --no-deps -e ., ninja, all cores, the GPU's own architecture only);
#   2. test: the gpu-marked tests, -x, a per-test timeout, the slowest durations printed;
#   3. bench: copy bandwidth, then each op forward and forward+backward at the bench shapes
#      beside what users run today (index_select, index_add_, scatter_reduce,
#      torch.sparse.mm on CSR, PyG's pooling, the unfused KV path eager and compiled), each
#      file in its own process; bench/compare.py grades them against the copy bandwidth and
#      writes bench/results/<gpu>-<date>.{md,json};
#   4. with --long: the scaling sweep, bench/scaling.py --device cuda (pooling, unpooling and
#      spmm from 1k to 1M nodes beside the baselines and copy bandwidth), into
#      bench/results/<gpu>-<date>-scaling.{md,json,png}.
#
# Each stage has a time budget (seconds: GPU_CHECK_BUILD_S, GPU_CHECK_TEST_S,
# GPU_CHECK_BENCH_S; 200 + 160 + 150 by default) and the run goes on to the next stage when
# one runs out, so the whole run ends inside 9 minutes with what it has. --long: every bench
# file, longer timing, no stage budgets beyond 10 minutes each.
# --dry-run: the same script on a CPU machine (Triton interpreter, the CPU extension, the
# gpu tests skipping, two small bench files), results into the log folder only.
#
# Logs and copies of the results go to $FASTCORE_GPU_CHECK_OUT (default
# bench/.gpu-check/<date-time>); the exit status is 1 when a stage failed or ran out of time.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
LONG=0
DRY=0
for arg in "$@"; do
    case $arg in
        --long) LONG=1 ;;
        --dry-run) DRY=1 ;;
        *) echo "usage: $0 [--long] [--dry-run]" >&2; exit 2 ;;
    esac
done
PY=${PY:-python}
OUT=${FASTCORE_GPU_CHECK_OUT:-bench/.gpu-check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUILD_S=${GPU_CHECK_BUILD_S:-200}
TEST_S=${GPU_CHECK_TEST_S:-160}
BENCH_S=${GPU_CHECK_BENCH_S:-150}
PER_TEST_S=${GPU_CHECK_PER_TEST_S:-60}
BENCH_ARGS=(--benchmark-max-time=0.1 --benchmark-min-rounds=5)
BENCH_FILES=(gather pool spmm kv_project block)
if ((LONG)); then
    BUILD_S=600 TEST_S=600 BENCH_S=3600
    BENCH_ARGS=(--benchmark-max-time=0.5 --benchmark-min-rounds=5)
    BENCH_FILES=(gather pool spmm kv_project block basin time_conv linear_norm_residual feature_mlp)
    export FASTCORE_BENCH_LONG=1
fi
if ((DRY)); then
    BENCH_FILES=(gather)
    BENCH_ARGS=(--benchmark-max-time=0.02 --benchmark-min-rounds=1 -k "BT96xN400xH64 or copy")
fi
status=0
start=$(date +%s)
log() { echo "[gpu-check $(($(date +%s) - start))s] $*" | tee -a "$OUT/summary.log"; }
stage() {  # stage NAME SECONDS COMMAND...: run with a budget, log the outcome
    local name=$1 budget=$2
    shift 2
    local t0=$(date +%s)
    timeout --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local took=$(($(date +%s) - t0))
    if ((rc == 124 || rc == 137)); then
        log "$name: OUT OF TIME after ${took}s (budget ${budget}s); see $name.log"
        status=1
    elif ((rc != 0)); then
        log "$name: FAILED (exit $rc) after ${took}s; see $name.log"
        tail -n 30 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.log"
        status=1
    else
        log "$name: ok in ${took}s"
    fi
    return $rc
}

log "out $OUT; long=$LONG dry-run=$DRY"
{
    command -v nvidia-smi > /dev/null && nvidia-smi
    "$PY" -c 'import platform, torch; print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
    nproc
} > "$OUT/machine.log" 2>&1
cat "$OUT/machine.log" | tee -a "$OUT/summary.log"

# 1. build
if ((DRY)); then
    if "$PY" -c 'import fastcore._C' 2> /dev/null; then
        log "build: the extension is built (dry run: not rebuilt)"
    else
        stage build "$BUILD_S" "$PY" -m pip install --no-build-isolation --no-deps -e .
    fi
else
    arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    stage build "$BUILD_S" env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
        "$PY" -m pip install --no-build-isolation --no-deps -v -e .
    "$PY" -c 'import fastcore; print(fastcore.backends(), fastcore._backend.BUILD_INFO)' 2>&1 | tee -a "$OUT/summary.log"
fi

# 2. the gpu-marked tests
FASTCORE_TEST_TIMEOUT=$PER_TEST_S stage test "$TEST_S" "$PY" -m pytest tests -m gpu -x -q \
    -p no:cacheprovider --durations=25 -o faulthandler_timeout=$((PER_TEST_S + 30))
grep -E "^(=+ .*(passed|failed|skipped|error).* =+|FAILED|ERROR)" "$OUT/test.log" | tail -n 5 | tee -a "$OUT/summary.log"

# 3. the benchmarks: copy bandwidth in every process, one process per file
mkdir -p "$OUT/bench"
deadline=$(($(date +%s) + BENCH_S))
for name in "${BENCH_FILES[@]}"; do
    left=$((deadline - $(date +%s)))
    if ((left < 10)); then
        log "bench $name: skipped (bench budget spent)"
        status=1
        continue
    fi
    stage "bench-$name" "$left" "$PY" -m pytest bench/test_bench_copy.py "bench/test_bench_$name.py" \
        -q -p no:cacheprovider "${BENCH_ARGS[@]}" --benchmark-json="$OUT/bench/$name.json"
done
runs=("$OUT"/bench/*.json)
if [[ -e ${runs[0]} ]]; then
    results=bench/results
    ((DRY)) && results=$OUT/results
    stage compare 120 "$PY" bench/compare.py "${runs[@]}" --out "$results" $( ((LONG)) && echo --tag long)
    cat "$OUT/compare.log" >> "$OUT/summary.log"
    ((DRY)) || cp "$OUT/compare.log" "$OUT/results-table.md"
else
    log "no bench results"
    status=1
fi
# 4. the long set: the scaling sweep (bench/scaling.py, 1k to 1M nodes) on the GPU; the
# dry run sweeps 1k and 10k on the CPU, one setting, into $OUT
if ((LONG)); then
    if ((DRY)); then
        stage scaling 300 "$PY" bench/scaling.py --quick --settings plain --min-time 0.2 \
            --out "$OUT/results/scaling"
    else
        stage scaling 600 "$PY" bench/scaling.py --device cuda
    fi
    tail -n 3 "$OUT/scaling.log" >> "$OUT/summary.log"
fi
log "done (exit $status)"
exit $status
