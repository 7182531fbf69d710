"""Sweeps that survive: each fault injected for real on the CPU, then the MLflow store checked.

Run: python -m pytest tests/orchestrator/test_faults.py -q

- a worker SIGKILLed mid-trial (Ray retries it), a trial that sleeps past its deadline, a trial
  whose allocation fails for real (out of memory): one sweep through the session's Ray;
- a real `mlflow server` killed mid-sweep (the rest goes to the spool), restarted, then
  `python -m orchestrator.sync` (a second sync uploads nothing twice);
- a worker that dies on every attempt, with and without retries (warm workers and a process per trial);
- warm workers: one worker process runs trial after trial (the same `worker_pid`) and is replaced
  after an injected SIGKILL (another pid from then on); without them every trial has its own;
- a real driver that spools while MLflow is away, interrupted, then resumed with MLflow back:
  the spool is uploaded first, once, and only the rest runs.
(The driver interrupted with SIGINT, then resumed, is the command test in test_sweep.py.)

Faults come from $KVBENCH_INJECT_FAULT (orchestrator.trial), read by the driver and committed by
the trial body that production runs. Every check reads the store with a fresh MlflowClient.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from mlflow_server import MlflowServer, free_port
from orchestrator.capacity import devices_from_probe, trial_need_bytes
from orchestrator.config import CONF_DIR, TrialSettings, load_sweep
from orchestrator.criteria import Criterion
from orchestrator.ray_cluster import Cluster
from orchestrator.spool import SYNCED_DIR, read_spool
from orchestrator.scheduler import run_trials
from orchestrator.sweep import execute
from orchestrator.sync import main as sync_main
from orchestrator.trial import FAULT_ENV
from test_tracking import children, parents, shared_store
from drivers import default_sigint, finish

REPO = Path(__file__).resolve().parents[2]
SECRET = "tok-5ecr3t-value"
FAST = ["bench.repetitions=2", "bench.rep_budget_s=0.05"]  # smoke trials of about a second


@pytest.fixture
def store(tmp_path_factory) -> str:
    return shared_store(tmp_path_factory)


def smoke_sweep(tmp_path: Path, uri: str, experiment: str, *overrides: str):
    """The smoke milestone with fast trials, recording to `uri`, spooling under tmp_path."""
    overrides = ("+milestone=smoke", *FAST, f"tracking.uri={uri}", f"tracking.experiment={experiment}",
                 f"spool.dir={tmp_path / 'spool'}", *overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return load_sweep(cfg, cwd=tmp_path, overrides=overrides)


def sweep_runs(uri: str, experiment: str):
    """(client, the one parent run, {dtype: its child run})."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    [parent] = parents(client, experiment_id)
    runs = children(client, parent.info.run_id)
    by_dtype = {r.data.params["cache.dtype"]: r for r in runs}
    assert len(by_dtype) == len(runs), "one child run per trial"
    return client, parent, by_dtype


def test_killed_hung_and_oom_trials_are_each_recorded_once_and_the_sweep_goes_on(
        ray_session, store, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "kill:0,hang:1,oom:2")
    monkeypatch.setenv("BENCH_API_TOKEN", SECRET)
    sweep = smoke_sweep(tmp_path, store, "kvbench-faults", "grid.cache.dtype=[float32,float16,bfloat16,int8]",
                        "trial.timeout_s=20", "trial.max_retries=2")
    err = io.StringIO()
    assert execute(sweep, tmp_path, out=io.StringIO(), err=err) == 1, err.getvalue()

    client, parent, runs = sweep_runs(store, "kvbench-faults")
    assert parent.info.status == "FAILED" and parent.data.tags["verdict"] == "FAIL"  # ran every trial, failed
    assert parent.data.metrics["n_trials"] == 4 and parent.data.metrics["n_error"] == 2
    assert parent.data.metrics["num_devices"] == 1
    killed, hung, oom, healthy = (runs[d] for d in ("float32", "float16", "bfloat16", "int8"))

    # SIGKILLed on its first attempt, retried by Ray: one child, attempts 2, judged normally.
    assert killed.data.tags["verdict"] == "PASS" and killed.data.tags["attempts"] == "2"
    assert killed.data.metrics["attempts"] == 2
    assert healthy.data.tags["verdict"] == "PASS" and healthy.data.metrics["attempts"] == 1

    # Past its deadline: cancelled, ERROR with reason timeout.
    assert hung.data.tags["verdict"] == "ERROR" and hung.info.status == "FAILED"
    assert hung.data.tags["reason"] == "timeout: no result within 20 s (trial.timeout_s); the task was cancelled"

    # A real failed allocation: ERROR with reason oom, what it needed and what the device had.
    reason = oom.data.tags["reason"]
    assert oom.data.tags["verdict"] == "ERROR"
    need = trial_need_bytes(next(t for t in sweep.trials if t.params["cache.dtype"] == "bfloat16").params)
    assert reason.startswith(f"oom: needed about {need / 1e9:.2f} GB (cache + weights + margin), cpu had ")
    assert "can't allocate memory" in reason

    # Timing fields for the timeline, on every trial: where and when it ran.
    node_id = ray_session.get_runtime_context().get_node_id()
    for run in runs.values():
        tags = run.data.tags
        assert tags["node_id"] == node_id and tags["device_key"] == f"{node_id}:cpu"
        submitted, received = float(tags["driver_submitted_at"]), float(tags["driver_received_at"])
        assert submitted - 1e-3 <= run.info.start_time / 1000 <= run.info.end_time / 1000 <= received + 1e-3
    # The device was free again only once the hung trial's task was gone.
    assert float(oom.data.tags["driver_submitted_at"]) >= float(hung.data.tags["driver_received_at"])
    assert 20 <= float(hung.data.tags["driver_received_at"]) - float(hung.data.tags["driver_submitted_at"]) < 35
    # Nothing secret is logged, and the criteria's params are all there (token_gen is no token).
    for run in [parent, *runs.values()]:
        assert SECRET not in json.dumps([run.data.params, run.data.tags])
    assert parent.data.params["milestone.criteria.token_gen.threshold"] == "1.0"
    first = min(float(r.data.tags["driver_submitted_at"]) for r in runs.values())
    last = max(float(r.data.tags["driver_received_at"]) for r in runs.values())
    assert parent.data.metrics["sweep_wall_s"] == pytest.approx(last - first, abs=1e-3)


