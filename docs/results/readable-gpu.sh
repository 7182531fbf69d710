#!/usr/bin/env bash
# Results people can read, on one GPU: the device state, the system metrics, the names, notes and
# statuses in MLflow, and a comparison of two sweeps, from two short M10 sweeps.
#
#   OUT=/path/to/folder bash docs/results/readable-gpu.sh          # about 2-3 minutes on one H100/H200
#
# Run from the repository root on a GPU host where the project imports. Both sweeps record into
# $OUT/mlflow.db (experiment kvbench-m10); each command's output goes to $OUT/<name>.log. Then:
# - $OUT/compare.log: `python -m orchestrator.compare --last 2 --milestone m10` (exit status in
#   $OUT/compare.status: 0 no regression, 1 a regression beyond the recorded spread);
# - $OUT/readable-gpu.json: per trial of the second sweep its run name, status, verdict, the GPU
#   state tags (clocks, power limit, persistence, ECC, other processes), whether it was marked
#   noisy and why, and per system metric its number of points and its max; the parent's name,
#   status and the first lines of its description;
# - the GPU tests of the device state and sampler: $OUT/pytest-gpu.log.
set -uo pipefail

OUT=${OUT:?set OUT to a folder for logs and the MLflow store}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
URI="sqlite:///$OUT/mlflow.db"
GRID=(grid.cache.dtype=[float16,int8] "tracking.uri=$URI" resume=false)

CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} "$PYTHON" -m orchestrator +milestone=m10 "${GRID[@]}" >"$OUT/sweep-a.log" 2>&1
echo "sweep a: exit $?" | tee -a "$OUT/status.txt"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} "$PYTHON" -m orchestrator +milestone=m10 "${GRID[@]}" >"$OUT/sweep-b.log" 2>&1
echo "sweep b: exit $?" | tee -a "$OUT/status.txt"
"$PYTHON" -m orchestrator.compare --last 2 --milestone m10 --tracking-uri "$URI" >"$OUT/compare.log" 2>&1
echo $? >"$OUT/compare.status"
"$PYTHON" -m pytest tests/orchestrator/test_devicestate.py -m gpu -q >"$OUT/pytest-gpu.log" 2>&1

URI="$URI" OUT="$OUT" "$PYTHON" - <<'EOF'
import json, os
from mlflow import MlflowClient

client = MlflowClient(os.environ["URI"])
experiment = client.get_experiment_by_name("kvbench-m10")
parent = client.search_runs([experiment.experiment_id], "tags.run_type = 'sweep'",
                            order_by=["attributes.start_time DESC"], max_results=1)[0]
children = client.search_runs([experiment.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
trials = []
for run in sorted(children, key=lambda r: r.info.run_name):
    tags = run.data.tags
    system = {}
    for name in sorted(k for k in run.data.metrics if k.startswith("system/")):
        history = client.get_metric_history(run.info.run_id, name)
        system[name] = {"points": len(history), "max": max(m.value for m in history)}
    trials.append({
        "run_name": run.info.run_name, "status": run.info.status, "verdict": tags.get("verdict"),
        "valid": run.data.metrics.get("valid"), "invalid_reason": tags.get("invalid_reason", ""),
        "gpu_state": {k: v for k, v in tags.items() if k.startswith("gpu_") or k == "device_name"},
        "criteria": {k: v for k, v in run.data.metrics.items() if k.startswith("criteria/")},
        "system_metrics": system,
    })
out = {
    "experiment_kind": experiment.tags.get("mlflow.experimentKind"),
    "parent": {"run_id": parent.info.run_id, "run_name": parent.info.run_name, "status": parent.info.status,
               "verdict": parent.data.tags.get("verdict"),
               "note_head": parent.data.tags.get("mlflow.note.content", "").splitlines()[:3],
               "worst_margin_pct": {k: v for k, v in parent.data.metrics.items() if k.startswith("worst_margin_pct/")},
               "params_cache_dtype": parent.data.params.get("cache.dtype")},
    "trials": trials,
}
with open(os.path.join(os.environ["OUT"], "readable-gpu.json"), "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)
print(json.dumps(out, indent=1, sort_keys=True))
EOF
