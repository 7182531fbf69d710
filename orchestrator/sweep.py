"""The driver: run a checked sweep on a Ray cluster and record every trial in MLflow.

    python -m orchestrator +milestone=m10      (orchestrator/__main__.py calls `execute`)

`execute(sweep, cwd)`:
1. resolves the tracking URI (a bad scheme is a configuration error, before anything starts);
2. connects to Ray (joins cluster.address / $RAY_ADDRESS or starts a local Ray on 127.0.0.1)
   and probes the devices;
3. opens the sweep's parent run through a `Recorder` (orchestrator/spool.py): a spool this sweep
   left earlier is uploaded first, an unfinished parent with the same sweep key is reopened
   when `resume`, and trials that already have a verdict there (or in the spool) are left out;
4. records as SKIPPED every trial that fits on no device (its reason names its need and the
   largest device), without submitting it;
5. runs the rest (`run_trials`): each trial is submitted when a device that can hold it is
   free, results are gathered in completion order, judged against the criteria and recorded
   one by one as they arrive (MLflow, or the spool while MLflow is away); a progress line
   (done / running / pending, elapsed, ETA) goes to stderr;
6. ends the parent run (FINISHED, or KILLED after Ctrl-C) with the driver's metrics
   `sweep_wall_s` and `num_devices`, prints the table of every trial of the sweep and what to
   open to see it (a server's page of the parent run, or `mlflow ui` for a local store), and
   returns the exit status: 0 when every trial passed, 1 when not, 130 when interrupted.

What survives what:
- A worker or node that dies: the trial runs again (trial.max_retries) on a new warm worker
  (or, with trial.warm_workers=false, Ray reruns the task); its attempt number is recorded as
  `attempts`; one record per trial, so one child run.
- A trial that hangs: past its deadline (`trial_timeout_s`) the driver cancels it (kills its
  worker, again every CANCEL_RETRY_S while it lingers) and records ERROR "timeout: ..." once
  Ray reports it gone; only then is its device free again.
- Out of memory: the trial body turns it into ERROR "oom: ..." (orchestrator.trial); Ray's
  memory monitor's kills become the same. A warm worker frees its device's memory after each
  trial, and each trial records its memory at start against the worker's baseline (too far
  over it: invalid, see orchestrator.trial `Worker`).
- MLflow away: the Recorder spools; a trial counts as done only once it is in MLflow or fsynced
  in the spool, so a driver killed at any moment loses at most the trials still running.
- Ctrl-C (KeyboardInterrupt): running trials are cancelled, the parent is marked KILLED, the
  exit status is 130; running the same command again resumes the sweep.
- SIGTERM (a batch scheduler, `timeout`): the same as Ctrl-C, exit status 143. Ray's driver
  installs its own SIGTERM handler in `ray.init` (it exits at once, and Ray's shutdown then
  aborts), so the driver installs its own right after connecting, and puts the earlier one
  back at the end. It raises `Terminated`, a KeyboardInterrupt; Ray's waits turn that into a
  plain KeyboardInterrupt, so the handler also notes that SIGTERM came.
- Any other error while trials run (a bug, a lost cluster): the running trials are waited for
  (up to their deadlines) and recorded before the error goes on, so none is lost. MLflow
  errors never get that far: the Recorder spools on any of them. A full spool disk (MLflow
  away too) stops the driver: the running trials are cancelled (nowhere to record them) and
  the error names the folder and the space needed.
- A second driver of the same sweep is refused before any trial starts (the sweep's lock, see
  orchestrator/tracking.py `SweepLock`), once Ray is up (so a cluster.address that does not
  answer leaves no store behind).

Each record's `info` carries where and when it ran, for orchestrator/timeline.py: `node_id`,
`device_key` (GPU UUID, or "<node id>:cpu"), `driver_submitted_at` and `driver_received_at`
(unix seconds on the driver), next to the worker's own `started_at` / `finished_at`.

Key decisions:
- The driver alone talks to MLflow; trials return plain dicts (orchestrator.trial).
- Placement is decided here, not left to Ray's queue: a trial is submitted only to a free
  device that can hold it (first fit in grid order), so a submitted trial runs at once and
  its elapsed time (progress, deadline) is its own. A trial that fits only large devices waits.
- ETA: mean wall time of the trials finished so far, times the work left, over the devices.
- Faults for tests come from $KVBENCH_INJECT_FAULT (orchestrator.trial): the driver reads it
  and hands each trial its fault, so the tests run this same code path.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from orchestrator import INTERRUPTED_STATUS, TERMINATED_STATUS, report
from orchestrator.capacity import (
    Device,
    devices_from_probe,
    fitting_devices,
    skip_reason,
    trial_need_bytes,
    trial_need_parts,
)
from orchestrator.config import ConfigurationError, Sweep, TrialSettings
from orchestrator.criteria import Criterion, judge, verdict
from orchestrator.grid import TrialSpec
from orchestrator.record import TrialRecord
from orchestrator.scheduling import Cluster, device_key
from orchestrator.spool import Recorder
from orchestrator.tracking import MODEL_TRAINING_VIEW, open_hint, redact_override, redact_text, resolve_tracking_uri
from orchestrator.trial import injected_fault

POLL_S = 1.0  # how often the progress line refreshes and deadlines are checked while trials run
TIMEOUT_BASE_S = 600.0  # derived deadline: this much for any trial ...
TIMEOUT_S_PER_GB = 120.0  # ... plus this much per GB of cache and weights (8 MB/s, very slow)
CANCEL_RETRY_S = 10.0  # a cancelled trial whose task is not gone yet is cancelled again this often
INTERRUPT_WAIT_S = 30.0  # on Ctrl-C, how long the driver waits for cancelled trials to be gone


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (a KeyboardInterrupt), with its own exit status."""

    status = TERMINATED_STATUS


