"""Tests of the decode kernel's benchmark (kvcore/bench/kernels.py) that run without a GPU:
its command line, its table, and that the kernel module holds no harness of its own.

Run: `python -m pytest tests/kvcore/test_bench_kernels.py -q`.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvcore.triton_decode as td
from kvcore.bench import kernels

ROOT = Path(__file__).resolve().parents[2]


def test_help_names_the_new_command_and_its_flags():
    done = subprocess.run([sys.executable, "-m", "kvcore.bench.kernels", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m kvcore.bench.kernels")
    for flag in ("--dtypes", "--kv-heads", "--positions", "--reps", "--sweep", "--json"):
        assert flag in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit status without CUDA")
def test_without_cuda_it_says_so_and_exits_2(capsys):
    assert kernels.main(["--dtypes", "float16"]) == 2
    assert "needs a CUDA device and an importable triton" in capsys.readouterr().err


def test_kernel_module_keeps_kernels_only():
    for name in ("main", "bench_case", "measure_copy_gbs", "_median_ms", "_sweep_configs", "_print_table"):
        assert not hasattr(td, name), name
    assert kernels.bench_case and kernels.main  # the harness lives here now


def test_every_dtype_name_maps_to_a_kernel_storage_dtype():
    assert set(kernels._DTYPE_NAMES.values()) == set(td.STORAGE_DTYPES)
    assert set(kernels._TARGET_TOK_S) == set(td.STORAGE_DTYPES)
    assert kernels._dtype_name(td.INT4) == "int4"


def test_sweep_configs_are_kernel_configs_of_the_right_path():
    mha = kernels._sweep_configs(torch.int8, 1)
    assert mha and all(isinstance(c, td.KernelConfig) and not c.use_dot and s is None for c, s in mha)
    gqa = kernels._sweep_configs(torch.float32, 4)
    assert gqa and all(c.use_dot for c, _ in gqa)
    assert {c.fp32_precision for c, _ in gqa} == {"ieee", "tf32x3"}


def test_table_shows_ok_and_failed_rows():
    cfg = td.KernelConfig(64, 4, 1, False)._asdict()
    ok = {"dtype": "float16", "hkv": 32, "rel_err": 1e-4, "ok": True, "kernel_ms": 0.05, "eager_ms": None,
          "tok_s_32_layers": 625.0, "target_tok_s": 314, "gb_s": 2700.0, "copy_fraction": 0.6,
          "sdpa_ms": 0.2, "speedup": 4.0, "splits": 8, "config": cfg, "status": "ok"}
    failed = {"dtype": "int8", "hkv": 8, "status": "failed", "reason": "OutOfResources: shared memory"}
    out = io.StringIO()
    kernels._print_table([ok, failed], out=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:3] == ["dtype", "Hkv", "rel"]
    assert lines[1].split()[:4] == ["float16", "32", "1.0e-04", "yes"] and "4.0x" in lines[1]
    assert "rows bn64 w4 s1 splits8" in lines[1]
    assert lines[2].split()[:3] == ["int8", "8", "failed:"]
