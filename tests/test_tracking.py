"""qatflow.tracking against a real `mlflow server` on 127.0.0.1 and a direct sqlite store."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import mlflow
import onnx
import pytest
from mlflow import MlflowClient
from onnx import TensorProto, helper
from tests.net import free_port
from tests.results import FP32, PTQ, QAT, fidelity_report, make_result

from qatflow.comparison import compare
from qatflow.errors import PipelineError
from qatflow.tracking import (
    ACCURACY_TAG,
    CHAMPION_ALIAS,
    DEFAULT_TRACKING_URI,
    ENGINE_PARAMS,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    FIDELITY_METRICS,
    FIDELITY_TAG,
    LEGACY_ACCURACY_METRIC,
    LEGACY_ACCURACY_TAG,
    METRIC_KEYS,
    OFFLINE_PREFIX,
    PARENT_TAG,
    REDACTED,
    VARIANTS,
    Tracker,
    TrackingError,
    flatten_params,
    redact_text,
    resolve_tracking_uri,
)


class TcpForwarder:
    """Forwards 127.0.0.1:<port> to a target port until ``close()``: a server that goes away."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def experiment() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    """A one-node ONNX model, enough for the registry."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "qat_int8.onnx"
    onnx.save(model, path)
    return path


def _variant_metrics(accuracy: float) -> dict[str, float]:
    return {key: accuracy if key.startswith("accuracy") else 1.0 for key in METRIC_KEYS}


def _children(client: MlflowClient, parent: str) -> list:
    experiment_id = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")


def test_parent_and_variant_runs_line_up(
    mlflow_server: str, experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = Tracker(tmp_path, tracking_uri=mlflow_server, experiment=experiment)
    assert not tracker.offline
    parent = tracker.start_pipeline_run(
        "nightly", params={"model": "resnet_tiny", "training": {"epochs": 2, "lr": 1e-3}}
    )
    # An inherited MLFLOW_RUN_ID (as KFP injects) must not turn children into the parent.
    monkeypatch.setenv("MLFLOW_RUN_ID", parent)
    for accuracy, variant in zip((0.91, 0.88, 0.90), VARIANTS, strict=True):
        with tracker.ending(tracker.start_variant_run(parent, variant)) as child:
            tracker.log_variant_metrics(child, _variant_metrics(accuracy))
    tracker.end_run(parent)

    client = MlflowClient(mlflow_server)
    parent_run = client.get_run(parent)
    assert parent_run.data.params["training.epochs"] == "2"
    assert parent_run.data.params["version.tf2onnx"] != "not installed"
    assert {"version.tensorflow", "version.onnxruntime", "version.tensorrt"} <= set(
        parent_run.data.params
    )
    assert parent_run.info.status == "FINISHED"
    children = _children(client, parent)
    assert sorted(run.data.tags["variant"] for run in children) == sorted(VARIANTS)
    assert {run.data.tags["variant"]: run.data.tags["precision"] for run in children} == {
        "fp32": "fp32",
        "ptq_int8": "int8",
        "qat_int8": "int8",
    }
    for run in children:
        assert set(run.data.metrics) == set(METRIC_KEYS)
        assert run.info.status == "FINISHED"
        assert run.info.experiment_id == parent_run.info.experiment_id


def test_child_run_from_another_process(
    mlflow_server: str, experiment: str, tmp_path: Path
) -> None:
    tracker = Tracker(tmp_path, tracking_uri=mlflow_server, experiment=experiment)
    parent = tracker.start_pipeline_run("cross-process")
    script = (
        "import sys; from qatflow.tracking import Tracker\n"
        "t = Tracker(sys.argv[1], tracking_uri=sys.argv[2], experiment='elsewhere')\n"
        "with t.ending(t.start_variant_run(sys.argv[3], 'qat_int8')) as run:\n"
        "    t.log_metrics(run, {'accuracy_top1': 0.5})\n"
    )
    env = {**os.environ, "MLFLOW_RUN_ID": parent}
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), mlflow_server, parent],
        env=env,
        check=True,
        timeout=120,
    )
    (child,) = _children(MlflowClient(mlflow_server), parent)
    assert child.data.tags["variant"] == "qat_int8"
    assert child.data.metrics == {"accuracy_top1": 0.5}
    # The child follows the parent's experiment, not the one named in the other process.
    assert (
        child.info.experiment_id == MlflowClient(mlflow_server).get_run(parent).info.experiment_id
    )


