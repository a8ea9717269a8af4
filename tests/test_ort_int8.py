"""rewrite_for_ort_int8: TensorRT-style QDQ graphs rewritten for ONNX Runtime's integer CPU kernels.

Reference for every comparison: the TensorRT-style input graph run on ONNX Runtime. Exact passes
are checked with ORT graph optimizations off (every Q/DQ then runs as written, so the rewritten
graph must give the same numbers up to float rounding); fused runs compare integer kernels with
float emulation, where results differ by a quantization step now and then.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bench.ort_int8_bench import (
    data_init_batchnorm,
    fashion_images,
    insert_trt_qdq,
    keras_to_onnx,
    small_resnet,
)
from bench.ort_ops import ort_optimized_op_counts
from onnx import TensorProto, helper, numpy_helper

from qatflow.errors import RuntimeBackendError
from qatflow.onnx.encoding import encode_weights
from qatflow.onnx.ort_int8 import (
    EXACT_STAGES,
    METADATA_KEY,
    STAGES,
    rewrite_for_ort_int8,
)
from qatflow.runtimes.cpu_int8 import detect

RNG = np.random.default_rng(0)
# Integer kernels vs float emulation: a few one-step rounding flips per layer, so logits may move
# by a few percent of their range; exact passes stay within float rounding.
FUSED_TOLERANCE = 0.05
EXACT_TOLERANCE = 1e-5


def run(model: onnx.ModelProto, x: np.ndarray, *, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def engine_graph(rewritten: onnx.ModelProto) -> onnx.ModelProto:
    """The rewritten graph with the weight encoding an engine built on this CPU would use."""
    encoded = onnx.ModelProto()
    encoded.CopyFrom(rewritten)
    encode_weights(encoded, detect().best_encoding())
    return encoded


def const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value.astype(np.float32), name)


def float_graph() -> onnx.ModelProto:
    """Conv+BN+Relu, MaxPool, Conv+Mul/Add (tf2onnx-style BN), residual Add, Relu, GAP, Dense."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn"], "bn1"),
        helper.make_node("Relu", ["bn"], ["r1"], "relu1"),
        helper.make_node("MaxPool", ["r1"], ["m"], "pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["m", "w2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c2", "k"], ["c2m"], "scale2"),
        helper.make_node("Add", ["c2m", "h"], ["c2a"], "shift2"),
        helper.make_node("Add", ["m", "c2a"], ["s"], "residual"),
        helper.make_node("Relu", ["s"], ["r2"], "relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], "gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], "flatten"),
        helper.make_node("MatMul", ["flat", "w3"], ["mm"], "dense"),
        helper.make_node("Add", ["mm", "b3"], ["y"], "dense_bias"),
    ]
    inits = [
        const("w1", RNG.normal(0, 0.3, (8, 3, 3, 3))),
        const("b1", RNG.normal(0, 0.1, 8)),
        const("g", RNG.uniform(0.5, 1.5, 8) * RNG.choice([-1, 1], 8)),
        const("be", RNG.normal(0, 0.2, 8)),
        const("mu", RNG.normal(0, 0.2, 8)),
        const("var", RNG.uniform(0.5, 2.0, 8)),
        const("w2", RNG.normal(0, 0.2, (8, 8, 3, 3))),
        const("k", RNG.uniform(0.5, 1.5, (1, 8, 1, 1))),
        const("h", RNG.normal(0, 0.2, (8, 1, 1))),
        const("w3", RNG.normal(0, 0.5, (8, 5))),
        const("b3", RNG.normal(0, 0.1, 5)),
    ]
    graph = helper.make_graph(
        nodes,
        "trt_patterns",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def with_transposed_weight(model: onnx.ModelProto, conv_name: str) -> onnx.ModelProto:
    """Turn ``initializer -> Q -> DQ -> Conv`` into ``Constant(HWIO) -> Q -> DQ -> Transpose ->
    Conv``, the tf2onnx layout for quantized Keras kernels."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    conv = next(n for n in graph.node if n.name == conv_name)
    dq = next(n for n in graph.node if n.output[0] == conv.input[1])
    q = next(n for n in graph.node if n.output[0] == dq.input[0])
    init = next(i for i in graph.initializer if i.name == q.input[0])
    hwio = numpy_helper.to_array(init).transpose(2, 3, 1, 0)
    graph.initializer.remove(init)
    graph.node.insert(
        0, helper.make_node("Constant", [], [q.input[0]], value=numpy_helper.from_array(hwio))
    )
    for node in (q, dq):
        next(a for a in node.attribute if a.name == "axis").i = 3
    graph.node.append(helper.make_node("Transpose", [dq.output[0]], ["w_oihw"], perm=[3, 2, 0, 1]))
    conv.input[1] = "w_oihw"
    from qatflow.onnx.graph import topological_sort

    topological_sort(graph)
    onnx.checker.check_model(out)
    return out


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return RNG.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def trt_model(samples: np.ndarray) -> onnx.ModelProto:
    """TensorRT-style QDQ version of float_graph, with amax calibrated on ``samples``."""
    qdq = insert_trt_qdq(float_graph(), [{"x": samples}])
    return with_transposed_weight(qdq, "conv1")


def test_exact_passes_give_identical_results(
    trt_model: onnx.ModelProto, samples: np.ndarray
) -> None:
    rewritten = rewrite_for_ort_int8(trt_model, relu="exact", requantize="none")
    reference = run(trt_model, samples, optimize=False)
    np.testing.assert_allclose(
        run(rewritten, samples, optimize=False), reference, atol=EXACT_TOLERANCE
    )
    summary = json.loads(next(p.value for p in rewritten.metadata_props if p.key == METADATA_KEY))
    assert summary["affine_folded"] == 3  # BatchNormalization, Mul, Add
    assert summary["weight_layout_folded"] == 1
    assert summary["requantized"] == []
    ops = Counter(n.op_type for n in rewritten.graph.node)
    assert "BatchNormalization" not in ops and "Transpose" not in ops
    for q in (n for n in rewritten.graph.node if n.op_type == "QuantizeLinear"):
        assert q.input[0] not in {i.name for i in rewritten.graph.initializer}
    activation_q = [i for i in rewritten.graph.initializer if i.data_type in (TensorProto.UINT8,)]
    assert activation_q, "activations must be re-encoded as uint8"
    assert not [
        i
        for i in rewritten.graph.initializer
        if i.data_type == TensorProto.INT8 and i.dims == [] and numpy_helper.to_array(i) != 0
    ]


def test_absorbed_relu_matches_when_nothing_exceeds_the_range(
    trt_model: onnx.ModelProto, samples: np.ndarray
) -> None:
    # The Q scales were calibrated on ``samples``: no activation exceeds 127*scale, so moving the
    # zero-point of post-Relu Qs to 0 changes nothing on them.
    rewritten = rewrite_for_ort_int8(trt_model, relu="absorb", requantize="none")
    np.testing.assert_allclose(
        run(rewritten, samples, optimize=False),
        run(trt_model, samples, optimize=False),
        atol=EXACT_TOLERANCE,
    )
    assert "Relu" not in {n.op_type for n in rewritten.graph.node}


def test_calibrated_requantization_fuses_every_conv_and_the_residual_add(
    trt_model: onnx.ModelProto, samples: np.ndarray
) -> None:
    plain = rewrite_for_ort_int8(trt_model, requantize="none")
    assert ort_optimized_op_counts(plain)["QLinearConv"] == 1  # conv2 feeds the float Add input
    # Without calibration data conv2's output takes the scale of the Q after the Add.
    downstream = rewrite_for_ort_int8(trt_model)
    assert ort_optimized_op_counts(downstream)["QLinearAdd"] == 1
    reference = run(trt_model, samples, optimize=False)
    assert (
        np.abs(run(engine_graph(downstream), samples) - reference).max()
        <= FUSED_TOLERANCE * np.abs(reference).max()
    )

    rewritten = rewrite_for_ort_int8(trt_model, calibration=[{"x": samples[:32]}])
    ops = ort_optimized_op_counts(rewritten)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and ops["Conv"] == 0
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["QGemm"] == 1
    summary = json.loads(next(p.value for p in rewritten.metadata_props if p.key == METADATA_KEY))
    assert summary["requantized"] == ["c2a"]

    result = run(engine_graph(rewritten), samples)
    assert np.abs(result - reference).max() <= FUSED_TOLERANCE * np.abs(reference).max()


def test_calibration_as_callable_and_bad_batches(
    trt_model: onnx.ModelProto, samples: np.ndarray
) -> None:
    rewritten = rewrite_for_ort_int8(trt_model, calibration=lambda: iter([{"x": samples[:8]}]))
    assert ort_optimized_op_counts(rewritten)["QLinearAdd"] == 1
    with pytest.raises(
        RuntimeBackendError, match=r"calibration batch 0 lacks model input\(s\) \['x'\]"
    ):
        rewrite_for_ort_int8(trt_model, calibration=[{"input": samples[:8]}])
    with pytest.raises(RuntimeBackendError, match="calibration yielded no batches"):
        rewrite_for_ort_int8(trt_model, calibration=[])


def test_mismatched_scales_are_requantized_only_when_asked(
    trt_model: onnx.ModelProto, samples: np.ndarray
) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(trt_model)
    # The residual Add's Q of ``m`` gets a larger scale than conv2's Q of the same tensor.
    scale = next(i for i in model.graph.initializer if i.name == "residual_in0_scale")
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.5, scale.name))

    kept = rewrite_for_ort_int8(model, relu="exact", requantize="none")
    np.testing.assert_allclose(
        run(kept, samples, optimize=False),
        run(model, samples, optimize=False),
        atol=EXACT_TOLERANCE,
    )
    assert ort_optimized_op_counts(kept)["QLinearConv"] == 0  # conv1's output is not fusable

    fused = rewrite_for_ort_int8(model, requantize="downstream")
    summary = json.loads(next(p.value for p in fused.metadata_props if p.key == METADATA_KEY))
    assert summary["requantized"] == ["m", "c2a"]
    assert ort_optimized_op_counts(fused)["QLinearConv"] == 2
    reference = run(model, samples, optimize=False)
    result = run(engine_graph(fused), samples)
    assert np.abs(result - reference).max() <= FUSED_TOLERANCE * np.abs(reference).max()


def test_clip_pad_maxpool_chain_is_hoisted_exactly(samples: np.ndarray) -> None:
    """Conv -> Clip(0, 6) -> Pad -> MaxPool -> Q: the Q moves up to the Conv, the rest runs in
    uint8, and the first Conv becomes QLinearConv."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r6"], "relu6"),
        helper.make_node("Pad", ["r6", "pads"], ["p"], "pad"),
        helper.make_node("MaxPool", ["p"], ["m"], "pool", kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Conv", ["m", "w2"], ["y"], "conv2"),
    ]
    inits = [
        const("w1", RNG.normal(0, 0.5, (4, 3, 3, 3))),
        const("lo", np.array(0.0)),
        const("hi", np.array(6.0)),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
        const("w2", RNG.normal(0, 0.5, (2, 4, 1, 1))),
    ]
    graph = helper.make_graph(
        nodes,
        "clip_pad_pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])],
        inits,
    )
    fp32 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    trt = insert_trt_qdq(fp32, [{"x": samples}])
    rewritten = rewrite_for_ort_int8(trt, relu="exact", requantize="none")
    np.testing.assert_allclose(
        run(rewritten, samples, optimize=False),
        run(trt, samples, optimize=False),
        atol=EXACT_TOLERANCE,
    )
    ops = Counter(n.op_type for n in rewritten.graph.node)
    assert ops["Clip"] == ops["Pad"] == ops["MaxPool"] == 1
    assert ort_optimized_op_counts(rewritten)["QLinearConv"] == 1  # conv2 feeds the graph output


