"""The sweep report: trial records as a terminal table, markdown, CSV and plots.

Pure functions of `TrialRecord`s; no MLflow here. The driver prints `format_table(records)` at the
end of a sweep; the tracking module attaches `format_markdown`, `format_csv` and `write_plots` to
the sweep's parent run (`summary.md`, `summary.csv`, `plots/<criterion>.png`).

Key decisions:
- One row per trial. A criterion's column shows the figure it judged, whether it passed and
  its margin as a percentage of the threshold ("1,234 ok +23.4%" / "98.10 FAIL -21.5%"; "-"
  when the trial produced no figure), so the threshold sits in the header and each cell reads
  on its own. ERROR and SKIPPED trials show their reason.
- Every row names where it ran: the device (`device_name`), the host and the GPU's UUID (the
  terminal shows its first 8 hex digits, the markdown and CSV the whole UUID).
- A trial whose figures the benchmark itself found untrustworthy (`valid` = 0: repetitions
  spread too far, a region too short, a shared GPU) keeps its verdict, flagged: "PASS, noisy:
  <why>". The criteria judged the median; a noisy median can pass by luck, so read it again.
- `margin_pct` = margin / |threshold| x 100: how far past the threshold a figure is, in the
  same sense for ">" and "<" criteria (positive passes). `worst_margins` gives the smallest
  per criterion over a sweep: the trial closest to failing.
- The main parameters are looked up by their config paths (`cache.dtype`,
  `milestone.context_length`, `model.num_layers`, ...), falling back to any flattened key with
  the same last component, so a renamed prefix does not blank the table.
- One PNG per criterion with two panels: the figure against context length (a line per dtype)
  and against dtype (a bar per context length), the threshold drawn as a dashed line and the
  failing side shaded. matplotlib is imported lazily with the Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.record import CriterionOutcome, TrialRecord

# (column title, flattened config path) of the parameters that tell trials apart.
MAIN_PARAMS: tuple[tuple[str, str], ...] = (
    ("dtype", "cache.dtype"),
    ("context", "milestone.context_length"),
    ("layers", "model.num_layers"),
    ("heads", "model.num_heads"),
    ("kv_heads", "model.num_kv_heads"),
)
# Storage dtypes from widest to narrowest; others follow alphabetically.
DTYPE_ORDER = ("float32", "float16", "bfloat16", "int8", "float8_e4m3fn")
_REASON_WIDTH = 60


def main_params(record: TrialRecord) -> dict[str, Any]:
    """The record's MAIN_PARAMS as {title: value}; None where the record lacks the key."""
    return {title: _lookup(record.params, path) for title, path in MAIN_PARAMS}


def describe(record: TrialRecord) -> str:
    """A short label for a trial, e.g. 'float16 ctx=16384 L32 H32/32'."""
    p = main_params(record)
    parts = []
    if p["dtype"] is not None:
        parts.append(str(p["dtype"]))
    if p["context"] is not None:
        parts.append(f"ctx={p['context']}")
    if p["layers"] is not None:
        parts.append(f"L{p['layers']}")
    if p["heads"] is not None:
        parts.append(f"H{p['heads']}" + (f"/{p['kv_heads']}" if p["kv_heads"] is not None else ""))
    return " ".join(parts) or record.trial_key[:12]


def margin_pct(outcome: CriterionOutcome) -> float | None:
    """The outcome's margin as a percentage of its threshold (None without a figure, or for a
    threshold of 0, where a percentage means nothing)."""
    if outcome.margin is None or not _finite(outcome.margin) or outcome.threshold == 0:
        return None
    return 100.0 * outcome.margin / abs(outcome.threshold)


def noisy_reason(record: TrialRecord) -> str | None:
    """Why the benchmark found the trial's figures untrustworthy (metric `valid` = 0), else None."""
    if record.status != "OK" or record.metrics.get("valid", 1.0) != 0.0:
        return None
    return " ".join(record.info.get("invalid_reason", "").split()) or "the benchmark marked it invalid"


def verdict_label(record: TrialRecord) -> str:
    """The verdict as people should read it: 'PASS', or 'PASS, noisy: <why>' for an invalid trial."""
    why = noisy_reason(record)
    return record.verdict if why is None else f"{record.verdict}, noisy: {why}"