def test_credentials_are_redacted(mlflow_server: str, experiment: str, tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, tracking_uri=mlflow_server, experiment=experiment)
    parent = tracker.start_pipeline_run(
        params={
            "s3": {"endpoint": "http://minio:hunter2@127.0.0.1:9000", "secret_access_key": "k3y"},
            "db_password": "hunter2",
            "api_token": "t0ken-value",
            "credentials": {"user": "me", "pin": "1234"},
            "dataset": "s3://bucket/data?X-Amz-Signature=abcdef&part=1",
        },
        tags={"MLFLOW_TRACKING_TOKEN": "t0ken-value", "source": "https://me:pw@git.example/repo"},
    )
    run = MlflowClient(mlflow_server).get_run(parent)
    stored = json.dumps({**run.data.params, **run.data.tags})
    for secret in ("hunter2", "k3y", "t0ken-value", "1234", "abcdef", ":pw@"):
        assert secret not in stored
    assert run.data.params["s3.endpoint"] == "http://127.0.0.1:9000"
    assert run.data.params["credentials.user"] == REDACTED
    assert run.data.params["dataset"] == f"s3://bucket/data?X-Amz-Signature={REDACTED}&part=1"
    assert run.data.tags["source"] == "https://git.example/repo"


def test_redaction_helpers() -> None:
    assert (
        redact_text("postgresql://u:p@db:5432/x and s3://b/k")
        == "postgresql://db:5432/x and s3://b/k"
    )
    assert flatten_params({"a": {"b": 1, "access_key": "x"}}) == {
        "a.b": "1",
        "a.access_key": REDACTED,
    }


def test_artifacts_files_and_folders(mlflow_server: str, experiment: str, tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, tracking_uri=mlflow_server, experiment=experiment)
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "latency.png").write_bytes(b"\x89PNG")
    with tracker.ending(tracker.start_pipeline_run()) as run:
        tracker.log_artifact(run, report)
        tracker.log_artifact(run, plots)
        tracker.log_artifact(run, report, "reports")
        with pytest.raises(TrackingError, match=r"missing\.onnx"):
            tracker.log_artifact(run, tmp_path / "missing.onnx")
    client = MlflowClient(mlflow_server)
    assert {item.path for item in client.list_artifacts(run)} == {"report.md", "plots", "reports"}
    assert [item.path for item in client.list_artifacts(run, "plots")] == ["plots/latency.png"]


def test_registry_and_champion_gate(
    mlflow_server: str, experiment: str, tmp_path: Path, onnx_file: Path
) -> None:
    tracker = Tracker(tmp_path, tracking_uri=mlflow_server, experiment=experiment)
    name = f"qatflow-{experiment}"
    client = MlflowClient(mlflow_server)
    parent = tracker.start_pipeline_run()

    def register(accuracy_pct: float) -> str:
        run = tracker.start_variant_run(parent, "qat_int8")
        version = tracker.register_onnx_model(run, onnx_file, name, accuracy_top1_pct=accuracy_pct)
        assert version is not None
        return version

    first = register(90.0)
    decision = tracker.promote_if_better(name, first, 90.0, 91.0, gate_points=2.0)
    assert decision.promoted
    assert decision.champion_version is None
    assert "no current champion" in decision.reasons
    assert decision.reasons[0].startswith(f"{name} v{first} -1.00 top-1 points vs fp32")
    assert client.get_model_version_by_alias(name, CHAMPION_ALIAS).version == first
    version_tags = client.get_model_version(name, first).tags
    assert version_tags[ACCURACY_TAG] == "90.0" and version_tags["qatflow.gate_points"] == "2"

    # 1 point below the champion: refused by a 0.5-point gate...
    worse = register(89.0)
    decision = tracker.promote_if_better(name, worse, 89.0, 89.5, gate_points=0.5)
    assert not decision.promoted
    assert (decision.champion_version, decision.champion_accuracy_pct) == (first, 90.0)
    assert f"-1.00 top-1 points vs champion v{first}" in decision.reasons[1]
    assert "outside the 0.5-point gate" in decision.reasons[1]
    assert client.get_model_version_by_alias(name, CHAMPION_ALIAS).version == first
    assert client.get_model_version(name, worse).tags["qatflow.gate"] == "refused"

    # ...and by a 1-point gate when FP32 is 6 points better, but promoted when FP32 is close.
    decision = tracker.promote_if_better(name, worse, 89.0, 95.0, gate_points=1.0)
    assert not decision.promoted
    assert "-6.00 top-1 points vs fp32" in decision.reasons[0]
    decision = tracker.promote_if_better(name, worse, 89.0, 89.5, gate_points=1.0)
    assert decision.promoted
    assert client.get_model_version_by_alias(name, CHAMPION_ALIAS).version == worse
    assert client.get_model_version(name, worse).tags["qatflow.gate"] == "promoted"

    with pytest.raises(PipelineError, match="gate_points"):
        tracker.promote_if_better(name, worse, 90.0, 90.0, gate_points=-1)


