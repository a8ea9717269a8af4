"""Small hand-made ONNX models shared by the runtime, export and CLI tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HEIGHT, WIDTH, CHANNELS, FILTERS, CLASSES = 8, 8, 3, 4, 5


def make_model(
    *, qdq: bool = False, output_q: bool = False, batch: int | str = "N", seed: int = 0
) -> onnx.ModelProto:
    """NHWC input -> Conv -> Relu -> GlobalAveragePool -> Flatten -> MatMul + bias (logits).

    With ``qdq``: TensorRT-style signed int8 Q/DQ (zero point 0) on the Conv and MatMul
    inputs, per-channel weights (Conv axis 0, MatMul axis 1). ``output_q`` also quantizes the
    Conv output, the pattern ONNX Runtime fuses into QLinearConv.
    """
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.3, (FILTERS, CHANNELS, 3, 3)).astype(np.float32)
    dense = rng.normal(0, 0.3, (FILTERS, CLASSES)).astype(np.float32)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.1, FILTERS).astype(np.float32), "conv_b"),
        numpy_helper.from_array(np.zeros(CLASSES, np.float32) + 0.1, "dense_b"),
    ]
    nodes = [helper.make_node("Transpose", ["input"], ["x"], perm=[0, 3, 1, 2], name="nchw")]
    x, w, feat, d = "x", "conv_w", "flat", "dense_w"
    if qdq:
        w_scale = (np.abs(weight).reshape(FILTERS, -1).max(1) / 127).astype(np.float32)
        d_scale = (np.abs(dense).max(0) / 127).astype(np.float32)
        inits += [
            numpy_helper.from_array(_int8(weight / w_scale[:, None, None, None]), "conv_wq"),
            numpy_helper.from_array(w_scale, "conv_ws"),
            numpy_helper.from_array(np.zeros(FILTERS, np.int8), "conv_wz"),
            numpy_helper.from_array(_int8(dense / d_scale[None, :]), "dense_wq"),
            numpy_helper.from_array(d_scale, "dense_ws"),
            numpy_helper.from_array(np.zeros(CLASSES, np.int8), "dense_wz"),
            numpy_helper.from_array(np.array(0.03, np.float32), "act_s"),
            numpy_helper.from_array(np.array(0, np.int8), "act_z"),
        ]
        nodes += [
            *_qdq("x", "x_dq", "in"),
            helper.make_node(
                "DequantizeLinear", ["conv_wq", "conv_ws", "conv_wz"], ["conv_w"], axis=0
            ),
            helper.make_node(
                "DequantizeLinear", ["dense_wq", "dense_ws", "dense_wz"], ["dense_w"], axis=1
            ),
        ]
        x, feat = "x_dq", "flat_dq"
    else:
        inits += [numpy_helper.from_array(weight, w), numpy_helper.from_array(dense, d)]
    conv_out = "conv_raw" if output_q else "conv"
    nodes.append(helper.make_node("Conv", [x, w, "conv_b"], [conv_out], pads=[1] * 4, name="conv"))
    if output_q:
        nodes += _qdq("conv_raw", "conv", "conv_out")
    nodes += [
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
    ]
    if qdq:
        nodes += _qdq("flat", "flat_dq", "dense_in")
    nodes += [
        helper.make_node("MatMul", [feat, d], ["mm"], name="dense"),
        helper.make_node("Add", ["mm", "dense_b"], ["logits"], name="dense_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_qdq" if qdq else "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, HEIGHT, WIDTH, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _int8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values), -127, 127).astype(np.int8)


def _qdq(src: str, dst: str, name: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node(
            "QuantizeLinear", [src, "act_s", "act_z"], [f"{name}_q"], name=f"{name}_q"
        ),
        helper.make_node(
            "DequantizeLinear", [f"{name}_q", "act_s", "act_z"], [dst], name=f"{name}_dq"
        ),
    ]


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Save and return ``path``."""
    onnx.save(model, path)
    return path


def sample_batch(size: int, seed: int = 1) -> np.ndarray:
    """Random NHWC float32 batch for the test models."""
    return np.random.default_rng(seed).normal(size=(size, HEIGHT, WIDTH, 3)).astype(np.float32)


def conv_qdq_graph(
    weight_scale: np.ndarray,
    *,
    zero_point_type: type = np.int8,
    axis: int = 0,
    quantize_input: bool = True,
    output_qdq: bool = False,
) -> onnx.ModelProto:
    """A Conv whose weights (and, by default, input) are dequantized: validate_onnx's cases."""
    weights = np.ones((4, 2, 1, 1), np.int8)
    inits = [
        numpy_helper.from_array(weights, "w_q"),
        numpy_helper.from_array(weight_scale.astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(weight_scale.shape, zero_point_type), "w_zp"),
        numpy_helper.from_array(np.array(0.1, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
    ]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=axis)]
    conv_input = "x"
    if quantize_input:
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"]),
        ]
        conv_input = "xdq"
    conv_out = "conv_out" if output_qdq else "y"
    nodes.append(helper.make_node("Conv", [conv_input, "w"], [conv_out], name="conv"))
    if output_qdq:
        nodes += [
            helper.make_node("QuantizeLinear", ["conv_out", "x_scale", "x_zp"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "x_scale", "x_zp"], ["y"], name="out_dq"),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 4, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