def where(record: TrialRecord) -> dict[str, str]:
    """Where the trial ran: {'device', 'host', 'gpu_uuid'} ('' where unknown)."""
    info = record.info
    return {
        "device": info.get("device_name") or info.get("trial_device", ""),
        "host": info.get("hostname", ""),
        "gpu_uuid": info.get("gpu_uuid", ""),
    }


def worst_margins(records: Sequence[TrialRecord]) -> dict[str, tuple[float, TrialRecord]]:
    """Per criterion, the smallest margin in % of the threshold over the judged trials and the
    trial it belongs to (criteria no trial produced a figure for are left out)."""
    worst: dict[str, tuple[float, TrialRecord]] = {}
    for r in _ordered(records):
        for c in r.criteria:
            pct = margin_pct(c)
            if pct is not None and (c.name not in worst or pct < worst[c.name][0]):
                worst[c.name] = (pct, r)
    return worst


def sweep_verdict_line(records: Sequence[TrialRecord], verdict: str) -> str:
    """One line for the whole sweep, e.g. 'FAIL: 3 of 4 trials passed (1 FAIL), 2 noisy'."""
    counts = {v: sum(r.verdict == v for r in records) for v in ("PASS", "FAIL", "ERROR", "SKIPPED")}
    others = ", ".join(f"{n} {v}" for v, n in counts.items() if v != "PASS" and n)
    noisy = sum(noisy_reason(r) is not None for r in records)
    text = f"{verdict}: {counts['PASS']} of {_trials(len(records))} passed"
    text += f" ({others})" if others else ""
    return text + (f", {noisy} noisy (figures to read again, see the verdict column)" if noisy else "")


def format_worst_margins(records: Sequence[TrialRecord]) -> str:
    """'worst margin: fill_rate +1.5% (#0), ...' in the criteria's order ('' without figures)."""
    worst = worst_margins(records)
    if not worst:
        return ""
    return "worst margin per criterion (% of threshold): " + ", ".join(
        f"{name} {pct:+.1f}% (#{r.index})" for name, (pct, r) in worst.items())


def format_sweep_note(records: Sequence[TrialRecord], verdict: str, milestone: str = "", title: str = "",
                      status: str = "FINISHED") -> str:
    """The parent run's description (markdown): the verdict, where the trials ran, the worst
    margins and the whole table, so the MLflow run page answers "did it pass, on what, by how
    much" without opening an artifact."""
    head = " ".join(x for x in (milestone, title) if x)
    lines = [f"**{sweep_verdict_line(records, verdict)}**" + (f" ({head})" if head else "")]
    if status != "FINISHED":
        lines.append(f"The sweep was {status}: trials it did not run count as not passed.")
    places = sorted({" / ".join(x for x in (w["device"], w["host"], w["gpu_uuid"]) if x)
                     for w in map(where, records)} - {""})
    if places:
        lines.append("Ran on: " + "; ".join(places))
    worst = worst_margins(records)
    if worst:
        lines += ["", "| criterion | worst margin (% of threshold) | trial |", "|---|---|---|"]
        lines += [f"| {name} | {pct:+.1f}% | #{r.index} {describe(r)} |" for name, (pct, r) in worst.items()]
    lines += ["", format_markdown(records, reason_width=48).rstrip("\n"), "",
              "Cells: figure, ok/FAIL, margin as % of the threshold (positive passes). "
              "\"noisy\": the benchmark found the repetitions too spread or too short; "
              "the verdict stands but the figure should be measured again (each trial's description "
              "says why). Full precision: summary.csv; plots: plots/."]
    return "\n".join(lines) + "\n"


