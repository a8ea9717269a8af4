"""Post-export rewrites that put Q/DQ exactly where TensorRT's ONNX parser wants them.

tf2onnx keeps TensorFlow's layout: a DequantizeLinear may sit before a Transpose (NHWC to
NCHW) rather than right at the Conv, and depthwise weights pass through Reshape/Transpose
after their DequantizeLinear. These passes move per-tensor Q/DQ past layout ops and store
every quantized weight as an INT8 initializer with its DequantizeLinear feeding the
weighted op directly, per-channel axis 0 for Conv (the output channel).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qatflow.onnx.graph import (
    LAYOUT_OPS,
    GraphIndex,
    apply_layout,
    attribute,
    drop_unused_initializers,
    quantize_constant,
    topological_sort,
)


def _sink_one(graph: onnx.GraphProto) -> bool:
    index = GraphIndex(graph)
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear":
            continue
        q = index.producer.get(dq.input[0])
        users = index.consumers.get(dq.output[0], [])
        if q is None or q.op_type != "QuantizeLinear" or len(users) != 1:
            continue
        layout = users[0]
        scale = index.constant(dq.input[1])
        if (
            layout.op_type not in LAYOUT_OPS
            or layout.input[0] != dq.output[0]
            or scale is None
            or scale.size != 1
            or len(index.consumers.get(q.output[0], [])) != 1
            or dq.output[0] in index.outputs
            or index.constant(q.input[0]) is not None
        ):
            continue
        source, after = q.input[0], layout.output[0]
        moved = layout.output[0] + "_float"
        layout.input[0] = source
        layout.output[0] = moved
        q.input[0] = moved
        dq.output[0] = after
        return True
    return False


def sink_qdq_through_layout_ops(model: onnx.ModelProto) -> int:
    """Move per-tensor activation Q/DQ pairs below Transpose/Reshape-like ops; returns moves."""
    moves = 0
    while _sink_one(model.graph):
        moves += 1
    if moves:
        topological_sort(model.graph)
    return moves


# Per-channel axis TensorRT expects for the weight input of each weighted op.
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}


def _expand_scale(scale: np.ndarray, axis: int, shape: tuple[int, ...]) -> np.ndarray:
    view = [1] * len(shape)
    if scale.size > 1:
        view[axis % len(shape)] = scale.size
    return np.broadcast_to(scale.reshape(view), shape).astype(np.float32)


def _per_channel(scale_map: np.ndarray, axis: int) -> np.ndarray | None:
    rows = np.moveaxis(scale_map, axis, 0).reshape(scale_map.shape[axis], -1)
    return rows[:, 0].copy() if np.all(rows == rows[:, :1]) else None


def _follow_layout(
    dq: onnx.NodeProto, quantized: np.ndarray, scale_map: np.ndarray, index: GraphIndex
) -> tuple[list[onnx.NodeProto], np.ndarray, np.ndarray]:
    chain: list[onnx.NodeProto] = []
    tail = dq
    while True:
        users = index.consumers.get(tail.output[0], [])
        if len(users) != 1 or users[0].op_type not in LAYOUT_OPS:
            return chain, quantized, scale_map
        moved_q = apply_layout(users[0], quantized, index.constant)
        moved_scale = apply_layout(users[0], scale_map, index.constant)
        if moved_q is None or moved_scale is None:
            return chain, quantized, scale_map
        quantized, scale_map = moved_q, moved_scale
        chain.append(users[0])
        tail = users[0]


def fold_weight_quantization(model: onnx.ModelProto) -> int:
    """Replace Constant->Q->DQ[->layout ops] weight chains by INT8 initializer->DQ.

    Layout ops between the DQ and the weighted op are applied to the INT8 values and the
    per-channel scales, so the DequantizeLinear feeds the op directly with the axis that
    TensorRT expects for it. Returns how many weights were folded.
    """
    graph = model.graph
    index = GraphIndex(graph)
    new_inits: list[onnx.TensorProto] = []
    removed: set[int] = set()
    for dq in list(graph.node):
        q = index.producer.get(dq.input[0])
        if dq.op_type != "DequantizeLinear" or q is None or q.op_type != "QuantizeLinear":
            continue
        weights = index.constant(q.input[0])
        scale = index.constant(q.input[1])
        if weights is None or scale is None or weights.ndim < 2:
            continue
        axis = attribute(q, "axis", 1) or 0
        scale_map = _expand_scale(scale.astype(np.float32), axis, weights.shape)
        # Narrow range, as Keras' fake quantization computed the weights.
        quantized = quantize_constant(weights, scale, np.zeros((), np.int8), axis, narrow=True)
        chain, quantized, scale_map = _follow_layout(dq, quantized, scale_map, index)
        tail = chain[-1] if chain else dq
        users = index.consumers.get(tail.output[0], [])
        new_axis = WEIGHT_AXIS.get(users[0].op_type, axis) if len(users) == 1 else axis
        new_scale = _per_channel(scale_map, new_axis) if scale.size > 1 else scale.reshape(())
        if new_scale is None:
            continue  # the layout ops mixed channels: leave this weight as it was
        base = tail.output[0].replace(":", "_").replace("/", "_")
        q_name, s_name, z_name = base + "_int8", base + "_scale", base + "_zero_point"
        new_inits += [
            numpy_helper.from_array(quantized, q_name),
            numpy_helper.from_array(new_scale.astype(np.float32), s_name),
            numpy_helper.from_array(np.zeros(new_scale.shape, dtype=np.int8), z_name),
        ]
        dequantize = helper.make_node(
            "DequantizeLinear", [q_name, s_name, z_name], [tail.output[0]], name=base + "_dq"
        )
        if scale.size > 1:
            dequantize.attribute.append(helper.make_attribute("axis", new_axis))
        graph.node.append(dequantize)
        removed.update(id(n) for n in [dq, *chain])
        if len(index.consumers.get(q.output[0], [])) == 1:
            removed.add(id(q))
    if new_inits:
        keep = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(new_inits)
        _drop_unused_constants(model)
        topological_sort(graph)
    return len(new_inits) // 3


def _drop_unused_constants(model: onnx.ModelProto) -> None:
    graph = model.graph
    drop_unused_initializers(graph)
    # Constant nodes whose outputs nobody reads anymore.
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    live = [n for n in graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(live)
