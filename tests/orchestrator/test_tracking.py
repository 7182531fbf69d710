"""Tests of MLflow tracking against real stores: SQLite under tmp_path, and an `mlflow server` address
where nothing listens. (A real server killed mid-sweep, restarted, then `python -m orchestrator.sync`
is in test_faults.py, through the whole driver.)

Run: python -m pytest tests/orchestrator/test_tracking.py -q

Every check reads the store back with a fresh MlflowClient, never through the Tracker. One
SQLite database serves the session (`shared_store`: its migrations take seconds); each test
writes to its own experiment, so tests stay independent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_server import free_port
from orchestrator.record import TrialRecord
from orchestrator.tracking import (
    Tracker,
    TrackingUnavailable,
    is_secret_name,
    redact,
    redact_text,
    redact_yaml,
    resolve_tracking_uri,
)
from test_report import make_record, passing, sample_sweep

REPO = Path(__file__).resolve().parents[2]
SECRET = "hunter2-s3cr3t"
CONFIG_YAML = f"""\
milestone:
  name: smoke
tracking:
  uri: postgresql://bench:{SECRET}@db.internal/mlflow
  password: {SECRET}
grid:
  cache.dtype: [float32, float16]
"""


_shared_store: list[str] = []


def shared_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One migrated SQLite store for the whole test session (migrations take seconds)."""
    if not _shared_store:
        uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
        Tracker(uri, experiment="warm-up")
        _shared_store.append(uri)
    return _shared_store[0]


@pytest.fixture
def store(tmp_path_factory) -> str:
    return shared_store(tmp_path_factory)


@pytest.fixture
def tracker(store, request) -> Tracker:
    return Tracker(store, experiment=f"kvbench-{request.node.name}")


def children(client: MlflowClient, parent_id: str) -> list:
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def parents(client: MlflowClient, experiment_id: str) -> list:
    runs = client.search_runs([experiment_id])
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("run_type") != "lock"]


# ---- URI -----------------------------------------------------------------------------------


def test_resolve_tracking_uri_defaults_env_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/env.db")
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path}/runs/env.db"
    # The config wins over the environment.
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == f"sqlite:///{tmp_path}/x.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("file:./mlruns", tmp_path) == f"file://{tmp_path}/mlruns"
    assert resolve_tracking_uri("file:///abs/mlruns", tmp_path) == "file:///abs/mlruns"
    assert resolve_tracking_uri("mlruns", tmp_path) == f"file://{tmp_path}/mlruns"
    for remote in ("http://127.0.0.1:5000", "https://mlflow.example.org",
                   "postgresql+psycopg2://u@db/mlflow", "mysql://u@db/mlflow", "databricks"):
        assert resolve_tracking_uri(remote, tmp_path) == remote


def test_resolve_tracking_uri_rejects_unknown_scheme_and_memory(tmp_path, monkeypatch):
    with pytest.raises(ValueError) as error:
        resolve_tracking_uri(f"ftp://bench:{SECRET}@host/x", tmp_path)
    message = str(error.value)
    assert "'ftp'" in message and "sqlite, file, http, https" in message and "Fix:" in message
    assert f"sqlite:///{tmp_path}/mlflow.db" in message and SECRET not in message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "s3://bucket/x")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI='s3://bucket/x' has the scheme 's3'"):
        resolve_tracking_uri(None, tmp_path)
    for memory in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(ValueError, match="in-memory or empty SQLite"):
            resolve_tracking_uri(memory, tmp_path)
    with pytest.raises(ValueError, match="a file store is local"):
        resolve_tracking_uri("file://otherhost/x", tmp_path)


# ---- secrets -------------------------------------------------------------------------------