def test_output_is_valid_plain_onnx_with_dynamic_batch(trt_model: onnx.ModelProto) -> None:
    before = trt_model.SerializeToString()
    rewritten = rewrite_for_ort_int8(trt_model)
    assert trt_model.SerializeToString() == before  # the input model is left alone
    onnx.checker.check_model(rewritten, full_check=True)
    dims = [d.dim_param or d.dim_value for d in rewritten.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, 8, 8]
    for batch in (1, 5):
        assert run(rewritten, RNG.normal(0, 1, (batch, 3, 8, 8)).astype(np.float32)).shape == (
            batch,
            5,
        )


def test_bad_options_and_old_opsets_are_rejected(trt_model: onnx.ModelProto) -> None:
    unknown: Any = "always"  # not a valid value of either option
    with pytest.raises(RuntimeBackendError, match="relu must be"):
        rewrite_for_ort_int8(trt_model, relu=unknown)
    with pytest.raises(RuntimeBackendError, match="requantize must be"):
        rewrite_for_ort_int8(trt_model, requantize=unknown)
    old = onnx.ModelProto()
    old.CopyFrom(trt_model)
    old.opset_import[0].version = 12
    with pytest.raises(RuntimeBackendError, match="model opset is 12"):
        rewrite_for_ort_int8(old)


