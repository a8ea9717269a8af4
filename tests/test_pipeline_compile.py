"""The compiled pipeline YAML: GPU placement, images, caching, retries, parameters, CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from qatflow_pipelines.qat_int8.pipeline import GpuOptions
from qatflow_pipelines.runner.compile import compile_pipeline

from qatflow import cluster
from qatflow.cli import main
from qatflow.errors import PipelineError
from qatflow.images import IMAGES, TENSORFLOW_IMAGE, TENSORRT_IMAGE, image_name

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINE_COMPONENTS = ("build-engine", "evaluate")
CACHED = {
    "prepare-data",
    "prepare-model",
    "quantize-calibrate",
    "qat-finetune",
    "export-onnx",
    "export-onnx-2",
    "export-onnx-3",
    "build-engine",
    "build-engine-2",
    "build-engine-3",
    "compare",
}
UNCACHED = {"check-inputs", "evaluate", "evaluate-2", "evaluate-3", "publish"}
RETRIED = {"prepare-data", "prepare-model", "publish"}


def _load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pipeline spec and the platform spec (empty when no task has Kubernetes settings)."""
    spec, *platform = yaml.safe_load_all(path.read_text())
    return spec, platform[0] if platform else {}


def _executors(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each DAG task's container spec, by task name."""
    tasks = spec["root"]["dag"]["tasks"]
    executors = spec["deploymentSpec"]["executors"]
    return {
        name: executors[spec["components"][task["componentRef"]["name"]]["executorLabel"]][
            "container"
        ]
        for name, task in tasks.items()
    }


def _platform_executors(spec: dict[str, Any], platform: dict[str, Any]) -> dict[str, Any]:
    """Each task's Kubernetes settings (tolerations, node selector), by task name."""
    settings = platform.get("platforms", {}).get("kubernetes", {})
    settings = settings.get("deploymentSpec", {}).get("executors", {})
    tasks = spec["root"]["dag"]["tasks"]
    return {
        name: settings.get(spec["components"][task["componentRef"]["name"]]["executorLabel"], {})
        for name, task in tasks.items()
    }


def _is_engine_task(name: str) -> bool:
    return name.rsplit("-", 1)[0] in ENGINE_COMPONENTS or name in ENGINE_COMPONENTS


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    path = tmp_path_factory.mktemp("compile") / "pipeline.yaml"
    gpu = GpuOptions(node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"})
    assert compile_pipeline(path, gpu=gpu) == path
    return _load(path)


def test_gpu_only_on_engine_tasks(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    spec, platform = compiled
    kubernetes = _platform_executors(spec, platform)
    engine_tasks = [name for name in _executors(spec) if _is_engine_task(name)]
    assert len(engine_tasks) == 6
    for name, container in _executors(spec).items():
        accelerator = container.get("resources", {}).get("accelerator")
        if _is_engine_task(name):
            assert accelerator["resourceType"] == "nvidia.com/gpu", name
            assert accelerator["resourceCount"] == "1", name
            assert kubernetes[name]["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ]
            assert kubernetes[name]["nodeSelector"] == {
                "labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}
            }
            assert container["image"] == TENSORRT_IMAGE
        else:
            assert accelerator is None, name
            assert kubernetes[name] == {}, name
            assert container["image"] == TENSORFLOW_IMAGE, name


def test_images_come_from_the_images_folder(
    compiled: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    known = {spec.reference for spec in IMAGES.values()}
    for name, container in _executors(compiled[0]).items():
        assert container["image"] in known, name
        assert (REPO_ROOT / IMAGES[image_name(container["image"])].dockerfile).is_file()
        command = " ".join(container["command"])
        assert "pip install" not in command, f"{name} installs packages at run time"


def test_caching_and_retries(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    tasks = compiled[0]["root"]["dag"]["tasks"]
    assert set(tasks) == CACHED | UNCACHED
    for name, task in tasks.items():
        assert task["cachingOptions"].get("enableCache", False) is (name in CACHED), name
        if name in RETRIED:
            assert task["retryPolicy"]["maxRetryCount"] == 2, name
            assert task["retryPolicy"]["backoffDuration"] == "30s", name
        else:
            assert "retryPolicy" not in task, name


def test_parameters_and_defaults(compiled: tuple[dict[str, Any], dict[str, Any]]) -> None:
    params = compiled[0]["root"]["inputDefinitions"]["parameters"]
    defaults = {name: definition.get("defaultValue") for name, definition in params.items()}
    assert defaults == {
        "model_uri": "demo",
        "dataset_uri": "fashion-mnist",
        "preprocessing": "scale01",
        "batch_size": 64,
        "image_size": "",
        "limit": 0,
        "pretrain_epochs": 5,
        "epochs": 2,
        "learning_rate": 0.001,
        "qat_steps_per_epoch": 0,
        "calibration_method": "max",
        "calibration_batches": 16,
        "percentile": 99.99,
        "quantization_spec": "",
        "activation_range": "frozen",
        "runtime": "tensorrt",
        "batch_profile_min": 1,
        "batch_profile_opt": 8,
        "batch_profile_max": 64,
        "int8_encoding": "auto",
        "fidelity_samples": 1024,
        "latency_iterations": 200,
        "eval_max_batches": 0,
        "accuracy_gate": 1.0,
        "tracking_uri": "",
        "mlflow_experiment": "qatflow",
        "registered_model": "qatflow-qat-int8",
        "s3_prefix": "",
    }
    assert params["epochs"]["parameterType"] == "NUMBER_INTEGER"
    assert params["learning_rate"]["parameterType"] == "NUMBER_DOUBLE"
    outputs = compiled[0]["root"]["outputDefinitions"]
    assert set(outputs["artifacts"]) == {"report", "publish_record"}
    # The gate's verdict is a pipeline output a scheduled retraining can branch on.
    assert outputs["parameters"] == {"gate_verdict": {"parameterType": "STRING"}}


def test_the_cluster_helpers_read_the_package(tmp_path: Path) -> None:
    path = compile_pipeline(tmp_path / "p.yaml")
    assert cluster.parse_arguments(path, {"epochs": "3", "accuracy_gate": "0.5"}) == {
        "epochs": 3,
        "accuracy_gate": 0.5,
    }
    with pytest.raises(PipelineError, match="epoch"):
        cluster.check_arguments(path, {"epoch": 3})


def test_onnxruntime_build_has_no_gpu_requests(tmp_path: Path) -> None:
    spec, platform = _load(compile_pipeline(tmp_path / "cpu.yaml", runtime="onnxruntime"))
    for name, container in _executors(spec).items():
        assert "accelerator" not in container.get("resources", {}), name
        assert container["image"] == TENSORFLOW_IMAGE, name
    assert spec["root"]["inputDefinitions"]["parameters"]["runtime"]["defaultValue"] == (
        "onnxruntime"
    )
    assert platform == {}


def test_cli_compile_without_toleration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.yaml"
    assert main(["compile", "--output", str(out), "--no-toleration"]) == 0
    assert str(out) in capsys.readouterr().out
    spec, platform = _load(out)
    kubernetes = _platform_executors(spec, platform)
    for name, container in _executors(spec).items():
        assert "tolerations" not in kubernetes[name] and "nodeSelector" not in kubernetes[name]
        if _is_engine_task(name):
            assert container["resources"]["accelerator"]["resourceCount"] == "1"


def test_cli_rejects_a_malformed_node_selector(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["compile", "-o", str(tmp_path / "x.yaml"), "--gpu-node-selector", "gpu"])
    assert "KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_a_failed_compile_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="runtime"):
        compile_pipeline(tmp_path / "bad.yaml", runtime="tensorflow-lite")
    with pytest.raises(PipelineError, match="accelerator_limit"):
        compile_pipeline(tmp_path / "bad.yaml", gpu=GpuOptions(accelerator_limit=0))
    assert list(tmp_path.iterdir()) == []


def test_code_version_reaches_every_task_environment(
    compiled: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    """Local runs key the step cache on the source hash through each task's environment."""
    from kfp import compiler
    from qatflow_pipelines.qat_int8.pipeline import CODE_VERSION_ENV, build_pipeline

    path = tmp_path / "versioned.yaml"
    compiler.Compiler().compile(
        build_pipeline(runtime="onnxruntime", code_version="abc123"), str(path)
    )
    spec, _ = _load(path)
    for name, container in _executors(spec).items():
        assert {"name": CODE_VERSION_ENV, "value": "abc123"} in container.get("env", []), name
    # Cluster builds leave it out: the image tags pin the code there.
    assert all("env" not in container for container in _executors(compiled[0]).values())