@pytest.mark.parametrize(("max_retries", "warm"), [(0, True), (2, True), (1, False)])
def test_a_worker_that_dies_on_every_attempt_is_an_error_after_the_retries(ray_session, tmp_path, monkeypatch,
                                                                          max_retries, warm):
    monkeypatch.setenv(FAULT_ENV, "die:0")  # SIGKILL at the start of every attempt
    sweep = smoke_sweep(tmp_path, "sqlite:///unused.db", "unused", "grid.cache.dtype=[float16]")
    cluster = Cluster.connect(sweep.cluster)
    cluster.warm = warm
    devices = devices_from_probe(cluster.probe(), 0.95, 0.8)
    criteria = (Criterion("fill_rate", "fill_rate_pos_s", ">", 1.0),)
    records = run_trials(sweep.trials, devices, cluster, criteria, on_record=lambda r: None,
                         settings=TrialSettings(max_retries=max_retries, timeout_s=120))
    [record] = records
    assert record.verdict == "ERROR" and record.attempts == max_retries + 1
    # a warm worker's death reads as its actor's; a per-trial task's as its worker's
    assert record.reason.startswith(("crash: the worker died on every attempt: ActorDiedError",
                                     "crash: the worker died on every attempt: WorkerCrashedError"))


def _worker_runs(ray_session, tmp_path, faults: str, warm: bool):
    """A 3-trial CPU smoke sweep through run_trials; its records in grid order."""
    os.environ[FAULT_ENV] = faults
    try:
        sweep = smoke_sweep(tmp_path, "sqlite:///unused.db", "unused", "grid.cache.dtype=[float32,float16,bfloat16]")
        cluster = Cluster.connect(sweep.cluster)
        cluster.warm = warm
        devices = devices_from_probe(cluster.probe(), 0.95, 0.8)
        criteria = (Criterion("fill_rate", "fill_rate_pos_s", ">", 1.0),)
        try:
            records = run_trials(sweep.trials, devices, cluster, criteria, on_record=lambda r: None,
                                 settings=TrialSettings(max_retries=1, timeout_s=120, warm_workers=warm))
        finally:
            cluster.close()
    finally:
        del os.environ[FAULT_ENV]
    return sorted(records, key=lambda r: r.index)


def test_a_warm_worker_runs_trial_after_trial_and_is_replaced_after_a_crash(ray_session, tmp_path):
    first, killed, after = _worker_runs(ray_session, tmp_path, "kill:1", warm=True)
    assert [r.verdict for r in (first, killed, after)] == ["PASS"] * 3
    assert killed.attempts == 2  # its first worker died with it; a new one ran it again
    # trial 0 ran in the first worker; the crash replaced it; trial 2 reused the replacement
    assert first.info["worker_pid"] != killed.info["worker_pid"] == after.info["worker_pid"]
    assert [r.info["worker_trials"] for r in (first, killed, after)] == ["0", "0", "1"]
    baseline = int(killed.info["memory_baseline_bytes"])
    assert int(after.info["memory_baseline_bytes"]) == baseline and int(after.info["memory_at_start_bytes"]) > 0
    assert "memory not back" not in after.info.get("invalid_reason", "")  # (a noisy CPU may mark it otherwise)


def test_without_warm_workers_each_trial_gets_a_fresh_process(ray_session, tmp_path):
    records = _worker_runs(ray_session, tmp_path, "", warm=False)
    assert [r.verdict for r in records] == ["PASS"] * 3
    assert len({r.info["worker_pid"] for r in records}) == 3


