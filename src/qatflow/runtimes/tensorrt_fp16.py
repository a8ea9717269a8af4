"""FP16 float layers for strongly typed TensorRT (11): the ONNX is converted before parsing.

Q/DQ nodes take FP16 scales, so ``DequantizeLinear`` feeds the FP16 layer directly (no
``Cast`` between the Q/DQ pair and the layer it quantizes, which would stand in the way of INT8
fusion). That needs opset 19: opset-13 ``DequantizeLinear`` outputs FP32 only. Graph inputs and
outputs stay FP32. A Q/DQ node whose scale is below the smallest normal FP16 number keeps FP32
(with Casts around it), since its scale would lose precision in FP16.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from qatflow.errors import RuntimeBackendError

FP16_QDQ_OPSET = 19
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)


@dataclasses.dataclass(frozen=True)
class Fp16Conversion:
    """The converted model, the opset it was raised to and the Q/DQ nodes kept in FP32."""

    model: onnx.ModelProto
    opset: int
    fp32_qdq_nodes: tuple[str, ...]


def convert_to_mixed_fp16(model: onnx.ModelProto) -> Fp16Conversion:
    """FP16 float layers and FP16 Q/DQ scales (opset >= 19); graph I/O stays FP32."""
    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise RuntimeBackendError(
            "fp16=True with TensorRT 11 needs onnxconverter-common "
            "(pip install 'qatflow[tensorrt]')"
        ) from exc
    named = with_unique_node_names(model)
    opset = _default_opset(named)
    if opset < FP16_QDQ_OPSET:
        try:
            named = version_converter.convert_version(named, FP16_QDQ_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors/ValueErrors
            raise RuntimeBackendError(
                f"fp16=True with TensorRT 11 needs opset {FP16_QDQ_OPSET} for FP16 Q/DQ scales, "
                f"and this opset-{opset} model cannot be upgraded ({exc}); export it at opset "
                f"{FP16_QDQ_OPSET} or build with fp16=False"
            ) from exc
    keep = small_scale_qdq_nodes(named)
    converted: onnx.ModelProto = float16.convert_float_to_float16(
        named,
        keep_io_types=True,
        op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST),
        node_block_list=list(keep),
    )
    return Fp16Conversion(converted, max(opset, FP16_QDQ_OPSET), keep)


def small_scale_qdq_nodes(model: onnx.ModelProto) -> tuple[str, ...]:
    """Names of Q/DQ nodes with a constant scale below the smallest normal FP16 number."""
    scales = {init.name: init for init in model.graph.initializer}
    small = []
    for node in model.graph.node:
        if node.op_type in QDQ_OPS and len(node.input) > 1 and node.input[1] in scales:
            scale = numpy_helper.to_array(scales[node.input[1]])
            if scale.size and float(np.abs(scale).min()) < FP16_MIN_NORMAL:
                small.append(node.name)
    return tuple(small)


def with_unique_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` whose nodes all have distinct names.

    The float16 converter names its Cast tensors after the node, so unnamed or duplicate
    node names would produce a graph that is not in SSA form.
    """
    named = onnx.ModelProto()
    named.CopyFrom(model)
    seen: set[str] = set()
    for index, node in enumerate(named.graph.node):
        if not node.name or node.name in seen:
            base = node.name or f"{node.op_type}_{index}"
            node.name, suffix = base, 0
            while node.name in seen:
                suffix += 1
                node.name = f"{base}_{suffix}"
        seen.add(node.name)
    return named


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
