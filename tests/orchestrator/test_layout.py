"""Tests of the orchestrator's module layout and of the small modules it was split into:
which module imports what, the environment MLflow reads, `TrialResult` and the verdict.

Run: `python -m pytest tests/orchestrator/test_layout.py -q`.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.criteria import Criterion
from orchestrator.grid import TrialSpec
from orchestrator.record import TrialRecord
from orchestrator.result import TrialResult
from orchestrator.tracking_env import MLFLOW_ENV_DEFAULTS, set_mlflow_defaults
from orchestrator.verdict import exit_status, make_record, skipped_record, sweep_verdict

ROOT = Path(__file__).resolve().parents[2]
CRITERIA = (Criterion("fill_rate", "fill_rate_pos_s", ">", 10.0),)
SPEC = TrialSpec(index=3, key="key3", params={"cache.dtype": "float16"})


def _top_packages(path: Path) -> set[str]:
    """The top-level packages a file imports, anywhere in it (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_tracking_module_imports_mlflow_and_only_the_ray_adapter_imports_ray():
    modules = sorted((ROOT / "orchestrator").rglob("*.py"))
    importers = {name: sorted(str(p.relative_to(ROOT)) for p in modules if name in _top_packages(p))
                 for name in ("mlflow", "ray")}
    assert importers == {"mlflow": ["orchestrator/tracking.py"], "ray": ["orchestrator/ray_cluster.py"]}


def test_the_scheduler_verdict_recorder_and_result_have_modules_of_their_own():
    from orchestrator import recorder, scheduler, sweep, verdict

    assert scheduler.run_trials.__module__ == "orchestrator.scheduler"
    assert recorder.Recorder.__module__ == "orchestrator.recorder"
    assert verdict.make_record.__module__ == "orchestrator.verdict"
    assert TrialResult.__module__ == "orchestrator.result"
    for name in ("run_trials", "make_record", "Recorder", "trial_timeout_s", "POLL_S"):  # moved, not copied
        assert sweep.__dict__.get(name) in (None, getattr(scheduler, name, None), getattr(recorder, name, None)), name
    assert not hasattr(sweep, "POLL_S") and not hasattr(sweep, "_Running")
    import orchestrator.spool

    assert not hasattr(orchestrator.spool, "Recorder")
    assert not (ROOT / "orchestrator" / "scheduling.py").exists()


# ---------------------------------------------------------------------- MLflow's environment


def test_importing_tracking_leaves_the_environment_alone():
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_ENV_DEFAULTS}
    env["PYTHONPATH"] = str(ROOT)
    code = ("import json, os; before = dict(os.environ); import orchestrator.tracking, orchestrator.sweep; "
            "after = dict(os.environ); print(json.dumps(sorted(set(after.items()) ^ set(before.items()))))")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_commands_set_mlflow_defaults_but_the_users_values_win():
    environ = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "99", "PATH": "/bin"}
    added = set_mlflow_defaults(environ)
    assert environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "99" and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in added
    assert environ["MLFLOW_DISABLE_TELEMETRY"] == "true" and environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert set(added) == set(MLFLOW_ENV_DEFAULTS) - {"MLFLOW_HTTP_REQUEST_TIMEOUT"}
    assert set_mlflow_defaults(environ) == {}  # a second call changes nothing


_SPY = """
import importlib, json, os, sys
seen = {}
class Spy:  # notes the environment when MLflow is first imported
    def find_spec(self, name, path=None, target=None):
        if name == "mlflow" and "at_import" not in seen:
            seen["at_import"] = os.environ.get("MLFLOW_DISABLE_TELEMETRY")
sys.meta_path.insert(0, Spy())
assert "mlflow" not in sys.modules
try:
    importlib.import_module(sys.argv[1]).main(sys.argv[2:])
except SystemExit:
    pass
print(json.dumps(seen))
"""


