"""Tests of the command's doors (orchestrator/__main__.py): every bad configuration exits with
status 2 and one clear line before Ray starts, and writes nothing at all (no store, no spool,
no Hydra outputs/; a corrupt store is left byte for byte as it was).

Run: python -m pytest tests/orchestrator/test_cli.py -q

The commands run as real subprocesses, a wave at a time (each spends most of its time importing).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.config import available_milestones
from mlflow_server import free_port

REPO = Path(__file__).resolve().parents[2]


def broken(milestone: str) -> list[str]:
    """The arguments that run one of the broken milestone files (see write_broken_milestones)."""
    return [f"+milestone={milestone}", "hydra.searchpath=[file://{milestones}]"]


# name: (arguments, what stderr must say)
CASES = {
    "no milestone": ([], r"error: no milestone given; run e.g. `python -m orchestrator +milestone=m10` "
                         rf"(available: {', '.join(available_milestones())})"),
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
                                 "error: bad configuration: milestone.criteria.same_tokens.metric is missing (???)"),
    "criterion with a bad op": (["+milestone=smoke", "milestone.criteria.kv_cache.op=at_most"],
                                "error: bad configuration: criterion 'kv_cache': op must be one of ['>', '<'], "
                                "got 'at_most'"),
    "unknown tracking scheme": (["+milestone=smoke", "tracking.uri=mongodb://db/x"],
                                "error: bad configuration: tracking.uri='mongodb://db/x' has the scheme 'mongodb'"),
    "unreachable cluster": (["+milestone=smoke", f"cluster.address=127.0.0.1:{free_port()}"],
                            "error: bad configuration: cluster.address='127.0.0.1:"),
    # unknown keys: named, with the nearest known one
    "unknown key, a typo": (["+milestone=smoke", "+bench.repetition=1"],
                            "error: bad configuration: unknown key bench.repetition: did you mean bench.repetitions?"),
    "unknown key, a near miss": (["+milestone=smoke", "+trial.timeout=5"],
                                 "error: bad configuration: unknown key trial.timeout: did you mean trial.timeout_s?"),
    "unknown section": (["+milestone=smoke", "+foo.bar=1"],
                        "error: bad configuration: unknown key foo.bar: foo is not a key; the top-level keys are"),
    "unknown key without +": (["+milestone=smoke", "bench.repetition=1"],
                              "error: bad configuration: unknown key bench.repetition: did you mean bench.repetitions?"),
    "a secret as an unknown key": (["+milestone=smoke", "+db.password=S3cr3tPw-77", "+ray.token=T0ken-77"],
                                   "error: bad configuration: unknown key "),
    # stores and folders that cannot be used, all refused before Ray starts
    "file store": (["+milestone=smoke", "tracking.uri=file:///{cwd}/mlruns"],
                   "error: bad configuration: tracking.uri='file:///"),
    "bare path store": (["+milestone=smoke", "tracking.uri=mlruns"],
                        "error: bad configuration: tracking.uri='file:///"),
    "forbidden database folder": (["+milestone=smoke", "tracking.uri=sqlite:////proc/forbidden/x.db"],
                                  "error: bad configuration: tracking.uri='sqlite:////proc/forbidden/x.db': the "
                                  "database's folder cannot be used: /proc cannot be written"),
    "not a database": (["+milestone=smoke", "tracking.uri=sqlite:///notes.db"],
                       "error: bad configuration: tracking.uri='sqlite:///{cwd}/notes.db': {cwd}/notes.db is not a "
                       "sound SQLite database (file is not a database); it was left untouched"),
    "truncated database": (["+milestone=smoke", "tracking.uri=sqlite:///mlflow.db"],
                           "error: bad configuration: tracking.uri='sqlite:///{cwd}/mlflow.db': {cwd}/mlflow.db is "
                           "not a sound SQLite database (database disk image is malformed)"),
    "forbidden spool folder": (["+milestone=smoke", "spool.dir=/proc/forbidden"],
                               "error: bad configuration: spool.dir='/proc/forbidden' cannot be used: /proc cannot "
                               "be written"),
    "read-only spool folder": (["+milestone=smoke", "spool.dir=readonly/spool"],
                               "error: bad configuration: spool.dir='{cwd}/readonly/spool' cannot be used: "
                               "{cwd}/readonly cannot be written (Read-only file system)"),
    "milestone name with a space": (["+milestone=smoke", "milestone.name='a b'"],
                                    "error: bad configuration: milestone.name must be letters, digits and _.:- only"),
    "empty experiment": (["+milestone=smoke", "tracking.experiment="],
                         "error: bad configuration: tracking.experiment must name an MLflow experiment, got ''"),
}
SECRETS = ("S3cr3tPw-77", "T0ken-77")


def _setup_not_a_database(cwd: Path) -> None:
    (cwd / "notes.db").write_text("not a database, just notes\n" * 40)


def _setup_truncated_database(cwd: Path) -> None:
    """A real MLflow store, cut to half its size (a copy interrupted, a full disk)."""
    from orchestrator.tracking import Tracker

    Tracker(f"sqlite:///{cwd / 'mlflow.db'}", experiment="kvbench-smoke")
    for extra in cwd.iterdir():
        if extra.name != "mlflow.db":
            subprocess.run(["rm", "-rf", str(extra)], check=True)
    size = (cwd / "mlflow.db").stat().st_size
    os.truncate(cwd / "mlflow.db", size // 2)


def _setup_read_only_folder(cwd: Path) -> None:
    """A read-only file system at <cwd>/readonly (root only: a plain chmod does not stop root)."""
    (cwd / "readonly").mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(cwd / "readonly")],
                          capture_output=True)
    if done.returncode != 0:
        (cwd / "readonly").rmdir()
        raise OSError("cannot mount a read-only tmpfs here (not root?)")


SETUP = {"not a database": _setup_not_a_database, "truncated database": _setup_truncated_database,
         "read-only spool folder": _setup_read_only_folder}


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b""
            for p in sorted(directory.rglob("*"))}


SMOKE = (REPO / "conf" / "milestone" / "smoke.yaml").read_text()


def write_broken_milestones(directory: Path) -> Path:
    """Milestone files that break the smoke milestone's criteria in three ways (no thresholds at
    all, one default criterion without its threshold, a criterion of its own without a metric), under
    <directory>/milestone/ (added to Hydra's search path by the cases that use them)."""
    (directory / "milestone").mkdir(parents=True)
    broken = {
        "nocriteria": SMOKE.split("  criteria:")[0] + "  criteria: {}\n",
        "nothreshold": SMOKE.replace("    fill_rate: {threshold: 100}\n", ""),  # the default criterion stays
        "nometric": SMOKE.replace("    total_vram:", '    same_tokens: {op: ">", threshold: 0.5}\n    total_vram:'),
    }
    for name, text in broken.items():
        assert text != SMOKE
        (directory / "milestone" / f"{name}.yaml").write_text(text.replace("name: smoke", f"name: {name}"))
    return directory


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run the cases WAVE at a time, each in its own directory (empty, or as SETUP leaves it):
    name -> (status, stderr, dir, seconds, the directory's files before)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    milestones = write_broken_milestones(tmp_path_factory.mktemp("milestones"))
    names = list(CASES)
    done = {}
    for wave in range(0, len(names), WAVE):
        done.update(_run_cases(names[wave : wave + WAVE], env, milestones, tmp_path_factory))
    yield done
    for name, (_, _, cwd, _, before) in done.items():
        if name in SETUP and (cwd / "readonly").is_mount():
            subprocess.run(["umount", str(cwd / "readonly")], check=False)


WAVE = 8  # commands at once (each spends most of its time importing; all at once starve the clock)


def _run_cases(names, env, milestones, tmp_path_factory):
    running = {}
    for name in names:
        args = CASES[name][0]
        cwd = tmp_path_factory.mktemp(re.sub(r"[^a-z]+", "_", name))
        try:
            SETUP.get(name, lambda cwd: None)(cwd)
        except OSError:
            running[name] = (None, cwd, time.monotonic(), None)
            continue
        before = _snapshot(cwd)
        args = [arg.format(milestones=milestones, cwd=cwd) for arg in args]
        process = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running[name] = (process, cwd, time.monotonic(), before)
    done = {}
    for name, (process, cwd, start, before) in running.items():
        if process is None:
            done[name] = (None, "", cwd, 0.0, None)
            continue
        _, err = process.communicate(timeout=600)
        done[name] = (process.returncode, err, cwd, time.monotonic() - start, before)
    return done


def expected(name: str, cwd: Path) -> str:
    return CASES[name][1].format(cwd=cwd)


@pytest.mark.parametrize("name", CASES)
def test_bad_configuration_exits_2_with_a_clear_message_and_no_run(results, name):
    status, err, cwd, _, before = results[name]
    if before is None:
        pytest.skip("this machine cannot set the case up (mounting a read-only file system needs root)")
    assert status == 2, err
    assert expected(name, cwd) in err
    assert _snapshot(cwd) == before, "nothing written: no store, no spool, no outputs/, a corrupt store untouched"


@pytest.mark.parametrize("name", CASES)
def test_every_refusal_is_one_line(results, name):
    status, err, cwd, _, before = results[name]
    if before is None:
        pytest.skip("this machine cannot set the case up")
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if CASES[name][1].startswith("error:"):
        assert lines[0].startswith(expected(name, cwd)), err


@pytest.mark.parametrize("name", ["unknown milestone", "malformed override", "wrong type"])
def test_hydra_errors_are_one_line_with_our_hint(results, name):
    _, err, _, _, _ = results[name]
    [line] = err.strip().splitlines()
    assert line.startswith("error: bad configuration: ") and "overrides read key=value" in line
    assert "HYDRA_FULL_ERROR" not in line and "\t" not in line


def test_unknown_milestone_names_the_available_ones(results):
    _, err, _, _, _ = results["unknown milestone"]
    assert f"Could not find 'milestone/m99' (available: {', '.join(available_milestones())})" in err


def test_secrets_given_as_overrides_are_never_printed_nor_written(results):
    _, err, cwd, _, before = results["a secret as an unknown key"]
    assert not any(secret in err for secret in SECRETS)
    assert before == {} and _snapshot(cwd) == {}, "no outputs/<date>/<time>/.hydra/overrides.yaml"


def test_unreachable_cluster_fails_fast(results):
    status, err, _, seconds, _ = results["unreachable cluster"]
    assert "start one with `ray start --head" in err
    # against a command of the same wave that imports as much and connects to nothing, so a
    # busy machine's slow imports do not count: the connect gives up within seconds, not minutes
    _, _, _, baseline, _ = results["unknown tracking scheme"]
    assert seconds < baseline + 30, (seconds, baseline)


def test_cfg_job_prints_the_composed_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "orchestrator", "+milestone=m10", "grid.cache.dtype=[float16]",
                           "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "name: m10" in done.stdout and "context_length: 16384" in done.stdout
    assert "- float16" in done.stdout and "float32\n    - float16" not in done.stdout
    assert list(tmp_path.iterdir()) == []
