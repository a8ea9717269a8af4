"""export_onnx: Keras (FP32 or quantized) to ONNX with tf2onnx, Q/DQ kept where placed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import keras
import onnx
import tensorflow as tf

from qatflow.errors import ExportError
from qatflow.onnx.parity import record_export_check
from qatflow.onnx.trt_layout import fold_weight_quantization, sink_qdq_through_layout_ops
from qatflow.onnx.validate import ValidationReport, validate_onnx
from qatflow.params import EXPORT
from qatflow.quantization.ranges import describe_unset
from qatflow.quantization.transform import check_quantizable
from qatflow.quantization.wrapper import uncalibrated_quantizers
from qatflow.runtimes.fidelity import FidelityData
from qatflow.storage import atomic_output

log = logging.getLogger("qatflow.export")

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear
# tf2onnx optimizers that fold or move Q/DQ; TensorRT must see the pairs as placed.
_QDQ_OPTIMIZERS = ("q_dq_optimizer", "const_dequantize_optimizer")


def _optimizers() -> dict[str, object]:
    from tf2onnx import optimizer

    return {k: v for k, v in optimizer._optimizers.items() if k not in _QDQ_OPTIMIZERS}


def _input_signature(model: keras.Model) -> list[tf.TensorSpec]:
    specs = []
    for tensor in model.inputs:
        shape = (None, *tuple(tensor.shape)[1:])
        name = tensor.name.split(":")[0] if tensor.name else "input"
        specs.append(tf.TensorSpec(shape, tf.as_dtype(tensor.dtype), name=name))
    return specs


def _with_output_names(model: keras.Model) -> keras.Model:
    """``model``, or for a Sequential a Functional model over the same layers.

    tf2onnx names the graph outputs after ``model.output_names``, which Keras 3 Sequential
    models (Keras 2 ``.h5`` files included) do not have.
    """
    if isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def to_onnx_proto(model: keras.Model, opset: int = EXPORT.opset) -> onnx.ModelProto:
    """Convert ``model`` with tf2onnx and apply the Q/DQ placement rewrites (no file I/O)."""
    import tf2onnx

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: per-channel Q/DQ needs opset {MIN_OPSET}+")
    check_quantizable(model)
    missing = uncalibrated_quantizers(model)
    if missing:
        raise ExportError(
            f"{describe_unset(model, missing)}; run qatflow.calibrate (or `qatflow quantize "
            "--calibration-data`), or fine-tune the model, first"
        )
    try:
        proto, _ = tf2onnx.convert.from_keras(
            _with_output_names(model),
            input_signature=_input_signature(model),
            opset=opset,
            optimizers=_optimizers(),
        )
    except Exception as err:
        raise ExportError(f"tf2onnx could not convert model {model.name!r}: {err}") from err
    moved = sink_qdq_through_layout_ops(proto)
    folded = fold_weight_quantization(proto)
    log.info("moved %d activation Q/DQ pairs past layout ops, folded %d weights", moved, folded)
    onnx.helper.set_model_props(
        proto,
        {"qatflow.source_model": model.name, "qatflow.quantized": str(folded > 0).lower()},
    )
    return proto


def export_onnx(
    model: keras.Model,
    path: str | os.PathLike[str],
    opset: int = EXPORT.opset,
    *,
    check_data: FidelityData | None = None,
) -> Path:
    """Export ``model`` to ONNX at ``path`` and return the path.

    Q/DQ pairs stay as placed (tf2onnx's Q/DQ optimizers are off), the batch dimension is
    dynamic, quantized weights are stored as INT8 initializers feeding DequantizeLinear,
    and FP32 models export the same way. The graph is checked with ``validate_onnx``;
    a graph TensorRT would reject raises ExportError and nothing is written. The ONNX is
    then compared with ``model`` on ``check_data`` (synthetic inputs without it) and the
    result is stored in the file (:mod:`qatflow.onnx.parity`).
    """
    proto = to_onnx_proto(model, opset)
    report: ValidationReport = validate_onnx(proto)
    if not report.ok:
        raise ExportError(f"exported graph breaks TensorRT's rules:\n{report}")
    record_export_check(model, proto, check_data)
    with atomic_output(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)
