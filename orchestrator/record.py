"""The trial record: what one trial of a sweep produced, as plain data.

A `TrialRecord` is what crosses every boundary of the orchestrator: the Ray task returns the
benchmark's figures, the driver judges them into a record, the tracking layer writes the record
to MLflow (or to the local spool when MLflow is away) and the report prints it. It holds only
plain values, so it pickles across processes and round-trips through JSON unchanged.

Statuses and verdicts:
- `status` says whether the trial ran: OK (figures measured), ERROR (it ran and failed: oom,
  timeout, crash), SKIPPED (never started, e.g. it fits on no device).
- `verdict` is the judgement: PASS / FAIL (status OK, every criterion met or not), ERROR, SKIPPED.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

STATUSES = ("OK", "ERROR", "SKIPPED")
VERDICTS = ("PASS", "FAIL", "ERROR", "SKIPPED")


@dataclass(frozen=True)
class CriterionOutcome:
    """One criterion judged against one figure, e.g. fill_rate: fill_rate_pos_s > 125."""

    name: str  # criterion name as in the milestone config, e.g. "fill_rate"
    metric: str  # the benchmark figure it reads, e.g. "fill_rate_pos_s"
    op: str  # ">" (figure must exceed threshold) or "<" (figure must stay below)
    threshold: float
    value: float | None  # None when the figure is missing (trial errored or skipped)
    passed: bool
    margin: float | None  # value - threshold for ">", threshold - value for "<"; > 0 passes


@dataclass(frozen=True)
class TrialRecord:
    """Everything recorded about one trial; JSON round-trip safe."""

    trial_key: str  # stable hash of the trial's configuration
    index: int  # position in the expanded grid
    params: dict[str, Any]  # flattened trial configuration, e.g. {"model.num_layers": 32, ...}
    status: str  # one of STATUSES
    verdict: str  # one of VERDICTS
    reason: str = ""  # why ERROR / SKIPPED (e.g. "oom: needed 23.1 GB, device has 22.0 GB")
    metrics: dict[str, float] = field(default_factory=dict)  # numeric benchmark figures
    info: dict[str, str] = field(default_factory=dict)  # string figures and environment
    criteria: tuple[CriterionOutcome, ...] = ()
    attempts: int = 1
    started_at: float = 0.0  # unix seconds
    finished_at: float = 0.0  # unix seconds
    # sampled while the trial ran (orchestrator/sampler.py): name -> [[unix s, value], ...],
    # e.g. "cpu_utilization_percentage", "gpu_0_power_usage_watts"
    system_metrics: dict[str, list[list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.status in STATUSES, f"unknown status {self.status!r}"
        assert self.verdict in VERDICTS, f"unknown verdict {self.verdict!r}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrialRecord":
        data = json.loads(text)
        data["criteria"] = tuple(CriterionOutcome(**c) for c in data.get("criteria", ()))
        return cls(**data)
