"""A trial's settings: kvcore's own config dataclasses, and where their fields sit in the config.

A trial's kvcore settings are `kvcore.bench.BenchConfig` (every trial) and, with
`bench.decode=model`, `kvcore.model_bench.ModelBenchConfig`. Their fields, types, defaults and
checks are declared there, once; the config only places them in the sections a user looks in,
under their own names:

    milestone.context_length                              BenchConfig
    model.{num_layers, num_heads, num_kv_heads, head_dim, weights_gb}
    cache.{dtype, sink_positions}
    bench.{repetitions, decode_steps, rep_budget_s}
    model.{checkpoint, weights_dtype}, bench.{new_tokens, peer}    ModelBenchConfig (bench.decode=model)
    model.{hidden_size, vocab_size, ...}                  its shape (transformers' LlamaConfig keys)

`orchestrator.config` builds the schema's trial sections from these dataclasses (their types;
conf/config.yaml holds the values). A trial's parameters are dotted config paths (what grid
keys, trial keys and MLflow params use); `bench_config(params, device)` and
`model_config(params, device)` turn them into the dataclasses the benchmarks take.

Key decisions:
- The model benchmark shares the proxy's context, cache dtype, sinks and repetitions: its
  config is built from the trial's BenchConfig (`SHARED`), so they cannot differ.
- `model.name` labels the trial (and names the real model's shape); the model mode's
  settings are trial parameters only with bench.decode=model, so proxy trials keep their keys.
- BenchConfig fields the config does not place (prefill_chunk, seed, ...) keep their defaults.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvcore.bench import BenchConfig
from kvcore.model_bench import SHAPE_KEYS, SHAPES, ModelBenchConfig

# config section -> the BenchConfig fields it holds (config key = field name)
PLACES: dict[str, tuple[str, ...]] = {
    "milestone": ("context_length",),
    "model": ("num_layers", "num_heads", "num_kv_heads", "head_dim", "weights_gb"),
    "cache": ("dtype", "sink_positions"),
    "bench": ("repetitions", "decode_steps", "rep_budget_s"),
}
# config section -> the ModelBenchConfig fields only bench.decode=model reads (config key = field name)
MODEL_PLACES: dict[str, tuple[str, ...]] = {
    "model": ("checkpoint", "weights_dtype"),
    "bench": ("new_tokens", "peer"),
}
# what the model benchmark takes from the trial's BenchConfig: ModelBenchConfig field -> BenchConfig field
SHARED = {"cache_dtype": "dtype", "context_length": "context_length", "repetitions": "repetitions",
          "sink_positions": "sink_positions", "device": "device"}
# model.<key> -> the LlamaConfig key of the real model's shape, where they differ (the BenchConfig fields)
HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim"}
# the real model's other shape keys sit in the model section under LlamaConfig's own names
MODEL_SHAPE_KEYS = tuple(key for key in SHAPE_KEYS if key not in HF_NAMES.values())
LABEL = "model.name"  # names the trial's model; the real model's shape (ModelBenchConfig.shape)
DECODE = "bench.decode"  # the trial's mode: proxy (the cache and a weights blob) or model (also the real model)
DECODE_MODES = ("proxy", "model")


def _paths(places: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    return {f"{section}.{name}": name for section, names in places.items() for name in names}


BENCH_PATHS = _paths(PLACES)  # config path -> BenchConfig field
MODEL_PATHS = _paths(MODEL_PLACES)  # config path -> ModelBenchConfig field


def model_mode(params: Mapping[str, Any]) -> bool:
    """Whether a trial runs the real model too (bench.decode=model)."""
    return params.get(DECODE, "proxy") == "model"


def trial_paths(flat: Mapping[str, Any]) -> list[str]:
    """The config paths that are a trial's parameters, given the flattened config: BenchConfig's
    and the label, plus with bench.decode=model the mode, ModelBenchConfig's and the shape's
    (a rope scaling mapping's keys included)."""
    paths = [*BENCH_PATHS, LABEL]
    mode = flat.get(DECODE, "proxy")
    if mode not in DECODE_MODES:
        raise ValueError(f"{DECODE} must be one of {list(DECODE_MODES)}, got {mode!r}")
    if mode == "model":
        shape = {f"model.{key}" for key in MODEL_SHAPE_KEYS}
        paths += [p for p in flat if p == DECODE or p in MODEL_PATHS or p in shape
                  or p.startswith("model.rope_scaling.")]
    return paths


def config_path(field_name: str) -> str | None:
    """The config path of a BenchConfig or ModelBenchConfig field; None where the config does not place it."""
    field_name = SHARED.get(field_name, field_name)  # ModelBenchConfig's name of a shared field
    for path, name in (*BENCH_PATHS.items(), *MODEL_PATHS.items()):
        if name == field_name:
            return path
    return DECODE if field_name == "decode" else None


def bench_config(params: Mapping[str, Any], device: str) -> BenchConfig:
    """The BenchConfig of a trial's parameters on `device` (not validated here)."""
    missing = sorted(set(BENCH_PATHS) - set(params))
    assert not missing, f"trial parameters lack {missing}"
    return BenchConfig(device=device, **{name: params[path] for path, name in BENCH_PATHS.items()})


def model_shape(params: Mapping[str, Any]) -> dict[str, Any]:
    """The LlamaConfig shape of a bench.decode=model trial: the checkpoint's config.json, else
    the model section's keys (model.num_layers -> num_hidden_layers, ...)."""
    checkpoint = params.get("model.checkpoint")
    if checkpoint:
        path = Path(checkpoint, "config.json")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"model.checkpoint: cannot read {path}: {error}") from None
        base = SHAPES["llama7b"]
        shape = {key: config.get(key, base[key]) for key in SHAPE_KEYS}
        shape["head_dim"] = config.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
        return shape
    shape = {hf: params[f"model.{key}"] for key, hf in HF_NAMES.items()}
    for key in MODEL_SHAPE_KEYS:
        if key != "rope_scaling":
            shape[key] = params[f"model.{key}"]
    prefix = "model.rope_scaling."
    scaling = {p[len(prefix):]: v for p, v in params.items() if p.startswith(prefix)}
    shape["rope_scaling"] = scaling or None
    return shape


def model_config(params: Mapping[str, Any], device: str) -> ModelBenchConfig:
    """The ModelBenchConfig of a bench.decode=model trial on `device` (not validated here):
    the shared settings from its BenchConfig, the rest from the model mode's parameters."""
    bench = bench_config(params, device)
    shape = () if params["model.checkpoint"] else tuple(sorted(model_shape(params).items()))
    return ModelBenchConfig(
        shape=params[LABEL], shape_overrides=shape,
        **{name: getattr(bench, field) for name, field in SHARED.items()},
        **{name: params[path] for path, name in MODEL_PATHS.items()},
    )


def check_params(params: Mapping[str, Any]) -> None:
    """ValueError for a trial the benchmark(s) would refuse; the message starts with the field."""
    bench_config(params, device="cpu").validate()
    mode = params.get(DECODE, "proxy")
    if mode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {list(DECODE_MODES)}, got {mode!r}")
    if model_mode(params):
        model_config(params, device="cpu").validate()
