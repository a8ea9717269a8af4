"""onnx_graph.quantize_constant: the one constant quantizer of the exporter and the ORT rewrite."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from qatflow.onnx.graph import quantize_constant
from qatflow.onnx.reference import run_reference


def ort_quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    """ONNX Runtime's own QuantizeLinear of ``x``."""
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=axis)
    graph = helper.make_graph(
        [node],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(zero.dtype), None)],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return run_reference(model, {"x": x})[0]


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_matches_onnx_runtime_including_ties_and_saturation(dtype: type, per_channel: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, (6, 4, 3, 3)).astype(np.float32)
    x[0, 0, 0] = [0.5, 1.5, -2.5]  # ties round to even
    x[1, 1, 1] = [1e3, -1e3, 0.0]  # saturation
    scale = (
        rng.uniform(0.5, 1.5, 6).astype(np.float32) if per_channel else np.array(1.0, np.float32)
    )
    zero = np.full(scale.shape, 3 if dtype is np.uint8 else -2, dtype)
    expected = ort_quantize(x, scale, zero, axis=0)
    assert np.array_equal(quantize_constant(x, scale, zero, 0), expected)


def test_narrow_range_saturates_at_minus_127() -> None:
    x = np.array([-300.0, -127.4, 0.0, 127.6, 300.0], np.float32)
    one, zero = np.array(1.0, np.float32), np.zeros((), np.int8)
    assert quantize_constant(x, one, zero, 0).tolist() == [-128, -127, 0, 127, 127]
    assert quantize_constant(x, one, zero, 0, narrow=True).tolist() == [-127, -127, 0, 127, 127]
