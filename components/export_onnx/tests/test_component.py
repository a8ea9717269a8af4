"""export_onnx: FP32 and Q/DQ Keras models to ONNX, with TensorRT's rules checked."""

import json
from pathlib import Path

import onnx
from kfp import dsl
from qatflow_components.export_onnx.component import export_onnx
from tests.chain import Chain, artifact


def _export(
    model_dir: Path, out: Path, dataset: dsl.Dataset | None = None, **metadata: str
) -> dsl.Model:
    onnx_model = artifact(dsl.Model, out)
    export_onnx.python_func(
        model=artifact(dsl.Model, model_dir, file="model.keras", **metadata),
        onnx_model=onnx_model,
        dataset=dataset,
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


def test_export_is_checked_against_keras_on_the_dataset(chain: Chain, tmp_path: Path) -> None:
    from qatflow.onnx.parity import read_export_check

    dataset = artifact(dsl.Dataset, chain.dataset)
    exported = _export(chain.quantized, tmp_path / "q", dataset=dataset, precision="int8")
    record = read_export_check(onnx.load(Path(exported.path) / exported.metadata["file"]))
    assert record is not None and record["passed"], record
    assert record["data"].endswith("samples of the given data")
