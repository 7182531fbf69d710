"""The driver against what a careless user, a batch scheduler or a full disk does, each for real:

Run: python -m pytest tests/orchestrator/test_holes.py -q

- two drivers of one sweep at once (real processes, a SQLite store and a real `mlflow server`):
  the second is refused with one line before any trial starts; SIGTERM then stops the first like
  Ctrl-C (trials cancelled, parent KILLED, exit 143);
- two processes racing for one sweep's lock, and a lock left by a SIGKILLed process;
- two `python -m orchestrator.sync` at once on a store that does not exist yet;
- MLflow refusing writes mid-sweep (its experiment deleted by another process): every trial
  is spooled, and a later sync uploads each once;
- a spool on an 8 KiB tmpfs with MLflow away: no torn line, one error naming the folder;
- a password in the tracking URI: not in the store, its artifacts, the spool, the working
  folder or anything printed;
- an unreachable server: one TrackingUnavailable, no urllib3 retry warnings.
(Bad configurations, stores and folders refused before Ray starts: test_cli.py.)
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
from mlflow import MlflowClient

from mlflow_server import MlflowServer, free_port
from orchestrator import tracking
from orchestrator.spool import SpoolFull, Spool, read_spool
from orchestrator.sweep import execute
from orchestrator.sync import main as sync_main
from orchestrator.tracking import SweepBusy, SweepLock, Tracker
from orchestrator.trial import FAULT_ENV
from test_faults import smoke_sweep
from test_report import make_record, passing
from test_tracking import children, parents

REPO = Path(__file__).resolve().parents[2]
FAST = ["bench.repetitions=2", "bench.rep_budget_s=0.05"]


def command_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", FAULT_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def wait_for(path: Path, text: str, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while text not in path.read_text():
        assert process.poll() is None, path.read_text()
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.2)


def live_runs(uri: str, experiment: str, run_type: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], f"tags.run_type = '{run_type}'") if found else []


@pytest.fixture
def mount_tmpfs():
    """Mount a tmpfs (root only) and unmount it afterwards; skips where mounting is not allowed."""
    mounted = []

    def mount(path: Path, size: str, options: str = "") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


# ---- two drivers, SIGTERM -------------------------------------------------------------------


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_a_second_driver_is_refused_and_sigterm_stops_the_first_like_ctrl_c(tmp_path, store):
    server = MlflowServer(tmp_path / "server").start() if store == "server" else None
    try:
        uri = server.uri if server else f"sqlite:///{tmp_path}/mlflow.db"
        command = [sys.executable, "-m", "orchestrator", "+milestone=smoke", *FAST, f"tracking.uri={uri}",
                   f"spool.dir={tmp_path / 'spool'}"]
        log = tmp_path / "first.err"
        with open(log, "w") as stderr:
            first = subprocess.Popen(command, cwd=tmp_path, env=command_env(**{FAULT_ENV: "hang:1"}),
                                     stdout=subprocess.PIPE, stderr=stderr, text=True)
            wait_for(log, "[smoke] 1/2 done, 1 running", first)

            second = subprocess.run(command, cwd=tmp_path, env=command_env(), capture_output=True, text=True,
                                    timeout=180)
            assert second.returncode == 2, second.stderr
            line = second.stderr.strip().splitlines()[-1]
            assert line.startswith("error: sweep ") and f"is being written by another driver pid {first.pid}" in line
            assert "trials on" not in second.stderr, "refused before any trial starts"

            first.send_signal(signal.SIGTERM)
            out, _ = first.communicate(timeout=120)
        assert first.returncode == 143, log.read_text()
        assert "terminated (SIGTERM): running trials cancelled; the sweep is recorded as KILLED" in log.read_text()
        assert "PASS" in out, "the table shows what was done"
        [parent] = live_runs(uri, "kvbench-smoke", "sweep")
        assert parent.info.status == "KILLED" and parent.data.tags["verdict"] == "FAIL"
        [child] = children(MlflowClient(uri), parent.info.run_id)
        assert child.data.tags["verdict"] == "PASS" and child.data.params["cache.dtype"] == "float32"
        assert live_runs(uri, "kvbench-smoke", "lock") == [], "the lock went with the driver"
        assert not (tmp_path / "spool").exists() or not list((tmp_path / "spool").glob("*.jsonl"))
    finally:
        if server:
            server.stop()


# ---- the sweep lock ---------------------------------------------------------------------------

RACER = """
import sys, time
from orchestrator.tracking import SweepBusy, SweepLock, Tracker
tracker = Tracker(sys.argv[1], experiment="kvbench-lock-race")
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    lock = SweepLock(tracker, "race0000feedbeef").acquire()
except SweepBusy as error:
    print("refused:", error)
