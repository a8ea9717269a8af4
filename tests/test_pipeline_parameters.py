"""The step options the DAG exposes (image size, placement spec, percentile, activation range):
they reach the components that use them, and their values are checked before a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import compiler
from qatflow_pipelines.qat_int8.parameters import check_arguments
from qatflow_pipelines.qat_int8.pipeline import build_pipeline

from qatflow import cluster
from qatflow.errors import DataError, PipelineError
from qatflow.params import parse_image_size

# Pipeline parameter -> {task: the component input it sets}.
OPTIONS = {
    "image_size": {"prepare-data": "image_size", "publish": "image_size"},
    "quantization_spec": {"check-inputs": "spec", "quantize-calibrate": "spec", "publish": "spec"},
    "percentile": {"quantize-calibrate": "percentile", "publish": "percentile"},
    "activation_range": {"quantize-calibrate": "activation_range", "publish": "activation_range"},
}


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipeline") / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(runtime="onnxruntime"), str(path))
    return path


def _spec(package: Path) -> dict[str, Any]:
    spec: dict[str, Any] = next(yaml.safe_load_all(package.read_text()))
    return spec


def test_the_options_reach_their_components(package: Path) -> None:
    tasks = _spec(package)["root"]["dag"]["tasks"]
    for parameter, inputs in OPTIONS.items():
        for task, name in inputs.items():
            given = tasks[task]["inputs"]["parameters"][name]
            assert given == {"componentInputParameter": parameter}, (task, name)


def test_the_options_default_to_the_library_defaults(package: Path) -> None:
    definitions = _spec(package)["root"]["inputDefinitions"]["parameters"]
    assert {name: definitions[name]["defaultValue"] for name in OPTIONS} == {
        "image_size": "",
        "quantization_spec": "",
        "percentile": 99.99,
        "activation_range": "frozen",
    }
    assert definitions["percentile"]["parameterType"] == "NUMBER_DOUBLE"
    assert definitions["image_size"]["parameterType"] == "STRING"


def test_submit_params_convert_to_the_option_types(package: Path) -> None:
    texts = {
        "image_size": "224,224",
        "quantization_spec": "s3://bucket/spec.yaml",
        "percentile": "99.9",
        "activation_range": "ema",
    }
    converted = cluster.parse_arguments(package, texts)
    assert converted == {**texts, "percentile": 99.9}
    check_arguments(converted)


def test_good_values_pass() -> None:
    check_arguments({"image_size": "", "quantization_spec": "", "percentile": 100})
    check_arguments(
        {"image_size": "32,48", "quantization_spec": "spec.yaml", "activation_range": "ema"}
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"percentile": 0.0}, "percentile=0.0: must be in (0, 100]"),
        ({"percentile": 100.5}, "percentile=100.5: must be in (0, 100]"),
        ({"percentile": "high"}, "percentile='high': must be a finite number"),
        ({"activation_range": "minmax"}, "activation_range='minmax': must be one of frozen, ema"),
        ({"image_size": "224"}, "image_size='224': must be H,W with two integers >= 1"),
        ({"image_size": "0,8"}, "image_size='0,8': must be H,W with two integers >= 1"),
        ({"image_size": 224}, "image_size=224: must be H,W (e.g. 224,224) or empty"),
        ({"quantization_spec": 3}, "quantization_spec=3: must be a string"),
    ],
)
def test_bad_values_are_refused_before_a_run(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(PipelineError) as raised:
        check_arguments(arguments)
    assert message in str(raised.value)


def test_image_size_spelling() -> None:
    assert parse_image_size("") is None and parse_image_size("  ") is None
    assert parse_image_size("224,160") == (224, 160)
    assert parse_image_size(" 8, 8 ") == (8, 8)
    for bad in ("224", "224x224", "1,2,3", "-1,4", "a,b"):
        with pytest.raises(DataError, match="image_size"):
            parse_image_size(bad)
