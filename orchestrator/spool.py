"""The local spool: sweep results that could not reach MLflow yet, as fsynced JSON lines.

When the tracking store is away (`TrackingUnavailable`), the driver writes each finished trial
here and the sweep goes on; `python -m orchestrator.sync` uploads the spool later (see
`orchestrator/sync.py`), and the store then holds what it would have held.

    from orchestrator.spool import Spool, DEFAULT_SPOOL_DIR
    with Spool(cwd / DEFAULT_SPOOL_DIR, sweep_key) as spool:
        spool.write_sweep(uri=..., experiment=..., milestone=..., tags=..., params=...,
                          config_yaml=..., parent_id=parent_id_or_None)
        spool.write_trial(record)           # returns once the line is on disk
        spool.write_finish("FINISHED")

The driver's recipe (nothing is lost if it dies at any moment), which `Recorder`
(orchestrator/recorder.py) implements for orchestrator/sweep.py:
1. Try MLflow first: `tracker.log_trial(parent, record)`. On `TrackingUnavailable`, open the
   spool (once), `write_sweep` (with the parent id if the parent run exists), then
   `write_trial(record)`, and keep spooling for the rest of the sweep (don't pay the timeout
   again per trial). A trial counts as done only after `log_trial` or `write_trial` returned.
2. At the end, `write_finish(status)` in the spool if it is open, else `tracker.finish_sweep`.
3. Every run of a sweep first uploads the spool that sweep left (`sync_spool`), then opens
   its parent run; when resuming it skips the trials in `tracker.finished_trial_keys`, or, if
   MLflow is still away, those in `spooled_trial_keys`. So a trial is never both spooled and
   re-run, and the spool never overwrites a newer result. (Trials recorded in MLflow before an
   outage that lasts into the resumed run are not known then, so they run again; the later
   record replaces the earlier child when the spool is uploaded.)

File format, `<spool dir>/<sweep_key>.jsonl`, one JSON object per line:
    {"kind": "sweep", "uri", "experiment", "milestone", "sweep_key", "tags", "params",
     "config_yaml", "parent_id": str | null, "written_at", "lock_run_id": str | null}
    {"kind": "trial", "record": {TrialRecord fields}}
    {"kind": "finish", "status": "FINISHED" | "KILLED" | "FAILED", "metrics": {name: float}}

Key decisions:
- Each line is written with one `os.write` on an O_APPEND descriptor and `fsync`ed before the
  call returns; a new file's directory entry is fsynced too. A crash mid-line leaves a torn
  last line: the next writer ends it with a newline first and readers skip it, so a torn line
  costs at most the trial being written, which was not yet done and is re-run on resume.
- One writer per sweep: the writer holds an exclusive `flock` on the file while it is open
  (released by the kernel if the process dies). `sync` takes the same lock, so it never reads
  a spool that a running driver is still writing, and a writer that opens a file which `sync`
  has just moved away reopens a fresh one.
- A full disk never leaves a torn line: a line the disk could not take whole is cut off
  again (`ftruncate` to the size before it) and `SpoolFull` names the folder and the free
  space the line needed; the driver stops there with one line (MLflow away and no room for
  the spool: there is nowhere left to record).
- `check_spool_dir` (before Ray starts) refuses a spool folder that cannot be written.
- Uploads take the sweep's lock (`tracking.SweepLock`), and syncs of one spool folder run one
  at a time (an `flock` on `<spool>/.sync.lock`): a second sync waits, then finds the files
  the first one uploaded gone and says so. A spool file locked by its writer is being written
  by a running driver.
- Uploading is exactly once per trial_key because `Tracker.log_trial` is idempotent; an
  interrupted sync is simply run again. Later lines win: the last record per trial_key, the
  last non-null parent id, the last finish status.
- Secrets stay out of the spool too: tags, params and the config pass through the tracking
  module's redaction, and the tracking URI is stored with any password masked (sync then asks
  for `--tracking-uri`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.record import TrialRecord
from orchestrator.tracking import (
    SWEEP_STATUSES,
    SweepLock,
    Tracker,
    folder_write_problem,
    redact,
    redact_text,
    redact_yaml,
)

_log = logging.getLogger(__name__)

DEFAULT_SPOOL_DIR = "spool"  # relative to the directory the command runs from
SYNCED_DIR = "synced"  # uploaded spool files move here, under the spool directory
SYNC_LOCK = ".sync.lock"  # syncs of one spool folder take turns on this file's flock


class SpoolFull(OSError):
    """The spool's disk took not all of a line (ENOSPC, EFBIG, EDQUOT); the line was cut off."""

    def __str__(self) -> str:
        return str(self.strerror)


