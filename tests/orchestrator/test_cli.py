"""Tests of the command's doors (orchestrator/__main__.py): every bad configuration exits with
status 2 and a clear message before any trial runs, and writes nothing to MLflow.

Run: python -m pytest tests/orchestrator/test_cli.py -q

The commands run as real subprocesses, all at once (each spends most of its time importing).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlflow_server import free_port

REPO = Path(__file__).resolve().parents[2]


def broken(milestone: str) -> list[str]:
    """The arguments that run one of the broken milestone files (see write_broken_milestones)."""
    return [f"+milestone={milestone}", "hydra.searchpath=[file://{milestones}]"]


# name: (arguments, what stderr must say)
CASES = {
    "no milestone": ([], r"error: no milestone given; run e.g. `python -m orchestrator +milestone=m10` "
                         r"(available: m10, m10-model, m11, m12, m8, m9, smoke)"),
    "unknown milestone": (["+milestone=m99"], "Could not find 'milestone/m99'"),
    "malformed override": (["+milestone=smoke", "model.num_layers=[3"], "no viable alternative at input '[3'"),
    "wrong type": (["+milestone=smoke", "model.num_layers=three"], "model.num_layers"),
    "negative context": (["+milestone=smoke", "milestone.context_length=-4096"],
                         "error: bad configuration: bad milestone.context_length: context_length must be "
                         "a positive int, got -4096"),
    "missing criterion": (["+milestone=smoke", "~milestone.criteria.kv_cache"],
                          "error: bad configuration: milestone 'smoke' lacks the criteria ['kv_cache']"),
    "milestone file without criteria": (broken("nocriteria"),
                                        "error: bad configuration: milestone 'nocriteria' has no criteria; "
                                        "add milestone.criteria to conf/milestone/nocriteria.yaml"),
    "criterion without threshold": (broken("nothreshold"),
                                    "error: bad configuration: milestone.criteria.fill_rate.threshold is missing "
                                    "(???); set it in conf/milestone/nothreshold.yaml"),
    "criterion without metric": (broken("nometric"),
                                 "error: bad configuration: milestone.criteria.token_gen.metric is missing (???)"),
    "criterion with a bad op": (["+milestone=smoke", "milestone.criteria.kv_cache.op=at_most"],
                                "error: bad configuration: criterion 'kv_cache': op must be one of ['>', '<'], "
                                "got 'at_most'"),
    "unknown tracking scheme": (["+milestone=smoke", "tracking.uri=mongodb://db/x"],
                                "error: bad configuration: tracking.uri='mongodb://db/x' has the scheme 'mongodb'"),
    "unreachable cluster": (["+milestone=smoke", f"cluster.address=127.0.0.1:{free_port()}"],
                            "error: bad configuration: cluster.address='127.0.0.1:"),
}


SMOKE = (REPO / "conf" / "milestone" / "smoke.yaml").read_text()


def write_broken_milestones(directory: Path) -> Path:
    """Milestone files that break the smoke milestone's criteria in three ways, under
    <directory>/milestone/ (added to Hydra's search path by the cases that use them)."""
    (directory / "milestone").mkdir(parents=True)
    broken = {
        "nocriteria": SMOKE.split("  criteria:")[0] + "  criteria: {}\n",
        "nothreshold": SMOKE.replace('op: ">", threshold: 100}', 'op: ">"}'),
        "nometric": SMOKE.replace("token_gen: {metric: decode_tok_s, op:", "token_gen: {op:"),
    }
    for name, text in broken.items():
        assert text != SMOKE
        (directory / "milestone" / f"{name}.yaml").write_text(text.replace("name: smoke", f"name: {name}"))
    return directory


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every case at once, each in its own empty directory: name -> (status, stderr, dir, seconds)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    milestones = write_broken_milestones(tmp_path_factory.mktemp("milestones"))
    running = {}
    for name, (args, _) in CASES.items():
        cwd = tmp_path_factory.mktemp(name.replace(" ", "_"))
        args = [arg.format(milestones=milestones) for arg in args]
        process = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running[name] = (process, cwd, time.monotonic())
    done = {}
    for name, (process, cwd, start) in running.items():
        _, err = process.communicate(timeout=300)
        done[name] = (process.returncode, err, cwd, time.monotonic() - start)
    return done


@pytest.mark.parametrize("name", CASES)
def test_bad_configuration_exits_2_with_a_clear_message_and_no_run(results, name):
    status, err, cwd, _ = results[name]
    assert status == 2, err
    assert CASES[name][1] in err
    assert sorted(p.name for p in cwd.iterdir() if p.name != "outputs") == [], "nothing recorded"


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][1].startswith("error:")])
def test_our_checks_print_one_line(results, name):
    status, err, _, _ = results[name]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(CASES[name][1]), err


@pytest.mark.parametrize("name", ["unknown milestone", "malformed override", "wrong type"])
def test_hydra_errors_end_with_our_hint(results, name):
    _, err, _, _ = results[name]
    assert err.rstrip().splitlines()[-1].startswith("error: bad configuration: the command line or a config file")


def test_unreachable_cluster_fails_fast(results):
    status, err, _, seconds = results["unreachable cluster"]
    assert "start one with `ray start --head" in err
    assert seconds < 60


def test_cfg_job_prints_the_composed_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "orchestrator", "+milestone=m10", "grid.cache.dtype=[float16]",
                           "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "name: m10" in done.stdout and "context_length: 16384" in done.stdout
    assert "- float16" in done.stdout and "float32\n    - float16" not in done.stdout
    assert list(tmp_path.iterdir()) == []
