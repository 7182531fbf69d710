"""Tests of grid expansion and trial keys (orchestrator/grid.py): plain values, no Hydra.

Run: python -m pytest tests/orchestrator/test_grid.py -q
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.grid import TrialSpec, expand_grid, flatten, make_trials, trial_key

BASE = {"cache.dtype": "float32", "model.num_layers": 3, "milestone.context_length": 7}


def test_flatten_nested_mappings_to_dotted_paths():
    tree = {"cache": {"dtype": ["float16"]}, "model": {"num_layers": [3, 5], "x": {"y": 1}}, "resume": True}
    assert flatten(tree) == {
        "cache.dtype": ["float16"], "model.num_layers": [3, 5], "model.x.y": 1, "resume": True,
    }


def test_no_axes_is_the_base_alone():
    assert expand_grid(BASE, []) == [BASE]


def test_product_in_axis_order_first_axis_slowest():
    axes = [("cache.dtype", ("float16", "int8")), ("model.num_layers", (1, 2, 3))]
    trials = expand_grid(BASE, axes)
    assert [(t["cache.dtype"], t["model.num_layers"]) for t in trials] == [
        ("float16", 1), ("float16", 2), ("float16", 3), ("int8", 1), ("int8", 2), ("int8", 3),
    ]
    assert all(t["milestone.context_length"] == 7 for t in trials)
    assert BASE["cache.dtype"] == "float32", "the base is not modified"


def test_expansion_is_deterministic():
    axes = [("model.num_layers", (5, 1, 3)), ("cache.dtype", ("int8", "float16"))]
    assert expand_grid(BASE, axes) == expand_grid(dict(BASE), list(axes))


def test_unknown_or_empty_axis_is_a_value_error():
    with pytest.raises(ValueError, match=r"grid axis 'model\.layers' is not a trial parameter"):
        expand_grid(BASE, [("model.layers", (1,))])
    with pytest.raises(ValueError, match=r"grid axis 'cache\.dtype' has no values"):
        expand_grid(BASE, [("cache.dtype", ())])


def test_trial_key_is_a_stable_hash_of_the_parameters():
    params = {"cache.dtype": "float16", "model.num_layers": 3, "model.weights_gb": 0.5}
    # a golden value: changing how keys are computed orphans every recorded sweep
    assert trial_key(params) == "38f62a1edfb1f99a"
    assert trial_key(dict(reversed(list(params.items())))) == "38f62a1edfb1f99a"
    assert trial_key({**params, "model.num_layers": 4}) != trial_key(params)
    assert trial_key({**params, "model.weights_gb": 0.25}) != trial_key(params)


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.one_of(st.integers(), st.text(max_size=5)), max_size=6))
def test_trial_key_ignores_order_and_has_16_hex_digits(params):
    key = trial_key(params)
    assert key == trial_key(dict(sorted(params.items(), reverse=True)))
    assert len(key) == 16 and int(key, 16) >= 0


def test_make_trials_indexes_and_keys():
    trials = make_trials(BASE, [("cache.dtype", ("float16", "bfloat16"))])
    assert trials == (
        TrialSpec(0, trial_key({**BASE, "cache.dtype": "float16"}), {**BASE, "cache.dtype": "float16"}),
        TrialSpec(1, trial_key({**BASE, "cache.dtype": "bfloat16"}), {**BASE, "cache.dtype": "bfloat16"}),
    )


def test_make_trials_rejects_repeated_points():
    with pytest.raises(ValueError, match="grid points 0 and 2 are the same trial"):
        make_trials(BASE, [("model.num_layers", (1, 2, 1))])
