"""Timing: the time-boxed region timer of a benchmark trial (`measure`, with `plan_units` and
`assess`), a CUDA-event timer of a callable (`median_ms`, for kernels) and the copy bandwidth,
the roofline every other bandwidth is compared with (`measure_copy_gbps`).

Key decisions:
- Regions: `torch.cuda.synchronize()` around host clocks (`time.perf_counter`, `timed`), since
  host overhead per call is part of what fill and decode cost. A repetition lasts >= 4 x
  `min_region_s` and at most the budget where one unit of work allows (`plan_units`).
- Kernels: CUDA events around a batch of calls (`median_ms`), after three warm-up runs; the
  median and the spread (max - min) per call.
- Copy: device-to-device copy of a random buffer, read + write bytes per second.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvcore.bench.config import resolve_device



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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds fn takes, the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
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

def median_ms(run: Callable[[], object], reps: int, calls_per_rep: int) -> tuple[float, float]:
    """Median and spread (max - min) in ms per call of `run()` (which makes `calls_per_rep`
    calls), timed with CUDA events after three warm-up runs."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls_per_rep)
    return statistics.median(times), max(times) - min(times)


def copy_measurement(device: torch.device, gen: torch.Generator, gb: float | None, target_s: float,
                     budget_s: float, repetitions: int) -> tuple[Measurement, int]:
    """Time a device-to-device copy of a random buffer of `gb` GB (None: 1.0 on CUDA, 0.25 on
    the CPU); the measurement in copies per second and the bytes of one buffer."""
    gb = gb if gb is not None else (1.0 if device.type == "cuda" else 0.25)
    src = torch.randn((max(1, int(gb * 1e9) // 4),), generator=gen, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)

    def run(n: int) -> None:
        for _ in range(n):
            dst.copy_(src)

    m = measure("copy", lambda n: timed(device, lambda: run(n)), 1, target_s, budget_s, repetitions)
    return m, src.nbytes


def measure_copy_gbps(device: torch.device | str, gb: float | None = None, repetitions: int = 5,
                      rep_budget_s: float = 1.0, seed: int = 0,
                      min_region_s: float = 0.005) -> tuple[float, float, float]:
    """The trial's copy probe on its own: device-to-device copy bandwidth, read + write bytes
    per second, as (median, min, max) GB/s (for other benchmarks' rooflines)."""
    device = resolve_device(str(device))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    m, nbytes = copy_measurement(device, gen, gb, 4 * min_region_s, rep_budget_s, repetitions)
    median, low, high = m.summary()
    result = (median * 2 * nbytes / 1e9, low * 2 * nbytes / 1e9, high * 2 * nbytes / 1e9)
    del m
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result
