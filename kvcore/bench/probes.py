"""Memory and device probes of a benchmark trial: the host's peak resident set (`HostPeak`),
tensor storage bytes, what NVML sees (`nvml_info`), the peak and the CUDA context
(`memory_seen`), the environment (`environment`: device name, versions, host, date), the GPU's
UUID and the CPU's name, and the clean-up between trials (`release`).

Key decisions:
- CUDA peak = `torch.cuda.max_memory_allocated` after a reset; CPU peak = growth of the peak
  resident set (VmHWM, reset through /proc/self/clear_refs; getrusage otherwise), never less
  than the bytes of the tensors the trial holds at once.
- `total_vram_gb` adds, on CUDA, what NVML sees beyond the allocator's pool (CUDA context).
- NVML is imported lazily and guarded: without it `nvml_source` says "unavailable".
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import socket
from datetime import datetime, timezone
from typing import Any

import torch

def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def trim_host_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim), so that the
    resident set holds only live data and a trial's allocations grow it again, even in a
    process that already freed memory (a long test session, a reused worker)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the live-tensor floor below still holds


class HostPeak:
    """Peak host memory of a CPU trial: the growth of this process's resident set since
    `reset` (after the heap was trimmed), never less than the bytes of the tensors the trial
    holds at once (`floor`). The floor makes the figure independent of what ran before in
    the same process: freed pages that the allocator reuses do not grow the resident set."""

    def reset(self) -> None:
        trim_host_heap()
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
        self.floor = max(self.floor, storage_bytes(tensors))

    def growth_bytes(self) -> tuple[int, str]:
        """(peak bytes, source): the resident-set growth, or the live-tensor floor when larger."""
        peak = _proc_status_kb("VmHWM") if self.source == "vmhwm" else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        grown = max(0, peak - self.start_kb) * 1024
        if grown >= self.floor:
            return grown, self.source
        return self.floor, "live_tensors"


def storage_bytes(tensors: list[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind tensors (views of one allocation count once)."""
    storages = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())

def gpu_uuid(props: Any) -> str:
    """The UUID ("GPU-...") of a CUDA device from torch's device properties; "" when unknown
    (torch spells it without the "GPU-" that NVML and nvidia-smi use)."""
    uuid = str(getattr(props, "uuid", "") or "")
    return uuid if not uuid or uuid.startswith("GPU-") else f"GPU-{uuid}"


def cpu_name() -> str:
    """The host CPU's model name from /proc/cpuinfo; "" when it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def nvml_info(device: torch.device) -> dict[str, object]:
    """What NVML says about this process / the device; a guarded, lazy import."""
    info: dict[str, object] = {"nvml_used_gb": 0.0, "nvml_source": "unavailable",
                               "driver_version": "", "gpu_uuid": ""}
    uuid = gpu_uuid(torch.cuda.get_device_properties(device))
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


def environment(device: torch.device) -> dict[str, object]:
    """Versions, host, date, the device's name and its total memory (the host's on the CPU)."""
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
    env["device_name"] = cpu_name() or platform.processor() or platform.machine()
    env["device_total_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return env


def memory_seen(device: torch.device, host_peak: HostPeak) -> dict[str, object]:
    """Peak memory since the reset, NVML's view, and the CUDA context beyond the pool."""
    if device.type != "cuda":
        peak, source = host_peak.growth_bytes()
        return {"peak": peak, "peak_source": source,
                "context": 0.0, "nvml_used_gb": 0.0, "nvml_source": "unavailable",
                "driver_version": "", "gpu_uuid": ""}
    torch.cuda.synchronize(device)
    seen = nvml_info(device)
    if seen["nvml_source"] != "unavailable":
        used = seen["nvml_used_gb"] * 1e9
    else:  # the driver's view of the whole device, through torch
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
    return {**seen, "peak": torch.cuda.max_memory_allocated(device),
            "peak_source": "cuda_allocator",
            "context": max(0.0, used - torch.cuda.memory_reserved(device))}


def release(device: torch.device) -> None:
    """Free what a trial left: gc, the CUDA caching allocator and cuBLAS workspaces emptied,
    peak statistics reset (so many trials can run in one process)."""
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
