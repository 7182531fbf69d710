"""Tests of the configs in conf/ and their checks (orchestrator/config.py): every real config
file composes, milestone criteria equal the milestone table, overrides behave as Hydra users
expect, and every configuration mistake is one ValueError naming the key.

Run: python -m pytest tests/orchestrator/test_config.py -q
"""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from orchestrator.config import CONF_DIR, MilestoneMissing, Sweep, available_milestones, default_criteria, load_sweep
from orchestrator.criteria import MODEL_METRICS

# The milestone table (README / MILESTONES.md), written out independently of conf/:
# name: (context, KV dtype, fill >, retrieve >, KV cache < GB, token gen >, total VRAM < GB)
TABLE = {
    "m8": (4096, "float32", 500, 5000, 4.5, 40, 10),
    "m9": (8192, "float32", 250, 2500, 9, 30, 12),
    "m10": (16384, "float32", 125, 1250, 18, 20, 24),
    "m11": (32768, "float32", 60, 600, 36, 10, 48),
    "m12": (65536, "float16", 30, 300, 36, 5, 48),
}
# criterion name: (figure it judges, op) as the table's columns read
COLUMNS = {
    "fill_rate": ("fill_rate_pos_s", ">"),
    "retrieve_rate": ("retrieve_rate_ops_s", ">"),
    "kv_cache": ("kv_cache_gb", "<"),
    "token_gen": ("decode_tok_s", ">"),
    "total_vram": ("total_vram_gb", "<"),
}
# The override keys users rely on (their names are the contract).
CONTRACT_KEYS = [
    "milestone.context_length", "model.num_layers", "model.num_heads", "model.num_kv_heads",
    "model.head_dim", "model.weights_gb", "cache.dtype", "cache.sink_positions",
    "bench.repetitions", "cluster.address", "tracking.uri", "resume",
    "trial.max_retries", "trial.timeout_s", "spool.dir",
]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def sweep_of(*overrides: str, cwd="/tmp") -> Sweep:
    return load_sweep(composed(*overrides), cwd=cwd, overrides=overrides)


# m13: Llama-3-8B's shape at 1,048,576 positions, criteria from the table's arithmetic (halving
# per doubling from m10; KV budget = the float8 cache 70.87 GB rounded up; VRAM = 4/3 of it)
M13 = (1_048_576, "float8_e4m3fn", 1.9, 19, 75, 0.3, 100)


MILESTONE_FILES = sorted(CONF_DIR.glob("milestone/*.yaml"))


def test_the_table_s_milestones_have_their_files():
    assert set(TABLE) | {"m13"} <= set(available_milestones())


@pytest.mark.parametrize("path", MILESTONE_FILES, ids=lambda p: p.stem)
def test_every_milestone_file_composes_and_judges_the_default_criteria(path):
    sweep = sweep_of(f"+milestone={path.stem}")
    assert sweep.milestone == path.stem and sweep.title and sweep.trials
    model = sweep.trials[0].params.get("bench.decode") == "model"
    judged = {c.name: (c.metric, c.op) for c in sweep.criteria}
    for name, default in default_criteria().items():
        metric = MODEL_METRICS.get(default["metric"], default["metric"]) if model else default["metric"]
        assert judged[name] == (metric, default["op"]), name
        assert sweep.params[f"milestone.criteria.{name}.metric"] == metric  # the logged config says what is judged


@pytest.mark.parametrize("path", MILESTONE_FILES, ids=lambda p: p.stem)
def test_milestone_files_give_thresholds_and_leave_metric_and_op_to_the_defaults(path):
    criteria = OmegaConf.to_container(OmegaConf.load(path).milestone.criteria)
    for name, default in default_criteria().items():
        given = criteria[name]
        assert "threshold" in given, f"{path.name}: {name} has no threshold"
        for key in ("metric", "op"):
            assert given.get(key, None) != default[key], f"{path.name}: {name}.{key} restates conf/config.yaml"


def test_the_criteria_defaults_are_the_table_s_columns():
    assert {name: (c["metric"], c["op"]) for name, c in default_criteria().items()} == COLUMNS


def _readme_milestone_rows() -> dict[str, list[str]]:
    """The README's milestone table: name -> its cells after the name."""
    text = (CONF_DIR.parent / "README.md").read_text()
    table = text[text.index("| milestone | title |"):].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def _number(cell: str) -> float:
    return float(cell.split()[0].replace(",", ""))


