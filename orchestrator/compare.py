"""Compare two sweeps trial by trial: did a figure move beyond what the trials' own spread allows?

    python -m orchestrator.compare A B                       # A: baseline, B: candidate (parent run ids or sweep keys)
    python -m orchestrator.compare --last 2 --milestone m10  # the newest m10 sweep against the one before
    python -m orchestrator.compare A B --tracking-uri sqlite:///$PWD/mlflow.db --no-log

Trials are matched by their trial key (the hash of their configuration); trials in one sweep
only are listed. Per matched trial and figure it prints A's and B's value, the ratio B / A and
the change: "regression", "improvement" or "~" (within the spread). Exit status: 1 when any
figure regressed (or a trial that passed in A no longer passes in B), 0 otherwise, 2 for bad
input (an unknown run, fewer sweeps than asked for, no trial in common). Unless `--no-log`, the
comparison is attached to B's parent run as `compare/vs-<A>.md` and `compare/vs-<A>.json`.

Key decisions (llama.cpp's compare-llama-bench prints a ratio and leaves the judging to the
reader, or a fixed percentage; here the measurement's own spread judges):
- A figure the benchmark repeats carries its min and max over the repetitions (`<figure>_min`,
  `<figure>_max`: fill, append_all, prefill, retrieve, decode, decode_cache, baseline decode,
  copy). A change counts only when the two ranges do not overlap: for a rate (higher is better)
  a regression is B's best below A's worst (B max < A min), an improvement B's worst above A's
  best (B min > A max). Overlapping ranges are "~", whatever the medians' ratio.
- Memory figures (`kv_cache_gb`, `peak_mem_gb`, `total_vram_gb`; lower is better) are measured
  once, so they have no spread: they count as changed beyond `MEMORY_TOLERANCE` (2%) of A.
- A figure judged by a criterion takes its direction from the criterion (">": higher is better).
- A trial that passed in A and does not in B (FAIL, ERROR, SKIPPED) is a regression by itself.
- Pure functions over `TrialRecord` lists (`compare`, `format_text`, `to_json`); MLflow is read
  and written through orchestrator.tracking only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator import report
from orchestrator.record import TrialRecord
from orchestrator.tracking_env import set_mlflow_defaults

MEMORY_FIGURES = ("kv_cache_gb", "peak_mem_gb", "total_vram_gb")
MEMORY_TOLERANCE = 0.02  # relative change a memory figure (no spread) may have


@dataclass(frozen=True)
class FigureChange:
    """One figure of one matched trial in both sweeps."""

    figure: str
    a: float
    b: float
    ratio: float | None  # b / a (None when a is 0)
    higher_is_better: bool
    a_range: tuple[float, float] | None  # (min, max) over the repetitions, None without a spread
    b_range: tuple[float, float] | None
    change: str  # "regression" | "improvement" | "~"


@dataclass(frozen=True)
class TrialChange:
    """A trial present in both sweeps: its verdicts and its figures' changes."""

    trial_key: str
    label: str  # e.g. "float16 ctx=256 L3 H6/2"
    verdict_a: str
    verdict_b: str
    figures: tuple[FigureChange, ...]

    @property
    def verdict_regressed(self) -> bool:
        return self.verdict_a == "PASS" and self.verdict_b != "PASS"

    @property
    def regressions(self) -> list[str]:
        found = [f.figure for f in self.figures if f.change == "regression"]
        return (["verdict"] if self.verdict_regressed else []) + found


@dataclass(frozen=True)
class Comparison:
    a: str  # labels of the two sweeps (parent run ids)
    b: str
    trials: tuple[TrialChange, ...]
    only_a: tuple[str, ...]  # labels of trials found in A only
    only_b: tuple[str, ...]

    @property
    def regressed(self) -> bool:
        return any(t.regressions for t in self.trials)


def _spread(metrics: dict[str, float], figure: str) -> tuple[float, float] | None:
    low, high = metrics.get(f"{figure}_min"), metrics.get(f"{figure}_max")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return None
    return (min(low, high), max(low, high))


