"""A team's MLflow server, set up as the README says: PostgreSQL, basic auth, users, permissions.

Run: python -m pytest tests/orchestrator/test_team_server.py -q

The README's recipe blocks (`<!-- recipe: NAME -->` before each) run as written, with only this
test's own values put in for the README's (host and ports, folders, passwords; `SITE` lists each,
and each must occur in the README): a private PostgreSQL 15 (tests/orchestrator/postgres.py:
initdb in a temporary folder, 127.0.0.1, a free port, stopped at teardown) gets the `mlflow` role
and its two databases; `mlflow server --app-name basic-auth` keeps its runs in one and its users
in the other; the admin creates a user and grants EDIT; that user's smoke sweep is a real
`python -m orchestrator` subprocess; the runs are read back, and PostgreSQL is asked what it holds.
Then: refused logins and permissions end the command with exit 2 before Ray starts; the server
killed mid-sweep, restarted, and the spool synced with the credentials of the environment.

Without PostgreSQL's server binaries (initdb, pg_ctl) the tests that need it skip, saying how
to install them (`apt-get install -y postgresql`, or PG_BIN=<folder>).
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import re
import secrets
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from packaging.requirements import Requirement

from mlflow_server import MlflowServer, free_port
from orchestrator.spool import SYNCED_DIR, read_spool
from orchestrator.sweep import execute
from orchestrator.tracking import check_server_access, open_hint
from orchestrator.trial import FAULT_ENV
from postgres import Postgres, PostgresUnavailable
from test_faults import smoke_sweep
from test_tracking import children, parents

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
LOGIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def recipe_block(name: str) -> str:
    """The README's code block that follows `<!-- recipe: NAME -->`."""
    found = re.search(rf"<!-- recipe: {name} -->\n```\w+\n(.*?)```", README.read_text(), re.S)
    assert found, f"README.md has no code block after <!-- recipe: {name} -->"
    return found.group(1)


