"""The environment MLflow reads, set by the commands that talk to MLflow before they import it.

    from orchestrator.tracking_env import set_mlflow_defaults
    set_mlflow_defaults()                      # then: from orchestrator.tracking import ...

Called where a command starts (`python -m orchestrator`, `.sync`, `.timeline`, `.compare`), never
on import: importing orchestrator.tracking leaves `os.environ` as it was.

Key decisions:
- The user's environment wins: only variables that are not set get a default.
- Before MLflow is imported: MLflow starts its telemetry client on import (unless
  MLFLOW_DISABLE_TELEMETRY is set then); the HTTP settings are read at each request.
- A dead HTTP server then fails within seconds rather than MLflow's default of minutes (7
  retries, exponential backoff, 120 s timeout): a refused connection in about 2-3 s, a server
  that accepts but never answers in about 35 s (3 x 10 s + backoff).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# Read by MLflow at request time (the telemetry switch at import). The user's environment wins.
MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # MLflow prints "View run ... at: <url>" for every run ended on a server; the driver's
    # progress line and final table say what matters.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # MLflow's usage telemetry sends nothing the user asked for, and its thread edits
    # os.environ while the driver reads it (a KeyError at start-up, seen twice).
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def set_mlflow_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set every MLFLOW_ENV_DEFAULTS variable that `environ` (default: os.environ) lacks;
    returns those it set."""
    environ = os.environ if environ is None else environ
    added = {name: value for name, value in MLFLOW_ENV_DEFAULTS.items() if name not in environ}
    environ.update(added)
    return added
