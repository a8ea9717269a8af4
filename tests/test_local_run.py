"""The whole pipeline through kfp.local on the smoke profile: report, MLflow, S3, cache, errors.

One smoke run per session (module fixture) against a real `mlflow server` and the moto S3
server; a second, cached run with MLflow on a closed port; a run with a bad model URI.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from mlflow import MlflowClient
from qatflow_pipelines.runner.local_docker import docker_runner, local_inputs, mlflow_store_dir
from qatflow_pipelines.runner.local_run import collect_results, run_local
from tests.s3_server import make_bucket, s3_endpoint

from qatflow.cli import main
from qatflow.data.sources.fashion_mnist import SYSTEM_DIR as FASHION_MNIST_DIR
from qatflow.errors import PipelineError
from qatflow.tracking import AGREEMENT_METRIC, FIDELITY_METRICS, METRIC_KEYS, PARENT_TAG

__all__ = ["s3_endpoint"]


VARIANTS = ["fp32", "ptq_int8", "qat_int8"]
TASKS = 16
SMOKE_MIN_TOP1 = 0.5


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
    assert all(0.0 <= row["top1"] <= 1.0 and row["latency_ms_p50"] > 0 for row in rows)
    # The smoke profile learns: every variant far above chance (10 % for 10 classes).
    assert all(row["top1"] > SMOKE_MIN_TOP1 for row in rows), rows
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
    assert params["dataset.limit"] == "2000" and params["model.pretrain_epochs"] == "4"
    assert params["qat.steps_per_epoch"] == "10" and params["engine.runtime"] == "onnxruntime"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    assert sorted(run.data.tags["variant"] for run in children) == VARIANTS
    for run in children:
        assert set(run.data.metrics) == {*METRIC_KEYS, AGREEMENT_METRIC, *FIDELITY_METRICS}
    version = smoke.summary["registry"]["version"]
    assert version == "1" and smoke.summary["registry"]["gate"]["version"] == "1"
    assert f"MLflow: parent run {parent.info.run_id}" in smoke.stdout
    # The parent carries the verdict and each variant's headline numbers, in percent/points.
    assert parent.data.tags["qatflow.gate"] == smoke.summary["gate"]["outcome"]
    comparison = json.loads((smoke.out / "comparison.json").read_text())
    assert parent.data.metrics["qat_int8.accuracy_top1_pct"] == pytest.approx(
        100 * comparison["rows"][2]["top1"]
    )
    # The registered QAT model is a logged model of the qat_int8 run, in the run's experiment.
    (logged,) = client.search_logged_models([parent.info.experiment_id])
    qat_run = next(run for run in children if run.data.tags["variant"] == "qat_int8")
    assert logged.source_run_id == qat_run.info.run_id


def test_the_report_names_the_mlflow_runs(smoke: Run, mlflow_server: str, tmp_path: Path) -> None:
    """The report in the output folder is publish's, with the run IDs; MLflow logged the same."""
    mlflow = smoke.summary["mlflow"]
    ids = [mlflow["parent_run_id"], *mlflow["child_run_ids"].values()]
    link = f"{mlflow_server}/#/experiments/{mlflow['experiment_id']}/runs/{mlflow['parent_run_id']}"
    for name in ("report.md", "report.html"):
        text = (smoke.out / name).read_text(encoding="utf-8")
        assert all(run_id in text for run_id in ids), name
        assert link in text, name
    logged = MlflowClient(mlflow_server).download_artifacts(
        mlflow["parent_run_id"], "report/report.html", str(tmp_path)
    )
    assert Path(logged).read_text(encoding="utf-8") == (smoke.out / "report.html").read_text(
        encoding="utf-8"
    )


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
        assert set(child["metrics"]) == {*METRIC_KEYS, AGREEMENT_METRIC, *FIDELITY_METRICS}
    assert rerun.summary["registry"]["version"] is None


def test_cli_exit_status_follows_the_gate(smoke: Run, tmp_path: Path) -> None:
    """A cached rerun through the CLI: exit 3 when the gate refuses QAT INT8, unless
    --allow-refused; the printed verdict and publish.json agree with the comparison."""
    argv = ["run", "--profile", "smoke", "--output", str(smoke.out), "--accuracy-gate", "0"]
    argv += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        status = main(argv)
        allowed = main([*argv, "--allow-refused"])
    comparison = json.loads((smoke.out / "comparison.json").read_text())
    verdict = comparison["verdicts"]["qat_int8"]
    record = json.loads((smoke.out / "publish.json").read_text())
    # With a 0-point gate, any QAT drop is refused; the registry may refuse a candidate too.
    refused = record["gate"]["outcome"] == "refused"
    assert refused >= (verdict["outcome"] == "refused")
    assert status == (3 if refused else 0) and allowed == 0
    assert ("the accuracy gate refused QAT INT8 (exit 3" in stdout.getvalue()) == refused
    assert verdict["reason"] in stdout.getvalue()
    report = (smoke.out / "report.md").read_text()
    assert report.startswith("# qatflow: FP32 vs PTQ INT8 vs QAT INT8\n\n> [!")
    assert "| Dataset | fashion-mnist; " in report
    assert str(smoke.out) not in report


