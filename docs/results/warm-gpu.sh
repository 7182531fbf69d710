#!/usr/bin/env bash
# Warm workers on one GPU: the full M10 sweep with one long-lived worker per card (or, WARM=false,
# a fresh worker process per trial), its timeline (busy fraction of the card) and the warm-worker
# fields of each trial (worker_pid, worker_trials, memory at start against the worker's baseline).
#
#   OUT=/path/to/folder WARM=true  bash docs/results/warm-gpu.sh     # about 2-3 minutes on one H200
#   OUT=/path/to/folder WARM=false bash docs/results/warm-gpu.sh     # the same sweep, a process per trial
#
# Run from the repository root on a GPU host where the project imports. The sweep records into
# $OUT/mlflow.db (experiment kvbench-m10); logs: $OUT/sweep-$WARM.log, $OUT/timeline-$WARM.md;
# $OUT/warm-$WARM.json: the timeline's wall time and per-device busy fraction, and per trial its
# status, verdict, valid flag, worker fields and fill rate. Then the GPU test of the warm worker's
# memory check goes to $OUT/pytest-gpu-$WARM.log.
set -uo pipefail

OUT=${OUT:?set OUT to a folder for logs and the MLflow store}
WARM=${WARM:-true}
MILESTONE=${MILESTONE:-m10}  # smoke: a CPU check of this script
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
URI="sqlite:///$OUT/mlflow.db"

CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} "$PYTHON" -m orchestrator +milestone=$MILESTONE "tracking.uri=$URI" \
    resume=false ${EXTRA:-} "trial.warm_workers=$WARM" >"$OUT/sweep-$WARM.log" 2>&1
echo "sweep warm_workers=$WARM: exit $?" | tee -a "$OUT/status.txt"

URI="$URI" OUT="$OUT" WARM="$WARM" MILESTONE="$MILESTONE" "$PYTHON" - <<'PY'
import dataclasses, json, os
from mlflow import MlflowClient
from orchestrator.timeline import format_timelines, load_timeline_sweep, timeline_of

client = MlflowClient(os.environ["URI"])
name = f"kvbench-{os.environ['MILESTONE']}"
experiment = client.get_experiment_by_name(name)
parent = client.search_runs([experiment.experiment_id], "tags.run_type = 'sweep'",
                            order_by=["attributes.start_time DESC"], max_results=1)[0]
loaded = load_timeline_sweep(parent.info.run_id, os.environ["URI"], name)
timeline = timeline_of(loaded)
warm = os.environ["WARM"]
with open(os.path.join(os.environ["OUT"], f"timeline-{warm}.md"), "w") as f:
    f.write(format_timelines([timeline]))
fields = ("worker_pid", "worker_trials", "memory_at_start_bytes", "memory_baseline_bytes", "invalid_reason",
          "device_key")
trials = [{"index": r.index, "dtype": r.params.get("cache.dtype"), "status": r.status, "verdict": r.verdict,
           "valid": r.metrics.get("valid"), "fill_rate_pos_s": r.metrics.get("fill_rate_pos_s"), "attempts": r.attempts,
           **{k: r.info.get(k) for k in fields}} for r in sorted(loaded.records, key=lambda r: r.index)]
summary = {"warm_workers": warm, "parent_run_id": parent.info.run_id, "wall_s": timeline.wall_s,
           "driver_wall_s": timeline.driver_wall_s,
           "devices": [{"device": d.device, "trials": d.trials, "busy_s": d.busy_s,
                        "busy_fraction": d.busy_fraction} for d in timeline.devices],
           "trials": trials}
with open(os.path.join(os.environ["OUT"], f"warm-{warm}.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
print(json.dumps({k: summary[k] for k in ("warm_workers", "wall_s", "driver_wall_s", "devices")}, default=str))
PY
"$PYTHON" -m pytest tests/orchestrator/test_trial.py -m gpu -q >"$OUT/pytest-gpu-$WARM.log" 2>&1
echo "gpu test: exit $?" | tee -a "$OUT/status.txt"
