"""The verdict: a trial's result judged against the milestone's criteria into its record, and
the sweep's verdict and exit status.

    from orchestrator.verdict import make_record, sweep_verdict, exit_status
    record = make_record(spec, result, criteria)   # result: TrialResult (or its plain dict)
    sweep_verdict(records, status="FINISHED")      # "PASS" or "FAIL"

Key decisions:
- A trial that did not run to the end (ERROR, SKIPPED) is not judged: it has no criterion
  outcomes, and its verdict is its status (orchestrator.criteria `verdict`).
- A sweep PASSes only when it ran to the end (status FINISHED: a KILLED or FAILED sweep has
  trials it never ran), holds at least one trial and every trial PASSed. The driver's ending,
  the parent run's `verdict` tag and the exit status all come from here.
- Pure functions of plain values: no Ray, no MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.criteria import Criterion, judge, verdict
from orchestrator.grid import TrialSpec
from orchestrator.record import TrialRecord
from orchestrator.result import TrialResult

__all__ = ["exit_status", "judge", "make_record", "skipped_record", "sweep_verdict", "verdict"]


def make_record(spec: TrialSpec, result: TrialResult | Mapping[str, Any], criteria: Sequence[Criterion],
                attempts: int | None = None) -> TrialRecord:
    """Judge a trial's result into its record. `attempts`: how many times it ran (default: the
    result's `attempt`, else 1)."""
    result = TrialResult.from_dict(result)
    outcomes = judge(result.metrics, criteria) if result.status == "OK" else ()
    return TrialRecord(
        trial_key=spec.key,
        index=spec.index,
        params=dict(spec.params),
        status=result.status,
        verdict=verdict(result.status, outcomes),
        reason=result.reason,
        metrics=dict(result.metrics),
        info=dict(result.info),
        criteria=outcomes,
        attempts=(result.attempt or 1) if attempts is None else attempts,
        started_at=result.started_at or 0.0,
        finished_at=result.finished_at or 0.0,
        system_metrics={k: [list(p) for p in v] for k, v in result.system_metrics.items()},
    )


def skipped_record(spec: TrialSpec, reason: str, criteria: Sequence[Criterion]) -> TrialRecord:
    """The record of a trial that never started (it fits on no device), with its reason."""
    now = time.time()
    return make_record(spec, TrialResult("SKIPPED", reason, started_at=now, finished_at=now), criteria,
                       attempts=0)


def sweep_verdict(records: Sequence[TrialRecord], status: str) -> str:
    """PASS when the sweep ran to the end (`status` FINISHED) and every one of its trials
    (at least one) passed; FAIL otherwise."""
    return "PASS" if status == "FINISHED" and records and all(r.verdict == "PASS" for r in records) else "FAIL"


def exit_status(records: Sequence[TrialRecord]) -> int:
    """The command's exit status of a sweep that ran to the end: 0 when there are trials and
    every one passed; 1 otherwise."""
    return 0 if sweep_verdict(records, "FINISHED") == "PASS" else 1
