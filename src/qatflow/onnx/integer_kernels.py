"""Which Conv and Gemm QDQ groups ONNX Runtime's CPU selectors fuse into integer kernels.

A Conv or Gemm becomes QLinearConv or QGemm when its data input and weight are
DequantizeLinear outputs with constant scales (the data scale per tensor) and its output is
read only by QuantizeLinear nodes. The ideal integer check (:mod:`qatflow.onnx.integer_bias`)
and the rewrite's ``keep_float`` stage (:mod:`qatflow.onnx.ort_int8`) both ask this.
"""

from __future__ import annotations

import numpy as np
import onnx

from qatflow.onnx.graph import GraphIndex

INTEGER_KERNEL_OPS = frozenset({"Conv", "Gemm"})


def integer_kernel_scales(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    """``s_x * s_w`` (float32, per output channel) of an integer-kernel ``node``, else None."""
    if node.op_type not in INTEGER_KERNEL_OPS or node.output[0] in index.outputs:
        return None
    consumers = index.consumers.get(node.output[0], [])
    if not consumers or any(c.op_type != "QuantizeLinear" for c in consumers):
        return None
    scales = []
    for name in node.input[:2]:
        producer = index.producer.get(name)
        if producer is None or producer.op_type != "DequantizeLinear":
            return None
        scale = index.constant(producer.input[1])
        if scale is None:
            return None
        scales.append(scale.astype(np.float32).reshape(-1))
    x_scale, w_scale = scales
    if x_scale.size != 1:
        return None
    return (x_scale * w_scale).astype(np.float32)


def integer_convs(model: onnx.ModelProto) -> list[str]:
    """The names of the Convs of ``model`` that run as integer kernels, in graph order."""
    index = GraphIndex(model.graph)
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "Conv" and integer_kernel_scales(index, node) is not None
    ]