else:
    print("won", flush=True)
    time.sleep(float(sys.argv[3]))
    lock.release()
"""


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_two_processes_racing_for_one_sweep_lock_one_wins(tmp_path, store):
    server = MlflowServer(tmp_path / "server").start() if store == "server" else None
    try:
        uri = server.uri if server else f"sqlite:///{tmp_path}/mlflow.db"
        Tracker(uri, experiment="kvbench-lock-race")  # the store exists before the race
        start = time.time() + 12  # both have imported MLflow by then
        racers = [subprocess.Popen([sys.executable, "-c", RACER, uri, str(start), "4"], cwd=REPO, env=command_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [r.communicate(timeout=120) for r in racers]
        assert [r.returncode for r in racers] == [0, 0], outs
        said = sorted(out.split()[0] for out, _ in outs)
        assert said == ["refused:", "won"], outs
        assert live_runs(uri, "kvbench-lock-race", "lock") == []
    finally:
        if server:
            server.stop()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    holder = subprocess.Popen([sys.executable, "-c", RACER, uri, "0", "300"], cwd=REPO, env=command_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "won"
    tracker = Tracker(uri, experiment="kvbench-lock-race")
    with pytest.raises(SweepBusy, match=f"another driver pid {holder.pid}"):
        SweepLock(tracker, "race0000feedbeef").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert len(live_runs(uri, "kvbench-lock-race", "lock")) == 1, "its lock run is left behind"
    # SQLite: the kernel let go of the file lock, so the lock run is taken over at once.
    with SweepLock(tracker, "race0000feedbeef"):
        assert len(live_runs(uri, "kvbench-lock-race", "lock")) == 1
    # Any store: a lock run whose heartbeat is older than LOCK_STALE_S is taken over.
    monkeypatch.setattr(tracking, "sqlite_path", lambda uri: None)  # as a server would be
    stale = tracker.client.create_run(tracker.experiment_id, tags={
        "run_type": "lock", "sweep_key": "race0000feedbeef", "lock_owner": "driver pid 1 on gone",
        "lock_heartbeat": f"{time.time() - tracking.LOCK_STALE_S - 1:.3f}"})
    with SweepLock(tracker, "race0000feedbeef") as lock:
        assert lock.run_id != stale.info.run_id
        assert [r.info.run_id for r in live_runs(uri, "kvbench-lock-race", "lock")] == [lock.run_id]
    fresh = tracker.client.create_run(tracker.experiment_id, tags={
        "run_type": "lock", "sweep_key": "race0000feedbeef", "lock_owner": "driver pid 2 on alive",
        "lock_heartbeat": f"{time.time():.3f}"})
    with pytest.raises(SweepBusy, match="another driver pid 2 on alive"):
        SweepLock(tracker, "race0000feedbeef").acquire()
    tracker.client.delete_run(fresh.info.run_id)


# ---- two syncs ---------------------------------------------------------------------------------


def test_two_syncs_at_once_upload_each_trial_once_and_both_say_what_happened(tmp_path):
    spool_dir = tmp_path / "spool"
    records = [make_record(i, passing(1.0 + i)) for i in range(15)]
    with Spool(spool_dir, "sync0000cafe0001") as spool:
        spool.write_sweep(uri="sqlite:///unused.db", experiment="kvbench-two-syncs", milestone="smoke",
                          tags={"title": "Smoke"}, params={"bench.repetitions": 2})
        for record in records:
            spool.write_trial(record)
        spool.write_finish("FINISHED", {"num_devices": 1.0})
    uri = f"sqlite:///{tmp_path}/new/mlflow.db"  # no store yet: both would create it
    command = [sys.executable, "-m", "orchestrator.sync", "--spool", str(spool_dir), "--tracking-uri", uri]
    syncs = [subprocess.Popen(command, cwd=tmp_path, env=command_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [s.communicate(timeout=300) for s in syncs]
    assert [s.returncode for s in syncs] == [0, 0], outs
    said = sorted(out.strip() for out, _ in outs)
    assert any("15 trial(s) uploaded to parent run" in text for text in said), outs
    assert any("nothing to upload" in text or "already uploaded" in text for text in said), outs
    assert not any("Traceback" in err or "error" in err.lower() for _, err in outs), outs

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("kvbench-two-syncs").experiment_id
    [parent] = parents(client, experiment_id)
    runs = children(client, parent.info.run_id)
    keys = [r.data.tags["trial_key"] for r in runs]
    assert sorted(keys) == sorted(r.trial_key for r in records), "one complete child per trial"
    assert all("verdict" in r.data.tags for r in runs)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials"] == 15


# ---- MLflow errors and a full spool disk, while trials run -------------------------------------


def test_mlflow_refusing_writes_mid_sweep_spools_every_trial(ray_session, tmp_path):
    uri, experiment = f"sqlite:///{tmp_path}/mlflow.db", "kvbench-refused"
    sweep = smoke_sweep(tmp_path, uri, experiment, "grid.cache.dtype=[float32,float16]")

    def delete_the_experiment_after_the_first_trial():
        client = MlflowClient(uri)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            found = client.get_experiment_by_name(experiment)
            runs = client.search_runs([found.experiment_id]) if found else []
            if any("verdict" in r.data.tags and "mlflow.parentRunId" in r.data.tags for r in runs):
                client.delete_experiment(found.experiment_id)  # every later write is an MLflow error
                return
            time.sleep(0.2)

    deleter = threading.Thread(target=delete_the_experiment_after_the_first_trial)
    deleter.start()
    err = io.StringIO()
    status = execute(sweep, tmp_path, out=io.StringIO(), err=err)
    deleter.join()
    assert status == 0, err.getvalue()
    assert "MLflow refused a write (MlflowException" in err.getvalue()
    assert "results go to the spool" in err.getvalue()
    spooled = read_spool(tmp_path / "spool" / f"{sweep.key}.jsonl")
    by_dtype = {r.params["cache.dtype"]: r for r in spooled.records.values()}
    assert "float16" in by_dtype and by_dtype["float16"].verdict == "PASS", "the second trial is kept"
    assert spooled.finish == "FINISHED" and spooled.torn == 0

    # The experiment back (sync restores it), each trial is uploaded once.
    assert sync_main(["--spool", str(tmp_path / "spool"), "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    [parent] = parents(client, client.get_experiment_by_name(experiment).experiment_id)
    runs = children(client, parent.info.run_id)
    assert sorted(r.data.params["cache.dtype"] for r in runs) == ["float16", "float32"]
    assert parent.data.tags["verdict"] == "PASS"


def test_a_full_spool_disk_leaves_no_torn_line(tmp_path, mount_tmpfs):
    folder = mount_tmpfs(tmp_path / "tiny", "8k")
    spool = Spool(folder, "full0000beef0001")
    written = 0
    with pytest.raises(SpoolFull) as raised:
        for i in range(100):
            spool.write_trial(make_record(i, passing(1.0)))
            written += 1
    spool.close()
    message = str(raised.value)
    assert message.startswith(f"the spool folder {folder} is full (") and "bytes free, a trial's line needs" in message
    data = (folder / "full0000beef0001.jsonl").read_bytes()
    assert data.endswith(b"\n") and len(data.splitlines()) == written
    spooled = read_spool(folder / "full0000beef0001.jsonl")
    assert spooled.torn == 0 and len(spooled.records) == written


def test_a_driver_whose_spool_disk_fills_stops_with_one_error_and_no_torn_line(ray_session, tmp_path, mount_tmpfs):
    folder = mount_tmpfs(tmp_path / "tiny", "8k")
    uri = f"http://127.0.0.1:{free_port()}"  # MLflow away: everything goes to the spool
    sweep = smoke_sweep(tmp_path, uri, "kvbench-full", "grid.cache.dtype=[float32,float16,bfloat16]",
                        f"spool.dir={folder}")
    with pytest.raises(SpoolFull, match=f"the spool folder {folder} is full"):
        execute(sweep, tmp_path, out=io.StringIO(), err=io.StringIO())
    path = folder / f"{sweep.key}.jsonl"
    if path.exists() and path.stat().st_size:
        assert path.read_bytes().endswith(b"\n") and read_spool(path).torn == 0


def test_the_command_with_a_full_spool_disk_prints_one_line(tmp_path, mount_tmpfs):
    folder = mount_tmpfs(tmp_path / "tiny", "4k")
    command = [sys.executable, "-m", "orchestrator", "+milestone=smoke", *FAST, "grid.cache.dtype=[float16]",
               f"tracking.uri=http://127.0.0.1:{free_port()}", f"spool.dir={folder}"]
    done = subprocess.run(command, cwd=tmp_path, env=command_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the spool folder {folder} is full ("), done.stderr
    assert "Traceback" not in done.stderr


# ---- secrets ----------------------------------------------------------------------------------

PASSWORD = "Pa55-w0rd-kv77"


def _files_holding(root: Path, text: str) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and text.encode() in path.read_bytes():
            hits.append(str(path))
    return hits


def test_a_password_in_the_tracking_uri_is_nowhere(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with MlflowServer(tmp_path / "server") as server:
        uri = server.uri.replace("http://", f"http://kvuser:{PASSWORD}@")
        sweep = smoke_sweep(tmp_path, uri, "kvbench-secret", "grid.cache.dtype=[float16]")
        out, err = io.StringIO(), io.StringIO()
        assert execute(sweep, tmp_path, out=out, err=err) == 0, err.getvalue()
        # the ending names the server's page without the credentials
        assert server.uri in out.getvalue() and "kvuser" not in out.getvalue()
        # MLflow away, the same sweep again (resume off): the spool holds it
        away = uri.replace(f":{server.port}", f":{free_port()}")
        sweep = smoke_sweep(tmp_path, away, "kvbench-secret", "grid.cache.dtype=[float16]", "resume=false")
        out2, err2 = io.StringIO(), io.StringIO()
        execute(sweep, tmp_path, out=out2, err=err2)
        assert "results go to the spool" in err2.getvalue()
        spooled = list((tmp_path / "spool").glob("*.jsonl"))
        assert spooled and "kvuser:***@" in spooled[0].read_text()
        client = MlflowClient(server.uri)
        [parent] = parents(client, client.get_experiment_by_name("kvbench-secret").experiment_id)
        assert PASSWORD not in json.dumps([parent.data.tags, parent.data.params])
        assert "kvuser:***@" in parent.data.tags["overrides"]
    for text in (out.getvalue(), err.getvalue(), out2.getvalue(), err2.getvalue()):
        assert PASSWORD not in text
    assert _files_holding(tmp_path, PASSWORD) == [], "store, artifacts, spool and working folder"


def test_an_unreachable_server_gives_one_line_not_urllib3_retry_warnings(caplog):
    uri = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level("WARNING"), pytest.raises(tracking.TrackingUnavailable) as raised:
        Tracker(uri, experiment="kvbench-away")
    assert not [r for r in caplog.records if r.name.startswith("urllib3")], caplog.text
    assert str(raised.value).startswith(f"MLflow tracking at {uri} is unavailable")


def test_overrides_are_redacted_before_they_become_a_tag():
    assert tracking.redact_override("+db.password=hunter22") == "+db.password=***"
    assert tracking.redact_override("++cluster.auth_token=abc") == "++cluster.auth_token=***"
    assert tracking.redact_override(f"tracking.uri=http://kvuser:{PASSWORD}@host:5000") == \
        "tracking.uri=http://kvuser:***@host:5000"
    assert tracking.redact_override("milestone.criteria.token_gen.threshold=3") == \
        "milestone.criteria.token_gen.threshold=3"


def test_sync_refuses_a_store_it_cannot_use_and_leaves_it_untouched(tmp_path, capsys):
    (tmp_path / "spool").mkdir()
    (tmp_path / "notes.db").write_text("not a database\n" * 40)
    before = (tmp_path / "notes.db").read_bytes()
    assert sync_main(["--spool", str(tmp_path / "spool"), "--tracking-uri", f"sqlite:///{tmp_path}/notes.db"]) == 2
    assert "is not a sound SQLite database (file is not a database)" in capsys.readouterr().err
    assert (tmp_path / "notes.db").read_bytes() == before
    assert sync_main(["--spool", str(tmp_path / "spool"), "--tracking-uri", f"file://{tmp_path}/mlruns"]) == 2
    assert "is a file store, which MLflow 3.17 refuses" in capsys.readouterr().err
