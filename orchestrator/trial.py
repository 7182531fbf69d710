"""One trial: the plain task body that the Ray task wraps, and the trial parameters it reads.

    from orchestrator.trial import run_trial
    result = run_trial(spec)   # spec: orchestrator.grid.TrialSpec; result: a dict of plain values

`run_trial` builds the `kvcore.bench.BenchConfig` of the trial's parameters, runs the
benchmark on the device this process was given (the one CUDA device Ray made visible, else
the CPU) and returns a plain dict that crosses the process boundary:

    {"status": "OK" | "ERROR", "reason": str,
     "metrics": {figure: float}, "info": {name: str},
     "started_at": unix s, "finished_at": unix s}

Key decisions:
- A failing trial is a result, not an exception, so the sweep goes on: out of memory (CUDA's
  `torch.OutOfMemoryError`, the host's `MemoryError` or torch's CPU allocator failure) becomes
  ERROR with reason "oom: ..." naming what the trial needed and what the device had; any other
  exception becomes ERROR with reason "crash: <type>: <message>" and the traceback's tail in
  `info["traceback"]`.
- Numbers of the benchmark's result are metrics (booleans as 0/1 too, so a failed check shows
  in MLflow's charts); strings are info.
- Trial parameters are dotted config paths (`model.num_layers`); orchestrator/settings.py turns
  them into kvcore's BenchConfig (and ModelBenchConfig), the one declaration of a trial's settings.
- `bench.decode=model` (default `proxy`): the trial also runs the real model through kvcore
  beside transformers (`kvcore.model_bench`, random weights at the model config's shape or
  `model.checkpoint`), after the proxy benchmark has freed its memory; its figures join the
  result.

Device state and system metrics (README "Reproducible figures"): at start the trial records
its device's state in `info` (orchestrator/devicestate.py: GPU clocks, power limit,
persistence, ECC, other processes on the GPU; on a CPU its frequency, governor and load) and
its host name; a trial that found another process on its GPU is marked invalid (`valid` = 0,
`invalid_reason` "shared GPU: ..."), whatever its figures. While it runs, a sampler thread
(orchestrator/sampler.py) records CPU, host memory and GPU utilisation, memory and power every
second; the series come back as `system_metrics` and the driver logs them to MLflow.

Warm workers: `Worker` runs trial after trial in one process (the Ray actor of
orchestrator/ray_cluster.py wraps it); it records in each trial's info `worker_pid`,
`worker_trials`, `memory_at_start_bytes` and `memory_baseline_bytes`, frees the device's memory
after each trial (`release`), and marks invalid a trial that starts more than WARM_MARGIN_BYTES
over the worker's baseline ("memory not back at start: ...").

Fault injection, so tests inject each fault for real through this same code path: the driver
reads $KVBENCH_INJECT_FAULT (e.g. "kill:0,hang:2,oom:1": fault kind and grid index) and hands
the trial its fault, which `run_trial` then commits:
- `kill`: SIGKILL this worker process at the start of the trial's first attempt (it is retried);
- `die`: SIGKILL it at the start of every attempt (the retries are used up);
- `hang`: sleep forever (the driver's deadline cancels it);
- `oom`: allocate 2^62 bytes on the trial's device, which fails as a real out-of-memory error.
Unset (always, outside tests), nothing is injected.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import socket
import time
import traceback
from collections.abc import Mapping
from typing import Any

import psutil
import torch

from kvcore.bench import run_benchmark
from kvcore.bench.probes import gpu_uuid
from kvcore.model_bench import run_model_bench
from kvcore.model_bench import release as release_model_bench
from orchestrator.capacity import trial_need_bytes
from orchestrator.devicestate import read_device_state, shared_reason
from orchestrator.grid import TrialSpec
from orchestrator.sampler import SystemSampler
from orchestrator.settings import bench_config, model_config, model_mode

FAULT_ENV = "KVBENCH_INJECT_FAULT"
FAULTS = ("kill", "hang", "oom", "die")


def injected_fault(index: int, text: str | None = None) -> str | None:
    """The fault $KVBENCH_INJECT_FAULT (or `text`) injects into grid point `index`, if any."""
    text = os.environ.get(FAULT_ENV, "") if text is None else text
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, where = item.partition(":")
        if kind not in FAULTS or not where.strip().isdigit():
            raise ValueError(
                f"{FAULT_ENV} items read <fault>:<grid index> with fault one of {list(FAULTS)}, "
                f"got {item!r}; e.g. {FAULT_ENV}=kill:0,hang:2"
            )
        if int(where) == index:
            return kind
    return None


def _commit_fault(fault: str | None, attempt: int, device: str) -> None:
    if (fault == "kill" and attempt == 1) or fault == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "hang":
        while True:
            time.sleep(3600)
    elif fault == "oom":
        torch.empty(1 << 62, dtype=torch.uint8, device=device)


def trial_device() -> str:
    """The device this process benchmarks on: the (first) visible CUDA device, else the CPU."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def split_figures(figures: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """Benchmark figures -> (numeric metrics, string info); non-finite numbers go to info."""
    metrics: dict[str, float] = {}
    info: dict[str, str] = {}
    for name, value in figures.items():
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            metrics[name] = float(value)
        else:
            info[name] = str(value)
    return metrics, info


def device_memory_bytes(device: str) -> int:
    """What `device` holds: a CUDA device's total memory, or the host's available memory."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return psutil.virtual_memory().available


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    # torch's CPU allocator raises a RuntimeError when malloc fails
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def _oom_reason(spec: TrialSpec, device: str, error: BaseException) -> str:
    need = trial_need_bytes(spec.params)
    had = device_memory_bytes(device)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (
        f"oom: needed about {need / 1e9:.2f} GB (cache + weights + margin), {device} had "
        f"{had / 1e9:.2f} GB: {first_line[:300]}"
    )