@pytest.mark.slow
def test_mlflow_server_killed_mid_sweep_then_restarted_and_synced(ray_session, tmp_path, capsys):
    experiment = "kvbench-outage-sweep"
    with MlflowServer(tmp_path / "server") as server:
        sweep = smoke_sweep(tmp_path, server.uri, experiment, "grid.cache.dtype=[float32,float16,bfloat16]")

        def kill_after_the_first_trial():
            client = MlflowClient(server.uri)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                experiment_id = client.get_experiment_by_name(experiment)
                runs = client.search_runs([experiment_id.experiment_id]) if experiment_id else []
                if any("verdict" in r.data.tags and "mlflow.parentRunId" in r.data.tags for r in runs):
                    server.kill()
                    return
                time.sleep(0.2)

        killer = threading.Thread(target=kill_after_the_first_trial)
        killer.start()
        err = io.StringIO()
        status = execute(sweep, tmp_path, out=io.StringIO(), err=err)
        killer.join()
        assert status == 0, err.getvalue()
        assert "is unavailable" in err.getvalue() and "results go to the spool" in err.getvalue()
        assert "MLflow is still away" in err.getvalue()
        spool_file = tmp_path / "spool" / f"{sweep.key}.jsonl"
        spooled = read_spool(spool_file)
        assert spooled.finish == "FINISHED" and 1 <= len(spooled.records) <= 3
        assert spooled.header["parent_id"], "the parent run was created before the outage"
        assert spooled.finish_metrics["num_devices"] == 1

        server.start()  # same port, same store
        sync = subprocess.run([sys.executable, "-m", "orchestrator.sync", "--spool", str(tmp_path / "spool")],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert sync.returncode == 0, sync.stderr
        assert f"trial(s) uploaded to parent run {spooled.header['parent_id']}" in sync.stdout
        assert not spool_file.exists() and list((tmp_path / "spool" / SYNCED_DIR).iterdir())

        client, parent, runs = sweep_runs(server.uri, experiment)
        assert parent.info.run_id == spooled.header["parent_id"]
        assert sorted(runs) == ["bfloat16", "float16", "float32"]
        assert all(r.data.tags["verdict"] == "PASS" for r in runs.values())
        assert parent.info.status == "FINISHED" and parent.data.tags["verdict"] == "PASS"
        assert parent.data.metrics["n_trials"] == 3 and parent.data.metrics["sweep_wall_s"] > 0
        # Syncing again uploads nothing twice.
        assert sync_main(["--spool", str(tmp_path / "spool")]) == 0
        assert "nothing to upload" in capsys.readouterr().out
        assert len(sweep_runs(server.uri, experiment)[2]) == 3


def test_a_driver_interrupted_while_mlflow_is_away_resumes_from_its_spool(ray_session, store, tmp_path):
    """A real driver spools its first trial (MLflow away) and is interrupted (SIGINT) while the
    second runs; the same sweep run again with MLflow back uploads the spool first, once, and
    runs only the second trial."""
    spool_dir = tmp_path / "spool"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", FAULT_ENV)}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), **{FAULT_ENV: "hang:1"})
    command = [sys.executable, "-m", "orchestrator", "+milestone=smoke", *FAST,
               f"tracking.uri=http://127.0.0.1:{free_port()}", "tracking.experiment=kvbench-spool-resume",
               f"spool.dir={spool_dir}"]
    log = tmp_path / "first.err"
    with open(log, "w") as stderr:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                 preexec_fn=default_sigint)
        deadline = time.monotonic() + 300
        while "[smoke] 1/2 done, 1 running" not in log.read_text():
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        first.send_signal(signal.SIGINT)
        finish(first, log)
    assert first.returncode == 130, log.read_text()
    assert "results go to the spool" in log.read_text() and "MLflow is still away" in log.read_text()
    [spool_file] = spool_dir.glob("*.jsonl")
    spooled = read_spool(spool_file)
    assert spooled.finish == "KILLED" and [r.params["cache.dtype"] for r in spooled.records.values()] == ["float32"]

    sweep = smoke_sweep(tmp_path, store, "kvbench-spool-resume")
    assert spool_file.name == f"{sweep.key}.jsonl", "the same sweep"
    err = io.StringIO()
    assert execute(sweep, tmp_path, out=io.StringIO(), err=err) == 0, err.getvalue()
    assert f"uploaded 1 trial(s) that {spool_file} held from an earlier run" in err.getvalue()
    assert "[smoke] resuming: 1 trials already recorded" in err.getvalue()
    assert "[smoke] 1/1 done" in err.getvalue()
    assert not spool_file.exists()

    client = MlflowClient(store)
    experiment_id = client.get_experiment_by_name("kvbench-spool-resume").experiment_id
    [parent] = parents(client, experiment_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["verdict"] == "PASS"
    assert parent.data.tags["resumes"] == "1" and parent.data.metrics["n_trials"] == 2
    runs = children(client, parent.info.run_id)
    assert sorted(r.data.params["cache.dtype"] for r in runs) == ["float16", "float32"]
    spooled_trial = next(r for r in runs if r.data.params["cache.dtype"] == "float32")
    assert spooled_trial.data.tags["trial_key"] == next(iter(spooled.records))
