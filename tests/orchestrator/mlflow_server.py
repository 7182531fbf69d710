"""A real `mlflow server` on 127.0.0.1 for tests: start it, kill it, restart it on the same port.

    from mlflow_server import MlflowServer
    with MlflowServer(tmp_path) as server:      # sqlite:///<tmp_path>/db, artifacts in <tmp_path>
        tracker = Tracker(server.uri, ...)      # http://127.0.0.1:<free port>
        server.kill()                           # SIGKILL, like a crash: requests now fail
        server.start()                          # same port, same store: the data is still there

Or as a fixture: `from mlflow_server import mlflow_server` in a test module gives one running
server per test, stopped afterwards.

Key decisions:
- The server runs in its own session (process group), so `kill()` reaches its uvicorn worker
  too, and only the processes this helper started are signalled.
- It listens on 127.0.0.1 only, with `--workers 1` and MLflow's background job runner off
  (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false): startup takes about 8 s on 2 cores instead of 15.
- Ready means `GET /health` answers 200; a server that exits or stays silent for `timeout`
  seconds raises RuntimeError with the tail of its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """One `mlflow server` subprocess with a SQLite store under `root`."""

    def __init__(self, root: str | os.PathLike[str], port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend_uri = f"sqlite:///{self.root / 'db'}"
        self.log_path = self.root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        assert self.process is None, "server already running"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"mlflow server exited with {code}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL the server and its workers (a crash, not a shutdown); wait until they're gone."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        self._signal(signal.SIGTERM, grace=10.0)

    def _signal(self, sig: int, grace: float = 10.0) -> None:
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the server's pid
        _killpg(pgid, sig)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=10.0)
        _killpg(pgid, signal.SIGKILL)  # the uvicorn worker, if it outlived its parent
        self.process = None
        deadline = time.monotonic() + 10.0
        while self.listening() and time.monotonic() < deadline:
            time.sleep(0.05)

    def listening(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "MlflowServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A running MlflowServer in a fresh directory; stopped after the test."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server
