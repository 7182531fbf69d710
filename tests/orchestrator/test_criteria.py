"""Tests of criteria judgement and verdicts (orchestrator/criteria.py): plain values.

Run: python -m pytest tests/orchestrator/test_criteria.py -q
"""

from __future__ import annotations

import math

import pytest

from orchestrator.criteria import Criterion, judge, verdict
from orchestrator.record import CriterionOutcome

FILL = Criterion("fill_rate", "fill_rate_pos_s", ">", 125.0)
KV = Criterion("kv_cache", "kv_cache_gb", "<", 18.0)


def test_above_and_below_with_margins():
    fill, kv = judge({"fill_rate_pos_s": 200.0, "kv_cache_gb": 17.25}, [FILL, KV])
    assert fill == CriterionOutcome("fill_rate", "fill_rate_pos_s", ">", 125.0, 200.0, True, 75.0)
    assert kv == CriterionOutcome("kv_cache", "kv_cache_gb", "<", 18.0, 17.25, True, 0.75)


def test_failing_figures_have_negative_margins():
    fill, kv = judge({"fill_rate_pos_s": 100.0, "kv_cache_gb": 20.0}, [FILL, KV])
    assert (fill.passed, fill.margin) == (False, -25.0)
    assert (kv.passed, kv.margin) == (False, -2.0)


def test_comparisons_are_strict():
    fill, kv = judge({"fill_rate_pos_s": 125, "kv_cache_gb": 18}, [FILL, KV])
    assert not fill.passed and fill.margin == 0.0
    assert not kv.passed and kv.margin == 0.0


@pytest.mark.parametrize("figures", [{}, {"fill_rate_pos_s": math.nan}, {"fill_rate_pos_s": math.inf},
                                     {"fill_rate_pos_s": "fast"}, {"fill_rate_pos_s": True}])
def test_missing_or_non_finite_figure_fails_without_value(figures):
    (outcome,) = judge(figures, [FILL])
    assert (outcome.value, outcome.passed, outcome.margin) == (None, False, None)


def test_outcomes_keep_the_criteria_order():
    assert [o.name for o in judge({}, [KV, FILL])] == ["kv_cache", "fill_rate"]


def test_verdicts():
    passing = judge({"fill_rate_pos_s": 200.0, "kv_cache_gb": 1.0}, [FILL, KV])
    failing = judge({"fill_rate_pos_s": 200.0, "kv_cache_gb": 19.0}, [FILL, KV])
    assert verdict("OK", passing) == "PASS"
    assert verdict("OK", failing) == "FAIL"
    assert verdict("OK", ()) == "FAIL", "no criteria: nothing was shown to pass"
    assert verdict("ERROR", passing) == "ERROR"
    assert verdict("SKIPPED", ()) == "SKIPPED"


@pytest.mark.parametrize("op, threshold, message", [
    (">=", 1.0, r"op must be one of \['>', '<'\], got '>='"),
    (">", math.nan, "threshold must be a finite number"),
    ("<", "18", "threshold must be a finite number"),
])
def test_bad_criteria_are_value_errors(op, threshold, message):
    with pytest.raises(ValueError, match=message):
        Criterion("kv_cache", "kv_cache_gb", op, threshold)


def test_str_reads_like_the_table():
    assert str(FILL) == "fill_rate_pos_s > 125"