def test_registered_model_is_in_the_runs_experiment_with_a_signature(
    mlflow_server: str,
    experiment: str,
    tmp_path: Path,
    onnx_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracker = Tracker(tmp_path, tracking_uri=mlflow_server, experiment=experiment)
    parent = tracker.start_pipeline_run()
    child = tracker.start_variant_run(parent, "qat_int8")
    version = tracker.register_onnx_model(child, onnx_file, experiment, accuracy_top1_pct=80.0)
    client = MlflowClient(mlflow_server)
    experiment_id = client.get_run(child).info.experiment_id
    (logged,) = client.search_logged_models([experiment_id])
    assert logged.source_run_id == child  # "Logged models (1)" on the child run, not "Default"
    model_version = client.get_model_version(experiment, str(version))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # for the fluent get_model_info
    info = mlflow.models.get_model_info(f"models:/{experiment}/{version}")
    assert model_version.run_id == child
    assert info.signature is not None
    (inputs,) = info.signature.inputs.inputs
    assert (inputs.name, inputs.shape, str(inputs.type)) == ("x", (1, 4), "float32")


def test_runs_carry_the_step_times(
    mlflow_server: str, experiment: str, tmp_path: Path, onnx_file: Path
) -> None:
    tracker = Tracker(tmp_path, tracking_uri=mlflow_server, experiment=experiment)
    parent = tracker.start_pipeline_run("timed", start_time=1_700_000_000_000)
    child = tracker.start_variant_run(parent, "fp32", start_time=1_700_000_010_000)
    tracker.log_artifact(child, onnx_file, "evaluation", file_name="result.onnx")
    tracker.end_run(child, end_time=1_700_000_070_000)
    tracker.end_run(parent)
    client = MlflowClient(mlflow_server)
    run = client.get_run(child)
    assert (run.info.start_time, run.info.end_time) == (1_700_000_010_000, 1_700_000_070_000)
    assert client.get_run(parent).info.start_time == 1_700_000_000_000
    assert [item.path for item in client.list_artifacts(child, "evaluation")] == [
        "evaluation/result.onnx"
    ]
    # MLflow 3's UI opens the experiment on its training runs, not the GenAI overview.
    kind = client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG]
    assert kind == EXPERIMENT_KIND == "custom_model_development"