@pytest.mark.parametrize("name", sorted(_readme_milestone_rows()))
def test_the_readme_s_milestone_table_reads_as_the_files_say(name):
    """Rows the README shows agree with their files (a new milestone needs no row)."""
    title, context, grid, *thresholds = _readme_milestone_rows()[name]
    sweep = sweep_of(f"+milestone={name}")
    assert title.startswith(sweep.title)
    assert _number(context) == sweep.trials[0].params["milestone.context_length"]
    assert grid.split(", ") == [t.params["cache.dtype"] for t in sweep.trials]
    judged = {c.name: c.threshold for c in sweep.criteria}
    assert [_number(cell) for cell in thresholds] == [judged[n] for n in COLUMNS]


def test_m13_composes_one_million_positions_of_llama3_8b_in_8_and_4_bit():
    context, dtype, fill, retrieve, kv, tok, vram = M13
    sweep = sweep_of("+milestone=m13")
    expected = dict(zip(COLUMNS, (fill, retrieve, kv, tok, vram)))
    assert {c.name: (c.metric, c.op, c.threshold) for c in sweep.criteria} == {
        n: (*COLUMNS[n], float(expected[n])) for n in COLUMNS}
    assert [t.params["cache.dtype"] for t in sweep.trials] == ["float8_e4m3fn", "int8", "int4"]
    for trial in sweep.trials:
        p = trial.params
        assert p["milestone.context_length"] == context
        assert (p["model.num_layers"], p["model.num_heads"], p["model.num_kv_heads"], p["model.head_dim"]) == (
            32, 32, 8, 128)
    # 125 x 16384 / 1048576 = 1.95 and 20 x 16384 / 1048576 = 0.31, rounded down
    assert fill <= 125 * 16384 / context and tok <= 20 * 16384 / context and vram == round(kv * 4 / 3)


def test_m13_in_float16_is_skipped_with_need_and_capacity_before_anything_is_allocated(monkeypatch):
    import torch

    from orchestrator.capacity import devices_from_probe
    from orchestrator.scheduler import split_by_capacity

    allocated = []
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocated.append(a))
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: allocated.append(a))
    h200 = {"node_id": "h200", "host": "h200", "cpus": 16, "host_available_bytes": 10**11, "cpu_name": "EPYC",
            "gpus": [{"name": "NVIDIA H200", "uuid": "GPU-1", "total_bytes": 150_000_000_000}]}
    devices = devices_from_probe([h200], 0.95, 0.8)
    runnable, skipped = split_by_capacity(sweep_of("+milestone=m13", "grid.cache.dtype=[float16,int4]").trials,
                                          devices)
    assert [t.params["cache.dtype"] for t in runnable] == ["int4"]
    (spec, reason), = skipped
    assert spec.params["cache.dtype"] == "float16"
    assert reason.startswith("needs 148.09 GB (cache 137.44 + weights 4.90 + margin 5.75)")
    assert "NVIDIA H200 (gpu) on h200, offers 142.50 GB" in reason
    assert allocated == []


@pytest.mark.parametrize("name", sorted(TABLE))
def test_milestone_criteria_equal_the_table(name):
    context, dtype, fill, retrieve, kv, tok, vram = TABLE[name]
    sweep = sweep_of(f"+milestone={name}")
    assert sweep.milestone == name
    expected = dict(zip(COLUMNS, (fill, retrieve, kv, tok, vram)))
    got = {c.name: (c.metric, c.op, c.threshold) for c in sweep.criteria}
    assert got == {n: (*COLUMNS[n], float(expected[n])) for n in COLUMNS}
    # the seed's 7B model at the milestone's context, with the table's dtype among the trials
    for trial in sweep.trials:
        assert trial.params["milestone.context_length"] == context
        assert (trial.params["model.num_layers"], trial.params["model.num_heads"]) == (32, 32)
        assert (trial.params["model.num_kv_heads"], trial.params["model.head_dim"]) == (32, 128)
        assert trial.params["model.weights_gb"] == 4.0
    dtypes = [t.params["cache.dtype"] for t in sweep.trials]
    assert dtypes[0] == dtype, "the table's point comes first"
    assert len(set(dtypes)) == len(dtypes)


