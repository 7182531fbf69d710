"""The README as a newcomer reads it: its python blocks run as written on a CPU, and it starts
with a CPU quick start before the GPU milestones.

Run: python -m pytest tests/test_readme.py -q
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# Blocks of the team-server recipe (`<!-- recipe: NAME -->` before them) need a PostgreSQL and an
# MLflow server: tests/orchestrator/test_team_server.py runs them against real ones.
PYTHON_BLOCKS = [block for marker, block in
                 re.findall(r"(<!-- recipe: [\w-]+ -->\n)?^```python\n(.*?)^```", README, flags=re.S | re.M)
                 if not marker]


def test_the_readme_has_python_blocks():
    assert PYTHON_BLOCKS, "the README has no ```python block: the parse or the README changed"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))])
def test_every_python_block_runs_as_written_on_a_cpu(block, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",  # as on a machine without a GPU
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"README block failed:\n{block}\n{done.stderr[-2000:]}"


def test_the_readme_starts_with_a_cpu_quick_start_before_the_gpu_milestone():
    quick = README.index("## Quick start on a CPU")
    assert quick < README.index("## Install, run, test") < README.index("+milestone=m10")
    start = README[quick:README.index("## Install, run, test")]
    for text in ("pip install torch --index-url https://download.pytorch.org/whl/cpu", 'pip install -e ".[test]"',
                 "python -m orchestrator +milestone=smoke", "minutes", "noisy"):
        assert text in start, text
    # the snippet's printed shapes are what it prints
    assert "torch.Size([8, 64]) torch.Size([256, 2, 64])" in README
