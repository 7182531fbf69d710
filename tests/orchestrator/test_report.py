"""Tests of the sweep report: the terminal table, markdown, CSV and the per-criterion plots.

Run: python -m pytest tests/orchestrator/test_report.py -q

`make_record` and `sample_sweep` build hand-made TrialRecords (tiny odd shapes); the tracking
tests import them too.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from orchestrator.record import CriterionOutcome, TrialRecord
from orchestrator.report import format_csv, format_markdown, format_table, write_plots

# name, figure, op, threshold: a miniature of a milestone's criteria
CRITERIA = (
    ("fill_rate", "fill_rate_pos_s", ">", 125.0),
    ("kv_cache", "kv_cache_gb", "<", 18.0),
    ("token_gen", "decode_tok_s", ">", 20.0),
)
PARAMS = {
    "milestone.context_length": 17,
    "model.num_layers": 3,
    "model.num_heads": 6,
    "model.num_kv_heads": 2,
    "model.head_dim": 5,
    "cache.dtype": "float32",
    "cache.sink_positions": 1,
}


def make_record(index: int = 0, figures: dict[str, float] | None = None, **overrides: Any) -> TrialRecord:
    """A judged TrialRecord. `figures` are judged against CRITERIA (status OK); without
    figures the record is ERROR (criteria unmet, no values). Params via `params={...}` merge
    into PARAMS; any other TrialRecord field can be overridden."""
    params = {**PARAMS, **overrides.pop("params", {})}
    status = overrides.pop("status", "OK" if figures is not None else "ERROR")
    outcomes = []
    if status != "SKIPPED":
        for name, metric, op, threshold in CRITERIA:
            value = None if figures is None else figures.get(metric)
            margin = None if value is None else (value - threshold if op == ">" else threshold - value)
            outcomes.append(CriterionOutcome(name, metric, op, threshold, value,
                                             margin is not None and margin > 0, margin))
    if status == "OK":
        verdict = "PASS" if all(c.passed for c in outcomes) else "FAIL"
    else:
        verdict = status
    fields: dict[str, Any] = dict(
        trial_key=f"key{index:03d}{params['cache.dtype']}{params['milestone.context_length']}",
        index=index, params=params, status=status, verdict=verdict,
        metrics=dict(figures or {}), criteria=tuple(outcomes),
        info={"gpu_name": "cpu", "gpu_uuid": "", "driver_version": "", "cuda_version": "",
              "torch_version": "2.13.0", "hostname": "testhost"},
        started_at=1_700_000_000.0 + 10 * index, finished_at=1_700_000_004.5 + 10 * index,
    )
    fields.update(overrides)
    return TrialRecord(**fields)


def passing(scale: float = 1.0) -> dict[str, float]:
    return {"fill_rate_pos_s": 250.0 * scale, "kv_cache_gb": 9.5 / scale,
            "decode_tok_s": 31.25 * scale, "retrieve_ops_s": 1234.5678}


def sample_sweep() -> list[TrialRecord]:
    """PASS, FAIL (fill rate too low), ERROR (oom), SKIPPED: one of each verdict."""
    return [
        make_record(0, passing()),
        make_record(1, {**passing(), "fill_rate_pos_s": 98.0625}, params={"cache.dtype": "float16"}),
        make_record(2, None, reason="oom: needed 45.1 GB, device has 24.0 GB",
                    params={"milestone.context_length": 33}),
        make_record(3, None, status="SKIPPED", reason="fits on no device: needs 30 GB, largest has 24 GB",
                    params={"cache.dtype": "bfloat16", "milestone.context_length": 65}),
    ]


def test_format_table_has_one_aligned_row_per_trial_with_figures_criteria_and_verdict():
    records = sample_sweep()
    lines = format_table(list(reversed(records))).splitlines()
    header, rule, rows = lines[0], lines[1], lines[2:]
    assert len(rows) == len(records)
    for title in ("dtype", "context", "layers", "heads", "kv_heads", "fill_rate >125",
                  "kv_cache <18", "token_gen >20", "verdict", "reason"):
        assert title in header
    # Rows come in grid order whatever the input order; each ends with its verdict (and reason).
    assert [r.split()[0] for r in rows] == ["0", "1", "2", "3"]
    assert "PASS" in rows[0] and "250.0 ok" in rows[0] and "9.500 ok" in rows[0]
    assert "FAIL" in rows[1] and "98.06 FAIL" in rows[1] and "float16" in rows[1]
    assert "ERROR" in rows[2] and "oom: needed 45.1 GB" in rows[2] and rows[2].count(" - ") >= 2
    assert "SKIPPED" in rows[3] and "bfloat16" in rows[3]
    # Aligned: a text column starts at its title's offset in the rule and in every row.
    for title in ("dtype", "verdict"):
        col = header.index(title)
        assert rule[col] == "-" and rule[col - 1] == " "
        assert all(row[col - 1] == " " and row[col] != " " for row in rows)
    assert {row[header.index("verdict"):].split()[0] for row in rows} == {"PASS", "FAIL", "ERROR", "SKIPPED"}


def test_format_table_without_reasons_or_trials():
    table = format_table([make_record(0, passing()), make_record(1, passing(2.0))])
    assert "reason" not in table and "1,000 ok" not in table and "500.0 ok" in table
    assert format_table([]) == "(no trials)"


def test_markdown_and_csv_summaries():
    records = sample_sweep()
    md = format_markdown(records).splitlines()
    assert len(md) == 2 + len(records) and md[1].startswith("|---|")
    assert all(line.startswith("| ") and line.endswith(" |") for line in md if line != md[1])

    rows = list(csv.DictReader(io.StringIO(format_csv(records))))
    assert [r["verdict"] for r in rows] == ["PASS", "FAIL", "ERROR", "SKIPPED"]
    assert float(rows[0]["retrieve_ops_s"]) == 1234.5678  # full precision, not the table's 1,235
    assert rows[1]["criterion.fill_rate"] == "fail" and rows[1]["criterion.kv_cache"] == "pass"
    assert rows[2]["fill_rate_pos_s"] == "" and rows[3]["criterion.fill_rate"] == ""
    assert rows[2]["reason"].startswith("oom:") and rows[3]["context"] == "65"


def test_write_plots_one_png_per_criterion(tmp_path):
    records = sample_sweep() + [
        make_record(4, passing(0.5), params={"milestone.context_length": 33}),
        make_record(5, passing(0.25), params={"milestone.context_length": 65, "cache.dtype": "float16"}),
    ]
    paths = write_plots(records, tmp_path / "plots", title="smoke")
    assert [p.name for p in paths] == ["fill_rate.png", "kv_cache.png", "token_gen.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_write_plots_tolerates_trials_without_figures(tmp_path):
    # Only errors: a figure per criterion still comes out (threshold only); only skips: none.
    errors = [make_record(i, None, reason="crash") for i in range(2)]
    assert len(write_plots(errors, tmp_path / "e")) == len(CRITERIA)
    skipped = [make_record(0, None, status="SKIPPED", reason="fits nowhere")]
    assert write_plots(skipped, tmp_path / "s") == []
    assert "SKIPPED" in format_table(skipped)


# ---- margins, places, noisy trials, the sweep's line and notes ----------------------------


def noisy(index: int = 0, why: str = "decode: repetitions spread 14.05x (max/min rate), above 2.00x") -> TrialRecord:
    record = make_record(index, {**passing(), "valid": 0.0})
    return TrialRecord(**{**record.__dict__, "info": {**record.info, "invalid_reason": why,
                                                     "device_name": "NVIDIA H200",
                                                     "gpu_uuid": "GPU-3f2a9c1e-0000-1111-2222-333344445555"}})


def test_margins_are_a_percentage_of_the_threshold_in_the_passing_sense():
    from orchestrator.report import margin_pct

    [fill, kv, _] = make_record(0, {**passing(), "fill_rate_pos_s": 126.875}).criteria
    assert margin_pct(fill) == pytest.approx(1.5)  # 1.875 pos/s above 125
    assert margin_pct(kv) == pytest.approx(100 * 8.5 / 18)  # below a "<" threshold: positive
    [fill, *_] = make_record(1, {**passing(), "fill_rate_pos_s": 100.0}).criteria
    assert margin_pct(fill) == pytest.approx(-20.0)
    zero = CriterionOutcome("x", "x", ">", 0.0, 1.0, True, 1.0)
    missing = CriterionOutcome("x", "x", ">", 5.0, None, False, None)
    assert margin_pct(zero) is None and margin_pct(missing) is None
    table = format_table([make_record(0, {**passing(), "fill_rate_pos_s": 126.875})])
    assert "126.9 ok +1.5%" in table and "9.500 ok +47.2%" in table


def test_noisy_trials_are_flagged_and_every_row_says_where_it_ran():
    from orchestrator.report import sweep_verdict_line, verdict_label

    records = [noisy(0), make_record(1, passing())]
    assert verdict_label(records[0]) == "PASS, noisy: decode: repetitions spread 14.05x (max/min rate), above 2.00x"
    assert verdict_label(records[1]) == "PASS"
    lines = format_table(records).splitlines()
    header = lines[0].split()
    assert {"device", "host", "gpu"} <= set(header)
    assert "PASS, noisy: decode: repetitions spread 14.05x" in lines[2] and "GPU-3f2a9c1e" in lines[2]
    assert "GPU-3f2a9c1e-0000" not in lines[2]  # the terminal shortens the UUID ...
    md = format_markdown(records)
    assert "GPU-3f2a9c1e-0000-1111-2222-333344445555" in md and "NVIDIA H200" in md  # ... the others do not
    rows = list(csv.DictReader(io.StringIO(format_csv(records))))
    assert rows[0]["gpu_uuid"] == "GPU-3f2a9c1e-0000-1111-2222-333344445555" and rows[1]["host"] == "testhost"
    assert rows[0]["noisy"].startswith("decode: repetitions") and rows[1]["noisy"] == ""
    assert float(rows[0]["criterion.fill_rate.margin_pct"]) == pytest.approx(100.0)
    assert float(rows[0]["criterion.fill_rate.margin"]) == 125.0
    assert sweep_verdict_line(records, "PASS") == (
        "PASS: 2 of 2 trials passed, 1 noisy (figures to read again, see the verdict column)")
    assert sweep_verdict_line([records[1]], "PASS") == "PASS: 1 of 1 trial passed"


def test_worst_margin_per_criterion_and_the_notes():
    from orchestrator.report import format_sweep_note, format_trial_note, worst_margins

    records = sample_sweep()
    worst = worst_margins(records)
    assert list(worst) == ["fill_rate", "kv_cache", "token_gen"]
    assert worst["fill_rate"][0] == pytest.approx(-21.55) and worst["fill_rate"][1].index == 1
    note = format_sweep_note(records, "FAIL", milestone="m10", title="Milestone 10", status="KILLED")
    assert note.startswith("**FAIL: 1 of 4 trials passed (1 FAIL, 1 ERROR, 1 SKIPPED)** (m10 Milestone 10)")
    assert "The sweep was KILLED" in note and "| fill_rate | -21.6% | #1 float16 ctx=17 L3 H6/2 |" in note
    assert format_markdown(records, reason_width=48).strip() in note
    trial = format_trial_note(records[1])
    assert trial.startswith("**FAIL**  float16 ctx=17 L3 H6/2")
    assert "| fill_rate | fill_rate_pos_s | 98.06 | > 125 | -26.94 | -21.6% | FAIL |" in trial
    assert "Reason: oom" in format_trial_note(records[2])