def test_secret_names_and_values_are_redacted(monkeypatch):
    for name in ("tracking.password", "cluster.auth_token", "db.Password", "apiKey", "api-key", "AWS_SECRET_ACCESS_KEY",
                 "ray.token", "RAY_AUTH_TOKEN", "GITHUB_TOKEN", "authToken", "hf.tokens", "credentials.file",
                 "private_key", "x.auth", "MLFLOW_TRACKING_PASSWORD", "db.passwd", "ssh.key"):
        assert is_secret_name(name), name
    # "token" begins these words or word groups without naming a secret; "key" is not qualified
    for name in ("cache.dtype", "model.num_kv_heads", "milestone.context_length", "tokenizer_path",
                 "keyboard", "monkey", "bench.repetitions", "milestone.criteria.token_gen.metric",
                 "milestone.criteria.token_gen.threshold", "token_count", "trial_key", "sweep_key", "device_key",
                 "MLFLOW_TRACKING_USERNAME"):
        assert not is_secret_name(name), name
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789")
    kept = redact({"cache.dtype": "float16", "tracking.password": SECRET, "n": 3,
                   "tracking.uri": f"https://bench:{SECRET}@mlflow.example.org",
                   "note": "header uses tok-0123456789"})
    assert kept == {"cache.dtype": "float16", "n": 3, "tracking.uri": "https://bench:***@mlflow.example.org",
                    "note": "header uses ***"}
    assert redact_text(f"postgresql://u:{SECRET}@h/db") == "postgresql://u:***@h/db"
    yaml = redact_yaml(CONFIG_YAML)
    assert SECRET not in yaml and "password: '***'" in yaml and "cache.dtype: [float32, float16]" in yaml


# ---- a sweep in SQLite ---------------------------------------------------------------------


