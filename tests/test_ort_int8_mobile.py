"""rewrite_for_ort_int8's pad_fold and swish stages (MobileNetV2 / EfficientNet patterns).

Both stages claim bit-exactness: the rewritten graph run as float math (ORT optimizations off)
must equal the TensorRT-style source run the same way, bit for bit, under either weight
encoding. The swish stage relies on ORT's QuickGelu kernel (alpha 1) computing the same
numbers as its Sigmoid and Mul kernels; that is checked on the kernels directly as well.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bench.ort_int8_bench import insert_trt_qdq
from bench.ort_ops import ort_optimized_op_counts
from onnx import TensorProto, helper, numpy_helper

from qatflow.onnx.encoding import encode_weights
from qatflow.onnx.ort_int8 import METADATA_KEY, rewrite_for_ort_int8

RNG = np.random.default_rng(7)


def run(
    model: onnx.ModelProto, x: np.ndarray, *, optimize: bool = False, threads: int = 0
) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def summary(model: onnx.ModelProto) -> dict[str, Any]:
    return json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))


def const(name: str, value: float | np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def mobile_graph(pad_value: float = 0.0) -> onnx.ModelProto:
    """NHWC input -> ZeroPadding (NHWC Pad) -> Transpose -> Conv 3x3/2 -> Relu6 (Clip) -> Pad
    (NCHW, value ``pad_value``) -> depthwise Conv 3x3/2 -> swish -> Conv 1x1 -> swish (Mul
    inputs the other way round) as the graph output: the tf2onnx layout of MobileNetV2 and
    EfficientNet blocks."""
    nodes = [
        helper.make_node("Pad", ["x", "pads_nhwc"], ["xp"], "stem_pad"),
        helper.make_node("Transpose", ["xp"], ["xt"], "to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["xt", "w1", "b1"], ["c1"], "stem", strides=[2, 2]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], "relu6"),
        helper.make_node("Pad", ["r1", "pads_nchw", "pad_value"], ["p1"], "dw_pad"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], "dw", strides=[2, 2], group=8),
        helper.make_node("Sigmoid", ["c2"], ["s2"], "swish1_sigmoid"),
        helper.make_node("Mul", ["c2", "s2"], ["a2"], "swish1_mul"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"], "project"),
        helper.make_node("Sigmoid", ["c3"], ["s3"], "swish2_sigmoid"),
        helper.make_node("Mul", ["s3", "c3"], ["y"], "swish2_mul"),
    ]
    inits = [
        numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 1, 1, 0], np.int64), "pads_nhwc"),
        const("w1", RNG.normal(0, 0.4, (8, 3, 3, 3))),
        const("b1", RNG.normal(0, 0.2, 8)),
        const("lo", 0.0),
        const("hi", 6.0),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads_nchw"),
        const("pad_value", pad_value),
        const("w2", RNG.normal(0, 0.5, (8, 1, 3, 3))),
        const("b2", RNG.normal(0, 0.2, 8)),
        const("w3", RNG.normal(0, 0.4, (4, 8, 1, 1))),
        const("b3", RNG.normal(0, 0.2, 4)),
    ]
    graph = helper.make_graph(
        nodes,
        "mobile_patterns",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 16, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return RNG.normal(0, 1.5, (32, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def trt_model(samples: np.ndarray) -> onnx.ModelProto:
    return insert_trt_qdq(mobile_graph(), [{"x": samples}])


@pytest.mark.parametrize("encoding", ["u8s8", "u8u8"])
def test_pad_fold_and_swish_keep_the_exact_rewrite_bit_exact(
    trt_model: onnx.ModelProto, samples: np.ndarray, encoding: str
) -> None:
    """The whole rewrite without batch-norm folding, relu exact, no requantization points:
    bit for bit the source's float math, with both Pads in the Convs and both swishes fused."""
    rewritten = rewrite_for_ort_int8(trt_model, relu="exact", requantize="none", fold_affine=False)
    before = rewrite_for_ort_int8(
        trt_model, relu="exact", requantize="none", fold_affine=False, until="collapse"
    )
    for model in (rewritten, before):
        encode_weights(model, encoding)  # type: ignore[arg-type]
    reference = run(trt_model, samples)
    np.testing.assert_array_equal(run(rewritten, samples), reference)
    np.testing.assert_array_equal(run(before, samples), reference)

    done = summary(rewritten)
    assert done["pads_folded"] == 2 and done["swish_fused"] == 2
    ops = Counter(n.op_type for n in rewritten.graph.node)
    assert ops["Pad"] == 0 and ops["Sigmoid"] == 0 and ops["QuickGelu"] == 2
    assert ops["Clip"] == 1  # Relu6 stays, on uint8 (TensorRT's clipping at 127 * scale)
    assert any(o.domain == "com.microsoft" for o in rewritten.opset_import)
    onnx.checker.check_model(rewritten)
    optimized = ort_optimized_op_counts(rewritten)
    assert not {"Pad", "Sigmoid", "Mul"} & set(optimized)
    assert optimized["QLinearConv"] == 1  # the stem: the other Convs feed float swishes


