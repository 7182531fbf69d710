"""The milestone benchmark: one trial of a streaming KV cache, every figure measured.

    python -m kvcore.bench --num-layers 32 --num-heads 32 --head-dim 128 \\
        --context-length 16384 --dtype float16 --device cuda:0
    python -m kvcore.bench.kernels      # the decode kernel alone, against torch SDPA

From Python: `run_benchmark(BenchConfig(...)) -> BenchResult`; `result.to_dict()` is plain JSON.

The package, one concept per module:
- config: `BenchConfig` (what a trial runs) and its checks, `resolve_device`
- result: `BenchResult` (every figure of a trial)
- timing: the region timer (`measure`), the CUDA-event timer (`median_ms`), copy bandwidth
- probes: host and device memory, NVML, the environment, clean-up between trials
- checks: float64 reference attention and the retrieve checksum, a bounded chunk at a time
- trial: the regions of a trial (fill, append_all, prefill, retrieve, decode, the peers) and
  `run_benchmark`; its docstring says how each figure is measured
- cli: the command line (`python -m kvcore.bench`)
- kernels: the decode kernel's own benchmark (`python -m kvcore.bench.kernels`)
"""

from kvcore.bench.checks import DECODE_TOLERANCE, RETRIEVE_TOLERANCE, chunked_reference
from kvcore.bench.cli import format_table, main, make_parser
from kvcore.bench.config import WEIGHT_DTYPES, BenchConfig, resolve_device
from kvcore.bench.probes import HostPeak, environment, memory_seen, release
from kvcore.bench.result import BenchResult
from kvcore.bench.timing import Measurement, assess, measure, measure_copy_gbps, median_ms, plan_units
from kvcore.bench.trial import decode_step, overhead_bytes, run_benchmark

# The names other modules imported before the package was split (kvcore/model_bench.py).
_parser = make_parser
_HostPeak = HostPeak
_environment = environment
_memory_seen = memory_seen
_release = release

__all__ = [
    "DECODE_TOLERANCE", "RETRIEVE_TOLERANCE", "WEIGHT_DTYPES", "BenchConfig", "BenchResult", "HostPeak",
    "Measurement", "assess", "chunked_reference", "decode_step", "environment", "format_table", "main",
    "make_parser", "measure", "measure_copy_gbps", "median_ms", "memory_seen", "overhead_bytes",
    "plan_units", "release", "resolve_device", "run_benchmark",
]
