"""The sweep's configuration: Hydra's composed config checked and turned into frozen data.

The only module that reads Hydra/OmegaConf. `conf/config.yaml` holds the values (defaults,
one comment per key, the criteria's metric and op included), `Schema` below their types: it is
registered in Hydra's ConfigStore as `kvbench_schema` and merged right after config.yaml's own
values (its fields are all `???`, so it adds types, not values), so a wrongly typed override
(`model.num_layers=abc`) fails at compose time. The schema's trial sections (milestone, model,
cache, bench) are built from kvcore's `BenchConfig` and `ModelBenchConfig`: each field that
orchestrator/settings.py places in a section takes the dataclass's type, so a trial's settings
are declared once. `load_sweep(cfg)` then checks what types cannot (non-positive sizes, unknown
dtype, heads not divisible, sinks not below the context, a missing criterion or threshold, a
grid key that is not a trial parameter, a figure no benchmark produces) and returns a `Sweep`
the rest of the orchestrator takes; every problem is one `ValueError` naming the key, the value
and the fix, raised before Ray starts or MLflow is touched.

Key decisions:
- Trial parameters are dotted config paths (`model.num_layers`), the names users override;
  the grid uses the same paths (`grid.cache.dtype=[float16]`).
- The benchmark's own checks (`kvcore.bench.BenchConfig.validate`) judge every grid point,
  so the orchestrator and the benchmark cannot disagree on what is valid; their message is
  prefixed with the config key it came from.
- Paths are made absolute against the directory the command runs in.
- Nothing here masks secrets: orchestrator.tracking redacts whatever it logs.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from kvcore.bench import BenchConfig, BenchResult
from kvcore.model_bench import SHAPES, ModelBenchConfig, ModelBenchResult
from orchestrator.criteria import Criterion, for_model_decode
from orchestrator.grid import Axis, TrialSpec, flatten, make_trials
from orchestrator.settings import MODEL_PLACES, MODEL_SHAPE_KEYS, PLACES, check_params, config_path, trial_paths

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SCHEMA_NAME = "kvbench_schema"


# ---------------------------------------------------------------- schema (types only)


@dataclass
class CriterionSchema:
    metric: str = MISSING
    op: str = MISSING
    threshold: float = MISSING


def default_criteria(conf_dir: Path = CONF_DIR) -> dict[str, dict[str, Any]]:
    """The criteria every milestone judges, with their metric and op: conf/config.yaml's
    milestone.criteria (a milestone file gives their thresholds)."""
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml").milestone.criteria, resolve=False)
    assert isinstance(raw, dict) and raw, "conf/config.yaml declares the default criteria"
    return raw


def _missing(kind: Any) -> tuple[Any, Any]:
    """A schema field's type and its value `???` (conf/config.yaml gives the value)."""
    return kind, field(default=MISSING)


def _typed(source: type, names: Sequence[str]) -> list[tuple[str, Any, Any]]:
    """Schema fields for fields of a kvcore config dataclass, typed as it types them (no
    values: conf/config.yaml holds those)."""
    hints = typing.get_type_hints(source)
    return [(name, *_missing(hints[name])) for name in names]


def _shape_typed() -> list[tuple[str, Any, Any]]:
    """Schema fields of the real model's shape keys (kvcore.model_bench.SHAPES), typed as its
    tiny shape's values are (a mapping, rope_scaling, may be null)."""
    sample = SHAPES["tiny"]
    return [(key, *_missing(Optional[Dict[str, Any]] if isinstance(sample[key], dict) else type(sample[key])))
            for key in MODEL_SHAPE_KEYS]


def _section(section: str, *own: tuple[str, Any, Any]) -> type:
    """A trial section of the schema: its own keys, then the kvcore fields orchestrator/settings.py
    places in it (BenchConfig's, and ModelBenchConfig's for bench.decode=model), then in the model
    section the real model's shape keys."""
    fields = [*own, *_typed(BenchConfig, PLACES.get(section, ())),
              *_typed(ModelBenchConfig, MODEL_PLACES.get(section, ()))]
    if section == "model":
        fields += _shape_typed()
    return dataclasses.make_dataclass(f"{section.title()}Schema", fields)


