"""The driver: run a checked sweep on a Ray cluster and record every trial in MLflow.

    python -m orchestrator +milestone=m10      (orchestrator/__main__.py calls `execute`)

`execute(sweep, cwd)`:
1. resolves the tracking URI (a bad scheme is a configuration error, before anything starts);
2. connects to Ray (joins cluster.address / $RAY_ADDRESS or starts a local Ray on 127.0.0.1)
   and probes the devices;
3. opens the sweep's parent run (reopening an unfinished one with the same sweep key when
   `resume`), and leaves out trials that already have a verdict there;
4. records as SKIPPED every trial that fits on no device (its reason names its need and the
   largest device), without submitting it;
5. runs the rest (`run_trials`): each trial is submitted when a device that can hold it is
   free, results are gathered in completion order, judged against the criteria and handed
   to the tracker one by one as they arrive; a progress line (done / running / pending,
   elapsed, ETA) goes to stderr;
6. closes the parent run, prints the table of every trial of the sweep and how to open it in
   the MLflow UI, and returns the exit status: 0 when every trial passed, else 1.

Key decisions:
- The driver alone talks to MLflow; trials return plain dicts (orchestrator.trial).
- Placement is decided here, not left to Ray's queue: a trial is submitted only to a free
  device that can hold it (first fit in grid order), so a submitted trial runs at once and
  its elapsed time is its own. A trial that fits only large devices waits for one.
- ETA: mean wall time of the trials finished so far, times the work left, over the devices.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from orchestrator import report
from orchestrator.capacity import Device, devices_from_probe, fitting_devices, skip_reason, trial_need_bytes
from orchestrator.config import ConfigurationError, Sweep
from orchestrator.criteria import Criterion, judge, verdict
from orchestrator.grid import TrialSpec
from orchestrator.record import TrialRecord
from orchestrator.scheduling import Cluster
from orchestrator.tracking import Tracker, resolve_tracking_uri

POLL_S = 1.0  # how often the progress line refreshes while trials run


def make_record(spec: TrialSpec, result: dict[str, Any], criteria: Sequence[Criterion], attempts: int = 1) -> TrialRecord:
    """Judge a trial's result dict (see orchestrator.trial) into its record; a trial that did
    not run to the end (ERROR, SKIPPED) is not judged: it has no criterion outcomes."""
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
        info=dict(result.get("info", {})),
        criteria=outcomes,
        attempts=attempts,
        started_at=result.get("started_at", 0.0),
        finished_at=result.get("finished_at", 0.0),
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


@dataclass
class _Running:
    spec: TrialSpec
    device: Device
    started: float  # time.monotonic() at submission
    started_at: float  # unix seconds at submission


def run_trials(
    trials: Sequence[TrialSpec],
    devices: Sequence[Device],
    cluster: Cluster,
    criteria: Sequence[Criterion],
    on_record: Callable[[TrialRecord], None],
    max_retries: int,
    progress: Progress | None = None,
) -> list[TrialRecord]:
    """Run trials that each fit at least one of `devices`; records in completion order."""
    needs = {spec.key: trial_need_bytes(spec.params) for spec in trials}
    assert all(fitting_devices(needs[s.key], devices) for s in trials), "a trial fits no device"
    free = list(devices)
    pending = list(trials)
    running: dict[Any, _Running] = {}
    records: list[TrialRecord] = []
    durations: list[float] = []
    while pending or running:
        for spec in list(pending):
            device = next((d for d in free if needs[spec.key] <= d.usable_bytes), None)
            if device is None:
                continue
            free.remove(device)
            pending.remove(spec)
            ref = cluster.submit(spec, device, max_retries=max_retries)
            running[ref] = _Running(spec, device, time.monotonic(), time.time())
        for ref in cluster.wait(list(running), timeout_s=POLL_S):
            trial = running.pop(ref)
            free.append(trial.device)
            result = cluster.fetch(ref)
            result.setdefault("started_at", trial.started_at)
            result.setdefault("finished_at", time.time())
            durations.append(time.monotonic() - trial.started)
            record = make_record(trial.spec, result, criteria)
            records.append(record)
            on_record(record)
        if progress is not None:
            now = time.monotonic()
            progress.show(len(records), [now - r.started for r in running.values()], len(pending), durations, len(devices))
    if progress is not None:
        progress.close()
    return records


def _describe_devices(devices: Sequence[Device]) -> str:
    """e.g. '8 x NVIDIA H100 80GB HBM3 (gpu) on node-1 (80.6 GB usable)'."""
    counts: dict[str, int] = {}
    for device in devices:
        text = f"{device.label} ({device.usable_bytes / 1e9:.1f} GB usable)"
        counts[text] = counts.get(text, 0) + 1
    return "; ".join(f"{n} x {text}" for text, n in counts.items()) or "no devices"


def execute(sweep: Sweep, cwd: str | os.PathLike[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the whole sweep (see the module docstring); returns the exit status (0 or 1).

    Raises ConfigurationError (a bad tracking URI, a dead cluster.address) before any trial
    starts or anything is written to MLflow."""
    try:
        uri = resolve_tracking_uri(sweep.tracking_uri, cwd)
        cluster = Cluster.connect(sweep.cluster)
    except ValueError as error:
        raise ConfigurationError(str(error)) from error
    try:
        devices = devices_from_probe(
            cluster.probe(), sweep.cluster.gpu_memory_fraction, sweep.cluster.host_memory_fraction
        )
        err.write(f"[{sweep.milestone}] {len(sweep.trials)} trials on {_describe_devices(devices)}\n")
        tracker = Tracker(uri, experiment=sweep.experiment)
        parent = tracker.start_sweep(
            milestone=sweep.milestone,
            sweep_key=sweep.key,
            tags={"title": sweep.title, "overrides": " ".join(sweep.overrides), "cluster": cluster.address},
            params=sweep.params,
            config_yaml=sweep.config_yaml,
            resume=sweep.resume,
        )
        done = tracker.finished_trial_keys(parent) if sweep.resume else set()
        todo = [spec for spec in sweep.trials if spec.key not in done]
        if done:
            err.write(f"[{sweep.milestone}] resuming: {len(sweep.trials) - len(todo)} trials already recorded\n")
        runnable, unfit = split_by_capacity(todo, devices)
        records = []
        for spec, reason in unfit:
            record = skipped_record(spec, reason, sweep.criteria)
            tracker.log_trial(parent, record)
            records.append(record)
        if unfit:
            err.write(f"[{sweep.milestone}] {len(unfit)} trials fit no device: SKIPPED (reasons in the table)\n")
        progress = Progress(sweep.milestone, len(runnable), err)
        records += run_trials(
            runnable,
            devices,
            cluster,
            sweep.criteria,
            on_record=lambda record: tracker.log_trial(parent, record),
            max_retries=sweep.trial.max_retries,
            progress=progress,
        )
        every = {r.trial_key: r for r in tracker.trial_records(parent)} if done else {}
        every.update((r.trial_key, r) for r in records)
        tracker.finish_sweep(parent, records, status="FINISHED")
    finally:
        cluster.close()
    everything = sorted(every.values(), key=lambda r: r.index)
    out.write(f"\n{sweep.milestone} {sweep.title}: {len(everything)} trials\n")
    out.write(report.format_table(everything) + "\n\n")
    out.write(f"mlflow ui --backend-store-uri {uri}\n")
    out.flush()
    return exit_status(everything)