def test_sqlite_store_directly(
    tmp_path: Path, onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the sqlite store puts artifacts under ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    uri = f"sqlite:///{tmp_path / 'direct.db'}"
    tracker = Tracker(tmp_path / "out", tracking_uri=uri)
    parent = tracker.start_pipeline_run(params={"dataset": "fashion_mnist"})
    child = tracker.start_variant_run(parent, "qat_int8")
    tracker.log_variant_metrics(child, _variant_metrics(0.8))
    version = tracker.register_onnx_model(
        child, onnx_file, "qatflow-direct", accuracy_top1_pct=80.0
    )
    assert version == "1"
    # Registering must not pin MLflow's fluent API to the tracker's URI.
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///from-env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///changed.db")
    assert mlflow.get_tracking_uri() == "sqlite:///changed.db"
    assert tracker.promote_if_better(
        "qatflow-direct", version, 80.0, 81.0, gate_points=2.0
    ).promoted
    tracker.end_run(child)
    tracker.end_run(parent)
    client = MlflowClient(uri)
    (run,) = _children(client, parent)
    assert set(run.data.metrics) == set(METRIC_KEYS)
    assert str(client.get_model_version_by_alias("qatflow-direct", CHAMPION_ALIAS).version) == "1"
    assert not (tmp_path / "out" / "mlflow-offline").exists()


def test_engine_fidelity_is_logged_per_variant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'fidelity.db'}"
    comparison = compare(
        {
            "fp32": make_result(FP32),  # a Keras model: no engine, no check
            "ptq_int8": make_result(
                PTQ,
                fidelity=fidelity_report(0.6125, passed=False),
                engine={"encoding": "u8s8", "isa": "avx2 (no VNNI)"},
            ),
            "qat_int8": make_result(
                QAT, fidelity=fidelity_report(0.999), engine={"encoding": "u8u8", "isa": "amx_int8"}
            ),
        }
    )
    tracker = Tracker(tmp_path / "out", tracking_uri=uri)
    parent = tracker.start_pipeline_run()
    for variant in VARIANTS:
        row = comparison.row(variant)
        with tracker.ending(tracker.start_variant_run(parent, variant)) as child:
            tracker.log_variant_metrics(child, row.tracking_metrics())
            tracker.log_engine_fidelity(child, row.fidelity, row.engine)
    tracker.end_run(parent)

    runs = {run.data.tags["variant"]: run for run in _children(MlflowClient(uri), parent)}
    qat, ptq, fp32 = runs["qat_int8"].data, runs["ptq_int8"].data, runs["fp32"].data
    assert set(FIDELITY_METRICS) == {
        "fidelity_agreement_pct",
        "fidelity_decided_agreement_pct",
        "fidelity_proven_agreement_pct",
        "fidelity_p99_abs_error",
        "fidelity_samples_beyond_tolerance",
    }
    assert set(qat.metrics) == set(METRIC_KEYS) | set(FIDELITY_METRICS)
    assert qat.metrics["fidelity_agreement_pct"] == pytest.approx(99.9)  # percent, like top-1
    assert qat.metrics["fidelity_decided_agreement_pct"] == 100.0
    assert qat.metrics["fidelity_proven_agreement_pct"] == pytest.approx(99.725)
    assert qat.metrics["fidelity_p99_abs_error"] == pytest.approx(0.0125)
    assert {key: qat.params[key] for key in ENGINE_PARAMS} == {
        "engine_encoding": "u8u8",
        "engine_isa": "amx_int8",
    }
    assert qat.tags[FIDELITY_TAG] == "passed"
    assert ptq.tags[FIDELITY_TAG] == "failed"
    assert ptq.metrics["fidelity_agreement_pct"] == pytest.approx(61.25)
    assert ptq.metrics["fidelity_p99_abs_error"] == pytest.approx(2.25)
    assert ptq.metrics["fidelity_samples_beyond_tolerance"] == 40
    assert ptq.params["engine_isa"] == "avx2 (no VNNI)"
    # Nothing measured, nothing logged: no zeros that would look like a failed check.
    assert set(fp32.metrics) == set(METRIC_KEYS)
    assert not set(ENGINE_PARAMS) & set(fp32.params)
    assert FIDELITY_TAG not in fp32.tags


def test_partial_fidelity_logs_what_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'partial.db'}"
    tracker = Tracker(tmp_path / "out", tracking_uri=uri)
    run = tracker.start_variant_run(tracker.start_pipeline_run(), "qat_int8")
    check = {**fidelity_report(), "p99_abs_error": None, "decided_agreement": float("nan")}
    for key in ("proven_agreement", "beyond_tolerance"):  # an engine built before they were
        del check[key]
    tracker.log_engine_fidelity(run, check, {"isa": "avx512_vnni"})
    data = MlflowClient(uri).get_run(run).data
    assert data.metrics == {"fidelity_agreement_pct": pytest.approx(99.9)}
    assert data.params == {"engine_isa": "avx512_vnni"}
    assert data.tags[FIDELITY_TAG] == "passed"