MilestoneSchema = _section("milestone", ("name", *_missing(str)), ("title", *_missing(str)),
                           # typed entries for the defaults, so config.yaml's values and a milestone's
                           # thresholds merge into CriterionSchema and a wrong type fails at compose time
                           ("criteria", Dict[str, CriterionSchema],
                            field(default_factory=lambda: {name: CriterionSchema() for name in default_criteria()})))
ModelSchema = _section("model", ("name", *_missing(str)))
CacheSchema = _section("cache")
BenchSchema = _section("bench", ("decode", *_missing(str)))  # proxy | model (orchestrator/settings.py)


@dataclass
class ClusterSchema:
    address: Optional[str] = MISSING
    num_cpus: Optional[int] = MISSING
    object_store_gb: float = MISSING
    gpu_memory_fraction: float = MISSING
    host_memory_fraction: float = MISSING


@dataclass
class TrialSchema:
    max_retries: int = MISSING
    timeout_s: Optional[float] = MISSING
    warm_workers: bool = True


@dataclass
class TrackingSchema:
    uri: Optional[str] = MISSING
    experiment: str = MISSING


@dataclass
class SpoolSchema:
    dir: str = MISSING


@dataclass
class Schema:
    milestone: MilestoneSchema = field(default_factory=MilestoneSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    cache: CacheSchema = field(default_factory=CacheSchema)
    bench: BenchSchema = field(default_factory=BenchSchema)
    grid: Dict[str, Any] = MISSING
    cluster: ClusterSchema = field(default_factory=ClusterSchema)
    trial: TrialSchema = field(default_factory=TrialSchema)
    tracking: TrackingSchema = field(default_factory=TrackingSchema)
    resume: bool = MISSING
    spool: SpoolSchema = field(default_factory=SpoolSchema)


ConfigStore.instance().store(name=SCHEMA_NAME, node=Schema)


# ---------------------------------------------------------------- what the rest takes


@dataclass(frozen=True)
class ClusterSettings:
    address: str | None  # Ray address to join; None: $RAY_ADDRESS, else start a local Ray
    num_cpus: int | None  # local Ray only
    object_store_bytes: int  # local Ray only
    gpu_memory_fraction: float
    host_memory_fraction: float


@dataclass(frozen=True)
class TrialSettings:
    max_retries: int
    timeout_s: float | None  # None: derived from the trial's size
    warm_workers: bool = True  # one long-lived worker per device; False: a fresh process per trial


@dataclass(frozen=True)
class Sweep:
    """A checked sweep: its milestone, criteria and expanded trials, and how to run them."""

    milestone: str
    title: str
    criteria: tuple[Criterion, ...]
    trials: tuple[TrialSpec, ...]
    axes: tuple[Axis, ...]
    cluster: ClusterSettings
    trial: TrialSettings
    tracking_uri: str | None  # None: resolved by orchestrator.tracking (env, then default)
    experiment: str
    resume: bool
    spool_dir: str  # absolute
    params: dict[str, str]  # the resolved config, flattened (the sweep's MLflow params)
    config_yaml: str  # the resolved config
    overrides: tuple[str, ...]  # the command line's overrides

    @property
    def key(self) -> str:
        """Same milestone, criteria and trials -> same key (resuming finds the sweep by it)."""
        text = json.dumps(
            {
                "milestone": self.milestone,
                "criteria": [str(c) for c in self.criteria],
                "trials": [t.key for t in self.trials],
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class MilestoneMissing(ValueError):
    """The command named no milestone (`+milestone=<name>`)."""


class ConfigurationError(ValueError):
    """A configuration mistake found after the config was loaded (a tracking URI with an
    unknown scheme, an unreachable cluster.address): exit status 2 like the others."""


def command_overrides() -> list[str]:
    """The overrides of the running Hydra command line (empty outside a Hydra app)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def available_milestones(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(path.stem for path in (conf_dir / "milestone").glob("*.yaml"))


# ---------------------------------------------------------------- checks


def _figure_names() -> set[str]:
    """Numeric figures a benchmark result holds: what criteria may judge."""
    numeric = ("float", "int", "bool", float, int, bool)
    return {f.name for result in (BenchResult, ModelBenchResult) for f in dataclasses.fields(result)
            if f.type in numeric}


def _check_thresholds_given(cfg: DictConfig) -> None:
    """A milestone that gives no threshold at all: one message naming what to add."""
    given = []
    if "criteria" in cfg.milestone and not OmegaConf.is_missing(cfg.milestone, "criteria"):
        criteria = cfg.milestone.criteria
        given = [name for name in criteria if not OmegaConf.is_missing(criteria[name], "threshold")]
    if not given:
        name = cfg.milestone.name
        raise ValueError(
            f"milestone {name!r} has no criteria; add milestone.criteria to conf/milestone/{name}.yaml "
            f"with a threshold for each of {list(default_criteria())}, e.g. fill_rate: {{threshold: 125}}"
        )


def _criteria(milestone: Mapping[str, Any]) -> tuple[Criterion, ...]:
    name = milestone["name"]
    raw = milestone["criteria"]
    required = list(default_criteria())
    absent = [c for c in required if c not in raw]
    if absent:
        raise ValueError(
            f"milestone {name!r} lacks the criteria {absent}; every milestone judges "
            f"{required} (conf/config.yaml): give their thresholds in conf/milestone/{name}.yaml"
        )
    figures = _figure_names()
    criteria = []
    for criterion_name, spec in raw.items():
        if spec["metric"] not in figures:
            raise ValueError(
                f"milestone.criteria.{criterion_name}.metric must be a figure of the benchmark, "
                f"got {spec['metric']!r}; expected one of {sorted(figures)}"
            )
        criteria.append(Criterion(criterion_name, spec["metric"], spec["op"], spec["threshold"]))
    return tuple(criteria)


def _coerce(path: str, value: Any, like: Any) -> Any:
    """A grid value in the type of the parameter it replaces (YAML 4 for a float is 4.0)."""
    if isinstance(like, bool) or isinstance(value, bool):
        ok = isinstance(like, bool) and isinstance(value, bool)
    elif isinstance(like, float) and isinstance(value, int):
        return float(value)
    else:
        ok = type(value) is type(like)
    if not ok:
        raise ValueError(
            f"grid.{path} values must be of type {type(like).__name__} like {path}={like!r}, "
            f"got {value!r} ({type(value).__name__})"
        )
    return value


def _overridden(overrides: Sequence[str]) -> set[str]:
    """Config paths set on the command line (`cache.dtype=float16`, `+x=1`, `++x=1`)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def _axes(grid: Mapping[str, Any], base: Mapping[str, Any], pinned: set[str]) -> tuple[Axis, ...]:
    """The grid's axes, minus those whose parameter the command line set: there the
    override wins (`+milestone=m10 cache.dtype=float16` runs float16 only)."""
    axes = []
    for path, values in flatten(grid).items():
        if path not in base:
            raise ValueError(
                f"grid.{path} is not a trial parameter; grid keys must be among "
                f"{sorted('grid.' + p for p in base)}"
            )
        if not isinstance(values, list):
            raise ValueError(
                f"grid.{path} must be a list of values, got {values!r}; write e.g. "
                f"grid.{path}=[{values}]"
            )
        if path not in pinned:
            axes.append((path, tuple(_coerce(path, v, base[path]) for v in values)))
    return tuple(axes)


def _check_trial(trial: TrialSpec, axes: Sequence[Axis]) -> None:
    try:
        check_params(trial.params)
    except ValueError as error:
        message = str(error)
        path = config_path(message.split(" ", 1)[0]) or "the trial"
        if path in dict(axes):
            where = f"grid.{path} (grid point {trial.index}: {path}={trial.params[path]!r})"
        else:
            where = path
        raise ValueError(f"bad {where}: {message}") from None


def _check_number(path: str, value: Any, low: float, high: float | None = None, low_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= low if low_ok else value > low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>=' if low_ok else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{path} must be a number {bound}, got {value!r}")


# ---------------------------------------------------------------- unknown keys and names

_NAME = re.compile(r"[A-Za-z0-9_.:-]+")  # what MLflow search filters take (milestone names, keys)


def _schema_paths(node: Any = None, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every known dotted path, the paths under which any key is allowed) from `Schema`:
    a dataclass field is a known key; a Dict or Any field is open (grid, milestone.criteria)."""
    node = Schema if node is None else node
    known, open_ = set(), set()
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        path = f"{prefix}{f.name}"
        known.add(path)
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            sub_known, sub_open = _schema_paths(kind, f"{path}.")
            known |= sub_known
            open_ |= sub_open
        elif kind is Any or typing.get_origin(kind) in (dict, Dict) or any(
                typing.get_origin(arg) in (dict, Dict) for arg in typing.get_args(kind)):
            open_.add(path)  # a mapping (Optional ones included: model.rope_scaling) takes any key
    return known, open_


def _config_paths(conf_dir: Path = CONF_DIR) -> set[str]:
    """Dotted paths that conf/config.yaml itself sets (a key added there but not yet typed in
    Schema is still known)."""
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml"), resolve=False)
    assert isinstance(raw, dict)
    paths: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            paths.add(f"{prefix}{key}")
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk({k: v for k, v in raw.items() if k not in ("defaults", "hydra")}, "")
    return paths


def unknown_key_message(path: str, known: set[str] | None = None) -> str:
    """'unknown key <path>: did you mean <nearest known key>?' (or the top-level keys)."""
    if known is None:
        known = _schema_paths()[0] | _config_paths()
    near = difflib.get_close_matches(path, sorted(known), n=1, cutoff=0.6)
    if near:
        hint = f"did you mean {near[0]}?"
    else:
        sections = sorted(p for p in known if "." not in p)
        head = path.split(".")[0]
        hint = f"{head} is not a key; the top-level keys are {', '.join(sections)}"
    return f"unknown key {path}: {hint} (`python -m orchestrator +milestone=m10 --cfg job` shows every key)"


def check_known_keys(container: Mapping[str, Any]) -> None:
    """ValueError naming the first key the schema does not know, and the nearest known one
    (`+bench.repetition=1` -> bench.repetitions). Keys under grid and milestone.criteria are
    free here (load_sweep checks those itself)."""
    known, open_ = _schema_paths()
    known |= _config_paths()

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path not in known:
                full = path
                while isinstance(value, Mapping) and len(value) == 1:  # +foo.bar=1: name foo.bar
                    key, value = next(iter(value.items()))
                    full = f"{full}.{key}"
                raise ValueError(unknown_key_message(full, known))
            if path not in open_ and isinstance(value, Mapping):
                walk(value, f"{path}.")

    walk(container, "")


def _check_names(container: Mapping[str, Any]) -> None:
    """Names that go into MLflow (milestone, experiment), checked before anything starts."""
    name = container["milestone"]["name"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"milestone.name must be letters, digits and _.:- only (it names runs and goes into "
            f"MLflow search filters), got {name!r}"
        )
    experiment = container["tracking"]["experiment"]
    if not isinstance(experiment, str) or not experiment.strip():
        raise ValueError(
            f"tracking.experiment must name an MLflow experiment, got {experiment!r}; leave it "
            f"out for the default kvbench-<milestone> or set e.g. tracking.experiment=kvbench-mine"
        )


def _plain(container: Mapping[str, Any]) -> dict[str, str]:
    """The resolved config as flat string params."""
    return {path: json.dumps(value) if isinstance(value, list) else str(value)
            for path, value in flatten(container).items()}


def swept_params(params: Mapping[str, str], axes: Sequence[Axis]) -> dict[str, str]:
    """The sweep's params with each grid axis's values in place of the base value the grid
    replaces (`cache.dtype` = '["float16"]', not the unused default 'float32')."""
    return {**params, **{path: json.dumps(list(values)) for path, values in axes}}


def load_sweep(cfg: DictConfig, cwd: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Sweep:
    """Check a composed config and expand its grid; ValueError for any configuration mistake."""
    if OmegaConf.is_missing(cfg.milestone, "name"):
        names = ", ".join(available_milestones())
        raise MilestoneMissing(
            f"no milestone given; run e.g. `python -m orchestrator +milestone=m10` "
            f"(available: {names})"
        )
    _check_thresholds_given(cfg)
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        key = error.full_key
        raise ValueError(
            f"{key} is missing (???); set it in conf/milestone/{cfg.milestone.name}.yaml "
            f"or on the command line ({key}=...)"
        ) from None
    except OmegaConfBaseException as error:
        raise ValueError(f"{getattr(error, 'full_key', '') or 'config'}: {error}".splitlines()[0]) from None
    assert isinstance(container, dict)
    check_known_keys(container)
    _check_names(container)
    milestone = container["milestone"]
    criteria = _criteria(milestone)

    flat = flatten(container)
    if flat.get("model.checkpoint"):  # workers run elsewhere: the folder's absolute path
        flat["model.checkpoint"] = str(Path(cwd, flat["model.checkpoint"]).resolve())
    base = {path: flat[path] for path in trial_paths(flat)}
    if flat.get("bench.decode") == "model":  # the token-generation criterion judges the real model
        criteria = for_model_decode(criteria)
        for criterion in criteria:  # the logged config names the figure judged
            milestone["criteria"][criterion.name]["metric"] = criterion.metric
    axes = _axes(container["grid"], base, pinned=_overridden(overrides))
    trials = make_trials(base, axes)
    for trial in trials:
        _check_trial(trial, axes)

    cluster = container["cluster"]
    if cluster["num_cpus"] is not None:
        _check_number("cluster.num_cpus", cluster["num_cpus"], 0)
    _check_number("cluster.object_store_gb", cluster["object_store_gb"], 0.0)
    _check_number("cluster.gpu_memory_fraction", cluster["gpu_memory_fraction"], 0.0, 1.0)
    _check_number("cluster.host_memory_fraction", cluster["host_memory_fraction"], 0.0, 1.0)
    trial = container["trial"]
    _check_number("trial.max_retries", trial["max_retries"], 0, low_ok=True)
    if trial["timeout_s"] is not None:
        _check_number("trial.timeout_s", trial["timeout_s"], 0.0)
    spool_dir = Path(cwd, container["spool"]["dir"]).resolve()

    return Sweep(
        milestone=milestone["name"],
        title=milestone["title"],
        criteria=criteria,
        trials=trials,
        axes=axes,
        cluster=ClusterSettings(
            address=cluster["address"],
            num_cpus=cluster["num_cpus"],
            object_store_bytes=int(cluster["object_store_gb"] * 1e9),
            gpu_memory_fraction=cluster["gpu_memory_fraction"],
            host_memory_fraction=cluster["host_memory_fraction"],
        ),
        trial=TrialSettings(max_retries=trial["max_retries"], timeout_s=trial["timeout_s"],
                            warm_workers=bool(trial.get("warm_workers", True))),
        tracking_uri=container["tracking"]["uri"],
        experiment=container["tracking"]["experiment"],
        resume=container["resume"],
        spool_dir=str(spool_dir),
        params=swept_params(_plain(container), axes),
        config_yaml=OmegaConf.to_yaml(container),
        overrides=tuple(overrides),
    )