# ---------------------------------------------------------------------------------------------
# A Keras ResNet-like CNN exported with tf2onnx
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_models() -> dict[str, Any]:
    images = fashion_images(320, 28, 1)
    model = small_resnet()
    data_init_batchnorm(model, images[:64])
    fp32 = keras_to_onnx(model)
    trt = insert_trt_qdq(fp32, [{"input": images[:64]}])
    return {"images": images, "keras": model, "fp32": fp32, "trt": trt}


def test_keras_resnet_exact_rewrite(keras_models: dict[str, Any]) -> None:
    images, trt = keras_models["images"], keras_models["trt"]
    rewritten = rewrite_for_ort_int8(trt, relu="exact", requantize="none")
    np.testing.assert_allclose(
        run(rewritten, images, optimize=False),
        run(trt, images, optimize=False),
        atol=EXACT_TOLERANCE,
    )


def test_keras_resnet_runs_every_conv_and_add_in_int8(keras_models: dict[str, Any]) -> None:
    images, trt = keras_models["images"], keras_models["trt"]
    assert ort_optimized_op_counts(trt)["QLinearConv"] <= 1  # as exported, ORT fuses next to none

    rewritten = rewrite_for_ort_int8(trt, calibration=[{"input": images[:64]}])
    ops = ort_optimized_op_counts(rewritten)
    convs = sum(n.op_type == "Conv" for n in keras_models["fp32"].graph.node)
    assert ops["QLinearConv"] == convs and ops["QLinearAdd"] == 3 and ops["QGemm"] == 1
    assert not {"Conv", "FusedConv", "Relu", "Gemm"} & set(ops)

    test = images[64:]
    reference, result = run(trt, test, optimize=False), run(engine_graph(rewritten), test)
    assert np.abs(result - reference).max() <= FUSED_TOLERANCE * np.abs(reference).max()
    assert np.mean(result.argmax(1) == reference.argmax(1)) >= 0.95
    dims = rewritten.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value")