def test_unreachable_server_falls_back_offline(
    tmp_path: Path, onnx_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="qatflow.tracking"):
        tracker = Tracker(tmp_path, tracking_uri=closed, probe_timeout=2)
        parent = tracker.start_pipeline_run("offline", params={"db_password": "hunter2"})
        child = tracker.start_variant_run(parent, "qat_int8")
        tracker.log_variant_metrics(child, _variant_metrics(0.7))
        tracker.log_engine_fidelity(
            child, fidelity_report(0.6125, passed=False), {"encoding": "u8s8", "isa": "avx2"}
        )
        tracker.log_artifact(child, onnx_file)
        assert tracker.register_onnx_model(child, onnx_file, "m", accuracy_top1_pct=70.0) is None
        decision = tracker.promote_if_better("m", "1", 70.0, 71.0, gate_points=2.0)
        tracker.end_run(child)
        tracker.end_run(parent)
    assert tracker.offline
    assert not decision.promoted
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "127.0.0.1" in warnings[0].getMessage()

    offline = tmp_path / "mlflow-offline"
    assert parent.startswith(OFFLINE_PREFIX)
    parent_doc = json.loads((offline / f"{parent}.json").read_text())
    child_doc = json.loads((offline / f"{child}.json").read_text())
    assert parent_doc["params"]["db_password"] == REDACTED
    assert "hunter2" not in (offline / f"{parent}.json").read_text()
    assert parent_doc["status"] == "FINISHED"
    assert child_doc["parent_run_id"] == parent
    assert child_doc["tags"]["variant"] == "qat_int8"
    assert child_doc["tags"][FIDELITY_TAG] == "failed"
    assert set(child_doc["metrics"]) == set(METRIC_KEYS) | set(FIDELITY_METRICS)
    assert child_doc["metrics"]["fidelity_agreement_pct"] == pytest.approx(61.25)
    assert child_doc["params"] == {"engine_encoding": "u8s8", "engine_isa": "avx2"}
    assert child_doc["artifacts"][0]["path"] == str(onnx_file)
    assert child_doc["registered_models"][0]["model_name"] == "m"
    registry = json.loads((offline / "registry.json").read_text())
    assert registry["gate_decisions"][0]["promoted"] is False


