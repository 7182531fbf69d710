"""Tests of the sweep driver (orchestrator/sweep.py): placement on devices (a scripted cluster),
then the real thing end to end: the `smoke` milestone through real Ray and a real SQLite MLflow
store, in this process (the session's Ray) and as the real command in a subprocess, interrupted
with Ctrl-C (SIGINT) and then resumed.

Run: python -m pytest tests/orchestrator/test_sweep.py -q
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from orchestrator.capacity import Device, trial_need_parts
from orchestrator.config import CONF_DIR, TrialSettings, load_sweep
from orchestrator.criteria import Criterion
from orchestrator.grid import TrialSpec
from orchestrator.record import TrialRecord
from orchestrator import scheduler
from orchestrator.progress import Progress
from orchestrator.scheduler import run_trials, trial_timeout_s
from orchestrator.sweep import execute, sweep_timing
from orchestrator.verdict import exit_status, make_record
from orchestrator.trial import FAULT_ENV, injected_fault
from drivers import default_sigint, finish

REPO = Path(__file__).resolve().parents[2]
CRITERIA = (Criterion("fill_rate", "fill_rate_pos_s", ">", 10.0),)
FIGURES = {"fill_rate_pos_s", "retrieve_rate_ops_s", "decode_tok_s", "kv_cache_gb", "total_vram_gb",
           "peak_mem_gb", "copy_gbps", "decode_gbps"}
ENVIRONMENT_TAGS = {"device_name", "gpu_uuid", "driver_version", "cuda_version", "torch_version",
                    "hostname", "git_commit"}


def trial(index: int, gb: float) -> TrialSpec:
    """A trial whose need is about `gb` GB (weights only, a one-position cache)."""
    params = {"milestone.context_length": 1, "model.num_layers": 1, "model.num_heads": 1, "model.num_kv_heads": 1,
              "model.head_dim": 1, "model.weights_gb": gb, "cache.dtype": "float32",
              "bench.repetitions": 2, "bench.rep_budget_s": 0.5}
    return TrialSpec(index=index, key=f"key{index}", params=params)


def device(name: str, gb: float) -> Device:
    return Device(node_id=f"node-{name}", kind="gpu", name=name, uuid=f"GPU-{name}",
                  memory_bytes=int(gb * 1e9), usable_bytes=int(gb * 1e9), cpus=4)


class ScriptedCluster:
    """Stands in for ray_cluster.Cluster: records submissions, finishes the running trial
    submitted first on each wait, returns a fill rate equal to 100 x the trial's index."""

    def __init__(self):
        self.submitted: list[tuple[int, str]] = []
        self.running: list[tuple[TrialSpec, Device]] = []

    def submit(self, spec, device, max_retries, fault=None):
        assert max_retries == 3 and fault is None
        busy = [d.name for _, d in self.running]
        assert device.name not in busy, "a device runs one trial at a time"
        self.submitted.append((spec.index, device.name))
        self.running.append((spec, device))
        return spec.index

    def wait(self, refs, timeout_s):
        assert sorted(refs) == sorted(spec.index for spec, _ in self.running)
        spec, _ = self.running.pop(0)
        return [spec.index]

    def fetch(self, ref):
        if ref == 2:  # as Cluster.fetch returns a worker that died on every attempt
            return {"status": "ERROR", "reason": "crash: the worker died on every attempt: WorkerCrashedError: died",
                    "metrics": {}, "info": {}, "retries_exhausted": True}
        return {"status": "OK", "reason": "", "metrics": {"fill_rate_pos_s": 100.0 * ref},
                "info": {"device_name": "x"}, "started_at": 1.0, "finished_at": 2.0}