_sigterm = {"received": False}  # Ray's waits turn any KeyboardInterrupt into a plain one: remember


def _raise_terminated(signum: int, frame: Any) -> None:
    _sigterm["received"] = True
    raise Terminated()


def received_sigterm() -> bool:
    """Whether the running driver got SIGTERM (its interrupt then exits 143, not 130)."""
    return _sigterm["received"]


def make_record(spec: TrialSpec, result: dict[str, Any], criteria: Sequence[Criterion], attempts: int | None = None) -> TrialRecord:
    """Judge a trial's result dict (see orchestrator.trial) into its record; a trial that did
    not run to the end (ERROR, SKIPPED) is not judged: it has no criterion outcomes.
    `attempts`: how many times it ran (default: the result's `attempt`, else 1)."""
    status = result["status"]
    outcomes = judge(result.get("metrics", {}), criteria) if status == "OK" else ()
    return TrialRecord(
        trial_key=spec.key,
        index=spec.index,
        params=dict(spec.params),
        status=status,
        verdict=verdict(status, outcomes),
        reason=result.get("reason", ""),
        metrics=dict(result.get("metrics", {})),
        info={k: str(v) for k, v in result.get("info", {}).items()},
        criteria=outcomes,
        attempts=int(result.get("attempt", 1)) if attempts is None else attempts,
        started_at=result.get("started_at", 0.0),
        finished_at=result.get("finished_at", 0.0),
        system_metrics={k: [list(p) for p in v] for k, v in result.get("system_metrics", {}).items()},
    )


def skipped_record(spec: TrialSpec, reason: str, criteria: Sequence[Criterion]) -> TrialRecord:
    now = time.time()
    result = {"status": "SKIPPED", "reason": reason, "started_at": now, "finished_at": now}
    return make_record(spec, result, criteria, attempts=0)


def split_by_capacity(
    trials: Sequence[TrialSpec], devices: Sequence[Device]
) -> tuple[list[TrialSpec], list[tuple[TrialSpec, str]]]:
    """(trials that fit some device, [(trial, skip reason)] for those that fit none)."""
    runnable, skipped = [], []
    for spec in trials:
        if fitting_devices(trial_need_bytes(spec.params), devices):
            runnable.append(spec)
        else:
            skipped.append((spec, skip_reason(spec.params, devices)))
    return runnable, skipped


