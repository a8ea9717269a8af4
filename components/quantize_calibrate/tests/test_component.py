"""quantize_calibrate: a calibrated Q/DQ model with its placement summary, or nothing."""

import json
from pathlib import Path

import pytest
from kfp import dsl
from qatflow_components.quantize_calibrate.component import quantize_calibrate
from tests.chain import Chain, artifact

from qatflow.errors import QuantizationError


def _run(chain: Chain, tmp_path: Path, method: str) -> tuple[dsl.Model, dsl.Markdown]:
    quantized = artifact(dsl.Model, tmp_path / "quantized")
    placement = artifact(dsl.Markdown, tmp_path / "placement")
    quantize_calibrate.python_func(
        model=artifact(dsl.Model, chain.fp32, file="model.keras"),
        dataset=artifact(dsl.Dataset, chain.dataset),
        quantized=quantized,
        placement=placement,
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
        "framework": "keras",
    }


def test_unknown_method_leaves_no_model(chain: Chain, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="'median'"):
        _run(chain, tmp_path, "median")
    assert not (tmp_path / "quantized" / "model.keras").exists()
    assert not (tmp_path / "placement").exists()