@contextlib.contextmanager
def sync_turn(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Wait for this spool folder's other syncs to end, and hold the turn meanwhile."""
    fd = os.open(Path(directory) / SYNC_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_spool_dir(directory: str | os.PathLike[str]) -> None:
    """ValueError (one line) unless the spool folder can be written (or made); writes nothing."""
    problem = folder_write_problem(directory)
    if problem:
        raise ValueError(f"spool.dir={str(directory)!r} cannot be used: {problem}; set spool.dir to a "
                         f"folder you can write")


class Spool:
    """Append-only, fsynced writer of one sweep's spool file; holds the file's lock while open."""

    def __init__(self, directory: str | os.PathLike[str], sweep_key: str, lock_wait_s: float = 60.0):
        """Open (or create) `<directory>/<sweep_key>.jsonl` and lock it, waiting up to lock_wait_s
        for a sync or another writer to let go (BlockingIOError after that)."""
        if not sweep_key or "/" in sweep_key or sweep_key.startswith("."):
            raise ValueError(f"sweep_key must be a plain file name, got {sweep_key!r}")
        self.directory = Path(directory)
        self.path = self.directory / f"{sweep_key}.jsonl"
        self.sweep_key = sweep_key
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd = _open_locked(self.path, create=True, wait_s=lock_wait_s)
        _terminate_torn_line(self._fd, self.path)

    def write_sweep(
        self,
        uri: str,
        experiment: str,
        milestone: str,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        config_yaml: str = "",
        parent_id: str | None = None,
        lock_run_id: str | None = None,
    ) -> None:
        """Record what `Tracker.start_sweep` needs to create (or find) the parent run, and the
        writer's lock run (if it holds one), which the upload may take over."""
        self._append({
            "kind": "sweep", "uri": redact_text(uri), "experiment": experiment,
            "milestone": milestone, "sweep_key": self.sweep_key,
            "tags": redact(dict(tags or {})), "params": redact(dict(params or {})),
            "config_yaml": redact_yaml(config_yaml), "parent_id": parent_id, "written_at": time.time(),
            "lock_run_id": lock_run_id,
        })

    def write_trial(self, record: TrialRecord) -> None:
        """Append one finished trial; on return it is on disk."""
        self._append({"kind": "trial", "record": asdict(record)})

    def write_finish(self, status: str, metrics: Mapping[str, float] | None = None) -> None:
        """The sweep's end: its status and the parent's extra metrics (`finish_sweep`'s)."""
        if status not in SWEEP_STATUSES:
            raise ValueError(f"status must be one of {SWEEP_STATUSES}, got {status!r}")
        self._append({"kind": "finish", "status": status, "metrics": dict(metrics or {})})

    def _append(self, entry: dict[str, Any]) -> None:
        if self._fd is None:
            raise ValueError(f"spool {self.path} is closed; open a new Spool to write to it")
        _append_line(self._fd, entry)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class SpooledSweep:
    """What one spool file says, later lines winning."""

    path: Path
    header: dict[str, Any] = field(default_factory=dict)  # the merged "sweep" lines
    records: dict[str, TrialRecord] = field(default_factory=dict)  # by trial_key
    finish: str | None = None  # the sweep's final status, if the driver got that far
    finish_metrics: dict[str, float] = field(default_factory=dict)  # the parent's extra metrics
    torn: int = 0  # lines that could not be read (a crash mid-write)


def read_spool(path: str | os.PathLike[str]) -> SpooledSweep:
    """Parse a spool file, skipping torn lines."""
    spooled = SpooledSweep(Path(path))
    for number, line in enumerate(Path(path).read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            kind = entry["kind"]
            if kind == "sweep":
                spooled.header.update({k: v for k, v in entry.items() if v is not None})
            elif kind == "trial":
                record = TrialRecord.from_json(json.dumps(entry["record"]))
                spooled.records[record.trial_key] = record
            elif kind == "finish":
                spooled.finish = entry["status"]
                spooled.finish_metrics = {k: float(v) for k, v in entry.get("metrics", {}).items()}
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except (ValueError, KeyError, TypeError, AssertionError) as error:
            _log.warning("%s:%d: skipping an unreadable line (%s)", path, number, error)
            spooled.torn += 1
    return spooled


def spooled_trial_keys(directory: str | os.PathLike[str], sweep_key: str) -> set[str]:
    """trial_keys of this sweep that wait in the spool (not yet uploaded)."""
    path = Path(directory) / f"{sweep_key}.jsonl"
    return set(read_spool(path).records) if path.exists() else set()


def upload(
    spooled: SpooledSweep, tracker: Tracker, remember_parent: Callable[[str], None] | None = None
) -> str:
    """Replay a spooled sweep into MLflow; return the parent run id. Idempotent.

    The parent is the one the spool names if it still exists, else `start_sweep(resume=True)`
    finds or makes one; `remember_parent(parent_id)` is called before any trial is uploaded so
    the spool can record it, and a repeated upload goes to the same parent even after the
    first one finished the sweep.
    """
    h = spooled.header
    missing = [k for k in ("milestone", "sweep_key") if k not in h]
    if missing:
        raise ValueError(f"{spooled.path} has no sweep line with {missing}; it cannot be uploaded "
                         "(was it written by Spool.write_sweep?)")
    parent_id = h.get("parent_id")
    if not parent_id or not tracker.has_run(parent_id):
        parent_id = tracker.start_sweep(
            milestone=h["milestone"], sweep_key=h["sweep_key"], tags=h.get("tags", {}),
            params=h.get("params", {}), config_yaml=h.get("config_yaml", ""), resume=True,
        )
        if remember_parent is not None:
            remember_parent(parent_id)
    for record in sorted(spooled.records.values(), key=lambda r: r.index):
        tracker.log_trial(parent_id, record)
    if spooled.finish is not None:
        tracker.finish_sweep(parent_id, list(spooled.records.values()), status=spooled.finish,
                             metrics=spooled.finish_metrics)
    return parent_id


def sync_spool(path: str | os.PathLike[str], tracker: Tracker | None = None,
               uri: str | None = None, lock: bool = True) -> tuple[str, int] | None:
    """Upload one spool file and move it to `synced/`; return (parent id, trials uploaded).

    Returns None, uploading nothing, when a driver holds the file's lock (still writing).
    Without `tracker`, one is made from `uri` or else the URI the spool recorded. With `lock`
    the upload holds the sweep's SweepLock (SweepBusy when a driver writes the sweep in
    MLflow now); a caller that holds it already passes lock=False. Raises TrackingUnavailable
    when the store is still away (the file stays where it is), FileNotFoundError when the file
    is gone (another sync uploaded it).
    """
    path = Path(path)
    try:
        fd = _open_locked(path, create=False, wait_s=0.0)
    except BlockingIOError:
        return None
    try:
        _terminate_torn_line(fd, path)  # the parent id may be appended below
        spooled = read_spool(path)
        if tracker is None:
            target = uri or spooled.header.get("uri", "")
            if not target or "***" in target:
                raise ValueError(
                    f"{path} does not say where to upload (its URI is {target!r}); "
                    "pass the tracking URI, e.g. python -m orchestrator.sync --tracking-uri URI"
                )
            tracker = Tracker(target, experiment=spooled.header.get("experiment", ""))
        remember = lambda parent_id: _append_line(fd, {"kind": "sweep", "parent_id": parent_id})  # noqa: E731
        key = spooled.header.get("sweep_key", path.stem)
        released = [spooled.header.get("lock_run_id", "")]  # its writer has ended: we hold its file lock
        with SweepLock(tracker, key, what="sync", released=released) if lock else contextlib.nullcontext():
            parent_id = upload(spooled, tracker, remember_parent=remember)
        done = path.parent / SYNCED_DIR / f"{path.stem}.{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
        done.parent.mkdir(exist_ok=True)
        os.replace(path, done)
        _fsync_dir(path.parent)
        return parent_id, len(spooled.records)
    finally:
        os.close(fd)


# ---- files ----------------------------------------------------------------------------------


def _open_locked(path: Path, create: bool, wait_s: float) -> int:
    """Open `path` for appending with an exclusive flock, waiting up to wait_s for it.

    Raises BlockingIOError when another process still holds the lock after wait_s. If the file
    was moved away (synced) while we waited, opens the new file at `path` instead.
    """
    deadline = time.monotonic() + wait_s
    while True:
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0), 0o600)
        if create and not existed:
            _fsync_dir(path.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise BlockingIOError(f"{path} is locked by another process (a running sweep "
                                      "or sync); wait for it to end") from None
            time.sleep(0.1)
            continue
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return fd
        os.close(fd)  # moved away by sync while we waited: open the new one
        if not create:
            raise FileNotFoundError(path)


def _append_line(fd: int, entry: dict[str, Any]) -> None:
    """One JSON line in one write on an O_APPEND descriptor, fsynced before returning; a line
    the disk could not take whole is cut off again (SpoolFull), so no torn line stays."""
    data = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
    size = os.fstat(fd).st_size
    try:
        written = os.write(fd, data)
        if written != len(data):  # a short write on a local file means the disk is full
            raise OSError(errno.ENOSPC, f"short write: {written} of {len(data)} bytes")
        os.fsync(fd)
    except OSError as error:
        os.ftruncate(fd, size)
        if error.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        folder = Path(os.readlink(f"/proc/self/fd/{fd}")).parent if os.path.exists("/proc/self/fd") else "the spool folder"
        stat = os.fstatvfs(fd)
        raise SpoolFull(
            error.errno,
            f"the spool folder {folder} is full ({stat.f_bavail * stat.f_frsize} bytes free, a trial's line "
            f"needs {len(data)}; keep at least {max(64 * 1024, 10 * len(data))} bytes free): free space there "
            f"or set spool.dir elsewhere, then run the same command again (recorded trials are kept)",
        ) from None


def _terminate_torn_line(fd: int, path: Path) -> None:
    """End a torn last line (a crash mid-write) so the next line starts clean."""
    if os.fstat(fd).st_size == 0:
        return
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    if last != b"\n":
        os.write(fd, b"\n")
        os.fsync(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
