"""Screenshots of a sweep in the MLflow UI, taken in a real headless Chromium (Playwright).

    python docs/ui/capture.py --store sqlite:///$PWD/mlflow.db --experiment kvbench-smoke \
        --chromium /usr/bin/chromium --out docs/ui

Starts `mlflow server` on 127.0.0.1 and a free port over the store, opens the experiment page,
the newest sweep's parent run, one of its trials (overview, model metrics, system metrics),
saves a PNG of each (quantised to stay small), and stops the server. Needs `pip install
playwright` and a Chromium binary (Debian: `apt-get install chromium`); `playwright install`
is not needed when `--chromium` names one.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {url} did not answer within {timeout_s:.0f} s")


def shrink(path: Path, colours: int = 128) -> None:
    """Quantise the PNG to a palette: UI screenshots have few colours, so this keeps them small."""
    image = Image.open(path).convert("RGB")
    image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, help="MLflow tracking URI of the sweeps, e.g. sqlite:///abs/mlflow.db")
    parser.add_argument("--experiment", default="kvbench-smoke")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--parent", default=None, help="parent run id (default: the newest sweep)")
    parser.add_argument("--height", type=int, default=900, help="browser viewport height in pixels (the UI scrolls "
                        "inside the page, so a long description table needs a taller viewport)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    client = MlflowClient(args.store)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        parser.error(f"no experiment {args.experiment!r} in {args.store}")
    eid = experiment.experiment_id
    sweeps = client.search_runs([eid], "tags.run_type = 'sweep'", order_by=["attributes.start_time DESC"])
    parent = client.get_run(args.parent) if args.parent else sweeps[0]
    children = client.search_runs([eid], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["tags.trial_index ASC"])
    child = children[0]
    artifacts = str(Path(args.store.split(":///", 1)[1]).parent / "mlartifacts")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", args.store, "--default-artifact-root", artifacts, "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        wait_until_up(url)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True)
            page = browser.new_page(viewport={"width": 1440, "height": args.height})
            ml = "?workflowType=machine_learning"  # MLflow 3.17's UI mode: the URL wins over the browser's choice
            shots = {
                "experiment.png": f"{url}/#/experiments/{eid}/runs{ml}",
                "parent-run.png": f"{url}/#/experiments/{eid}/runs/{parent.info.run_id}{ml}",
                "child-run.png": f"{url}/#/experiments/{eid}/runs/{child.info.run_id}{ml}",
                "child-model-metrics.png": f"{url}/#/experiments/{eid}/runs/{child.info.run_id}/model-metrics{ml}",
                "child-system-metrics.png": f"{url}/#/experiments/{eid}/runs/{child.info.run_id}/system-metrics{ml}",
            }
            for name, address in shots.items():
                page.goto(address)
                page.wait_for_load_state("load")
                time.sleep(15)  # charts render after the data arrives
                close = page.locator('[aria-label="Close"]')  # the assistant panel hides the page's right side
                if close.count():
                    close.first.click()
                    time.sleep(1)
                if name == "experiment.png":  # show the newest sweep's trials under it
                    toggles = page.locator('[aria-label*="xpand"], [title*="xpand"], .ag-group-contracted, '
                                           '.ag-row button, [role="row"] [role="gridcell"] button')
                    if toggles.count():
                        toggles.first.click()
                        time.sleep(3)
                more = page.get_by_text("Show more", exact=True)
                if more.count():  # the description's table, unfolded
                    more.first.click()
                    time.sleep(1)
                path = args.out / name
                page.screenshot(path=str(path), full_page=name == "child-run.png")
                shrink(path)
                print(f"{path} ({path.stat().st_size // 1024} KB): {address}")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
