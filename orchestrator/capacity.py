"""Memory arithmetic: what a trial needs and which of the cluster's devices can hold it.

Plain functions of plain values (no torch allocations, no Ray): the Ray adapter (ray_cluster) probes
the devices, this module decides, before anything is submitted, which trials fit where.

    need = trial_need_bytes(spec.params)        # cache + scales + weights + margin, bytes
    fits = fitting_devices(need, devices)       # [] -> the trial is SKIPPED with skip_reason

Byte arithmetic (GB are 10^9 bytes, as the milestone table counts them):
- cache = what kvcore's storage allocates for the trial's shape and cache dtype:
  `kvcore.storage.cache_bytes`, from the layout the cache allocates (K and V rows of head_dim
  elements; int8 / float8 add one float32 scale per row, int4 stores ceil(head_dim / 2) bytes
  and a float32 scale per 32 values), so it equals `StreamingKVCache.memory_bytes()` (a test checks).
- weights = model.weights_gb (the benchmark allocates and streams them).
- margin = 0.5 GB (CUDA context or interpreter and torch) + the benchmark's own overhead,
  `kvcore.bench.overhead_bytes` (one layer read back, the bounded float64 checks, the input
  pools): what the trial holds beyond cache and weights, so a trial that cannot fit is
  SKIPPED with its need and the device's capacity before it allocates anything.
- bench.decode=model: the real model's cache (`ModelBenchConfig.max_positions`: the prompt and the
  longest run after it) and weights (`kvcore.model_bench`'s cache_bytes and weight_bytes, from the
  model config's shape or the checkpoint's config.json), 0.5 GB + 10 % of its cache + 1.5 GB of
  activations (a prefill chunk's MLP, the teacher-forcing pass, logits); the proxy benchmark
  runs first and frees its memory, so the larger of the two is the need. transformers' own copy
  (its static cache) is not counted: the trial runs the peer only where it still fits, and says
  so where it does not.

Key decisions:
- What a device offers: a GPU's total memory x `gpu_memory_fraction` (it runs one trial at a
  time); for CPU trials the node's available host memory at probe time x
  `host_memory_fraction` (the rest of the machine keeps running).
- Ray picks which card of a node runs a `num_gpus=1` task, so a trial is only sent to a node
  whose every card can hold it: each card of a node offers as much as the node's smallest.
- A cluster with any GPU runs trials on GPUs only; without GPUs each node is one CPU device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvcore.bench import overhead_bytes
from kvcore.model_bench import cache_bytes as model_cache_bytes, weight_bytes
from kvcore.storage import cache_bytes as storage_cache_bytes
from orchestrator.settings import model_config, model_mode, model_shape

GB = 1e9
MARGIN_BYTES = 0.5 * GB  # fixed part of the margin: CUDA context, torch
MARGIN_CACHE_FRACTION = 0.10  # bench.decode=model: part of the margin that grows with the cache
MODEL_ACTIVATION_BYTES = 1.5 * GB  # bench.decode=model: activations, logits, the teacher-forcing pass


@dataclass(frozen=True)
class Device:
    """One place a trial can run: a GPU, or a whole CPU node."""

    node_id: str  # Ray node id
    kind: str  # "gpu" or "cpu"
    name: str  # e.g. "NVIDIA H100 80GB HBM3", or the CPU model
    uuid: str  # GPU UUID ("GPU-..."); "" for a CPU node
    memory_bytes: int  # GPU total memory, or the node's available host memory when probed
    usable_bytes: int  # what one trial may plan to use here
    cpus: int  # CPUs of the node (a CPU trial asks for all of them)
    host: str = ""  # node's hostname or IP, for messages

    @property
    def label(self) -> str:
        where = self.host or self.node_id[:8]
        return f"{self.name} ({self.kind}) on {where}"


def cache_bytes(params: Mapping[str, Any]) -> int:
    """Bytes of the KV cache of a trial (dotted-path parameters, see orchestrator.settings)."""
    kv_heads = params["model.num_kv_heads"] or params["model.num_heads"]  # None: one per query head
    return storage_cache_bytes(params["cache.dtype"], params["model.num_layers"], params["milestone.context_length"],
                               kv_heads, params["model.head_dim"])


def _model_need_parts(params: Mapping[str, Any]) -> tuple[int, int, int]:
    cfg = model_config(params, device="cpu")
    shape = model_shape(params)
    cache = model_cache_bytes(shape, cfg.max_positions, cfg.cache_dtype)
    weights = weight_bytes(shape, cfg.weights_dtype)
    return cache, weights, int(MARGIN_BYTES + MODEL_ACTIVATION_BYTES + MARGIN_CACHE_FRACTION * cache)


def trial_need_parts(params: Mapping[str, Any]) -> tuple[int, int, int]:
    """(cache, weights, margin) bytes of a trial (the real model's where larger)."""
    cache = cache_bytes(params)
    weights = int(params["model.weights_gb"] * GB)
    overhead = overhead_bytes(params["model.num_layers"], params["milestone.context_length"],
                              params["model.num_heads"], params["model.num_kv_heads"] or params["model.num_heads"],
                              params["model.head_dim"], params["cache.dtype"])
    margin = int(MARGIN_BYTES) + overhead
    if model_mode(params):
        model = _model_need_parts(params)
        if sum(model) > cache + weights + margin:
            return model
    return cache, weights, margin


def trial_need_bytes(params: Mapping[str, Any]) -> int:
    """Memory a trial needs on its device: cache + weights + margin."""
    return sum(trial_need_parts(params))


def devices_from_probe(
    nodes: Sequence[Mapping[str, Any]], gpu_memory_fraction: float, host_memory_fraction: float
) -> tuple[Device, ...]:
    """Devices of probed nodes. Each node is a dict as the scheduling probe returns it:
    {"node_id", "host", "cpus", "host_available_bytes", "cpu_name",
     "gpus": [{"name", "uuid", "total_bytes"}, ...]}."""
    gpus: list[Device] = []
    for node in nodes:
        node_gpus = [
            Device(
                node_id=node["node_id"],
                kind="gpu",
                name=gpu["name"],
                uuid=gpu["uuid"],
                memory_bytes=int(gpu["total_bytes"]),
                usable_bytes=int(gpu["total_bytes"] * gpu_memory_fraction),
                cpus=int(node["cpus"]),
                host=node.get("host", ""),
            )
            for gpu in node["gpus"]
        ]
        if node_gpus:
            smallest = min(device.usable_bytes for device in node_gpus)
            gpus.extend(replace(device, usable_bytes=smallest) for device in node_gpus)
    if gpus:
        return tuple(gpus)
    return tuple(
        Device(
            node_id=node["node_id"],
            kind="cpu",
            name=node.get("cpu_name", "") or "CPU",
            uuid="",
            memory_bytes=int(node["host_available_bytes"]),
            usable_bytes=int(node["host_available_bytes"] * host_memory_fraction),
            cpus=int(node["cpus"]),
            host=node.get("host", ""),
        )
        for node in nodes
        if node["cpus"] > 0
    )


def fitting_devices(need_bytes: int, devices: Sequence[Device]) -> list[Device]:
    """The devices that can hold a trial needing `need_bytes`."""
    return [device for device in devices if need_bytes <= device.usable_bytes]


def skip_reason(params: Mapping[str, Any], devices: Sequence[Device]) -> str:
    """Why a trial fits on no device: its need, and what the largest device offers."""
    cache, weights, margin = trial_need_parts(params)
    need = cache + weights + margin
    text = (
        f"needs {need / GB:.2f} GB (cache {cache / GB:.2f} + weights {weights / GB:.2f} + "
        f"margin {margin / GB:.2f})"
    )
    if not devices:
        return f"{text}, but the cluster has no device to run trials"
    best = max(devices, key=lambda device: device.usable_bytes)
    held = "available host memory" if best.kind == "cpu" else "memory"
    return (
        f"{text}; the largest device, {best.label}, offers {best.usable_bytes / GB:.2f} GB "
        f"(of {best.memory_bytes / GB:.2f} GB {held})"
    )