def figures_of(record: TrialRecord) -> dict[str, bool]:
    """The figures a comparison judges, each with whether higher is better: every figure with a
    recorded spread (a rate), the memory figures, and every figure a criterion judged."""
    chosen = {m: True for m in record.metrics if _spread(record.metrics, m) is not None}
    chosen.update({m: False for m in MEMORY_FIGURES if m in record.metrics})
    chosen.update({c.metric: c.op == ">" for c in record.criteria})
    return chosen


def judge_change(a: float, b: float, a_range: tuple[float, float] | None, b_range: tuple[float, float] | None,
                 higher_is_better: bool, tolerance: float = MEMORY_TOLERANCE) -> str:
    """"regression", "improvement" or "~" (module doc): ranges that do not overlap, or beyond
    `tolerance` of A where either figure has no spread."""
    if a_range is not None and b_range is not None:
        if b_range[1] < a_range[0]:
            lower = True
        elif b_range[0] > a_range[1]:
            lower = False
        else:
            return "~"
    else:
        if abs(b - a) <= tolerance * abs(a):
            return "~"
        lower = b < a
    return "regression" if lower == higher_is_better else "improvement"


def compare(a: Sequence[TrialRecord], b: Sequence[TrialRecord], a_label: str = "A", b_label: str = "B") -> Comparison:
    """Match the two sweeps' trials by key and judge every figure both measured."""
    by_key_a = {r.trial_key: r for r in a}
    by_key_b = {r.trial_key: r for r in b}
    trials = []
    for key in sorted(set(by_key_a) & set(by_key_b), key=lambda k: (by_key_b[k].index, k)):
        ra, rb = by_key_a[key], by_key_b[key]
        directions = {**figures_of(ra), **figures_of(rb)}
        changes = []
        for figure, higher in directions.items():
            va, vb = ra.metrics.get(figure), rb.metrics.get(figure)
            if va is None or vb is None or not (math.isfinite(va) and math.isfinite(vb)):
                continue
            a_range, b_range = _spread(ra.metrics, figure), _spread(rb.metrics, figure)
            changes.append(FigureChange(
                figure=figure, a=va, b=vb, ratio=vb / va if va else None, higher_is_better=higher,
                a_range=a_range, b_range=b_range, change=judge_change(va, vb, a_range, b_range, higher)))
        changes.sort(key=lambda f: (f.change == "~", f.figure))
        trials.append(TrialChange(key, report.describe(rb), ra.verdict, rb.verdict, tuple(changes)))
    only_a = tuple(f"#{r.index} {report.describe(r)}" for k, r in by_key_a.items() if k not in by_key_b)
    only_b = tuple(f"#{r.index} {report.describe(r)}" for k, r in by_key_b.items() if k not in by_key_a)
    return Comparison(a_label, b_label, tuple(trials), only_a, only_b)


def format_text(comparison: Comparison) -> str:
    """The comparison for a terminal (and, in a code block, for the MLflow artifact)."""
    c = comparison
    lines = [f"A (baseline): {c.a}", f"B (candidate): {c.b}", ""]
    for t in c.trials:
        verdicts = t.verdict_a if t.verdict_a == t.verdict_b else f"{t.verdict_a} -> {t.verdict_b}"
        flag = "  REGRESSION (verdict)" if t.verdict_regressed else ""
        lines.append(f"{t.label}  [{t.trial_key[:12]}]  verdict {verdicts}{flag}")
        rows = [("figure", "A", "B", "B/A", "change", "A min..max", "B min..max")]
        for f in t.figures:
            rows.append((f.figure, _num(f.a), _num(f.b), "-" if f.ratio is None else f"{f.ratio:.3f}",
                         f.change, _range(f.a_range), _range(f.b_range)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  " + "  ".join(cell.ljust(w) if i in (0, 4) else cell.rjust(w)
                                          for i, (cell, w) in enumerate(zip(r, widths))).rstrip())
        lines.append("")
    if c.only_a:
        lines.append("only in A (not compared): " + ", ".join(c.only_a))
    if c.only_b:
        lines.append("only in B (not compared): " + ", ".join(c.only_b))
    regressions = [(t, name) for t in c.trials for name in t.regressions]
    improvements = [(t, f.figure) for t in c.trials for f in t.figures if f.change == "improvement"]
    lines.append(f"{len(c.trials)} trials compared: {len(regressions)} regressions, {len(improvements)} "
                 f"improvements beyond the recorded spread (memory: beyond {MEMORY_TOLERANCE:.0%})")
    for t, name in regressions:
        lines.append(f"  regression: {t.label}: {name}")
    return "\n".join(lines) + "\n"