def exit_status(records: Sequence[TrialRecord]) -> int:
    """0 when there are trials and every one passed; 1 otherwise."""
    return 0 if records and all(r.verdict == "PASS" for r in records) else 1


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """The live progress line on `stream`: rewritten in place on a terminal; elsewhere (a log
    file) one line per change of the counts, and at least one a minute."""

    HEARTBEAT_S = 60.0

    def __init__(self, label: str, total: int, stream: TextIO):
        self.label, self.total, self.stream = label, total, stream
        self.start = time.monotonic()
        self.tty = stream.isatty()
        self.last = ""
        self.last_written = 0.0

    def line(self, done: int, running: Sequence[float], pending: int, durations: Sequence[float], slots: int) -> str:
        """`running`: how long each running trial has run; `durations`: wall times of done trials."""
        text = (
            f"[{self.label}] {done}/{self.total} done, {len(running)} running, {pending} pending, "
            f"elapsed {_duration(time.monotonic() - self.start)}"
        )
        if durations and (running or pending):
            mean = sum(durations) / len(durations)
            left = pending * mean + sum(max(mean - r, 0.0) for r in running)
            text += f", ETA {_duration(left / max(1, slots))}"
        return text

    def show(self, *args: Any) -> None:
        text = self.line(*args)
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + text)
        elif text.split(", elapsed")[0] != self.last.split(", elapsed")[0] or now - self.last_written >= self.HEARTBEAT_S:
            self.stream.write(text + "\n")
            self.last_written = now
        self.stream.flush()
        self.last = text

    def close(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


def trial_timeout_s(params: Mapping[str, Any], settings: TrialSettings) -> float:
    """A trial's deadline, seconds from submission: trial.timeout_s, else derived from its size,
    generously: TIMEOUT_BASE_S + TIMEOUT_S_PER_GB per GB of cache and weights + 20 time boxes
    per repetition (m10 float32, 21 GB: about 54 min; smoke: about 10 min)."""
    if settings.timeout_s is not None:
        return float(settings.timeout_s)
    cache, weights, _ = trial_need_parts(params)
    boxes = 20 * params["bench.repetitions"] * params["bench.rep_budget_s"]
    return TIMEOUT_BASE_S + TIMEOUT_S_PER_GB * (cache + weights) / 1e9 + boxes


@dataclass
class _Running:
    spec: TrialSpec
    device: Device
    started: float  # time.monotonic() at submission
    submitted_at: float  # unix seconds at submission
    timeout_s: float
    cancelled: float | None = None  # time.monotonic() of the last cancel, once past the deadline

    def result(self, raw: dict[str, Any], settings: TrialSettings) -> dict[str, Any]:
        """The task's result with the driver's side added: times, where it ran, why it ended."""
        received = time.time()
        result = {**raw, "info": dict(raw.get("info", {}))}
        result.setdefault("started_at", self.submitted_at)
        result.setdefault("finished_at", received)
        info = result["info"]
        info.setdefault("node_id", self.device.node_id)
        info.setdefault("device_key", device_key(self.device.node_id, self.device.uuid))
        info["driver_submitted_at"] = f"{self.submitted_at:.6f}"
        info["driver_received_at"] = f"{received:.6f}"
        exhausted = result.pop("retries_exhausted", False)
        if self.cancelled is not None and result["status"] != "OK":
            source = "trial.timeout_s" if settings.timeout_s is not None else "derived from its size; set trial.timeout_s"
            result["status"] = "ERROR"
            result["reason"] = f"timeout: no result within {self.timeout_s:.0f} s ({source}); the task was cancelled"
        elif exhausted:
            result["attempt"] = settings.max_retries + 1
        return result


def run_trials(
    trials: Sequence[TrialSpec],
    devices: Sequence[Device],
    cluster: Cluster,
    criteria: Sequence[Criterion],
    on_record: Callable[[TrialRecord], None],
    settings: TrialSettings,
    progress: Progress | None = None,
) -> list[TrialRecord]:
    """Run trials that each fit at least one of `devices`; records in completion order.

    A trial past its deadline is cancelled (again every CANCEL_RETRY_S until its task is gone)
    and recorded as ERROR "timeout: ..." once it is; its device is free again only then. On
    KeyboardInterrupt every running trial is cancelled, the driver waits up to INTERRUPT_WAIT_S
    for their tasks to be gone, and the interrupt goes on to the caller."""
    needs = {spec.key: trial_need_bytes(spec.params) for spec in trials}
    assert all(fitting_devices(needs[s.key], devices) for s in trials), "a trial fits no device"
    free = list(devices)
    pending = list(trials)
    running: dict[Any, _Running] = {}
    records: list[TrialRecord] = []
    durations: list[float] = []
    try:
        while pending or running:
            for spec in list(pending):
                device = next((d for d in free if needs[spec.key] <= d.usable_bytes), None)
                if device is None:
                    continue
                free.remove(device)
                pending.remove(spec)
                submitted_at = time.time()
                ref = cluster.submit(spec, device, max_retries=settings.max_retries, fault=injected_fault(spec.index))
                running[ref] = _Running(spec, device, time.monotonic(), submitted_at, trial_timeout_s(spec.params, settings))
            for ref in cluster.wait(list(running), timeout_s=POLL_S):
                trial = running.pop(ref)
                free.append(trial.device)
                result = trial.result(cluster.fetch(ref), settings)
                durations.append(time.monotonic() - trial.started)
                record = make_record(trial.spec, result, criteria)
                on_record(record)  # returns once the record is in MLflow or the spool
                records.append(record)
            now = time.monotonic()
            for ref, trial in running.items():
                overdue = now - trial.started >= trial.timeout_s
                if overdue and (trial.cancelled is None or now - trial.cancelled >= CANCEL_RETRY_S):
                    cluster.cancel(ref)
                    trial.cancelled = now
            if progress is not None:
                progress.show(len(records), [now - r.started for r in running.values()], len(pending), durations, len(devices))
    except KeyboardInterrupt:
        _cancel_all(cluster, list(running))
        raise
    except Exception as error:
        if isinstance(error, OSError):  # nowhere to record (a full spool disk): don't wait
            _cancel_all(cluster, list(running))
        else:
            _drain(running, cluster, criteria, on_record, settings, records)
        raise
    finally:
        if progress is not None:
            progress.close()
    return records


def _drain(running: dict[Any, _Running], cluster: Cluster, criteria: Sequence[Criterion],
           on_record: Callable[[TrialRecord], None], settings: TrialSettings, records: list[TrialRecord]) -> None:
    """After an error: wait for the running trials (up to their deadlines, then cancel) and
    record them; stop at the first one that cannot be recorded, cancelling the rest."""
    while running:
        for ref in cluster.wait(list(running), timeout_s=POLL_S):
            trial = running.pop(ref)
            record = make_record(trial.spec, trial.result(cluster.fetch(ref), settings), criteria)
            try:
                on_record(record)
            except Exception:
                _cancel_all(cluster, list(running))
                return
            records.append(record)
        now = time.monotonic()
        for ref, trial in running.items():
            if now - trial.started >= trial.timeout_s and (trial.cancelled is None or now - trial.cancelled >= CANCEL_RETRY_S):
                cluster.cancel(ref)
                trial.cancelled = now


def _cancel_all(cluster: Cluster, refs: list[Any]) -> None:
    """Cancel every running trial and wait (up to INTERRUPT_WAIT_S) until their tasks are gone."""
    for ref in refs:
        cluster.cancel(ref)
    deadline = time.monotonic() + INTERRUPT_WAIT_S
    while refs and time.monotonic() < deadline:
        for ref in cluster.wait(refs, timeout_s=POLL_S):
            refs.remove(ref)


def sweep_timing(records: Sequence[TrialRecord]) -> dict[str, float]:
    """`sweep_wall_s`: the driver's wall time from its first submission to its last result,
    over the trials this run submitted (0 when it submitted none)."""
    submitted = [float(r.info["driver_submitted_at"]) for r in records if "driver_submitted_at" in r.info]
    received = [float(r.info["driver_received_at"]) for r in records if "driver_received_at" in r.info]
    return {"sweep_wall_s": max(received) - min(submitted) if submitted and received else 0.0}


def _describe_devices(devices: Sequence[Device]) -> str:
    """e.g. '8 x NVIDIA H100 80GB HBM3 (gpu) on node-1 (80.6 GB usable)'."""
    counts: dict[str, int] = {}
    for device in devices:
        text = f"{device.label} ({device.usable_bytes / 1e9:.1f} GB usable)"
        counts[text] = counts.get(text, 0) + 1
    return "; ".join(f"{n} x {text}" for text, n in counts.items()) or "no devices"


def format_ending(sweep: Sweep, records: Sequence[TrialRecord], status: str, uri: str,
                  parent_id: str | None, spool_path: Any = None, experiment_id: str | None = None,
                  spooled: bool = False) -> str:
    """What the driver prints at the end: the table, the sweep's verdict line, the worst margin
    per criterion, and where to look (the parent run id, the UI command, or the spool)."""
    complete = status == "FINISHED"
    verdict = "PASS" if complete and records and all(r.verdict == "PASS" for r in records) else "FAIL"
    n = len(records)
    lines = [f"\n{sweep.milestone} {sweep.title}: {n} trial{'s' * (n != 1)}",
             report.format_table(records), ""]
    lines.append(f"verdict {report.sweep_verdict_line(records, verdict)}"
                 + ("" if complete else f" (sweep {status}: not every trial ran)"))
    worst = report.format_worst_margins(records)
    if worst:
        lines.append(worst)
    if parent_id and not spooled:
        lines.append(f"MLflow: experiment {sweep.experiment!r}, parent run {parent_id} "
                     f"(its description holds this table; per-trial runs under it)")
    elif spool_path is not None:
        lines.append(f"MLflow was unreachable: the sweep is in the spool {spool_path}; "
                     f"upload it with `python -m orchestrator.sync`")
    lines.append(f"compare with the sweep before: python -m orchestrator.compare --last 2 --milestone {sweep.milestone}")
    hint = open_hint(uri, experiment_id, parent_id)
    if hint.startswith("mlflow ui "):
        lines.append(f"open: {redact_text(hint)}")  # no password of the URI on the screen
        if parent_id and experiment_id:
            # MLflow 3.17's UI opens in its GenAI mode unless the address asks for model training
            lines.append(f"then: http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{parent_id}"
                         f"?{MODEL_TRAINING_VIEW}")
    else:  # a server: its own page of the parent run, last, so scripts can take the last line
        lines.append(hint)
    return "\n".join(lines) + "\n"


def execute(sweep: Sweep, cwd: str | os.PathLike[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the whole sweep (see the module docstring); returns the exit status: 0 every trial
    passed, 1 not, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).

    Raises ConfigurationError (a bad tracking URI, a dead cluster.address, a malformed
    $KVBENCH_INJECT_FAULT) before any trial starts or anything is written to MLflow, SweepBusy
    when another driver runs this sweep now (before any trial starts), SpoolFull when MLflow
    is away and the spool's disk is full."""
    try:
        uri = resolve_tracking_uri(sweep.tracking_uri, cwd)
        injected_fault(-1)  # checks $KVBENCH_INJECT_FAULT
    except ValueError as error:
        raise ConfigurationError(str(error)) from None
    recorder = Recorder(
        uri, sweep.experiment, sweep.spool_dir, sweep.key, sweep.milestone,
        tags={"title": sweep.title, "overrides": " ".join(redact_override(o) for o in sweep.overrides)},
        params=sweep.params, config_yaml=sweep.config_yaml, err=err,
    )
    try:
        cluster = Cluster.connect(sweep.cluster)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None
    try:  # after Ray: a cluster.address that answers not must leave no store behind
        recorder.acquire()  # SweepBusy: another driver runs this sweep
    except BaseException:
        recorder.close()
        cluster.close()
        raise
    recorder.tags["cluster"] = cluster.address
    cluster.warm = sweep.trial.warm_workers
    _sigterm["received"] = False
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)  # after ray.init: ours wins
    label = f"[{sweep.milestone}]"
    status = "FINISHED"
    terminated = False
    records: list[TrialRecord] = []
    try:
        devices = devices_from_probe(
            cluster.probe(), sweep.cluster.gpu_memory_fraction, sweep.cluster.host_memory_fraction
        )
        err.write(f"{label} {len(sweep.trials)} trials on {_describe_devices(devices)}\n")
        done = recorder.open(resume=sweep.resume)
        todo = [spec for spec in sweep.trials if spec.key not in done]
        if done:
            err.write(f"{label} resuming: {len(sweep.trials) - len(todo)} trials already recorded\n")
        earlier = recorder.earlier_records() if done else []
        runnable, unfit = split_by_capacity(todo, devices)
        for spec, reason in unfit:
            record = skipped_record(spec, reason, sweep.criteria)
            recorder.record(record)
            records.append(record)
        if unfit:
            err.write(f"{label} {len(unfit)} trials fit no device: SKIPPED (reasons in the table)\n")
        progress = Progress(sweep.milestone, len(runnable), err)
        try:
            run_trials(runnable, devices, cluster, sweep.criteria,
                       on_record=lambda record: (recorder.record(record), records.append(record)),
                       settings=sweep.trial, progress=progress)
        except KeyboardInterrupt as interrupt:
            status = "KILLED"
            terminated = isinstance(interrupt, Terminated) or received_sigterm()
            what = "terminated (SIGTERM)" if terminated else "interrupted"
            err.write(f"\n{label} {what}: running trials cancelled; the sweep is recorded as KILLED. "
                      f"Run the same command again to resume it.\n")
        every = {r.trial_key: r for r in earlier}
        every.update((r.trial_key, r) for r in records)
        everything = sorted(every.values(), key=lambda r: r.index)
        metrics = {**sweep_timing(records), "num_devices": float(len(devices))}
        # every record, the earlier ones too, so finish_sweep need not read them back again
        recorder.finish(everything, status=status, metrics=metrics)
    finally:
        recorder.close()
        cluster.close()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    spooled = recorder.spool_path.exists()  # left there only while MLflow is away
    experiment_id = getattr(recorder.tracker, "experiment_id", None)
    out.write(format_ending(sweep, everything, status, uri, recorder.parent_id, recorder.spool_path,
                            experiment_id, spooled=spooled))  # the parent's page opens once synced
    out.flush()
    if status == "KILLED":
        return TERMINATED_STATUS if terminated else INTERRUPTED_STATUS
    return exit_status(everything)