def test_run_trials_places_each_trial_on_a_free_device_that_holds_it():
    trials = [trial(0, 50.0), trial(1, 1.0), trial(2, 1.0), trial(3, 60.0)]
    devices = [device("small", 20.0), device("big", 80.0)]
    cluster = ScriptedCluster()
    seen: list[TrialRecord] = []
    stream = io.StringIO()
    records = run_trials(trials, devices, cluster, CRITERIA, on_record=seen.append,
                         settings=TrialSettings(max_retries=3, timeout_s=None), progress=Progress("t", 4, stream))
    # 0 needs the big card, 1 takes the small one; 2 takes the big card when 0 is done;
    # 3 fits only the big card and waits for it although the small one frees first
    assert cluster.submitted == [(0, "big"), (1, "small"), (2, "big"), (3, "big")]
    assert [r.index for r in records] == [r.index for r in seen]
    by_index = {r.index: r for r in records}
    assert by_index[0].verdict == "FAIL" and by_index[1].verdict == "PASS" and by_index[3].verdict == "PASS"
    assert by_index[2].verdict == "ERROR" and by_index[2].criteria == ()
    assert by_index[2].attempts == 4 and by_index[1].attempts == 1, "retries used up: max_retries + 1 runs"
    assert by_index[2].started_at > 1e9, "a Ray failure gets the submission time"
    assert stream.getvalue().splitlines()[-1].startswith("[t] 4/4 done, 0 running, 0 pending")


class HangingCluster:
    """A cluster whose trials never finish until cancelled; cancelling takes effect after
    `linger` more waits (the task is not gone at once). Counts cancels per trial."""

    def __init__(self, linger: int = 1, interrupt_on_wait: int | None = None):
        self.linger, self.interrupt_on_wait = linger, interrupt_on_wait
        self.cancels: dict[int, int] = {}
        self.gone: dict[int, int] = {}  # ref -> waits left until its task is gone
        self.waits = 0
        self.submitted: list[int] = []

    def submit(self, spec, device, max_retries, fault=None):
        self.submitted.append(spec.index)
        return spec.index

    def wait(self, refs, timeout_s):
        self.waits += 1
        if self.waits == self.interrupt_on_wait:
            raise KeyboardInterrupt
        time.sleep(0.01)
        done = []
        for ref in refs:
            if ref in self.gone:
                self.gone[ref] -= 1
                if self.gone[ref] < 0:
                    done.append(ref)
        return done

    def fetch(self, ref):
        return {"status": "ERROR", "reason": "cancelled", "metrics": {}, "info": {}}

    def cancel(self, ref):
        self.cancels[ref] = self.cancels.get(ref, 0) + 1
        self.gone.setdefault(ref, self.linger)


def test_a_trial_past_its_deadline_is_cancelled_and_its_device_waits_until_it_is_gone(monkeypatch):
    monkeypatch.setattr(scheduler, "POLL_S", 0.0)
    cluster = HangingCluster(linger=3)
    trials = [trial(0, 1.0), trial(1, 1.0)]
    records = run_trials(trials, [device("only", 20.0)], cluster, CRITERIA, on_record=lambda r: None,
                         settings=TrialSettings(max_retries=2, timeout_s=0.05))
    assert [r.index for r in records] == [0, 1] and cluster.submitted == [0, 1]
    for record in records:
        assert (record.status, record.verdict, record.attempts) == ("ERROR", "ERROR", 1)
        assert record.reason == "timeout: no result within 0 s (trial.timeout_s); the task was cancelled"
        assert record.info["device_key"] == "GPU-only" and record.info["node_id"] == "node-only"
        assert float(record.info["driver_submitted_at"]) <= float(record.info["driver_received_at"])
    # trial 1 was submitted only once trial 0's task was gone
    assert float(records[1].info["driver_submitted_at"]) >= float(records[0].info["driver_received_at"])
    assert sweep_timing(records)["sweep_wall_s"] == pytest.approx(
        float(records[1].info["driver_received_at"]) - float(records[0].info["driver_submitted_at"]))


def test_ctrl_c_cancels_the_running_trials_and_goes_on_to_the_caller():
    cluster = HangingCluster(linger=0, interrupt_on_wait=2)
    trials = [trial(0, 1.0), trial(1, 1.0), trial(2, 50.0)]
    with pytest.raises(KeyboardInterrupt):
        run_trials(trials, [device("a", 20.0), device("b", 80.0)], cluster, CRITERIA, on_record=lambda r: None,
                   settings=TrialSettings(max_retries=2, timeout_s=None))
    assert cluster.submitted == [0, 1] and cluster.cancels == {0: 1, 1: 1}
    assert not [ref for ref, left in cluster.gone.items() if left >= 0], "the driver waited until both were gone"


