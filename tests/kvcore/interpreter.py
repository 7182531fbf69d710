"""Running a test file's own `__main__` under Triton's interpreter (TRITON_INTERPRET=1) in a
subprocess, so the kernels run on the CPU without touching the test session's Triton state.

    from interpreter import run_in_interpreter
    results = run_in_interpreter(__file__, cases)   # the script's last stdout line, parsed as JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_in_interpreter(script: str | os.PathLike[str], cases: Any = None, timeout_s: float = 600) -> Any:
    """Run `script` with TRITON_INTERPRET=1 (and the repository on the path), feeding it `cases`
    as JSON on stdin when given; its last line of stdout, parsed as JSON. Fails the test with the
    end of its stderr when the script fails."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(script)], input=None if cases is None else json.dumps(cases),
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
