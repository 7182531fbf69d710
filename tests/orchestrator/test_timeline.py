"""Tests of the sweep timeline: busy fractions, the driver's overhead per trial, overlap and
speed-up from records built here (hand-computed figures), then read back from a real SQLite
MLflow store and from a spool file through `python -m orchestrator.timeline`'s main.

Run: python -m pytest tests/orchestrator/test_timeline.py -q
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import timeline as tl
from orchestrator.record import TrialRecord

NODE_A, NODE_B = "a" * 56, "b" * 56
GPU_A, GPU_B = "GPU-0000aaaa-1111-2222-3333-444455556666", "GPU-0000bbbb-1111-2222-3333-444455556666"


def make_record(index: int, start: float, end: float, device: str | None = None, node: str | None = None,
                submitted: float | None = None, received: float | None = None, **overrides: Any) -> TrialRecord:
    """A finished trial with the driver's fields when given (older records have none)."""
    info = {"trial_device": "cpu"}
    if device is not None:
        info["device_key"] = device
    if node is not None:
        info["node_id"] = node
    if submitted is not None:
        info["driver_submitted_at"] = f"{submitted:.6f}"
    if received is not None:
        info["driver_received_at"] = f"{received:.6f}"
    fields = dict(trial_key=f"{index:016x}", index=index, params={"cache.dtype": "float32"}, status="OK",
                  verdict="PASS", info=info, started_at=start, finished_at=end)
    fields.update(overrides)
    return TrialRecord(**fields)


def two_card_sweep() -> list[TrialRecord]:
    """Card A runs three trials back to back, card B one long one; one trial fit nowhere."""
    return [
        make_record(0, 100.0, 110.0, GPU_A, NODE_A, submitted=99.5, received=110.2),
        make_record(1, 100.5, 118.5, GPU_B, NODE_A, submitted=99.6, received=118.6),
        make_record(2, 111.0, 121.0, GPU_A, NODE_A, submitted=110.7, received=121.1),
        make_record(3, 122.0, 125.0, GPU_A, NODE_A, submitted=121.6, received=125.5),
        make_record(4, 0.0, 0.0, status="SKIPPED", verdict="SKIPPED", reason="needs 90 GB"),
    ]


def test_wall_busy_fraction_and_overlap_of_two_cards():
    t = tl.sweep_timeline(two_card_sweep(), "two", driver_wall_s=26.0)
    assert (t.trials, t.skipped, t.wall_s, t.driver_wall_s) == (4, 1, 25.0, 26.0)
    assert t.trials_per_s == pytest.approx(4 / 25)
    a, b = t.devices
    assert (a.device, a.trials, b.device, b.trials) == (GPU_A, 3, GPU_B, 1)
    assert a.busy_s == pytest.approx(23.0) and a.busy_fraction == pytest.approx(23 / 25)
    assert b.busy_s == pytest.approx(18.0) and b.busy_fraction == pytest.approx(18 / 25)
    # B runs 100.5..118.5 while A runs 100..110 and 111..121: 9.5 s + 7.5 s with two at once
    assert t.max_concurrent == 2 and t.overlap_s == pytest.approx(17.0)


def test_overhead_per_device_result_to_next_start_and_its_parts():
    a, b = tl.sweep_timeline(two_card_sweep()).devices
    # A: results at 110.2 and 121.1, next starts at 111.0 and 122.0
    assert a.gaps.result_to_start == tl.Stats(2, pytest.approx(0.85), pytest.approx(0.89), pytest.approx(0.9))
    assert a.gaps.result_to_submit.median == pytest.approx(0.5) and a.gaps.result_to_submit.max == pytest.approx(0.5)
    assert a.gaps.submit_to_start == tl.Stats(3, pytest.approx(0.4), pytest.approx(0.48), pytest.approx(0.5))
    # B ran one trial: no gap between trials, one submit-to-start latency
    assert b.gaps.result_to_start is None and b.gaps.submit_to_start.max == pytest.approx(0.9)
    whole = tl.sweep_timeline(two_card_sweep()).gaps
    assert whole.submit_to_start.n == 4 and whole.submit_to_start.max == pytest.approx(0.9)
    assert whole.finish_to_result == tl.Stats(4, pytest.approx(0.15), pytest.approx(0.41), pytest.approx(0.5))


