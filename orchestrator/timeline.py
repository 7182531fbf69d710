"""The timeline of a sweep: where and when its trials ran, how busy each device was, and what
the driver cost between trials; as Markdown.

    python -m orchestrator.timeline <parent run id | sweep key | key prefix | spool file> [...]
    python -m orchestrator.timeline --tracking-uri sqlite:///$PWD/mlflow.db --experiment kvbench-m10 3f2a9c1e
    python -m orchestrator.timeline --baseline <one-card sweep> <two-card sweep>   # adds the speed-up

Per sweep: its wall time (first trial start to last trial finish), the driver's own wall time
(`sweep_wall_s`, first submission to last result) when recorded, trials run and trials per
second, devices, and whether trials on different devices overlapped in time (how many ran at
once at most, and for how long two or more did). Per device (a GPU UUID, or a CPU node): its
trials, busy time and busy fraction (trial run times over the sweep's wall time). The driver's
overhead per trial, per device and over the whole sweep, as median / p90 / max:
- result -> next start: from a trial's result arriving at the driver (`driver_received_at`) to
  the next trial on that device starting (`started_at`): the whole gap the device sat idle
  between two trials because of the orchestration; it splits into
- result -> next submit: the driver's own part (judging, recording to MLflow, submitting), and
- submit -> start: Ray's part plus the trial's process start (`driver_submitted_at` to
  `started_at`: scheduling, plus, for a new worker (the first trial on a card, one after a
  crash, or every trial with trial.warm_workers=false), its process start and imports);
- finish -> result: from the trial's end on the worker to its result at the driver.

Key decisions:
- Pure functions over `TrialRecord` lists (`sweep_timeline`, `format_timelines`); reading MLflow
  (`orchestrator.tracking.read_sweep`: only the tracking module imports mlflow) or a spool file
  is kept apart in `load_timeline_sweep`.
- A trial's run is its record's `started_at` .. `finished_at` (the worker's clock); SKIPPED
  trials never ran and are left out. The device is info `device_key`, else `node_id`; the
  driver's times are info `driver_submitted_at` / `driver_received_at`. Records written before
  these fields existed still give wall time and trial counts; what needs a missing field reads
  "n/a".
- Times from the worker and from the driver are compared directly: exact on one host, off by
  the clock skew between nodes on a cluster (keep the nodes' clocks synchronised, e.g. NTP).
- Speed-up of `--baseline A B`: wall(A) / wall(B) over the trials' wall times, and over the
  drivers' `sweep_wall_s` too where both sweeps recorded it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from orchestrator.record import TrialRecord
from orchestrator.tracking_env import set_mlflow_defaults

NA = "n/a"


@dataclass(frozen=True)
class Span:
    """One trial's run on its device, with the driver's times around it (None when unknown)."""

    trial_key: str
    device: str | None  # info device_key, else node_id
    node: str | None  # info node_id
    started_at: float  # unix s, worker
    finished_at: float  # unix s, worker
    submitted_at: float | None = None  # unix s, driver
    received_at: float | None = None  # unix s, driver

    @property
    def run_s(self) -> float:
        return self.finished_at - self.started_at


@dataclass(frozen=True)
class Stats:
    """median / p90 / max of a list of seconds."""

    n: int
    median: float
    p90: float
    max: float


@dataclass(frozen=True)
class Gaps:
    """The driver's overhead around trials (see the module docstring); None where unknown."""

    result_to_start: Stats | None = None
    result_to_submit: Stats | None = None
    submit_to_start: Stats | None = None
    finish_to_result: Stats | None = None


@dataclass(frozen=True)
class DeviceTimeline:
    device: str
    node: str | None
    trials: int
    busy_s: float
    busy_fraction: float
    gaps: Gaps


@dataclass(frozen=True)
class SweepTimeline:
    label: str
    trials: int  # trials that ran (not SKIPPED)
    skipped: int
    wall_s: float | None  # first start to last finish; None when no trial ran
    driver_wall_s: float | None  # the parent's sweep_wall_s, when recorded
    devices: tuple[DeviceTimeline, ...]  # empty when records carry no device
    unplaced: int  # trials that ran on a device the records do not name
    max_concurrent: int  # most trials running at one moment (any device)
    overlap_s: float  # time during which two or more trials ran
    gaps: Gaps  # over every device
    meta: dict[str, str] = field(default_factory=dict)  # milestone, sweep key, run id, ...

    @property
    def trials_per_s(self) -> float | None:
        return self.trials / self.wall_s if self.wall_s else None


