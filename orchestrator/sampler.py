"""System metrics of a running trial, sampled in its own process (no MLflow here).

    from orchestrator.sampler import SystemSampler
    with SystemSampler(gpu_uuid="GPU-3f2a...", interval_s=1.0) as sampler:
        run_the_benchmark()
    series = sampler.series()   # {"cpu_utilization_percentage": [[unix s, value], ...], ...}

A daemon thread takes one sample at start, one every `interval_s` and one at stop. The names
are MLflow's own system-metric names (mlflow/system_metrics/metrics/*.py), so the driver logs
them as `system/<name>` and the run page's "System metrics" tab draws them:
- host: `cpu_utilization_percentage`, `system_memory_usage_megabytes`,
  `system_memory_usage_percentage`, and this process's resident memory
  `process_memory_rss_megabytes`;
- GPU (through NVML, where the trial has one): `gpu_0_utilization_percentage`,
  `gpu_0_memory_usage_megabytes`, `gpu_0_memory_usage_percentage`, `gpu_0_power_usage_watts`,
  `gpu_0_power_usage_percentage` (of the enforced power limit). `gpu_0` is the trial's one GPU.

Key decisions:
- 1 s by default: a trial of 10-30 s gets 10-30 points per series, enough to see the phases
  (copy, fill, retrieve, decode) without weighing on the trial (a sample costs well under a
  millisecond of one core's time, and the thread sleeps in between).
- Trials run in Ray workers, and only the driver talks to MLflow: the series travel back in
  the trial's result (orchestrator/trial.py) and then its record.
- A reading that fails (a counter the card does not support) is left out of that sample;
  the sampler never fails the trial.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psutil

from orchestrator.devicestate import load_nvml

INTERVAL_S = 1.0


class SystemSampler:
    """Samples host (and GPU) usage in a thread while the `with` block runs."""

    def __init__(self, gpu_uuid: str | None = None, interval_s: float = INTERVAL_S, nvml: Any = None):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s!r}")
        self.interval_s = interval_s
        self.gpu_uuid = gpu_uuid or None
        self._nvml = nvml
        self._own_nvml = False
        self._handle: Any = None
        self._series: dict[str, list[list[float]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process(os.getpid())

    def __enter__(self) -> "SystemSampler":
        if self.gpu_uuid:
            if self._nvml is None:
                self._nvml, _ = load_nvml()
                self._own_nvml = self._nvml is not None
            if self._nvml is not None:
                try:
                    self._handle = self._nvml.nvmlDeviceGetHandleByUUID(self.gpu_uuid)
                except Exception:
                    self._handle = None
        psutil.cpu_percent(interval=None)  # the first call only sets the reference point
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="system-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1)
        self.sample()
        if self._own_nvml:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Take one sample of every series now."""
        now = time.time()
        values: dict[str, float] = {}
        try:
            values["cpu_utilization_percentage"] = psutil.cpu_percent(interval=None)
            memory = psutil.virtual_memory()
            values["system_memory_usage_megabytes"] = memory.used / 1e6
            values["system_memory_usage_percentage"] = memory.percent
            values["process_memory_rss_megabytes"] = self._process.memory_info().rss / 1e6
        except (psutil.Error, OSError):
            pass
        if self._handle is not None:
            values.update(_gpu_values(self._nvml, self._handle))
        for name, value in values.items():
            self._series.setdefault(name, []).append([now, float(value)])

    def series(self) -> dict[str, list[list[float]]]:
        """Every series sampled so far: name -> [[unix s, value], ...] in time order."""
        return {name: [list(p) for p in points] for name, points in self._series.items()}


def _gpu_values(nvml: Any, handle: Any) -> dict[str, float]:
    values: dict[str, float] = {}

    def read(fn: Any) -> None:
        try:
            fn()
        except Exception:  # unsupported on this card: leave the series out of this sample
            pass

    def memory() -> None:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        values["gpu_0_memory_usage_megabytes"] = info.used / 1e6
        values["gpu_0_memory_usage_percentage"] = 100.0 * info.used / info.total

    def utilization() -> None:
        values["gpu_0_utilization_percentage"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def power() -> None:
        milliwatts = nvml.nvmlDeviceGetPowerUsage(handle)
        values["gpu_0_power_usage_watts"] = milliwatts / 1000
        values["gpu_0_power_usage_percentage"] = 100.0 * milliwatts / nvml.nvmlDeviceGetEnforcedPowerLimit(handle)

    for fn in (memory, utilization, power):
        read(fn)
    return values
