"""Tests of the trial body (orchestrator/trial.py), called directly as plain functions: no Ray.

Run: python -m pytest tests/orchestrator/test_trial.py -q
"""

from __future__ import annotations

import math
import os

import pytest

from kvcore.bench import BenchResult
from orchestrator.grid import TrialSpec, trial_key
from orchestrator.capacity import trial_need_bytes
from orchestrator.settings import BENCH_PATHS, bench_config
from orchestrator.trial import run_trial, split_figures


def spec(**overrides) -> TrialSpec:
    """A tiny odd trial (3 layers, 6 heads over 2 KV heads, head dim 5) with short time boxes."""
    params = {
        "milestone.context_length": 24, "model.num_layers": 3, "model.num_heads": 6,
        "model.num_kv_heads": 2, "model.head_dim": 5, "model.weights_gb": 0.0001,
        "cache.dtype": "float16", "cache.sink_positions": 2, "bench.repetitions": 2,
        "bench.decode_steps": 4, "bench.rep_budget_s": 0.05, "model.name": "tiny",
    }
    params.update(overrides)
    return TrialSpec(index=3, key=trial_key(params), params=params)


def test_bench_config_maps_every_trial_parameter():
    cfg = bench_config(spec().params, device="cpu")
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (3, 6, 2, 5)
    assert (cfg.context_length, cfg.dtype, cfg.sink_positions, cfg.weights_gb) == (24, "float16", 2, 0.0001)
    assert (cfg.repetitions, cfg.decode_steps, cfg.rep_budget_s, cfg.device) == (2, 4, 0.05, "cpu")
    assert set(BENCH_PATHS.values()) <= {f for f in cfg.__dataclass_fields__}


def test_split_figures_numbers_to_metrics_strings_to_info():
    metrics, info = split_figures({"a": 1, "b": 2.5, "ok": True, "name": "cpu", "bad": math.nan})
    assert metrics == {"a": 1.0, "b": 2.5, "ok": 1.0}
    assert info == {"name": "cpu", "bad": "nan"}


def test_run_trial_measures_every_figure_on_the_cpu():
    result = run_trial(spec())
    assert result["status"] == "OK", result["reason"]
    assert result["reason"] == ""
    metrics, info = result["metrics"], result["info"]
    for figure in ("fill_rate_pos_s", "retrieve_rate_ops_s", "decode_tok_s", "kv_cache_gb", "total_vram_gb"):
        assert metrics[figure] > 0
    # 2 (K, V) x 3 layers x 24 positions x 2 KV heads x 5 x 2 bytes
    assert metrics["kv_cache_gb"] == pytest.approx(2 * 3 * 24 * 2 * 5 * 2 / 1e9)
    assert info["trial_device"] == "cpu" and info["device"] == "cpu"
    assert set(metrics) | set(info) >= {f for f in BenchResult.__dataclass_fields__}
    assert 0 < result["started_at"] <= result["finished_at"]
    # where it ran, the CPU's state at start, and the system series sampled while it ran
    assert info["hostname"] and info["cpu_count"] and "cpu_load_avg_1m" in info
    series = result["system_metrics"]["cpu_utilization_percentage"]
    assert len(series) >= 2 and result["started_at"] <= series[0][0] <= series[-1][0]


def test_a_short_sampling_interval_gives_a_point_per_interval():
    result = run_trial(spec(), sample_interval_s=0.05)
    series = result["system_metrics"]["system_memory_usage_megabytes"]
    wall = result["finished_at"] - result["started_at"]
    assert len(series) >= min(3, wall / 0.05)


def test_out_of_memory_is_an_error_result_naming_need_and_capacity():
    # 10 PB of weights: the CPU allocator refuses at once, nothing is touched (the need adds
    # 0.5 GB and the benchmark's own overhead, kvcore.bench.overhead_bytes)
    params = spec(**{"model.weights_gb": 1e7})
    result = run_trial(params)
    assert result["status"] == "ERROR"
    need = trial_need_bytes(params.params) / 1e9
    assert result["reason"].startswith(f"oom: needed about {need:.2f} GB (cache + weights + margin), cpu had ")
    assert "can't allocate memory" in result["reason"]
    assert result["metrics"] == {}


def test_other_failures_are_crash_results_with_a_traceback():
    result = run_trial(spec(**{"cache.dtype": "float64"}))  # bypasses the config's checks
    assert result["status"] == "ERROR"
    assert result["reason"].startswith("crash: ValueError: dtype must be one of")
    assert "Traceback" in result["info"]["traceback"]


def test_a_warm_trial_that_starts_over_its_workers_memory_baseline_is_invalid():
    from orchestrator.trial import leak_reason

    assert leak_reason(at_start=1_250_000_000, baseline=1_000_000_000, margin=256 << 20) == ""
    why = leak_reason(at_start=1_400_000_000, baseline=1_000_000_000, margin=256 << 20)
    assert why == "memory not back at start: 1400 MB in use, 400 MB over this worker's baseline of 1000 MB (margin 268 MB)"


def _worker_trials(n: int) -> list[dict]:
    from orchestrator.trial import Worker

    worker = Worker()
    return [worker.run(spec(**{"cache.dtype": dtype})) for dtype in ("float16", "bfloat16", "float32")[:n]]


def test_a_warm_worker_records_its_process_its_count_and_its_memory_at_each_start():
    first, second = _worker_trials(2)
    assert first["status"] == second["status"] == "OK"
    assert first["info"]["worker_pid"] == second["info"]["worker_pid"] == str(os.getpid())
    assert (first["info"]["worker_trials"], second["info"]["worker_trials"]) == ("0", "1")
    assert first["info"]["memory_baseline_bytes"] == first["info"]["memory_at_start_bytes"]
    assert second["info"]["memory_baseline_bytes"] == first["info"]["memory_at_start_bytes"]


@pytest.mark.gpu
def test_a_warm_worker_gives_the_card_back_to_its_baseline_between_trials():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    results = _worker_trials(3)
    for result in results:
        assert result["status"] == "OK", result["reason"]
        assert "memory not back" not in result["info"].get("invalid_reason", "")
    baseline = int(results[0]["info"]["memory_baseline_bytes"])
    assert all(abs(int(r["info"]["memory_at_start_bytes"]) - baseline) <= 256 << 20 for r in results)
