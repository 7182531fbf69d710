"""`TrialResult`: what one trial returns to the driver, before it is judged into a record.

    from orchestrator.result import TrialResult
    result = TrialResult.from_dict(run_trial(spec))    # the task's plain dict, typed
    result.status, result.metrics["decode_tok_s"], result.info["worker_pid"]

The Ray task returns the plain dict (`to_dict()`, what orchestrator/trial.py builds and tests
read); the driver turns it into a `TrialResult` as it arrives (orchestrator/scheduler.py), adds
its own side (times, where it ran, a timeout) and judges it into a `TrialRecord`
(orchestrator/verdict.py).

Key decisions:
- Plain values only (floats, strings, lists), so it pickles and round-trips through JSON.
- `from_dict` refuses a dict without a known status or with keys it does not know, so a field a
  trial adds and the driver would drop is caught by the tests rather than lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from orchestrator.record import STATUSES


@dataclass(frozen=True)
class TrialResult:
    """One trial's outcome as the worker (or the driver, for a lost or cancelled one) saw it."""

    status: str  # "OK" (figures measured), "ERROR" (oom, timeout, crash), "SKIPPED" (never ran)
    reason: str = ""  # why ERROR / SKIPPED, e.g. "oom: ..." or "crash: ValueError: ..."
    metrics: dict[str, float] = field(default_factory=dict)  # numeric figures
    info: dict[str, str] = field(default_factory=dict)  # string figures, environment, where it ran
    started_at: float | None = None  # unix seconds; None: not reported (the driver's submission time)
    finished_at: float | None = None  # unix seconds; None: not reported (the driver's receipt time)
    attempt: int | None = None  # which run of the trial this was (1, 2 after a retry, ...)
    retries_exhausted: bool = False  # the task was lost on every attempt it had
    system_metrics: dict[str, list[list[float]]] = field(default_factory=dict)  # name -> [[unix s, value]]

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrialResult":
        """The result of a task's plain dict; ValueError naming the keys it does not know."""
        if isinstance(data, TrialResult):
            return data
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"a trial result holds only {sorted(known)}, got also {unknown}")
        if "status" not in data:
            raise ValueError(f"a trial result needs a status (one of {STATUSES}), got keys {sorted(data)}")
        values = dict(data)
        values["metrics"] = dict(values.get("metrics") or {})
        values["info"] = {k: str(v) for k, v in (values.get("info") or {}).items()}
        values["system_metrics"] = {k: [list(p) for p in v] for k, v in (values.get("system_metrics") or {}).items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict a task returns (keys left out where they were not reported)."""
        data = asdict(self)
        return {k: v for k, v in data.items()
                if not (v is None or (k == "retries_exhausted" and not v))}
