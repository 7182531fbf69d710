"""The state of a trial's device at its start: clocks, power limit, persistence, ECC, who else uses it.

    from orchestrator.devicestate import read_device_state, shared_reason
    state = read_device_state("GPU-3f2a...")   # {"gpu_sm_clock_mhz": "1980", ...}, all strings
    why = shared_reason(state)                 # "" or "shared GPU: 1 other process at start: ..."

Figures from one GPU run are comparable with another's only when the card ran the same way:
the same SM and memory clocks (a card that boosts differently, or was clock-locked by someone
else, moves every rate), the same power limit, persistence mode and ECC (ECC costs bandwidth),
and nothing else on it. A trial records all of this in its `info` at start (through NVML,
nvidia-ml-py's `pynvml`) and the trial is marked invalid (`valid` = 0, reason "shared GPU: ...")
when another process held a context on its GPU, as optimum-benchmark does. How to lock clocks
for regression runs: README "Reproducible figures".

Key decisions:
- NVML is passed in (`nvml=`): tests hand in a fake module with the same functions, so the
  logic runs on a CPU; by default `pynvml` is imported and initialised lazily, and a host
  without the library or driver records `gpu_state="unavailable: <why>"` instead of failing.
- "Other processes" are NVML's compute and graphics processes on the trial's GPU, minus this
  process. It is read before the trial creates its CUDA context; a process seen at the first
  look that is gone a moment later (the previous trial's worker still exiting) is not counted:
  the look is repeated for up to `settle_s`.
- On the CPU there is no clock to read through NVML: the trial records the CPU's frequency,
  its governor and the load average, which say whether the host was busy or throttled.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil

SETTLE_S = 5.0  # how long a foreign process seen at start may take to go away
_GOVERNOR = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")


def load_nvml() -> tuple[Any, str]:
    """(initialised pynvml module, "") or (None, why it is unavailable)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # no library, no driver, no permission
        return None, f"{type(error).__name__}: {error}"
    return pynvml, ""


def read_device_state(gpu_uuid: str | None, nvml: Any = None, own_pid: int | None = None,
                      settle_s: float = SETTLE_S) -> dict[str, str]:
    """The device's state as info strings (module doc). `gpu_uuid`: the trial's GPU ("GPU-...");
    None or "" for a CPU trial. `nvml`: an initialised NVML module (None: load pynvml)."""
    if not gpu_uuid:
        return cpu_state()
    close = False
    if nvml is None:
        nvml, why = load_nvml()
        if nvml is None:
            return {"gpu_state": f"unavailable: {why}"}
        close = True
    try:
        return gpu_state(nvml, gpu_uuid, os.getpid() if own_pid is None else own_pid, settle_s)
    finally:
        if close:
            try:
                nvml.nvmlShutdown()
            except Exception:
                pass


def gpu_state(nvml: Any, gpu_uuid: str, own_pid: int, settle_s: float = SETTLE_S) -> dict[str, str]:
    """Clocks, limits, modes and other processes of one GPU, read through `nvml`."""
    handle = nvml.nvmlDeviceGetHandleByUUID(gpu_uuid)
    state = {"gpu_state": "read"}

    def read(name: str, fn: Any) -> None:
        try:
            state[name] = str(fn())
        except Exception as error:  # not supported on this card / driver: say so, go on
            state[name] = f"n/a ({type(error).__name__})"

    sm, mem = nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM
    read("gpu_sm_clock_mhz", lambda: nvml.nvmlDeviceGetClockInfo(handle, sm))
    read("gpu_mem_clock_mhz", lambda: nvml.nvmlDeviceGetClockInfo(handle, mem))
    read("gpu_sm_clock_max_mhz", lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, sm))
    read("gpu_mem_clock_max_mhz", lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, mem))
    read("gpu_power_limit_w", lambda: f"{nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000:.0f}")
    read("gpu_power_limit_default_w", lambda: f"{nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) / 1000:.0f}")
    read("gpu_persistence_mode", lambda: "on" if nvml.nvmlDeviceGetPersistenceMode(handle) else "off")
    read("gpu_ecc", lambda: "on" if nvml.nvmlDeviceGetCurrentEccMode(handle) else "off")
    read("gpu_temperature_c", lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
    others = _other_processes(nvml, handle, own_pid)
    deadline = time.monotonic() + settle_s
    while others and time.monotonic() < deadline:  # a previous trial's worker may be exiting
        time.sleep(0.5)
        now = _other_processes(nvml, handle, own_pid)
        others = {pid: text for pid, text in now.items() if pid in others}
    state["gpu_other_processes"] = "; ".join(others.values())
    return state


def _other_processes(nvml: Any, handle: Any, own_pid: int) -> dict[int, str]:
    seen: dict[int, str] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            procs = getattr(nvml, getter)(handle)
        except Exception:
            continue
        for proc in procs:
            if proc.pid == own_pid or proc.pid in seen:
                continue
            used = getattr(proc, "usedGpuMemory", None)
            memory = f", {used / 1e9:.2f} GB" if isinstance(used, int) else ""
            seen[proc.pid] = f"pid {proc.pid} ({_process_name(proc.pid)}{memory})"
    return seen


def _process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return "not visible here"  # another container's or user's process


def cpu_state() -> dict[str, str]:
    """What applies on the CPU: frequency, governor, load, cores."""
    state = {"cpu_count": str(psutil.cpu_count(logical=True))}
    freq = psutil.cpu_freq()
    if freq is not None:
        state["cpu_freq_mhz"] = f"{freq.current:.0f}"
        if freq.max:
            state["cpu_freq_max_mhz"] = f"{freq.max:.0f}"
    try:
        state["cpu_governor"] = _GOVERNOR.read_text().strip()
    except OSError:
        state["cpu_governor"] = "n/a"
    state["cpu_load_avg_1m"] = f"{os.getloadavg()[0]:.2f}"
    return state


def shared_reason(state: dict[str, str]) -> str:
    """Why the trial's figures cannot be trusted because it shared its GPU ('' when it did not)."""
    others = state.get("gpu_other_processes", "")
    if not others:
        return ""
    n = others.count("; ") + 1
    return f"shared GPU: {n} other process{'es' if n > 1 else ''} on it at start: {others}"
