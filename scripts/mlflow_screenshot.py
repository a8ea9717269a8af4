"""Screenshot MLflow's "Compare runs" page for the latest qatflow run, in a headless browser.

    .venv/bin/python scripts/mlflow_screenshot.py --tracking-uri sqlite:///mlflow.db \\
        --output docs/images/mlflow-compare.png

Serves the tracking store with ``mlflow server`` on a free local port, opens the compare page of
the latest pipeline run's FP32, PTQ INT8 and QAT INT8 child runs in headless Chromium (Debian's
``chromium``), and checks what the browser rendered: the DOM names the three variants and the
comparison metrics in their units, and the screenshot is a real page (not blank). Exits 1 when a
check fails. Nothing but the screenshot is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from mlflow import MlflowClient

EXPECTED_TEXT = ("fp32", "ptq_int8", "qat_int8", "accuracy_top1_pct", "accuracy_top1_delta_points")
WINDOW = (1500, 2300)
RENDER_BUDGET_MS = 30_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="qatflow")
    parser.add_argument("--output", type=Path, default=Path("docs/images/mlflow-compare.png"))
    parser.add_argument("--browser", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args(argv)

    experiment_id, runs = latest_variant_runs(args.tracking_uri, args.experiment)
    with mlflow_server(args.tracking_uri) as base:
        url = f"{base}/#/compare-runs?" + urllib.parse.urlencode(
            {"runs": json.dumps(runs), "experiments": json.dumps([experiment_id])}
        )
        dom = browser(args.browser, "--dump-dom", url)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            shot = Path(tmp) / "shot.png"
            browser(args.browser, f"--screenshot={shot}", url)
            problems = check(dom, shot)
            if problems:
                print("mlflow_screenshot: " + "; ".join(problems), file=sys.stderr)
                return 1
            shutil.copyfile(shot, args.output)
    print(f"wrote {args.output} ({url})")
    return 0


def latest_variant_runs(tracking_uri: str, experiment: str) -> tuple[str, list[str]]:
    """The experiment id and the child run ids (fp32, ptq_int8, qat_int8) of the latest run."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment {experiment!r} at {tracking_uri}: run `qatflow run` first")
    (parent,) = client.search_runs(
        [found.experiment_id],
        filter_string="tags.`qatflow.role` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    children = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    by_variant = {run.data.tags["variant"]: run.info.run_id for run in children}
    return str(found.experiment_id), [by_variant[v] for v in ("fp32", "ptq_int8", "qat_int8")]


@contextlib.contextmanager
def mlflow_server(tracking_uri: str) -> Iterator[str]:
    """``mlflow server`` over ``tracking_uri`` on a free 127.0.0.1 port, until /health answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "server", "--backend-store-uri", tracking_uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"mlflow server on {base} did not start") from None
                time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def browser(executable: str, action: str, url: str) -> str:
    """Run headless Chromium once on ``url`` (the SPA gets ``RENDER_BUDGET_MS`` to render)."""
    command = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    command += [
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--virtual-time-budget={RENDER_BUDGET_MS}",
    ]
    result = subprocess.run(
        [*command, action, url], capture_output=True, text=True, timeout=180, check=True
    )
    return result.stdout


def check(dom: str, screenshot: Path) -> list[str]:
    """What is wrong with the rendered page: missing text, or a blank or missing screenshot."""
    from matplotlib.image import imread

    problems = [f"the page does not show {text!r}" for text in EXPECTED_TEXT if text not in dom]
    if not screenshot.is_file():
        return [*problems, "no screenshot was written"]
    pixels = imread(screenshot)
    if pixels.shape[1] != WINDOW[0] or pixels[..., :3].std() < 0.02:
        problems.append(f"the screenshot is blank or mis-sized ({pixels.shape})")
    return problems


if __name__ == "__main__":
    sys.exit(main())
