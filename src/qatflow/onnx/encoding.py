"""Integer weight encodings of a QDQ graph for ONNX Runtime's CPU kernels.

``u8s8``: int8 weights as exported (TensorRT's form). ``u8u8``: the same weights stored as uint8
``q + 128`` with zero-point 128, which dequantize to bit-identical values and which ORT runs
with kernels that never saturate (see :mod:`qatflow.runtimes.cpu_int8` for which CPUs need it),
except where an op reads only 7-bit activations (at most ``NARROW_MAX``, such as the ReLU
outputs of ``qatflow.onnx.ort_int8``'s ``narrow`` stage): U8S8 cannot saturate there either,
so those ops keep their int8 weights and ORT's faster U8S8 kernels.
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
# The largest uint8 activation at which U8S8 pair sums cannot saturate int16: 2 x 127 x 127.
NARROW_MAX = 127
# Data-movement ops that keep a uint8 tensor within its bound (given a Pad value within it) and
# through which the tensor may change its zero-point.
NARROW_PASS_THROUGH = frozenset(
    {"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Pad"}
)


def uint8_scalar(value: np.ndarray | None) -> int | None:
    """The value of a one-element uint8 array (a Clip bound, a Pad value), else None."""
    if value is None or value.size != 1 or value.dtype != np.uint8:
        return None
    return int(value.reshape(()))


def _scalar(initializers: dict[str, onnx.TensorProto], name: str) -> int | None:
    return uint8_scalar(numpy_helper.to_array(initializers[name])) if name in initializers else None


def reads_narrow(
    name: str, producers: dict[str, onnx.NodeProto], initializers: dict[str, onnx.TensorProto]
) -> bool:
    """Whether uint8 tensor ``name`` provably holds values <= ``NARROW_MAX``: it comes, through
    ``NARROW_PASS_THROUGH`` ops, from a ``Clip`` with a constant upper bound <= ``NARROW_MAX``."""
    node = producers.get(name)
    while node is not None and node.op_type in NARROW_PASS_THROUGH:
        if node.op_type == "Pad":
            value = _scalar(initializers, node.input[2]) if len(node.input) > 2 else None
            if value is None or value > NARROW_MAX:
                return False
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Clip" or len(node.input) < 3:
        return False
    top = _scalar(initializers, node.input[2])
    return top is not None and top <= NARROW_MAX


def _activation_is_narrow(
    op: onnx.NodeProto,
    producers: dict[str, onnx.NodeProto],
    initializers: dict[str, onnx.TensorProto],
) -> bool:
    """Whether weighted ``op``'s activation input is a DQ (through float data-movement ops,
    which ORT moves the DQ past) of a tensor that ``reads_narrow``."""
    node = producers.get(op.input[0])
    while node is not None and node.op_type in NARROW_PASS_THROUGH - {"Pad"}:
        node = producers.get(node.input[0])
    return (
        node is not None
        and node.op_type == "DequantizeLinear"
        and reads_narrow(node.input[0], producers, initializers)
    )


def encode_weights(model: onnx.ModelProto, encoding: Encoding) -> int:
    """Store the int8 weights of Conv/MatMul/Gemm in ``encoding``, in place; returns how many.

    ``u8u8``: int8 ``q`` with zero-point 0 becomes uint8 ``q + 128`` with zero-point 128, which
    dequantizes to bit-identical values, except for ops whose activation input ``reads_narrow``.
    ``u8s8`` leaves the weights as they are.
    """
    if encoding not in ENCODINGS:
        raise RuntimeBackendError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    if encoding == "u8s8":
        return 0
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    producers = {out: node for node in graph.node for out in node.output}
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
        if all(_activation_is_narrow(u, producers, initializers) for u, _ in users):
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
