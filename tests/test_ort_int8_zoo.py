"""rewrite_for_ort_int8 on keras.applications families and the model-zoo models.

Every model goes through qatflow's own pipeline (quantize_model, calibrate with max, export_onnx)
and the rewrite; the rewritten model must load in ONNX Runtime with all optimizations, run, and
match the reference: the exported TensorRT-style QDQ graph run as float math
(``run_reference``, ORT optimizations off).

Random-weight deep nets are chaotic under int8 rounding: one float-rounding difference moves a
value across a rounding boundary of the next Q, and the flip grows layer after layer (one ulp
on the conv weight scales alone moves these nets' logits by 1-11% of their range). The
affine-folding pass (batch norm folded into the weight scales and bias) is the same math up to
such float rounding, so the exact passes (``relu="exact", requantize="none"``) are checked:

* on the exported graph with every batch-norm gain rounded to a power of two: the folded
  scales are then exact in float32 and the rewritten graph, run as float, must give the same
  logits bit for bit (``EXACT_TOLERANCE``; 0.0 measured on every model here);
* on the exported graph itself: the first dequantized activation that differs must differ by
  isolated one-step flips (a wrong axis, bias or weight layout moves most of its values). The
  logits' max difference is printed (2-11% of the range on the applications, chaos) and
  asserted within 5% of the range on the small trained models.

The fused integer kernels are checked to run and give finite outputs of the right shape; their
agreement with the reference is asserted (``compare_outputs(...).passed``) on the small models,
trained briefly on Fashion-MNIST, where agreement means something.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx
import pytest
from bench.ort_ops import ort_optimized_op_counts
from onnx import TensorProto, helper, numpy_helper
from tests import model_zoo

import qatflow
from qatflow.data.sources.fashion_mnist import IDX_FILES, SYSTEM_DIR, read_idx
from qatflow.models import initialize_batchnorm
from qatflow.onnx.encoding import encode_weights
from qatflow.onnx.ort_int8 import (
    METADATA_KEY,
    ReluMode,
    RequantizeMode,
    rewrite_for_ort_int8,
)
from qatflow.onnx.reference import run_optimized, run_reference
from qatflow.quantization.graph import iter_models
from qatflow.runtimes.cpu_int8 import choose_encoding, detect
from qatflow.runtimes.fidelity import compare_outputs

# Bit-exact in practice (0.0 measured); room for one float32 rounding of the logits.
EXACT_TOLERANCE = 1e-6
# The first activation the folded scales' float rounding changes: isolated one-step flips.
FLIP_FRACTION = 1e-3
# Exact passes on the small trained models, as exported (batch-norm gains as they are).
EXACT_RANGE_FRACTION = 0.05

Feeds = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------


def fashion(count: int, shape: tuple[int, ...], *, offset: int = 0, train: bool = True) -> Any:
    """``count`` Fashion-MNIST images in [0, 1], NHWC, nearest-resized to ``shape`` (H, W, C)."""
    key = "x_train" if train else "x_test"
    raw = read_idx(SYSTEM_DIR / IDX_FILES[key])[offset : offset + count].astype(np.float32)
    height, width, channels = shape
    rows, cols = (np.arange(height) * 28) // height, (np.arange(width) * 28) // width
    images = raw[:, rows][:, :, cols] / 255.0
    return np.repeat(images[..., None], channels, axis=-1)


def fashion_labels(count: int, *, offset: int = 0, train: bool = True) -> np.ndarray:
    key = "y_train" if train else "y_test"
    return read_idx(SYSTEM_DIR / IDX_FILES[key])[offset : offset + count].astype(np.int64)


def application(
    build: Callable[..., keras.Model], shape: tuple[int, int, int], **kwargs: Any
) -> Callable[[], keras.Model]:
    return lambda: build(
        weights=None, input_shape=shape, classes=10, classifier_activation=None, **kwargs
    )


# name -> (constructor, input shape, pixel range the model expects)
FAMILIES: dict[str, tuple[Callable[[], keras.Model], tuple[int, int, int], float]] = {
    "MobileNetV2": (
        application(keras.applications.MobileNetV2, (96, 96, 3), alpha=0.35),
        (96, 96, 3),
        1.0,
    ),
    "EfficientNetB0": (
        application(keras.applications.EfficientNetB0, (64, 64, 3)),
        (64, 64, 3),
        255.0,
    ),
    "ResNet50V2": (application(keras.applications.ResNet50V2, (64, 64, 3)), (64, 64, 3), 1.0),
    "DenseNet121": (application(keras.applications.DenseNet121, (64, 64, 3)), (64, 64, 3), 1.0),
    "InceptionV3": (application(keras.applications.InceptionV3, (75, 75, 3)), (75, 75, 3), 1.0),
}


# Without calibration data a Conv fuses only where its output reaches a Q (directly, through a
# Relu, data-movement ops or a residual Add). DenseNet121's 59 growth convs feed a Concatenate
# whose output goes to the next layer's float batch norm; EfficientNetB0's convs feed swish
# (x * sigmoid(x)) in float, except its 16 linear projection convs. Those stay float (exact);
# with calibration data every Conv fuses.
UNCALIBRATED_QLINEARCONV = {"DenseNet121": 61, "EfficientNetB0": 16}


def unet_like() -> keras.Model:
    """SeparableConv2D and DepthwiseConv2D with depth multipliers, batch norm, a strided Conv2D,
    Conv2DTranspose, a Concatenate skip connection and a nested Functional model."""
    inputs = keras.Input((28, 28, 1), name="image")
    skip = keras.layers.SeparableConv2D(
        16, 3, padding="same", depth_multiplier=2, activation="relu", name="sep"
    )(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="down")(skip)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="mid")(x)
    x = keras.layers.BatchNormalization(name="mid_bn")(x)
    x = keras.layers.ReLU(name="mid_relu")(x)
    x = keras.layers.Conv2DTranspose(16, 3, strides=2, padding="same", name="up")(x)
    x = keras.layers.Concatenate(name="skip_concat")([skip, x])
    x = keras.layers.Conv2D(16, 1, activation="relu", name="mix")(x)
    inner = model_zoo.small_cnn(num_classes=8, input_shape=(28, 28, 16))
    features = keras.Model(inner.input, inner.get_layer("gap").output, name="inner")(x)
    outputs = keras.layers.Dense(10, name="logits")(features)
    return keras.Model(inputs, outputs, name="unet_like")


# name -> (constructor, input shape, classes)
SMALL_MODELS: dict[str, tuple[Callable[[], keras.Model], tuple[int, int, int], int]] = {
    "small_cnn": (model_zoo.small_cnn, (28, 28, 1), 10),
    "separable_transpose": (model_zoo.separable_transpose_model, (32, 32, 3), 5),
    "nested": (model_zoo.nested_model, (28, 28, 1), 3),
    "unet_like": (unet_like, (28, 28, 1), 10),
}


def export(
    model: keras.Model, calibration: np.ndarray, path: Path, runtime: str = "tensorrt"
) -> onnx.ModelProto:
    """The pipeline under test: quantize_model (placed for ``runtime``), calibrate (max),
    export_onnx."""
    quantized = qatflow.quantize_model(model, runtime=runtime)
    qatflow.calibrate(quantized, calibration, method="max", num_batches=2, batch_size=4)
    return onnx.load(str(qatflow.export_onnx(quantized, path)))


def conv_count(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "Conv" for node in model.graph.node)


def summary(model: onnx.ModelProto) -> dict[str, Any]:
    return dict(json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY)))


# ---------------------------------------------------------------------------------------------
# Exactness helpers
# ---------------------------------------------------------------------------------------------


def _folded_gains(model: onnx.ModelProto) -> tuple[onnx.GraphProto, list[onnx.NodeProto]]:
    """The graph, and the Convs whose only reader is a Mul or Add (what affine folding takes)
    after those readers."""
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    convs = [
        n
        for n in graph.node
        if n.op_type == "Conv"
        and len(readers.get(n.output[0], [])) == 1
        and readers[n.output[0]][0].op_type in ("Mul", "Add")
    ]
    return graph, [readers[c.output[0]][0] for c in convs] + convs


def with_power_of_two_gains(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where folding batch norm into a Conv is exact in float32.

    Every constant Mul after a Conv gets sign * 2**round(log2|g|) (then ``s * |g|`` is exact
    and ``conv(x, w) * g == conv(x, w * g)`` bit for bit) and those Convs lose their bias
    (``(conv + b) * g + h`` would round twice where the folded Conv rounds once).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph, nodes = _folded_gains(out)
    inits = {init.name: init for init in graph.initializer}
    for node in nodes:
        if node.op_type == "Mul":
            for name in (n for n in node.input if n in inits):
                gain = numpy_helper.to_array(inits[name]).astype(np.float64)
                rounded = np.sign(gain) * np.exp2(np.round(np.log2(np.abs(gain))))
                inits[name].CopyFrom(numpy_helper.from_array(rounded.astype(np.float32), name))
        elif node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in inits:
            bias = numpy_helper.to_array(inits[node.input[2]])
            inits[node.input[2]].CopyFrom(
                numpy_helper.from_array(np.zeros_like(bias), node.input[2])
            )
    return out


def first_divergence(
    exported: onnx.ModelProto, rewritten: onnx.ModelProto, feeds: Feeds
) -> tuple[str, int, int, float] | None:
    """The first dequantized activation (in graph order) where ``rewritten`` run as float differs
    from ``exported``: (tensor, differing elements, elements, largest difference in quantization
    steps); None if none differs."""
    inits = {init.name for init in exported.graph.initializer}
    produced = {o: n for n in rewritten.graph.node for o in n.output}
    points = [
        (node.output[0], node.input[1])
        for node in exported.graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] not in inits
        and node.input[1] in inits
        and getattr(produced.get(node.output[0]), "op_type", "") == "DequantizeLinear"
    ]
    names = [name for name, _ in points]
    scales = {i.name: numpy_helper.to_array(i) for i in exported.graph.initializer}
    want = run_reference(exported, feeds, names)
    got = run_reference(rewritten, feeds, names)
    for (name, scale), a, b in zip(points, want, got, strict=True):
        differs = a != b
        if differs.any():
            steps = float(np.abs(a - b).max() / scales[scale].max())
            return name, int(differs.sum()), a.size, steps
    return None


def check_exact_passes(exported: onnx.ModelProto, feeds: Feeds, name: str) -> dict[str, Any]:
    """The exact passes (relu="exact", requantize="none") run as float, against the reference.

    With power-of-two batch-norm gains they must be bit-exact. On the graph as exported, the
    folded scales round in float32: the first activation that differs must differ by isolated
    one-step flips (a wrong axis, bias or layout would move most of its values).
    """
    pow2 = with_power_of_two_gains(exported)
    pow2_reference = run_reference(pow2, feeds)[0]
    pow2_rewritten = rewrite_for_ort_int8(pow2, relu="exact", requantize="none")
    pow2_diff = float(np.abs(run_reference(pow2_rewritten, feeds)[0] - pow2_reference).max())
    pow2_span = float(pow2_reference.max() - pow2_reference.min())
    assert pow2_span > 0, f"{name}: degenerate reference logits"
    assert pow2_diff <= EXACT_TOLERANCE * pow2_span, (
        f"{name}: exact passes changed the power-of-two-gain graph by {pow2_diff:.3g} "
        f"(logit range {pow2_span:.3g})"
    )

    reference = run_reference(exported, feeds)[0]
    span = float(reference.max() - reference.min())
    rewritten = rewrite_for_ort_int8(exported, relu="exact", requantize="none")
    diff = float(np.abs(run_reference(rewritten, feeds)[0] - reference).max())
    # pad_fold removes the padding from the DQs before a Conv (they get new names), which would
    # hide those activations from the comparison by name; pad_fold and swish are bit-exact (the
    # power-of-two check above runs them), so the flips are looked for before them.
    before_pad_fold = rewrite_for_ort_int8(
        exported, relu="exact", requantize="none", until="collapse"
    )
    divergence = first_divergence(exported, before_pad_fold, feeds)
    if divergence is not None:
        tensor, count, size, steps = divergence
        assert steps <= 1.01 and count <= max(2, FLIP_FRACTION * size), (
            f"{name}: {tensor} differs in {count} of {size} values, by up to {steps:.3g} "
            "quantization steps"
        )
    return {"exact_diff": diff / span, "pow2_diff": pow2_diff, "first_divergence": divergence}


def check_engine(
    exported: onnx.ModelProto,
    feeds: Feeds,
    calibration: list[Feeds] | None,
) -> dict[str, Any]:
    """Rewrite, encode for this CPU (``auto``: U8S8 kernels saturate without VNNI), load with
    every ORT optimization, run; finite logits of the reference's shape."""
    reference = run_reference(exported, feeds)[0]
    rewritten = rewrite_for_ort_int8(exported, calibration=calibration)
    encode_weights(rewritten, choose_encoding("auto"))
    onnx.checker.check_model(rewritten)
    ops = ort_optimized_op_counts(rewritten)
    result = run_optimized(rewritten, feeds)[0]
    assert result.shape == reference.shape
    assert np.all(np.isfinite(result))
    span = float(reference.max() - reference.min())
    report = compare_outputs(reference, result, data="fashion-mnist")
    stats = {
        "qlinearconv": ops["QLinearConv"],
        "qlinearadd": ops["QLinearAdd"],
        "convs": conv_count(exported),
        "conv_transpose": ops["ConvTranspose"],
        "max_diff": float(np.abs(result - reference).max()) / span,
        "fidelity": report.summary(),
        "passed": report.passed,
    }
    return stats


