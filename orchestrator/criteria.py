"""Pass/fail criteria of a milestone and their judgement: plain functions of plain values.

A criterion names the benchmark figure it reads, e.g. `fill_rate: fill_rate_pos_s > 125`.
`judge(figures, criteria)` compares each criterion with the trial's figures and returns one
`CriterionOutcome` per criterion; `verdict(status, outcomes)` turns a trial's status and
outcomes into PASS / FAIL / ERROR / SKIPPED.

The criteria every milestone judges and their defaults (metric, op) are declared once, in
conf/config.yaml's `milestone.criteria` (the columns of the milestone table); a milestone file
gives their thresholds, and may change a metric or op or add criteria (orchestrator/config.py).

Key decisions:
- Comparisons are strict, as the milestone table writes them ("fill rate > 125").
- A missing or non-finite figure fails its criterion with value and margin None: a benchmark
  that did not produce a figure never passes on it.
- margin > 0 means passed with room to spare, in the figure's unit: value - threshold for
  ">", threshold - value for "<".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator.record import CriterionOutcome

OPS = (">", "<")


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Criterion:
    """One criterion of a milestone: `metric op threshold`, e.g. decode_tok_s > 20."""

    name: str  # e.g. "token_gen"
    metric: str  # the benchmark figure it reads, e.g. "decode_tok_s"
    op: str  # ">" or "<"
    threshold: float

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(
                f"criterion {self.name!r}: op must be one of {list(OPS)}, got {self.op!r}; "
                f'write e.g. op: ">"'
            )
        if not _is_finite_number(self.threshold):
            raise ValueError(
                f"criterion {self.name!r}: threshold must be a finite number, got {self.threshold!r}"
            )

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


# bench.decode=model: the figures of the real model that replace the proxy's in criteria
MODEL_METRICS = {"decode_tok_s": "model_decode_tok_s", "total_vram_gb": "model_total_vram_gb"}


def for_model_decode(criteria: Sequence[Criterion]) -> tuple[Criterion, ...]:
    """The criteria of a bench.decode=model sweep: token generation (and total VRAM) judge the
    real model's figures instead of the proxy's; criteria naming other figures are unchanged."""
    return tuple(Criterion(c.name, MODEL_METRICS.get(c.metric, c.metric), c.op, c.threshold) for c in criteria)


def judge(figures: Mapping[str, float], criteria: Sequence[Criterion]) -> tuple[CriterionOutcome, ...]:
    """One outcome per criterion, in the criteria's order."""
    outcomes = []
    for criterion in criteria:
        value = figures.get(criterion.metric)
        if not _is_finite_number(value):
            value = margin = None
        else:
            value = float(value)
            margin = value - criterion.threshold if criterion.op == ">" else criterion.threshold - value
        outcomes.append(
            CriterionOutcome(
                name=criterion.name,
                metric=criterion.metric,
                op=criterion.op,
                threshold=float(criterion.threshold),
                value=value,
                passed=margin is not None and margin > 0,
                margin=margin,
            )
        )
    return tuple(outcomes)


def verdict(status: str, outcomes: Sequence[CriterionOutcome]) -> str:
    """PASS when the trial ran and met every criterion (there must be at least one)."""
    if status == "ERROR":
        return "ERROR"
    if status == "SKIPPED":
        return "SKIPPED"
    assert status == "OK", f"unknown status {status!r}"
    return "PASS" if outcomes and all(o.passed for o in outcomes) else "FAIL"
