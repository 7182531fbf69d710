"""The Ray adapter: connect to a cluster, probe its devices, run trials on its workers. The only
module importing ray (which trial runs where and when is orchestrator/scheduler.py's).

    cluster = Cluster.connect(settings)        # join cluster.address / $RAY_ADDRESS, or start a local Ray
    nodes = cluster.probe()                    # per node: GPUs (name, UUID, total memory), host memory, CPUs
    sub = cluster.submit(spec, device, max_retries=2)    # on the device's warm worker
    for sub in cluster.wait(subs, timeout_s=1.0): result = cluster.fetch(sub)
    cluster.cancel(sub)                        # kills the trial's worker
    cluster.close()

Key decisions:
- Warm workers (default, `Cluster.warm`): one actor per device, `_TrialWorker`, a thin wrapper
  around `orchestrator.trial.Worker`, pinned to its card (num_gpus=1) or CPU node for its
  life, runs trial after trial: Python, torch, the CUDA context and compiled kernels are paid
  once per card. It has no Ray restarts: a worker that dies (SIGKILL, segfault, Ray's memory
  monitor) is forgotten and the trial runs again on a new one (up to max_retries, counted
  here as Ray counts task attempts); a trial past its deadline is cancelled by `ray.kill` of
  its worker; the next trial on that card starts a new worker.
- With warm=False (trial.warm_workers=false): one module-level task, `_trial_task`, a thin
  wrapper around `orchestrator.trial.run_trial`, with `max_calls=1`: a fresh worker process
  per trial, so each trial starts with its device memory back.
- `submit` returns a `Submission` (the trial, its current ref, its worker and attempt);
  `wait`, `fetch` and `cancel` take it.
- Placement is the driver's: each trial goes to the node of the device chosen for it
  (`NodeAffinitySchedulingStrategy`, hard), asking `num_gpus=1` on a GPU node (no two trials
  share a card) or every CPU of a CPU-only node (CPU trials run one at a time per node). The
  driver never submits more trials to a node than it has devices, so a submitted trial starts
  at once and its clock (progress, deadline) is honest.
- Retries (`max_retries`) cover worker and node death only; a trial that fails inside
  the benchmark is a result (see orchestrator.trial), never retried. The worker adds to its
  result the attempt it was (a per-trial task reads Ray's own count from the core worker:
  Ray 2.60 has no public API for it), its node id, a `device_key` (the GPU's UUID, or
  "<node id>:cpu") and its `worker_pid`.
  A worker that died on every attempt comes back as ERROR "crash: the worker died on every
  attempt ..." with `retries_exhausted`.
- `cancel` kills the trial's worker (`ray.kill`, or `ray.cancel(force=True)` of a per-trial
  task); Ray resolves the trial's ref (ActorDiedError, TaskCancelledError) once the worker is
  killed, and its raylet gives the GPU or CPUs back only when the worker process has exited,
  so no next trial shares the card with a lingering one.
- The probe asks for all of a node's GPUs, so torch sees exactly the cards Ray manages there.
- A local Ray listens on 127.0.0.1 only: Ray picks its node address through
  `ray._private.ray_constants.ENABLE_RAY_CLUSTER` (off: loopback), which is switched off
  while a local head starts or a loopback address is joined. Joining any other address is
  checked with a plain TCP connect first (5 s), since `ray.init` waits minutes on a dead one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

if TYPE_CHECKING:  # workers import this module to run the probe: keep it light (no torch)
    from orchestrator.capacity import Device
    from orchestrator.config import ClusterSettings
    from orchestrator.grid import TrialSpec

PROBE_TIMEOUT_S = 300.0  # a probe waits for all of its node's GPUs to be free
CONNECT_TIMEOUT_S = 5.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _TokenAuthNotice(logging.Filter):
    """Ray 2.60 logs, whenever it starts a local cluster with token authentication on by
    default, "Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out",
    which reads as advice to turn security off. Token authentication stays on; the line is
    rephrased to say so (and where the token lives), without the advice."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "to opt out" in str(record.msg) and "Token authentication is enabled" in str(record.msg):
            record.msg = ("Ray: token authentication is on for this local cluster (token in "
                          "~/.ray/auth_token); workers that join need the same token")
            record.args = ()
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TokenAuthNotice())