# ---------------------------------------------------------------------------------------------
# Regression tests on hand-built graphs
# ---------------------------------------------------------------------------------------------


def _value(name: str, shape: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_quantizers_of_different_tensors_sharing_scale_constants_stay_apart() -> None:
    """Two branches quantized with the same scale and zero-point initializers (tf2onnx shares
    identical constants; max calibration gives equal scales to a Relu and its MaxPool, to a
    Concat and its largest input, to saturated ReLU6 outputs...). Merging "equal" Qs must
    only merge Qs of the same tensor: merging these rewired one branch's Conv to the other's
    input (ORT: "Incompatible dimensions", "Input channels C is not equal to kernel channels
    * group")."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], "conv_a"),
        helper.make_node("Conv", ["x", "w2"], ["b"], "conv_b"),
        helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"], "qa"),
        helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["adq"], "dqa"),
        helper.make_node("QuantizeLinear", ["b", "s", "z"], ["bq"], "qb"),
        helper.make_node("DequantizeLinear", ["bq", "s", "z"], ["bdq"], "dqb"),
        helper.make_node("GlobalAveragePool", ["adq"], ["ya"], "gap_a"),
        helper.make_node("GlobalAveragePool", ["bdq"], ["yb"], "gap_b"),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (6, 3, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    graph = helper.make_graph(
        nodes,
        "shared_scale",
        [_value("x", ["N", 3, 4, 4])],
        [_value("ya", ["N", 4, 1, 1]), _value("yb", ["N", 6, 1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.normal(0, 1, (2, 3, 4, 4)).astype(np.float32)}
    modes: tuple[tuple[ReluMode, RequantizeMode], ...] = (
        ("exact", "none"),
        ("absorb", "calibrated"),
    )
    for relu, requantize in modes:
        rewritten = rewrite_for_ort_int8(model, relu=relu, requantize=requantize)
        assert summary(rewritten).get("quantizers_merged", 0) == 0
        for got, want in zip(
            run_optimized(rewritten, feeds), run_reference(model, feeds), strict=True
        ):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=0.05)


def test_depthwise_weight_reshape_with_depth_multiplier_is_folded_exactly() -> None:
    """TF's depthwise kernel (kh, kw, C, M), quantized per input channel, goes through
    Reshape (kh, kw, 1, C*M) and Transpose to OIHW after its DequantizeLinear. The Reshape
    merges each channel with its multiplier, so the per-channel scales are repeated per output
    channel (axis 0): the weights fold into an int8 initializer and the Conv fuses."""
    rng = np.random.default_rng(0)
    channels, multiplier = 4, 2
    kernel = rng.normal(0, 0.5, (3, 3, channels, multiplier)).astype(np.float32)
    scales = (np.abs(kernel).max(axis=(0, 1, 3)) / 127).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(kernel, "kv")),
        helper.make_node("QuantizeLinear", ["k", "ws", "wz"], ["kq"], axis=2),
        helper.make_node("DequantizeLinear", ["kq", "ws", "wz"], ["kdq"], axis=2),
        helper.make_node("Reshape", ["kdq", "shape"], ["kr"]),
        helper.make_node("Transpose", ["kr"], ["w"], perm=[3, 2, 0, 1]),
        helper.make_node("QuantizeLinear", ["x", "xs", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "z"], ["xdq"]),
        helper.make_node("Conv", ["xdq", "w"], ["c"], group=channels, pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "ys", "z"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "ys", "z"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(scales, "ws"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "wz"),
        numpy_helper.from_array(np.array([3, 3, 1, channels * multiplier], np.int64), "shape"),
        numpy_helper.from_array(np.array(3 / 127, np.float32), "xs"),
        numpy_helper.from_array(np.array(4 / 127, np.float32), "ys"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    graph = helper.make_graph(
        nodes,
        "depthwise",
        [_value("x", ["N", channels, 8, 8])],
        [_value("y", ["N", channels * multiplier, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.normal(0, 1, (2, channels, 8, 8)).astype(np.float32)}
    rewritten = rewrite_for_ort_int8(model, relu="exact", requantize="none")
    assert summary(rewritten)["weight_layout_folded"] == 2
    assert not {"Reshape", "Transpose"} & {n.op_type for n in rewritten.graph.node}
    weight_dq = next(
        n for n in rewritten.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "w"
    )
    assert next(a.i for a in weight_dq.attribute if a.name == "axis") == 0
    reference = run_reference(model, feeds)[0]
    np.testing.assert_array_equal(run_reference(rewritten, feeds)[0], reference)
    for encoding in detect().exact:  # U8S8 kernels saturate on random weights without VNNI
        encoded = copy.deepcopy(rewritten)
        encode_weights(encoded, encoding)
        assert ort_optimized_op_counts(encoded)["QLinearConv"] == 1
        np.testing.assert_allclose(run_optimized(encoded, feeds)[0], reference, atol=4 / 127)


# ---------------------------------------------------------------------------------------------
# keras.applications families (random weights, batch-norm statistics from Fashion-MNIST)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_application_family(family: str, tmp_path: Path, record_property: Any) -> None:
    build, shape, pixel_range = FAMILIES[family]
    keras.utils.set_random_seed(0)
    model = build()
    initialize_batchnorm(model, fashion(16, shape) * pixel_range)
    exported = export(model, fashion(8, shape, offset=16) * pixel_range, tmp_path / "model.onnx")
    input_name = exported.graph.input[0].name
    feeds = {input_name: fashion(4, shape, train=False) * pixel_range}

    stats = check_exact_passes(exported, feeds, family)
    # The backend's call (defaults, no calibration data), then with calibration data.
    plain = check_engine(exported, feeds, None)
    calibrated = check_engine(exported, feeds, [{input_name: fashion(8, shape) * pixel_range}])
    convs = plain["convs"]
    print(
        f"{family}: QLinearConv {plain['qlinearconv']}/{convs} (calibrated "
        f"{calibrated['qlinearconv']}/{convs}); exact passes max|diff| {stats['exact_diff']:.2%} "
        f"of the logit range (first divergence {stats['first_divergence']}; power-of-two "
        f"gains {stats['pow2_diff']:.3g}); fused max|diff| {plain['max_diff']:.2%} "
        f"(calibrated {calibrated['max_diff']:.2%})"
    )
    record_property("ort_int8", {"exact": stats, "plain": plain, "calibrated": calibrated})
    assert calibrated["qlinearconv"] == convs
    assert plain["qlinearconv"] == UNCALIBRATED_QLINEARCONV.get(family, convs)


# ---------------------------------------------------------------------------------------------
# Small models, trained briefly on Fashion-MNIST: the fused engine must pass the fidelity gate
# ---------------------------------------------------------------------------------------------


def trained(name: str) -> tuple[keras.Model, np.ndarray]:
    """The small model ``name`` trained for 2 epochs, and its training images."""
    build, shape, classes = SMALL_MODELS[name]
    keras.utils.set_random_seed(0)
    model = build()
    train = fashion(2048, shape)
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(train, fashion_labels(2048) % classes, batch_size=64, epochs=2, verbose=0)
    return model, train


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_trained_small_model(name: str, tmp_path: Path, record_property: Any) -> None:
    shape = SMALL_MODELS[name][1]
    model, train = trained(name)
    exported = export(model, train[:8], tmp_path / "model.onnx")
    input_name = exported.graph.input[0].name
    test = {input_name: fashion(256, shape, train=False)}

    stats = check_exact_passes(exported, {input_name: test[input_name][:16]}, name)
    assert stats["exact_diff"] <= EXACT_RANGE_FRACTION, stats
    results = {}
    for label, calibration in (("plain", None), ("calibrated", [{input_name: train[:64]}])):
        results[label] = check_engine(exported, test, calibration)
        assert results[label]["passed"], f"{name} ({label}): {results[label]['fidelity']}"
    convs = results["plain"]["convs"]
    print(
        f"{name}: QLinearConv {results['plain']['qlinearconv']}/{convs} (calibrated "
        f"{results['calibrated']['qlinearconv']}/{convs}); exact passes max|diff| "
        f"{stats['exact_diff']:.3g}; {results['plain']['fidelity']}; calibrated: "
        f"{results['calibrated']['fidelity']}"
    )
    record_property("ort_int8", {"exact": stats, **results})
    # ConvTranspose has no ORT CPU integer rule: it stays float (and correct).
    transposed = sum(n.op_type == "ConvTranspose" for n in exported.graph.node)
    assert results["calibrated"]["conv_transpose"] == transposed
    assert results["calibrated"]["qlinearconv"] == convs


@pytest.mark.parametrize("name", ["small_cnn", "unet_like"])
def test_placement_for_onnxruntime_runs_every_residual_add_in_integer(
    name: str, tmp_path: Path
) -> None:
    """Placed for ONNX Runtime (every residual Add input quantized), the engine runs each Add
    as QLinearAdd and every Conv in integer, and still passes the gate."""
    shape = SMALL_MODELS[name][1]
    model, train = trained(name)
    exported = export(model, train[:8], tmp_path / "model.onnx", runtime="onnxruntime")
    input_name = exported.graph.input[0].name
    test = {input_name: fashion(256, shape, train=False)}
    result = check_engine(exported, test, [{input_name: train[:64]}])
    assert result["passed"], f"{name}: {result['fidelity']}"
    adds = sum(
        isinstance(layer, keras.layers.Add) for m in iter_models(model) for layer in m.layers
    )
    assert adds and result["qlinearadd"] == adds
    assert result["qlinearconv"] == result["convs"]
