"""quantize_calibrate: a calibrated Q/DQ model with its placement summary, or nothing."""

import json
from pathlib import Path

import pytest
from kfp import dsl
from qatflow_components.quantize_calibrate.component import quantize_calibrate
from tests.chain import Chain, artifact

from qatflow.errors import QuantizationError


def _run(
    chain: Chain, tmp_path: Path, method: str, runtime: str = "tensorrt"
) -> tuple[dsl.Model, dsl.Markdown]:
    quantized = artifact(dsl.Model, tmp_path / "quantized")
    placement = artifact(dsl.Markdown, tmp_path / "placement")
    quantize_calibrate.python_func(
        model=artifact(dsl.Model, chain.fp32, file="model.keras"),
        dataset=artifact(dsl.Dataset, chain.dataset),
        quantized=quantized,
        placement=placement,
        runtime=runtime,
        calibration_method=method,
        calibration_batches=2,
    )
    return quantized, placement


def test_quantized_model_and_placement(chain: Chain, tmp_path: Path) -> None:
    quantized, placement = _run(chain, tmp_path, "percentile")
    folder = Path(quantized.path)
    assert {p.name for p in folder.iterdir()} == {
        "model.keras",
        "model.placement.md",
        "model.placement.json",
        "model.calibration.json",
    }
    assert json.loads((folder / "model.calibration.json").read_text())["method"] == "percentile"
    assert "stem_conv" in Path(placement.path).read_text()
    assert quantized.metadata == {
        "file": "model.keras",
        "precision": "int8",
        "calibration_method": "percentile",
        "calibration_batches": 2,
        "runtime": "tensorrt",
        "framework": "keras",
    }


def _add_inputs(quantized: dsl.Model) -> str:
    rows = json.loads((Path(quantized.path) / "model.placement.json").read_text())
    return next(row["input_quantized"] for row in rows if row["layer_class"] == "Add")


def test_the_placement_is_for_the_pipeline_runtime(chain: Chain, tmp_path: Path) -> None:
    tensorrt, _ = _run(chain, tmp_path / "trt", "max")
    onnxruntime, _ = _run(chain, tmp_path / "ort", "max", runtime="onnxruntime")
    assert onnxruntime.metadata["runtime"] == "onnxruntime"
    assert _add_inputs(tensorrt) == "1 of 2: [1]"  # the convolution branch stays float
    assert _add_inputs(onnxruntime) == "all 2"


def test_unknown_method_leaves_no_model(chain: Chain, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="'median'"):
        _run(chain, tmp_path, "median")
    assert not (tmp_path / "quantized" / "model.keras").exists()
    assert not (tmp_path / "placement").exists()


def test_spec_percentile_and_activation_range(chain: Chain, tmp_path: Path) -> None:
    from qatflow.models import load_model

    spec = tmp_path / "spec.yaml"
    spec.write_text("layers:\n  - name: stem_conv\n    quantize_input: false\n")
    quantized = artifact(dsl.Model, tmp_path / "quantized")
    quantize_calibrate.python_func(
        model=artifact(dsl.Model, chain.fp32, file="model.keras"),
        dataset=artifact(dsl.Dataset, chain.dataset),
        quantized=quantized,
        placement=artifact(dsl.Markdown, tmp_path / "placement"),
        runtime="tensorrt",
        calibration_method="percentile",
        calibration_batches=1,
        percentile=99.0,
        activation_range="ema",
        spec=str(spec),
    )
    folder = Path(quantized.path)
    rows = {row["layer"]: row for row in json.loads((folder / "model.placement.json").read_text())}
    assert rows["stem_conv"]["input_quantized"] == "no"  # the spec's override
    model = load_model(str(folder / "model.keras"))
    ranges = {getattr(layer, "activation_range", None) for layer in model.layers} - {None}
    assert ranges == {"ema"}


def test_percentile_out_of_range_leaves_no_model(chain: Chain, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match=r"percentile must be in \(0, 100\]"):
        quantize_calibrate.python_func(
            model=artifact(dsl.Model, chain.fp32, file="model.keras"),
            dataset=artifact(dsl.Dataset, chain.dataset),
            quantized=artifact(dsl.Model, tmp_path / "quantized"),
            placement=artifact(dsl.Markdown, tmp_path / "placement"),
            runtime="tensorrt",
            calibration_method="percentile",
            percentile=0.0,
        )
    assert not (tmp_path / "quantized" / "model.keras").exists()