def test_sweep_is_one_parent_with_one_nested_child_per_trial(tracker, store, monkeypatch):
    monkeypatch.setenv("BENCH_API_TOKEN", "env-token-value-42")
    records = sample_sweep()
    parent_id = tracker.start_sweep(
        milestone="smoke", sweep_key="sweep0001",
        tags={"overrides": "grid.cache.dtype=[float32,float16]", "ray_token": "env-token-value-42"},
        params={"milestone.name": "smoke", "tracking.password": SECRET, "cluster.auth_token": "abc",
                "tracking.uri": f"postgresql://bench:{SECRET}@db/mlflow", "bench.repetitions": 3,
                "milestone.criteria.token_gen.threshold": 20.0},
        config_yaml=CONFIG_YAML,
    )
    child_ids = [tracker.log_trial(parent_id, r) for r in records]
    assert tracker.finish_sweep(parent_id, records, status="FINISHED",
                                metrics={"sweep_wall_s": 12.5, "num_devices": 2}) == "FAIL"

    client = MlflowClient(store)
    parent = client.get_run(parent_id)
    [only_parent] = parents(client, tracker.experiment_id)
    # a complete sweep that FAILed ends FAILED (a red cross in the UI), named by its verdict
    assert only_parent.info.run_id == parent_id and parent.info.status == "FAILED"
    assert parent.info.run_name == "FAIL 1/4 smoke-sweep000" and parent.data.tags["complete"] == "true"
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**FAIL: 1 of 4 trials passed (1 FAIL, 1 ERROR, 1 SKIPPED)**")
    assert "| fill_rate | -21.6% | #1 float16" in note and "testhost" in note
    assert "98.06 FAIL -21.6%" in note and "oom: needed 45.1 GB" in note
    assert client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.tags["milestone"] == "smoke" and parent.data.tags["sweep_key"] == "sweep0001"
    assert parent.data.tags["verdict"] == "FAIL" and parent.data.tags["run_type"] == "sweep"
    assert parent.data.metrics == {"n_trials": 4, "n_pass": 1, "n_fail": 1, "n_error": 1, "n_skipped": 1,
                                   "sweep_wall_s": 12.5, "num_devices": 2,
                                   "worst_margin_pct/fill_rate": pytest.approx(-21.55),
                                   "worst_margin_pct/kv_cache": pytest.approx(100 * 8.5 / 18),
                                   "worst_margin_pct/token_gen": pytest.approx(56.25)}
    assert parent.data.params == {"milestone.name": "smoke", "bench.repetitions": "3",
                                  "tracking.uri": "postgresql://bench:***@db/mlflow",
                                  "milestone.criteria.token_gen.threshold": "20.0"}
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"config.yaml", "summary.md", "summary.csv", "plots"} <= artifacts
    plots = {a.path: a.file_size for a in client.list_artifacts(parent_id, "plots")}
    assert set(plots) == {"plots/fill_rate.png", "plots/kv_cache.png", "plots/token_gen.png"}
    assert all(size > 10_000 for size in plots.values())
    config = Path(client.download_artifacts(parent_id, "config.yaml")).read_text()
    assert "cache.dtype: [float32, float16]" in config and SECRET not in config
    summary = Path(client.download_artifacts(parent_id, "summary.md")).read_text()
    assert summary.count("\n") == 2 + len(records) and "oom: needed 45.1 GB" in summary

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    runs = {r.data.tags["trial_key"]: r for r in children(client, parent_id)}
    assert set(runs) == {r.trial_key for r in records}
    assert {r.info.run_id for r in runs.values()} == set(child_ids)
    for record in records:
        run = runs[record.trial_key]
        tags, metrics = run.data.tags, run.data.metrics
        assert run.data.params == {k: str(v) for k, v in record.params.items()}
        assert tags["verdict"] == record.verdict and tags["status"] == record.status
        assert tags["reason"] == record.reason and tags["attempts"] == "1"
        assert tags["milestone"] == "smoke" and tags["sweep_key"] == "sweep0001"
        assert tags["overrides"] == "grid.cache.dtype=[float32,float16]" and "ray_token" not in tags
        assert tags["gpu_name"] == "cpu" and tags["hostname"] == "testhost"
        assert tags["torch_version"] == "2.13.0"
        # the commit when the session first asked (others may commit to this checkout meanwhile)
        assert len(tags["git_commit"]) == 40 and subprocess.run(
            ["git", "-C", str(REPO), "merge-base", "--is-ancestor", tags["git_commit"], commit]).returncode == 0
        for c in record.criteria:
            assert tags[f"criterion.{c.name}"] == ("pass" if c.passed else "fail")
            assert metrics[f"criterion.{c.name}.threshold"] == c.threshold
            assert metrics.get(f"criterion.{c.name}.margin") == c.margin
            if c.value is not None:
                assert metrics[f"criteria/{c.name}"] == c.value
                assert metrics[f"criteria/{c.name}.margin_pct"] == pytest.approx(100 * c.margin / c.threshold)
        assert metrics["attempts"] == record.attempts
        assert {k: v for k, v in metrics.items()
                if not k.startswith(("criterion.", "criteria/")) and k != "attempts"} == record.metrics
        assert run.info.start_time == int(record.started_at * 1000)
        assert run.info.end_time == int(record.finished_at * 1000)
        assert run.info.status == {"PASS": "FINISHED", "FAIL": "FAILED", "ERROR": "FAILED",
                                   "SKIPPED": "KILLED"}[record.verdict]
        assert run.info.run_name.startswith(f"{record.index:03d} {record.verdict} ")
        assert tags["mlflow.note.content"].startswith(f"**{record.verdict}**")
        stored = Path(client.download_artifacts(run.info.run_id, "result.json")).read_text()
        assert TrialRecord.from_json(stored) == record
    assert runs[records[1].trial_key].data.tags["criterion.fill_rate"] == "fail"
    assert runs[records[3].trial_key].data.tags.get("criterion.fill_rate") is None  # skipped: unjudged

    # No secret reached any param or tag, by name or by value.
    for run in [parent, *runs.values()]:
        logged = json.dumps([run.data.params, run.data.tags])
        assert SECRET not in logged and "env-token-value-42" not in logged
        assert "abc" not in run.data.params.values()


