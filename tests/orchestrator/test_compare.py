"""Tests of the sweep comparison (orchestrator/compare.py): the judging, and the command on a
real SQLite store (exit status 0 / 1 / 2, the artifact on the candidate's parent run).

Run: python -m pytest tests/orchestrator/test_compare.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.compare import compare, format_text, judge_change, main
from orchestrator.tracking import Tracker
from test_report import make_record


def rates(fill: float, low: float, high: float, **more: float) -> dict[str, float]:
    """Figures of a trial: a fill rate with its spread, a decode rate, memory."""
    return {"fill_rate_pos_s": fill, "fill_rate_pos_s_min": low, "fill_rate_pos_s_max": high,
            "decode_tok_s": 31.25, "decode_tok_s_min": 30.0, "decode_tok_s_max": 32.0,
            "kv_cache_gb": 9.5, "peak_mem_gb": 10.0, **more}


def test_a_change_counts_only_beyond_the_recorded_spread():
    # overlapping ranges: within the spread, however far the medians moved
    assert judge_change(200.0, 150.0, (140.0, 210.0), (145.0, 200.0), higher_is_better=True) == "~"
    # B's best below A's worst: a rate regressed; B's worst above A's best: improved
    assert judge_change(200.0, 150.0, (190.0, 210.0), (140.0, 160.0), higher_is_better=True) == "regression"
    assert judge_change(150.0, 200.0, (140.0, 160.0), (190.0, 210.0), higher_is_better=True) == "improvement"
    # lower is better (memory): more is a regression; without a spread, beyond 2%
    assert judge_change(10.0, 10.1, None, None, higher_is_better=False) == "~"
    assert judge_change(10.0, 10.5, None, None, higher_is_better=False) == "regression"
    assert judge_change(10.0, 9.0, None, None, higher_is_better=False) == "improvement"


def test_compare_matches_trials_by_key_and_flags_regressions_and_verdicts():
    a = [make_record(0, rates(250.0, 240.0, 260.0)), make_record(1, rates(250.0, 240.0, 260.0),
                                                                  params={"cache.dtype": "float16"}),
         make_record(2, rates(250.0, 240.0, 260.0), params={"milestone.context_length": 33})]
    b = [make_record(0, rates(300.0, 280.0, 320.0)),  # improved beyond the spread
         make_record(1, rates(100.0, 90.0, 110.0), params={"cache.dtype": "float16"}),  # fails fill_rate now
         make_record(3, rates(250.0, 240.0, 260.0), params={"milestone.context_length": 65})]
    result = compare(a, b, "A", "B")
    assert [t.trial_key for t in result.trials] == [a[0].trial_key, a[1].trial_key]
    assert result.only_a == ("#2 float32 ctx=33 L3 H6/2",) and result.only_b == ("#3 float32 ctx=65 L3 H6/2",)
    first, second = result.trials
    fill = {f.figure: f for f in first.figures}["fill_rate_pos_s"]
    assert (fill.a, fill.b, fill.ratio, fill.change) == (250.0, 300.0, 1.2, "improvement")
    assert first.regressions == [] and {f.figure: f.change for f in first.figures}["peak_mem_gb"] == "~"
    assert second.verdict_a == "PASS" and second.verdict_b == "FAIL"
    assert second.regressions == ["verdict", "fill_rate_pos_s"] and result.regressed
    text = format_text(result)
    assert "verdict PASS -> FAIL  REGRESSION (verdict)" in text
    assert "2 trials compared: 2 regressions, 1 improvements" in text
    assert not compare(a[:1], b[:1]).regressed


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory):
    """A SQLite store with two complete sweeps of one grid: the second regressed on trial 1."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('compare') / 'mlflow.db'}"
    tracker = Tracker(uri, "kvbench-smoke")
    ids = []
    for n, fill in enumerate((250.0, 100.0)):
        records = [make_record(0, rates(250.0, 240.0, 260.0)),
                   make_record(1, rates(fill, fill - 5, fill + 5), params={"cache.dtype": "float16"})]
        parent = tracker.start_sweep(milestone="smoke", sweep_key=f"sweep{n:04d}", resume=False)
        for record in records:
            tracker.log_trial(parent, record)
        tracker.finish_sweep(parent, records, status="FINISHED")
        ids.append(parent)
    return uri, ids


def test_the_command_exits_1_on_a_regression_and_logs_the_comparison(two_sweeps, capsys):
    uri, (old, new) = two_sweeps
    assert main([old, new, "--tracking-uri", uri]) == 1
    out = capsys.readouterr().out
    assert "regression: float16 ctx=17 L3 H6/2: fill_rate_pos_s" in out
    assert f"logged to B's parent run {new}" in out
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(new, "compare")}
    assert logged == {f"compare/vs-{old[:8]}.md", f"compare/vs-{old[:8]}.json"}
    data = json.loads(Path(client.download_artifacts(new, f"compare/vs-{old[:8]}.json")).read_text())
    assert data["regressed"] is True and len(data["trials"]) == 2
    # the same sweeps the other way round: an improvement, exit 0; --last 2 finds them by milestone
    assert main([new, old, "--tracking-uri", uri, "--no-log"]) == 0
    assert main(["--last", "2", "--milestone", "smoke", "--tracking-uri", uri, "--no-log"]) == 1


@pytest.mark.parametrize("argv, message", [
    (["only-one"], "expected two sweeps"),
    (["--last", "3", "--milestone", "smoke"], "expected 3 complete sweeps of milestone 'smoke'"),
    (["--last", "2"], "expected --last N (N >= 2) with --milestone NAME"),
    (["0" * 32, "1" * 32], "RESOURCE_DOES_NOT_EXIST|expected a run of the store"),
])
def test_bad_input_exits_2_with_one_line(two_sweeps, capsys, argv, message):
    uri, _ = two_sweeps
    assert main([*argv, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compare: error: ") and len(err.splitlines()) == 1
    assert any(part in err for part in message.split("|"))