def test_an_error_while_trials_run_records_the_running_ones_before_it_goes_on():
    """A recording error that is no Ctrl-C (a bug, a lost connection) used to lose every
    trial still running; now they are waited for and recorded, then the error goes on."""
    cluster = ScriptedCluster()
    seen: list[TrialRecord] = []

    def record(r: TrialRecord) -> None:
        if r.index == 0:
            raise RuntimeError("recording failed")
        seen.append(r)

    with pytest.raises(RuntimeError, match="recording failed"):
        run_trials([trial(0, 1.0), trial(1, 1.0), trial(3, 1.0)], [device("a", 20.0), device("b", 20.0)],
                   cluster, CRITERIA, on_record=record, settings=TrialSettings(max_retries=3, timeout_s=None))
    assert cluster.submitted == [(0, "a"), (1, "b")], "nothing new is submitted after the error"
    assert [r.index for r in seen] == [1], "the trial running when the error came is recorded"


class FirstDoneCluster(HangingCluster):
    """Trial 0 finishes on the first wait; the others hang until cancelled."""

    def wait(self, refs, timeout_s):
        if self.waits == 0 and 0 in refs:
            self.waits += 1
            return [0]
        return super().wait(refs, timeout_s)

    def fetch(self, ref):
        if ref == 0:
            return {"status": "OK", "reason": "", "metrics": {"fill_rate_pos_s": 50.0}, "info": {}}
        return super().fetch(ref)


def test_a_full_spool_disk_cancels_the_running_trials_and_goes_on():
    cluster = FirstDoneCluster(linger=0)

    def record(r: TrialRecord) -> None:
        raise OSError(28, "the spool folder is full")

    with pytest.raises(OSError):
        run_trials([trial(0, 1.0), trial(1, 1.0)], [device("a", 20.0), device("b", 80.0)], cluster, CRITERIA,
                   on_record=record, settings=TrialSettings(max_retries=2, timeout_s=None))
    assert cluster.cancels == {1: 1}, "the running trial was cancelled: there is nowhere to record it"


def test_deadline_derived_from_the_trials_size():
    settings = TrialSettings(max_retries=2, timeout_s=None)
    small = trial(0, 0.0)  # a one-position cache, no weights: the base and the time boxes
    assert trial_timeout_s(small.params, settings) == pytest.approx(600 + 120 * 8e-9 + 20 * 2 * 0.5)
    big = trial(1, 10.0)  # 10 GB of weights: 20 more minutes
    assert trial_timeout_s(big.params, settings) - trial_timeout_s(small.params, settings) == pytest.approx(1200)
    assert trial_timeout_s(big.params, TrialSettings(max_retries=2, timeout_s=7)) == 7.0
    assert sweep_timing([]) == {"sweep_wall_s": 0.0}


def test_injected_faults_name_a_kind_and_a_grid_index():
    assert injected_fault(2, "kill:0, hang:2,oom:11") == "hang"
    assert injected_fault(1, "kill:0,hang:2") is None and injected_fault(0, "") is None
    for bad in ("crash:1", "kill", "kill:x"):
        with pytest.raises(ValueError, match="KVBENCH_INJECT_FAULT items read <fault>:<grid index>"):
            injected_fault(0, bad)


def test_make_record_and_exit_status():
    spec = trial(5, 1.0)
    ok = make_record(spec, {"status": "OK", "metrics": {"fill_rate_pos_s": 11.0}}, CRITERIA)
    assert (ok.trial_key, ok.index, ok.verdict, ok.criteria[0].margin) == ("key5", 5, "PASS", 1.0)
    skipped = make_record(spec, {"status": "SKIPPED", "reason": "too big"}, CRITERIA)
    assert (skipped.verdict, skipped.criteria) == ("SKIPPED", ())
    assert exit_status([ok]) == 0
    assert exit_status([ok, skipped]) == 1
    assert exit_status([]) == 1


