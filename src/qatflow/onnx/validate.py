"""validate_onnx: check an exported graph against TensorRT's explicit-quantization import rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qatflow.errors import ExportError
from qatflow.onnx.graph import GraphIndex, attribute, op_counts
from qatflow.onnx.trt_layout import WEIGHT_AXIS

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class ValidationReport:
    """What ``validate_onnx`` found. ``ok`` is false when any error was found; ``fatal`` holds
    the errors that make the graph wrong for every runtime (also in ``errors``)."""

    path: str
    errors: list[str] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    quantized_ops: list[str] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    qdq_nodes: int = 0
    opset: int = 0

    @property
    def ok(self) -> bool:
        """True when TensorRT's rules hold."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "path": self.path,
            "ok": self.ok,
            "opset": self.opset,
            "qdq_nodes": self.qdq_nodes,
            "quantized_ops": len(self.quantized_ops),
            "float_ops": self.float_ops,
            "errors": self.errors,
            "fatal": self.fatal,
            "warnings": self.warnings,
        }

    def __str__(self) -> str:
        status = "OK" if self.ok else f"{len(self.errors)} error(s)"
        lines = [
            f"{self.path}: {status}",
            f"  opset {self.opset}, {self.qdq_nodes} Q/DQ nodes, "
            f"{len(self.quantized_ops)} INT8 weighted ops, "
            f"{len(self.float_ops)} float weighted ops",
        ]
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _check_qdq_node(node: onnx.NodeProto, index: GraphIndex, report: ValidationReport) -> None:
    label = f"{node.op_type} {node.name!r}"
    scale = index.constant(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        report.errors.append(f"{label}: scale is not a constant")
    else:
        if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            report.fatal.append(f"{label}: scales must be positive and finite (min {scale.min()})")
    zero_point = index.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero_point is None:
        report.errors.append(
            f"{label}: zero-point missing (defaults to uint8); TensorRT needs int8 0"
        )
    else:
        if zero_point.dtype != np.int8:
            report.errors.append(
                f"{label}: zero-point type {zero_point.dtype}, TensorRT needs int8"
            )
        if np.any(zero_point != 0):
            report.errors.append(f"{label}: zero-point must be 0 (symmetric quantization)")
    if scale is not None and scale.size > 1 and report.opset < 13:
        report.errors.append(f"{label}: per-channel scales need opset 13 or newer")


def _dequantized(name: str, index: GraphIndex) -> tuple[onnx.NodeProto | None, bool]:
    """The DequantizeLinear feeding ``name`` and whether it feeds it directly."""
    node = index.producer.get(name)
    if node is not None and node.op_type == "DequantizeLinear":
        return node, True
    source = index.source_through_layout(name)
    if source is not None and source.op_type == "DequantizeLinear":
        return source, False
    return None, False


def _check_weighted_op(node: onnx.NodeProto, index: GraphIndex, report: ValidationReport) -> None:
    label = f"{node.op_type} {node.name!r}"
    found = [_dequantized(name, index) for name in node.input[:2]]
    dequantized = [dq is not None for dq, _ in found]
    if not any(dequantized):
        report.float_ops.append(node.name)
        return
    if not all(dequantized):
        missing = "input" if not dequantized[0] else "weights"
        report.errors.append(
            f"{label}: only one input is dequantized ({missing} not): TensorRT needs Q/DQ on "
            "both inputs to run it in INT8"
        )
        return
    report.quantized_ops.append(node.name)
    for (dq, direct), role in zip(found, ("input", "weights"), strict=True):
        if dq is not None and not direct:
            report.warnings.append(
                f"{label}: {role} DequantizeLinear reaches it through layout ops"
            )
    weight_dq, direct = found[1]
    scale = index.constant(weight_dq.input[1]) if weight_dq is not None else None
    if weight_dq is None or scale is None or scale.size <= 1 or not direct:
        return
    expected = WEIGHT_AXIS[node.op_type]
    if node.op_type == "Gemm" and attribute(node, "transB", 0):
        expected = 0
    axis = attribute(weight_dq, "axis", 1)
    weights = index.constant(weight_dq.input[0])
    if axis is None or axis % max(1, weights.ndim if weights is not None else 1) != expected:
        report.errors.append(
            f"{label}: per-channel weight axis is {axis}, TensorRT expects {expected} "
            f"for {node.op_type}"
        )
    elif weights is not None and weights.shape[expected] != scale.size:
        report.errors.append(
            f"{label}: {scale.size} weight scales for {weights.shape[expected]} channels"
        )


def _check_outputs(index: GraphIndex, report: ValidationReport) -> None:
    for name in index.outputs:
        node = index.producer.get(name)
        if node is not None and node.op_type in QDQ_OPS:
            report.errors.append(
                f"graph output {name!r} comes straight from {node.op_type} {node.name!r}: "
                "Q/DQ must not sit on outputs"
            )
    for node in index.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        users = index.consumers.get(node.output[0], [])
        if not users and node.output[0] not in index.outputs:
            report.warnings.append(f"DequantizeLinear {node.name!r} feeds nothing")


def validate_onnx(model: str | Path | onnx.ModelProto) -> ValidationReport:
    """Check a graph with ``onnx.checker`` (full check, with shape inference) and against
    TensorRT's Q/DQ import rules, and return a report.

    Checked: the ONNX checker passes (every node input is produced somewhere, types and shapes
    infer); int8 zero-points equal to 0; positive, finite scales; per-channel axis right
    for the op (Conv 0, ConvTranspose 1, MatMul weights 1); both inputs of every
    Conv/ConvTranspose/MatMul/Gemm dequantized when either is (ops with neither run in
    float and are listed); no Q/DQ feeding only a graph output; opset 13+ for per-channel.
    The checker's findings and bad scales are ``fatal``: no runtime computes such a graph right.
    """
    proto, path = _load(model)
    report = ValidationReport(path)
    report.opset = max(
        (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0
    )
    _check_structure(proto, report)
    index = GraphIndex(proto.graph)
    counts = op_counts(proto.graph.node)
    report.qdq_nodes = sum(counts.get(op, 0) for op in QDQ_OPS)
    for node in proto.graph.node:
        if node.op_type in QDQ_OPS:
            _check_qdq_node(node, index, report)
        elif node.op_type in WEIGHT_AXIS:
            _check_weighted_op(node, index, report)
    for banned in ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul"):
        if banned in counts:
            report.errors.append(f"{banned} is not supported by TensorRT: use Q/DQ + float ops")
    _check_outputs(index, report)
    report.errors[:0] = report.fatal
    return report


def check_runnable(model: str | Path | onnx.ModelProto, path: str | Path | None = None) -> None:
    """Raise an ExportError naming the file (``path`` for a loaded ``model``) and its fatal
    problems (see ``validate_onnx``)."""
    report = validate_onnx(model)
    where = path or report.path
    if report.fatal:
        raise ExportError(
            f"{where} cannot be run correctly by any runtime: {'; '.join(report.fatal)} "
            f"(`qatflow validate {where}` lists every problem)"
        )


def _load(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, "<model>"
    path = str(model)
    try:
        return onnx.load(path, load_external_data=True), path
    except FileNotFoundError:
        raise ExportError(f"ONNX file {path} does not exist") from None
    except Exception as err:  # onnx raises DecodeError and others for a corrupt file
        raise ExportError(f"{path} is not a valid ONNX model: {err}") from None


def _check_structure(proto: onnx.ModelProto, report: ValidationReport) -> None:
    """``onnx.checker``'s full check (with strict shape inference) as fatal findings."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        report.fatal.append(f"onnx checker: {first}")
