"""qatflow.publish against a real `mlflow server`, a sqlite store and the moto S3 server."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from mlflow import MlflowClient
from tests.chain import Chain, build_chain
from tests.s3_server import make_bucket, s3_endpoint

from qatflow.comparison import Comparison
from qatflow.errors import DataError, PipelineError, StorageError
from qatflow.evaluation import EvaluationResult
from qatflow.publish import publish, verdict
from qatflow.report.provenance import NOT_PUBLISHED
from qatflow.tracking import (
    AGREEMENT_METRIC,
    CHAMPION_ALIAS,
    FIDELITY_METRICS,
    FIDELITY_TAG,
    HEADLINE_METRICS,
    METRIC_KEYS,
    OFFLINE_PREFIX,
    PARENT_TAG,
    VARIANTS,
)

__all__ = ["s3_endpoint"]

PARAMS = {"model": {"uri": "demo"}, "qat": {"epochs": 1}, "dataset": {"uri": "data.npz"}}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return build_chain(tmp_path_factory.mktemp("chain"))


def _publish(chain: Chain, out: Path, report: Path | None = None, **options: Any) -> dict[str, Any]:
    path = publish(
        report or chain.report,
        chain.results,
        {variant: folder / "model.onnx" for variant, folder in chain.onnx.items()},
        chain.engines,
        params=PARAMS,
        output_dir=out,
        placement_summary=chain.quantized / "model.placement.md",
        **options,
    )
    assert path == out / "publish.json"
    summary: dict[str, Any] = json.loads(path.read_text())
    return summary


def _report_with(chain: Chain, folder: Path, *, gate_points: float = 1.0, **top1: float) -> Path:
    """A copy of the report whose comparison has the given gate and top-1 per variant."""
    shutil.copytree(chain.report, folder)
    comparison = Comparison.load_json(folder / "comparison.json")
    accuracy = {row.variant: top1.get(row.variant, row.top1) for row in comparison.rows}
    rows = tuple(
        dataclasses.replace(
            row,
            top1=accuracy[row.variant],
            delta_top1_points=100 * (accuracy[row.variant] - accuracy["fp32"]),
        )
        for row in comparison.rows
    )
    changed = dataclasses.replace(comparison, rows=rows, gate_points=gate_points)
    changed.save_json(folder / "comparison.json")
    return folder


def _children(client: MlflowClient, parent: str) -> dict[str, Any]:
    experiment_id = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    return {run.data.tags["variant"]: run for run in runs}


def test_publish_to_server_and_s3(
    chain: Chain, tmp_path: Path, mlflow_server: str, s3_endpoint: str
) -> None:
    bucket = make_bucket(s3_endpoint)
    name = f"publish-{uuid.uuid4().hex[:8]}"
    # Untrained models: a 100-point gate lets the first version become champion.
    report = _report_with(chain, tmp_path / "report", gate_points=100.0)
    record = tmp_path / "record"
    summary = _publish(
        chain,
        record,
        report,
        tracking_uri=mlflow_server,
        experiment=name,
        register_name=name,
        s3_prefix=f"s3://{bucket}/exports/",
        run_name="run-a",
        tags={"kfp.run_id": "abc"},
    )
    client = MlflowClient(mlflow_server)
    parent_id = summary["mlflow"]["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.params["qat.epochs"] == "1" and "version.onnxruntime" in parent.data.params
    assert parent.data.tags["kfp.run_id"] == "abc" and parent.info.status == "FINISHED"
    parent_files = {f.path for f in client.list_artifacts(parent_id, "report")}
    assert {"report/comparison.json", "report/report.html", "report/plots"} <= parent_files
    assert [f.path for f in client.list_artifacts(parent_id, "placement")] == [
        "placement/placement.md"
    ]
    # The parent carries each variant's headline metrics and the gate's verdict.
    comparison = Comparison.load_json(report / "comparison.json")
    assert parent.data.metrics["qat_int8.accuracy_top1_pct"] == pytest.approx(
        100 * comparison.row("qat_int8").top1
    )
    assert {f"{v}.{k}" for v in VARIANTS for k in HEADLINE_METRICS} == set(parent.data.metrics)
    assert parent.data.tags["qatflow.gate"] == "passed" == summary["gate"]["outcome"]
    assert parent.data.tags["qatflow.gate.ptq_int8"] == "passed"
    assert parent.data.tags["qatflow.gate_points"] == "100"
    assert parent.data.params["accuracy_gate"] == "100.0"

    children = _children(client, parent_id)
    assert set(children) == set(VARIANTS) == set(summary["mlflow"]["child_run_ids"])
    for variant, run in children.items():
        # Every variant is an engine checked against its reference at build time.
        assert set(run.data.metrics) == {*METRIC_KEYS, AGREEMENT_METRIC, *FIDELITY_METRICS}
        assert run.data.tags[FIDELITY_TAG] == "passed", variant
        assert run.data.params["runtime"] == "onnxruntime"
        artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"onnx", "engine", "evaluation"}, variant
        files = [
            f.path
            for p in ("onnx", "evaluation")
            for f in client.list_artifacts(run.info.run_id, p)
        ]
        assert files == [f"onnx/{variant}.onnx", "evaluation/result.json"]  # MLflow previews
        # The child run spans the evaluation that measured it, not the publish call.
        result = EvaluationResult.load(chain.results[variant])
        assert result.started_at is not None
        assert run.info.start_time == int(
            dt.datetime.fromisoformat(result.started_at).timestamp() * 1000
        )
        assert run.info.end_time == int(
            dt.datetime.fromisoformat(result.created_at).timestamp() * 1000
        )
    qat = children["qat_int8"].data.metrics
    assert qat["accuracy_top1_pct"] == pytest.approx(100 * comparison.row("qat_int8").top1)

    registry = summary["registry"]
    assert registry["version"] == "1" and registry["gate"]["promoted"]
    assert client.get_model_version_by_alias(name, CHAMPION_ALIAS).version == "1"

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    base = "exports/run-a"
    assert {
        f"{base}/report/comparison.json",
        f"{base}/report/report.html",
        f"{base}/report/report.md",
        f"{base}/onnx/fp32.onnx",
        f"{base}/onnx/ptq_int8.onnx",
        f"{base}/onnx/qat_int8.onnx",
        f"{base}/engines/fp32/engine.onnx",
        f"{base}/engines/qat_int8/engine.onnx",
        f"{base}/publish.json",
    } <= keys
    assert summary["s3"]["uris"]["onnx"]["qat_int8"] == f"s3://{bucket}/{base}/onnx/qat_int8.onnx"
    exported = json.loads(s3.get_object(Bucket=bucket, Key=f"{base}/publish.json")["Body"].read())
    assert exported == summary
    # The report a user reads names the MLflow runs, linked to the server's UI: in the
    # record folder, as the parent run's artifact and on S3. The compare step's copy is kept.
    run_ids = [parent_id, *summary["mlflow"]["child_run_ids"].values()]
    link = f"{mlflow_server}/#/experiments/{parent.info.experiment_id}/runs/{parent_id}"
    assert summary["report"]["dir"] == "report"
    assert summary["mlflow"]["experiment_id"] == parent.info.experiment_id
    for file in summary["report"]["files"]:
        assert (record / file).exists(), file
    for file in ("report.md", "report.html"):
        text = (record / "report" / file).read_text()
        assert all(run_id in text for run_id in run_ids) and link in text, file
        assert f"{name} v1: promoted to champion" in text
    logged = client.download_artifacts(parent_id, "report/report.html", str(tmp_path / "dl"))
    assert Path(logged).read_text() == (record / "report" / "report.html").read_text()
    on_s3 = s3.get_object(Bucket=bucket, Key=f"{base}/report/report.md")["Body"].read()
    assert on_s3.decode() == (record / "report" / "report.md").read_text()
    assert NOT_PUBLISHED in (report / "report.md").read_text()
    assert parent_id not in (report / "report.html").read_text()
    # The fake credentials the S3 fixture exported appear in no MLflow param or tag.
    for run in [parent, *children.values()]:
        assert "testing" not in {*run.data.params.values(), *run.data.tags.values()}


def test_champion_gate_uses_the_accuracy_gate(
    chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps artifacts under ./mlruns
    options = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "register_name": "gated"}

    def run(label: str, fp32: float, qat: float) -> dict[str, Any]:
        report = _report_with(
            chain, tmp_path / f"report-{label}", fp32=fp32, ptq_int8=fp32, qat_int8=qat
        )
        return _publish(chain, tmp_path / label, report, **options)

    first = run("a", 0.900, 0.895)  # 0.5 points below FP32, no champion yet
    assert first["registry"]["gate"]["promoted"] and first["gate"]["outcome"] == "passed"
    assert verdict(tmp_path / "a" / "publish.json") == "passed"
    too_far = run("b", 0.900, 0.880)  # 2 points below FP32
    assert not too_far["registry"]["gate"]["promoted"]
    assert too_far["gate"]["variants"]["qat_int8"]["outcome"] == "refused"
    assert verdict(tmp_path / "b" / "publish.json") == "refused"
    assert "-2.00 top-1 points vs fp32" in too_far["registry"]["gate"]["reasons"][0]
    assert "outside the 1-point gate" in too_far["gate"]["reasons"][0]
    worse = run("c", 0.860, 0.855)  # fine vs FP32, 4 points below the champion
    assert not worse["registry"]["gate"]["promoted"]
    assert worse["gate"]["variants"]["qat_int8"]["outcome"] == "passed"  # vs FP32...
    assert worse["gate"]["outcome"] == "refused"  # ...but the registry refused it
    assert "-4.00 top-1 points vs champion v1" in worse["registry"]["gate"]["reasons"][1]
    close = run("d", 0.900, 0.890)  # within 1 point of the champion's 89.5 %
    assert close["registry"]["gate"]["promoted"] and close["gate"]["outcome"] == "passed"
    client = MlflowClient(options["tracking_uri"])
    assert str(client.get_model_version_by_alias("gated", CHAMPION_ALIAS).version) == "4"


def test_unreachable_mlflow_keeps_everything_offline(chain: Chain, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # Five classes or fewer: no top-5 for any variant, so no child logs it.
    report = tmp_path / "report"
    shutil.copytree(chain.report, report)
    comparison = Comparison.load_json(report / "comparison.json")
    rows = tuple(dataclasses.replace(row, top5=None) for row in comparison.rows)
    dataclasses.replace(comparison, rows=rows).save_json(report / "comparison.json")

    summary = _publish(chain, tmp_path / "out", report, tracking_uri=closed)
    mlflow = summary["mlflow"]
    assert mlflow["offline"] and "127.0.0.1" in mlflow["offline_reason"]
    assert mlflow["metrics_omitted"] == ["accuracy_top5_pct"]
    assert summary["registry"] == {"model_name": "qatflow-qat-int8", "version": None, "gate": None}
    offline = tmp_path / "out" / "mlflow-offline"
    assert mlflow["offline_dir"] == str(offline)
    parent = json.loads((offline / f"{mlflow['parent_run_id']}.json").read_text())
    assert parent["run_id"].startswith(OFFLINE_PREFIX) and parent["status"] == "FINISHED"
    assert parent["params"]["qat.epochs"] == "1"
    for variant, run_id in mlflow["child_run_ids"].items():
        child = json.loads((offline / f"{run_id}.json").read_text())
        assert set(child["metrics"]) == {
            *METRIC_KEYS,
            AGREEMENT_METRIC,
            *FIDELITY_METRICS,
        } - {"accuracy_top5_pct"}
        assert child["tags"]["variant"] == variant
        assert {a["artifact_path"] for a in child["artifacts"]} == {"onnx", "engine", "evaluation"}
        names = {a["artifact_path"]: a["file_name"] for a in child["artifacts"]}
        assert (names["onnx"], names["evaluation"]) == (f"{variant}.onnx", "result.json")
    # The report names the offline records, and the parent's offline record lists it.
    text = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "MLflow was unreachable when publishing" in text
    assert all(run_id in text for run_id in [parent["run_id"], *mlflow["child_run_ids"].values()])
    assert {
        "path": str((tmp_path / "out" / "report").resolve()),
        "artifact_path": "report",
    }.items() <= next(a for a in parent["artifacts"] if a["artifact_path"] == "report").items()


def test_bad_inputs_fail_before_anything_is_logged(
    chain: Chain, tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    onnx = {variant: folder / "model.onnx" for variant, folder in chain.onnx.items()}
    common: dict[str, Any] = {
        "params": PARAMS,
        "output_dir": tmp_path,
        "tracking_uri": tracking_uri,
    }
    with pytest.raises(PipelineError, match="engines lacks the variant.*qat_int8"):
        publish(chain.report, chain.results, onnx, {"fp32": chain.engines["fp32"]}, **common)
    missing = {**onnx, "ptq_int8": tmp_path / "gone.onnx"}
    with pytest.raises(PipelineError, match=r"onnx\['ptq_int8'\] .*gone.onnx does not exist"):
        publish(chain.report, chain.results, missing, chain.engines, **common)
    bad_gate = _report_with(chain, tmp_path / "bad-gate")
    document = json.loads((bad_gate / "comparison.json").read_text())
    (bad_gate / "comparison.json").write_text(json.dumps({**document, "gate_points": -1}))
    with pytest.raises(DataError, match="gate_points must be 0 or more top-1 points"):
        publish(bad_gate, chain.results, onnx, chain.engines, **common)
    with pytest.raises(DataError, match="comparison"):
        publish(tmp_path, chain.results, onnx, chain.engines, **common)
    with pytest.raises(StorageError, match="bucket 'no-bucket-here' does not exist"):
        publish(
            chain.report,
            chain.results,
            onnx,
            chain.engines,
            s3_prefix="s3://no-bucket-here/x",
            **common,
        )
    assert not (tmp_path / "publish.json").exists()
    assert MlflowClient(tracking_uri).search_runs(experiment_ids=["0", "1"]) == []
