"""MLflow tracking of a sweep: one parent run per sweep, one nested child run per trial.

The only module of the project that imports mlflow. The driver alone writes through it
(`python -m orchestrator.timeline` reads a stored sweep back with `read_sweep`):

    from orchestrator.tracking import Tracker, TrackingUnavailable, resolve_tracking_uri
    uri = resolve_tracking_uri(cfg.tracking.uri, cwd)      # sqlite:///<cwd>/mlflow.db by default
    tracker = Tracker(uri, experiment="kvbench-m10")       # creates the experiment if missing
    parent = tracker.start_sweep(milestone="m10", sweep_key=key, tags=..., params=...,
                                 config_yaml=text, resume=True)
    done = tracker.finished_trial_keys(parent)            # trials to skip on resume
    tracker.log_trial(parent, record)                     # once per finished trial
    tracker.finish_sweep(parent, records, status="FINISHED")
    # also: tracker.has_run(run_id), tracker.trial_records(parent)
    sweep = read_sweep(uri, "3f2a9c1e")                   # a stored sweep, read back (timeline)

What lands where:
- Parent run (tag `run_type=sweep`): tags `milestone`, `sweep_key`, the sweep's tags, the git
  commit; the sweep's params; artifact `config.yaml`. `finish_sweep` adds tag `verdict`
  (PASS only if the sweep FINISHED and every trial passed), metrics `n_trials`, `n_pass`, `n_fail`, `n_error`,
  `n_skipped` and the driver's (`sweep_wall_s`, `num_devices`), and artifacts `summary.md`, `summary.csv`, `plots/<criterion>.png`.
- Child run (tag `run_type=trial`, `mlflow.parentRunId`): params = the trial's flattened
  config; metrics = its finite figures (NaN and infinities stay in result.json only),
  `attempts` and `criterion.<name>.threshold` / `.margin`; tags `verdict`, `status`, `reason`,
  `trial_key`, `attempts`, `criterion.<name>` = pass|fail, the record's `info` (GPU name and
  UUID, driver, CUDA, torch, host, where and when it ran: `device_key`, `node_id`,
  `driver_submitted_at`, `driver_received_at`, ...), `git_commit`, and the sweep's tags repeated so the UI's filters find
  trials; artifact `result.json` (the TrialRecord); start and end time from the record. ERROR
  trials end as FAILED runs, the others as FINISHED.

Key decisions:
- Exactly one child run per trial_key under a parent: `log_trial` is idempotent. Logging a
  record whose child already holds the identical record (same digest tag `record_digest`) is a
  no-op that returns the existing run id; logging a different record for the same trial_key
  replaces the earlier child (last write wins): the new child is written completely first, then
  every other child with that trial_key is deleted. A child is complete once it carries its
  `verdict` tag, which is written last; children left incomplete by an interrupted upload are
  deleted by the next `log_trial` of that trial_key. So retries, spool uploads and resumes can
  call `log_trial` again without ever leaving two children. (A crash between writing the new
  child and deleting the old one leaves both until the next `log_trial` of that key; counts
  and `finished_trial_keys` go by distinct trial_key, so they stay right meanwhile.)
- Resume: `start_sweep(resume=True)` reopens the most recent parent run with the same
  `sweep_key` unless that run is FINISHED (a complete sweep); reopening keeps the run id, sets it
  RUNNING again and counts `resumes`. Params already on the parent are not logged again (MLflow
  params are immutable); a resumed sweep keeps the first values. Two drivers of the same sweep
  at once cannot happen: the second is refused by the sweep's lock (below).
- `finish_sweep` judges the whole sweep: the records it is given plus the records of children
  logged earlier (read back from their `result.json`), so a resumed sweep's verdict, counts,
  table and plots cover every trial.
- Unreachable tracking: every public method raises `TrackingUnavailable` (never a raw MLflow,
  requests or SQLAlchemy error) when the store cannot be reached: connection refused or reset,
  timeouts, HTTP 5xx after retries, a locked or unwritable database. Other MLflow errors (a
  bug, a bad value) propagate unchanged. So that a dead HTTP server fails within seconds rather
  than MLflow's default of minutes, the commands set MLflow's HTTP retries and timeout before
  they import this module (orchestrator/tracking_env.py; importing this module leaves
  `os.environ` alone). The driver switches to the spool (orchestrator/recorder.py) on the first
  `TrackingUnavailable` rather than pay that again for every trial.
- Secrets: params, tags and the record's info pass through `redact`: keys that name a secret
  are dropped (a word password, secret, credential(s), auth, apikey, cookie, bearer, ... anywhere;
  a dotted part ending in the word token(s), as in `ray.token` or `cluster.auth_token`; a bare
  `key` or a qualified one, `api_key`, `private_key`, `SECRET_ACCESS_KEY`). Words that merely
  begin with or contain such a word stay: `milestone.criteria.token_gen.*`, `tokenizer_path`,
  `trial_key`, `keyboard`. Passwords in URIs (`scheme://user:pass@host` -> `user:***@host`) and
  the values of secret-named environment variables are masked. The config artifact gets the
  same treatment. Nothing is read from the environment to log.
- A team's server (`mlflow server --app-name basic-auth`): `check_server_access(uri, experiment)`,
  called before Ray starts, turns a missing login, a wrong password or a user without EDIT on
  the experiment into `AccessRefused` (one line: the variable to set or the permission to ask
  for); any Tracker method meeting HTTP 401/403 later raises it too, never `TrackingUnavailable`,
  so such a refusal is never spooled. Credentials stay in MLFLOW_TRACKING_USERNAME / _PASSWORD,
  read by MLflow at each request (a sync uses the ones set when it runs). `open_hint` names what
  to open at the end: the server's page of the parent run, or `mlflow ui` for a local store.
- Where people look (MLflow 3's UI): the experiment carries the tag
  `mlflow.experimentKind=custom_model_development`, the experiment type MLflow 3's UI reads
  (and writes when a user picks one) to show an experiment as model training, its runs, rather
  than as a GenAI app (traces). MLflow 3.17's UI with its sidebar switch takes the mode from
  the address instead (`?workflowType=machine_learning`, else the browser's last choice,
  GenAI at first): the driver prints the parent run's address with that parameter (sweep.py).
  Run names carry the verdict: the
  parent is renamed at the end to "<verdict> <passed>/<trials> <milestone>-<key>", a child is
  "<index> <verdict>[ noisy] <dtype ctx layers heads>". Each run's description (the
  `mlflow.note.content` tag, the run page's Description) holds its summary: the parent's the
  sweep's verdict line, where it ran, the worst margin per criterion and the whole table
  (report.format_sweep_note); a child's its criteria with value, threshold and margin
  (report.format_trial_note). A child's criterion figures are also logged as
  `criteria/<criterion>` (the figure) and `criteria/<criterion>.margin_pct`, a section of
  their own in the run's charts; the parent logs `worst_margin_pct/<criterion>`.
- Run status against verdict: MLflow shows a run's status as a green check (FINISHED) or a
  red cross (FAILED); a green check on a failed sweep misleads. So a run's status follows its
  verdict: a trial that PASSed is FINISHED, one that FAILed or ERRORed is FAILED, a SKIPPED one
  KILLED; a sweep that ran every trial is FINISHED when its verdict is PASS and FAILED when it
  is FAIL (tag `complete=true` in both cases); a sweep stopped early keeps the status it was
  given (KILLED, FAILED) without `complete`. Resume reopens only a parent that is neither
  FINISHED nor `complete`. The `verdict` tag stays the one source of truth for scripts.
- System metrics: a trial samples CPU, host memory and (through NVML) its GPU's utilisation,
  memory and power every second in its worker (orchestrator/sampler.py) and returns the series
  in its record; the child run logs them as MLflow's own `system/...` metrics
  (`system/cpu_utilization_percentage`, `system/gpu_0_power_usage_watts`, ...) with each
  sample's timestamp and step, so the run's "System metrics" tab shows them.
- One writer per sweep, whatever the store (`SweepLock`, taken by the driver once Ray is up,
  before any trial starts, and by every spool upload): the writer creates a lock run (tag
  `run_type=lock`, the `sweep_key`, its owner and a `lock_heartbeat` time, refreshed every
  LOCK_HEARTBEAT_S on a server), then lists the sweep's live lock runs; the earliest (start
  time, then run id) wins, the others delete their own and are refused (`SweepBusy`, one
  line, exit 2). A lock run whose heartbeat is older than LOCK_STALE_S belongs to a writer
  that died and is deleted (so is one a spool names: its driver ended while the store was
  away, and the spool's upload takes over at once). On a SQLite store the writer first takes
  an `flock` on `<db>.<sweep_key>.lock` next to the database (the kernel lets go when the
  process dies): a second writer on that machine is refused at once, and a killed driver's
  lock run is taken over at once. Since only the lock holder writes a sweep, `log_trial`
  never races another writer of the same trial. (The lock files stay next to the database.)
- Creating a SQLite store is serialized by an `flock` on `<db>.lock` (two processes opening a
  new store at once would both run its schema migrations).
- `check_local_store(uri)` checks a local store before Ray starts, writing nothing: a file
  store or bare path is refused (MLflow 3.17 keeps database stores only: use sqlite:///), a
  SQLite file must be a sound database (read-only `PRAGMA quick_check`; a corrupt one is left
  untouched) in a folder this process can write.
- A SQLite store keeps its artifacts next to the database (`<db dir>/mlartifacts/`), not in
  whatever directory the process runs from; `mlflow ui --backend-store-uri <uri>` serves both.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import logging
import math
import os
import re
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import unquote, urlparse

import requests
import sqlalchemy.exc
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from orchestrator import report
from orchestrator.record import VERDICTS, TrialRecord
from orchestrator.verdict import sweep_verdict

_log = logging.getLogger(__name__)
# urllib3's "Retrying (Retry(total=1 ...))" warnings say what TrackingUnavailable says in one line
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

ALLOWED_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "databricks")
SWEEP_STATUSES = ("FINISHED", "KILLED", "FAILED")
# Parent-only tags: everything else on the parent is a sweep tag that children repeat.
_PARENT_ONLY_TAGS = {"run_type", "verdict", "resumes", "git_commit", "git_dirty", "complete"}
# The experiment tag MLflow 3's UI reads as the experiment's type; this value is "model
# training" (runs), not a GenAI app (traces). See the module doc for 3.17's address parameter.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI (markdown)
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.:-]+")
# A key names a secret when one of its words is one of these, anywhere in the key ...
_SECRET_WORDS = {
    "password", "passwords", "passwd", "pwd", "secret", "secrets", "apikey", "credential",
    "credentials", "auth", "authorization", "cookie", "cookies", "bearer", "signature", "passphrase",
}
# ... or when a dotted part of it ends in one of these words ("ray.token", "cluster.auth_token",
# "GITHUB_TOKEN", "apiKey", "private_key"), not where they only begin a word group
# ("criteria.token_gen", "tokenizer_path", "sweep_key"): a key qualified as below
_SECRET_LAST_WORDS = {"token", "tokens"}
_SECRET_KEY_QUALIFIERS = {"api", "access", "secret", "private", "signing", "encryption", "ssh", "client",
                          "master", "session", "auth"}
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@")
_UNAVAILABLE_ERRNOS = {
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENOSPC, errno.EIO, errno.EROFS, errno.EPIPE,
}
_T = TypeVar("_T")


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached now; the results should go to the spool."""

    def __init__(self, uri: str, operation: str, cause: BaseException):
        self.uri = uri
        self.operation = operation
        detail = redact_text(" ".join(str(cause).split()))
        if len(detail) > 300:  # keep the head (what failed) and the tail (the root cause)
            detail = f"{detail[:120]} ... {detail[-170:]}"
        super().__init__(
            f"MLflow tracking at {redact_text(uri)} is unavailable ({operation}: "
            f"{type(cause).__name__}: {detail})"
        )