def format_trial_note(record: TrialRecord) -> str:
    """A child run's description (markdown): verdict, where it ran and its criteria as a table."""
    lines = [f"**{verdict_label(record)}**  {describe(record)}"]
    if record.reason:
        lines.append(f"Reason: {record.reason}")
    w = where(record)
    place = ", ".join(f"{k} {v}" for k, v in w.items() if v)
    if place:
        lines.append(f"Ran on: {place}")
    if record.criteria:
        lines += ["", "| criterion | figure | value | threshold | margin | margin % | result |",
                  "|---|---|---|---|---|---|---|"]
        for c in record.criteria:
            pct = margin_pct(c)
            lines.append(
                f"| {c.name} | {c.metric} | {'-' if c.value is None else _fmt(c.value)} | "
                f"{c.op} {_fmt_threshold(c.threshold)} | {'-' if c.margin is None else _fmt(c.margin)} | "
                f"{'-' if pct is None else f'{pct:+.1f}%'} | {'ok' if c.passed else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def _trials(n: int) -> str:
    return f"{n} trial" + ("" if n == 1 else "s")


def format_table(records: Sequence[TrialRecord]) -> str:
    """One row per trial: main params, each criterion's figure and pass/fail, the verdict.

    Plain text with aligned columns (numbers right-aligned), for a terminal.
    """
    header, rows = _cells(records, full_uuid=False)
    if not rows:
        return "(no trials)"
    numeric = [all(_is_numeric_cell(r[i]) for r in rows) for i in range(len(header))]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def format_markdown(records: Sequence[TrialRecord], reason_width: int = 200) -> str:
    """The same table as `format_table`, as a GitHub-flavoured markdown table (verdicts and
    reasons clipped to `reason_width` characters)."""
    header, rows = _cells(records, reason_width=reason_width)
    if not rows:
        return "(no trials)\n"
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def format_csv(records: Sequence[TrialRecord]) -> str:
    """Machine-readable summary: one row per trial with full-precision figures.

    Columns: index, trial_key, the main params, verdict, status, reason, attempts, device, host,
    gpu_uuid, noisy (why the figures are untrustworthy, empty when they are not), every metric
    any trial reported (sorted), then per criterion `criterion.<name>` (pass/fail, empty when
    not judged), `criterion.<name>.margin` and `criterion.<name>.margin_pct` (% of threshold).
    """
    records = _ordered(records)
    metric_names = sorted({m for r in records for m in r.metrics})
    crit_names = _criterion_names(records)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["index", "trial_key", *(t for t, _ in MAIN_PARAMS), "verdict", "status", "reason",
         "attempts", "device", "host", "gpu_uuid", "noisy", *metric_names,
         *(f"criterion.{c}{part}" for c in crit_names for part in ("", ".margin", ".margin_pct"))]
    )
    for r in records:
        crits = {c.name: c for c in r.criteria}
        writer.writerow(
            [r.index, r.trial_key, *("" if v is None else v for v in main_params(r).values()),
             r.verdict, r.status, r.reason, r.attempts, *where(r).values(), noisy_reason(r) or "",
             *(repr(float(r.metrics[m])) if m in r.metrics else "" for m in metric_names),
             *(cell for c in crit_names for cell in _csv_criterion(crits.get(c)))]
        )
    return out.getvalue()


def _csv_criterion(outcome: CriterionOutcome | None) -> tuple[str, str, str]:
    if outcome is None:
        return "", "", ""
    pct = margin_pct(outcome)
    return ("pass" if outcome.passed else "fail", "" if outcome.margin is None else repr(float(outcome.margin)),
            "" if pct is None else repr(pct))


