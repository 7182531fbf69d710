"""The milestone benchmark: one trial of a streaming KV cache, every figure measured.

    python -m kvcore.bench --num-layers 32 --num-heads 32 --head-dim 128 \\
        --context-length 16384 --dtype float16 --device cuda:0

prints a table (figure, median, min, max, GB/s) and ends with one JSON line of every figure.
From Python: `run_benchmark(BenchConfig(...)) -> BenchResult`; `result.to_dict()` is plain JSON.

A trial, in order (each region warmed up and calibrated first, then timed `repetitions` times,
reported as median, min and max):
1. copy: device-to-device copy of a random buffer (>= 1 GB on a GPU): read + write bytes / s.
   It is the roofline every other bandwidth is compared with. Its buffers are freed before
   the peak-memory counters are reset, so they stay out of the memory figures.
2. The cache is allocated (allocator delta on CUDA, tensor storage on CPU, both next to
   `cache.memory_bytes()`), then the weights tensor (`weights_gb` bytes of random float16).
3. fill: every repetition clears the cache and appends position after position, layer by
   layer (`append`), from empty towards `context_length` (the seed's method, and what a
   decode loop does). append_all: the same, one `append_all` of every layer per position
   (on CUDA a captured write per input pair, all captured before timing). prefill: the same
   through `extend` in chunks of `prefill_chunk`.
4. The cache is filled (untimed) to `context_length` plus a part of the ring, so it is full
   and has wrapped: everything after runs in the steady state of a long decode.
5. retrieve: `get_valid` of layer after layer; every element is read by a matrix-vector
   product with a random vector, whose squared norm goes into an accumulator on the device.
   After the timing, the accumulator must equal the same sum computed from the storage
   (contract of kvcore/cache.py), so a read that skips data invalidates the trial.
6. decode_cache: decode steps (each layer: append one position, attend one query). On CUDA
   with the Triton kernel a step is one replay of a CUDA graph (`kvcore.graphs.DecodeStep`,
   `decode_method` "cuda_graph"), else `append` and `attend` layer by layer
   ("eager_per_layer"). decode: the same plus one matrix-vector product streaming the
   weights (a 7B model's weight traffic). Then the peak memory and NVML's view are taken.
7. baseline_decode: the stock peer a user would pick, run the way it runs best
   (kvcore/peers.py): torch SDPA on a head-major contiguous copy of the same data
   (`[Hkv, S, D]` per layer, transformers' static-cache layout, GQA by `enable_gqa`), every
   layer of a step in one CUDA graph (eagerly on the CPU); float storage in its own dtype,
   8-bit and int4 storage through the 16-bit path in out_dtype (`baseline_kind`,
   `baseline_dtype` say which). `decode_speedup` = decode_cache / baseline. The copy is made
   after the memory figures and freed after the timing; where it does not fit next to the
   cache the peer is skipped (`baseline_skipped_reason`, its figures NaN), never the trial.
   Where flash_attn / flashinfer import, their decode on the same copy is timed too
   (`flash_attn_decode_tok_s`, `flashinfer_decode_tok_s`, attention only; NaN and a reason
   in `optional_peers_reason` otherwise). (Before, the baseline was torch SDPA called layer
   by layer from Python on kvcore's position-major layout, which keeps SDPA off its fast
   kernels: a straw man, dropped.)
8. One more step of each decode path is checked against float64 reference attention,
   computed a bounded chunk of slots at a time (a full float64 copy of a layer at 1M
   positions would be GBs: the benchmark's own overhead stays bounded, see overhead_bytes).

`--regions decode` runs only the copy, the decode regions and the peers (the cache is still
filled and wrapped, untimed): fill, append_all, prefill and retrieve figures are then NaN
(None in JSON, "-" in the table). A kernel-and-peer run at 1M positions takes seconds.

Key decisions:
- Time-boxing: a repetition does enough work to last >= 4 x `min_region_s`, but at most
  `rep_budget_s` where one unit of work allows (a unit: one position for fill/prefill, one
  layer read for retrieve, one step for decode). So a tiny CPU model repeats whole fills many
  times per repetition, while at 16384 positions a slow per-layer fill times only the first N
  positions of a fill from empty (`fill_positions_timed`; an append costs the same at any fill
  level) and a slow decode times fewer than `decode_steps` steps (`decode_steps_timed`).
- Timing: `torch.cuda.synchronize()` around host clocks (`time.perf_counter`), since host
  overhead per call is part of what fill and decode cost. Random data, never zeros.
- `valid` is separate from any verdict (MLPerf's idea): false, with `invalid_reason`, when a
  repetition was shorter than `min_region_s`, repetitions disagree by more than `max_spread`
  (max / min rate), a read/decode check failed, or kv_cache_gb disagrees with the allocator.
- Bandwidth next to every time: fill/prefill count bytes read from the inputs plus bytes
  written to the cache; retrieve and decode count the cache bytes that must be read (decode
  adds the weights). `decode_roofline_frac` = decode_gbps / copy_gbps.
- Memory: CUDA peak = `torch.cuda.max_memory_allocated` after a reset; CPU peak = growth of
  the peak resident set (VmHWM, reset through /proc/self/clear_refs; getrusage otherwise).
  `total_vram_gb` adds, on CUDA, what NVML sees beyond the allocator's pool (CUDA context).
- Clean-up in `finally`: tensors dropped (exception frames cleared too), gc, CUDA cache
  emptied and peak stats reset, so many trials can run in one process. Errors, out-of-memory
  included, propagate unchanged after clean-up.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import resource
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone

import torch

from kvcore.cache import StreamingKVCache
from kvcore.graphs import DecodeStep
from kvcore.peers import PeerSkipped, SdpaPeer, optional_peers
from kvcore.peers import copy_bytes as peer_copy_bytes
from kvcore.storage import STORAGE_DTYPES, dequantize

WEIGHT_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Relative error (max |out - ref| / max |ref|) a decode output may have, by its dtype.
DECODE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 4e-2,
}
# Relative error the retrieve checksum may have, by the dtype get_valid returns.
RETRIEVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
_POOL_POSITIONS = 32  # distinct random positions that fill and decode cycle through
_RANDOM_BLOCK = 1 << 24  # elements of random data tiled into large tensors (weights)


@dataclass(frozen=True)
class BenchConfig:
    """One trial: model shape, cache, weights, and how to time it."""

    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: num_heads (multi-head attention)
    head_dim: int = 128
    context_length: int = 16384  # cache capacity (max_positions) = target context
    dtype: str = "float32"  # cache storage: float32 | float16 | bfloat16 | int8 | float8_e4m3fn | int4
    sink_positions: int = 0
    weights_gb: float = 4.0  # bytes streamed per decode step (7B in Q4_K: 4.0 GB); 0: none
    repetitions: int = 5
    device: str = "cpu"
    decode_steps: int = 16  # steps per repetition, fewer when a step is slower than the budget
    prefill_chunk: int = 256  # positions per `extend` call
    seed: int = 0
    weights_dtype: str = "float16"  # float16 | bfloat16
    rep_budget_s: float = 1.0  # time box of one repetition of one region
    min_region_s: float = 0.005  # floor: a shorter repetition makes the trial invalid
    max_spread: float = 2.0  # max / min rate across repetitions above this: invalid
    copy_gb: float | None = None  # copy buffer; None: 1.0 on CUDA, 0.25 on CPU
    regions: str = "all"  # "all", or "decode": copy, decode and the peers only (fill, append_all,
    # prefill and retrieve skipped: their figures NaN; the cache is still filled, untimed)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, what it got and what fits."""
        for name in ("num_layers", "num_heads", "head_dim", "context_length", "repetitions",
                     "decode_steps", "prefill_chunk"):
            _check_positive_int(name, getattr(self, name))
        if self.num_kv_heads is not None:
            _check_positive_int("num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"num_heads must be a multiple of num_kv_heads, got num_heads="
                    f"{self.num_heads} and num_kv_heads={self.num_kv_heads}; pick a divisor"
                )
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.weights_dtype not in WEIGHT_DTYPES:
            raise ValueError(
                f"weights_dtype must be one of {sorted(WEIGHT_DTYPES)}, got {self.weights_dtype!r}"
            )
        if isinstance(self.sink_positions, bool) or not isinstance(self.sink_positions, int) \
                or not 0 <= self.sink_positions < self.context_length:
            raise ValueError(
                f"sink_positions must be an int in [0, context_length={self.context_length}), "
                f"got {self.sink_positions!r}; typical: 0 or 4"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        _check_number("weights_gb", self.weights_gb, low=0.0, low_ok=True)
        _check_number("rep_budget_s", self.rep_budget_s, low=0.0)
        _check_number("min_region_s", self.min_region_s, low=0.0)
        _check_number("max_spread", self.max_spread, low=1.0)
        if self.copy_gb is not None:
            _check_number("copy_gb", self.copy_gb, low=0.0)
        if self.regions not in ("all", "decode"):
            raise ValueError(f"regions must be 'all' or 'decode', got {self.regions!r}")
        resolve_device(self.device)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_number(name: str, value: object, low: float, low_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (value == low and not low_ok):
        bound = f">= {low}" if low_ok else f"> {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def resolve_device(name: str) -> torch.device:
    """The torch device of a config's device string; ValueError if it is not usable here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {name!r}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available; use 'cpu'")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {name!r}")
    return device


@dataclass(frozen=True)
class BenchResult:
    """Every figure of one trial: plain floats, ints, strings and bools (JSON-able)."""

    # what ran
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    dtype: str
    sink_positions: int
    device: str
    repetitions: int
    attention_backend: str  # what cache.attend ran: "triton" or "torch"
    # fill: append layer by layer, from an empty cache
    fill_rate_pos_s: float
    fill_rate_pos_s_min: float
    fill_rate_pos_s_max: float
    fill_gbps: float
    fill_positions_timed: int  # positions per repetition
    # append_all: one position of every layer per call, from an empty cache
    append_all_rate_pos_s: float
    append_all_rate_pos_s_min: float
    append_all_rate_pos_s_max: float
    append_all_gbps: float
    append_all_positions_timed: int
    # prefill: extend in chunks
    prefill_rate_pos_s: float
    prefill_rate_pos_s_min: float
    prefill_rate_pos_s_max: float
    prefill_gbps: float
    prefill_positions_timed: int
    prefill_chunk: int
    # retrieve: get_valid, every element read
    retrieve_rate_ops_s: float
    retrieve_rate_ops_s_min: float
    retrieve_rate_ops_s_max: float
    retrieve_gbps: float
    retrieve_layers_timed: int  # layer reads per repetition
    retrieve_check_ok: bool
    retrieve_check_err: float  # relative error of the accumulated checksum
    # decode: per step, each layer appends one position and attends one query (+ weights)
    decode_tok_s: float
    decode_tok_s_min: float
    decode_tok_s_max: float
    decode_gbps: float
    decode_steps_timed: int
    decode_method: str  # how decode/decode_cache steps ran: "cuda_graph" | "eager_per_layer"
    decode_kernel_configs: str  # JSON: the Triton decode configs the autotuner picked ("" on torch)
    decode_cache_tok_s: float
    decode_cache_tok_s_min: float
    decode_cache_tok_s_max: float
    decode_cache_gbps: float
    decode_cache_steps_timed: int
    baseline_decode_tok_s: float
    baseline_decode_tok_s_min: float
    baseline_decode_tok_s_max: float
    baseline_decode_gbps: float
    baseline_decode_steps_timed: int
    baseline_method: str  # how baseline steps ran: "cuda_graph" | "eager" | "skipped"
    baseline_kind: str  # the peer: "sdpa_head_major_graph" | "sdpa_head_major_eager"
    baseline_dtype: str  # what the peer computes in (16-bit for 8-bit / int4 storage)
    baseline_skipped_reason: str  # "" when the peer ran
    flash_attn_decode_tok_s: float  # flash_attn_with_kvcache on the peer's copy; NaN: absent
    flashinfer_decode_tok_s: float  # flashinfer single decode on the peer's copy; NaN: absent
    optional_peers_reason: str  # why an optional peer has no figure
    decode_speedup: float  # decode_cache_tok_s / baseline_decode_tok_s
    decode_roofline_frac: float  # decode_gbps / copy_gbps
    decode_cache_roofline_frac: float  # decode_cache_gbps / copy_gbps
    decode_check_ok: bool
    decode_check_err: float  # max |out - ref| / max |ref| against float64
    baseline_check_ok: bool
    baseline_check_err: float
    # copy roofline
    copy_gbps: float
    copy_gbps_min: float
    copy_gbps_max: float
    copy_gb: float  # buffer size
    # memory
    kv_cache_gb: float  # cache.memory_bytes() / 1e9
    kv_cache_measured_gb: float
    kv_cache_measured_source: str  # "allocator" (CUDA delta) | "storage" (tensor storages)
    kv_cache_ok: bool
    weights_gb: float  # bytes of the weights tensor actually held / 1e9
    weights_dtype: str
    peak_mem_gb: float
    peak_mem_source: str  # "cuda_allocator" | "vmhwm" | "rusage"
    nvml_used_gb: float  # 0.0 when nvml_source is "unavailable"
    nvml_source: str  # "process" | "device" | "unavailable"
    cuda_context_gb: float  # memory NVML sees beyond the allocator's pool (0.0 on CPU)
    total_vram_gb: float
    # validity
    valid: bool
    invalid_reason: str
    # environment
    device_name: str
    device_total_gb: float
    driver_version: str
    cuda_version: str
    torch_version: str
    hostname: str
    gpu_uuid: str
    date_utc: str
    wall_s: float

    def to_dict(self) -> dict[str, float | int | str | bool | None]:
        """Plain JSON values; a figure that was not measured (NaN: a skipped peer) is None."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in asdict(self).items()}


# ---------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Measurement:
    """A timed region: `units` of work per repetition, the seconds of each repetition."""

    name: str
    units: int
    seconds: tuple[float, ...]

    def rates(self) -> list[float]:
        return [self.units / s for s in self.seconds]

    def summary(self) -> tuple[float, float, float]:
        """(median, min, max) of the rate in units per second."""
        rates = self.rates()
        return statistics.median(rates), min(rates), max(rates)


def plan_units(unit_s: float, want: int, target_s: float, budget_s: float) -> int:
    """Units of work for one repetition: at least `want` and enough to last target_s, but
    no more than fit in budget_s (at least one)."""
    unit_s = max(unit_s, 1e-9)
    n = max(want, math.ceil(target_s / unit_s))
    return max(1, min(n, math.floor(budget_s / unit_s)))


def assess(measurements: list[Measurement], min_region_s: float, max_spread: float) -> list[str]:
    """Reasons the measurements are not trustworthy (empty: valid)."""
    reasons = []
    for m in measurements:
        shortest = min(m.seconds)
        if shortest < min_region_s:
            reasons.append(
                f"{m.name}: a repetition lasted {shortest * 1e3:.3g} ms, below the "
                f"{min_region_s * 1e3:.3g} ms floor"
            )
        _, low, high = m.summary()
        if len(m.seconds) > 1 and high > max_spread * low:
            reasons.append(
                f"{m.name}: repetitions spread {high / low:.2f}x (max/min rate), above "
                f"{max_spread:.2f}x"
            )
    return reasons


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds fn takes, the device synchronized before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(name: str, seconds_of: Callable[[int], float], want: int, target_s: float,
            budget_s: float, repetitions: int, first: int = 1,
            round_units: Callable[[int], int] = lambda n: n) -> Measurement:
    """Warm up, calibrate and time a region; seconds_of(n) does n units of work and returns
    the seconds they took (synchronized). Units per repetition: `plan_units`, then
    `round_units`. If the first repetition misses target_s by far (the calibration caught a
    stall), the plan is redone from it, at most three times; those runs are not reported."""
    n, enough = first, min(target_s, budget_s) / 4
    seconds = seconds_of(n)  # warm-up: lazy initialisation, allocator, caches
    while seconds < 2 * budget_s:  # a unit far over the budget needs no calibration
        seconds = seconds_of(n)
        if seconds >= enough or n >= 1 << 24:
            break
        n = max(2 * n, math.ceil(n * enough / max(seconds, 1e-9)))
    n = round_units(plan_units(seconds / n, want, target_s, budget_s))
    seconds = seconds_of(n)
    for _ in range(3):
        again = round_units(plan_units(seconds / n, want, target_s, budget_s))
        if seconds >= target_s / 2 or again <= n:
            break
        n, seconds = again, seconds_of(again)
    return Measurement(name, n, (seconds,) + tuple(seconds_of(n) for _ in range(repetitions - 1)))


# ---------------------------------------------------------------------- memory


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_host_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim), so that the
    resident set holds only live data and a trial's allocations grow it again, even in a
    process that already freed memory (a long test session, a reused worker)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the live-tensor floor below still holds


class _HostPeak:
    """Peak host memory of a CPU trial: the growth of this process's resident set since
    `reset` (after the heap was trimmed), never less than the bytes of the tensors the trial
    holds at once (`floor`). The floor makes the figure independent of what ran before in
    the same process: freed pages that the allocator reuses do not grow the resident set."""

    def reset(self) -> None:
        _trim_host_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            self.source = "vmhwm" if _proc_status_kb("VmHWM") is not None else "rusage"
        except OSError:
            self.source = "rusage"
        rss = _proc_status_kb("VmRSS")
        if rss is None:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.start_kb = rss
        self.floor = 0

    def hold(self, tensors: list[torch.Tensor | None]) -> None:
        """The trial holds these tensors at the same time: the peak is at least their bytes."""
        self.floor = max(self.floor, _storage_bytes(tensors))

    def growth_bytes(self) -> tuple[int, str]:
        """(peak bytes, source): the resident-set growth, or the live-tensor floor when larger."""
        peak = _proc_status_kb("VmHWM") if self.source == "vmhwm" else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        grown = max(0, peak - self.start_kb) * 1024
        if grown >= self.floor:
            return grown, self.source
        return self.floor, "live_tensors"


def _storage_bytes(tensors: list[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind tensors (views of one allocation count once)."""
    storages = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _nvml(device: torch.device) -> dict[str, object]:
    """What NVML says about this process / the device; a guarded, lazy import."""
    info: dict[str, object] = {"nvml_used_gb": 0.0, "nvml_source": "unavailable",
                               "driver_version": "", "gpu_uuid": ""}
    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid and not uuid.startswith("GPU-"):
        uuid = "GPU-" + uuid
    info["gpu_uuid"] = uuid
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver, no permission: say so in nvml_source
        return info
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        info["driver_version"] = driver.decode() if isinstance(driver, bytes) else str(driver)
        handle = (pynvml.nvmlDeviceGetHandleByUUID(uuid) if uuid
                  else pynvml.nvmlDeviceGetHandleByIndex(device.index))
        used = None
        try:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    used = proc.usedGpuMemory
        except pynvml.NVMLError:
            pass
        if used is not None:
            info["nvml_used_gb"], info["nvml_source"] = used / 1e9, "process"
        else:  # containers often hide per-process figures: the whole device instead
            info["nvml_used_gb"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 1e9
            info["nvml_source"] = "device"
    except Exception:
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return info


def _environment(device: torch.device) -> dict[str, object]:
    env: dict[str, object] = {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "hostname": socket.gethostname(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["device_total_gb"] = props.total_memory / 1e9
        return env
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
    except OSError:
        pass
    env["device_name"] = name
    env["device_total_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return env


# ---------------------------------------------------------------------- work


def _random(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
            gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _random_weights(nbytes: int, cols: int, dtype: torch.dtype, device: torch.device,
                    gen: torch.Generator) -> torch.Tensor:
    """A [rows, cols] tensor of about nbytes, random data tiled from one block."""
    rows = max(1, round(nbytes / (cols * torch.finfo(dtype).bits // 8)))
    weights = torch.empty((rows, cols), dtype=dtype, device=device)
    flat = weights.view(-1)
    block = _random((min(flat.numel(), _RANDOM_BLOCK),), dtype, device, gen)
    for start in range(0, flat.numel(), block.numel()):
        part = flat[start : start + block.numel()]
        part.copy_(block[: part.numel()])
    return weights


def decode_step(cache: StreamingKVCache, keys: list[torch.Tensor], values: list[torch.Tensor],
                queries: list[torch.Tensor]) -> list[torch.Tensor]:
    """One decode step on every layer: append keys[l]/values[l], attend queries[l]."""
    append, attend = cache.append, cache.attend
    outputs = []
    for layer, (k, v, q) in enumerate(zip(keys, values, queries)):
        append(layer, k, v)
        outputs.append(attend(layer, q))  # [num_heads, head_dim]
    return outputs


_CHECK_CHUNK_BYTES = 64 << 20  # float64 rows per chunk of the checks: bounded overhead


def _check_chunk(cache: StreamingKVCache) -> int:
    """Slots per chunk of the float64 checks (~64 MB of float64 per K or V chunk)."""
    return max(1, _CHECK_CHUNK_BYTES // (8 * cache.num_kv_heads * cache.head_dim))


def _layer_values(cache: StreamingKVCache, layer: int, half: int, dtype: torch.dtype,
                  a: int = 0, b: int | None = None) -> torch.Tensor:
    """Slots [a, b) (default: the valid prefix) of one layer's K (half 0) or V (half 1),
    dequantized, in dtype."""
    store = (cache.k_store, cache.v_store)[half][layer]
    scale = (cache.k_scale, cache.v_scale)[half]
    b = min(cache.total_appended, cache.max_positions) if b is None else b
    if scale is None:
        return store[a:b].to(dtype)
    return dequantize(store[a:b], scale[layer, a:b], dtype, cache.head_dim)


def chunked_reference(query: torch.Tensor, read: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
                      n: int, chunk: int, sm_scale: float) -> torch.Tensor:
    """float64 attention of query [H, D] over n slots, read `chunk` at a time as
    read(a, b) -> (keys, values) [b - a, Hkv, D] -> [H, D] float64 (an online softmax: the
    temporaries are one chunk, whatever n is)."""
    H, D = query.shape
    q = query.double()
    m = torch.full((H,), -math.inf, dtype=torch.float64, device=query.device)
    total = torch.zeros(H, dtype=torch.float64, device=query.device)
    acc = torch.zeros(H, D, dtype=torch.float64, device=query.device)
    for a in range(0, n, chunk):
        k, v = read(a, min(n, a + chunk))  # [c, Hkv, D]
        Hkv = k.shape[1]
        qg = q.view(Hkv, H // Hkv, D)  # query head h uses KV head h // group
        scores = torch.einsum("kgd,ckd->kgc", qg, k.double()).reshape(H, -1) * sm_scale  # [H, c]
        m_new = torch.maximum(m, scores.amax(dim=1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(scores - m_new[:, None])
        total = total * alpha + p.sum(dim=1)
        pv = torch.einsum("kgc,ckd->kgd", p.view(Hkv, H // Hkv, -1), v.double())
        acc = acc * alpha[:, None] + pv.reshape(H, D)
        m = m_new
    return acc / total[:, None]


def _read_norm2(x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """||x.reshape(-1, D) @ probe||^2 as a float32 scalar on the device: reads every element."""
    return torch.linalg.vector_norm(torch.mv(x.reshape(-1, probe.numel()), probe),
                                    dtype=torch.float32).square()


def _expected_norm2(cache: StreamingKVCache, layer: int, probe: torch.Tensor) -> float:
    """What _read_norm2 of get_valid(layer) must give, computed from the storage (a chunk of
    slots at a time)."""
    total = 0.0
    n, chunk = len(cache), _check_chunk(cache)
    for half in (0, 1):
        for a in range(0, n, chunk):
            x = _layer_values(cache, layer, half, cache.out_dtype, a, min(n, a + chunk)).float()
            y = torch.mv(x.reshape(-1, probe.numel()), probe.float())
            total += float(y.double().square().sum())
    return total


def _decode_error(cache: StreamingKVCache, outputs: torch.Tensor | list[torch.Tensor],
                  queries: list[torch.Tensor]) -> float:
    """Worst relative error of a step's outputs (indexed by layer) on the first and last layer
    vs float64."""
    worst = 0.0
    n = min(cache.total_appended, cache.max_positions)
    for layer in sorted({0, cache.num_layers - 1}):
        def read(a: int, b: int, layer: int = layer) -> tuple[torch.Tensor, torch.Tensor]:
            return (_layer_values(cache, layer, 0, torch.float64, a, b),
                    _layer_values(cache, layer, 1, torch.float64, a, b))

        ref = chunked_reference(queries[layer], read, n, _check_chunk(cache), cache.sm_scale)
        err = (outputs[layer].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
        worst = max(worst, float(err))
    return worst


def _peer_error(cache: StreamingKVCache, peer: SdpaPeer, outputs: torch.Tensor,
                queries: list[torch.Tensor]) -> float:
    """Worst relative error of the peer's step outputs [L, H, D] on the first and last layer
    against float64 attention over the peer's own copy (a chunk at a time)."""
    worst = 0.0
    for layer in sorted({0, cache.num_layers - 1}):
        k, v = peer.keys_values(layer)  # [S, Hkv, D]
        ref = chunked_reference(queries[layer], lambda a, b: (k[a:b], v[a:b]), peer.n,
                                _check_chunk(cache), cache.sm_scale)
        err = (outputs[layer].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
        worst = max(worst, float(err))
    return worst


def overhead_bytes(num_layers: int, context_length: int, num_heads: int, num_kv_heads: int,
                   head_dim: int, dtype: str, prefill_chunk: int = BenchConfig.prefill_chunk) -> int:
    """Device memory the benchmark itself holds at most next to the cache and the weights
    (the peer's copy excluded: it is skipped where it does not fit; the copy region's buffers
    are freed before the cache exists): one layer's K and V read back by get_valid in the
    dtype reads return (a copy once the ring has wrapped, or dequantized), the float64 check
    chunks (K, V, scores, their float32 and float64 temporaries), the input pools, the prefill
    chunk and the decode step's buffers, and 256 MB for kernels' buffers and the allocator's
    rounding. Orchestrator capacity adds it to a trial's need, so a trial that cannot fit is
    skipped before it allocates."""
    out_bytes = 4 if dtype == "float32" else 2  # quantized storage reads back in float16
    layer_read = 2 * context_length * num_kv_heads * head_dim * out_bytes
    check = 8 * min(_CHECK_CHUNK_BYTES, context_length * num_kv_heads * head_dim * 8)  # float64 chunks of a layer
    pools = 2 * (_POOL_POSITIONS + prefill_chunk + 4) * num_layers * num_heads * head_dim * out_bytes
    return layer_read + check + pools + (256 << 20)


def _copy_measurement(cfg: BenchConfig, device: torch.device, gen: torch.Generator,
                      target_s: float) -> tuple[Measurement, int]:
    gb = cfg.copy_gb if cfg.copy_gb is not None else (1.0 if device.type == "cuda" else 0.25)
    src = _random((max(1, int(gb * 1e9) // 4),), torch.float32, device, gen)
    dst = torch.empty_like(src)

    def run(n: int) -> None:
        for _ in range(n):
            dst.copy_(src)

    m = measure("copy", lambda n: _timed(device, lambda: run(n)), 1, target_s, cfg.rep_budget_s,
                cfg.repetitions)
    return m, src.nbytes


def measure_copy_gbps(device: torch.device | str, gb: float | None = None, repetitions: int = 5,
                      rep_budget_s: float = 1.0, seed: int = 0) -> tuple[float, float, float]:
    """The trial's copy probe on its own: device-to-device copy bandwidth, read + write bytes
    per second, as (median, min, max) GB/s (for other benchmarks' rooflines)."""
    device = resolve_device(str(device))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    cfg = BenchConfig(device=str(device), copy_gb=gb, repetitions=repetitions,
                      rep_budget_s=rep_budget_s, seed=seed)
    m, nbytes = _copy_measurement(cfg, device, gen, 4 * cfg.min_region_s)
    median, low, high = m.summary()
    result = (median * 2 * nbytes / 1e9, low * 2 * nbytes / 1e9, high * 2 * nbytes / 1e9)
    del m
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


class _Trial:
    """What the regions of one trial share: the cache, its random inputs, the weights, and
    the position counter (fill, decode and the checks all append from the same pool)."""

    def __init__(self, cfg: BenchConfig, device: torch.device, gen: torch.Generator,
                 cache: StreamingKVCache) -> None:
        self.cfg, self.device, self.gen, self.cache = cfg, device, gen, cache
        self.target_s, self.budget_s = 4 * cfg.min_region_s, cfg.rep_budget_s
        L, H, D = cfg.num_layers, cfg.num_heads, cfg.head_dim
        Hkv, P = cache.num_kv_heads, cfg.context_length
        self.dtype = cache.out_dtype  # what append/extend/attend take
        self.weights = None
        if cfg.weights_gb > 0:
            wdtype = WEIGHT_DTYPES[cfg.weights_dtype]
            self.weights = _random_weights(int(cfg.weights_gb * 1e9), H * D, wdtype, device, gen)
            self.w_in = _random((H * D,), wdtype, device, gen)  # [H*D]
            self.w_out = torch.empty(self.weights.shape[0], dtype=wdtype, device=device)
        self.npool = min(_POOL_POSITIONS, P)
        pool_k = _random((self.npool, L, Hkv, D), self.dtype, device, gen)
        pool_v = _random((self.npool, L, Hkv, D), self.dtype, device, gen)
        self.pool_k, self.pool_v = pool_k, pool_v  # [npool, L, Hkv, D]: append_all, graph steps
        self.pos_k = [list(k.unbind(0)) for k in pool_k]  # [npool][L] of [Hkv, D]
        self.pos_v = [list(v.unbind(0)) for v in pool_v]
        self.queries = list(_random((L, H, D), self.dtype, device, gen).unbind(0))  # L x [H, D]
        # Decode steps: one CUDA graph per step where it can run, else layer by layer.
        self.step = None
        if device.type == "cuda" and cache.attention_backend == "triton":
            self.step = DecodeStep(cache, graph=True)
            self.step.queries.copy_(torch.stack(self.queries))
        self.decode_method = "eager_per_layer" if self.step is None else self.step.method
        self.in_bytes_per_pos = 2 * L * Hkv * D * pool_k.element_size()  # K and V, all layers
        self.chunk = min(cfg.prefill_chunk, P - cfg.sink_positions)
        self.src_k = _random((L, self.chunk, Hkv, D), self.dtype, device, gen)
        self.src_v = _random((L, self.chunk, Hkv, D), self.dtype, device, gen)
        self.tails: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.counter = 0  # positions appended one by one so far

    def measure(self, name: str, seconds_of: Callable[[int], float], want: int,
                **kwargs) -> Measurement:
        return measure(name, seconds_of, want, self.target_s, self.budget_s,
                       self.cfg.repetitions, **kwargs)

    def timed(self, run: Callable[[int], object]) -> Callable[[int], float]:
        return lambda n: _timed(self.device, lambda: run(n))

    # ------------------------------------------------------------------ fill and prefill

    def append_positions(self, n: int) -> None:
        """n positions, each appended layer by layer as a decode loop does."""
        append, pos_k, pos_v, npool = self.cache.append, self.pos_k, self.pos_v, self.npool
        for p in range(self.counter, self.counter + n):
            for layer, (k, v) in enumerate(zip(pos_k[p % npool], pos_v[p % npool])):
                append(layer, k, v)
        self.counter += n

    def append_all_positions(self, n: int) -> None:
        """n positions, each through one append_all of every layer."""
        append_all, pool_k, pool_v, npool = self.cache.append_all, self.pool_k, self.pool_v, self.npool
        for p in range(self.counter, self.counter + n):
            append_all(pool_k[p % npool], pool_v[p % npool])
        self.counter += n

    def extend_positions(self, n: int) -> None:
        """n positions through extend: whole chunks, then the tail made by make_tail."""
        extend = self.cache.extend
        for _ in range(n // self.chunk):
            extend(self.src_k, self.src_v)
        if n % self.chunk:
            extend(*self.tails[n % self.chunk])

    def make_tail(self, n: int) -> None:
        """The last, shorter chunk of an n-position fill, made before the fill is timed."""
        m = n % self.chunk
        if m and m not in self.tails:  # contiguous, like a model's chunk
            self.tails[m] = (self.src_k[:, :m].contiguous(), self.src_v[:, :m].contiguous())

    def fills(self, write: Callable[[int], object], n: int,
              prepare: Callable[[int], object] = lambda m: None) -> float:
        """Seconds of n positions written from an empty cache, clearing every P positions."""
        seconds, P = 0.0, self.cfg.context_length
        while n > 0:
            m = min(n, P)
            self.cache.clear()
            prepare(m)
            seconds += _timed(self.device, lambda: write(m))
            n -= m
        return seconds

    def measure_fill(self) -> Measurement:
        P = self.cfg.context_length
        return self.measure("fill", lambda n: self.fills(self.append_positions, n), P,
                            round_units=lambda n: _whole_fills(n, P, 1))

    def measure_append_all(self) -> Measurement:
        P = self.cfg.context_length
        # CUDA captures one write graph per input pair: capture them all before timing
        self.fills(self.append_all_positions, min(self.npool, P))
        return self.measure("append_all", lambda n: self.fills(self.append_all_positions, n), P,
                            round_units=lambda n: _whole_fills(n, P, 1))

    def measure_prefill(self) -> Measurement:
        P, chunk = self.cfg.context_length, self.chunk
        return self.measure(
            "prefill", lambda n: self.fills(self.extend_positions, n, self.make_tail), P,
            first=chunk, round_units=lambda n: _whole_fills(n, P, chunk))

    def settle(self) -> None:
        """Fill to capacity and wrap the ring (untimed): the steady state of a long decode.
        Each chunk is scaled by its own random factor, so no two blocks of the ring repeat."""
        cache, chunk, P = self.cache, self.chunk, self.cfg.context_length
        total = P + max(1, min(chunk, (P - self.cfg.sink_positions) // 2))
        scales = torch.rand((total // chunk + 1, 2), generator=self.gen, device=self.device)
        scales = (scales + 0.5).to(self.dtype)
        cache.clear()
        for i, start in enumerate(range(0, total, chunk)):
            n = min(chunk, total - start)
            cache.extend((self.src_k[:, :n] * scales[i, 0]).contiguous(),
                         (self.src_v[:, :n] * scales[i, 1]).contiguous())
        self.src_k = self.src_v = None  # the prefill sources are not needed any more
        self.tails.clear()
        assert len(cache) == P and cache.total_appended > P, "steady state not reached"

    # ------------------------------------------------------------------ retrieve

    def measure_retrieve(self) -> tuple[Measurement, int, float]:
        """get_valid of layer after layer, every element read into a checksum on the device.
        Returns the measurement in ops ((valid positions x layers) per repetition), the layer
        reads per repetition, and the checksum's relative error against the storage."""
        cache, L, P = self.cache, self.cfg.num_layers, self.cfg.context_length
        probe = _random((self.cfg.head_dim,), self.dtype, self.device, self.gen)
        acc = torch.zeros((), dtype=torch.float64, device=self.device)

        def read_layers(n: int) -> None:
            for i in range(n):
                k, v = cache.get_valid(i % L)
                acc.add_(_read_norm2(k, probe))
                acc.add_(_read_norm2(v, probe))

        def timed_reads(n: int) -> float:
            acc.zero_()  # the last call's sum is checked
            return _timed(self.device, lambda: read_layers(n))

        layer_reads = self.measure("retrieve", timed_reads, L)
        reads = layer_reads.units
        per_layer = [reads // L + (layer < reads % L) for layer in range(L)]
        expected = sum(count * _expected_norm2(cache, layer, probe)
                       for layer, count in enumerate(per_layer) if count)
        error = abs(float(acc) - expected) / max(expected, 1e-30)
        return replace(layer_reads, units=reads * P), reads, error

    # ------------------------------------------------------------------ decode

    def one_step(self, graph: bool) -> torch.Tensor | list[torch.Tensor]:
        """One decode step from the pool: the captured step (graph; its outputs [L, H, D]) or
        layer by layer (a list of L outputs [H, D]). Either is indexed by layer."""
        p = self.counter % self.npool
        self.counter += 1
        if graph:
            return self.step(self.pool_k[p], self.pool_v[p])
        return decode_step(self.cache, self.pos_k[p], self.pos_v[p], self.queries)

    def decode_steps(self, n: int, with_weights: bool, graph: bool) -> None:
        for _ in range(n):
            self.one_step(graph)
            if with_weights and self.weights is not None:
                torch.mv(self.weights, self.w_in, out=self.w_out)  # [rows]

    def measure_decode(self, name: str, with_weights: bool, graph: bool) -> Measurement:
        return self.measure(name, self.timed(lambda n: self.decode_steps(n, with_weights, graph)),
                            self.cfg.decode_steps)

    def checked_step(self, graph: bool) -> float:
        """One more decode step; its outputs' error against float64 reference attention."""
        return _decode_error(self.cache, self.one_step(graph), self.queries)


def _memory_seen(device: torch.device, host_peak: _HostPeak) -> dict[str, object]:
    """Peak memory since the reset, NVML's view, and the CUDA context beyond the pool."""
    if device.type != "cuda":
        peak, source = host_peak.growth_bytes()
        return {"peak": peak, "peak_source": source,
                "context": 0.0, "nvml_used_gb": 0.0, "nvml_source": "unavailable",
                "driver_version": "", "gpu_uuid": ""}
    _sync(device)
    seen = _nvml(device)
    if seen["nvml_source"] != "unavailable":
        used = seen["nvml_used_gb"] * 1e9
    else:  # the driver's view of the whole device, through torch
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
    return {**seen, "peak": torch.cuda.max_memory_allocated(device),
            "peak_source": "cuda_allocator",
            "context": max(0.0, used - torch.cuda.memory_reserved(device))}


def _run(cfg: BenchConfig, device: torch.device) -> BenchResult:
    wall_start = time.perf_counter()
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    copy, copy_bytes = _copy_measurement(cfg, device, gen, 4 * cfg.min_region_s)

    gc.collect()  # the copy buffers are gone: the memory figures start here
    host_peak = _HostPeak()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        host_peak.reset()
    cache = StreamingKVCache(num_layers=cfg.num_layers, max_positions=cfg.context_length,
                             num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                             num_kv_heads=cfg.num_kv_heads, dtype=cfg.dtype,
                             device=str(device), sink_positions=cfg.sink_positions)
    cache_bytes = cache.memory_bytes()
    if device.type == "cuda":
        measured, measured_source = torch.cuda.memory_allocated(device) - before, "allocator"
    else:
        measured = _storage_bytes([cache.k_store, cache.v_store, cache.k_scale, cache.v_scale])
        measured_source = "storage"
    kv_ok = abs(measured - cache_bytes) <= max(1 << 20, 1e-3 * cache_bytes)

    trial = _Trial(cfg, device, gen, cache)
    if device.type != "cuda":
        host_peak.hold([cache.k_store, cache.v_store, cache.k_scale, cache.v_scale, trial.weights,
                        trial.pool_k, trial.pool_v, trial.src_k, trial.src_v, *trial.queries])
    decode_only = cfg.regions == "decode"
    fill = None if decode_only else trial.measure_fill()
    append_all = None if decode_only else trial.measure_append_all()
    prefill = None if decode_only else trial.measure_prefill()
    trial.settle()
    if decode_only:  # not measured: NaN figures, no check to fail
        retrieve, reads, retrieve_err = None, 0, 0.0
    else:
        retrieve, reads, retrieve_err = trial.measure_retrieve()
    graph = trial.step is not None
    decode_cache = trial.measure_decode("decode_cache", with_weights=False, graph=graph)
    decode = trial.measure_decode("decode", with_weights=True, graph=graph)
    memory = _memory_seen(device, host_peak)  # before the baseline: our path's footprint
    decode_err = trial.checked_step(graph)
    kernel_configs = ""
    if cache.attention_backend == "triton":
        from kvcore.triton_decode import tuned_configs

        kernel_configs = json.dumps(tuned_configs(), sort_keys=True)
    peers = measure_peers(trial)
    baseline, baseline_err = peers["baseline"], peers["baseline_err"]

    measurements = [m for m in (copy, fill, append_all, prefill, retrieve, decode_cache, decode)
                    if m is not None]
    measurements += [m for m in (baseline, peers["flash_attn"], peers["flashinfer"]) if m is not None]
    reasons = assess(measurements, cfg.min_region_s, cfg.max_spread)
    retrieve_ok = retrieve_err <= RETRIEVE_TOLERANCE[trial.dtype]
    if not retrieve_ok:
        reasons.append(f"retrieve: checksum off by {retrieve_err:.3g} (relative), so get_valid "
                       "did not return the stored data")
    tolerance = DECODE_TOLERANCE[trial.dtype]
    for name, err in (("decode", decode_err), ("baseline_decode", baseline_err)):
        if not err <= tolerance and not (name == "baseline_decode" and baseline is None):
            reasons.append(f"{name}: output off float64 reference by {err:.3g} > {tolerance:g}")
    if not kv_ok:
        reasons.append(f"kv_cache_gb {cache_bytes / 1e9:.6g} differs from the {measured_source} "
                       f"figure {measured / 1e9:.6g}")

    rate = {m.name: m.summary() for m in measurements}  # (median, min, max) per second
    nan = (math.nan, math.nan, math.nan)
    for name in ("baseline_decode", "flash_attn_decode", "flashinfer_decode", "fill", "append_all",
                 "prefill", "retrieve"):
        rate.setdefault(name, nan)
    L, P = cfg.num_layers, cfg.context_length
    weight_bytes = 0 if trial.weights is None else trial.weights.nbytes
    write_bytes = trial.in_bytes_per_pos + cache_bytes / P  # per position, fill and prefill
    copy_gbps = [r * 2 * copy_bytes / 1e9 for r in rate["copy"]]
    decode_gbps = rate["decode"][0] * (cache_bytes + weight_bytes) / 1e9
    decode_cache_gbps = rate["decode_cache"][0] * cache_bytes / 1e9
    return BenchResult(
        num_layers=L, num_heads=cfg.num_heads, num_kv_heads=cache.num_kv_heads,
        head_dim=cfg.head_dim, context_length=P, dtype=cfg.dtype,
        sink_positions=cfg.sink_positions, device=str(device), repetitions=cfg.repetitions,
        attention_backend=cache.attention_backend,
        **_triple("fill_rate_pos_s", rate["fill"]),
        fill_gbps=rate["fill"][0] * write_bytes / 1e9, fill_positions_timed=0 if fill is None else fill.units,
        **_triple("append_all_rate_pos_s", rate["append_all"]),
        append_all_gbps=rate["append_all"][0] * write_bytes / 1e9,
        append_all_positions_timed=0 if append_all is None else append_all.units,
        **_triple("prefill_rate_pos_s", rate["prefill"]),
        prefill_gbps=rate["prefill"][0] * write_bytes / 1e9,
        prefill_positions_timed=0 if prefill is None else prefill.units, prefill_chunk=trial.chunk,
        **_triple("retrieve_rate_ops_s", rate["retrieve"]),
        retrieve_gbps=rate["retrieve"][0] * cache_bytes / (L * P) / 1e9,
        retrieve_layers_timed=reads, retrieve_check_ok=retrieve_ok,
        retrieve_check_err=retrieve_err,
        **_triple("decode_tok_s", rate["decode"]),
        decode_gbps=decode_gbps, decode_steps_timed=decode.units,
        decode_method=trial.decode_method, decode_kernel_configs=kernel_configs,
        **_triple("decode_cache_tok_s", rate["decode_cache"]),
        decode_cache_gbps=decode_cache_gbps, decode_cache_steps_timed=decode_cache.units,
        **_triple("baseline_decode_tok_s", rate["baseline_decode"]),
        baseline_decode_gbps=rate["baseline_decode"][0] * peer_copy_bytes(cache) / 1e9,
        baseline_decode_steps_timed=0 if baseline is None else baseline.units,
        baseline_method=peers["method"], baseline_kind=peers["kind"],
        baseline_dtype=peers["dtype"], baseline_skipped_reason=peers["skipped"],
        flash_attn_decode_tok_s=rate["flash_attn_decode"][0],
        flashinfer_decode_tok_s=rate["flashinfer_decode"][0],
        optional_peers_reason=peers["optional_reason"],
        decode_speedup=rate["decode_cache"][0] / rate["baseline_decode"][0],
        decode_roofline_frac=decode_gbps / copy_gbps[0],
        decode_cache_roofline_frac=decode_cache_gbps / copy_gbps[0],
        decode_check_ok=decode_err <= tolerance, decode_check_err=decode_err,
        baseline_check_ok=bool(baseline_err <= tolerance), baseline_check_err=baseline_err,
        **_triple("copy_gbps", copy_gbps), copy_gb=copy_bytes / 1e9,
        kv_cache_gb=cache_bytes / 1e9, kv_cache_measured_gb=measured / 1e9,
        kv_cache_measured_source=measured_source, kv_cache_ok=kv_ok,
        weights_gb=weight_bytes / 1e9, weights_dtype=cfg.weights_dtype,
        peak_mem_gb=memory["peak"] / 1e9, peak_mem_source=str(memory["peak_source"]),
        nvml_used_gb=float(memory["nvml_used_gb"]), nvml_source=str(memory["nvml_source"]),
        cuda_context_gb=memory["context"] / 1e9,
        total_vram_gb=(memory["peak"] + memory["context"]) / 1e9,
        valid=not reasons, invalid_reason="; ".join(reasons),
        driver_version=str(memory["driver_version"]), gpu_uuid=str(memory["gpu_uuid"]),
        **_environment(device),
        wall_s=time.perf_counter() - wall_start,
    )


def measure_peers(trial: "_Trial") -> dict[str, object]:
    """Time the stock peer (kvcore/peers.py) on a copy of the trial's cache, check one of its
    steps against float64, then time the optional peers on the same copy; frees the copy.
    Returns the measurements (None where a peer did not run), the check's error (NaN when
    skipped) and the labels of BenchResult's baseline fields."""
    cache, cfg = trial.cache, trial.cfg
    queries = torch.stack(trial.queries)  # [L, H, D]
    peer = SdpaPeer.build(cache, queries)
    result: dict[str, object] = {"baseline": None, "baseline_err": math.nan, "flash_attn": None,
                                 "flashinfer": None, "kind": peer.kind,
                                 "dtype": str(trial.dtype).removeprefix("torch."), "skipped": "",
                                 "method": "skipped", "optional_reason": ""}
    if isinstance(peer, PeerSkipped):
        result["skipped"] = peer.reason
        result["optional_reason"] = "no copy for the peers: " + peer.reason
        return result
    try:
        result["method"] = "cuda_graph" if peer.graph is not None else "eager"
        result["baseline"] = trial.measure("baseline_decode", trial.timed(peer.steps), cfg.decode_steps)
        result["baseline_err"] = _peer_error(cache, peer, peer.step().clone(), trial.queries)
        reasons = []
        for name, run in optional_peers(peer).items():
            if isinstance(run, str):
                reasons.append(f"{name}: {run}")
                continue
            try:
                result[name] = trial.measure(f"{name}_decode",
                                             trial.timed(lambda n, run=run: [run() for _ in range(n)]),
                                             cfg.decode_steps)
            except Exception as error:  # an optional peer that does not run on this build
                reasons.append(f"{name}: {type(error).__name__}: {error}"[:200])
        result["optional_reason"] = "; ".join(reasons)
    finally:
        peer.close()
        del peer
        _sync(trial.device)
    return result


def _whole_fills(n: int, capacity: int, chunk: int) -> int:
    """Round a planned count of positions: whole fills above capacity, whole chunks below."""
    if n >= capacity:
        return math.ceil(n / capacity) * capacity
    return max(chunk, n // chunk * chunk)


def _triple(name: str, figure: tuple[float, float, float]) -> dict[str, float]:
    return {name: figure[0], f"{name}_min": figure[1], f"{name}_max": figure[2]}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except RuntimeError:
            pass  # a failed kernel: empty what can be emptied anyway
        # cuBLAS keeps its workspace (32 MiB on Hopper) in the caching allocator until told
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_benchmark(cfg: BenchConfig) -> BenchResult:
    """Run one trial (see the module docstring); ValueError for a bad config.

    Device memory is freed before returning or raising; errors (out-of-memory included)
    propagate unchanged.
    """
    if not isinstance(cfg, BenchConfig):
        raise ValueError(f"run_benchmark takes a BenchConfig, got {type(cfg).__name__}")
    cfg.validate()
    device = resolve_device(cfg.device)
    try:
        with torch.no_grad():
            return _run(cfg, device)
    except BaseException as error:
        # The traceback's frames hold the trial's tensors: drop their locals before re-raising.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        _release(device)


# ---------------------------------------------------------------------- command line

_TABLE = (  # figure, the result field whose median/min/max it shows, its GB/s field
    ("fill (append)", "fill_rate_pos_s", "fill_gbps"),
    ("fill (append_all)", "append_all_rate_pos_s", "append_all_gbps"),
    ("prefill (extend)", "prefill_rate_pos_s", "prefill_gbps"),
    ("retrieve (get_valid)", "retrieve_rate_ops_s", "retrieve_gbps"),
    ("decode (cache+weights)", "decode_tok_s", "decode_gbps"),
    ("decode (cache alone)", "decode_cache_tok_s", "decode_cache_gbps"),
    ("baseline decode (peer)", "baseline_decode_tok_s", "baseline_decode_gbps"),
    ("copy (read+write)", "copy_gbps", "copy_gbps"),
)


def format_table(result: BenchResult) -> str:
    d = result.to_dict()
    lines = [
        f"{d['device_name']} ({d['device']}), torch {d['torch_version']}, {d['date_utc']}",
        f"{d['num_layers']} layers x {d['num_heads']} heads ({d['num_kv_heads']} KV) x "
        f"{d['head_dim']}, {d['context_length']} positions, {d['dtype']}, "
        f"{d['sink_positions']} sinks, attention: {d['attention_backend']}, decode: "
        f"{d['decode_method']}, baseline: {d['baseline_kind']} in {d['baseline_dtype']} "
        f"({d['baseline_method']}{', ' + d['baseline_skipped_reason'] if d['baseline_skipped_reason'] else ''})",
        f"{'figure':<24} {'field':<22} {'median':>12} {'min':>12} {'max':>12} {'GB/s':>9}",
    ]
    def num(value: float | None, width: int, spec: str) -> str:  # None: not measured
        return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"

    for label, field, gbps in _TABLE:
        lines.append(f"{label:<24} {field:<22} {num(d[field], 12, '.5g')} "
                     f"{num(d[field + '_min'], 12, '.5g')} {num(d[field + '_max'], 12, '.5g')} "
                     f"{num(d[gbps], 9, '.4g')}")
    for label, field in (("flash_attn decode (attention)", "flash_attn_decode_tok_s"),
                         ("flashinfer decode (attention)", "flashinfer_decode_tok_s")):
        if d[field] is not None:
            lines.append(f"{label:<47} {num(d[field], 12, '.5g')}")
    for field in ("decode_speedup", "decode_roofline_frac", "decode_cache_roofline_frac",
                  "kv_cache_gb", "kv_cache_measured_gb", "weights_gb", "peak_mem_gb",
                  "nvml_used_gb", "total_vram_gb"):
        lines.append(f"{field:<47} {num(d[field], 12, '.5g')}")
    lines.append(f"checks: retrieve {d['retrieve_check_ok']}, decode {d['decode_check_ok']} "
                 f"(err {d['decode_check_err']:.2g}), baseline {d['baseline_check_ok']}"
                 f"{'' if d['baseline_check_err'] is None else ' (err %.2g)' % d['baseline_check_err']}, "
                 f"kv_cache {d['kv_cache_ok']} ({d['kv_cache_measured_source']}); "
                 f"nvml: {d['nvml_source']}; peak: {d['peak_mem_source']}")
    reason = f" ({d['invalid_reason']})" if d["invalid_reason"] else ""
    lines.append(f"valid: {d['valid']}{reason}")
    return "\n".join(lines)


# --help text of every BenchConfig field: meaning, unit, valid values. Where the default
# differs from what the orchestrator runs (conf/config.yaml, conf/model/llama7b.yaml), the
# text says so and why.
_HELP: dict[str, str] = {
    "num_layers": "transformer layers, each with its own K and V buffers (positive int)",
    "num_heads": "query heads per layer (positive int, a multiple of --num-kv-heads)",
    "num_kv_heads": "K/V heads per layer (positive int dividing --num-heads; fewer than --num-heads "
                    "is grouped-query attention); unset: equal to --num-heads, as the orchestrator's "
                    "llama7b (32)",
    "head_dim": "elements per head (positive int)",
    "context_length": "positions the cache holds, its capacity and the target context (positive int); "
                      "the orchestrator takes it from the milestone (m10: 16384, smoke: 256)",
    "dtype": "cache storage dtype: float32, float16, bfloat16, int8, float8_e4m3fn or int4 (8-bit "
             "caches store per-position scales, int4 a scale per 32 values; quantized caches take "
             "float16 inputs)",
    "regions": "which regions to time: 'all' (copy, fill, append_all, prefill, retrieve, decode "
               "and the peers: what the orchestrator runs) or 'decode' (copy, decode and the peers "
               "only, for kernel work; fill, append_all, prefill and retrieve are reported empty)",
    "sink_positions": "first positions kept forever, never overwritten by the ring (StreamingLLM "
                      "attention sinks); int in [0, context length). The orchestrator runs 4 "
                      "(cache.sink_positions); 0 here keeps a plain ring, the seed's cache: pass "
                      "--sink-positions 4 to measure what a sweep measures",
    "weights_gb": "GB (10^9 bytes) of random weights streamed by every decode step, standing in for "
                  "the model (7B in Q4_K: 4.0); 0 streams none; float >= 0",
    "repetitions": "timed repetitions of each region; the median is reported with min and max "
                   "(positive int)",
    "device": "where to run: cpu, cuda or cuda:N",
    "decode_steps": "decode steps per timed repetition, fewer when one step outlasts --rep-budget-s "
                    "(positive int)",
    "prefill_chunk": "positions per extend() call in the prefill region (positive int); the "
                     "orchestrator uses this default",
    "seed": "seed of the random inputs (int)",
    "weights_dtype": "dtype of the streamed weights: float16 or bfloat16",
    "rep_budget_s": "time box of one repetition of one region, seconds (float > 0); smoke uses 0.2",
    "min_region_s": "a repetition shorter than this many seconds makes the trial invalid (too short "
                    "to time); float > 0",
    "max_spread": "max/min rate across repetitions above this ratio makes the trial invalid "
                  "(noisy); float >= 1",
    "copy_gb": "GB of the device-to-device copy that measures the bandwidth roofline (float > 0); "
               "unset: 1.0 on CUDA, 0.25 on CPU",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m kvcore.bench",
                     description="One benchmark trial of the streaming KV cache: fill, retrieve and "
                                 "decode rates with their bandwidth, memory figures and checks. "
                                 "Defaults are the seed's 7B shape (Llama-2-7B) at 16384 positions.",
                     epilog="Prints a table and one JSON line of every figure. Rates are per second "
                            "(median of the repetitions); GB are 10^9 bytes.")
    defaults = BenchConfig()
    types = {"num_kv_heads": int, "copy_gb": float}
    for f in fields(BenchConfig):
        kind = types.get(f.name, type(getattr(defaults, f.name)))
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind,
                            default=getattr(defaults, f.name),
                            help=f"{_HELP.get(f.name, f.name.replace('_', ' '))} (default: {getattr(defaults, f.name)})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    try:
        cfg.validate()
    except ValueError as error:
        parser.error(str(error))
    result = run_benchmark(cfg)
    print(format_table(result))
    print(json.dumps(result.to_dict(), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
