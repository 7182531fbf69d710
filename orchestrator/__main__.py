"""The command: `python -m orchestrator +milestone=m10 [overrides...]`.

Composes conf/ with Hydra, checks it (orchestrator.config), runs the sweep (orchestrator.sweep).
Without a milestone it prints how to run one (`usage()`: `+milestone=<name>`, the available
milestones and the main keys); so does `--help` / `-h` (Hydra's own page: `--hydra-help`).
`--cfg job` prints the composed config.

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

from orchestrator.config import MilestoneMissing, available_milestones, command_overrides, load_sweep

INTERRUPTED_STATUS = 130  # Ctrl-C (128 + SIGINT), as orchestrator.sweep returns it
_state = {"entered": False, "status": 0}


def usage() -> str:
    """What `--help` and the bare command print: how to pick a milestone, and the main keys."""
    names = ", ".join(available_milestones())
    return f"""usage: python -m orchestrator +milestone=NAME [key=value ...]

Runs a milestone's benchmark grid as Ray tasks (one trial per device) and records every
trial in MLflow. The milestone is added to the config, hence the leading '+':
`+milestone=smoke`, not `milestone=smoke`.

milestones (conf/milestone/): {names}
  smoke   a tiny model through the whole pipeline, about a minute on a CPU: start here
  m10     the first GPU milestone (about 30 minutes on a CPU, where it fails by design)

main keys (key=value after the milestone; lists in brackets):
  grid.cache.dtype=[float16,int8]   the grid: lists of values, trials are their product
  cache.dtype=float16               pin one value (its grid axis is dropped)
  model=llama3_8b                   model shape (conf/model/: llama7b, llama3_8b, tiny)
  milestone.context_length=8192     positions the cache holds
  bench.repetitions=5               timed repetitions per figure (median, min, max kept)
  tracking.uri=sqlite:///mlflow.db  MLflow store (default: ./mlflow.db or $MLFLOW_TRACKING_URI)
  cluster.address=HOST:PORT         join a Ray cluster (default: a local Ray on 127.0.0.1)
  trial.timeout_s=600               deadline per trial, seconds (default: from its size)
  resume=false                      start a new parent run instead of resuming

examples:
  python -m orchestrator +milestone=smoke
  python -m orchestrator +milestone=m10 grid.cache.dtype=[float16]
  python -m orchestrator +milestone=m10 --cfg job     (print the composed config; run nothing)

exit status: 0 every trial passed, 1 not, 2 bad configuration, 130 interrupted.
Results: the table printed at the end, and `mlflow ui --backend-store-uri <uri>` (README).
"""


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
        print(usage())  # the how-to on stdout; the one error line on stderr
        print(f"error: {error}", file=sys.stderr)
    except ValueError as error:  # configuration mistakes only: trials never raise
        print(f"error: bad configuration: {error}", file=sys.stderr)
    return 2


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _task(cfg: DictConfig) -> None:
    _state["entered"] = True
    _state["status"] = run(cfg, cwd=os.getcwd())  # Hydra 1.3 keeps the working directory


def main() -> None:
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(usage())
        sys.exit(0)
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
            if any(arg.startswith("milestone=") for arg in sys.argv[1:]):
                print("hint: the milestone is added to the config with a leading '+': "
                      "+milestone=smoke, not milestone=smoke", file=sys.stderr)
            sys.exit(2)
        raise
    sys.exit(_state["status"])


if __name__ == "__main__":
    main()
