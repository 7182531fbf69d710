"""Tests of the memory arithmetic (orchestrator/capacity.py): a trial's need, checked against
what kvcore really allocates, and which probed devices can hold it.

Run: python -m pytest tests/orchestrator/test_capacity.py -q
"""

from __future__ import annotations

import pytest

from kvcore import StreamingKVCache
from orchestrator.capacity import (
    Device,
    cache_bytes,
    devices_from_probe,
    fitting_devices,
    skip_reason,
    trial_need_bytes,
    trial_need_parts,
)

DTYPES = ["float32", "float16", "bfloat16", "int8", "float8_e4m3fn", "int4"]
GiB = 1024**3


def params(**overrides):
    """Trial parameters: tiny odd shape by default (3 layers, 6 heads over 2 KV heads, dim 5)."""
    p = {
        "milestone.context_length": 7, "model.num_layers": 3, "model.num_heads": 6,
        "model.num_kv_heads": 2, "model.head_dim": 5, "model.weights_gb": 0.0,
        "cache.dtype": "float32", "cache.sink_positions": 1,
    }
    p.update(overrides)
    return p


def m10(dtype):
    return params(**{"milestone.context_length": 16384, "model.num_layers": 32, "model.num_heads": 32,
                     "model.num_kv_heads": 32, "model.head_dim": 128, "model.weights_gb": 4.0,
                     "cache.dtype": dtype})


def cpu_node(available, cpus=2, node_id="n1"):
    return {"node_id": node_id, "host": "vm", "cpus": cpus, "host_available_bytes": available,
            "cpu_name": "Xeon", "gpus": []}


def gpu_node(node_id, *totals):
    return {"node_id": node_id, "host": node_id, "cpus": 16, "host_available_bytes": 100 * GiB,
            "cpu_name": "EPYC", "gpus": [{"name": f"GPU{t}", "uuid": f"GPU-{node_id}-{i}", "total_bytes": t}
                                         for i, t in enumerate(totals)]}


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_bytes_equal_what_the_cache_allocates(dtype):
    cache = StreamingKVCache(num_layers=3, max_positions=7, num_heads=6, head_dim=5, num_kv_heads=2,
                             dtype=dtype, sink_positions=1)
    assert cache_bytes(params(**{"cache.dtype": dtype})) == cache.memory_bytes()


def test_m10_float32_cache_is_the_seeds_17_18_gb():
    assert cache_bytes(m10("float32")) == 32 * 16384 * 32 * 128 * 2 * 4
    assert round(cache_bytes(m10("float32")) / 1e9, 2) == 17.18
    assert cache_bytes(m10("float16")) * 2 == cache_bytes(m10("float32"))
    # 8-bit: one byte per element plus a float32 scale per (K/V, layer, position, KV head)
    assert cache_bytes(m10("int8")) == 32 * 16384 * 32 * 2 * (128 + 4)


def test_need_is_cache_plus_weights_plus_margin():
    cache, weights, margin = trial_need_parts(m10("float16"))
    assert weights == 4_000_000_000
    # 0.5 GB + the benchmark's own overhead: one layer read back (2 x 16384 x 32 x 128 x 2),
    # the float64 check chunks (8 x 64 MiB), the pools (2 x (32 + 256 + 4) x 32 x 32 x 128 x 2), 256 MiB
    overhead = 2 * 16384 * 32 * 128 * 2 + 8 * 64 * 2**20 + 2 * 292 * 32 * 32 * 128 * 2 + 256 * 2**20
    assert margin == int(0.5e9) + overhead
    assert trial_need_bytes(m10("float16")) == cache + weights + margin


def test_unknown_dtype_is_a_value_error():
    with pytest.raises(ValueError, match="dtype must be one of"):
        cache_bytes(params(**{"cache.dtype": "float64"}))