def test_server_lost_mid_run_falls_back_offline(
    mlflow_server: str,
    experiment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    forwarder = TcpForwarder(int(mlflow_server.rsplit(":", 1)[1]))
    tracker = Tracker(
        tmp_path, tracking_uri=f"http://127.0.0.1:{forwarder.port}", experiment=experiment
    )
    parent = tracker.start_pipeline_run()
    child = tracker.start_variant_run(parent, "fp32")
    assert not tracker.offline
    forwarder.close()
    with caplog.at_level(logging.WARNING, logger="qatflow.tracking"):
        tracker.log_variant_metrics(child, _variant_metrics(0.9))
        tracker.end_run(child)
    assert tracker.offline
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    doc = json.loads((tmp_path / "mlflow-offline" / f"{child}.json").read_text())
    assert set(doc["metrics"]) == set(METRIC_KEYS)
    assert doc["status"] == "FINISHED"


def test_mlflow_error_while_reachable_raises(
    mlflow_server: str, experiment: str, tmp_path: Path
) -> None:
    tracker = Tracker(tmp_path, tracking_uri=mlflow_server, experiment=experiment)
    parent = tracker.start_pipeline_run(params={"epochs": 2})
    # MLflow refuses to change a logged param: a real error, not an outage.
    with pytest.raises(TrackingError, match=f"logging params to run {parent} failed"):
        tracker.log_params(parent, {"epochs": 3})
    assert not tracker.offline


def test_bad_input_is_named(mlflow_server: str, experiment: str, tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, tracking_uri=mlflow_server, experiment=experiment)
    parent = tracker.start_pipeline_run()
    with pytest.raises(TrackingError, match="int4"):
        tracker.start_variant_run(parent, "int4")
    with pytest.raises(TrackingError, match=f"parent_run_id '{'f' * 32}'"):
        tracker.start_variant_run("f" * 32, "fp32")
    child = tracker.start_variant_run(parent, "fp32")
    with pytest.raises(TrackingError, match=r"missing \['accuracy_top5_pct'"):
        tracker.log_variant_metrics(child, {"accuracy_top1_pct": 1.0})
    with pytest.raises(TrackingError, match="unknown"):
        tracker.log_variant_metrics(child, {**_variant_metrics(1.0), "accuracy": 1.0})
    with pytest.raises(RuntimeError), tracker.ending(child):
        raise RuntimeError("step failed")
    assert MlflowClient(mlflow_server).get_run(child).info.status == "FAILED"


def test_tracking_uri_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri("sqlite:///param.db") == "sqlite:///param.db"
    assert resolve_tracking_uri() == "http://from-env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri() == DEFAULT_TRACKING_URI


def _champion(tracker: Tracker, name: str) -> tuple[str, float | None] | None:
    """The champion's version and top-1 accuracy in percent, as the gate reads them."""
    record = tracker.champion_record(name)
    return None if record is None else (record.version, record.accuracy_pct)


def test_a_champion_with_a_legacy_fraction_is_compared_in_percent(
    tmp_path: Path, onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions registered before accuracies were in percent carry a fraction tag
    (``qatflow.accuracy_top1`` = 0.9), or only their run's ``accuracy_top1`` metric."""
    monkeypatch.chdir(tmp_path)  # the sqlite store puts artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    tracker = Tracker(tmp_path / "out", tracking_uri=uri)
    client = MlflowClient(uri)
    name = "qatflow-legacy"
    parent = tracker.start_pipeline_run()

    def register(accuracy_pct: float) -> tuple[str, str]:
        run = tracker.start_variant_run(parent, "qat_int8")
        version = tracker.register_onnx_model(run, onnx_file, name, accuracy_top1_pct=accuracy_pct)
        assert version is not None
        return run, version

    def make_old_champion(version: str, *, tag: str | None) -> None:
        """Rewrite ``version`` as an older qatflow left it: the fraction tag, or no tag."""
        client.delete_model_version_tag(name, version, ACCURACY_TAG)
        if tag is not None:
            client.set_model_version_tag(name, version, LEGACY_ACCURACY_TAG, tag)
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)

    _, old = register(90.0)
    make_old_champion(old, tag="0.9")
    assert _champion(tracker, name) == (old, pytest.approx(90.0))

    # 5 points below the champion's 90 % (not 89 points above 0.9): refused...
    _, far = register(85.0)
    decision = tracker.promote_if_better(name, far, 85.0, 85.5, gate_points=1.0)
    assert not decision.promoted and decision.champion_accuracy_pct == pytest.approx(90.0)
    assert (
        f"legacy tag {LEGACY_ACCURACY_TAG} 0.9 (a fraction), read as 90.00%"
        in (decision.reasons[1])
    )
    assert f"-5.00 top-1 points vs champion v{old}" in decision.reasons[2]
    assert str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version) == old
    # ...and a candidate within the gate replaces it automatically.
    _, close = register(89.5)
    decision = tracker.promote_if_better(name, close, 89.5, 90.0, gate_points=1.0)
    assert decision.promoted, decision.reasons
    assert str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version) == close

    # A version with no tag at all: its run's legacy accuracy_top1 metric, a fraction too.
    run, untagged = register(80.0)
    tracker.log_metrics(run, {LEGACY_ACCURACY_METRIC: 0.8})
    make_old_champion(untagged, tag=None)
    assert _champion(tracker, name) == (untagged, pytest.approx(80.0))
    # Not a number, or not a fraction: skipped, then nothing is left to compare against.
    run, garbage = register(70.0)
    make_old_champion(garbage, tag="n/a")
    assert _champion(tracker, name) == (garbage, None)
    client.set_model_version_tag(name, garbage, LEGACY_ACCURACY_TAG, "70")
    assert _champion(tracker, name) == (garbage, None)
    _, candidate = register(99.0)
    decision = tracker.promote_if_better(name, candidate, 99.0, 99.0, gate_points=1.0)
    assert not decision.promoted
    assert f"champion v{garbage} has no recorded accuracy" in decision.reasons[1]
    tracker.end_run(parent)
