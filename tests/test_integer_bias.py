"""Integer-kernel biases rounded to their int32 units (:mod:`qatflow.onnx.integer_bias`): the
values ONNX Runtime's integer convolutions add, checked against the kernels on this CPU."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from tests.int8_models import coarse_bias_cnn, near_binary

from qatflow.onnx.integer_bias import round_biases_to_integer_units
from qatflow.onnx.ort_int8 import rewrite_for_ort_int8
from qatflow.onnx.reference import run_optimized, run_reference


def _prepared() -> onnx.ModelProto:
    """The exact rewrite, as engines are built from: the Conv's output is read by its Q."""
    return rewrite_for_ort_int8(coarse_bias_cnn(), relu="exact", requantize="none")


def _conv_and_quantizer(model: onnx.ModelProto) -> tuple[onnx.NodeProto, str]:
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    quantizer = next(n for n in model.graph.node if conv.output[0] in n.input)
    assert quantizer.op_type == "QuantizeLinear"
    return conv, quantizer.output[0]


def _bias(model: onnx.ModelProto, conv: onnx.NodeProto) -> np.ndarray:
    init = next(i for i in model.graph.initializer if i.name == conv.input[2])
    return numpy_helper.to_array(init)


def test_biases_round_to_the_unit_of_input_scale_times_weight_scale() -> None:
    prepared = _prepared()
    conv, _ = _conv_and_quantizer(prepared)
    before = _bias(prepared, conv)
    rounded, count = round_biases_to_integer_units(prepared)
    assert count == 1
    after = _bias(rounded, conv)
    unit = 1.0 * 0.25  # coarse_bias_cnn: input scale 1, weight scale 1/4
    np.testing.assert_array_equal(after, np.round(before / unit) * unit)
    assert np.abs(after - before).min() > 0.09  # every bias moved
    np.testing.assert_array_equal(_bias(prepared, conv), before)  # in a copy


def test_a_conv_that_no_quantizer_reads_keeps_its_bias() -> None:
    """In the source graph a Relu reads the Conv: no QDQ group, nothing rounded."""
    source = coarse_bias_cnn()
    rounded, count = round_biases_to_integer_units(source)
    assert count == 0
    assert rounded.SerializeToString() == source.SerializeToString()


def test_integer_kernels_add_the_rounded_bias() -> None:
    """The fused QLinearConv's integer output equals the rounded graph run as float math, and
    differs from the unrounded one. Inputs of 0 and 1 against ternary weights cannot saturate,
    so this holds on every CPU."""
    prepared = _prepared()
    _, output = _conv_and_quantizer(prepared)
    feeds = {"x": near_binary(16)}
    kernels = run_optimized(prepared, feeds, [output])[0]
    ideal = run_reference(round_biases_to_integer_units(prepared)[0], feeds, [output])[0]
    unrounded = run_reference(prepared, feeds, [output])[0]
    np.testing.assert_array_equal(kernels, ideal)
    assert np.mean(kernels != unrounded) > 0.2
