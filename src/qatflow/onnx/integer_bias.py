"""Conv and Gemm biases rounded to the int32 units that integer kernels add them in.

ONNX Runtime's QLinearConv and QGemm (and TensorRT's int8 convolutions) add a bias as an int32
in units of ``s_x * s_w``, per output channel. A float-math run of a QDQ graph whose biases were
pre-rounded to those units therefore computes what an ideal integer engine of that graph
computes. How far that run lands from the unrounded graph measures how much the network
amplifies rounding that every correct integer engine makes: the fidelity gate's rounding
sensitivity (:mod:`qatflow.runtimes.fidelity`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from qatflow.onnx.graph import GraphIndex

_INTEGER_KERNELS = frozenset({"Conv", "Gemm"})
_BIAS = 2  # the bias input of both


def round_biases_to_integer_units(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with each integer-kernel bias rounded, and how many were rounded.

    A Conv or Gemm counts as an integer kernel when its data input and weight are
    DequantizeLinear outputs with constant scales (the data scale per tensor) and its output is
    read only by QuantizeLinear nodes: the QDQ group ONNX Runtime fuses. Its constant float bias
    ``b`` becomes ``round(b / (s_x * s_w)) * s_x * s_w`` in float32, the value the kernel adds.
    """
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    index = GraphIndex(rounded.graph)
    count = 0
    for node in rounded.graph.node:
        if node.op_type not in _INTEGER_KERNELS or len(node.input) <= _BIAS:
            continue
        if node.input[_BIAS] not in index.initializers:
            continue
        unit = _bias_unit(index, node)
        if unit is None:
            continue
        init = index.initializers[node.input[_BIAS]]
        bias = numpy_helper.to_array(init).astype(np.float32)
        if unit.size not in (1, bias.size):
            continue
        value = (np.round(bias / unit) * unit).astype(np.float32).reshape(bias.shape)
        init.CopyFrom(numpy_helper.from_array(value, init.name))
        count += 1
    return rounded, count


def _bias_unit(index: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    """``s_x * s_w`` (float32, per output channel) of an integer-kernel ``node``, else None."""
    consumers = index.consumers.get(node.output[0], [])
    if not consumers or any(c.op_type != "QuantizeLinear" for c in consumers):
        return None
    if node.output[0] in index.outputs:
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