def test_m10_grid_holds_the_seed_point_and_16_bit_storage():
    dtypes = [t.params["cache.dtype"] for t in sweep_of("+milestone=m10").trials]
    assert dtypes[:3] == ["float32", "float16", "bfloat16"]


def test_smoke_is_tiny_and_cheap():
    sweep = sweep_of("+milestone=smoke")
    assert len(sweep.trials) == 2
    for trial in sweep.trials:
        p = trial.params
        assert p["model.name"] == "tiny"
        assert p["model.num_layers"] * p["milestone.context_length"] * p["model.num_kv_heads"] * p["model.head_dim"] < 10**5
        assert p["model.weights_gb"] <= 0.01


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("milestone/*.yaml")), ids=lambda p: p.stem)
def test_milestone_file_opens_with_the_command_that_runs_it(path):
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines[0] == "# @package _global_"  # Hydra's directive must come first
    assert lines[1] == f"# python -m orchestrator +milestone={path.stem}"


def test_config_yaml_has_self_first_and_a_comment_on_every_top_level_key():
    text = (CONF_DIR / "config.yaml").read_text()
    lines = text.splitlines()
    defaults = OmegaConf.create(text).defaults
    assert defaults[0] == "_self_"
    assert "milestone" not in str(defaults), "+milestone=<name> appends it"
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+:", line):
            assert lines[i - 1].startswith("# "), f"top-level key {line!r} lacks a comment line"


@pytest.mark.parametrize("model", ["llama7b", "llama3_8b", "tiny"])
def test_every_model_composes(model):
    sweep = sweep_of("+milestone=m10", f"model={model}")
    p = sweep.trials[0].params
    assert p["model.name"] == model
    assert p["model.num_heads"] % p["model.num_kv_heads"] == 0


def test_llama3_8b_is_grouped_query_attention():
    p = sweep_of("+milestone=m10", "model=llama3_8b").trials[0].params
    assert (p["model.num_heads"], p["model.num_kv_heads"]) == (32, 8)


@pytest.mark.parametrize("key", CONTRACT_KEYS)
def test_contract_keys_exist(key):
    cfg = composed("+milestone=m10")
    assert OmegaConf.select(cfg, key, default="absent") != "absent"


def test_overrides_reach_every_trial():
    sweep = sweep_of("+milestone=m10", "model.num_layers=8", "milestone.context_length=1024",
                     "cache.sink_positions=0", "bench.repetitions=2", "model.weights_gb=1")
    for trial in sweep.trials:
        p = trial.params
        assert (p["model.num_layers"], p["milestone.context_length"]) == (8, 1024)
        assert (p["cache.sink_positions"], p["bench.repetitions"]) == (0, 2)
        assert p["model.weights_gb"] == 1.0 and isinstance(p["model.weights_gb"], float)


def test_grid_override_replaces_the_axis_and_a_pinned_key_removes_it():
    assert [t.params["cache.dtype"] for t in sweep_of("+milestone=m10", "grid.cache.dtype=[float16]").trials] == ["float16"]
    assert [t.params["cache.dtype"] for t in sweep_of("+milestone=m10", "cache.dtype=bfloat16").trials] == ["bfloat16"]


def test_grid_adds_axes_in_order_and_coerces_numbers():
    sweep = sweep_of("+milestone=smoke", "+grid.model.weights_gb=[1,2]")
    points = [(t.params["cache.dtype"], t.params["model.weights_gb"]) for t in sweep.trials]
    assert points == [("float32", 1.0), ("float32", 2.0), ("float16", 1.0), ("float16", 2.0)]
    assert [t.index for t in sweep.trials] == [0, 1, 2, 3]
    assert len({t.key for t in sweep.trials}) == 4


def test_trial_keys_and_sweep_key_are_stable_across_loads():
    a, b = sweep_of("+milestone=m10"), sweep_of("+milestone=m10")
    assert [t.key for t in a.trials] == [t.key for t in b.trials]
    assert a.key == b.key
    assert sweep_of("+milestone=m10", "grid.cache.dtype=[float16]").key != a.key
    # where the run is recorded does not change what is measured
    assert sweep_of("+milestone=m10", "tracking.uri=sqlite:///x.db", "resume=false").key == a.key