def trial_gpu_uuid(device: str) -> str:
    """The UUID ("GPU-...") of the trial's CUDA device; "" on the CPU or when it cannot be read."""
    if not device.startswith("cuda"):
        return ""
    return gpu_uuid(torch.cuda.get_device_properties(torch.device(device)))


def mark_shared(metrics: dict[str, float], info: dict[str, str], state: Mapping[str, str]) -> None:
    """A trial that shared its GPU with another process is invalid: `valid` = 0, and why."""
    why = shared_reason(dict(state))
    if why:
        metrics["valid"] = 0.0
        info["invalid_reason"] = "; ".join(x for x in (info.get("invalid_reason", ""), why) if x)


def run_trial(spec: TrialSpec, attempt: int = 1, fault: str | None = None,
              sample_interval_s: float | None = None) -> dict[str, Any]:
    """Run one trial's benchmark here; never raises for a failing trial (see module doc).
    `attempt`: 1 for the first run, 2 for Ray's first retry, ...; `fault`: see module doc;
    `sample_interval_s`: the system sampler's interval (default orchestrator.sampler's)."""
    started = time.time()
    device = trial_device()
    info = {"trial_device": device, "hostname": socket.gethostname()}
    try:
        uuid = trial_gpu_uuid(device)
        state = read_device_state(uuid)
    except Exception as error:  # the state is context for the figures, never a reason to fail
        uuid, state = "", {"device_state": f"unreadable: {type(error).__name__}: {error}"[:300]}
    info.update(state)
    interval = {} if sample_interval_s is None else {"interval_s": sample_interval_s}
    with SystemSampler(uuid, **interval) as sampler:
        result = _run_body(spec, attempt, fault, device, info)
    result["system_metrics"] = sampler.series()
    result["started_at"] = started
    if result["status"] == "OK":
        mark_shared(result["metrics"], result["info"], state)
    return result