# ---- pure functions --------------------------------------------------------------------


def _float(info: dict[str, str], name: str) -> float | None:
    try:
        value = float(info[name])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def spans(records: Sequence[TrialRecord]) -> list[Span]:
    """The runs of the trials that ran (SKIPPED and timeless records left out), by start time."""
    out = []
    for r in records:
        if r.status == "SKIPPED" or not (0 < r.started_at <= r.finished_at):
            continue
        node = r.info.get("node_id") or None
        out.append(Span(r.trial_key, r.info.get("device_key") or node, node, r.started_at, r.finished_at,
                        _float(r.info, "driver_submitted_at"), _float(r.info, "driver_received_at")))
    return sorted(out, key=lambda s: (s.started_at, s.trial_key))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks, as numpy's default."""
    if not values:
        raise ValueError("expected at least one value, received none")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def stats(values: Sequence[float]) -> Stats | None:
    return Stats(len(values), percentile(values, 50), percentile(values, 90), max(values)) if values else None


def gaps(device_spans: Sequence[Sequence[Span]]) -> Gaps:
    """The overhead figures over the spans of each device (each list in start order)."""
    to_start, to_submit, submit_start, finish_result = [], [], [], []
    for ordered in device_spans:
        for span in ordered:
            if span.submitted_at is not None:
                submit_start.append(span.started_at - span.submitted_at)
            if span.received_at is not None:
                finish_result.append(span.received_at - span.finished_at)
        for before, after in zip(ordered, ordered[1:]):
            if before.received_at is None:
                continue
            to_start.append(after.started_at - before.received_at)
            if after.submitted_at is not None:
                to_submit.append(after.submitted_at - before.received_at)
    return Gaps(stats(to_start), stats(to_submit), stats(submit_start), stats(finish_result))


def concurrency(all_spans: Sequence[Span]) -> tuple[int, float]:
    """(most spans running at one moment, seconds during which two or more ran)."""
    # (time, step) pairs sort an end (-1) before a start (+1) at the same instant
    events = sorted([(s.started_at, 1) for s in all_spans] + [(s.finished_at, -1) for s in all_spans])
    running, most, overlap, last = 0, 0, 0.0, 0.0
    for t, step in events:
        if running >= 2:
            overlap += t - last
        running += step
        most = max(most, running)
        last = t
    return most, overlap


def sweep_timeline(records: Sequence[TrialRecord], label: str = "sweep", driver_wall_s: float | None = None,
                   meta: dict[str, str] | None = None) -> SweepTimeline:
    """The timeline of one sweep's records (see the module docstring)."""
    ran = spans(records)
    skipped = sum(r.status == "SKIPPED" for r in records)
    wall = max(s.finished_at for s in ran) - min(s.started_at for s in ran) if ran else None
    by_device: dict[str, list[Span]] = {}
    for span in ran:
        if span.device is not None:
            by_device.setdefault(span.device, []).append(span)
    devices = tuple(
        DeviceTimeline(
            device=name,
            node=own[0].node,
            trials=len(own),
            busy_s=sum(s.run_s for s in own),
            busy_fraction=sum(s.run_s for s in own) / wall if wall else 0.0,
            gaps=gaps([own]),
        )
        for name, own in sorted(by_device.items())
    )
    most, overlap = concurrency(ran)
    return SweepTimeline(
        label=label,
        trials=len(ran),
        skipped=skipped,
        wall_s=wall,
        driver_wall_s=driver_wall_s if driver_wall_s else None,
        devices=devices,
        unplaced=sum(s.device is None for s in ran),
        max_concurrent=most,
        overlap_s=overlap,
        gaps=gaps(list(by_device.values())),
        meta=dict(meta or {}),
    )


