"""Integer weight encodings of a QDQ graph for ONNX Runtime's CPU kernels.

``u8s8``: int8 weights as exported (TensorRT's form). ``u8u8``: the same weights stored as uint8
``q + 128`` with zero-point 128, which dequantize to bit-identical values and which ORT runs
with kernels that never saturate (see :mod:`qatflow.runtimes.cpu_int8` for which CPUs need it).
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import onnx
from onnx import numpy_helper

from qatflow.errors import RuntimeBackendError
from qatflow.onnx.graph import drop_unused_initializers

Encoding = Literal["u8s8", "u8u8"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)
_WEIGHTED_OPS = {"Conv": 1, "MatMul": 1, "Gemm": 1}  # op type -> index of its weight input


def encode_weights(model: onnx.ModelProto, encoding: Encoding) -> int:
    """Store the int8 weights of Conv/MatMul/Gemm in ``encoding``, in place; returns how many.

    ``u8u8``: int8 ``q`` with zero-point 0 becomes uint8 ``q + 128`` with zero-point 128, which
    dequantizes to bit-identical values. ``u8s8`` leaves the weights as they are.
    """
    if encoding not in ENCODINGS:
        raise RuntimeBackendError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    if encoding == "u8s8":
        return 0
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, position))
    encoded = 0
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
            continue
        users = readers.get(dq.output[0], [])
        if not users or any(_WEIGHTED_OPS.get(u.op_type) != pos for u, pos in users):
            continue
        data = numpy_helper.to_array(initializers[dq.input[0]])
        zero_name = dq.input[2] if len(dq.input) > 2 else ""
        zero = numpy_helper.to_array(initializers[zero_name]) if zero_name in initializers else None
        if data.dtype != np.int8 or (zero_name and (zero is None or np.any(zero))):
            continue
        scale_name = dq.input[1]
        scale_shape = (
            numpy_helper.to_array(initializers[scale_name]).shape
            if scale_name in initializers
            else ()
        )
        base = dq.input[0]
        data_name, zero_out = f"{base}_u8", f"{base}_u8_zero_point"
        graph.initializer.extend(
            [
                numpy_helper.from_array((data.astype(np.int16) + 128).astype(np.uint8), data_name),
                numpy_helper.from_array(np.full(scale_shape, 128, np.uint8), zero_out),
            ]
        )
        del dq.input[:]
        dq.input.extend([data_name, scale_name, zero_out])
        encoded += 1
    drop_unused_initializers(graph)
    return encoded