@pytest.mark.parametrize("command, args", [
    ("orchestrator.sync", ["--spool", "{tmp}"]),
    ("orchestrator.timeline", ["0123abcd", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"]),
    ("orchestrator.compare", ["0123abcd", "4567cdef", "--no-log", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"]),
])
def test_every_command_that_reads_mlflow_sets_the_defaults_before_importing_it(command, args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_ENV_DEFAULTS}
    env["PYTHONPATH"] = str(ROOT)
    (tmp_path / "empty.jsonl").write_text("")
    done = subprocess.run([sys.executable, "-c", _SPY, command, *(a.format(tmp=tmp_path) for a in args)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"at_import": "true"}, done.stderr[-2000:]


def test_the_sweep_command_sets_the_defaults_before_it_imports_mlflow():
    import inspect

    import orchestrator.__main__ as command

    source = inspect.getsource(command.run)
    assert source.index("set_mlflow_defaults()") < source.index("from orchestrator.spool import")
    tree = ast.parse((ROOT / "orchestrator" / "__main__.py").read_text())
    module_level = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert not module_level & {"orchestrator.tracking", "orchestrator.spool", "orchestrator.sweep"}


# ---------------------------------------------------------------------- TrialResult


def test_a_tasks_dict_round_trips_through_trial_result():
    raw = {"status": "OK", "reason": "", "metrics": {"fill_rate_pos_s": 12.5}, "info": {"worker_pid": 41},
           "started_at": 1.0, "finished_at": 2.5, "attempt": 2, "system_metrics": {"cpu": [(1.0, 50.0)]}}
    result = TrialResult.from_dict(raw)
    assert result.info == {"worker_pid": "41"} and result.system_metrics == {"cpu": [[1.0, 50.0]]}
    assert TrialResult.from_dict(result.to_dict()) == result
    assert result.to_dict()["metrics"] == {"fill_rate_pos_s": 12.5} and "retries_exhausted" not in result.to_dict()
    lost = TrialResult.from_dict({"status": "ERROR", "reason": "crash: the worker died", "metrics": {},
                                  "info": {}, "attempt": 3, "retries_exhausted": True})
    assert lost.retries_exhausted and lost.started_at is None and lost.to_dict()["retries_exhausted"] is True


@pytest.mark.parametrize("raw, needle", [
    ({"status": "DONE"}, "status must be one of ('OK', 'ERROR', 'SKIPPED'), got 'DONE'"),
    ({"reason": "x"}, "needs a status"),
    ({"status": "OK", "figures": {}}, "got also ['figures']"),
])
def test_a_malformed_result_is_one_clear_value_error(raw, needle):
    with pytest.raises(ValueError, match=None) as raised:
        TrialResult.from_dict(raw)
    assert needle in str(raised.value)


# ---------------------------------------------------------------------- verdict


def test_a_result_is_judged_into_its_record_from_the_type_or_the_dict():
    raw = {"status": "OK", "metrics": {"fill_rate_pos_s": 12.0}, "info": {}, "started_at": 1.0,
           "finished_at": 2.0, "attempt": 2}
    record = make_record(SPEC, TrialResult.from_dict(raw), CRITERIA)
    assert record == make_record(SPEC, raw, CRITERIA)
    assert (record.verdict, record.attempts, record.index, record.trial_key) == ("PASS", 2, 3, "key3")
    assert record.criteria[0].margin == pytest.approx(2.0)
    failed = make_record(SPEC, {**raw, "metrics": {"fill_rate_pos_s": 9.0}}, CRITERIA)
    assert failed.verdict == "FAIL" and not failed.criteria[0].passed
    error = make_record(SPEC, {"status": "ERROR", "reason": "oom: needed 3 GB"}, CRITERIA)
    assert (error.verdict, error.criteria, error.attempts) == ("ERROR", (), 1)
    skipped = skipped_record(SPEC, "fits on no device", CRITERIA)
    assert (skipped.status, skipped.verdict, skipped.attempts, skipped.reason) == ("SKIPPED", "SKIPPED", 0,
                                                                                  "fits on no device")


def test_a_sweep_passes_only_when_it_ran_to_the_end_and_every_trial_passed():
    def rec(verdict: str) -> TrialRecord:
        status = {"PASS": "OK", "FAIL": "OK"}.get(verdict, verdict)
        return TrialRecord(trial_key=verdict, index=0, params={}, status=status, verdict=verdict)

    assert sweep_verdict([rec("PASS"), rec("PASS")], "FINISHED") == "PASS"
    assert sweep_verdict([rec("PASS"), rec("PASS")], "KILLED") == "FAIL"  # trials it never ran
    assert sweep_verdict([], "FINISHED") == "FAIL"
    for other in ("FAIL", "ERROR", "SKIPPED"):
        assert sweep_verdict([rec("PASS"), rec(other)], "FINISHED") == "FAIL"
        assert exit_status([rec("PASS"), rec(other)]) == 1
    assert exit_status([rec("PASS")]) == 0 and exit_status([]) == 1


def test_gpu_uuid_and_cpu_name_are_declared_once_and_normalised():
    from types import SimpleNamespace

    import orchestrator.devicestate
    import orchestrator.ray_cluster
    import orchestrator.trial
    from kvcore.bench.probes import cpu_name, gpu_uuid

    assert gpu_uuid(SimpleNamespace(uuid="3f2a-77")) == "GPU-3f2a-77"
    assert gpu_uuid(SimpleNamespace(uuid="GPU-3f2a-77")) == "GPU-3f2a-77"
    assert gpu_uuid(SimpleNamespace(uuid="")) == gpu_uuid(SimpleNamespace()) == ""
    assert isinstance(cpu_name(), str)
    assert orchestrator.trial.gpu_uuid is gpu_uuid  # the orchestrator takes kvcore's, no copy of its own
    assert not hasattr(orchestrator.devicestate, "gpu_uuid") and not hasattr(orchestrator.devicestate, "cpu_name")