def speedup(baseline: SweepTimeline, other: SweepTimeline) -> dict[str, float | None]:
    """wall(baseline) / wall(other), over trial wall times and over the drivers' wall times."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    return {"wall": ratio(baseline.wall_s, other.wall_s),
            "driver_wall": ratio(baseline.driver_wall_s, other.driver_wall_s)}


# ---- Markdown ----------------------------------------------------------------------------


def _s(value: float | None, digits: int = 2) -> str:
    return NA if value is None else f"{value:.{digits}f}"


def _stats_cells(s: Stats | None) -> list[str]:
    return [NA, NA, NA] if s is None else [f"{s.median:.3f}", f"{s.p90:.3f}", f"{s.max:.3f}"]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _short(device: str) -> str:
    """A GPU UUID stays whole; '<56-hex node id>:cpu' -> '<first 12>…:cpu'."""
    head, sep, tail = device.partition(":")
    return f"{head[:12]}…{sep}{tail}" if len(head) > 16 and not head.startswith("GPU-") else device


GAP_ROWS = (
    ("result -> next start (device idle between trials)", "result_to_start"),
    ("  of which result -> next submit (driver)", "result_to_submit"),
    ("submit -> start (Ray, worker process start)", "submit_to_start"),
    ("finish -> result (result back to the driver)", "finish_to_result"),
)


def format_sweep(t: SweepTimeline) -> str:
    """One sweep's Markdown section."""
    title = " ".join(v for v in (t.meta.get("milestone"), t.label) if v)
    lines = [f"## {title}", ""]
    facts = [(k, v) for k, v in t.meta.items() if k != "milestone"]
    rate = t.trials_per_s
    facts += [
        ("wall time, first start to last finish", NA if t.wall_s is None else f"{t.wall_s:.2f} s"),
        ("driver wall time (sweep_wall_s)", NA if t.driver_wall_s is None else f"{t.driver_wall_s:.2f} s"),
        ("trials run", f"{t.trials}" + (f" (and {t.skipped} SKIPPED)" if t.skipped else "")),
        ("trials per second", NA if rate is None else f"{rate:.3f}"),
        ("devices", f"{len(t.devices)}" if t.devices else NA),
    ]
    if t.devices:
        overlapped = "yes" if t.overlap_s > 0 else "no"
        facts.append(("trials on different devices overlapped",
                      f"{overlapped}: at most {t.max_concurrent} at once; two or more for {t.overlap_s:.2f} s"))
    else:
        facts.append(("trials on different devices overlapped", f"{NA} (the records name no device)"))
    if t.unplaced and t.devices:
        facts.append(("trials whose record names no device", str(t.unplaced)))
    lines += [_table(["", ""], [[k, v] for k, v in facts]), ""]
    if t.devices:
        rows = [[_short(d.device), str(d.trials), f"{d.busy_s:.2f}", f"{100 * d.busy_fraction:.1f} %",
                 *_stats_cells(d.gaps.result_to_start), *_stats_cells(d.gaps.submit_to_start)]
                for d in t.devices]
        lines += ["Per device (seconds):", "",
                  _table(["device", "trials", "busy s", "busy", "result->next start median", "p90", "max",
                          "submit->start median", "p90", "max"], rows), ""]
    rows = [[name, str(getattr(t.gaps, attr).n) if getattr(t.gaps, attr) else "0",
             *_stats_cells(getattr(t.gaps, attr))] for name, attr in GAP_ROWS]
    lines += ["Driver overhead per trial, all devices (seconds):", "",
              _table(["interval", "n", "median", "p90", "max"], rows), ""]
    return "\n".join(lines)


def distinct_labels(timelines: Sequence[SweepTimeline]) -> list[SweepTimeline]:
    """The timelines, a label that several share (one sweep key run twice) told apart by run id."""
    labels = [t.label for t in timelines]
    return [replace(t, label=f"{t.label} run {t.meta.get('parent run', '?')[:8]}") if labels.count(t.label) > 1 else t
            for t in timelines]