def test_gaps_follow_start_order_on_one_device_whatever_the_record_order():
    records = [make_record(i, 100 + 10.0 * i, 109 + 10.0 * i, GPU_A, NODE_A, submitted=99.5 + 10.0 * i,
                           received=109.2 + 10.0 * i) for i in (2, 0, 1)]  # out of order on purpose
    t = tl.sweep_timeline(records)
    assert t.max_concurrent == 1 and t.overlap_s == 0.0
    assert t.devices[0].gaps.result_to_start == tl.Stats(2, pytest.approx(0.8), pytest.approx(0.8), pytest.approx(0.8))
    assert "overlapped | no: at most 1 at once" in tl.format_sweep(t)


def test_back_to_back_trials_on_two_devices_do_not_count_as_overlap():
    records = [make_record(0, 10.0, 15.0, GPU_A), make_record(1, 15.0, 19.0, GPU_B)]
    t = tl.sweep_timeline(records)
    assert (t.max_concurrent, t.overlap_s, t.wall_s) == (1, 0.0, 9.0)


def test_records_without_the_driver_fields_say_na():
    old = [make_record(0, 100.0, 104.0), make_record(1, 104.5, 106.0)]
    t = tl.sweep_timeline(old, "old")
    assert (t.trials, t.wall_s, t.devices, t.unplaced) == (2, 6.0, (), 2)
    assert t.gaps == tl.Gaps()
    text = tl.format_sweep(t)
    assert "| wall time, first start to last finish | 6.00 s |" in text
    assert "| driver wall time (sweep_wall_s) | n/a |" in text
    assert "| devices | n/a |" in text and "overlapped | n/a (the records name no device)" in text
    assert "Per device" not in text
    assert "| result -> next start (device idle between trials) | 0 | n/a | n/a | n/a |" in text


def test_a_sweep_without_any_trial_that_ran():
    t = tl.sweep_timeline([make_record(0, 0.0, 0.0, status="SKIPPED", verdict="SKIPPED")])
    assert (t.trials, t.skipped, t.wall_s, t.trials_per_s) == (0, 1, None, None)
    assert "| wall time, first start to last finish | n/a |" in tl.format_sweep(t)
    assert "| trials run | 0 (and 1 SKIPPED) |" in tl.format_sweep(t)


def test_markdown_per_device_rows_and_speedup():
    one = [make_record(i, 100.0 + 10 * i, 109.0 + 10 * i, GPU_A, NODE_A, submitted=99.0 + 10 * i,
                       received=109.5 + 10 * i) for i in range(4)]  # 39 s on one card
    two = two_card_sweep()  # 25 s on two
    t1, t2 = tl.sweep_timeline(one, "one", 40.0), tl.sweep_timeline(two, "two", 26.0)
    text = tl.format_timelines([t1, t2], baseline=(0, 1))
    assert f"| {GPU_A} | 3 | 23.00 | 92.0 % | 0.850 | 0.890 | 0.900 | 0.400 | 0.480 | 0.500 |" in text
    assert f"| {GPU_B} | 1 | 18.00 | 72.0 % | n/a | n/a | n/a | 0.900 | 0.900 | 0.900 |" in text
    assert "| wall time, first start to last finish (s) | 39.00 | 25.00 | 1.56x |" in text
    assert "| driver wall time (s) | 40.00 | 26.00 | 1.54x |" in text
    assert tl.speedup(t1, tl.sweep_timeline(two)) == {"wall": pytest.approx(39 / 25), "driver_wall": None}


