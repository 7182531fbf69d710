"""The command: `python -m orchestrator +milestone=m10 [overrides...]`.

Composes conf/ with Hydra, checks it (orchestrator.config), runs the sweep (orchestrator.sweep).
Without a milestone it lists the available ones. `--cfg job` prints the composed config.

Exit status: 0 every trial passed; 1 a trial failed, errored or was skipped; 2 a bad
configuration (malformed override, unknown milestone, wrong type, failed check, unknown
tracking URI scheme, unreachable cluster.address) or a tracking server that refuses the user
(no or wrong MLFLOW_TRACKING_USERNAME / _PASSWORD, no EDIT on the experiment), reported before
any trial runs; 130 interrupted (Ctrl-C: running trials cancelled, the sweep's parent run
marked KILLED, and running the same command again resumes it).

Key decision: Hydra itself exits with status 1 when composing fails (a malformed override, a
missing config), before the task function runs. `main` notes whether the task was entered
and turns such an early failure into status 2, so 1 always means "trials did not all pass".
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from orchestrator.config import MilestoneMissing, command_overrides, load_sweep

INTERRUPTED_STATUS = 130  # Ctrl-C (128 + SIGINT), as orchestrator.sweep returns it
_state = {"entered": False, "status": 0}


def run(cfg: DictConfig, cwd: str) -> int:
    """Check the composed config and run its sweep; the command's exit status."""
    try:
        sweep = load_sweep(cfg, cwd=cwd, overrides=command_overrides())
        from orchestrator.sweep import execute  # Ray and MLflow load only for a valid config
        from orchestrator.tracking import AccessRefused, check_server_access, resolve_tracking_uri

        try:  # a team server's login and permission, before Ray starts
            check_server_access(resolve_tracking_uri(sweep.tracking_uri, cwd), sweep.experiment)
            return execute(sweep, cwd)
        except AccessRefused as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:  # outside run_trials (execute handles Ctrl-C while trials run)
        print("\ninterrupted; run the same command again to go on from what was recorded", file=sys.stderr)
        return INTERRUPTED_STATUS
    except MilestoneMissing as error:
        print(f"error: {error}", file=sys.stderr)
    except ValueError as error:  # configuration mistakes only: trials never raise
        print(f"error: bad configuration: {error}", file=sys.stderr)
    return 2


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _task(cfg: DictConfig) -> None:
    _state["entered"] = True
    _state["status"] = run(cfg, cwd=os.getcwd())  # Hydra 1.3 keeps the working directory


def main() -> None:
    try:
        _task()
    except SystemExit as stop:
        if not _state["entered"] and stop.code not in (0, None):
            print(
                "error: bad configuration: the command line or a config file is wrong (Hydra's "
                "message above); overrides read key=value, e.g. model.num_layers=8 or "
                "grid.cache.dtype=[float16]; `python -m orchestrator +milestone=m10 --cfg job` shows "
                "the keys",
                file=sys.stderr,
            )
            sys.exit(2)
        raise
    sys.exit(_state["status"])


if __name__ == "__main__":
    main()
