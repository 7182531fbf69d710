"""The scheduler: which trial runs where and when, until each has a result.

    from orchestrator.scheduler import run_trials, split_by_capacity
    runnable, unfit = split_by_capacity(trials, devices)     # unfit: [(trial, skip reason)]
    records = run_trials(runnable, devices, cluster, criteria, on_record=recorder.record,
                         settings=sweep.trial, progress=Progress(...))

`cluster` is the Ray adapter (orchestrator/ray_cluster.py `Cluster`: submit, wait, fetch,
cancel); this module decides placement, deadlines and what a lost or late trial becomes, and
hands each result, judged (orchestrator/verdict.py), to `on_record` as it arrives.

Key decisions:
- Placement is decided here, not left to Ray's queue: a trial is submitted only to a free
  device that can hold it (first fit in grid order), so a submitted trial runs at once and
  its elapsed time (progress, deadline) is its own. A trial that fits only large devices waits.
- Deadlines: `trial_timeout_s` (trial.timeout_s, else derived from the trial's size). A trial
  past it is cancelled (its worker killed, again every CANCEL_RETRY_S while it lingers) and
  recorded as ERROR "timeout: ..." once Ray reports it gone; only then is its device free.
- Retries: a worker or node that dies is retried by the Ray adapter up to trial.max_retries;
  a trial whose retries are exhausted is recorded with that many attempts.
- A result counts once `on_record` returned (it is in MLflow or fsynced in the spool). On
  Ctrl-C every running trial is cancelled; on any other error the running trials are waited
  for (up to their deadlines) and recorded before the error goes on, except when recording
  itself failed for lack of room (an OSError: a full spool disk), when they are cancelled.
- Faults for tests come from $KVBENCH_INJECT_FAULT (orchestrator.trial `injected_fault`): each
  trial is handed its fault here, so the tests run this same code path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from orchestrator.capacity import Device, fitting_devices, skip_reason, trial_need_bytes, trial_need_parts
from orchestrator.config import TrialSettings
from orchestrator.criteria import Criterion
from orchestrator.grid import TrialSpec
from orchestrator.progress import Progress
from orchestrator.ray_cluster import Cluster, device_key
from orchestrator.record import TrialRecord
from orchestrator.result import TrialResult
from orchestrator.trial import injected_fault
from orchestrator.verdict import make_record

POLL_S = 1.0  # how often the progress line refreshes and deadlines are checked while trials run
TIMEOUT_BASE_S = 600.0  # derived deadline: this much for any trial ...
TIMEOUT_S_PER_GB = 120.0  # ... plus this much per GB of cache and weights (8 MB/s, very slow)
CANCEL_RETRY_S = 10.0  # a cancelled trial whose task is not gone yet is cancelled again this often
INTERRUPT_WAIT_S = 30.0  # on Ctrl-C, how long the driver waits for cancelled trials to be gone


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

    def result(self, raw: Mapping[str, Any], settings: TrialSettings) -> TrialResult:
        """The task's result with the driver's side added: times, where it ran, why it ended."""
        received = time.time()
        got = TrialResult.from_dict(raw)
        info = dict(got.info)
        info.setdefault("node_id", self.device.node_id)
        info.setdefault("device_key", device_key(self.device.node_id, self.device.uuid))
        info["driver_submitted_at"] = f"{self.submitted_at:.6f}"
        info["driver_received_at"] = f"{received:.6f}"
        result = replace(got, info=info, retries_exhausted=False,
                         started_at=self.submitted_at if got.started_at is None else got.started_at,
                         finished_at=received if got.finished_at is None else got.finished_at)
        if self.cancelled is not None and got.status != "OK":
            source = "trial.timeout_s" if settings.timeout_s is not None else "derived from its size; set trial.timeout_s"
            return replace(result, status="ERROR",
                           reason=f"timeout: no result within {self.timeout_s:.0f} s ({source}); the task was cancelled")
        if got.retries_exhausted:
            return replace(result, attempt=settings.max_retries + 1)
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
