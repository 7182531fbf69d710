"""Tests of a trial's device state and system metrics (orchestrator/devicestate.py,
orchestrator/sampler.py) on the CPU: NVML is a fake module with pynvml's functions, so the GPU
logic runs here; the real NVML path runs in the GPU sweep.

Run: python -m pytest tests/orchestrator/test_devicestate.py -q
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from orchestrator.devicestate import cpu_state, read_device_state, shared_reason
from orchestrator.sampler import SystemSampler
from orchestrator.trial import mark_shared

UUID = "GPU-00000000-1111-2222-3333-444444444444"


class FakeNVML:
    """pynvml's surface as the state and the sampler use it, for one GPU. `processes`: the
    compute processes NVML reports, a list per call (the last one repeats)."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    class NVMLError(Exception):
        pass

    def __init__(self, processes=((),), ecc_supported=True):
        self.processes = [list(p) for p in processes]
        self.ecc_supported = ecc_supported
        self.calls = 0

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid != UUID:
            raise self.NVMLError(f"no GPU {uuid}")
        return "handle"

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return {1: 1755, 2: 2619}[clock]

    def nvmlDeviceGetMaxClockInfo(self, handle, clock):
        return {1: 1980, 2: 2619}[clock]

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle):
        return 700_000

    def nvmlDeviceGetPersistenceMode(self, handle):
        return 1

    def nvmlDeviceGetCurrentEccMode(self, handle):
        if not self.ecc_supported:
            raise self.NVMLError("Not Supported")
        return 0

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 41

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        procs = self.processes[min(self.calls, len(self.processes) - 1)]
        self.calls += 1
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in procs]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return []

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=30e9, total=150e9)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=97, memory=80)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 350_000

    def nvmlShutdown(self):
        pass


def test_gpu_state_records_clocks_limits_modes_and_says_what_it_cannot_read():
    state = read_device_state(UUID, nvml=FakeNVML(ecc_supported=False), own_pid=os.getpid())
    assert state["gpu_sm_clock_mhz"] == "1755" and state["gpu_sm_clock_max_mhz"] == "1980"
    assert state["gpu_mem_clock_mhz"] == "2619" and state["gpu_power_limit_w"] == "700"
    assert state["gpu_persistence_mode"] == "on" and state["gpu_temperature_c"] == "41"
    assert state["gpu_ecc"] == "n/a (NVMLError)"
    assert state["gpu_other_processes"] == "" and shared_reason(state) == ""


def test_a_foreign_process_on_the_gpu_makes_the_trial_invalid():
    own = os.getpid()
    # this process and a foreign one that stays: the foreign one is named, the trial invalid
    nvml = FakeNVML(processes=[[(own, 10**9), (4242, 2 * 10**9)]])
    state = read_device_state(UUID, nvml=nvml, own_pid=own, settle_s=0.6)
    assert state["gpu_other_processes"].startswith("pid 4242 (") and "2.00 GB" in state["gpu_other_processes"]
    why = shared_reason(state)
    assert why.startswith("shared GPU: 1 other process on it at start: pid 4242")
    metrics, info = {"valid": 1.0, "fill_rate_pos_s": 5.0}, {"invalid_reason": ""}
    mark_shared(metrics, info, state)
    assert metrics["valid"] == 0.0 and info["invalid_reason"] == why
    # a reason the benchmark gave is kept, the shared GPU added
    info = {"invalid_reason": "decode: repetitions spread 3.1x"}
    mark_shared(metrics, info, state)
    assert info["invalid_reason"] == f"decode: repetitions spread 3.1x; {why}"


def test_a_process_that_leaves_within_the_settle_time_is_not_counted():
    # the previous trial's worker, still exiting at the first look, gone at the second
    nvml = FakeNVML(processes=[[(777, 10**9)], []])
    state = read_device_state(UUID, nvml=nvml, own_pid=os.getpid(), settle_s=2.0)
    assert state["gpu_other_processes"] == "" and nvml.calls >= 2
    metrics = {"valid": 1.0}
    mark_shared(metrics, {}, state)
    assert metrics["valid"] == 1.0


def test_cpu_trials_record_what_applies_and_a_missing_nvml_is_said():
    state = read_device_state("")
    assert set(state) == set(cpu_state()) and "gpu_other_processes" not in state
    assert int(state["cpu_count"]) >= 1 and "cpu_governor" in state and float(state["cpu_load_avg_1m"]) >= 0
    assert shared_reason(state) == ""


def test_sampler_records_host_series_on_the_cpu_at_its_interval():
    with SystemSampler(interval_s=0.2) as sampler:
        deadline = time.monotonic() + 0.9
        while time.monotonic() < deadline:  # keep a core busy
            sum(i * i for i in range(10_000))
    series = sampler.series()
    assert set(series) == {"cpu_utilization_percentage", "system_memory_usage_megabytes",
                           "system_memory_usage_percentage", "process_memory_rss_megabytes"}
    points = series["cpu_utilization_percentage"]
    assert 4 <= len(points) <= 9  # start, ~4 in 0.9 s, stop
    times = [t for t, _ in points]
    assert times == sorted(times) and times[-1] - times[0] == pytest.approx(0.9, abs=0.4)
    assert all(0.0 <= v <= 100.0 for _, v in points)
    assert all(v > 1.0 for _, v in series["process_memory_rss_megabytes"])


def test_sampler_reads_the_gpu_through_nvml_with_mlflows_names():
    with SystemSampler(gpu_uuid=UUID, interval_s=0.1, nvml=FakeNVML()) as sampler:
        time.sleep(0.25)
    series = sampler.series()
    assert series["gpu_0_utilization_percentage"][0][1] == 97.0
    assert series["gpu_0_memory_usage_megabytes"][0][1] == 30_000.0
    assert series["gpu_0_memory_usage_percentage"][0][1] == 20.0
    assert series["gpu_0_power_usage_watts"][0][1] == 350.0
    assert series["gpu_0_power_usage_percentage"][0][1] == 50.0
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        SystemSampler(interval_s=0)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_on_a_real_gpu_the_state_and_the_samples_come_from_nvml():
    import torch

    from orchestrator.trial import trial_gpu_uuid

    uuid = trial_gpu_uuid("cuda:0")
    assert uuid.startswith("GPU-")
    state = read_device_state(uuid, settle_s=0.0)
    assert state["gpu_state"] == "read"
    for key in ("gpu_sm_clock_mhz", "gpu_mem_clock_mhz", "gpu_power_limit_w"):
        assert float(state[key]) > 0, (key, state[key])
    assert state["gpu_persistence_mode"] in ("on", "off") and state["gpu_ecc"] in ("on", "off")
    with SystemSampler(gpu_uuid=uuid, interval_s=0.2) as sampler:
        x = torch.randn(4096, 4096, device="cuda:0")
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            x = x @ x
            x /= x.norm()
        torch.cuda.synchronize()
    series = sampler.series()
    assert max(v for _, v in series["gpu_0_memory_usage_megabytes"]) > 60  # our 64 MB matrix at least
    assert max(v for _, v in series["gpu_0_power_usage_watts"]) > 0
