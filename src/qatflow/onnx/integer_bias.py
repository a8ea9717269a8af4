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
from qatflow.onnx.integer_kernels import INTEGER_KERNEL_OPS, integer_kernel_scales

_BIAS = 2  # the bias input of both


def round_biases_to_integer_units(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with each integer-kernel bias rounded, and how many were rounded.

    A Conv or Gemm counts where ONNX Runtime fuses its QDQ group
    (:func:`qatflow.onnx.integer_kernels.integer_kernel_scales`). Its constant float bias ``b``
    becomes ``round(b / (s_x * s_w)) * s_x * s_w`` in float32, the value the kernel adds.
    """
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    index = GraphIndex(rounded.graph)
    count = 0
    for node in rounded.graph.node:
        if node.op_type not in INTEGER_KERNEL_OPS or len(node.input) <= _BIAS:
            continue
        if node.input[_BIAS] not in index.initializers:
            continue
        unit = integer_kernel_scales(index, node)
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