def test_qatflow_exporter_output(keras_models: dict[str, Any]) -> None:
    """The real pipeline: quantize_model, calibrate, export (batch norm comes out as Mul/Add)."""
    import qatflow
    from qatflow.onnx.export import to_onnx_proto

    images = keras_models["images"]
    quantized = qatflow.quantize_model(keras_models["keras"])
    qatflow.calibrate(quantized, images[:64], num_batches=2, batch_size=32)
    exported = to_onnx_proto(quantized)
    name = exported.graph.input[0].name

    rewritten = rewrite_for_ort_int8(exported, calibration=[{name: images[:64]}])
    ops = ort_optimized_op_counts(rewritten)
    assert ops["QLinearConv"] == 8 and ops["QLinearAdd"] == 3 and ops["QGemm"] == 1
    assert not {"Conv", "FusedConv", "Mul", "Gemm"} & set(ops)
    test = images[64:]
    reference, result = run(exported, test, optimize=False), run(engine_graph(rewritten), test)
    assert np.abs(result - reference).max() <= FUSED_TOLERANCE * np.abs(reference).max()
    assert np.mean(result.argmax(1) == reference.argmax(1)) >= 0.95


@pytest.mark.parametrize("stage", EXACT_STAGES)
@pytest.mark.parametrize("encoding", ["u8s8", "u8u8"])
def test_each_exact_stage_alone_matches_the_reference(
    trt_model: onnx.ModelProto, samples: np.ndarray, stage: str, encoding: str
) -> None:
    """The rewrite stopped after each exact stage, in either weight encoding, run as float math,
    gives the reference's outputs: bit for bit, except after affine_fold (float rounding of the
    folded scales)."""
    rewritten = rewrite_for_ort_int8(trt_model, relu="exact", requantize="none", until=stage)
    encode_weights(rewritten, encoding)  # type: ignore[arg-type]
    reference = run(trt_model, samples, optimize=False)
    result = run(rewritten, samples, optimize=False)
    if STAGES.index(stage) < STAGES.index("affine_fold"):
        np.testing.assert_array_equal(result, reference)
    else:
        np.testing.assert_allclose(result, reference, atol=EXACT_TOLERANCE)


def test_unknown_stage_is_an_error(trt_model: onnx.ModelProto) -> None:
    with pytest.raises(RuntimeBackendError, match="until must be one of"):
        rewrite_for_ort_int8(trt_model, until="everything")
