"""The whole pipeline through kfp.local on the smoke profile: report, MLflow, S3, cache, errors.

One smoke run per session (module fixture) against a real `mlflow server` and the moto S3
server; a second, cached run with MLflow on a closed port; a run with a bad model URI.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from mlflow import MlflowClient
from tests.s3_server import make_bucket, s3_endpoint
from tests.test_tracking import mlflow_server

from qatflow.errors import PipelineError
from qatflow.local_run import run_local
from qatflow.tracking import FIDELITY_METRICS, METRIC_KEYS, PARENT_TAG

__all__ = ["mlflow_server", "s3_endpoint"]


VARIANTS = ["fp32", "ptq_int8", "qat_int8"]
TASKS = 16


@dataclass(frozen=True)
class Run:
    out: Path
    stdout: str
    stderr: str
    summary: dict[str, Any]


def _run(out: Path, **parameters: Any) -> Run:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert run_local(out, profile="smoke", **parameters) == out
    summary = json.loads((out / "publish.json").read_text())
    return Run(out, stdout.getvalue(), stderr.getvalue(), summary)


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    return make_bucket(s3_endpoint)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str, bucket: str) -> Run:
    name = f"local-{uuid.uuid4().hex[:8]}"
    return _run(
        tmp_path_factory.mktemp("smoke"),
        tracking_uri=mlflow_server,
        mlflow_experiment=name,
        registered_model=name,
        s3_prefix=f"s3://{bucket}/runs",
    )


def test_comparison_and_report(smoke: Run) -> None:
    rows = json.loads((smoke.out / "comparison.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == VARIANTS
    assert all(0.0 <= row["top1"] <= 1.0 and row["latency_p50_ms"] > 0 for row in rows)
    assert (smoke.out / "report.md").is_file() and (smoke.out / "report.html").is_file()
    assert list((smoke.out / "plots").glob("*.png"))
    assert "Executing task" in (smoke.out / "pipeline.log").read_text()
    # The terminal got one line per task, the table, and where to look next.
    assert len(re.findall(rf"^\[\s*\d+/{TASKS}\] .+: done", smoke.stderr, re.M)) == TASKS
    assert "Executing task" not in smoke.stderr
    assert re.search(r"^qat_int8 +\d+\.\d\d", smoke.stdout, re.M)
    assert f"Report: {smoke.out / 'report.html'}" in smoke.stdout


def test_mlflow_parent_and_variant_runs(smoke: Run, mlflow_server: str) -> None:
    mlflow = smoke.summary["mlflow"]
    assert not mlflow["offline"] and mlflow["tracking_uri"] == mlflow_server
    client = MlflowClient(mlflow_server)
    parent = client.get_run(mlflow["parent_run_id"])
    assert parent.info.run_name == smoke.summary["run_name"]
    assert parent.data.tags["kfp.run_name"] == smoke.summary["run_name"]
    params = parent.data.params
    assert params["dataset.limit"] == "2000" and params["model.pretrain_epochs"] == "1"
    assert params["qat.steps_per_epoch"] == "10" and params["engine.runtime"] == "onnxruntime"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    assert sorted(run.data.tags["variant"] for run in children) == VARIANTS
    for run in children:
        assert set(run.data.metrics) == {*METRIC_KEYS, "agreement_vs_fp32", *FIDELITY_METRICS}
    version = smoke.summary["registry"]["version"]
    assert version == "1" and smoke.summary["registry"]["gate"]["version"] == "1"
    assert f"MLflow: parent run {parent.info.run_id}" in smoke.stdout


def test_s3_export(smoke: Run, s3_endpoint: str, bucket: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    prefix = f"runs/{smoke.summary['run_name']}/"
    keys = {o["Key"][len(prefix) :] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {
        "report/comparison.json",
        "report/report.html",
        "onnx/fp32.onnx",
        "onnx/ptq_int8.onnx",
        "onnx/qat_int8.onnx",
        "engines/fp32/engine.onnx",
        "engines/ptq_int8/engine.onnx",
        "engines/qat_int8/engine.onnx",
        "publish.json",
    } <= keys
    assert f"S3: exported to s3://{bucket}/{prefix.rstrip('/')}" in smoke.stdout


def test_cached_rerun_with_mlflow_unreachable(smoke: Run, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    rerun = _run(tmp_path, kfp_root=smoke.out / "kfp", tracking_uri=closed)
    cached = re.findall(r"^\[\s*\d+/\d+\] (.+): cached$", rerun.stderr, re.M)
    assert len(cached) == 10  # data, model, quantize, QAT, 3 exports, 3 engine builds
    assert not any("evaluate" in name or "publish" in name for name in cached)
    # The run completed; MLflow's share was kept in the output folder and the user was told.
    assert [
        r["variant"] for r in json.loads((tmp_path / "comparison.json").read_text())["rows"]
    ] == (VARIANTS)
    mlflow = rerun.summary["mlflow"]
    assert mlflow["offline"]
    assert "MLflow was unreachable" in rerun.stdout and str(tmp_path / "mlflow-offline") in (
        rerun.stdout
    )
    for variant, run_id in mlflow["child_run_ids"].items():
        child = json.loads((tmp_path / "mlflow-offline" / f"{run_id}.json").read_text())
        assert child["tags"]["variant"] == variant
        assert set(child["metrics"]) == {*METRIC_KEYS, "agreement_vs_fp32", *FIDELITY_METRICS}
    assert rerun.summary["registry"]["version"] is None


def test_bad_model_uri_fails_in_the_first_task(tmp_path: Path) -> None:
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        pytest.raises(
            PipelineError, match="task 'check inputs' failed: ModelError: unknown model "
        ),
    ):
        run_local(tmp_path, profile="smoke", model_uri="no_such_model")
    assert not (tmp_path / "comparison.json").exists()
    runs = list((tmp_path / "kfp").iterdir())
    assert len(runs) == 1
    assert list(runs[0].iterdir()) == []  # check-inputs writes no output; nothing else ran
    log = re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "pipeline.log").read_text())  # colors
    assert "Executing task 'check-inputs'" in log
    assert "Executing task 'prepare-data'" not in log


def test_bad_arguments_fail_before_running(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="profile must be one of default, smoke"):
        run_local(tmp_path, profile="huge")
    with pytest.raises(PipelineError, match="unknown pipeline parameter.*epoch"):
        run_local(tmp_path, profile="smoke", epoch=3)
    assert list(tmp_path.iterdir()) == []