def format_timelines(timelines: Sequence[SweepTimeline], baseline: tuple[int, int] | None = None) -> str:
    """Every sweep's section, then the speed-up of timelines[baseline[1]] over timelines[baseline[0]]."""
    timelines = distinct_labels(timelines)
    parts = ["# Sweep timelines", ""] + [format_sweep(t) for t in timelines]
    if baseline is not None:
        a, b = timelines[baseline[0]], timelines[baseline[1]]
        up = speedup(a, b)
        parts += ["## Speed-up", "",
                  _table(["", a.label, b.label, "speed-up"], [
                      ["wall time, first start to last finish (s)", _s(a.wall_s), _s(b.wall_s),
                       NA if up["wall"] is None else f"{up['wall']:.2f}x"],
                      ["driver wall time (s)", _s(a.driver_wall_s), _s(b.driver_wall_s),
                       NA if up["driver_wall"] is None else f"{up['driver_wall']:.2f}x"],
                      ["devices", str(len(a.devices)) if a.devices else NA,
                       str(len(b.devices)) if b.devices else NA, ""],
                  ]), ""]
    return "\n".join(parts)


# ---- reading sweeps ----------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedSweep:
    label: str
    records: list[TrialRecord]
    metrics: dict[str, float]  # the parent's metrics (sweep_wall_s, num_devices, ...)
    meta: dict[str, str]


def load_timeline_sweep(ref: str, uri: str, experiment: str | None) -> LoadedSweep:
    """A sweep by spool file path, parent run id, sweep key or sweep key prefix (the newest
    parent run with that key, in `experiment` or in any experiment). ValueError when none or
    several sweeps match."""
    if ref.endswith(".jsonl") and Path(ref).is_file():
        from orchestrator.spool import read_spool

        spooled = read_spool(ref)
        key = str(spooled.header.get("sweep_key", Path(ref).stem))
        return LoadedSweep(key[:8], list(spooled.records.values()), spooled.finish_metrics,
                           {"milestone": str(spooled.header.get("milestone", "")), "spool file": ref,
                            "sweep key": key})
    from orchestrator.tracking import read_sweep

    stored = read_sweep(uri, ref, experiment)
    key = stored.tags.get("sweep_key", "")
    return LoadedSweep(
        label=key[:8] or stored.run_id[:8],
        records=stored.records,
        metrics=stored.metrics,
        meta={"milestone": stored.tags.get("milestone", ""), "experiment": stored.experiment,
              "parent run": stored.run_id, "sweep key": key, "overrides": stored.tags.get("overrides", ""),
              "cluster": stored.tags.get("cluster", "")},
    )


def timeline_of(loaded: LoadedSweep) -> SweepTimeline:
    return sweep_timeline(loaded.records, loaded.label, loaded.metrics.get("sweep_wall_s"),
                          {k: v for k, v in loaded.meta.items() if v})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.timeline", description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="*", help="parent run id, sweep key (or its first hex digits), or spool file")
    parser.add_argument("--baseline", nargs=2, metavar=("A", "B"), default=None,
                        help="two sweeps (as above): also print the speed-up wall(A) / wall(B)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db)")
    parser.add_argument("--experiment", default=None, help="look for sweep keys in this experiment only")
    args = parser.parse_args(argv)
    refs = list(args.sweeps) + list(args.baseline or [])
    if not refs:
        parser.error("expected at least one sweep (a parent run id, a sweep key or a spool file), received none")
    set_mlflow_defaults()  # before MLflow is imported
    from orchestrator.tracking import TrackingUnavailable, resolve_tracking_uri

    try:
        uri = resolve_tracking_uri(args.tracking_uri, Path.cwd())
        loaded = {ref: load_timeline_sweep(ref, uri, args.experiment) for ref in dict.fromkeys(refs)}
    except ValueError as error:
        print(f"timeline: {error}", file=sys.stderr)
        return 2
    except TrackingUnavailable as error:
        print(f"timeline: {error}", file=sys.stderr)
        return 1
    order = list(loaded)
    timelines = [timeline_of(loaded[ref]) for ref in order]
    pair = (order.index(args.baseline[0]), order.index(args.baseline[1])) if args.baseline else None
    print(format_timelines(timelines, pair))
    return 0


if __name__ == "__main__":
    sys.exit(main())
