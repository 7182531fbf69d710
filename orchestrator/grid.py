"""A milestone's grid: the trials it expands to and their stable keys. Plain values only.

A grid is a list of axes, each a config path and its values, e.g.
`[("cache.dtype", ("float32", "float16"))]`. The trials are the product of the axes applied
to the base parameters (the composed config's trial keys, flattened to dotted paths):

    expand_grid({"cache.dtype": "float32", "model.num_layers": 32},
                [("cache.dtype", ("float32", "float16"))])
    -> [{"cache.dtype": "float32", "model.num_layers": 32},
        {"cache.dtype": "float16", "model.num_layers": 32}]

Key decisions:
- Order is deterministic: the product in the axes' order (the first axis varies slowest),
  each axis in its values' order, so trial indexes are stable across runs.
- `trial_key` hashes the parameters only (sorted JSON, SHA-256, 16 hex digits): the same
  trial gets the same key in any sweep, grid order or process, which is what resuming a sweep
  and finding a trial in MLflow rely on. Ints and floats must already have their config types
  (4 and 4.0 hash differently); the config module coerces them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Axis = tuple[str, tuple[Any, ...]]


@dataclass(frozen=True)
class TrialSpec:
    """One point of the grid: what `orchestrator.trial.run_trial` runs."""

    index: int  # position in the expanded grid
    key: str  # trial_key(params)
    params: dict[str, Any]  # dotted config path -> value, e.g. {"cache.dtype": "float16", ...}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {dotted path: leaf}; a leaf is anything that is not a mapping."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{path}."))
        else:
            flat[path] = value
    return flat


def expand_grid(base: Mapping[str, Any], axes: Sequence[Axis]) -> list[dict[str, Any]]:
    """The trials' parameters: `base` with every combination of the axes' values applied."""
    for path, values in axes:
        if path not in base:
            raise ValueError(
                f"grid axis {path!r} is not a trial parameter; expected one of {sorted(base)}"
            )
        if len(values) == 0:
            raise ValueError(f"grid axis {path!r} has no values; give at least one, e.g. [{base[path]!r}]")
    paths = [path for path, _ in axes]
    trials = []
    for combination in itertools.product(*(values for _, values in axes)):
        params = dict(base)
        params.update(zip(paths, combination))
        trials.append(params)
    return trials


def trial_key(params: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of a trial's parameters (independent of key order)."""
    text = json.dumps(dict(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_trials(base: Mapping[str, Any], axes: Sequence[Axis]) -> tuple[TrialSpec, ...]:
    """Expand the grid into TrialSpecs; ValueError when two grid points are the same trial."""
    trials = []
    seen: dict[str, int] = {}
    for index, params in enumerate(expand_grid(base, axes)):
        key = trial_key(params)
        if key in seen:
            raise ValueError(
                f"grid points {seen[key]} and {index} are the same trial ({params}); "
                f"remove the repeated value from the grid"
            )
        seen[key] = index
        trials.append(TrialSpec(index=index, key=key, params=params))
    return tuple(trials)