def to_json(comparison: Comparison) -> str:
    data = asdict(comparison)
    data["regressed"] = comparison.regressed
    return json.dumps(data, indent=1, sort_keys=True)


def _label(sweep: object) -> str:
    name = getattr(sweep, "tags", {}).get("mlflow.runName", "")
    return f"{getattr(sweep, 'run_id')} {name}".strip()


def _num(value: float) -> str:
    return f"{value:.4g}"


def _range(span: tuple[float, float] | None) -> str:
    return "-" if span is None else f"{span[0]:.4g}..{span[1]:.4g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.compare", description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="*", metavar="SWEEP",
                        help="A (baseline) and B (candidate): parent run ids or sweep keys (first 4+ hex digits)")
    parser.add_argument("--last", type=int, default=None, metavar="N",
                        help="instead of A B: the N-th newest complete sweep of --milestone (A) against the newest (B)")
    parser.add_argument("--milestone", default=None, help="with --last: the milestone, e.g. m10")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow URI (default: $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db)")
    parser.add_argument("--experiment", default=None, help="look for the sweeps in this experiment only")
    parser.add_argument("--no-log", action="store_true", help="do not attach the comparison to B's parent run")
    args = parser.parse_args(argv)  # argparse exits 2 on its own errors
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per trial read
    set_mlflow_defaults()  # before MLflow is imported
    from orchestrator.tracking import TrackingUnavailable, last_sweeps, log_comparison, read_sweep, resolve_tracking_uri

    try:
        if args.last is not None:
            if args.sweeps or not args.milestone or args.last < 2:
                raise ValueError(f"expected --last N (N >= 2) with --milestone NAME and no sweep ids, received "
                                 f"--last {args.last}, --milestone {args.milestone!r}, sweeps {args.sweeps}; "
                                 f"e.g. --last 2 --milestone m10")
        elif len(args.sweeps) != 2:
            raise ValueError(f"expected two sweeps (A B) or --last 2 --milestone NAME, received {args.sweeps}")
        uri = resolve_tracking_uri(args.tracking_uri, Path.cwd())
        if args.last is not None:
            newest = last_sweeps(uri, args.milestone, args.last, args.experiment)
            refs = [newest[-1], newest[0]]
        else:
            refs = list(args.sweeps)
        a, b = (read_sweep(uri, ref, args.experiment) for ref in refs)
        if a.run_id == b.run_id:
            raise ValueError(f"expected two different sweeps, received the same parent run {a.run_id} twice")
        comparison = compare(a.records, b.records, a_label=_label(a), b_label=_label(b))
        if not comparison.trials:
            raise ValueError(f"expected trials in common (same trial keys), received none: A has "
                             f"{len(a.records)} trials, B {len(b.records)}; compare sweeps of the same grid")
        text = format_text(comparison)
        print(text, end="")
        if not args.no_log:
            log_comparison(uri, b.run_id, {f"compare/vs-{a.run_id[:8]}.md": f"```\n{text}```\n",
                                           f"compare/vs-{a.run_id[:8]}.json": to_json(comparison)})
            print(f"logged to B's parent run {b.run_id}: compare/vs-{a.run_id[:8]}.md, .json")
    except (ValueError, TrackingUnavailable) as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    return 1 if comparison.regressed else 0


if __name__ == "__main__":
    sys.exit(main())
