"""bench.kernel_profile: ORT per-node profiles grouped by convolution kernel class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from bench.kernel_profile import (
    KernelClasses,
    conv_ceiling,
    conv_classes,
    print_kernel_table,
    profile_kernel_classes,
)
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def small_cnn() -> onnx.ModelProto:
    """3x3 conv, ReLU, strided 1x1 conv, global pool."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], "conv3x3", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], "conv1x1s2", strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["c2"], ["y"], "gap"),
    ]
    inits = [
        numpy_helper.from_array(RNG.normal(0, 0.3, (16, 8, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(RNG.normal(0, 0.3, (32, 16, 1, 1)).astype(np.float32), "w2"),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 1, 1])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_classes_name_kernel_size_and_stride() -> None:
    assert conv_classes(small_cnn()) == {"conv3x3": "conv 3x3", "conv1x1s2": "conv 1x1/2"}


def test_profile_groups_the_optimized_graph_by_class(tmp_path: Path) -> None:
    path = tmp_path / "small.onnx"
    onnx.save(small_cnn(), path)
    batch = RNG.normal(0, 1, (1, 8, 16, 16)).astype(np.float32)

    classes = profile_kernel_classes(path, batch, threads=1, runs=5)

    # ORT fuses the ReLU into the first convolution; both convs keep their class.
    assert classes.counts["conv 3x3"] == 1 and classes.counts["conv 1x1/2"] == 1
    assert "Relu" not in classes.counts
    assert all(value > 0 for value in classes.times_ms.values())
    assert classes.total_ms == pytest.approx(sum(classes.times_ms.values()))


def test_ceiling_uses_the_best_conv_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    fp32 = KernelClasses({"conv 3x3": 8.0, "conv 1x1": 6.0, "Pad": 1.0}, {})
    int8 = KernelClasses({"conv 3x3": 2.0, "conv 1x1": 2.0, "QLinearAdd": 0.5}, {})

    best, ceiling = conv_ceiling(fp32, int8)

    # Every conv at 4x: 14 ms of FP32 convs -> 3.5 ms, plus 0.5 ms of other INT8 ops.
    assert best == "conv 3x3"
    assert ceiling == pytest.approx(15.0 / 4.0)
    print_kernel_table(fp32, int8)
    table = capsys.readouterr().out
    assert "conv 3x3" in table and "4.00x" in table and "ceiling" in table
