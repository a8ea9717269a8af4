"""export_onnx: FP32 and Q/DQ Keras models to ONNX, with TensorRT's rules checked."""

import json
from pathlib import Path

import onnx
from kfp import dsl
from qatflow_components.export_onnx.component import export_onnx
from tests.chain import Chain, artifact


def _export(model_dir: Path, out: Path, **metadata: str) -> dsl.Model:
    onnx_model = artifact(dsl.Model, out)
    export_onnx.python_func(
        model=artifact(dsl.Model, model_dir, file="model.keras", **metadata), onnx_model=onnx_model
    )
    return onnx_model


def test_quantized_export_keeps_qdq(chain: Chain, tmp_path: Path) -> None:
    exported = _export(chain.quantized, tmp_path / "q", precision="int8")
    folder = Path(exported.path)
    model = onnx.load(folder / exported.metadata["file"])
    assert any(node.op_type == "QuantizeLinear" for node in model.graph.node)
    assert json.loads((folder / "model.validation.json").read_text())["ok"]
    assert exported.metadata["qdq_nodes"] > 0
    assert exported.metadata["tensorrt_rules_ok"] is True
    assert exported.metadata["precision"] == "int8"
    assert exported.metadata["framework"] == "onnx"


def test_fp32_export(chain: Chain, tmp_path: Path) -> None:
    exported = _export(chain.fp32, tmp_path / "f")
    assert exported.metadata["qdq_nodes"] == 0
    assert exported.metadata["precision"] == "fp32"