def test_paths_are_absolute_and_settings_carried(tmp_path):
    sweep = sweep_of("+milestone=smoke", "spool.dir=sp", "trial.max_retries=5", "trial.timeout_s=30",
                     "resume=false", cwd=tmp_path)
    assert sweep.spool_dir == str(tmp_path / "sp")
    assert (sweep.trial.max_retries, sweep.trial.timeout_s, sweep.resume) == (5, 30.0, False)
    assert sweep.experiment == "kvbench-smoke"
    assert sweep.params["grid.cache.dtype"] == '["float32", "float16"]'
    assert "milestone:" in sweep.config_yaml and "${" not in sweep.config_yaml


def test_no_milestone_lists_the_available_ones():
    with pytest.raises(MilestoneMissing, match=r"\+milestone=.*m10.*smoke"):
        load_sweep(composed(), cwd="/tmp")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_layers=0", r"model\.num_layers: num_layers must be a positive int, got 0"),
        ("milestone.context_length=-5", r"milestone\.context_length: .*positive int, got -5"),
        ("model.head_dim=-1", r"model\.head_dim"),
        ("model.num_kv_heads=4", r"num_heads must be a multiple of num_kv_heads.*6.*4"),
        ("cache.dtype=float64", r"cache\.dtype: dtype must be one of .*'float64'"),
        ("grid.cache.dtype=[float16,int2]", r"grid\.cache\.dtype \(grid point 1: cache\.dtype='int2'\)"),
        ("cache.sink_positions=256", r"cache\.sink_positions: .*\[0, context_length=256\)"),
        ("model.weights_gb=-1", r"weights_gb"),
        ("bench.repetitions=0", r"bench\.repetitions"),
        ("grid.cache.dtype=float16", r"grid\.cache\.dtype must be a list.*grid\.cache\.dtype=\[float16\]"),
        ("grid.cache.dtype=[]", r"grid axis 'cache\.dtype' has no values"),
        ("grid.cache.dtype=[float16,float16]", r"grid points 0 and 1 are the same trial"),
        ("+grid.model.layers=[1]", r"grid\.model\.layers is not a trial parameter"),
        ("+grid.model.num_layers=[one]", r"grid\.model\.num_layers values must be of type int"),
        ("~milestone.criteria.token_gen", r"lacks the criteria \['token_gen'\]"),
        ("milestone.criteria.kv_cache.metric=kv_gb", r"milestone\.criteria\.kv_cache\.metric must be a figure"),
        ("milestone.criteria.kv_cache.op='<='", r"op must be one of \['>', '<'\]"),
        ("cluster.gpu_memory_fraction=1.5", r"cluster\.gpu_memory_fraction must be a number > 0.0 and <= 1.0"),
        ("trial.max_retries=-1", r"trial\.max_retries"),
        ("trial.timeout_s=0", r"trial\.timeout_s"),
        ("model.name=???", r"model\.name is missing"),
    ],
)
def test_configuration_mistakes_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        sweep_of("+milestone=smoke", override)


@pytest.mark.parametrize("override", ["model.num_layers=abc", "resume=maybe", "milestone.criteria.kv_cache.threshold=big"])
def test_wrong_types_fail_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        composed("+milestone=smoke", override)


def test_unknown_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        composed("+milestone=smoke", "model.layers=3")


def test_the_trial_sections_take_kvcore_s_types():
    """The schema types a trial's settings as kvcore's dataclasses do (orchestrator/settings.py
    places them): BenchConfig's num_kv_heads may be null (num_heads), its floats take ints."""
    import typing

    from kvcore.bench import BenchConfig
    from orchestrator.config import Schema
    from orchestrator.settings import BENCH_PATHS

    hints = typing.get_type_hints(BenchConfig)
    for path, name in BENCH_PATHS.items():
        section, key = path.split(".")
        assert typing.get_type_hints(typing.get_type_hints(Schema)[section])[key] == hints[name], path
    p = sweep_of("+milestone=smoke", "model.num_kv_heads=null", "bench.rep_budget_s=1").trials[0].params
    assert p["model.num_kv_heads"] is None and p["bench.rep_budget_s"] == 1.0
    from orchestrator.capacity import cache_bytes
    assert cache_bytes(p) == 2 * 3 * 256 * 6 * 16 * 4  # None: one KV head per query head (6), float32
    with pytest.raises(ConfigCompositionException):
        composed("+milestone=smoke", "bench.rep_budget_s=abc")
