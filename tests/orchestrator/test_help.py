"""Tests of what a newcomer reads first: `python -m orchestrator --help` and the bare command,
`python -m kvcore.bench --help` against the orchestrator's defaults, the sweep's logged params,
and Ray's token-authentication notice.

Run: python -m pytest tests/orchestrator/test_help.py -q
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from kvcore.bench import BenchConfig, _parser
from orchestrator.config import CONF_DIR, available_milestones
from orchestrator.settings import BENCH_PATHS
from test_config import sweep_of

REPO = Path(__file__).resolve().parents[2]


def orchestrator(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_and_the_bare_command_say_plus_milestone_and_show_the_main_keys(tmp_path):
    shown = orchestrator("--help", cwd=tmp_path)
    assert shown.returncode == 0
    assert shown.stdout.startswith("usage: python -m orchestrator +milestone=NAME")
    for text in ("+milestone=smoke", "not `milestone=smoke`", "grid.cache.dtype=[float16,int8]", "tracking.uri=",
                 "cluster.address=", ", ".join(available_milestones()), "--cfg job"):
        assert text in shown.stdout, text
    bare = orchestrator(cwd=tmp_path)
    assert bare.returncode == 2 and bare.stdout.startswith("usage: python -m orchestrator +milestone=NAME")
    assert bare.stderr.rstrip().endswith(f"(available: {', '.join(available_milestones())})")
    wrong = orchestrator("milestone=smoke", cwd=tmp_path)
    assert wrong.returncode == 2 and "+milestone=smoke, not milestone=smoke" in wrong.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_bench_help_explains_every_flag_and_its_defaults_match_the_orchestrators_or_say_why():
    parser = _parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(actions) == set(BenchConfig.__dataclass_fields__)
    for name, action in actions.items():
        text = action.help.split(" (default:")[0]
        assert len(text) > 25 and text != name.replace("_", " "), f"--{name} has no real help: {action.help!r}"
    conf = OmegaConf.merge(OmegaConf.load(CONF_DIR / "config.yaml"),
                           {"model": OmegaConf.load(CONF_DIR / "model" / "llama7b.yaml")},
                           OmegaConf.load(CONF_DIR / "milestone" / "m10.yaml"))
    for path, field in BENCH_PATHS.items():
        value = OmegaConf.select(conf, path)
        default = actions[field].default
        if field == "num_kv_heads" and default is None:
            assert "equal to --num-heads" in actions[field].help  # None means num_heads: 32 = 32
            continue
        if default != value:
            assert "orchestrator" in actions[field].help, (
                f"--{field.replace('_', '-')} defaults to {default!r}, the orchestrator runs {path}={value!r}, "
                f"and the help does not say why")
    assert "--sink-positions 4" in actions["sink_positions"].help


def test_the_sweep_logs_the_grid_values_not_the_base_value():
    sweep = sweep_of("+milestone=smoke", "grid.cache.dtype=[float16]")
    assert json.loads(sweep.params["cache.dtype"]) == ["float16"]  # base value float32 never ran
    both = sweep_of("+milestone=smoke")
    assert json.loads(both.params["cache.dtype"]) == ["float32", "float16"]
    pinned = sweep_of("+milestone=smoke", "cache.dtype=float16")  # the override pins the axis away
    assert pinned.params["cache.dtype"] == "float16"
    assert sweep.params["model.num_layers"] == both.params["model.num_layers"]  # not swept: as configured


def test_rays_token_notice_does_not_advise_turning_authentication_off():
    import orchestrator.ray_cluster  # noqa: F401  (installs the filter)
    from ray._private.authentication import authentication_token_setup as setup

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.records: list[logging.LogRecord] = []

        def emit(self, record):
            self.records.append(record)

    keep, level = Keep(), setup.logger.level
    setup.logger.addHandler(keep)  # Ray's loggers do not propagate to the root
    setup.logger.setLevel(logging.INFO)
    try:
        setup._warn_token_auth_enabled()
    finally:
        setup.logger.removeHandler(keep)
        setup.logger.setLevel(level)
    logged = " ".join(r.getMessage() for r in keep.records)
    assert "token authentication is on" in logged
    assert "disabled" not in logged and "opt out" not in logged
    assert all(r.levelno < logging.WARNING for r in keep.records)
