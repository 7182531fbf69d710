"""A real two-node Ray cluster on this machine, with token authentication on: the sweep's trials
land on both nodes.

Run: python -m pytest tests/orchestrator/test_cluster.py -q      (about 1.5 min on 2 cores: slow)

What it does, as a user would on two hosts:
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<secret> ray start --head --port=P --node-ip-address=127.0.0.1 --num-cpus=1
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<secret> ray start --address=127.0.0.1:P --num-cpus=1
    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<secret> python -m orchestrator +milestone=smoke cluster.address=127.0.0.1:P
then reads the MLflow store: the smoke grid's two trials carry two different Ray node ids (one
CPU trial per node at a time, so the driver places one on each), and they ran at the same time.
A driver with another token is refused.

Key decisions:
- Ray 2.60 authenticates every connection when RAY_AUTH_MODE=token; the token comes from
  RAY_AUTH_TOKEN (or the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token). Both nodes and the
  driver get the same two variables through the environment, so nothing is written to ~/.ray.
- The cluster lives in its own `--temp-dir` (a fresh /tmp/kvray-* folder, short enough for Ray's
  socket paths) on free ports. Teardown never runs `ray stop`, which would stop every Ray on the
  machine (the suite's own session Ray and anyone else's): it ends exactly this cluster's
  processes, those whose command line names its temp dir or its GCS port, and their children.
- The driver is a subprocess, so it never meets the test session's own Ray (conftest).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from mlflow_server import free_port
from orchestrator import timeline
from orchestrator.tracking import Tracker

REPO = Path(__file__).resolve().parents[2]
# The `ray` command of the Python running the tests (a virtual environment need not be on PATH).
RAY_CLI = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"
pytestmark = pytest.mark.slow


def cluster_processes(temp_dir: str, port: int) -> list[psutil.Process]:
    """This cluster's processes: those naming its temp dir or its GCS address, and their children."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        if any(temp_dir in a or (a.startswith(("--address=", "--gcs-address=")) and a.endswith(f":{port}"))
               for a in args):
            roots.append(proc)
    family = {p.pid: p for p in roots}
    for proc in roots:
        try:
            family.update((c.pid, c) for c in proc.children(recursive=True))
        except psutil.Error:
            pass
    family.pop(os.getpid(), None)
    return list(family.values())


def stop_cluster(temp_dir: str, port: int) -> None:
    procs = cluster_processes(temp_dir, port)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def ray_start(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([RAY_CLI, "start", *args], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"ray start {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def cluster():
    """(address, environment with the token) of a two-node cluster with token authentication."""
    temp_dir = tempfile.mkdtemp(prefix="kvray-", dir="/tmp")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", f"--temp-dir={temp_dir}",
              f"--object-store-memory={100 * 1024 * 1024}"]
    try:
        ray_start(["--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
                   *common], env)
        ray_start([f"--address=127.0.0.1:{port}", *common], env)
        yield f"127.0.0.1:{port}", env
    finally:
        stop_cluster(temp_dir, port)
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_smoke(address: str, env: dict[str, str], folder: Path) -> subprocess.CompletedProcess:
    folder.mkdir()
    command = [sys.executable, "-m", "orchestrator", "+milestone=smoke", f"cluster.address={address}",
               f"tracking.uri=sqlite:///{folder / 'mlflow.db'}", f"spool.dir={folder / 'spool'}",
               f"hydra.run.dir={folder / 'hydra'}"]
    return subprocess.run(command, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=400)


def test_trials_land_on_both_nodes_of_a_token_authenticated_cluster(cluster, tmp_path, capsys):
    address, env = cluster
    proc = run_smoke(address, env, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-4000:]

    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    tracker = Tracker(uri, experiment="kvbench-smoke")
    (parent,) = tracker.client.search_runs([tracker.experiment_id], "tags.run_type = 'sweep'")
    records = tracker.trial_records(parent.info.run_id)
    assert [r.status for r in records] == ["OK", "OK"]
    nodes = {r.info.get("node_id") for r in records}
    assert len(nodes) == 2 and None not in nodes, [r.info for r in records]
    assert {r.info["device_key"] for r in records} == {f"{n}:cpu" for n in nodes}

    t = timeline.sweep_timeline(records)
    assert len(t.devices) == 2 and t.max_concurrent == 2 and t.overlap_s > 0
    assert timeline.main(["--tracking-uri", uri, parent.info.run_id]) == 0
    assert "| devices | 2 |" in capsys.readouterr().out


def test_a_driver_with_another_token_is_refused(cluster, tmp_path):
    address, env = cluster
    proc = run_smoke(address, {**env, "RAY_AUTH_TOKEN": secrets.token_hex(16)}, tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert f"cluster.address='{address}'" in proc.stderr
    assert "RAY_AUTH_TOKEN" in proc.stderr  # the message names the likely cause and the fix
    assert not (tmp_path / "run" / "mlflow.db").exists()  # refused before anything was recorded
