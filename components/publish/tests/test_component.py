"""publish: MLflow parent and variant runs, the registered QAT model, and the record folder."""

import json
import uuid
from pathlib import Path

import pytest
from kfp import dsl
from mlflow import MlflowClient
from qatflow_components.publish.component import publish
from tests.chain import Chain, artifact

from qatflow.tracking import PARENT_TAG

PARAMS = {
    "model_uri": "demo",
    "dataset_uri": "data.npz",
    "preprocessing": "scale01",
    "batch_size": 16,
    "limit": 0,
    "pretrain_epochs": 1,
    "epochs": 1,
    "learning_rate": 0.001,
    "qat_steps_per_epoch": 3,
    "calibration_method": "max",
    "calibration_batches": 2,
    "runtime": "onnxruntime",
    "batch_min": 1,
    "batch_opt": 8,
    "batch_max": 64,
}


def test_publish_to_sqlite(chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps artifacts under ./mlruns
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = f"component-{uuid.uuid4().hex[:8]}"
    record = artifact(dsl.Artifact, tmp_path / "record")
    report_html = artifact(dsl.HTML, tmp_path / "report_html")
    inputs = {
        f"{short}_{kind}": artifact(kind_class, path, file=file)
        for short, variant in (("fp32", "fp32"), ("ptq", "ptq_int8"), ("qat", "qat_int8"))
        for kind, kind_class, path, file in (
            ("result", dsl.Artifact, chain.results[variant], None),
            ("onnx", dsl.Model, chain.onnx[variant], "model.onnx"),
            ("engine", dsl.Model, chain.engines[variant], "engine.onnx"),
        )
    }
    outcome = publish.python_func(
        report=artifact(dsl.Artifact, chain.report),
        placement=artifact(dsl.Markdown, chain.quantized / "model.placement.md"),
        record=record,
        report_html=report_html,
        **inputs,
        **PARAMS,
        tracking_uri=tracking_uri,
        experiment=experiment,
        registered_model=experiment,
        run_name="run-1",
        run_id="kfp-run-id",
    )
    summary = json.loads((Path(record.path) / "publish.json").read_text())
    assert outcome == summary["gate"]["outcome"]  # the pipeline output: passed or refused
    assert outcome in ("passed", "refused")
    assert summary["run_name"] == "run-1" and not summary["mlflow"]["offline"]
    assert summary["registry"]["version"] == "1"
    page = Path(report_html.path).read_text(encoding="utf-8")  # the KFP UI's final report
    assert summary["mlflow"]["parent_run_id"] in page
    assert page == (Path(record.path) / "report" / "report.html").read_text(encoding="utf-8")
    client = MlflowClient(tracking_uri)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.data.params["qat.steps_per_epoch"] == "3"
    assert parent.data.params["dataset.limit"] == "all"
    assert parent.data.params["engine.batch_profile"] == "1,8,64"
    assert parent.data.params["dataset.image_size"] == "as stored"  # the options' defaults
    assert parent.data.params["calibration.percentile"] == "99.99"
    assert parent.data.params["quantization.spec"] == "none"
    assert parent.data.params["quantization.activation_range"] == "frozen"
    assert parent.data.tags["kfp.run_id"] == "kfp-run-id"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )
    assert sorted(run.data.tags["variant"] for run in children) == ["fp32", "ptq_int8", "qat_int8"]
