"""The smoke pipeline with ``--runner docker``: every task in the TensorFlow image built here.

The image is built with ``make images-tf`` unless an image under its tag already carries the
hash of the files it copies (``qatflow.images.context_hash``). One docker run and one
subprocess run of the smoke profile per session, each with its own MLflow store and cache.
Skipped, with the reason, only where no Docker daemon answers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from qatflow_pipelines.runner.local_docker import RUN_LABEL
from qatflow_pipelines.runner.local_run import run_local

from qatflow.errors import PipelineError
from qatflow.images import CONTEXT_LABEL, IMAGES, TENSORFLOW_IMAGE, context_hash

REPO_ROOT = Path(__file__).resolve().parents[1]

# The first test's set-up may build the image (about 5 minutes) and run the pipeline.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]

TASKS = 16
BUILD_TIMEOUT_S = 1800
# Same code, data and seeds: identical accuracy in and out of the container (latencies differ,
# and so can the files' sizes by a few bytes of metadata).
ACCURACY_METRICS = ("top1", "top5", "delta_top1_points", "agreement")


@dataclass(frozen=True)
class Run:
    out: Path
    mlflow_dir: Path
    started: int
    ended: int
    summary: dict[str, Any]

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        rows = json.loads((self.out / "comparison.json").read_text())["rows"]
        return {row["variant"]: row for row in rows}


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    import docker
    from docker.errors import DockerException

    try:
        handle = docker.from_env()
        handle.ping()
    except DockerException as err:
        pytest.skip(f"no Docker daemon answers here: {err}")
    yield handle
    handle.close()


@pytest.fixture(scope="module")
def image(client: Any) -> str:
    """The TensorFlow image of this checkout, built unless already built from these files."""
    from docker.errors import ImageNotFound

    def built() -> tuple[str | None, str | None]:
        with contextlib.suppress(ImageNotFound):
            found = client.images.get(TENSORFLOW_IMAGE)
            return found.id, found.labels.get(CONTEXT_LABEL)
        return None, None

    old_id, old_hash = built()
    if old_hash != context_hash("tensorflow", REPO_ROOT):
        subprocess.run(
            ["make", IMAGES["tensorflow"].make_target],
            cwd=REPO_ROOT,
            check=True,
            timeout=BUILD_TIMEOUT_S,
        )
        # A new image with the hash of the files as the build found them (they may have
        # changed since in a shared checkout).
        new_id, new_hash = built()
        assert new_id != old_id and new_hash
    return TENSORFLOW_IMAGE


def _smoke(root: Path, runner: str) -> Run:
    out, mlflow_dir = root / "out", root / "mlflow"
    started = int(time.time())
    with (
        pytest.MonkeyPatch.context() as env,
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        env.setenv("QATFLOW_CACHE_DIR", str(root / "cache"))  # the demo model is trained here
        run_local(
            out,
            profile="smoke",
            runner=runner,
            tracking_uri=f"sqlite:///{mlflow_dir / 'mlflow.db'}",
        )
    summary = json.loads((out / "publish.json").read_text())
    return Run(out, mlflow_dir, started, int(time.time()) + 1, summary)


@pytest.fixture(scope="module")
def in_docker(image: str, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _smoke(tmp_path_factory.mktemp("docker"), "docker")


@pytest.fixture(scope="module")
def in_subprocess(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _smoke(tmp_path_factory.mktemp("subprocess"), "subprocess")


def test_every_task_ran_in_a_container_of_the_image(
    client: Any, image: str, in_docker: Run
) -> None:
    label = {"label": f"{RUN_LABEL}={in_docker.out}"}
    events = client.events(
        since=in_docker.started,
        until=in_docker.ended,
        filters={**label, "type": "container", "event": "start"},
        decode=True,
    )
    images = [event["Actor"]["Attributes"]["image"] for event in events]
    assert images == [image] * TASKS
    assert client.containers.list(all=True, filters=label) == []  # all gone
    log = (in_docker.out / "pipeline.log").read_text()
    assert log.count(f"Found image '{image}'") == TASKS
    # Each container's own output (KFP's executor in it) reached the run log.
    assert log.count("[KFP Executor") >= TASKS and log.count("Looking for component") == TASKS


def test_host_outputs_belong_to_the_caller(in_docker: Run) -> None:
    paths = [p for root in (in_docker.out, in_docker.mlflow_dir) for p in root.rglob("*")]
    assert len(paths) > 50
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in paths}
    assert owners == {(os.getuid(), os.getgid())}


def test_mlflow_artifacts_are_on_the_host(in_docker: Run) -> None:
    mlflow = in_docker.summary["mlflow"]
    assert not mlflow["offline"]
    client = MlflowClient(f"sqlite:///{in_docker.mlflow_dir / 'mlflow.db'}")
    for run_id in [mlflow["parent_run_id"], *mlflow["child_run_ids"].values()]:
        uri = client.get_run(run_id).info.artifact_uri
        root = Path(uri.removeprefix("file://"))
        assert root.is_relative_to(in_docker.mlflow_dir / "mlruns"), uri
        artifacts = [a.path for a in client.list_artifacts(run_id)]
        assert artifacts and all((root / a).exists() for a in artifacts), (uri, artifacts)


def test_comparison_matches_a_subprocess_run(in_docker: Run, in_subprocess: Run) -> None:
    docker_rows, subprocess_rows = in_docker.rows, in_subprocess.rows
    assert list(docker_rows) == list(subprocess_rows) == ["fp32", "ptq_int8", "qat_int8"]
    for variant, row in docker_rows.items():
        measured = {metric: row[metric] for metric in ACCURACY_METRICS}
        assert measured == {metric: subprocess_rows[variant][metric] for metric in measured}
    assert docker_rows["qat_int8"]["top1"] > 0.5  # the smoke profile learns


def test_missing_image_fails_fast_without_pulling(client: Any, image: str, tmp_path: Path) -> None:
    started = int(time.time())
    with pytest.raises(
        PipelineError, match=r"qatflow-trt:\S+ is not built here; `make images-trt`"
    ):
        run_local(tmp_path, profile="smoke", runner="docker", runtime="tensorrt")
    pulls = client.events(
        since=started, until=int(time.time()) + 1, filters={"event": "pull"}, decode=True
    )
    assert list(pulls) == []
    assert list(tmp_path.iterdir()) == []