# ---- URI ---------------------------------------------------------------------------------


def resolve_tracking_uri(uri: str | None, cwd: str | os.PathLike[str]) -> str:
    """The tracking URI to use: `uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db.

    Relative sqlite and file paths (and bare paths, which MLflow reads as a file store) are made
    absolute against `cwd`. Raises ValueError for an unknown scheme or an in-memory database.
    """
    source = "tracking.uri"
    if uri is None or not str(uri).strip():
        uri, source = os.environ.get("MLFLOW_TRACKING_URI", "").strip(), "MLFLOW_TRACKING_URI"
    base = Path(os.path.abspath(cwd))
    if not uri:
        return f"sqlite:///{base / 'mlflow.db'}"
    uri = str(uri).strip()
    if uri == "databricks":  # MLflow's name for the default Databricks workspace
        return uri
    scheme = urlparse(uri).scheme.lower()
    dialect = scheme.split("+", 1)[0]
    if len(scheme) == 1 or not scheme:  # a bare path (a one-letter "scheme" is a drive letter)
        return (base / uri).resolve().as_uri()
    if dialect not in ALLOWED_SCHEMES:
        raise ValueError(
            f"{source}={redact_text(uri)!r} has the scheme {scheme!r}; expected one of "
            f"{', '.join(ALLOWED_SCHEMES)}. Fix: e.g. tracking.uri=sqlite:///{base / 'mlflow.db'} "
            "(a local file), tracking.uri=http://127.0.0.1:5000 (a server), or leave it unset."
        )
    if dialect == "sqlite":
        return _absolute_sqlite(uri, base, source)
    if dialect == "file":
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(
                f"{source}={uri!r} names the host {parsed.netloc!r}; a file store is local. "
                f"Fix: file:///absolute/path (three slashes), e.g. {(base / 'mlruns').as_uri()}"
            )
        return (base / unquote(parsed.path)).resolve().as_uri()
    return uri


