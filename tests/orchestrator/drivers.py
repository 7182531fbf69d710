"""Waiting on a driver process a test started (`python -m orchestrator ...`)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def finish(process: subprocess.Popen, log: Path, timeout_s: float = 240.0) -> str | None:
    """Wait for the driver to exit and return its stdout (None when not piped). One that has not
    exited by `timeout_s` is asked for every thread's stack (SIGUSR1: the driver's faulthandler
    writes them to its stderr, the test's `log`), killed, and the test fails with that log."""
    try:
        out, _ = process.communicate(timeout=timeout_s)
        return out
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(2.0)
        process.kill()
        process.communicate()
        raise AssertionError(f"the driver had not exited {timeout_s:.0f} s later; its stderr and stacks:\n"
                             + log.read_text()[-20000:]) from None


def default_sigint() -> None:
    """`preexec_fn` for a driver the test will interrupt: SIGINT back to its default action, as
    for a command typed in a terminal. A child inherits an ignored SIGINT (a test run started as a
    background job of a script ignores it, POSIX), and Python then installs no Ctrl-C handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