def _run_body(spec: TrialSpec, attempt: int, fault: str | None, device: str, info: dict[str, str]) -> dict[str, Any]:
    try:
        _commit_fault(fault, attempt, device)
        result = run_benchmark(bench_config(spec.params, device)).to_dict()
        if model_mode(spec.params):  # the proxy's memory is freed: now the real model
            model, peer = run_model_bench(model_config(spec.params, device))
            del peer
            release_model_bench(device)
            result = {**model.to_dict(), **result}  # shared descriptions (shape, device) stay the proxy's
    except Exception as error:  # a failing trial is a result; KeyboardInterrupt still stops
        if _is_oom(error):
            status, reason = "ERROR", _oom_reason(spec, device, error)
        else:
            status, reason = "ERROR", f"crash: {type(error).__name__}: {error}"[:500]
            info["traceback"] = "".join(traceback.format_exception(error)[-6:])[-4000:]
        return {
            "status": status,
            "reason": reason,
            "metrics": {},
            "info": info,
            "finished_at": time.time(),
        }
    metrics, figures_info = split_figures(result)
    return {
        "status": "OK",
        "reason": "",
        "metrics": metrics,
        "info": {**figures_info, **info},
        "finished_at": time.time(),
    }


# a warm worker's trial is invalid when its device holds more than this over the worker's baseline
# at its start: on a GPU the allocator is emptied between trials, so what stays is a leak; the host's
# resident memory moves more (the allocator keeps freed pages), so its margin is wider
WARM_MARGIN_BYTES = {"cuda": 256 << 20, "cpu": 1 << 30}


def memory_in_use(device: str) -> int:
    """What a trial finds taken at its start: on a CUDA device, its used memory (total - free,
    this process's context, kernels and allocator included); on the CPU, this process's
    resident memory."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(total - free)
    return int(psutil.Process().memory_info().rss)


def release(device: str) -> None:
    """Free what a trial left: Python garbage (graphs, tensors), cuBLAS workspaces, the allocator's cache."""
    gc.collect()
    if device.startswith("cuda"):
        with contextlib.suppress(RuntimeError):  # a failed kernel: empty what can be emptied anyway
            torch.cuda.synchronize(torch.device(device))
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def leak_reason(at_start: int, baseline: int, margin: int) -> str:
    """Why a warm worker's trial is invalid: its device held more than `margin` bytes over the
    worker's baseline at its start; "" when it did not."""
    over = at_start - baseline
    if over <= margin:
        return ""
    return (f"memory not back at start: {at_start / 1e6:.0f} MB in use, {over / 1e6:.0f} MB over this "
            f"worker's baseline of {baseline / 1e6:.0f} MB (margin {margin / 1e6:.0f} MB)")


class Worker:
    """A warm worker's state: it runs trial after trial in one process (a Ray actor pinned to a
    card or a CPU node wraps it), so imports, the CUDA context and compiled kernels are paid once.

    Every trial's info records `worker_pid`, `worker_trials` (the trials this worker ran before
    it), `memory_at_start_bytes` and the worker's `memory_baseline_bytes` (what its first trial
    found at start); a trial that starts with more than WARM_MARGIN_BYTES over the baseline is
    invalid (`valid` = 0, `invalid_reason` "memory not back at start: ..."). After each trial
    the device's memory is released (`release`)."""

    def __init__(self) -> None:
        self.trials = 0
        self.baseline: int | None = None

    def run(self, spec: TrialSpec, attempt: int = 1, fault: str | None = None) -> dict[str, Any]:
        device = trial_device()
        if device.startswith("cuda"):
            torch.cuda.init()  # the context belongs to the baseline, as it stays between trials
        at_start = memory_in_use(device)
        if self.baseline is None:
            self.baseline = at_start
        try:
            result = run_trial(spec, attempt=attempt, fault=fault)
        finally:
            release(device)
        info = result.setdefault("info", {})
        info.update(worker_pid=str(os.getpid()), worker_trials=str(self.trials),
                    memory_at_start_bytes=str(at_start), memory_baseline_bytes=str(self.baseline))
        why = leak_reason(at_start, self.baseline, WARM_MARGIN_BYTES["cuda" if device.startswith("cuda") else "cpu"])
        if why and result["status"] == "OK":
            result["metrics"]["valid"] = 0.0
            info["invalid_reason"] = "; ".join(x for x in (info.get("invalid_reason", ""), why) if x)
        self.trials += 1
        return result