def _absolute_sqlite(uri: str, base: Path, source: str) -> str:
    prefix, _, rest = uri.partition(":///")
    path, _, query = rest.partition("?")
    if not rest or path in ("", ":memory:") or "mode=memory" in query:
        raise ValueError(
            f"{source}={uri!r} is an in-memory or empty SQLite database; results would vanish "
            f"with the process. Fix: a file, e.g. sqlite:///{base / 'mlflow.db'}"
        )
    absolute = base / unquote(path)  # "sqlite:////abs/x.db" has path "/abs/x.db": stays absolute
    return f"{prefix}:///{absolute.resolve()}" + (f"?{query}" if query else "")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (None for other stores)."""
    if urlparse(uri).scheme.lower().split("+", 1)[0] != "sqlite":
        return None
    return Path(unquote(uri.partition(":///")[2].partition("?")[0]))


def folder_write_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why files cannot be created in `folder` (or in the folders that would be made for it),
    or None. Probes with a temporary folder it removes at once, so it holds for root and for
    read-only mounts alike; writes nothing that stays."""
    path = Path(folder)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kvbench-probe-", dir=existing))
    except OSError as error:
        return f"{existing} cannot be written ({error.strerror or error})"
    return None


def check_local_store(uri: str) -> None:
    """ValueError (one line) unless the local store at `uri` can be used; writes nothing.

    A file store or bare path is refused (MLflow 3.17 keeps database stores only); a SQLite
    file must open read-only as a sound database (`PRAGMA quick_check`) in a folder this
    process can write (its journal goes there). A corrupt file is left as it is. Other
    stores (http, databases) are not checked here."""
    scheme = urlparse(uri).scheme.lower().split("+", 1)[0]
    if scheme == "file":
        path = Path(unquote(urlparse(uri).path))
        raise ValueError(
            f"tracking.uri={redact_text(uri)!r} is a file store, which MLflow 3.17 refuses (it keeps "
            f"database stores only); use a SQLite file, e.g. tracking.uri=sqlite:///{path / 'mlflow.db'}, "
            f"or a server, tracking.uri=http://127.0.0.1:5000"
        )
    db = sqlite_path(uri)
    if db is None:
        return
    problem = folder_write_problem(db.parent)
    if problem:
        raise ValueError(f"tracking.uri={uri!r}: the database's folder cannot be used: {problem}; "
                         f"point tracking.uri at a file in a folder you can write")
    if not db.exists():
        return
    if not db.is_file():
        raise ValueError(f"tracking.uri={uri!r}: {db} is not a file; point tracking.uri at a SQLite file")
    try:
        connection = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
        try:
            answer = connection.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            connection.close()
    except sqlite3.Error as error:
        answer = str(error)
    if answer != "ok":
        raise ValueError(
            f"tracking.uri={uri!r}: {db} is not a sound SQLite database ({answer}); it was left "
            f"untouched: restore it from a backup, or point tracking.uri at another file"
        )


# ---- secrets -----------------------------------------------------------------------------


def is_secret_name(name: str) -> bool:
    """True when a key names a secret: 'cluster.auth_token', 'db.Password', 'apiKey',
    'AWS_SECRET_ACCESS_KEY', 'ray.token'; not 'milestone.criteria.token_gen.threshold',
    'tokenizer_path' or 'trial_key'. Words are split at '.', '_', '-' and camelCase."""
    for part in re.split(r"[.\s/:]+", name):
        spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", part)
        words = [w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w]
        if not words:
            continue
        if set(words) & _SECRET_WORDS or words[-1] in _SECRET_LAST_WORDS:
            return True
        if words[-1] in ("key", "keys") and (len(words) == 1 or words[-2] in _SECRET_KEY_QUALIFIERS):
            return True
    return False


def redact_text(text: str) -> str:
    """Mask URI passwords and the values of secret-named environment variables in `text`."""
    text = _URI_PASSWORD.sub(r"\g<head>***@", text)
    for value in _secret_env_values():
        text = text.replace(value, "***")
    return text


def redact(items: Mapping[str, Any]) -> dict[str, Any]:
    """`items` without secret-named keys; string values pass through `redact_text`."""
    kept = {}
    for key, value in items.items():
        if is_secret_name(str(key)):
            _log.info("not logging %r: its name looks like a secret", key)
            continue
        kept[str(key)] = redact_text(value) if isinstance(value, str) else value
    return kept


def redact_yaml(text: str) -> str:
    """A YAML text with the values of secret-named keys masked and URI passwords hidden."""
    lines = []
    for line in text.splitlines():
        m = re.match(r"^(\s*-?\s*)([^\s:#][^:#]*?)(\s*:\s*)(\S.*)$", line)
        if m and is_secret_name(m.group(2).strip("'\"")):
            line = f"{m.group(1)}{m.group(2)}{m.group(3)}'***'"
        lines.append(redact_text(line))
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def redact_override(override: str) -> str:
    """A command-line override with a secret-named key's value masked (`+db.password=x` ->
    `+db.password=***`) and URI passwords hidden."""
    key, sep, _ = override.partition("=")
    if sep and is_secret_name(key.lstrip("+~")):
        return f"{key}=***"
    return redact_text(override)


def _secret_env_values() -> list[str]:
    values = []
    for name in list(os.environ):  # other threads may change the environment meanwhile
        if name in ("PWD", "OLDPWD"):  # the working directory, not a password
            continue
        value = os.environ.get(name)
        if value is not None and len(value) >= 6 and is_secret_name(name):
            values.append(value)
    return values


# ---- unavailability ----------------------------------------------------------------------


