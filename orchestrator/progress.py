"""The live progress line of a sweep: done / running / pending, elapsed time and an ETA.

    progress = Progress("m10", total=12, stream=sys.stderr)
    progress.show(done, running_s, pending, durations_s, slots)   # as often as wanted
    progress.close()

ETA: the mean wall time of the trials finished so far, times the work left, over the devices.
On a terminal the line is rewritten in place; elsewhere (a log file) one line per change of
the counts, and at least one a minute.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, TextIO


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