def test_progress_line_counts_and_eta():
    progress = Progress("m10", 5, io.StringIO())
    line = progress.line(2, [10.0], 2, [60.0, 60.0], 1)
    assert line.startswith("[m10] 2/5 done, 1 running, 2 pending, elapsed ")
    assert line.endswith("ETA 2m50s")  # 2 pending x 60 s + 50 s left of the running one, 1 device


def test_progress_in_a_log_writes_changes_and_a_heartbeat():
    stream = io.StringIO()
    progress = Progress("m10", 2, stream)
    progress.show(0, [1.0], 1, [], 1)
    progress.show(0, [2.0], 1, [], 1)  # same counts: nothing new
    assert len(stream.getvalue().splitlines()) == 1
    progress.show(1, [], 1, [3.0], 1)
    assert len(stream.getvalue().splitlines()) == 2
    progress.HEARTBEAT_S = 0.0  # a minute has passed
    progress.show(1, [], 1, [3.0], 1)
    assert len(stream.getvalue().splitlines()) == 3


# ---- end to end --------------------------------------------------------------------------


def parent_and_children(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_type") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return client, parents, children


def test_smoke_sweep_in_process_skips_what_fits_nowhere(ray_session, tmp_path):
    overrides = ["+milestone=smoke", "grid.cache.dtype=[float16]", "+grid.model.weights_gb=[0.001,100000]",
                 f"tracking.uri=sqlite:///{tmp_path}/store.db"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    sweep = load_sweep(cfg, cwd=tmp_path, overrides=overrides)
    out, err = io.StringIO(), io.StringIO()
    assert execute(sweep, tmp_path, out=out, err=err) == 1, err.getvalue()

    client, parents, children = parent_and_children(f"sqlite:///{tmp_path}/store.db", "kvbench-smoke")
    assert len(parents) == 1 and parents[0].data.tags["verdict"] == "FAIL"
    verdicts = {r.data.params["model.weights_gb"]: r.data.tags for r in children}
    assert verdicts["0.001"]["verdict"] == "PASS"
    skipped = verdicts["100000.0"]
    assert skipped["verdict"] == "SKIPPED"
    cache, weights, margin = trial_need_parts(
        next(t.params for t in sweep.trials if t.params["model.weights_gb"] == 100000.0))
    assert weights == 100000 * 10**9 and 0.5e9 < margin < 1e9  # 0.5 GB + the benchmark's own buffers
    need = (cache + weights + margin) / 1e9
    assert skipped["reason"].startswith(
        f"needs {need:.2f} GB (cache {cache / 1e9:.2f} + weights 100000.00 + margin {margin / 1e9:.2f})")
    assert "(cpu) on " in skipped["reason"] and "GB available host memory" in skipped["reason"]
    text = out.getvalue()
    assert "SKIPPED" in text and "PASS" in text
    assert f"\nopen: mlflow ui --backend-store-uri sqlite:///{tmp_path}/store.db\n" in text
    parent_id = parents[0].info.run_id
    assert "\nverdict FAIL: 1 of 2 trials passed (1 SKIPPED)" in text
    assert f"parent run {parent_id} (its description holds this table" in text
    assert f"/runs/{parent_id}?workflowType=machine_learning" in text
    assert "[smoke] 1/1 done, 0 running, 0 pending" in err.getvalue()
    assert ray_session.is_initialized(), "the session's Ray is reused, not stopped"


def test_local_ray_listens_on_loopback_only(ray_session):
    ray_processes = psutil.Process().children(recursive=True)
    listening = [c.laddr for p in ray_processes for c in _connections(p) if c.status == psutil.CONN_LISTEN]
    assert listening, "Ray's servers should be found among this process's children"
    for address in listening:
        assert address.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), f"listening on {address}"


def _connections(process: psutil.Process):
    try:
        return process.net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_the_command_interrupted_with_ctrl_c_then_resumed_runs_smoke_end_to_end(tmp_path):
    """The command as a user runs it: Ctrl-C (SIGINT) while trial 1 runs (it hangs, injected),
    then the same command again resumes the sweep under the same parent run."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", FAULT_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "orchestrator", "+milestone=smoke"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log = tmp_path / "first.err"
    with open(log, "w") as stderr:
        first = subprocess.Popen(command, cwd=tmp_path, env={**env, FAULT_ENV: "hang:1"},
                                 stdout=subprocess.PIPE, stderr=stderr, text=True, preexec_fn=default_sigint)
        deadline = time.monotonic() + 240
        while "[smoke] 1/2 done, 1 running" not in log.read_text() and time.monotonic() < deadline:
            assert first.poll() is None, log.read_text()
            time.sleep(0.2)
        first.send_signal(signal.SIGINT)
        out = finish(first, log)
    assert first.returncode == 130, log.read_text()
    assert "interrupted: running trials cancelled; the sweep is recorded as KILLED" in log.read_text()
    _, [killed], [done_before] = parent_and_children(uri, "kvbench-smoke")
    assert killed.info.status == "KILLED" and killed.data.tags["verdict"] == "FAIL"
    assert done_before.data.tags["verdict"] == "PASS"
    assert "PASS" in out, "the table shows what was done"

    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"\nopen: mlflow ui --backend-store-uri {uri}\n" in done.stdout
    assert "\nverdict PASS: 2 of 2 trials passed" in done.stdout and "\nworst margin per criterion" in done.stdout
    assert "[smoke] resuming: 1 trials already recorded" in done.stderr
    assert "[smoke] 1/1 done" in done.stderr

    client, parents, children = parent_and_children(uri, "kvbench-smoke")
    [parent] = parents
    assert parent.info.run_id == killed.info.run_id and parent.data.tags["resumes"] == "1"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["milestone"] == "smoke" and parent.data.tags["verdict"] == "PASS"
    assert parent.data.metrics["n_trials"] == 2 and parent.data.metrics["n_pass"] == 2
    assert {"config.yaml", "summary.md", "summary.csv", "plots"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    config = Path(client.download_artifacts(parent.info.run_id, "config.yaml")).read_text()
    assert "name: smoke" in config

    assert len(children) == 2 and done_before.info.run_id in {r.info.run_id for r in children}
    assert {r.data.params["cache.dtype"] for r in children} == {"float32", "float16"}
    for run in children:
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["verdict"] == "PASS" and tags["milestone"] == "smoke"
        assert len(tags["trial_key"]) == 16
        assert ENVIRONMENT_TAGS <= set(tags) and tags["hostname"] == socket.gethostname()
        assert FIGURES <= set(metrics)
        for name in ("fill_rate", "retrieve_rate", "kv_cache", "token_gen", "total_vram"):
            assert tags[f"criterion.{name}"] == "pass"
            assert metrics[f"criterion.{name}.margin"] > 0
        assert run.data.params["model.num_layers"] == "3"
        record = TrialRecord.from_json(Path(client.download_artifacts(run.info.run_id, "result.json")).read_text())
        assert record.trial_key == tags["trial_key"] and record.verdict == "PASS"


def test_a_running_driver_writes_every_threads_stack_on_sigusr1_and_goes_on(tmp_path):
    """`kill -USR1 <pid>` on a driver that seems stuck: every thread's stack on its stderr; the
    sweep is not disturbed (it is then interrupted with Ctrl-C and exits as usual)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", FAULT_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    log = tmp_path / "driver.err"
    with open(log, "w") as stderr:
        driver = subprocess.Popen([sys.executable, "-m", "orchestrator", "+milestone=smoke"], cwd=tmp_path,
                                  env={**env, FAULT_ENV: "hang:0"}, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                  preexec_fn=default_sigint)
        deadline = time.monotonic() + 240
        while "[smoke] 0/2 done, 1 running" not in log.read_text() and time.monotonic() < deadline:
            assert driver.poll() is None, log.read_text()
            time.sleep(0.2)
        driver.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        assert driver.poll() is None, log.read_text()
        driver.send_signal(signal.SIGINT)
        finish(driver, log)
    text = log.read_text()
    assert "Current thread" in text and 'File "' in text, text
    assert driver.returncode == 130, text