class ClusterUnreachable(ValueError):
    """cluster.address (or RAY_ADDRESS) names no reachable Ray cluster."""


@ray.remote(max_calls=1)
def _trial_task(spec: TrialSpec, fault: str | None = None) -> dict[str, Any]:
    """run_trial here, plus where it ran (info `node_id`, `device_key`) and which attempt it was."""
    from orchestrator.trial import run_trial

    attempt = _attempt_number()
    result = _labelled(run_trial(spec, attempt=attempt, fault=fault), attempt)
    result["info"].update(worker_pid=str(os.getpid()), worker_trials="0")
    return result


def _labelled(result: dict[str, Any], attempt: int) -> dict[str, Any]:
    """A worker's result with where it ran (node id, device key) and which attempt it was."""
    node_id = ray.get_runtime_context().get_node_id()
    info = result.setdefault("info", {})
    uuid = ""
    if info.get("trial_device", "cpu") != "cpu":
        uuid = f"{node_id}:gpu"  # if the UUID cannot be read
        with contextlib.suppress(Exception):  # never lose a result over its label
            uuid = _visible_gpus()[0]["uuid"]
    result["attempt"] = attempt
    info.update(node_id=node_id, device_key=device_key(node_id, uuid))
    return result


@ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=1)
class _TrialWorker:
    """A warm worker: a thin wrapper around `orchestrator.trial.Worker`, pinned to one card (or
    one CPU node) for its life; it dies with the first trial that kills its process."""

    def __init__(self) -> None:
        from orchestrator.trial import Worker

        self.worker = Worker()

    def run(self, spec: TrialSpec, attempt: int, fault: str | None) -> dict[str, Any]:
        return _labelled(self.worker.run(spec, attempt=attempt, fault=fault), attempt)


@dataclass(eq=False)
class Submission:
    """One submitted trial, as the driver holds it (hashable by identity): its current Ray ref,
    and, with warm workers, the worker running it and the attempt it is."""

    spec: TrialSpec
    device: Device
    max_retries: int
    fault: str | None
    ref: Any = None
    worker: Any = None  # the _TrialWorker actor (warm workers only)
    attempt: int = 1
    cancelled: bool = False
    outcome: dict[str, Any] | None = None  # fetched early (wait looks at a warm worker's death)


def _attempt_number() -> int:
    """1 on a task's first run, 2 on Ray's first retry, ... Ray counts attempts in the core
    worker (0-based); Ray 2.60 has no public API for it, so a missing one reads as 1."""
    try:
        return int(ray._private.worker.global_worker.core_worker.get_current_task_attempt_number()) + 1
    except (AttributeError, TypeError, ValueError):
        return 1


def _resources(device: Device) -> dict[str, Any]:
    """What a trial (or a warm worker) asks of Ray on `device`: one GPU, or every CPU of the node."""
    if device.kind == "gpu":
        return {"num_gpus": 1, "num_cpus": 1, "scheduling_strategy": NodeAffinitySchedulingStrategy(device.node_id, soft=False)}
    return {"num_gpus": 0, "num_cpus": device.cpus,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(device.node_id, soft=False)}


def device_key(node_id: str, gpu_uuid: str) -> str:
    """A stable id of the card or CPU node a trial ran on: its GPU UUID, else "<node id>:cpu"."""
    return gpu_uuid or f"{node_id}:cpu"


def _visible_gpus() -> list[dict[str, Any]]:
    """The CUDA devices this process sees: name, UUID ("GPU-..."), total memory."""
    import torch

    from kvcore.bench.probes import gpu_uuid

    gpus = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"name": props.name, "uuid": gpu_uuid(props), "total_bytes": int(props.total_memory)})
    return gpus


@ray.remote(num_cpus=0, max_calls=1)
def _probe_node(has_gpus: bool) -> dict[str, Any]:
    """What this node offers: its GPUs, available host memory, CPU model (the probe imports
    kvcore, and so torch, only when it runs)."""
    import psutil

    from kvcore.bench.probes import cpu_name

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "host_available_bytes": int(psutil.virtual_memory().available),
        "cpu_name": cpu_name(),
        "gpus": _visible_gpus() if has_gpus else [],
    }