def write_plots(records: Sequence[TrialRecord], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write one PNG per criterion into out_dir; return their paths (sorted by criterion).

    Left panel: the criterion's figure against context length, a line per dtype (and per other
    varying main parameter). Right panel: the figure per dtype, a bar per context length.
    The threshold is a dashed red line; the failing side is shaded. Trials without the figure
    (ERROR, SKIPPED) are counted in the panel title, not drawn.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = _ordered(records)
    paths = []
    for name in _criterion_names(records):
        judged = [(r, c) for r in records for c in r.criteria if c.name == name]
        first = judged[0][1]
        points = [(r, c.value) for r, c in judged if _finite(c.value)]
        missing = len(judged) - len(points)
        fig, (ax_ctx, ax_dt) = plt.subplots(1, 2, figsize=(11, 4.8), constrained_layout=True)
        _plot_against_context(ax_ctx, points)
        _plot_against_dtype(ax_dt, points)
        thresholds = sorted({c.threshold for _, c in judged})
        values = [v for _, v in points] + thresholds
        log_y = bool(values) and min(values) > 0 and max(values) / min(values) > 20
        for ax in (ax_ctx, ax_dt):
            if log_y:
                ax.set_yscale("log")
            _draw_thresholds(ax, thresholds, first.op, [v for _, v in points])
            ax.set_ylabel(first.metric)
            ax.grid(True, axis="y", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # under the panel, never over the data
                ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
        note = f" ({missing} trial{'s' * (missing != 1)} without a figure)" if missing else ""
        ax_ctx.set_title(f"against context length{note}", fontsize=10)
        ax_dt.set_title("against KV dtype", fontsize=10)
        op_text = (f"{first.op} {_fmt_threshold(thresholds[0])}" if len(thresholds) == 1
                   else "(thresholds vary)")
        head = f"{title}: " if title else ""
        fig.suptitle(f"{head}{name}: {first.metric} must be {op_text}", fontsize=12)
        path = out_dir / f"{_safe_name(name)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---- table cells -------------------------------------------------------------------------


def _cells(records: Sequence[TrialRecord], full_uuid: bool = True,
           reason_width: int | None = _REASON_WIDTH) -> tuple[list[str], list[list[str]]]:
    records = _ordered(records)
    crit_names = _criterion_names(records)
    shown = [t for t, _ in MAIN_PARAMS if any(main_params(r)[t] is not None for r in records)]
    places = [where(r) for r in records]
    place_cols = [k for k in ("device", "host", "gpu_uuid") if any(p[k] for p in places)]
    header = ["#", *shown]
    for name in crit_names:
        outcomes = [c for r in records for c in r.criteria if c.name == name]
        thresholds = {c.threshold for c in outcomes}
        rule = f" {outcomes[0].op}{_fmt_threshold(outcomes[0].threshold)}" if len(thresholds) == 1 else ""
        header.append(f"{name}{rule}")
    header.append("verdict")
    header += ["gpu" if k == "gpu_uuid" and not full_uuid else k for k in place_cols]
    with_reason = any(r.reason for r in records)
    if with_reason:
        header.append("reason")

    def clip(text: str) -> str:
        text = " ".join(text.split())
        if reason_width is None or len(text) <= reason_width:
            return text
        return text[: reason_width - 3] + "..."

    rows = []
    for r, place in zip(records, places):
        p = main_params(r)
        crits = {c.name: c for c in r.criteria}
        row = [str(r.index), *("-" if p[t] is None else str(p[t]) for t in shown)]
        row += [_criterion_cell(crits.get(name)) for name in crit_names]
        row.append(clip(verdict_label(r)))
        for k in place_cols:
            value = place[k] or "-"
            if k == "gpu_uuid" and not full_uuid and value != "-":
                value = value[:12]  # "GPU-" and 8 hex digits tell the cards of a host apart
            row.append(value)
        if with_reason:
            row.append(clip(r.reason))
        rows.append(row)
    return header, rows


def _criterion_cell(outcome: CriterionOutcome | None) -> str:
    if outcome is None or not _finite(outcome.value):
        return "-"
    pct = margin_pct(outcome)
    tail = "" if pct is None else f" {pct:+.1f}%"
    return f"{_fmt(outcome.value)} {'ok' if outcome.passed else 'FAIL'}{tail}"


def _fmt_threshold(value: float) -> str:
    return f"{value:,.6g}"


def _is_numeric_cell(cell: str) -> bool:
    return cell == "-" or bool(
        re.fullmatch(r"-?[\d,]+(\.\d+)?(e[+-]?\d+)?( ok| FAIL)?( [+-][\d.]+%)?", cell))


def _fmt(value: float) -> str:
    """Four significant figures, thousands separators, no exponent below 1e9."""
    v = float(value)
    if v == 0 or not math.isfinite(v):
        return str(v if not v.is_integer() else int(v))
    a = abs(v)
    if a >= 1e9 or a < 1e-3:
        return f"{v:.3e}"
    if a >= 1000:
        return f"{v:,.0f}"
    decimals = 3 - int(math.floor(math.log10(a)))
    return f"{v:.{max(decimals, 0)}f}"


# ---- plots -------------------------------------------------------------------------------


def _plot_against_context(ax: Any, points: list[tuple[TrialRecord, float]]) -> None:
    series: dict[str, list[tuple[float, float]]] = {}
    for r, v in points:
        ctx = main_params(r)["context"]
        if ctx is not None:
            series.setdefault(_series_label(r, points, exclude="context"), []).append((float(ctx), v))
    for i, label in enumerate(sorted(series, key=_dtype_rank)):
        xs, ys = zip(*sorted(series[label]))
        # Distinct markers and a fading size keep coinciding series (float16 = bfloat16 bytes) visible.
        ax.plot(xs, ys, marker="osD^v<>"[i % 7], markersize=8 - min(i, 4), alpha=0.85, label=label or None)
    contexts = sorted({x for s in series.values() for x, _ in s})
    if contexts and contexts[-1] / contexts[0] >= 4:
        ax.set_xscale("log", base=2)
    if contexts:
        ax.set_xticks(contexts, [f"{int(c):,}" for c in contexts])
        ax.set_xticks([], minor=True)
    ax.set_xlabel("context length (positions)")


def _plot_against_dtype(ax: Any, points: list[tuple[TrialRecord, float]]) -> None:
    dtypes = sorted({str(main_params(r)["dtype"]) for r, _ in points}, key=_dtype_rank)
    groups: dict[str, dict[str, float]] = {}
    for r, v in points:
        groups.setdefault(_series_label(r, points, exclude="dtype"), {})[str(main_params(r)["dtype"])] = v
    width = 0.8 / max(len(groups), 1)
    for i, label in enumerate(sorted(groups, key=_context_rank)):
        xs = [d for d, dt in enumerate(dtypes) if dt in groups[label]]
        ys = [groups[label][dtypes[d]] for d in xs]
        offset = (i - (len(groups) - 1) / 2) * width
        ax.bar([x + offset for x in xs], ys, width=width * 0.9, label=label or None)
    ax.set_xticks(range(len(dtypes)), dtypes)
    ax.set_xlabel("KV cache dtype")


def _series_label(record: TrialRecord, points: list[tuple[TrialRecord, float]], exclude: str) -> str:
    """Label a series by the main params (other than `exclude`) that vary among the points."""
    p = main_params(record)
    parts = []
    for t, _ in MAIN_PARAMS:
        if t == exclude or len({str(main_params(r)[t]) for r, _ in points}) <= 1:
            continue
        if t == "dtype":
            parts.append(str(p[t]))
        elif t == "context":
            parts.append(f"ctx={p[t]:,}" if isinstance(p[t], int) else f"ctx={p[t]}")
        else:
            parts.append(f"{t}={p[t]}")
    return ", ".join(parts)


def _draw_thresholds(ax: Any, thresholds: list[float], op: str, values: list[float]) -> None:
    """Dashed line per threshold; with one threshold, shade the failing side.

    The y range spans the figures and the thresholds with 8% to spare on each side (in log
    space on a log axis), and starts at zero on a linear axis when nothing is negative.
    """
    log = ax.get_yscale() == "log"
    fwd = math.log10 if log else float
    back = (lambda y: 10.0**y) if log else float
    span = [fwd(v) for v in [*values, *thresholds]]
    lo, hi = min(span), max(span)
    pad = 0.08 * (hi - lo) or (0.5 if log else abs(hi) * 0.1 or 1.0)
    low, high = back(lo - pad), back(hi + pad)
    if not log and lo >= 0:
        low = 0.0
    for i, t in enumerate(thresholds):
        ax.axhline(t, color="tab:red", linestyle="--", linewidth=1.5,
                   label=f"threshold {op} {_fmt_threshold(t)}" if i == 0 else None)
    if len(thresholds) == 1:
        t = thresholds[0]
        # The side where the figure fails: below a ">" threshold, above a "<" one.
        if op == ">":
            ax.axhspan(low, t, color="tab:red", alpha=0.08)
        else:
            ax.axhspan(t, high, color="tab:red", alpha=0.08)
    ax.set_ylim(low, high)


# ---- helpers -----------------------------------------------------------------------------


def _lookup(params: dict[str, Any], path: str) -> Any:
    if path in params:
        return params[path]
    leaf = path.rsplit(".", 1)[-1]
    for key in sorted(params):
        if key == leaf or key.endswith("." + leaf):
            return params[key]
    return None


def _ordered(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    return sorted(records, key=lambda r: (r.index, r.trial_key))


def _criterion_names(records: Sequence[TrialRecord]) -> list[str]:
    names: dict[str, None] = {}
    for r in records:
        for c in r.criteria:
            names.setdefault(c.name, None)
    return list(names)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _dtype_rank(label: str) -> tuple[int, str]:
    head = label.split(",")[0].strip()
    return (DTYPE_ORDER.index(head) if head in DTYPE_ORDER else len(DTYPE_ORDER), label)


def _context_rank(label: str) -> tuple[float, str]:
    m = re.search(r"(?<=ctx=)[\d,]+", label)
    return (float(m.group().replace(",", "")) if m else math.inf, label)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "criterion"