def test_log_trial_is_idempotent_per_trial_key(tracker, store):
    client = MlflowClient(store)
    parent_id = tracker.start_sweep(milestone="smoke", sweep_key="sweep0002")
    first = make_record(0, passing())
    run_id = tracker.log_trial(parent_id, first)
    assert tracker.log_trial(parent_id, first) == run_id  # same record again: a no-op
    assert [r.info.run_id for r in children(client, parent_id)] == [run_id]

    # A different result for the same trial (a re-run) replaces the child: last write wins.
    rerun = make_record(0, passing(2.0), attempts=2)
    new_id = tracker.log_trial(parent_id, rerun)
    [child] = children(client, parent_id)
    assert child.info.run_id == new_id != run_id
    assert child.data.metrics["fill_rate_pos_s"] == 500.0 and child.data.tags["attempts"] == "2"
    assert client.get_run(run_id).info.lifecycle_stage == "deleted"

    # A child left incomplete by an interrupted upload (no verdict yet) is not finished and is
    # replaced by the next upload of that trial.
    other = make_record(1, passing())
    partial = client.create_run(tracker.experiment_id, tags={
        "mlflow.parentRunId": parent_id, "trial_key": other.trial_key, "run_type": "trial"})
    assert tracker.finished_trial_keys(parent_id) == {first.trial_key}
    other_id = tracker.log_trial(parent_id, other)
    keys = sorted(r.data.tags["trial_key"] for r in children(client, parent_id))
    assert keys == sorted([first.trial_key, other.trial_key])
    assert client.get_run(partial.info.run_id).info.lifecycle_stage == "deleted"
    assert tracker.finished_trial_keys(parent_id) == {first.trial_key, other.trial_key}
    assert other_id in {r.info.run_id for r in children(client, parent_id)}


def test_resume_reopens_the_unfinished_parent_and_judges_the_whole_sweep(tracker, store):
    client = MlflowClient(store)
    records = [make_record(i, passing(1.0 + i)) for i in range(3)]
    parent_id = tracker.start_sweep(milestone="smoke", sweep_key="sweep0003", params={"a": 1})
    for record in records[:2]:
        tracker.log_trial(parent_id, record)
    # Both trials passed, but a KILLED sweep left trials unrun: it does not pass.
    assert tracker.finish_sweep(parent_id, records[:2], status="KILLED") == "FAIL"
    assert client.get_run(parent_id).info.status == "KILLED"

    # A new Tracker (a new driver process) resumes: same parent, RUNNING again, 2 trials done.
    again = Tracker(store, experiment=tracker.experiment)
    assert again.start_sweep(milestone="smoke", sweep_key="sweep0003", params={"a": 1, "b": 2}) == parent_id
    assert client.get_run(parent_id).info.status == "RUNNING"
    assert again.finished_trial_keys(parent_id) == {r.trial_key for r in records[:2]}
    failing = make_record(2, {**passing(), "decode_tok_s": 3.0})
    again.log_trial(parent_id, failing)
    # Only the new record is passed in; the two logged before still count.
    assert again.finish_sweep(parent_id, [failing], status="FINISHED") == "FAIL"
    parent = client.get_run(parent_id)
    assert parent.info.status == "FAILED" and parent.data.tags["resumes"] == "1"
    assert parent.data.tags["complete"] == "true"
    assert parent.data.metrics["n_trials"] == 3 and parent.data.metrics["n_fail"] == 1
    assert parent.data.params == {"a": "1", "b": "2"}
    assert [r.trial_key for r in again.trial_records(parent_id)] == [r.trial_key for r in records]
    # Children logged by the resuming Tracker repeat the sweep tags it read from the parent.
    assert all(r.data.tags["sweep_key"] == "sweep0003" for r in children(client, parent_id))

    # A complete sweep is not reopened, though FAILED (it failed its criteria, it did not
    # stop early); resume=False never reopens.
    fresh = again.start_sweep(milestone="smoke", sweep_key="sweep0003")
    assert fresh != parent_id
    assert again.start_sweep(milestone="smoke", sweep_key="sweep0003", resume=False) not in (parent_id, fresh)
    assert len(parents(client, tracker.experiment_id)) == 3


def test_records_are_rebuilt_from_run_data_when_result_json_is_gone(tracker, store):
    """A store copied without its artifact folder still gives every trial back: all but the
    criterion outcomes, rebuilt from the child's tags, params and metrics."""
    client = MlflowClient(store)
    parent_id = tracker.start_sweep(milestone="smoke", sweep_key="sweep0005", tags={"title": "t"})
    kept, lost = make_record(0, passing()), make_record(
        1, {**passing(), "fill_rate_pos_s": 98.0625}, attempts=2, started_at=1000.25,
        finished_at=1010.5, info={"device_key": "GPU-1234", "driver_received_at": "1010.75"},
        params={"cache.dtype": "float16", "cache.sink_positions": 4},
    )
    tracker.log_trial(parent_id, kept)
    lost_id = tracker.log_trial(parent_id, lost)
    artifact = Path(client.get_run(lost_id).info.artifact_uri.removeprefix("file://")) / "result.json"
    artifact.unlink()

    first, rebuilt = tracker.trial_records(parent_id)
    assert first == kept
    assert rebuilt.criteria == () and lost.criteria
    assert rebuilt == TrialRecord(**{**lost.__dict__, "criteria": ()})
    assert rebuilt.params["cache.sink_positions"] == 4 and rebuilt.verdict == "FAIL"


