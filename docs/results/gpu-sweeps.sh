#!/usr/bin/env bash
# The GPU sweeps behind docs/results/m*-h100*.md and scaling-*.md, as they were run.
#
#   OUT=/path/to/logs bash docs/results/gpu-sweeps.sh PHASE [PHASE ...]
#
# Run from the repository root on a GPU host where the project's dependencies import
# (pip install -e . or the offline wheelhouse of the README). Every sweep records into one
# SQLite MLflow store, $OUT/mlflow.db, each in its own experiment; every command's output goes
# to $OUT/<name>.log and its wall time to $OUT/walls.tsv. nvidia-smi samples every card's
# utilisation and memory twice a second into $OUT/nvml.csv while the phases run.
#
# Phases:
#   smoke         the smoke milestone on every card (the plumbing, in seconds)
#   m10-1gpu      the full M10 grid on one card (CUDA_VISIBLE_DEVICES=0)
#   m10-2gpu      the full M10 grid on every card of the host
#   scale-2gpu    a 10-trial grid (M10 x 5 dtypes x sinks 0/4) on every card
#   scale-1gpu    the same grid on one card: the speed-up is wall(1 card) / wall(2 cards)
#   m8 m9 m11 m12 that milestone's grid on every card
#   scale8-all    an 8-trial grid (M10 x 4 dtypes of 16 and 8 bits x sinks 0/4) on every card
#   scale8-1gpu   the same grid on one card
set -uo pipefail

OUT=${OUT:?set OUT to a folder for logs and the MLflow store}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
TRACKING="tracking.uri=sqlite:///$OUT/mlflow.db"
SCALE8_GRID=(grid.cache.dtype=[float16,bfloat16,int8,float8_e4m3fn] +grid.cache.sink_positions=[0,4])
SCALE_GRID=(grid.cache.dtype=[float32,float16,bfloat16,int8,float8_e4m3fn] +grid.cache.sink_positions=[0,4])

nvidia-smi --query-gpu=index,name,uuid,driver_version,memory.total --format=csv >"$OUT/gpus.csv" 2>&1
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' >"$OUT/versions.txt" 2>&1
nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -lms 500 >>"$OUT/nvml.csv" 2>/dev/null &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT

# sweep NAME [VISIBLE_DEVICES] -- ARGS...: one `python -m orchestrator` run, timed
sweep() {
    local name=$1 visible=$2
    shift 3
    local start end status
    start=$(date +%s.%N)
    if [ -n "$visible" ]; then
        CUDA_VISIBLE_DEVICES=$visible "$PYTHON" -m orchestrator "$@" "$TRACKING" >"$OUT/$name.log" 2>&1
    else
        "$PYTHON" -m orchestrator "$@" "$TRACKING" >"$OUT/$name.log" 2>&1
    fi
    status=$?
    end=$(date +%s.%N)
    local wall
    wall=$(awk "BEGIN { printf \"%.1f\", $end - $start }")
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$wall" "$start" "$*" >>"$OUT/walls.tsv"
    echo "$name: exit $status, $wall s"
}

for phase in "$@"; do
    case $phase in
        smoke) sweep smoke "" -- +milestone=smoke tracking.experiment=kvbench-smoke ;;
        m10-1gpu) sweep m10-1gpu 0 -- +milestone=m10 tracking.experiment=kvbench-m10-1gpu ;;
        m10-2gpu) sweep m10-2gpu "" -- +milestone=m10 tracking.experiment=kvbench-m10-2gpu ;;
        scale-2gpu) sweep scale-2gpu "" -- +milestone=m10 "${SCALE_GRID[@]}" tracking.experiment=kvbench-scale-2gpu ;;
        scale-1gpu) sweep scale-1gpu 0 -- +milestone=m10 "${SCALE_GRID[@]}" tracking.experiment=kvbench-scale-1gpu ;;
        scale8-all) sweep scale8-all "" -- +milestone=m10 "${SCALE8_GRID[@]}" tracking.experiment=kvbench-scale8-all ;;
        scale8-1gpu) sweep scale8-1gpu 0 -- +milestone=m10 "${SCALE8_GRID[@]}" tracking.experiment=kvbench-scale8-1gpu ;;
        m8 | m9 | m11 | m12) sweep "$phase-2gpu" "" -- "+milestone=$phase" "tracking.experiment=kvbench-$phase-2gpu" ;;
        *) echo "unknown phase $phase (smoke m10-1gpu m10-2gpu scale-2gpu scale-1gpu m8 m9 m11 m12 scale8-all scale8-1gpu)" >&2; exit 2 ;;
    esac
done