def base_env(**extra: str) -> dict[str, str]:
    """This environment without logins, tracking URI, Ray address or injected faults; this
    Python's scripts (python, mlflow) first on PATH; the checkout importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in (*LOGIN_ENV, "MLFLOW_TRACKING_URI", "RAY_ADDRESS", FAULT_ENV)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def login(user: str, password: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


class Team:
    """The README's site, with this test's values put in."""

    def __init__(self, root: Path, pg: Postgres):
        self.root, self.pg = root, pg
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db_password, self.admin_password = secrets.token_hex(12), secrets.token_hex(12)
        self.alice_password = secrets.token_hex(12)
        # the README's value -> this test's
        self.site = {
            "db.internal:5432": f"127.0.0.1:{pg.port}",
            "/etc/mlflow": str(root / "etc"),
            "/srv/mlflow/artifacts": str(root / "artifacts"),
            "--port 5000": f"--port {self.port}",
            "127.0.0.1:5000": f"127.0.0.1:{self.port}",
            "<the database password>": self.db_password,
            "<a long random admin password>": self.admin_password,
            "<another long random string>": secrets.token_hex(16),
            "<her password>": self.alice_password,
        }
        self.server: RecipeServer | None = None

    def block(self, name: str) -> str:
        text = recipe_block(name)
        for readme_value, ours in self.site.items():
            text = text.replace(readme_value, ours)
        return text

    def admin(self) -> dict[str, str]:
        return login("admin", self.admin_password)

    def create_user(self, name: str, password: str, experiment: str, permission: str | None) -> str:
        """As the admin: a user, an experiment (made by the admin) and a grant; its id."""
        from mlflow.server import get_app_client

        with _environment(self.admin()):
            auth = get_app_client("basic-auth", tracking_uri=self.uri)
            auth.create_user(username=name, password=password)
            client = MlflowClient(self.uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            if permission:
                auth.grant_user_permission(name, "experiment", experiment_id, permission)
        return experiment_id


class RecipeServer(MlflowServer):
    """The README's server block run by bash in its own session: kill() stops bash and the
    server it started; start() runs the block again (same port, same databases)."""

    def __init__(self, team: Team):
        super().__init__(team.root / "server", port=team.port)
        self.team = team

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        assert self.process is None, "server already running"
        env = base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(["bash", "-euc", self.team.block("server")], stdout=log,
                                            stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise RuntimeError(f"the README's server block exited with {code}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"the README's server not healthy after {timeout:.0f} s:\n{self.log_tail()}")


class _environment:
    """Set environment variables for a block of in-process code (MLflow reads them per request)."""

    def __init__(self, values: dict[str, str]):
        self.values, self.saved = values, {}

    def __enter__(self) -> None:
        for key in (*LOGIN_ENV, *self.values):
            self.saved[key] = os.environ.pop(key, None)
        os.environ.update(self.values)

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    try:
        pg = Postgres().start()
    except PostgresUnavailable as error:
        pytest.skip(f"PostgreSQL could not start here: {error}")
    try:
        site = Team(tmp_path_factory.mktemp("team-server"), pg)
        database = subprocess.run(["bash", "-euc", site.block("database")], env={**base_env(), **pg.env},
                                  capture_output=True, text=True, timeout=60)
        assert database.returncode == 0, database.stderr
        site.server = RecipeServer(site).start()
        try:
            yield site
        finally:
            site.server.stop()
    finally:
        pg.stop()


def run_command(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ---- the recipe ----------------------------------------------------------------------------


def test_the_readme_installs_what_the_server_needs():
    """The install block's requirements (mlflow[auth] and psycopg 3) hold in this environment,
    extras included; the `server` and `test` extras carry the same."""
    words = shlex.split(recipe_block("install"))
    assert words[:2] == ["pip", "install"]
    for text in words[2:]:
        requirement = Requirement(text)
        version = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement}: {version} installed"
        for extra in requirement.extras:
            for needed in map(Requirement, importlib.metadata.requires(requirement.name) or []):
                if needed.marker is not None and needed.marker.evaluate({"extra": extra}):
                    importlib.metadata.version(needed.name)  # raises PackageNotFoundError if missing
    pyproject = (REPO / "pyproject.toml").read_text()
    for extra in ("test", "server"):
        listed = re.search(rf"^{extra} = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
        assert '"mlflow[auth]' in listed and '"psycopg[binary]' in listed, extra


@pytest.mark.slow
def test_the_readme_recipe_runs_a_sweep_as_a_new_user(team, tmp_path):
    # Basic auth on: no login is refused, the admin is let in.
    endpoint = f"{team.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(endpoint, timeout=10).status_code == 401
    assert requests.get(endpoint, auth=("admin", team.admin_password), timeout=10).status_code == 200
    assert requests.get(endpoint, auth=("admin", "wrong-password"), timeout=10).status_code == 401

    # The admin creates alice and grants her EDIT on kvbench-smoke (the README's Python block).
    users = run_command([sys.executable, "-c", team.block("users")], tmp_path, base_env(**team.admin()), 120)
    assert users.returncode == 0, users.stderr

    # Alice's sweep: the README's block, a real `python -m orchestrator` in its own process.
    sweep = run_command(["bash", "-euc", team.block("sweep")], tmp_path, base_env(), 420)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    for secret in (team.alice_password, team.admin_password, team.db_password):
        assert secret not in sweep.stdout + sweep.stderr

    with _environment(login("alice", team.alice_password)):
        client = MlflowClient(team.uri)
        experiment = client.get_experiment_by_name("kvbench-smoke")
        [parent] = parents(client, experiment.experiment_id)
        runs = children(client, parent.info.run_id)
    # The final line names the server's page of the parent run, without credentials.
    assert sweep.stdout.rstrip().splitlines()[-1] == (
        f"{team.uri}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning")
    assert parent.info.status == "FINISHED" and parent.data.tags["verdict"] == "PASS"
    assert sorted(r.data.params["cache.dtype"] for r in runs) == ["float16", "float32"]
    assert all(r.data.tags["verdict"] == "PASS" for r in runs)
    assert not (tmp_path / "spool").exists(), "nothing was spooled"

    # Both stores are PostgreSQL's: the runs in `mlflow`, the users and grants in `mlflow_auth`.
    # the parent and its two trials; the sweep's lock run, which alice (EDIT, no MANAGE) may not
    # delete, is released by its tag and ended instead
    assert int(team.pg.psql(
        f"SELECT count(*) FROM runs r WHERE r.lifecycle_stage = 'active' AND r.experiment_id = "
        f"{experiment.experiment_id} AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid "
        f"AND t.key = 'run_type' AND t.value = 'lock')", "mlflow")) == 3
    assert team.pg.psql(
        f"SELECT t.value FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid WHERE r.experiment_id = "
        f"{experiment.experiment_id} AND t.key = 'lock_released'", "mlflow").split() == ["1"]
    assert "alice" in team.pg.psql("SELECT username FROM users", "mlflow_auth").split()


# ---- refusals before Ray starts ------------------------------------------------------------

REFUSALS = {
    "no login": ({}, "asks for a login and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD are not both set"),
    "wrong password": (login("frank", "not-his-password"),
                       "refused user 'frank': wrong username or password; fix MLFLOW_TRACKING_PASSWORD"),
    "read only": (login("grace", "grace-password-1"),
                  "user 'grace' has READ on the experiment 'kvbench-refusals' (id {id}) on {uri}; a sweep needs EDIT"),
}


@pytest.fixture(scope="module")
def refusal_users(team):
    """frank (EDIT, but the tests give a wrong password) and grace (READ only, the default) on
    kvbench-refusals, an experiment the admin made."""
    team.create_user("frank", "frank-password-1", "kvbench-refusals", "EDIT")
    return team.create_user("grace", "grace-password-1", "kvbench-refusals", None)


@pytest.mark.slow  # a command that imports Hydra and MLflow: seconds each
@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_login_or_permission_exits_2_with_one_line_before_ray_starts(team, refusal_users, tmp_path, case):
    credentials, expected = REFUSALS[case]
    command = [sys.executable, "-m", "orchestrator", "+milestone=smoke", f"tracking.uri={team.uri}",
               "tracking.experiment=kvbench-refusals"]
    done = run_command(command, tmp_path, base_env(**credentials), 120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert expected.format(id=refusal_users, uri=team.uri) in lines[0]
    assert "trials on" not in done.stderr, "Ray must not have started"
    assert not (tmp_path / "spool").exists(), "a refusal is not spooled"
    for password in ("not-his-password", "grace-password-1"):
        assert password not in done.stdout + done.stderr


def test_access_passes_for_local_stores_and_for_a_server_that_is_away(tmp_path):
    check_server_access(f"sqlite:///{tmp_path}/mlflow.db", "kvbench-smoke")  # nothing to check
    check_server_access(f"http://127.0.0.1:{free_port()}", "kvbench-smoke")  # away: the sweep spools
    assert open_hint(f"sqlite:///{tmp_path}/mlflow.db", "1", "ab12") == f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db"
    assert open_hint("https://alice:pw@mlflow.example.org/", "7", "ab12") == "https://mlflow.example.org/#/experiments/7/runs/ab12?workflowType=machine_learning"
    assert open_hint("http://127.0.0.1:5000", None, None) == "http://127.0.0.1:5000"


# ---- the server goes away mid-sweep --------------------------------------------------------


@pytest.mark.slow
def test_server_killed_mid_sweep_spools_then_sync_logs_in_from_the_environment(team, ray_session, tmp_path, monkeypatch):
    experiment = "kvbench-team-outage"
    password = "erin-password-1"
    experiment_id = team.create_user("erin", password, experiment, "EDIT")  # EDIT, not MANAGE
    for key, value in login("erin", password).items():
        monkeypatch.setenv(key, value)
    sweep = smoke_sweep(tmp_path, team.uri, experiment, "grid.cache.dtype=[float32,float16,bfloat16]")

    def kill_after_the_first_trial():
        client = MlflowClient(team.uri)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            runs = client.search_runs([experiment_id])
            if any("verdict" in r.data.tags and "mlflow.parentRunId" in r.data.tags for r in runs):
                team.server.kill()
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_the_first_trial)
    killer.start()
    out, err = io.StringIO(), io.StringIO()
    status = execute(sweep, tmp_path, out=out, err=err)
    killer.join()
    assert status == 0, err.getvalue()
    assert "is unavailable" in err.getvalue() and "results go to the spool" in err.getvalue()
    spool_file = tmp_path / "spool" / f"{sweep.key}.jsonl"
    spooled = read_spool(spool_file)
    assert spooled.finish == "FINISHED" and 1 <= len(spooled.records) <= 3
    parent_id = spooled.header["parent_id"]
    assert out.getvalue().rstrip().splitlines()[-1] == f"{team.uri}/#/experiments/{experiment_id}/runs/{parent_id}?workflowType=machine_learning"
    text = spool_file.read_text()
    assert password not in text and "erin" not in text, "the spool holds no credentials"

    team.server.start()  # the README's block again: same port, same databases
    sync = [sys.executable, "-m", "orchestrator.sync", "--spool", str(tmp_path / "spool")]
    # Without a login: refused, one line that says what to set; the file stays.
    refused = run_command(sync, REPO, base_env(), 120)
    assert refused.returncode == 1, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert "not uploaded" in line and "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" in line
    assert spool_file.exists()
    # With erin's login in the environment at sync time: uploaded into the same parent run.
    synced = run_command(sync, REPO, base_env(**login("erin", password)), 120)
    assert synced.returncode == 0, synced.stderr
    assert f"trial(s) uploaded to parent run {parent_id}" in synced.stdout
    assert not spool_file.exists() and list((tmp_path / "spool" / SYNCED_DIR).iterdir())

    client = MlflowClient(team.uri)
    [parent] = parents(client, experiment_id)
    complete = [r for r in children(client, parent_id) if "verdict" in r.data.tags]
    assert parent.info.run_id == parent_id and parent.info.status == "FINISHED"
    assert parent.data.tags["verdict"] == "PASS" and parent.data.metrics["n_trials"] == 3
    assert sorted(r.data.params["cache.dtype"] for r in complete) == ["bfloat16", "float16", "float32"]


def test_a_user_with_edit_replaces_a_leftover_trial_run_without_deleting_it(team, caplog):
    """Deleting runs needs MANAGE; with EDIT, log_trial still records the trial once and leaves
    the incomplete child of an interrupted upload in place, with a warning."""
    from orchestrator.tracking import Tracker
    from test_report import make_record, passing

    experiment_id = team.create_user("heidi", "heidi-password-1", "kvbench-team-edit", "EDIT")
    record = make_record(0, passing(1.0))
    with _environment(login("heidi", "heidi-password-1")):
        tracker = Tracker(team.uri, "kvbench-team-edit")
        parent_id = tracker.start_sweep(milestone="smoke", sweep_key="edit0001")
        client = MlflowClient(team.uri)
        leftover = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent_id, "run_type": "trial",
                                                          "trial_key": record.trial_key}).info.run_id
        child_id = tracker.log_trial(parent_id, record)
        assert tracker.finished_trial_keys(parent_id) == {record.trial_key}
        assert client.get_run(leftover).info.lifecycle_stage == "active"
        assert client.get_run(child_id).data.tags["verdict"] == "PASS"
    assert f"run {leftover} is obsolete but stays: deleting runs needs MANAGE" in caplog.text