def is_unavailable_error(error: BaseException) -> bool:
    """True when `error` (or what caused it) says the store cannot be reached, not that a
    request was wrong: connection and timeout errors, HTTP retries used up (5xx), MLflow's
    TEMPORARILY_UNAVAILABLE, SQLAlchemy's OperationalError, disk-full / read-only / I/O errors."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                                requests.exceptions.RetryError, sqlalchemy.exc.OperationalError,
                                ConnectionError, TimeoutError)):
            return True
        if isinstance(current, MlflowException) and current.error_code == "TEMPORARILY_UNAVAILABLE":
            return True
        if isinstance(current, OSError) and current.errno in _UNAVAILABLE_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


def _translating(method: Callable[..., _T]) -> Callable[..., _T]:
    """Turn an unreachable store into TrackingUnavailable for a Tracker method."""

    @functools.wraps(method)
    def wrapper(self: "Tracker", *args: Any, **kwargs: Any) -> _T:
        try:
            return method(self, *args, **kwargs)
        except TrackingUnavailable:
            raise
        except Exception as error:
            if is_unavailable_error(error):
                raise TrackingUnavailable(self.uri, method.__name__.lstrip("_"), error) from error
            refused = access_refusal(error, self.uri, self.experiment)
            if refused is not None:  # 401/403: a retry or the spool cannot fix it
                raise refused from None
            raise

    return wrapper


def _translating_lock(method: Callable[..., _T]) -> Callable[..., _T]:
    """The same for SweepLock methods."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> _T:
        try:
            return method(self, *args, **kwargs)
        except (TrackingUnavailable, SweepBusy):
            raise
        except Exception as error:
            if is_unavailable_error(error):
                self._close_file()
                raise TrackingUnavailable(self.tracker.uri, "lock", error) from error
            raise

    return wrapper


# ---- the tracker -------------------------------------------------------------------------