def test_on_this_24_gib_cpu_machine_m10_float32_is_skipped_and_16_bit_runs():
    # 24 GiB of RAM with about 23 GB available, 80 % of it usable by a trial
    devices = devices_from_probe([cpu_node(23_000_000_000)], 0.95, 0.8)
    assert fitting_devices(trial_need_bytes(m10("float32")), devices) == []
    for dtype in ("float16", "bfloat16", "int8", "float8_e4m3fn"):
        assert fitting_devices(trial_need_bytes(m10(dtype)), devices) == list(devices)
    reason = skip_reason(m10("float32"), devices)
    assert reason.startswith("needs 23.33 GB (cache 17.18 + weights 4.00 + margin 2.15)")
    assert "offers 18.40 GB (of 23.00 GB available host memory)" in reason
    assert "Xeon (cpu) on vm" in reason


def test_cpu_cluster_is_one_device_per_node():
    devices = devices_from_probe([cpu_node(10 * GiB, cpus=4), cpu_node(20 * GiB, cpus=8, node_id="n2")], 0.9, 0.5)
    assert [(d.kind, d.cpus, d.memory_bytes, d.usable_bytes) for d in devices] == [
        ("cpu", 4, 10 * GiB, 5 * GiB), ("cpu", 8, 20 * GiB, 10 * GiB),
    ]


def test_gpus_only_where_there_are_any_and_a_node_offers_its_smallest_card():
    nodes = [gpu_node("a", 80 * GiB, 40 * GiB), cpu_node(500 * GiB), gpu_node("b", 80 * GiB)]
    devices = devices_from_probe(nodes, 1.0, 0.8)
    assert [(d.node_id, d.kind, d.uuid, d.memory_bytes, d.usable_bytes) for d in devices] == [
        ("a", "gpu", "GPU-a-0", 80 * GiB, 40 * GiB),
        ("a", "gpu", "GPU-a-1", 40 * GiB, 40 * GiB),
        ("b", "gpu", "GPU-b-0", 80 * GiB, 80 * GiB),
    ]
    need = 60 * GiB
    assert [d.node_id for d in fitting_devices(need, devices)] == ["b"]


def test_fraction_applies_to_gpu_total_memory():
    (device,) = devices_from_probe([gpu_node("h", 85_000_000_000)], 0.95, 0.8)
    assert device.usable_bytes == int(85_000_000_000 * 0.95)
    assert fitting_devices(trial_need_bytes(m10("float32")), [device]) == [device]


def test_skip_reason_without_devices():
    assert skip_reason(params(), []).endswith("but the cluster has no device to run trials")


def test_device_label():
    d = Device("0123456789", "gpu", "NVIDIA H100", "GPU-1", 80, 76, 16)
    assert d.label == "NVIDIA H100 (gpu) on 01234567"


def llama3_8b_1m(dtype):
    return params(**{"milestone.context_length": 1_048_576, "model.num_layers": 32, "model.num_heads": 32,
                     "model.num_kv_heads": 8, "model.head_dim": 128, "model.weights_gb": 4.9,
                     "cache.dtype": dtype})


def test_int4_cache_bytes_count_half_bytes_and_a_scale_per_32_values():
    # 128 values: 64 bytes + 4 float32 scales = 80 bytes per row (3.2x fewer than float16)
    assert cache_bytes(m10("int4")) == 32 * 16384 * 32 * 2 * 80
    assert cache_bytes(params(**{"cache.dtype": "int4"})) == 3 * 7 * 2 * 2 * (3 + 4)  # dim 5: 3 bytes, 1 scale


def test_one_million_positions_on_an_h200_fit_in_8_and_4_bit_and_16_bit_is_skipped_before_allocating():
    # one H200 (about 150 GB as torch reports it), 95 % usable
    devices = devices_from_probe([gpu_node("h200", 150_000_000_000)], 0.95, 0.8)
    for dtype in ("float8_e4m3fn", "int8", "int4"):
        assert fitting_devices(trial_need_bytes(llama3_8b_1m(dtype)), devices) == list(devices), dtype
    assert fitting_devices(trial_need_bytes(llama3_8b_1m("float16")), devices) == []
    reason = skip_reason(llama3_8b_1m("float16"), devices)
    assert reason.startswith("needs 148.09 GB (cache 137.44 + weights 4.90 + margin 5.75)"), reason
    assert "offers 142.50 GB (of 150.00 GB memory)" in reason
