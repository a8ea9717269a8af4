"""integer_share: the share of an engine's compute nodes and kernel time in integer kernels."""

from __future__ import annotations

import onnxruntime as ort
from tests.int8_models import near_binary, saturating_cnn

from qatflow.onnx.ort_int8 import rewrite_for_ort_int8
from qatflow.runtimes.integer_share import node_share, time_share


def test_node_share_counts_compute_ops_only() -> None:
    assert node_share({"QLinearConv": 3, "QGemm": 1, "Add": 1, "Transpose": 9}) == 0.8
    assert node_share({"Conv": 2, "Relu": 2}) == 0.0
    assert node_share({"Transpose": 1, "QuantizeLinear": 2}) is None


def test_time_share_profiles_the_kernels_that_run() -> None:
    feeds = {"x": near_binary(4)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    fused = time_share(rewrite_for_ort_int8(saturating_cnn()), options, feeds)
    assert fused is not None and 0.0 < fused <= 1.0
    unfused = ort.SessionOptions()  # no graph optimization: Q/DQ and float Conv as written
    unfused.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert time_share(saturating_cnn(), unfused, feeds) == 0.0