class Tracker:
    """Writes sweeps and trials to one MLflow experiment; see the module docstring."""

    def __init__(self, uri: str, experiment: str):
        if not experiment or not experiment.strip():
            raise ValueError(f"experiment name must be non-empty, got {experiment!r}")
        self.uri = uri
        self.experiment = experiment
        self._sweep_tags: dict[str, dict[str, str]] = {}  # parent id -> tags children repeat
        self._connect()

    @_translating
    def _connect(self) -> None:
        artifact_location = None
        db = sqlite_path(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        if db is None:
            self.experiment_id = self._experiment_id(artifact_location)
            return
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = str(db.parent / "mlartifacts")
        fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:  # one process at a time creates (migrates) a new store
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.experiment_id = self._experiment_id(artifact_location)
        finally:
            os.close(fd)

    def _experiment_id(self, artifact_location: str | None) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                _log.warning("restoring the deleted MLflow experiment %r", self.experiment)
                self.client.restore_experiment(found.experiment_id)
            if EXPERIMENT_KIND_TAG not in found.tags:  # made before the tag existed, or elsewhere
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=artifact_location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as error:  # created meanwhile by another process
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    @_translating
    def has_run(self, run_id: str) -> bool:
        """True when `run_id` is a live (not deleted) run of this experiment."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return False
            raise
        return run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active"

    # -- sweeps ----------------------------------------------------------------------------

    @_translating
    def start_sweep(
        self,
        milestone: str,
        sweep_key: str,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        config_yaml: str = "",
        resume: bool = True,
    ) -> str:
        """The parent run id of this sweep: a reopened unfinished one (resume) or a new one."""
        _check_identifier("milestone", milestone)
        _check_identifier("sweep_key", sweep_key)
        sweep_tags = {k: _tag_value(v) for k, v in redact(dict(tags or {})).items()}
        sweep_tags.update(milestone=milestone, sweep_key=sweep_key)
        parent = self._unfinished_parent(sweep_key) if resume else None
        if parent is None:
            run = self.client.create_run(
                self.experiment_id,
                tags={**sweep_tags, **_git_tags(), "run_type": "sweep"},
                run_name=f"{milestone}-{sweep_key[:8]}",
            )
            parent_id, existing_params = run.info.run_id, {}
        else:
            parent_id, existing_params = parent.info.run_id, parent.data.params
            self.client.update_run(parent_id, status="RUNNING")
            resumes = int(parent.data.tags.get("resumes", "0")) + 1
            self._log_batch(parent_id, tags={**sweep_tags, **_git_tags(), "resumes": str(resumes)})
            _log.info("resuming sweep %s in parent run %s (resume %d)", sweep_key, parent_id, resumes)
        new_params = {k: v for k, v in redact(dict(params or {})).items() if k not in existing_params}
        self._log_batch(parent_id, params=new_params)
        if config_yaml:
            self.client.log_text(parent_id, redact_yaml(config_yaml), "config.yaml")
        self._sweep_tags[parent_id] = sweep_tags
        return parent_id

    def _unfinished_parent(self, sweep_key: str) -> Any:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.sweep_key = '{sweep_key}' and tags.run_type = 'sweep'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs and runs[0].info.status != "FINISHED" and runs[0].data.tags.get("complete") != "true":
            return runs[0]
        return None

    @_translating
    def finish_sweep(
        self,
        parent_id: str,
        records: Sequence[TrialRecord],
        status: str = "FINISHED",
        metrics: Mapping[str, float] | None = None,
    ) -> str:
        """Judge the sweep, attach its table and plots, end the parent run; return its verdict.

        `records` are merged (by trial_key, the given ones winning) with the records already
        logged under the parent, so a resumed sweep is judged whole. The verdict is PASS only
        if the sweep FINISHED, there is at least one trial and every trial passed. `metrics` are logged on the
        parent too (the driver's `sweep_wall_s` and `num_devices`).
        """
        if status not in SWEEP_STATUSES:
            raise ValueError(f"status must be one of {SWEEP_STATUSES}, got {status!r}")
        given = {r.trial_key: r for r in records}
        merged = {r.trial_key: r for r in self._stored_records(parent_id, skip=set(given))}
        merged.update(given)
        everything = sorted(merged.values(), key=lambda r: (r.index, r.trial_key))
        counts = {f"n_{v.lower()}": sum(r.verdict == v for r in everything)
                  for v in VERDICTS}
        complete = status == "FINISHED"  # a KILLED or FAILED sweep has trials it never ran
        verdict = sweep_verdict(everything, status)
        milestone = self._parent_sweep_tags(parent_id).get("milestone", "")
        with tempfile.TemporaryDirectory(prefix="kvbench-summary-") as tmp:
            out = Path(tmp)
            (out / "summary.md").write_text(report.format_markdown(everything))
            (out / "summary.csv").write_text(report.format_csv(everything))
            report.write_plots(everything, out / "plots", title=milestone)
            self.client.log_artifacts(parent_id, tmp)
        now = int(time.time() * 1000)
        figures = {**(metrics or {}), "n_trials": len(everything), **counts}
        figures.update({f"worst_margin_pct/{name}": pct
                        for name, (pct, _) in report.worst_margins(everything).items()})
        sweep_key = self._parent_sweep_tags(parent_id).get("sweep_key", "")
        note = report.format_sweep_note(everything, verdict, milestone=milestone, status=status)
        tags = [RunTag("verdict", verdict), RunTag(NOTE_TAG, _clip(note, MAX_TAG_VAL_LENGTH))]
        if complete:
            tags.append(RunTag("complete", "true"))
        self.client.log_batch(
            parent_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in figures.items() if math.isfinite(float(v))],
            tags=tags,
        )
        self.client.update_run(parent_id, name=sweep_run_name(verdict, counts["n_pass"], len(everything),
                                                              milestone, sweep_key))
        self.client.set_terminated(parent_id, sweep_run_status(verdict, status))
        return verdict

    # -- trials ----------------------------------------------------------------------------

    @_translating
    def finished_trial_keys(self, parent_id: str) -> set[str]:
        """trial_keys under the parent whose child run is complete (carries a verdict)."""
        return {r.data.tags["trial_key"] for r in self._children(parent_id) if "verdict" in r.data.tags}

    @_translating
    def trial_records(self, parent_id: str) -> list[TrialRecord]:
        """The TrialRecords logged under the parent (read back from their result.json)."""
        return sorted(self._stored_records(parent_id, skip=set()), key=lambda r: (r.index, r.trial_key))

    @_translating
    def log_trial(self, parent_id: str, record: TrialRecord) -> str:
        """Log one trial as a nested child run; exactly one child per trial_key (see module doc)."""
        _check_identifier("trial_key", record.trial_key)
        digest = hashlib.sha256(record.to_json().encode()).hexdigest()[:32]
        same_key = self._children(parent_id, trial_key=record.trial_key)
        for run in same_key:
            if "verdict" in run.data.tags and run.data.tags.get("record_digest") == digest:
                self._delete_runs(r for r in same_key if r.info.run_id != run.info.run_id)
                return run.info.run_id
        child_id = self._write_child(parent_id, record, digest)
        self._delete_runs(same_key)
        return child_id

    def _write_child(self, parent_id: str, record: TrialRecord, digest: str) -> str:
        now = time.time()
        start_ms = int((record.started_at or record.finished_at or now) * 1000)
        end_ms = max(int((record.finished_at or now) * 1000), start_ms)
        identity = {
            **self._parent_sweep_tags(parent_id),
            "mlflow.parentRunId": parent_id,
            "run_type": "trial",
            "trial_key": record.trial_key,
        }
        run = self.client.create_run(
            self.experiment_id, start_time=start_ms, tags=identity,
            run_name=trial_run_name(record),
        )
        child_id = run.info.run_id
        tags = {k: _tag_value(v) for k, v in redact(record.info).items()}
        tags.update(_git_tags())
        tags.update(
            status=record.status, reason=_tag_value(record.reason), attempts=str(record.attempts),
            trial_index=str(record.index), record_digest=digest,
        )
        tags[NOTE_TAG] = report.format_trial_note(record)
        metrics = {k: float(v) for k, v in record.metrics.items()}
        metrics["attempts"] = float(record.attempts)
        for c in record.criteria:
            tags[f"criterion.{c.name}"] = "pass" if c.passed else "fail"
            metrics[f"criterion.{c.name}.threshold"] = float(c.threshold)
            if c.margin is not None:
                metrics[f"criterion.{c.name}.margin"] = float(c.margin)
            if c.value is not None:
                metrics[f"criteria/{c.name}"] = float(c.value)
            pct = report.margin_pct(c)
            if pct is not None:
                metrics[f"criteria/{c.name}.margin_pct"] = pct
        self._log_batch(child_id, params=redact(record.params), tags=tags, metrics=metrics,
                        timestamp_ms=end_ms)
        self._log_system_metrics(child_id, record.system_metrics)
        self.client.log_text(child_id, record.to_json(), "result.json")
        # The verdict comes last: its presence marks the child complete.
        self.client.set_tag(child_id, "verdict", record.verdict)
        self.client.set_terminated(child_id, trial_run_status(record.verdict), end_time=end_ms)
        return child_id

    def _log_system_metrics(self, run_id: str, series: Mapping[str, Sequence[Sequence[float]]]) -> None:
        """The trial's sampled series as MLflow system metrics: `system/<name>`, one point per
        sample at its own time (unix s -> ms), steps 0, 1, ..."""
        points = [Metric(f"system/{name}", float(value), int(float(t) * 1000), step)
                  for name, samples in sorted(series.items())
                  for step, (t, value) in enumerate(samples) if math.isfinite(float(value))]
        for start in range(0, len(points), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=points[start : start + MAX_METRICS_PER_BATCH])

    # -- helpers ---------------------------------------------------------------------------

    def _children(self, parent_id: str, trial_key: str | None = None) -> list[Any]:
        _check_identifier("parent run id", parent_id)
        query = f"tags.`mlflow.parentRunId` = '{parent_id}'"
        if trial_key is not None:
            query += f" and tags.trial_key = '{trial_key}'"
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=query,
                                           max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _stored_records(self, parent_id: str, skip: set[str]) -> list[TrialRecord]:
        records = []
        complete = [r for r in self._children(parent_id) if "verdict" in r.data.tags]
        with tempfile.TemporaryDirectory(prefix="kvbench-records-") as tmp:
            for run in complete:
                if run.data.tags["trial_key"] in skip:
                    continue
                try:
                    path = self.client.download_artifacts(run.info.run_id, "result.json", tmp)
                    records.append(TrialRecord.from_json(Path(path).read_text()))
                except (OSError, ValueError, TypeError, KeyError, MlflowException) as error:
                    if is_unavailable_error(error):
                        raise
                    record = _record_from_run(run, parent_tags=self._parent_sweep_tags(parent_id))
                    _log.warning("child run %s has no readable result.json (%s); rebuilt from its "
                                 "tags, params and metrics, without criterion values",
                                 run.info.run_id, error)
                    records.append(record)
        return records

    def _parent_sweep_tags(self, parent_id: str) -> dict[str, str]:
        if parent_id not in self._sweep_tags:
            tags = self.client.get_run(parent_id).data.tags
            self._sweep_tags[parent_id] = {
                k: v for k, v in tags.items() if not k.startswith("mlflow.") and k not in _PARENT_ONLY_TAGS
            }
        return self._sweep_tags[parent_id]

    def _delete_runs(self, runs: Any) -> None:
        for run in runs:
            try:
                self.client.delete_run(run.info.run_id)
            except MlflowException as error:
                if error.error_code != "PERMISSION_DENIED":
                    raise
                # A user with EDIT (not MANAGE) on a team server's experiment: the leftover
                # stays; counts and finished_trial_keys go by distinct trial_key.
                _log.warning("run %s is obsolete but stays: deleting runs needs MANAGE on the "
                             "experiment (%s)", run.info.run_id, error.error_code)

    def _log_batch(
        self,
        run_id: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        """log_batch in chunks within MLflow's per-request limits."""
        ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        entities: list[Param | RunTag | Metric] = []
        entities += [Param(k, _clip(str(v), MAX_PARAM_VAL_LENGTH)) for k, v in (params or {}).items()]
        entities += [RunTag(k, _tag_value(v)) for k, v in (tags or {}).items()]
        entities += [Metric(k, v, ts, 0) for k, v in (metrics or {}).items() if math.isfinite(v)]
        for start in range(0, len(entities), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = entities[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            self.client.log_batch(
                run_id,
                params=[e for e in chunk if isinstance(e, Param)],
                tags=[e for e in chunk if isinstance(e, RunTag)],
                metrics=[e for e in chunk if isinstance(e, Metric)],
            )


# ---- one writer per sweep -----------------------------------------------------------------

LOCK_HEARTBEAT_S = 15.0  # a lock holder refreshes its lock run's heartbeat this often
LOCK_STALE_S = 90.0  # a lock run whose heartbeat is older belongs to a writer that died


class SweepBusy(ValueError):
    """Another driver (or sync) writes this sweep now."""

    plain = True  # the command prints it as it is, not as a "bad configuration"


class SweepLock:
    """The right to write one sweep (see the module docstring): `acquire()` or SweepBusy,
    then `release()` (also on a context manager's exit)."""

    def __init__(self, tracker: Tracker, sweep_key: str, what: str = "driver", released: Sequence[str] = ()):
        """`released`: lock runs known to be let go of (a spool's writer that ended while the
        store was away, so it could not delete its lock run): taken over at once."""
        _check_identifier("sweep_key", sweep_key)
        self.tracker, self.sweep_key = tracker, sweep_key
        self.released = {run_id for run_id in released if run_id}
        self.owner = f"{what} pid {os.getpid()} on {socket.gethostname()}"
        self.run_id: str | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @_translating_lock
    def acquire(self) -> "SweepLock":
        db = sqlite_path(self.tracker.uri)
        if db is not None:
            self._lock_file(Path(f"{db}.{self.sweep_key}.lock"))
        client = self.tracker.client
        run = client.create_run(
            self.tracker.experiment_id, run_name=f"lock {self.sweep_key[:8]}",
            tags={"run_type": "lock", "sweep_key": self.sweep_key, "lock_owner": self.owner,
                  "lock_heartbeat": f"{time.time():.3f}"},
        )
        self.run_id = run.info.run_id
        now = time.time()
        live = []
        for other in client.search_runs(
                [self.tracker.experiment_id], max_results=1000,
                filter_string=f"tags.run_type = 'lock' and tags.sweep_key = '{self.sweep_key}'"):
            mine = other.info.run_id == self.run_id
            beat = float(other.data.tags.get("lock_heartbeat", "0") or 0)
            if other.data.tags.get("lock_released") == "1":
                continue  # let go by a writer that could not delete it (EDIT without MANAGE)
            gone = self._fd is not None or now - beat > LOCK_STALE_S or other.info.run_id in self.released
            if not mine and gone:
                self._drop(other.info.run_id)  # its writer died (or let go of the file lock)
                continue
            live.append(other)
        winner = min(live, key=lambda r: (r.info.start_time, r.info.run_id))
        if winner.info.run_id != self.run_id:
            self._drop(self.run_id)
            self.run_id = None
            self._close_file()
            age = now - float(winner.data.tags.get("lock_heartbeat", "0") or 0)
            raise SweepBusy(
                f"sweep {self.sweep_key} is being written by another {winner.data.tags.get('lock_owner', 'process')} "
                f"(seen {max(age, 0):.0f} s ago); wait for it to end or stop it (one that died lets go "
                f"within {LOCK_STALE_S:.0f} s), then run the same command again"
            )
        if self._fd is None:  # on SQLite the file lock says who is alive; no second writer there
            self._beat = threading.Thread(target=self._heartbeat, name="kvbench-sweep-lock", daemon=True)
            self._beat.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self.run_id is not None:
            self._drop(self.run_id)
            self.run_id = None
        self._close_file()

    def _drop(self, run_id: str) -> None:
        """Let go of a lock run: delete it, or, where the user may not delete runs (a team
        server's EDIT permission without MANAGE), mark it released and end it, which every
        writer reads as gone. A store that is away: the lock goes stale by itself."""
        client = self.tracker.client
        try:
            client.delete_run(run_id)
            return
        except Exception as error:
            if access_refusal(error, self.tracker.uri) is None:
                _log.info("could not delete the lock run %s: %s", run_id, error)
                return
        try:
            client.set_tag(run_id, "lock_released", "1")
            client.set_terminated(run_id, "FINISHED")
        except Exception as error:
            _log.info("could not release the lock run %s: %s", run_id, error)

    def __enter__(self) -> "SweepLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _lock_file(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "process"
            os.close(fd)
            raise SweepBusy(
                f"sweep {self.sweep_key} is being written by another {holder} (it holds {path}); "
                f"wait for it to end or stop it, then run the same command again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.owner.encode(), 0)
        self._fd = fd

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def _heartbeat(self) -> None:
        client = MlflowClient(tracking_uri=self.tracker.uri)
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                client.set_tag(self.run_id, "lock_heartbeat", f"{time.time():.3f}")
            except Exception as error:  # the store is away for now; the driver spools meanwhile
                _log.info("lock heartbeat failed: %s", error)


# ---- reading a sweep back ---------------------------------------------------------------

_RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class StoredSweep:
    """A sweep as the store holds it: its parent run's id, experiment, tags and metrics, and
    its trials' records."""

    run_id: str
    experiment: str
    tags: dict[str, str]
    metrics: dict[str, float]  # sweep_wall_s, num_devices, n_trials, ...
    records: list[TrialRecord]


def read_sweep(uri: str, ref: str, experiment: str | None = None) -> StoredSweep:
    """The sweep whose parent run id is `ref`, or the newest one whose sweep key starts with
    `ref` (4+ hex digits), in `experiment` or in any experiment. ValueError when none or
    several sweeps match; TrackingUnavailable when the store cannot be reached."""
    try:
        client = MlflowClient(tracking_uri=uri)
        parent = _find_sweep_run(client, ref, experiment)
        experiment_name = client.get_experiment(parent.info.experiment_id).name
        records = Tracker(uri, experiment_name).trial_records(parent.info.run_id)
    except TrackingUnavailable:
        raise
    except Exception as error:
        if is_unavailable_error(error):
            raise TrackingUnavailable(uri, "read_sweep", error) from error
        if isinstance(error, MlflowException) and error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ValueError(f"expected a run of the store at {redact_text(uri)}, received {ref!r}: {error}") from None
        raise
    return StoredSweep(parent.info.run_id, experiment_name, dict(parent.data.tags), dict(parent.data.metrics),
                       records)


def last_sweeps(uri: str, milestone: str, n: int, experiment: str | None = None) -> list[str]:
    """Parent run ids of the `n` newest complete sweeps (FINISHED or FAILED, tag complete) of
    `milestone`, newest first; ValueError when there are fewer; TrackingUnavailable when the
    store cannot be reached."""
    _check_identifier("milestone", milestone)
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment_ids = _experiment_ids(client, experiment)
        runs = client.search_runs(
            experiment_ids, order_by=["attributes.start_time DESC"], max_results=1000,
            filter_string=f"tags.run_type = 'sweep' and tags.milestone = '{milestone}'")
    except Exception as error:
        if is_unavailable_error(error):
            raise TrackingUnavailable(uri, "last_sweeps", error) from error
        raise
    done = [r.info.run_id for r in runs
            if r.info.status == "FINISHED" or r.data.tags.get("complete") == "true"]
    if len(done) < n:
        raise ValueError(f"expected {n} complete sweeps of milestone {milestone!r} in the store at "
                         f"{redact_text(uri)}, received {len(done)}; run the milestone again or name the "
                         f"parent runs")
    return done[:n]


def log_comparison(uri: str, run_id: str, files: Mapping[str, str]) -> None:
    """Attach a comparison's files ({artifact path: text}) to the parent run `run_id`."""
    try:
        client = MlflowClient(tracking_uri=uri)
        for path, text in files.items():
            client.log_text(run_id, text, path)
    except Exception as error:
        if is_unavailable_error(error):
            raise TrackingUnavailable(uri, "log_comparison", error) from error
        raise


def _experiment_ids(client: MlflowClient, experiment: str | None) -> list[str]:
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ValueError(f"expected an existing MLflow experiment, received --experiment {experiment!r}; "
                             f"leave it out to search every experiment")
        return [found.experiment_id]
    return [e.experiment_id for e in client.search_experiments()]


def _find_sweep_run(client: MlflowClient, ref: str, experiment: str | None) -> Any:
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ValueError(f"expected an existing MLflow experiment, received --experiment {experiment!r}; "
                             f"leave it out to search every experiment")
        experiment_ids = [found.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if _RUN_ID.fullmatch(ref):
        run = client.get_run(ref)
        if run.data.tags.get("run_type") != "sweep":
            raise ValueError(f"expected the parent run of a sweep (tag run_type=sweep), received the run {ref} "
                             f"(run_type={run.data.tags.get('run_type')!r})")
        return run
    if not re.fullmatch(r"[0-9a-f]{4,64}", ref):
        raise ValueError(f"expected a parent run id, a sweep key (or its first 4+ hex digits) or a spool "
                         f"file, received {ref!r}")
    runs = client.search_runs(experiment_ids, order_by=["attributes.start_time DESC"], max_results=1000,
                              filter_string=f"tags.run_type = 'sweep' and tags.sweep_key LIKE '{ref}%'")
    keys = {r.data.tags.get("sweep_key") for r in runs}
    if not runs:
        raise ValueError(f"expected a sweep key in the store, received {ref!r}, which no sweep's key starts "
                         f"with; list them in the MLflow UI (tag sweep_key) or give the parent run id")
    if len(keys) > 1:
        raise ValueError(f"expected one sweep for {ref!r}, received {len(keys)} sweep keys starting with it "
                         f"({', '.join(sorted(k[:12] for k in keys))}...): give more digits")
    return runs[0]


# ---- names and statuses people read -------------------------------------------------------


def sweep_run_name(verdict: str, passed: int, total: int, milestone: str, sweep_key: str) -> str:
    """The parent run's name once judged, e.g. 'FAIL 3/4 m10-3f2a9c1e'."""
    return f"{verdict} {passed}/{total} {milestone}-{sweep_key[:8]}"


def trial_run_name(record: TrialRecord) -> str:
    """A child run's name, e.g. '001 PASS float16 ctx=256 L2 H4/2' or '002 PASS noisy ...'."""
    flag = " noisy" if report.noisy_reason(record) is not None else ""
    return f"{record.index:03d} {record.verdict}{flag} {report.describe(record)}"


def sweep_run_status(verdict: str, status: str) -> str:
    """The parent's MLflow status: a complete sweep is FINISHED when it passed, FAILED when
    not; a sweep stopped early (KILLED, FAILED) keeps that status (module doc)."""
    if status != "FINISHED":
        return status
    return "FINISHED" if verdict == "PASS" else "FAILED"


def trial_run_status(verdict: str) -> str:
    """A child's MLflow status: PASS -> FINISHED, FAIL and ERROR -> FAILED, SKIPPED -> KILLED."""
    return {"PASS": "FINISHED", "SKIPPED": "KILLED"}.get(verdict, "FAILED")


def _check_identifier(what: str, value: str) -> None:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ValueError(
            f"{what} must be letters, digits and _.:- only (it goes into MLflow search filters), "
            f"got {value!r}"
        )


def _tag_value(value: Any) -> str:
    return _clip(str(value), MAX_TAG_VAL_LENGTH)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Tags a child run carries that are not part of its record's `info`.
_CHILD_OWN_TAGS = {"run_type", "trial_key", "status", "reason", "attempts", "trial_index",
                   "record_digest", "verdict", "git_commit", "git_dirty"}


def _param_value(text: str) -> Any:
    """A param as logged (a string) back to the int, float, bool or None it was."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def _record_from_run(run: Any, parent_tags: Mapping[str, str]) -> TrialRecord:
    """A child run's TrialRecord rebuilt from its tags, params and metrics, for a run whose
    result.json cannot be read (e.g. a store copied without its artifact folder). Everything
    but the criterion outcomes survives: those are left empty (the verdict tag is kept)."""
    tags = run.data.tags
    info = {k: v for k, v in tags.items()
            if not k.startswith(("mlflow.", "criterion.")) and k not in _CHILD_OWN_TAGS
            and k not in parent_tags}
    metrics = {k: v for k, v in run.data.metrics.items()
               if k != "attempts" and not k.startswith(("criterion.", "criteria/", "system/"))}
    return TrialRecord(
        trial_key=tags["trial_key"],
        index=int(tags.get("trial_index", "0")),
        params={k: _param_value(v) for k, v in run.data.params.items()},
        status=tags["status"],
        verdict=tags["verdict"],
        reason=tags.get("reason", ""),
        metrics=metrics,
        info=info,
        attempts=int(tags.get("attempts", "1")),
        started_at=(run.info.start_time or 0) / 1000,
        finished_at=(run.info.end_time or 0) / 1000,
    )


@functools.cache
def _git_tags() -> dict[str, str]:
    """The project's git commit (and whether the tree had local changes), if it is a checkout."""
    return git_tags(Path(__file__).resolve().parent.parent)


def git_tags(root: Path) -> dict[str, str]:
    """`git_commit` and `git_dirty` of the repository whose top level is `root`; none when `root`
    is no checkout, or only a folder inside another repository (a copy of the project there
    would otherwise record that repository's commit)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != Path(root).resolve():
            return {}
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": str(dirty).lower(), "mlflow.source.git.commit": commit}



# ---- a team's server: credentials and permissions ----------------------------------------

# What a sweep needs on its experiment: to create and update runs. MANAGE adds deleting runs,
# which `log_trial` uses to replace a leftover incomplete child; with EDIT that leftover stays.
WRITE_PERMISSIONS = ("EDIT", "MANAGE")
_USERNAME_ENV, _PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


class AccessRefused(Exception):
    """The tracking server refuses this user: no credentials, a wrong password, or no permission
    to write to the experiment. A retry cannot fix it, so nothing is spooled; the message (one
    line) says which variable to set or which permission to ask the server's admin for."""


def check_server_access(uri: str, experiment: str) -> None:
    """Raise AccessRefused unless the user of $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD
    may write runs to `experiment` on the MLflow server at `uri` (http or https).

    The driver calls it before Ray starts. Other stores, a server without authentication, an
    admin, and an experiment that does not exist yet (its creator gets MANAGE) pass. A server
    that cannot be reached passes too: the sweep then spools and syncs later. Credentials are
    read from the environment by MLflow at each request; they are never stored or printed."""
    if urlparse(uri).scheme.lower() not in ("http", "https"):
        return
    try:
        _check_server_access(uri, experiment)
    except AccessRefused:
        raise
    except Exception as error:
        if is_unavailable_error(error):
            _log.info("not checking access to %s now: %s", redact_text(uri), error)
            return
        raise


def _check_server_access(uri: str, experiment: str) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)

    def get(endpoint: str, **params: str) -> requests.Response:
        return http_request(creds, endpoint, "GET", params=params)

    found = get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=experiment)
    if found.status_code in (401, 403):
        raise AccessRefused(_refusal_message(uri, found.status_code, experiment))
    if found.status_code >= 500 or found.status_code not in (200, 404):
        return  # the sweep's own requests will tell (unavailable: spool; a bug: its error)
    me = get("/api/2.0/mlflow/users/current")
    if me.status_code != 200:
        return  # a server without basic authentication: anyone may write
    user = me.json().get("user", {})
    if user.get("is_admin") or found.status_code == 404:
        return  # an admin may do anything; a new experiment's creator gets MANAGE on it
    experiment_id = found.json()["experiment"]["experiment_id"]
    granted = get("/api/3.0/mlflow/users/permissions/get", username=user.get("username", ""),
                  resource_type="experiment", resource_id=experiment_id)
    if granted.status_code != 200:
        return  # a server that cannot say: the sweep's first write will
    permission = granted.json().get("permission", "")
    if permission not in WRITE_PERMISSIONS:
        raise AccessRefused(_refusal_message(uri, 403, experiment, experiment_id, permission,
                                             user.get("username")))


def _refusal_message(uri: str, status: int, experiment: str, experiment_id: str | None = None,
                     permission: str | None = None, username: str | None = None) -> str:
    server = _server_url(uri)
    user = username or os.environ.get(_USERNAME_ENV, "")
    if status == 401 and not (user and os.environ.get(_PASSWORD_ENV)):
        return (f"the MLflow server {server} asks for a login and {_USERNAME_ENV} / {_PASSWORD_ENV} are "
                f"not both set: set them to your account on that server (the server's admin creates it)")
    if status == 401:
        return (f"the MLflow server {server} refused user {user!r}: wrong username or password; fix "
                f"{_PASSWORD_ENV} (and {_USERNAME_ENV}), or ask the server's admin to reset the password")
    which = f" (id {experiment_id})" if experiment_id else ""
    has = f"has {permission} on" if permission else "may not write to"
    return (f"user {user!r} {has} the experiment {experiment!r}{which} on {server}; a sweep needs EDIT "
            f"(or MANAGE) there: ask the server's admin to grant it, or set tracking.experiment to a new "
            f"name (its creator gets MANAGE)")


def access_refusal(error: BaseException, uri: str, experiment: str = "") -> AccessRefused | None:
    """The AccessRefused that an MLflow error stands for (HTTP 401 or 403), else None."""
    if isinstance(error, AccessRefused):
        return error
    if not isinstance(error, MlflowException):
        return None
    text = str(error)
    if error.error_code == "UNAUTHENTICATED" or "error code 401" in text:
        return AccessRefused(_refusal_message(uri, 401, experiment))
    if error.error_code == "PERMISSION_DENIED" or "error code 403" in text:
        return AccessRefused(_refusal_message(uri, 403, experiment))
    return None


def _server_url(uri: str) -> str:
    """`uri` without any user or password in it, and without a trailing slash."""
    parsed = urlparse(uri)
    host = parsed.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parsed.port:
        netloc += f":{parsed.port}"
    return parsed._replace(netloc=netloc).geturl().rstrip("/")


# MLflow 3.17's UI picks its GenAI or model-training view from the address, not from the
# experiment's tags: an address with this query opens on the runs table.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def open_hint(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """What to open to see a sweep: a server's page of its parent run
    (`http://host:port/#/experiments/<id>/runs/<run_id>`, no credentials), else the command
    that serves a local store (`mlflow ui --backend-store-uri <uri>`)."""
    if urlparse(uri).scheme.lower() in ("http", "https"):
        url = _server_url(uri)
        if experiment_id and run_id:
            return f"{url}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"
        if experiment_id:
            return f"{url}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}"
        return url
    return f"mlflow ui --backend-store-uri {uri}"
