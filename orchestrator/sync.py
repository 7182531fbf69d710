"""Upload the local spool to MLflow once the tracking server is back.

    python -m orchestrator.sync                                   # ./spool, to the URI each sweep used
    python -m orchestrator.sync --spool /path/to/spool --tracking-uri http://127.0.0.1:5000

Every `<sweep_key>.jsonl` in the spool directory is replayed into MLflow (see
`orchestrator/spool.py`): the sweep's parent run is found (or created, or a resumable one
reopened), each trial becomes exactly one child run, and a finished sweep gets its verdict,
table and plots. An uploaded file moves to `<spool>/synced/`. Running sync twice, or after an
interrupted sync, uploads nothing twice.

On a server with authentication the upload logs in as MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD as set when sync runs (the spool never holds credentials); a refused
login or permission leaves the file in place and says what to set or ask for.

One line per spool file. Exit status: 0 when everything was uploaded (or there was nothing to
do, or another sync uploaded it meanwhile), 1 when a file could not be uploaded now (the store
is still away, a running driver still writes it, or the server refused the login: run sync
again later), 2 for bad arguments.

Syncs of one spool folder take turns (`spool.sync_turn`): a second sync started meanwhile
waits, then uploads what is left, so two at once never upload a file twice nor fail on a file
the other moved away; each upload holds the sweep's lock in MLflow (`tracking.SweepLock`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.tracking_env import set_mlflow_defaults


def main(argv: list[str] | None = None) -> int:
    set_mlflow_defaults()  # before MLflow is imported
    from orchestrator.spool import DEFAULT_SPOOL_DIR, sync_turn
    from orchestrator.tracking import check_local_store, resolve_tracking_uri

    parser = argparse.ArgumentParser(prog="python -m orchestrator.sync", description=__doc__.split("\n")[0])
    parser.add_argument("--spool", default=DEFAULT_SPOOL_DIR,
                        help=f"spool directory (default: ./{DEFAULT_SPOOL_DIR})")
    parser.add_argument("--tracking-uri", default=None,
                        help="upload here instead of the URI each sweep recorded")
    args = parser.parse_args(argv)
    directory = Path(args.spool).absolute()
    if not directory.is_dir():
        print(f"sync: no spool directory {directory}; nothing to upload", file=sys.stderr)
        return 0
    try:
        uri = resolve_tracking_uri(args.tracking_uri, Path.cwd()) if args.tracking_uri else None
        if uri is not None:
            check_local_store(uri)  # a file store, a corrupt or unwritable SQLite file: exit 2
    except ValueError as error:
        print(f"sync: {error}", file=sys.stderr)
        return 2
    try:
        with sync_turn(directory):
            return _sync_all(directory, uri)
    except OSError as error:  # the folder cannot be locked (read-only): nothing was uploaded
        print(f"sync: {directory}: {error.strerror or error}; nothing uploaded", file=sys.stderr)
        return 1


def _sync_all(directory: Path, uri: str | None) -> int:
    from orchestrator.spool import sync_spool
    from orchestrator.tracking import AccessRefused, SweepBusy, TrackingUnavailable

    files = sorted(directory.glob("*.jsonl"))
    if not files:
        print(f"sync: {directory} holds nothing to upload")
        return 0
    pending = 0
    for path in files:
        try:
            result = sync_spool(path, uri=uri)
        except FileNotFoundError:
            print(f"sync: {path.name}: already uploaded (moved to synced/ meanwhile)")
            continue
        except TrackingUnavailable as error:
            print(f"sync: {path.name}: not uploaded, {error}; run sync again later", file=sys.stderr)
            pending += 1
            continue
        except AccessRefused as error:  # the file stays; credentials come from the environment
            print(f"sync: {path.name}: not uploaded, {error}; then run sync again", file=sys.stderr)
            pending += 1
            continue
        except SweepBusy as error:
            print(f"sync: {path.name}: not uploaded, {error}", file=sys.stderr)
            pending += 1
            continue
        except ValueError as error:
            print(f"sync: {path.name}: {error}", file=sys.stderr)
            pending += 1
            continue
        if result is None:
            print(f"sync: {path.name}: a running driver still writes it; run sync after it ends",
                  file=sys.stderr)
            pending += 1
            continue
        parent_id, n_trials = result
        print(f"sync: {path.name}: {n_trials} trial(s) uploaded to parent run {parent_id}")
    return 1 if pending else 0


if __name__ == "__main__":
    sys.exit(main())