def test_caller_mistakes_raise_value_error(tracker):
    with pytest.raises(ValueError, match="sweep_key must be letters, digits"):
        tracker.start_sweep(milestone="smoke", sweep_key="x' or '1'='1")
    parent_id = tracker.start_sweep(milestone="smoke", sweep_key="sweep0004")
    with pytest.raises(ValueError, match="status must be one of"):
        tracker.finish_sweep(parent_id, [], status="DONE")
    assert tracker.finish_sweep(parent_id, []) == "FAIL"  # no trials is not a pass
    # A store that answers but refuses (unknown parent run) is an MLflow error, not an outage.
    with pytest.raises(MlflowException) as error:
        tracker.log_trial("0123456789abcdef0123456789abcdef", make_record(0, passing()))
    assert not isinstance(error.value, TrackingUnavailable)


# ---- a real server -------------------------------------------------------------------------


def test_nothing_listening_raises_tracking_unavailable_within_seconds():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"MLflow tracking at {uri} is unavailable"):
        Tracker(uri, experiment="kvbench-smoke")
    assert time.monotonic() - start < 10


def test_system_metrics_land_as_mlflow_system_series_with_their_own_times(tracker, store):
    client = MlflowClient(store)
    t0 = 1_700_000_000.0
    series = {"cpu_utilization_percentage": [[t0 + i, 10.0 * i] for i in range(5)],
              "gpu_0_power_usage_watts": [[t0, 300.0], [t0 + 1, float("nan")], [t0 + 2, 650.0]]}
    record = make_record(0, passing(), system_metrics=series)
    parent_id = tracker.start_sweep(milestone="smoke", sweep_key="sweep0009")
    child = tracker.log_trial(parent_id, record)
    cpu = client.get_metric_history(child, "system/cpu_utilization_percentage")
    assert [(m.step, m.value, m.timestamp) for m in sorted(cpu, key=lambda m: m.step)] == [
        (i, 10.0 * i, int((t0 + i) * 1000)) for i in range(5)]
    power = client.get_metric_history(child, "system/gpu_0_power_usage_watts")
    assert sorted((m.step, m.value) for m in power) == [(0, 300.0), (2, 650.0)]  # NaN left out
    assert "system/cpu_utilization_percentage" not in client.get_run(parent_id).data.metrics
    [stored] = tracker.trial_records(parent_id)
    assert stored.system_metrics["cpu_utilization_percentage"][4] == [t0 + 4, 40.0]


def test_an_existing_experiment_without_a_kind_gets_the_runs_view(store):
    client = MlflowClient(store)
    experiment_id = client.create_experiment("made-elsewhere")
    assert "mlflow.experimentKind" not in client.get_experiment(experiment_id).tags
    Tracker(store, experiment="made-elsewhere")
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_git_commit_is_recorded_only_for_the_projects_own_repository(tmp_path):
    from orchestrator.tracking import git_tags

    outer = tmp_path / "other-repo"
    copy = outer / "vendor" / "kvbench"
    shutil.copytree(REPO / "orchestrator", copy / "orchestrator", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "outer"]):
        subprocess.run(["git", "-C", str(outer), *args], check=True, env=env)
    outer_commit = subprocess.run(["git", "-C", str(outer), "rev-parse", "HEAD"], capture_output=True,
                                  text=True, check=True).stdout.strip()
    assert git_tags(copy) == {}, "a copy inside another repository records no commit"
    assert git_tags(outer)["git_commit"] == outer_commit  # the repository's own top level does
    assert git_tags(outer)["git_dirty"] == "false"
    (tmp_path / "plain").mkdir()
    assert git_tags(tmp_path / "plain") == {}  # no repository at all
