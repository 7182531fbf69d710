"""Tests of the local spool and `python -m orchestrator.sync` against a real SQLite store.

Run: python -m pytest tests/orchestrator/test_spool.py -q

(The real `mlflow server` killed mid-sweep, then restarted before sync, is in test_faults.py.)
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from mlflow import MlflowClient

from mlflow_server import free_port
from orchestrator.spool import SYNCED_DIR, Spool, read_spool, spooled_trial_keys, sync_spool
from orchestrator.sync import main as sync_main
from orchestrator.tracking import Tracker
from test_report import make_record, passing, sample_sweep
from test_tracking import children, parents, shared_store

SECRET = "hunter2-s3cr3t"


@pytest.fixture
def store(tmp_path_factory) -> str:
    return shared_store(tmp_path_factory)


def write_spool(directory, uri, experiment, records, finish="FINISHED", parent_id=None, key="sweep0100"):
    with Spool(directory, key) as spool:
        spool.write_sweep(uri=uri, experiment=experiment, milestone="smoke", tags={"overrides": "x=1"},
                          params={"bench.repetitions": 3}, config_yaml="a: 1\n", parent_id=parent_id)
        for record in records:
            spool.write_trial(record)
        if finish:
            spool.write_finish(finish)
    return directory / f"{key}.jsonl"


def test_spool_round_trip_survives_a_torn_line(tmp_path):
    records = sample_sweep()
    path = write_spool(tmp_path, "sqlite:////x/mlflow.db", "kvbench-smoke", records[:2], finish=None)
    assert all(json.loads(line) for line in path.read_text().splitlines())
    with open(path, "ab") as f:  # a crash in the middle of a line
        f.write(b'{"kind": "trial", "record": {"trial_ke')
    assert spooled_trial_keys(tmp_path, "sweep0100") == {r.trial_key for r in records[:2]}

    with Spool(tmp_path, "sweep0100") as spool:  # the resumed driver appends after the torn line
        for record in records[2:]:
            spool.write_trial(record)
        spool.write_finish("KILLED")
    spooled = read_spool(path)
    assert spooled.torn == 1 and spooled.finish == "KILLED"
    assert list(spooled.records.values()) == records
    assert spooled.header["milestone"] == "smoke" and spooled.header["experiment"] == "kvbench-smoke"
    assert "parent_id" not in spooled.header


def test_spool_holds_no_secrets_and_one_writer(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVICE_PASSWORD", SECRET + "-env")
    with Spool(tmp_path, "sweep0101") as spool:
        spool.write_sweep(uri=f"https://bench:{SECRET}@mlflow.example.org", experiment="e",
                          milestone="smoke", tags={"ray_token": "t0k3n-value"},
                          params={"tracking.password": SECRET, "note": f"uses {SECRET}-env"},
                          config_yaml=f"tracking:\n  password: {SECRET}\n")
        with pytest.raises(BlockingIOError, match="locked by another process"):
            Spool(tmp_path, "sweep0101", lock_wait_s=0.2)
        assert sync_spool(tmp_path / "sweep0101.jsonl") is None  # a writer holds it: untouched
    text = (tmp_path / "sweep0101.jsonl").read_text()
    assert SECRET not in text and "t0k3n-value" not in text and "https://bench:***@mlflow" in text
    # Sync cannot upload to a masked URI without being told where.
    assert sync_main(["--spool", str(tmp_path)]) == 1


def test_sync_uploads_a_spooled_sweep_exactly_once(tmp_path, store):
    experiment = "kvbench-spooled"
    records = sample_sweep()
    path = write_spool(tmp_path, store, experiment, records)
    parent_id, n = sync_spool(path)
    assert n == 4 and not path.exists()
    [synced] = (tmp_path / SYNCED_DIR).iterdir()

    client = MlflowClient(store)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    [parent] = parents(client, experiment_id)
    assert parent.info.run_id == parent_id and parent.info.status == "FAILED"  # complete, not passed
    assert parent.data.tags["verdict"] == "FAIL" and parent.data.metrics["n_trials"] == 4
    assert parent.data.params == {"bench.repetitions": "3"} and parent.data.tags["overrides"] == "x=1"
    runs = children(client, parent_id)
    assert sorted(r.data.tags["trial_key"] for r in runs) == sorted(r.trial_key for r in records)

    # Sync again (say it died after uploading, before moving the file): nothing doubles, even
    # though the sweep it finished would not be resumed: the spool remembered its parent.
    shutil.copy(synced, path)
    assert sync_spool(path)[0] == parent_id
    assert len(parents(client, experiment_id)) == 1 and len(children(client, parent_id)) == 4


def test_sync_continues_the_parent_started_before_the_outage(tmp_path, store):
    experiment = "kvbench-outage"
    records = sample_sweep()
    tracker = Tracker(store, experiment=experiment)
    parent_id = tracker.start_sweep(milestone="smoke", sweep_key="sweep0102")
    tracker.log_trial(parent_id, records[0])
    # The store went away: the rest of the sweep, the first trial again included, is spooled.
    path = write_spool(tmp_path, store, experiment, records, parent_id=parent_id, key="sweep0102")
    rerun = make_record(9, passing(3.0), trial_key=records[0].trial_key)
    with Spool(tmp_path, "sweep0102") as spool:  # a later line for the same trial wins
        spool.write_trial(rerun)

    assert sync_main(["--spool", str(tmp_path)]) == 0 and not path.exists()
    client = MlflowClient(store)
    assert [p.info.run_id for p in parents(client, tracker.experiment_id)] == [parent_id]
    runs = {r.data.tags["trial_key"]: r for r in children(client, parent_id)}
    assert len(runs) == 4 and runs[rerun.trial_key].data.metrics["fill_rate_pos_s"] == 750.0
    assert client.get_run(parent_id).data.tags["verdict"] == "FAIL"


def test_sync_exit_status_when_the_store_is_away(tmp_path, store):
    assert sync_main(["--spool", str(tmp_path / "none")]) == 0
    assert sync_main(["--spool", str(tmp_path), "--tracking-uri", "ftp://x"]) == 2
    dead = f"http://127.0.0.1:{free_port()}"
    path = write_spool(tmp_path, dead, "kvbench-later", [make_record(0, passing())], key="sweep0103")
    assert sync_main(["--spool", str(tmp_path)]) == 1 and path.exists()  # kept for later
    assert sync_main(["--spool", str(tmp_path), "--tracking-uri", store]) == 0 and not path.exists()
    assert os.listdir(tmp_path / SYNCED_DIR)
