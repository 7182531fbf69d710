"""The driver: run a checked sweep on a Ray cluster and record every trial in MLflow.

    python -m orchestrator +milestone=m10      (orchestrator/__main__.py calls `execute`)

`execute(sweep, cwd)`:
1. resolves the tracking URI (a bad scheme is a configuration error, before anything starts);
2. connects to Ray (joins cluster.address / $RAY_ADDRESS or starts a local Ray on 127.0.0.1)
   and probes the devices;
3. opens the sweep's parent run through a `Recorder` (orchestrator/recorder.py): a spool this sweep
   left earlier is uploaded first, an unfinished parent with the same sweep key is reopened
   when `resume`, and trials that already have a verdict there (or in the spool) are left out;
4. records as SKIPPED every trial that fits on no device (its reason names its need and the
   largest device), without submitting it;
5. runs the rest (orchestrator/scheduler.py `run_trials`): each trial is submitted when a
   device that can hold it is free, results are gathered in completion order, judged against
   the criteria (orchestrator/verdict.py) and recorded one by one as they arrive (MLflow, or
   the spool while MLflow is away); a progress line (orchestrator/progress.py: done / running /
   pending, elapsed, ETA) goes to stderr;
6. ends the parent run (FINISHED, or KILLED after Ctrl-C) with the driver's metrics
   `sweep_wall_s` and `num_devices`, prints the table of every trial of the sweep and what to
   open to see it (a server's page of the parent run, or `mlflow ui` for a local store), and
   returns the exit status: 0 when every trial passed, 1 when not, 130 when interrupted.

What survives what:
- A worker or node that dies: the trial runs again (trial.max_retries) on a new warm worker
  (or, with trial.warm_workers=false, Ray reruns the task); its attempt number is recorded as
  `attempts`; one record per trial, so one child run.
- A trial that hangs: past its deadline (scheduler `trial_timeout_s`) the driver cancels it (kills its
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
- The driver alone talks to MLflow; trials return plain dicts (orchestrator.trial), typed as
  a `TrialResult` (orchestrator/result.py) when they arrive.
- This module wires the parts together: the Ray adapter (orchestrator/ray_cluster.py), the
  scheduler (placement, deadlines, retries: orchestrator/scheduler.py), the verdict
  (orchestrator/verdict.py) and the recorder (orchestrator/recorder.py).
- Faults for tests come from $KVBENCH_INJECT_FAULT (orchestrator.trial): the driver checks it
  here before anything starts, and the scheduler hands each trial its fault, so the tests run
  this same code path.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from orchestrator import INTERRUPTED_STATUS, TERMINATED_STATUS, report
from orchestrator.capacity import Device, devices_from_probe
from orchestrator.config import ConfigurationError, Sweep
from orchestrator.progress import Progress
from orchestrator.record import TrialRecord
from orchestrator.recorder import Recorder
from orchestrator.scheduler import run_trials, split_by_capacity
from orchestrator.ray_cluster import Cluster
from orchestrator.tracking import MODEL_TRAINING_VIEW, open_hint, redact_override, redact_text, resolve_tracking_uri
from orchestrator.trial import injected_fault
from orchestrator.verdict import exit_status, skipped_record, sweep_verdict


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
    verdict = sweep_verdict(records, status)
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
