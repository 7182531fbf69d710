"""Tests of a trial's settings (orchestrator/settings.py): the config places kvcore's own
dataclass fields, and a trial's parameters turn into those dataclasses.

Run: python -m pytest tests/orchestrator/test_settings.py -q
"""

from __future__ import annotations

import dataclasses

import pytest

from kvcore.bench import BenchConfig
from kvcore.model_bench import ModelBenchConfig
from orchestrator.settings import (
    BENCH_PATHS,
    MODEL_PATHS,
    SHARED,
    bench_config,
    check_params,
    config_path,
    model_config,
    trial_paths,
)
from test_config import sweep_of


def test_every_placed_setting_is_a_field_of_kvcore_s_dataclasses():
    bench = {f.name for f in dataclasses.fields(BenchConfig)}
    model = {f.name for f in dataclasses.fields(ModelBenchConfig)}
    assert set(BENCH_PATHS.values()) <= bench
    assert set(MODEL_PATHS.values()) <= model
    assert set(SHARED) <= model and set(SHARED.values()) <= bench
    # each config path ends in the field's own name
    assert all(path.endswith(f".{name}") for path, name in {**BENCH_PATHS, **MODEL_PATHS}.items())


def test_the_model_benchmark_takes_the_shared_settings_from_the_proxy_s():
    params = sweep_of("+milestone=smoke", "bench.decode=model", "cache.dtype=int8", "cache.sink_positions=3",
                      "bench.repetitions=2", "milestone.context_length=96").trials[0].params
    bench, model = bench_config(params, "cpu"), model_config(params, "cpu")
    assert (bench.dtype, bench.sink_positions, bench.repetitions, bench.context_length) == ("int8", 3, 2, 96)
    assert (model.cache_dtype, model.sink_positions, model.repetitions, model.context_length) == ("int8", 3, 2, 96)
    assert (model.shape, model.new_tokens, model.weights_dtype) == ("tiny", 64, "float32")


def test_proxy_trials_carry_no_model_settings_and_model_trials_carry_them():
    proxy = sweep_of("+milestone=smoke").trials[0].params
    assert set(proxy) == {*BENCH_PATHS, "model.name"}
    model = sweep_of("+milestone=smoke", "bench.decode=model").trials[0].params
    assert {*MODEL_PATHS, "bench.decode", "model.hidden_size", "model.rope_scaling.factor"} <= set(model)
    assert set(trial_paths({"bench.decode": "proxy"})) == set(proxy)


@pytest.mark.parametrize("field, path", [("num_layers", "model.num_layers"), ("dtype", "cache.dtype"),
                                         ("cache_dtype", "cache.dtype"), ("peer", "bench.peer"),
                                         ("context_length", "milestone.context_length"), ("seed", None)])
def test_a_field_s_config_path(field, path):
    assert config_path(field) == path


def test_check_params_refuses_what_the_benchmark_refuses():
    params = sweep_of("+milestone=smoke").trials[0].params
    with pytest.raises(ValueError, match=r"^num_heads must be a multiple of num_kv_heads"):
        check_params({**params, "model.num_kv_heads": 4})
    with pytest.raises(ValueError, match=r"^decode must be one of \['proxy', 'model'\]"):
        check_params({**params, "bench.decode": "real"})
