"""The command: `python -m orchestrator +milestone=m10 [overrides...]`.

Composes conf/ with Hydra, checks it (orchestrator.config), runs the sweep (orchestrator.sweep).
Without a milestone it prints how to run one (`usage()`: `+milestone=<name>`, the available
milestones and the main keys); so does `--help` / `-h` (Hydra's own page: `--hydra-help`).
`--cfg job` prints the composed config.

Exit status: 0 every trial passed; 1 a trial failed, errored or was skipped (or MLflow was
away and the spool's disk filled: one line names the folder and the space needed); 2 a bad
configuration (malformed override, unknown milestone, wrong type, failed check, unknown
tracking URI scheme, a file store, a tracking database that cannot be opened or is not one,
a spool folder that cannot be written, unreachable cluster.address, an unknown key, another
driver running the same sweep) or a tracking server that refuses the user (no or wrong
MLFLOW_TRACKING_USERNAME / _PASSWORD, no EDIT on the experiment), reported in one line before
any trial runs and before anything is written; 130 interrupted (Ctrl-C: running trials
cancelled, the sweep's parent run marked KILLED, and running the same command again resumes
it); 143 terminated (SIGTERM, as a batch scheduler or `timeout` sends it: the same as Ctrl-C).

Key decisions:
- Hydra itself exits with status 1 when composing fails (a malformed override, a missing
  config), before the task function runs, after printing 5-14 lines. `main` holds back what
  Hydra writes to stderr until the task is entered, and turns such an early failure into one
  line and status 2, so 1 always means "trials did not all pass".
- Hydra writes nothing: no `outputs/` folder, no `.hydra/` copy of the config (which would
  hold every override, secrets included), no log file (conf/config.yaml's `hydra:` settings).
- The checks that need no Ray run first, in this order: the config (orchestrator.config), the
  spool folder, the local tracking store (`tracking.check_local_store`).
"""

from __future__ import annotations

import faulthandler
import io
import os
import re
import signal
import sys

import hydra
from omegaconf import DictConfig

from orchestrator import INTERRUPTED_STATUS, TERMINATED_STATUS
from orchestrator.config import (MilestoneMissing, available_milestones, command_overrides, load_sweep,
                                 unknown_key_message)
from orchestrator.tracking_env import set_mlflow_defaults

_state: dict = {"entered": False, "status": 0, "stderr": None}


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
        set_mlflow_defaults()  # before MLflow is imported
        from orchestrator.spool import SpoolFull, check_spool_dir  # MLflow loads only for a valid config
        from orchestrator.tracking import (AccessRefused, check_local_store, check_server_access,
                                           resolve_tracking_uri)

        check_spool_dir(sweep.spool_dir)
        uri = resolve_tracking_uri(sweep.tracking_uri, cwd)
        check_local_store(uri)
        try:  # a team server's login and permission, before Ray starts
            check_server_access(uri, sweep.experiment)
        except AccessRefused as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        from orchestrator.sweep import execute  # Ray loads only for a valid config

        try:
            return execute(sweep, cwd)
        except SpoolFull as error:  # MLflow away and the spool's disk full: nowhere to record
            print(f"error: {error}", file=sys.stderr)
            return 1
        except AccessRefused as error:  # refused mid-sweep (a password changed, a grant revoked)
            print(f"error: {error}", file=sys.stderr)
            return 2
    except KeyboardInterrupt as interrupt:  # outside run_trials (execute handles it while trials run)
        print("\ninterrupted; run the same command again to go on from what was recorded", file=sys.stderr)
        driver = sys.modules.get("orchestrator.sweep")
        if getattr(interrupt, "status", None) or (driver is not None and driver.received_sigterm()):
            return TERMINATED_STATUS
        return INTERRUPTED_STATUS
    except MilestoneMissing as error:
        print(usage())  # the how-to on stdout; the one error line on stderr
        print(f"error: {error}", file=sys.stderr)
    except ValueError as error:  # configuration mistakes (or a sweep another driver runs now)
        kind = "" if getattr(error, "plain", False) else "bad configuration: "
        print(f"error: {kind}{error}", file=sys.stderr)
    return 2


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _task(cfg: DictConfig) -> None:
    _state["entered"] = True
    if _state["stderr"] is not None:  # composing went well: stderr is the user's again
        sys.stderr = _state["stderr"]
    _state["status"] = run(cfg, cwd=os.getcwd())  # Hydra 1.3 keeps the working directory


def hydra_error_line(text: str) -> str:
    """Hydra's 5-14 line composing error (or argparse's) as one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    full_key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), "")
    if any(line.startswith("Could not override") for line in lines) and full_key:
        return unknown_key_message(full_key)
    options = [line.strip() for line in text.splitlines() if line.startswith("\t") and "provider=" not in line]
    keep = []
    for line in lines:
        if line.startswith(("Set the environment variable HYDRA_FULL_ERROR", "See https://hydra.cc",
                            "Config search path", "provider=", "reference_type", "object_type",
                            "full_key", "Available options", "usage:", "[")) or line in options:
            continue
        keep.append(re.sub(r"^In '[^']*': ", "", line))
    found = next((line for line in keep if ": error: " in line), None)  # argparse
    if found:
        return found.split(": error: ", 1)[1]
    message = "; ".join(keep[:2]) or "Hydra could not compose the config"
    if options:
        message += f" (available: {', '.join(options)})"
    return message


def main() -> None:
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's stack on stderr (a driver that seems stuck)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(usage())
        sys.exit(0)
    real_stderr = sys.stderr
    _state["stderr"] = real_stderr
    sys.stderr = held = io.StringIO()  # Hydra's own messages, until the task is entered
    try:
        _task()
    except SystemExit as stop:
        sys.stderr = real_stderr
        if not _state["entered"] and stop.code not in (0, None):
            hint = ("; the milestone is added to the config with a leading '+': +milestone=smoke, "
                    "not milestone=smoke") if any(arg.startswith("milestone=") for arg in sys.argv[1:]) else ""
            print(
                f"error: bad configuration: {hydra_error_line(held.getvalue())}; overrides read "
                f"key=value, e.g. model.num_layers=8 or grid.cache.dtype=[float16]{hint}",
                file=sys.stderr,
            )
            sys.exit(2)
        if not _state["entered"]:
            real_stderr.write(held.getvalue())
        raise
    finally:
        sys.stderr = real_stderr
    if not _state["entered"]:
        real_stderr.write(held.getvalue())  # --help, --cfg job: nothing held back
    sys.exit(_state["status"])


if __name__ == "__main__":
    main()