def test_calibrated_rewrite_runs_swish_between_integer_kernels(
    trt_model: onnx.ModelProto, samples: np.ndarray
) -> None:
    """With calibrated requantization points every Conv is integer, and each swish runs as one
    DQ -> QuickGelu -> Q; the two new stages change no number of that graph either."""
    calibration = [{"x": samples[:16]}]
    rewritten = rewrite_for_ort_int8(trt_model, calibration=calibration)
    before = rewrite_for_ort_int8(trt_model, calibration=calibration, until="collapse")
    np.testing.assert_array_equal(run(rewritten, samples), run(before, samples))
    optimized = ort_optimized_op_counts(rewritten)
    assert optimized["QLinearConv"] == 3 and optimized["QuickGelu"] == 2
    assert not {"Pad", "Sigmoid", "Mul", "Conv", "FusedConv"} & set(optimized)
    assert optimized["DequantizeLinear"] == 2  # one per swish (was two each, plus two Pads)


def test_pads_that_are_not_zero_stay(samples: np.ndarray) -> None:
    """A Pad value that does not dequantize to 0.0 is not what a Conv pads with: kept."""
    trt = insert_trt_qdq(mobile_graph(pad_value=0.5), [{"x": samples}])
    rewritten = rewrite_for_ort_int8(trt, relu="exact", requantize="none", fold_affine=False)
    assert summary(rewritten)["pads_folded"] == 1  # only the stem's zero padding
    assert Counter(n.op_type for n in rewritten.graph.node)["Pad"] == 1
    np.testing.assert_array_equal(run(rewritten, samples), run(trt, samples))


def test_a_sigmoid_read_twice_is_not_fused() -> None:
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"]),
        helper.make_node("Mul", ["x", "s"], ["m"]),
        helper.make_node("Add", ["m", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rewritten = rewrite_for_ort_int8(model)
    assert "swish_fused" not in summary(rewritten)
    assert Counter(n.op_type for n in rewritten.graph.node)["Sigmoid"] == 1


def _elementwise(nodes: list[onnx.NodeProto], ms: bool) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
    )
    opsets = [helper.make_opsetid("", 17)] + (
        [helper.make_opsetid("com.microsoft", 1)] if ms else []
    )
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("threads", [1, 2])
def test_quickgelu_kernel_equals_sigmoid_then_mul(threads: int) -> None:
    """The premise of the swish stage, on ORT's kernels: x * Sigmoid(x) and QuickGelu(x,
    alpha=1) agree bit for bit on every value class (the logistic's clamp at +-18, zeros,
    subnormals, large values, every dequantized uint8 of several scales), at lengths that end
    in partial vector blocks and span several of QuickGelu's 4096-element tasks."""
    swish = _elementwise(
        [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])],
        ms=False,
    )
    quick = _elementwise(
        [helper.make_node("QuickGelu", ["x"], ["y"], domain="com.microsoft", alpha=1.0)], ms=True
    )
    levels = np.arange(256, dtype=np.float32) - 128
    values = np.concatenate(
        [
            np.linspace(-40, 40, 20011, dtype=np.float32),
            RNG.normal(0, 4, 30000).astype(np.float32),
            np.array([0.0, -0.0, 1e-40, -1e-40, 18.0, -18.0, 3e38, -3e38], np.float32),
            *[(levels - zp) * np.float32(s) for s in (0.0123, 0.07575, 0.2268) for zp in (0, 9)],
        ]
    )
    for n in (1, 3, 7, 17, 4099, values.size):
        x = values[:n]
        np.testing.assert_array_equal(
            run(quick, x, threads=threads), run(swish, x, threads=threads)
        )
