"""kvcore.profiling on a machine without CUDA: it says so and exits 2 (the figures themselves
need a GPU; docs/kernel-notes.md holds a run).

Run: `python -m pytest tests/kvcore/test_profiling.py -q`.
"""

from __future__ import annotations

import pytest
import torch

from kvcore import profiling


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_without_cuda_exits_2(capsys):
    assert profiling.main(["--dtypes", "float16"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