def test_one_sweep_key_run_twice_is_told_apart_by_run_id():
    a = tl.sweep_timeline(two_card_sweep(), "095d2c96", meta={"parent run": "6442201e" + "0" * 24})
    b = tl.sweep_timeline(two_card_sweep(), "095d2c96", meta={"parent run": "72a117e7" + "0" * 24})
    text = tl.format_timelines([a, b], baseline=(0, 1))
    assert "## 095d2c96 run 6442201e" in text and "## 095d2c96 run 72a117e7" in text
    assert "|  | 095d2c96 run 6442201e | 095d2c96 run 72a117e7 | speed-up |" in text


def test_cpu_node_devices_are_shortened_in_the_table():
    t = tl.sweep_timeline([make_record(0, 1.0, 2.0, f"{NODE_A}:cpu", NODE_A)])
    assert "| aaaaaaaaaaaa…:cpu | 1 |" in tl.format_sweep(t)


def test_percentile_matches_linear_interpolation():
    assert tl.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert tl.percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 90) == pytest.approx(9.1)
    assert tl.percentile([7.0], 90) == 7.0
    with pytest.raises(ValueError, match="expected at least one value"):
        tl.percentile([], 50)


# ---- reading back -------------------------------------------------------------------------


def test_reads_sweeps_back_from_a_sqlite_store_by_run_id_and_key_prefix(tmp_path, capsys):
    from orchestrator.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, experiment="kvbench-smoke")
    keys = {}
    for label, records in (("one", two_card_sweep()[:1]), ("two", two_card_sweep())):
        key = ("1" if label == "one" else "2") * 16
        parent = tracker.start_sweep(milestone="smoke", sweep_key=key)
        for record in records:
            tracker.log_trial(parent, record)
        tracker.finish_sweep(parent, records, metrics={"sweep_wall_s": 26.0 if label == "two" else 11.0})
        keys[label] = (key, parent)
    argv = ["--tracking-uri", uri, "--baseline", keys["one"][0][:6], keys["two"][1]]
    assert tl.main(argv) == 0
    text = capsys.readouterr().out
    assert f"| parent run | {keys['two'][1]} |" in text and "| experiment | kvbench-smoke |" in text
    assert "| trials run | 4 (and 1 SKIPPED) |" in text and "| driver wall time (sweep_wall_s) | 26.00 s |" in text
    assert f"| {GPU_A} | 3 | 23.00 | 92.0 % |" in text
    assert "| wall time, first start to last finish (s) | 10.00 | 25.00 | 0.40x |" in text

    assert tl.main(["--tracking-uri", uri, "--experiment", "kvbench-smoke", "feedbeef"]) == 2
    assert "no sweep's key starts with" in capsys.readouterr().err
    assert tl.main(["--tracking-uri", uri, "--experiment", "nope", keys["two"][0]]) == 2
    assert "expected an existing MLflow experiment" in capsys.readouterr().err
    child = tracker.client.search_runs([tracker.experiment_id], "tags.run_type = 'trial'")[0].info.run_id
    assert tl.main(["--tracking-uri", uri, child]) == 2
    assert "expected the parent run of a sweep" in capsys.readouterr().err
    assert tl.main(["--tracking-uri", uri, "0" * 32]) == 2
    assert "expected a run of the store" in capsys.readouterr().err


def test_reads_a_spool_file(tmp_path, capsys):
    from orchestrator.spool import Spool

    spool = Spool(tmp_path, "abcdef0123456789")
    spool.write_sweep(f"sqlite:///{tmp_path / 'x.db'}", "kvbench-smoke", "smoke")
    for record in two_card_sweep():
        spool.write_trial(record)
    spool.write_finish("FINISHED", {"sweep_wall_s": 26.0})
    spool.close()
    assert tl.main([str(spool.path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Sweep timelines\n\n## smoke abcdef01")
    assert "| trials run | 4 (and 1 SKIPPED) |" in text and "| driver wall time (sweep_wall_s) | 26.00 s |" in text


def test_no_sweep_given_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        tl.main([])
    assert exc.value.code == 2 and "expected at least one sweep" in capsys.readouterr().err
