"""Small TensorRT-style QDQ ONNX models built with onnx alone (no TensorFlow), for engine tests
that must also run under an emulated CPU."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RELU_RANGE = 16.0


def saturating_cnn(seed: int = 0) -> onnx.ModelProto:
    """Q/DQ -> Conv(8->16, 3x3, large same-sign weights) -> Relu -> Q/DQ -> GAP -> Dense(10).

    On near-binary inputs the convolution's u8 x s8 pair sums exceed int16, so U8S8 kernels
    without VNNI saturate, while float math and U8U8 kernels do not.
    """
    rng = np.random.default_rng(seed)
    signs = np.where(rng.random((16, 8, 3, 3)) < 0.5, 1, -1)
    weights = rng.uniform(0.8, 1.0, (16, 8, 3, 3)) * signs
    weight_scale = (np.abs(weights).reshape(16, -1).max(axis=1) / 127).astype(np.float32)
    weights_q = np.clip(np.rint(weights / weight_scale[:, None, None, None]), -127, 127)
    dense = rng.normal(0, 0.5, (16, 10))
    bias = rng.normal(0, 1, 16)
    scales = (1 / 127, weight_scale, RELU_RANGE / 127)
    return _one_conv("saturating_cnn", weights_q, bias, scales, dense, rng)


def coarse_bias_cnn(seed: int = 0) -> onnx.ModelProto:
    """Q/DQ -> Conv(8->16, 3x3, ternary weights) -> Relu -> Q/DQ -> GAP -> Dense(10), whose
    biases sit between two int32 units.

    The input scale is 1 and the weight scale 1/4, so an integer kernel adds each bias in units
    of 1/4. Every bias lies 0.1 (0.4 units) past a unit: rounding it moves each positive output
    by about 6 steps of the ReLU's quantizer. Float math keeps the bias; any integer engine
    rounds it, and the logits move by more than the fidelity tolerance.
    """
    rng = np.random.default_rng(seed)
    weights_q = rng.integers(-1, 2, (16, 8, 3, 3))
    bias = rng.integers(-4, 0, 16) * 0.25 + 0.1
    scales = (1.0, np.full(16, 0.25, np.float32), 2 / 127)
    return _one_conv("coarse_bias_cnn", weights_q, bias, scales, rng.normal(0, 0.5, (16, 10)), rng)


def _one_conv(
    name: str,
    weights_q: np.ndarray,
    bias: np.ndarray,
    scales: tuple[float, np.ndarray, float],
    dense: np.ndarray,
    rng: np.random.Generator,
) -> onnx.ModelProto:
    """Q/DQ -> Conv(8->16, 3x3, ``weights_q``, ``bias``) -> Relu -> Q/DQ, then
    :func:`_classified`; ``scales``: the input's, the weights' (per channel), the ReLU's."""
    x_scale, weight_scale, relu_scale = scales
    inits = [
        numpy_helper.from_array(np.array(x_scale, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
        numpy_helper.from_array(weights_q.astype(np.int8), "w_q"),
        numpy_helper.from_array(np.asarray(weight_scale, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(16, np.int8), "w_zero"),
        numpy_helper.from_array(bias.astype(np.float32), "bias"),
        numpy_helper.from_array(np.array(relu_scale, np.float32), "r_scale"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0),
        helper.make_node("Conv", ["xd", "w", "bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "r_scale", "zero"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "r_scale", "zero"], ["rd"]),
    ]
    return _classified(name, nodes, inits, "rd", dense, rng)


def batch_norm_chain(convs: int = 3, seed: int = 0) -> onnx.ModelProto:
    """Q/DQ -> ``convs`` x [Conv(3x3, 16 channels) -> BatchNormalization -> Relu -> Q/DQ] ->
    GAP -> Dense(10): a chain whose every Conv the rewrite can fold batch norm into."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(np.array(1 / 127, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
        numpy_helper.from_array(np.zeros(16, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(4.0 / 127, np.float32), "r_scale"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "zero"], ["a0"]),
    ]
    channels = 8
    for i in range(convs):
        weights = rng.normal(0, 1, (16, channels, 3, 3))
        scale = (np.abs(weights).reshape(16, -1).max(axis=1) / 127).astype(np.float32)
        inits += [
            numpy_helper.from_array(
                np.rint(weights / scale[:, None, None, None]).astype(np.int8), f"w{i}"
            ),
            numpy_helper.from_array(scale, f"w{i}_scale"),
            numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), f"b{i}"),
            numpy_helper.from_array(rng.uniform(0.05, 0.2, 16).astype(np.float32), f"gamma{i}"),
            numpy_helper.from_array(rng.normal(0, 0.3, 16).astype(np.float32), f"beta{i}"),
            numpy_helper.from_array(rng.normal(0, 0.5, 16).astype(np.float32), f"mean{i}"),
            numpy_helper.from_array(rng.uniform(0.5, 2.0, 16).astype(np.float32), f"var{i}"),
        ]
        nodes += [
            helper.make_node(
                "DequantizeLinear", [f"w{i}", f"w{i}_scale", "w_zero"], [f"wd{i}"], axis=0
            ),
            helper.make_node("Conv", [f"a{i}", f"wd{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node(
                "BatchNormalization",
                [f"c{i}", f"gamma{i}", f"beta{i}", f"mean{i}", f"var{i}"],
                [f"n{i}"],
            ),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"]),
            helper.make_node("QuantizeLinear", [f"r{i}", "r_scale", "zero"], [f"q{i}"]),
            helper.make_node("DequantizeLinear", [f"q{i}", "r_scale", "zero"], [f"a{i + 1}"]),
        ]
        channels = 16
    dense = rng.normal(0, 0.5, (16, 10))
    return _classified("batch_norm_chain", nodes, inits, f"a{convs}", dense, rng)


def _classified(
    name: str,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    features: str,
    dense: np.ndarray,
    rng: np.random.Generator,
) -> onnx.ModelProto:
    """``nodes`` (input ``x``, 16-channel 8x8 ``features``) -> GAP -> Q/DQ -> Dense(10) with
    ``dense`` weights, as a checked IR 8 / opset 17 model, which every ONNX Runtime the project
    supports loads."""
    dense_scale = np.float32(np.abs(dense).max() / 127)
    inits = [
        *inits,
        numpy_helper.from_array(np.array(1 / 127, np.float32), "g_scale"),
        numpy_helper.from_array(np.rint(dense / dense_scale).astype(np.int8), "d_q"),
        numpy_helper.from_array(np.array(dense_scale, np.float32), "d_scale"),
        numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "d_bias"),
    ]
    nodes = [
        *nodes,
        helper.make_node("GlobalAveragePool", [features], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("QuantizeLinear", ["f", "g_scale", "zero"], ["fq"]),
        helper.make_node("DequantizeLinear", ["fq", "g_scale", "zero"], ["fd"]),
        helper.make_node("DequantizeLinear", ["d_q", "d_scale", "zero"], ["d"]),
        helper.make_node("MatMul", ["fd", "d"], ["m"]),
        helper.make_node("Add", ["m", "d_bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def near_binary(count: int, seed: int = 1) -> np.ndarray:
    """Inputs for :func:`saturating_cnn` with most values 0 or 1 (the saturation worst case)."""
    rng = np.random.default_rng(seed)
    return (rng.random((count, 8, 8, 8)) < 0.6).astype(np.float32)


def narrow_cnn(seed: int = 0) -> onnx.ModelProto:
    """Q/DQ -> stem Conv -> Relu -> Q/DQ -> MaxPool -> Conv(16->16, large same-sign weights)
    -> Relu -> Q/DQ -> GAP -> Dense(10): a ResNet-like chain whose second convolution reads
    ReLU outputs.

    The ReLU range is small, so on :func:`near_binary` inputs many post-ReLU values sit at 127.
    Stored with zero-point 128 (255 as uint8) they make the second convolution's U8S8 pair sums
    saturate without VNNI; as the 7-bit values of the rewrite's ``narrow`` stage they cannot.
    """
    rng = np.random.default_rng(seed)

    def weights(shape: tuple[int, ...], low: float) -> tuple[np.ndarray, np.ndarray]:
        signs = np.where(rng.random(shape) < 0.5, 1, -1)
        w = rng.uniform(low, 1.0, shape) * signs
        scale = (np.abs(w).reshape(shape[0], -1).max(axis=1) / 127).astype(np.float32)
        q = np.clip(np.rint(w / scale.reshape(-1, *([1] * (len(shape) - 1)))), -127, 127)
        return q.astype(np.int8), scale

    stem_q, stem_scale = weights((16, 8, 3, 3), 0.0)
    conv_q, conv_scale = weights((16, 16, 3, 3), 0.9)
    dense = rng.normal(0, 0.5, (16, 10))
    inits = [
        numpy_helper.from_array(np.array(1 / 127, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
        numpy_helper.from_array(np.zeros(16, np.int8), "w_zero"),
        numpy_helper.from_array(stem_q, "stem_q"),
        numpy_helper.from_array(stem_scale, "stem_scale"),
        numpy_helper.from_array(rng.normal(0, 0.5, 16).astype(np.float32), "stem_bias"),
        numpy_helper.from_array(np.array(1.0 / 127, np.float32), "r1_scale"),
        numpy_helper.from_array(conv_q, "conv_q"),
        numpy_helper.from_array(conv_scale, "conv_scale"),
        numpy_helper.from_array(rng.normal(0, 1, 16).astype(np.float32), "conv_bias"),
        numpy_helper.from_array(np.array(RELU_RANGE / 127, np.float32), "r2_scale"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["stem_q", "stem_scale", "w_zero"], ["sw"], axis=0),
        helper.make_node("Conv", ["xd", "sw", "stem_bias"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("QuantizeLinear", ["r1", "r1_scale", "zero"], ["r1q"]),
        helper.make_node("DequantizeLinear", ["r1q", "r1_scale", "zero"], ["r1d"]),
        helper.make_node("MaxPool", ["r1d"], ["p1"], kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("DequantizeLinear", ["conv_q", "conv_scale", "w_zero"], ["cw"], axis=0),
        helper.make_node("Conv", ["p1", "cw", "conv_bias"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("QuantizeLinear", ["r2", "r2_scale", "zero"], ["r2q"]),
        helper.make_node("DequantizeLinear", ["r2q", "r2_scale", "zero"], ["r2d"]),
    ]
    return _classified("narrow_cnn", nodes, inits, "r2d", dense, rng)
