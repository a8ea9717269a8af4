"""KFP component ``export_onnx``: a Keras model (FP32 or Q/DQ) to ONNX via tf2onnx."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from qatflow.images import TENSORFLOW_IMAGE


@dsl.component(base_image=TENSORFLOW_IMAGE, install_kfp_package=False)
def export_onnx(
    model: Input[Model],
    onnx_model: Output[Model],
    opset: int = 17,
    dataset: Input[Dataset] | None = None,
) -> None:
    """Export to ONNX, keeping Q/DQ pairs; check TensorRT's import rules, and compare the
    ONNX with the Keras model on ``dataset``'s calibration split (synthetic inputs without it).

    ``onnx_model`` is a folder: ``model.onnx`` and ``model.validation.json`` (the rule check).
    """
    import os

    from qatflow import steps

    os.makedirs(onnx_model.path, exist_ok=True)
    report = steps.export(
        os.path.join(model.path, model.metadata["file"]),
        os.path.join(onnx_model.path, "model.onnx"),
        opset=opset,
        dataset_spec=dataset.path if dataset is not None else None,
    ).report
    onnx_model.framework = "onnx"
    onnx_model.metadata.update(
        {
            "file": "model.onnx",
            "opset": opset,
            "precision": model.metadata.get("precision", "fp32"),
            "qdq_nodes": report.qdq_nodes,
            "tensorrt_rules_ok": report.ok,
        }
    )
