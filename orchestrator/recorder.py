"""The recorder: where the driver records one sweep, MLflow while it answers, else the sweep's
spool (orchestrator/spool.py), so that nothing is lost if MLflow goes away mid-sweep.

    from orchestrator.recorder import Recorder
    recorder = Recorder(uri, experiment, spool_dir, sweep_key, milestone, tags, params,
                        config_yaml, err=sys.stderr)
    recorder.acquire()                     # the sweep's lock (SweepBusy: another driver runs it)
    done = recorder.open(resume=True)      # trial_keys already recorded (when resuming)
    recorder.record(record)                # returns once it is in MLflow or fsynced on disk
    recorder.finish(records, "FINISHED", metrics)
    recorder.close()

The recipe it follows is in orchestrator/spool.py's docstring: MLflow first; on the first
`TrackingUnavailable` (or any MLflow error) the spool for the rest of the sweep; at the end
one upload try.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from orchestrator.record import TrialRecord
from orchestrator.spool import Spool, read_spool, spooled_trial_keys, sync_spool, sync_turn
from orchestrator.tracking import SweepLock, Tracker, TrackingUnavailable, redact_text


class Recorder:
    """Where the driver records one sweep: MLflow while it answers, else the sweep's spool.

    The recipe of the module docstring as one object:

        recorder = Recorder(uri, experiment, spool_dir, sweep_key, milestone, tags, params,
                            config_yaml, err=sys.stderr)
        done = recorder.open(resume=True)      # trial_keys already recorded (when resuming)
        recorder.record(record)                # returns once it is in MLflow or on disk
        recorder.finish(records, "FINISHED", metrics)
        recorder.close()

    `open` first uploads a spool this sweep left earlier (so nothing is re-run that was
    recorded, and the spool never overwrites a newer result), then opens or reopens the
    parent run. The first `TrackingUnavailable` switches to the spool for the rest of the
    sweep, with one line on `err`; `finish` then tries one upload, in case MLflow is back.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        spool_dir: str | os.PathLike[str],
        sweep_key: str,
        milestone: str,
        tags: Mapping[str, Any],
        params: Mapping[str, Any],
        config_yaml: str,
        err: TextIO,
        label: str = "",
    ):
        self.uri, self.experiment, self.milestone = uri, experiment, milestone
        self.spool_dir, self.sweep_key = Path(spool_dir), sweep_key
        self.tags, self.params, self.config_yaml = dict(tags), dict(params), config_yaml
        self.err, self.label = err, label or f"[{milestone}]"
        self.tracker: Tracker | None = None
        self.lock: SweepLock | None = None
        self._away: TrackingUnavailable | None = None  # why the lock could not be taken
        self.parent_id: str | None = None
        self.spool: Spool | None = None

    @property
    def spool_path(self) -> Path:
        return self.spool_dir / f"{self.sweep_key}.jsonl"

    def acquire(self) -> None:
        """Take the sweep's lock in MLflow (SweepBusy when another driver writes it); when
        MLflow is away, the spool file's own lock is the only one (taken once spooling)."""
        if self.lock is not None:
            return
        try:
            self.tracker = self.tracker or Tracker(self.uri, experiment=self.experiment)
            self.lock = SweepLock(self.tracker, self.sweep_key).acquire()
        except TrackingUnavailable as error:
            self._away = error  # open() spools

    def open(self, resume: bool) -> set[str]:
        """Open the sweep's parent run (reopened when resuming); the trial_keys already recorded."""
        try:
            self.acquire()
            if self.lock is None:  # MLflow away
                raise self._away
            assert self.tracker is not None
            if self.spool_path.exists():
                with sync_turn(self.spool_dir):
                    uploaded = sync_spool(self.spool_path, tracker=self.tracker, lock=False) \
                        if self.spool_path.exists() else (None, 0)
                if uploaded is None:
                    raise ValueError(
                        f"{self.spool_path} is locked: another driver is running this sweep now; "
                        "wait for it to end, or press Ctrl-C there"
                    )
                if uploaded[0] is not None:
                    self._say(f"uploaded {uploaded[1]} trial(s) that {self.spool_path} held from an earlier run")
            self.parent_id = self.tracker.start_sweep(
                milestone=self.milestone, sweep_key=self.sweep_key, tags=self.tags, params=self.params,
                config_yaml=self.config_yaml, resume=resume,
            )
            return self.tracker.finished_trial_keys(self.parent_id) if resume else set()
        except TrackingUnavailable as error:
            self._to_spool(error)
            return spooled_trial_keys(self.spool_dir, self.sweep_key) if resume else set()

    def earlier_records(self) -> list[TrialRecord]:
        """The records this sweep holds from earlier runs (MLflow's, else the spool's)."""
        if self.spool is None:
            assert self.tracker is not None and self.parent_id is not None, "open() first"
            try:
                return self.tracker.trial_records(self.parent_id)
            except TrackingUnavailable as error:
                self._to_spool(error)
        return list(read_spool(self.spool_path).records.values())

    def record(self, record: TrialRecord) -> None:
        """Record one finished trial; on return it is in MLflow or fsynced in the spool."""
        if self.spool is None:
            assert self.tracker is not None and self.parent_id is not None, "open() first"
            try:
                self.tracker.log_trial(self.parent_id, record)
                return
            except Exception as error:  # unreachable, or any MLflow error: the record is kept
                self._to_spool(error)
        assert self.spool is not None
        self.spool.write_trial(record)

    def finish(self, records: list[TrialRecord], status: str, metrics: Mapping[str, float]) -> None:
        """End the sweep: `Tracker.finish_sweep`, or its line in the spool and one upload try."""
        if self.spool is None:
            assert self.tracker is not None and self.parent_id is not None, "open() first"
            try:
                self.tracker.finish_sweep(self.parent_id, records, status=status, metrics=metrics)
                return
            except Exception as error:  # unreachable, or any MLflow error: the spool keeps it
                self._to_spool(error)
        assert self.spool is not None
        self.spool.write_finish(status, metrics)
        self.spool.close()
        try:
            tracker = self.tracker or Tracker(self.uri, experiment=self.experiment)
            with sync_turn(self.spool_dir):
                uploaded = sync_spool(self.spool_path, tracker=tracker, lock=self.lock is None)
        except Exception as error:  # noqa: BLE001  (the spool keeps everything: say where)
            why = "MLflow is still away" if isinstance(error, TrackingUnavailable) else \
                f"MLflow refused the upload ({type(error).__name__}: {redact_text(str(error))[:200]})"
            self._say(f"{why}: the results wait in {self.spool_path}; upload them with "
                      f"`python -m orchestrator.sync --spool {self.spool_dir}` (or rerun the sweep)")
            return
        if uploaded is not None:
            self._say(f"MLflow is back: uploaded the {uploaded[1]} spooled trial(s) to parent run {uploaded[0]}")

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _to_spool(self, error: BaseException) -> None:
        if self.spool is not None:
            return
        text = str(error) if isinstance(error, TrackingUnavailable) else \
            f"MLflow refused a write ({type(error).__name__}: {redact_text(' '.join(str(error).split()))[:300]})"
        self._say(f"{text}; until the sweep ends, results go to the spool {self.spool_path}")
        self.spool = Spool(self.spool_dir, self.sweep_key)
        self.spool.write_sweep(
            uri=self.uri, experiment=self.experiment, milestone=self.milestone, tags=self.tags,
            params=self.params, config_yaml=self.config_yaml, parent_id=self.parent_id,
            lock_run_id=self.lock.run_id if self.lock is not None else None,
        )

    def _say(self, text: str) -> None:
        self.err.write(f"{self.label} {text}\n")
        self.err.flush()