def test_invalid_run_parameters_fail_before_any_task(tmp_path: Path) -> None:
    for parameters, message in [
        ({"accuracy_gate": -5.0}, "accuracy_gate=-5.0: must be 0 or more top-1 points"),
        ({"batch_size": 0}, "batch_size=0: must be an integer >= 1"),
        ({"learning_rate": 0.0}, "learning_rate=0.0: must be > 0"),
        ({"preprocessing": "zscore"}, "preprocessing='zscore': must be one of scale01"),
        ({"calibration_method": "kl"}, "calibration_method='kl': must be one of max"),
        ({"s3_prefix": "bucket/x"}, "s3_prefix='bucket/x': must be empty (no export) or an s3"),
        ({"limit": -1}, "limit=-1: must be an integer >= 0"),
    ]:
        with pytest.raises(PipelineError, match=re.escape(message)):
            run_local(tmp_path, profile="smoke", **parameters)
    assert list(tmp_path.iterdir()) == []  # no output folder, no kfp root, no task ran
    with pytest.raises(PipelineError, match=r"batch_profile_min/opt/max=\[8, 4, 64\]"):
        run_local(tmp_path, batch_profile_min=8, batch_profile_opt=4, batch_profile_max=64)


def test_run_param_values_are_typed_and_checked_before_any_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``qatflow run --param`` reaches every pipeline parameter, typed as the pipeline says."""
    out = tmp_path / "out"
    for param, message in [
        ("percentile=lots", "pipeline parameter percentile='lots': expected NUMBER_DOUBLE"),
        ("percentile=200", "percentile=200.0: must be in (0, 100]"),
        ("no_such_parameter=1", "no_such_parameter"),
        ("batch_size=8", "--param batch_size: `qatflow run` has a flag for it"),
    ]:
        assert main(["run", "--output", str(out), "--param", param]) == 2, param
        assert message in capsys.readouterr().err, param
    assert not out.exists()  # nothing ran


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
    with pytest.raises(PipelineError, match="runner must be one of subprocess, docker"):
        run_local(tmp_path, profile="smoke", runner="podman")
    assert list(tmp_path.iterdir()) == []


def test_collected_results_replace_what_an_earlier_run_left(tmp_path: Path) -> None:
    """An online run into the folder of an offline one: no stale ``mlflow-offline/`` (nor
    plots) suggests that MLflow was unreachable this time."""
    out, record = tmp_path / "out", tmp_path / "record"
    for stale in ("mlflow-offline/offline-1.json", "plots/old.png", "report.html"):
        (out / stale).parent.mkdir(parents=True, exist_ok=True)
        (out / stale).write_text("earlier run")
    (record / "report" / "plots").mkdir(parents=True)
    for name in ("report.html", "report.md", "comparison.json", "plots/new.png"):
        (record / "report" / name).write_text("this run")
    (record / "publish.json").write_text("{}")
    collect_results(record, out)
    assert sorted(path.relative_to(out).as_posix() for path in out.rglob("*")) == [
        "comparison.json",
        "plots",
        "plots/new.png",
        "publish.json",
        "report.html",
        "report.md",
    ]
    assert (out / "report.html").read_text() == "this run"


def test_docker_runner_without_docker_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-docker.sock'}")
    with pytest.raises(PipelineError, match="Docker is not running or not reachable .*dockerd"):
        run_local(tmp_path / "out", profile="smoke", runner="docker")
    assert list(tmp_path.iterdir()) == []


def test_docker_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert mlflow_store_dir("sqlite:///mlflow.db") == tmp_path  # relative to the working dir
    assert mlflow_store_dir("sqlite:////srv/ml/mlflow.db") == Path("/srv/ml")
    assert mlflow_store_dir("file:///srv/mlruns") == Path("/srv/mlruns")
    assert mlflow_store_dir("http://127.0.0.1:5000") is None
    (tmp_path / "model.keras").write_text("")
    assert local_inputs("", "demo", "fashion-mnist", "model.keras") == [tmp_path / "model.keras"]

    monkeypatch.setenv("QATFLOW_CACHE_DIR", str(tmp_path / "cache"))
    runner = docker_runner(
        run_label="run-1", read_only=[tmp_path / "model.keras"], mlflow_dir=tmp_path
    )
    args = runner.container_run_args
    assert args["user"] == f"{os.getuid()}:{os.getgid()}"
    assert args["environment"] == {"HOME": "/tmp", "QATFLOW_CACHE_DIR": str(tmp_path / "cache")}
    assert args["working_dir"] == str(tmp_path) and args["labels"] == {"org.qatflow.run": "run-1"}
    mounts = {m["Target"]: (m["Source"], m["ReadOnly"]) for m in args["mounts"]}
    expected = {
        str(tmp_path / "model.keras"): True,
        str(tmp_path): False,
        str(tmp_path / "cache"): False,
        **({str(FASHION_MNIST_DIR): True} if FASHION_MNIST_DIR.is_dir() else {}),
    }
    assert mounts == {target: (target, read_only) for target, read_only in expected.items()}