@contextlib.contextmanager
def _loopback_node_address() -> Iterator[None]:
    """While inside, Ray takes 127.0.0.1 as this node's address (see module docstring)."""
    from ray._private import ray_constants

    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    saved_env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's own child processes
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved_env


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address like "10.0.0.1:6379" or "ray://h:10001"; None for "auto"."""
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _check_reachable(address: str) -> None:
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as error:
        raise ClusterUnreachable(
            f"cluster.address={address!r}: no Ray cluster answers at {target[0]}:{target[1]} "
            f"({error}); start one with `ray start --head --port={target[1]}`, fix the address, "
            f"or leave cluster.address empty (and unset RAY_ADDRESS) to start a local Ray"
        ) from None


def start_local_ray(num_cpus: int | None, object_store_bytes: int) -> None:
    """Start a local Ray that listens on 127.0.0.1 only, without a dashboard."""
    with _loopback_node_address():
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            num_cpus=num_cpus,
            object_store_memory=object_store_bytes,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )


@dataclass
class Cluster:
    """A connected Ray cluster; `owned` when this process started it (and stops it)."""

    owned: bool
    address: str  # "local" or what was joined
    warm: bool = True  # warm workers (trial.warm_workers); False: a fresh worker process per trial
    workers: dict[Device, Any] = field(default_factory=dict)  # device -> its live _TrialWorker

    @classmethod
    def connect(cls, settings: ClusterSettings) -> "Cluster":
        """Join settings.address or $RAY_ADDRESS, reuse a Ray already initialized in this
        process, or start a local one; ClusterUnreachable when the address is dead."""
        if ray.is_initialized():
            return cls(owned=False, address="(this process)")
        address = settings.address or os.environ.get("RAY_ADDRESS") or ""
        if not address or address == "local":
            start_local_ray(settings.num_cpus, settings.object_store_bytes)
            return cls(owned=True, address="local")
        _check_reachable(address)
        target = _host_port(address)
        loopback = target is not None and target[0] in LOOPBACK
        with _loopback_node_address() if loopback else contextlib.nullcontext():
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError) as error:
                if target is None:  # "auto": nothing was reached, so nothing "answers there"
                    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    raise ClusterUnreachable(
                        f"cluster.address={address!r}: no running Ray cluster found on this machine "
                        f"({first}); start one with `ray start --head`, give its address, or leave "
                        f"cluster.address empty (and unset RAY_ADDRESS) to start a local Ray"
                    ) from None
                raise ClusterUnreachable(
                    f"cluster.address={address!r}: {error}; a cluster answers there, so check that "
                    f"this driver and every node agree on token authentication (the same "
                    f"RAY_AUTH_MODE, and the same token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                    f"~/.ray/auth_token) and run the same Ray version"
                ) from None
        return cls(owned=True, address=address)

    def probe(self, timeout_s: float = PROBE_TIMEOUT_S) -> list[dict[str, Any]]:
        """One probe task per alive node (see `_probe_node`), plus its CPUs as Ray counts them."""
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        refs = []
        for node in nodes:
            gpus = int(node["Resources"].get("GPU", 0))
            refs.append(
                _probe_node.options(
                    num_gpus=gpus,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
                ).remote(gpus > 0)
            )
        try:
            probes = ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"probing the cluster's devices took over {timeout_s:.0f} s: another job may hold "
                f"a node's GPUs; free them or join a cluster with free GPUs"
            ) from None
        for node, probe in zip(nodes, probes):
            probe["cpus"] = int(node["Resources"].get("CPU", 0))
        return probes

    def submit(self, spec: TrialSpec, device: Device, max_retries: int, fault: str | None = None) -> Submission:
        """Start one trial on `device`'s node: one GPU there, or all of its CPUs; with warm
        workers, on the device's worker (started now if it has none). `fault`: a fault to
        inject (tests only, see orchestrator.trial)."""
        submission = Submission(spec, device, max_retries, fault)
        if not self.warm:
            submission.ref = _trial_task.options(
                **_resources(device), max_retries=max_retries, retry_exceptions=False,
                name=f"trial-{spec.index}-{spec.key}",
            ).remote(spec, fault)
            return submission
        self._start(submission)
        return submission

    def _start(self, submission: Submission) -> None:
        """Run the submission's attempt on its device's warm worker, started first if it has none."""
        if submission.device not in self.workers:
            self.workers[submission.device] = _TrialWorker.options(**_resources(submission.device)).remote()
        submission.worker = self.workers[submission.device]
        spec = submission.spec
        submission.ref = submission.worker.run.options(name=f"trial-{spec.index}-{spec.key}").remote(
            spec, submission.attempt, submission.fault)

    def _retire(self, worker: Any, kill: bool) -> None:
        """Forget a worker that died (or is killed now): the next trial on its device starts a new one."""
        for name, live in list(self.workers.items()):
            if live is worker:
                del self.workers[name]
        if kill:
            with contextlib.suppress(Exception):
                ray.kill(worker, no_restart=True)

    def wait(self, submissions: Sequence[Submission], timeout_s: float) -> list[Submission]:
        """The trials that finished, first finished first: waits up to timeout_s for one, then
        takes every other one already done. A warm worker that died mid-trial is replaced and
        the trial rerun there (up to its max_retries), as Ray reruns a task."""
        if not submissions:
            return []
        by_ref = {s.ref: s for s in submissions}
        first, rest = ray.wait(list(by_ref), num_returns=1, timeout=timeout_s)
        if first and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            first += more
        done = []
        for ref in first:
            submission = by_ref[ref]
            if submission.worker is not None:
                submission.outcome = self._fetch_warm(submission)
                if submission.outcome is None:  # rerun on a fresh worker
                    continue
            done.append(submission)
        return done

    def _fetch_warm(self, submission: Submission) -> dict[str, Any] | None:
        """A warm trial's result; None when its worker died and the trial was started again."""
        try:
            return ray.get(submission.ref)
        except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as error:
            self._retire(submission.worker, kill=True)
            if submission.cancelled:
                return {"status": "ERROR", "reason": "cancelled", "metrics": {}, "info": {}}
            if "memory monitor" in str(error).lower():  # Ray's OOM killer: a result, as for a task
                line = next((l for l in str(error).splitlines() if "memory" in l.lower()), "")
                return {"status": "ERROR", "reason": f"oom: killed by Ray's memory monitor: {line.strip()[:300]}",
                        "metrics": {}, "info": {}}
            if submission.attempt <= submission.max_retries:
                submission.attempt += 1
                self._start(submission)
                return None
            first = (str(error).strip().splitlines() or [""])[0]
            reason = f"crash: the worker died on every attempt: {type(error).__name__}: {first}"[:500]
            return {"status": "ERROR", "reason": reason, "metrics": {}, "info": {},
                    "attempt": submission.attempt, "retries_exhausted": True}
        except ray.exceptions.RayError as error:
            self._retire(submission.worker, kill=True)
            first = (str(error).strip().splitlines() or [""])[0]
            return {"status": "ERROR", "reason": f"crash: {type(error).__name__}: {first}"[:500], "metrics": {}, "info": {}}

    @staticmethod
    def fetch(submission: Submission) -> dict[str, Any]:
        """The trial's result dict; Ray's own failures become ERROR results of the same shape
        (without times: the driver knows when it submitted the trial)."""
        if submission.outcome is not None:
            return submission.outcome
        exhausted = False
        try:
            return ray.get(submission.ref)
        except ray.exceptions.OutOfMemoryError as error:
            reason = f"oom: killed by Ray's memory monitor: {str(error).strip().splitlines()[0][:300]}"
        except ray.exceptions.TaskCancelledError:
            reason = "cancelled"
        except ray.exceptions.RayError as error:
            exhausted = isinstance(error, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError))
            died = "the worker died on every attempt: " if exhausted else ""
            first = (str(error).strip().splitlines() or [""])[0]
            reason = f"crash: {died}{type(error).__name__}: {first}"[:500]
        result = {"status": "ERROR", "reason": reason, "metrics": {}, "info": {}}
        return {**result, "retries_exhausted": True} if exhausted else result

    def cancel(self, submission: Submission) -> None:
        """Stop a trial: a warm trial's worker is killed (`ray.kill`: its card is free once the
        process has exited, and the next trial there starts a new worker); a per-trial task is
        force-cancelled, which kills its worker."""
        submission.cancelled = True
        if submission.worker is not None:
            self._retire(submission.worker, kill=True)
        else:
            ray.cancel(submission.ref, force=True)

    def close(self) -> None:
        for worker in list(self.workers.values()):
            self._retire(worker, kill=True)
        if self.owned and ray.is_initialized():
            ray.shutdown()
