#!/usr/bin/env bash
# Cache-alone decode against the honest peer, every storage dtype, MHA and GQA, 16K and 1M
# positions, on one card (written for an H200); plus the GPU tests of kvcore.
#
#   OUT_DIR=/path/to/results bash docs/results/kernels-h200.sh [PHASE ...]
#
# Run from the repository root on a GPU host where the project's dependencies import.
# Every benchmark run appends its JSON line (the last line `python -m kvcore.bench` prints) to
# $OUT_DIR/kernels.jsonl and its table to $OUT_DIR/<name>.log; wall times go to
# $OUT_DIR/walls.tsv. Phases (default: m10 gqa 1m):
#   m10     every storage dtype at M10: 16,384 positions, the 7B shape (32 layers, 32 heads,
#           32 KV heads, head dim 128): float32 float16 bfloat16 int8 float8_e4m3fn int4
#   gqa     float16, float8_e4m3fn and int4 at 16,384 positions with grouped-query attention:
#           ratio 4 = 32 heads over 8 KV heads (Llama-3-8B's shape), ratio 8 = 32 heads over 4
#   1m      float8_e4m3fn, int8 and int4 at 1,048,576 positions, Llama-3-8B's shape (32 heads
#           over 8 KV heads: the issue's "8 KV heads" case); the 16-bit SDPA peer's copy does
#           not fit next to these caches and is recorded as skipped, with the reason
#   tests   python -m pytest -m gpu tests/kvcore -q (as two runs: test_triton_decode.py, then the rest)
#   kernel  python -m kvcore.bench.kernels (kernel alone, the autotuned configs, float64 check)
#           for every dtype at 32, 8 and 4 KV heads: optional, ~1-2 min
# Expected time on one H200 (estimates, not measured): m10 ~2 min, gqa ~2 min, 1m ~1.5 min
# (most of it process start-up and the autotuner's compiles, <= 5 candidates per shape; about
# 5 min in all), tests ~2-4 min per part.
#
# Flags that keep a run short: --regions decode (copy, decode and the peers only; fill,
# append_all, prefill and retrieve are not timed), --weights-gb 0 (cache-alone decode: the
# figure compared with the copy bandwidth and the peer), 3 repetitions in a 0.3 s time box.
set -uo pipefail

OUT_DIR=${OUT_DIR:?set OUT_DIR to a folder for the JSON lines and logs}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=index,name,uuid,driver_version,memory.total --format=csv >"$OUT_DIR/gpus.csv" 2>&1
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' \
    >"$OUT_DIR/versions.txt" 2>&1

COMMON=(--num-layers 32 --num-heads 32 --head-dim 128 --device cuda:0 --weights-gb 0
        --repetitions 3 --rep-budget-s 0.3 --decode-steps 8 --regions decode)

# bench NAME ARGS...: one `python -m kvcore.bench`, its JSON line appended to kernels.jsonl
bench() {
    local name=$1 start end status
    shift
    start=$(date +%s.%N)
    "$PYTHON" -m kvcore.bench "${COMMON[@]}" "$@" >"$OUT_DIR/$name.log" 2>&1
    status=$?
    end=$(date +%s.%N)
    printf '%s\t%s\t%.1f\n' "$name" "$status" "$(echo "$end - $start" | bc)" >>"$OUT_DIR/walls.tsv"
    if [ "$status" -eq 0 ]; then
        tail -n 1 "$OUT_DIR/$name.log" >>"$OUT_DIR/kernels.jsonl"
    else
        echo "$name: exit $status, see $OUT_DIR/$name.log" >&2
    fi
}

phase_m10() {
    for dtype in float32 float16 bfloat16 int8 float8_e4m3fn int4; do
        bench "m10-$dtype" --num-kv-heads 32 --context-length 16384 --dtype "$dtype" --prefill-chunk 1024
    done
}

phase_gqa() {
    for kv in 8 4; do
        for dtype in float16 float8_e4m3fn int4; do
            bench "gqa$((32 / kv))-$dtype" --num-kv-heads "$kv" --context-length 16384 --dtype "$dtype" \
                --prefill-chunk 1024
        done
    done
}

phase_1m() {
    for dtype in float8_e4m3fn int8 int4; do
        bench "1m-$dtype" --num-kv-heads 8 --context-length 1048576 --dtype "$dtype" --prefill-chunk 8192
    done
}

phase_tests() {  # in two parts, each a few minutes: the decode kernel's tests, then the rest
    "$PYTHON" -m pytest -m gpu tests/kvcore/test_triton_decode.py -q >"$OUT_DIR/gpu-tests-decode.log" 2>&1
    echo "gpu tests (decode kernel): exit $? ($(tail -n 1 "$OUT_DIR/gpu-tests-decode.log"))"
    "$PYTHON" -m pytest -m gpu tests/kvcore -q --ignore=tests/kvcore/test_triton_decode.py \
        >"$OUT_DIR/gpu-tests-rest.log" 2>&1
    echo "gpu tests (the rest of kvcore): exit $? ($(tail -n 1 "$OUT_DIR/gpu-tests-rest.log"))"
}

phase_kernel() {
    "$PYTHON" -m kvcore.bench.kernels --dtypes float32,float16,bfloat16,int8,float8_e4m3fn,int4 \
        --kv-heads 32,8,4 --reps 10 --json "$OUT_DIR/kernel.jsonl" >"$OUT_DIR/kernel.log" 2>&1
    echo "kernel table: exit $? ($OUT_DIR/kernel.log)"
}

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(m10 gqa 1m)
for phase in "${phases[@]}"; do
    case $phase in
        m10|gqa|1m|tests|kernel) "phase_$phase" ;;
        *) echo "unknown phase $phase (m10 gqa 1m tests kernel)" >&2; exit 2 ;;
    esac
done
echo "JSON lines: $OUT_DIR/kernels.jsonl"
