"""ONNX Runtime CPU latency of TensorRT-style INT8 QDQ graphs, before and after the ORT rewrite.

Run directly: ``.venv/bin/python bench/ort_int8_bench.py [--threads 2] [--runs 60]``.

It exports ``keras.applications.ResNet50(weights=None)`` (batch-norm statistics initialised from
Fashion-MNIST images, so activations are realistic) with tf2onnx, inserts Q/DQ in TensorRT's
placement, and measures, side by side in one run with interleaved calls, the p50 latency at
batch 1 of FP32, the TensorRT-style graph as-is, the rewritten graph (``rewrite_for_ort_int8``)
and ONNX Runtime's own ``quantize_static`` model (QDQ, per-channel, uint8 activations, int8
weights). It also prints the accuracy cost of each rewrite option against the TensorRT-style
graph.

The helpers (Keras export, batch-norm data init, TensorRT-style Q/DQ inserter) are shared with
``tests/test_ort_int8.py``.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if TYPE_CHECKING:
    from qatflow.onnx.ort_int8 import ReluMode, RequantizeMode

Feeds = Mapping[str, np.ndarray]


# ---------------------------------------------------------------------------------------------
# Sample data and Keras models
# ---------------------------------------------------------------------------------------------


def _idx(key: str) -> np.ndarray:
    """One Fashion-MNIST array (``x_train``, ``y_test``, ...) read with qatflow's IDX reader
    (imported here: ``qatflow.data`` imports TensorFlow, which the graph helpers need not)."""
    from qatflow.data.sources.fashion_mnist import IDX_FILES, SYSTEM_DIR, read_idx

    return read_idx(SYSTEM_DIR / IDX_FILES[key])


def fashion_images(count: int, size: int, channels: int, *, offset: int = 0) -> np.ndarray:
    """``count`` Fashion-MNIST test images as float32 NHWC in [-1, 1], resized to ``size``."""
    images = _idx("x_test")[offset : offset + count].astype(np.float32) / 127.5 - 1.0
    if size != 28:
        index = (np.arange(size) * 28) // size
        images = images[:, index][:, :, index]
    return np.repeat(images[..., None], channels, axis=-1)


def data_init_batchnorm(model: Any, images: np.ndarray, seed: int = 0) -> None:
    """Give a random-weight Keras model realistic activations.

    Batch-norm moving statistics are set to the batch statistics of ``images`` (one training-mode
    call with momentum 0), gammas and betas and Dense biases are randomised so folded biases are
    non-zero.
    """
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
            channels = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.6, 1.4, channels).astype(np.float32))
            layer.beta.assign(rng.normal(0.0, 0.2, channels).astype(np.float32))
        elif isinstance(layer, keras.layers.Dense) and layer.use_bias:
            layer.bias.assign(rng.normal(0.0, 0.1, layer.bias.shape).astype(np.float32))
    model(images, training=True)


def keras_to_onnx(model: Any, opset: int = 17) -> onnx.ModelProto:
    """Export a Keras 3 model with tf2onnx; the batch dimension stays dynamic."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input"),)

    @tf.function(input_signature=spec)
    def forward(x: Any) -> Any:
        return model(x, training=False)

    onnx_model, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=opset)
    return onnx_model


def small_resnet(input_shape: tuple[int, int, int] = (28, 28, 1), classes: int = 10) -> Any:
    """A small ResNet-v1-like CNN: stem, max-pool, identity and projection blocks, GAP, Dense."""
    import keras
    from keras import layers

    def conv_bn(x: Any, filters: int, kernel: int, stride: int = 1) -> Any:
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False)(x)
        return layers.BatchNormalization()(x)

    def block(x: Any, filters: int, stride: int) -> Any:
        shortcut = x
        if stride != 1 or x.shape[-1] != filters:
            shortcut = conv_bn(x, filters, 1, stride)
        y = layers.ReLU()(conv_bn(x, filters, 3, stride))
        y = conv_bn(y, filters, 3)
        return layers.ReLU()(layers.Add()([shortcut, y]))

    inputs = keras.Input(input_shape)
    x = layers.ReLU()(conv_bn(inputs, 16, 3))
    x = layers.MaxPooling2D(2)(x)
    x = block(x, 16, 1)
    x = block(x, 32, 2)
    x = block(x, 32, 1)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes)(x))


# ---------------------------------------------------------------------------------------------
# TensorRT-style Q/DQ insertion (what qatflow's exporter produces)
# ---------------------------------------------------------------------------------------------


def _record_tensors(model: onnx.ModelProto, names: Sequence[str], feeds: Iterable[Feeds]) -> dict:
    """Run ``model`` on ORT and return, per tensor name, the list of its values over ``feeds``."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in known
    )
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(out_names, session.run(None, dict(feed)), strict=True):
            if name in values:
                values[name].append(value)
    return values


def insert_trt_qdq(model: onnx.ModelProto, feeds: Sequence[Feeds]) -> onnx.ModelProto:
    """Insert Q/DQ the way TensorRT's explicit quantization wants it (see the module docstring).

    Signed int8, zero-point 0, narrow range; per-tensor abs-max activations from ``feeds``;
    per-channel abs-max weights (Conv axis 0, MatMul axis 1); Q/DQ on the inputs and weights of
    Conv/ConvTranspose/MatMul/Gemm and on the inputs of AveragePool/GlobalAveragePool; a residual
    Add gets Q/DQ on every input except one single-consumer Conv branch. Each quantized input gets
    its own Q/DQ pair; weights stay float constants behind ``QuantizeLinear -> DequantizeLinear``.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1

    def is_conv_branch(name: str) -> bool:
        """Single-consumer Conv output, possibly through BatchNormalization or constant Mul/Add."""
        node = producer.get(name)
        while node is not None and consumers[name] == 1:
            if node.op_type == "Conv":
                return True
            affine = node.op_type in ("Mul", "Add") and any(i in inits for i in node.input)
            if node.op_type != "BatchNormalization" and not affine:
                return False
            name = next(i for i in node.input if i not in inits)
            node = producer.get(name)
        return False

    acts: list[tuple[onnx.NodeProto, int]] = []
    weights: list[tuple[onnx.NodeProto, int, int]] = []
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            acts.append((node, 0))
            if node.input[1] in inits:
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}.get(
                    node.op_type, int(not trans_b)
                )
                weights.append((node, 1, axis))
        elif node.op_type in ("AveragePool", "GlobalAveragePool"):
            acts.append((node, 0))
        elif node.op_type == "Add" and not any(i in inits for i in node.input):
            branch = [i for i, name in enumerate(node.input) if is_conv_branch(name)]
            skip = branch[0] if branch else -1
            acts.extend((node, i) for i in range(len(node.input)) if i != skip)

    names = sorted({node.input[i] for node, i in acts})
    recorded = _record_tensors(model, names, feeds)
    amax = {n: float(max(np.abs(v).max() for v in recorded[n])) for n in names}

    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    zero = numpy_helper.from_array(np.zeros((), np.int8), "trt_qdq_zero")
    graph.initializer.append(zero)

    def add_pair(node: onnx.NodeProto, index: int, scale: np.ndarray, axis: int | None) -> None:
        source = node.input[index]
        tag = f"{node.name or node.output[0]}_in{index}"
        scale_init = numpy_helper.from_array(scale.astype(np.float32), f"{tag}_scale")
        graph.initializer.append(scale_init)
        zp_name = zero.name
        if axis is not None:
            zp_name = f"{tag}_zp"
            graph.initializer.append(
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), zp_name)
            )
        kwargs: dict[str, Any] = {} if axis is None else {"axis": axis}
        q = helper.make_node(
            "QuantizeLinear", [source, scale_init.name, zp_name], [f"{tag}_q"], f"{tag}_Q", **kwargs
        )
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{tag}_q", scale_init.name, zp_name],
            [f"{tag}_dq"],
            f"{tag}_DQ",
            **kwargs,
        )
        new_nodes.setdefault(node.name or node.output[0], []).extend([q, dq])
        node.input[index] = f"{tag}_dq"

    for node, index in acts:
        add_pair(node, index, np.array(max(amax[node.input[index]], 1e-8) / 127.0), None)
    for node, index, axis in weights:
        w = numpy_helper.to_array(inits[node.input[index]])
        reduce = tuple(a for a in range(w.ndim) if a != axis)
        add_pair(node, index, np.maximum(np.abs(w).max(axis=reduce), 1e-8) / 127.0, axis)

    ordered: list[onnx.NodeProto] = []
    for node in graph.node:
        ordered.extend(new_nodes.get(node.name or node.output[0], []))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.checker.check_model(out)
    return out


# ---------------------------------------------------------------------------------------------
# Baselines, sessions, measurements
# ---------------------------------------------------------------------------------------------


def ort_quantize_static(
    model: onnx.ModelProto, feeds: Sequence[Feeds], *, uint8_weights: bool = False
) -> onnx.ModelProto:
    """ONNX Runtime's own PTQ: QDQ, per-channel, uint8 activations, MinMax; int8 weights (U8S8)
    or, with ``uint8_weights``, uint8 ones (U8U8, exact on every x86 CPU)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self._feeds, None)
            return None if feed is None else dict(feed)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "q.onnx"))
        onnx.save(model, src)
        quant_pre_process(src, pre)
        quantize_static(
            pre,
            dst,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QUInt8 if uint8_weights else QuantType.QInt8,
        )
        return onnx.load(dst)


def session(model: onnx.ModelProto, threads: int = 1, optimize: bool = True) -> Any:
    """A CPU InferenceSession with all graph optimizations (or none) and quiet logging."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def predict(
    model: onnx.ModelProto, images: np.ndarray, batch: int = 32, optimize: bool = True
) -> np.ndarray:
    """Outputs of ``model`` on ``images`` (first input, first output), in batches."""
    sess = session(model, threads=os.cpu_count() or 1, optimize=optimize)
    name = sess.get_inputs()[0].name
    return np.concatenate(
        [sess.run(None, {name: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    )


def p50_latencies(
    models: Mapping[str, onnx.ModelProto],
    image: np.ndarray,
    threads: int,
    runs: int,
    block: int = 10,
) -> dict[str, float]:
    """Median batch-1 latency (ms) of each model, measured side by side.

    Models take turns in blocks of ``block`` calls (the first call of each block is not timed):
    ORT's worker threads keep spinning for a while after a call, so strictly alternating single
    calls would bill one model for another's spinning threads.
    """
    from bench.isa_bench import interleaved_p50

    sessions = {label: session(m, threads) for label, m in models.items()}
    return interleaved_p50(
        {
            label: functools.partial(sess.run, None, {sess.get_inputs()[0].name: image})
            for label, sess in sessions.items()
        },
        runs,
        block,
    )


def agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(max abs difference, top-1 agreement) of two logit arrays."""
    return float(np.abs(reference - other).max()), float(
        np.mean(reference.argmax(1) == other.argmax(1))
    )


def resnet50_models(calibration: np.ndarray) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(FP32, TensorRT-style QDQ) ONNX of a data-initialised ResNet50 taking 224x224x3."""
    import keras

    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    data_init_batchnorm(model, calibration[:16])
    fp32 = keras_to_onnx(model)
    feeds = [{"input": calibration[i : i + 8]} for i in range(0, len(calibration), 8)]
    return fp32, insert_trt_qdq(fp32, feeds)


def fashion_labels(count: int, *, offset: int = 0, train: bool = False) -> np.ndarray:
    """Fashion-MNIST labels matching ``fashion_images(..., offset=offset)``."""
    return _idx("y_train" if train else "y_test")[offset : offset + count]


def fashion_train_images(count: int) -> np.ndarray:
    """The first ``count`` Fashion-MNIST training images as float32 NHWC in [-1, 1]."""
    return (_idx("x_train")[:count].astype(np.float32) / 127.5 - 1.0)[..., None]


# Rewrite options compared in the accuracy table: (label, relu, requantize).
# Rewrite options compared: (label, relu, requantize, calibrated?).
VARIANTS: tuple[tuple[str, ReluMode, RequantizeMode, bool], ...] = (
    ("rewritten: exact, none", "exact", "none", False),
    ("rewritten: absorb, none", "absorb", "none", False),
    ("rewritten: absorb, downstream", "absorb", "downstream", False),
    ("rewritten: exact, calibrated", "exact", "calibrated", True),
    ("rewritten: absorb, calibrated", "absorb", "calibrated", True),
)
TRT = "TensorRT-style QDQ (as-is)"
NOISE_FLOOR = "TRT-style, ORT optimizations off"


def rewrite_variants(trt: onnx.ModelProto, feeds: Sequence[Feeds]) -> dict[str, onnx.ModelProto]:
    """The TensorRT-style model rewritten with each option set of VARIANTS."""
    from qatflow.onnx.ort_int8 import rewrite_for_ort_int8

    return {
        label: rewrite_for_ort_int8(
            trt, calibration=feeds if calibrated else None, relu=relu, requantize=requantize
        )
        for label, relu, requantize, calibrated in VARIANTS
    }


def accuracy_table(
    title: str,
    models: Mapping[str, onnx.ModelProto],
    images: np.ndarray,
    labels: np.ndarray | None = None,
) -> None:
    """Print max |logit diff| and top-1 agreement of each model against the TensorRT-style one.

    The noise-floor row is the TensorRT-style graph itself with ORT's optimizations off: how
    much float-rounding differences alone move this network's outputs.
    """
    outputs = {label: predict(model, images) for label, model in models.items()}
    outputs[NOISE_FLOOR] = predict(models[TRT], images, optimize=False)
    reference = outputs[TRT]
    scale = float(np.abs(reference).max())
    print(f"\n{title} ({len(images)} images, logit range {scale:.2f}; reference: {TRT})")
    header = f"{'model':38s} {'max|diff|':>10s} {'top-1 agree':>11s}"
    print(header + (f" {'accuracy':>9s}" if labels is not None else ""))
    for label, out in outputs.items():
        diff, agree = agreement(reference, out)
        line = f"{label:38s} {diff:10.4f} {agree:11.2%}"
        if labels is not None:
            line += f" {np.mean(out.argmax(1) == labels):9.2%}"
        print(line)


def small_cnn_accuracy() -> None:
    """Accuracy cost of each option on a small ResNet-like CNN trained on Fashion-MNIST."""
    import keras

    model = small_resnet()
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(fashion_train_images(20000), fashion_labels(20000, train=True), epochs=2, verbose=0)
    calibration = fashion_images(256, 28, 1, offset=9000)
    feeds = [{"input": calibration[i : i + 64]} for i in range(0, 256, 64)]
    fp32 = keras_to_onnx(model)
    trt = insert_trt_qdq(fp32, feeds)
    models = {"FP32": fp32, TRT: trt, **rewrite_variants(trt, feeds)}
    models["ORT quantize_static"] = ort_quantize_static(fp32, feeds)
    accuracy_table(
        "Small ResNet-like CNN trained 2 epochs, Fashion-MNIST test set",
        models,
        fashion_images(8192, 28, 1),
        fashion_labels(8192),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Benchmark ResNet50 latency and print the accuracy cost of each rewrite option."""
    import argparse

    from bench.ort_ops import ort_optimized_op_counts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, default=100, help="timed calls per model")
    parser.add_argument("--images", type=int, default=128, help="ResNet50 accuracy images")
    parser.add_argument("--skip-small-cnn", action="store_true", help="skip the trained CNN")
    args = parser.parse_args(argv)

    calibration = fashion_images(32, 224, 3, offset=9000)
    feeds = [{"input": calibration[i : i + 8]} for i in range(0, 32, 8)]
    fp32, trt = resnet50_models(calibration)
    variants = rewrite_variants(trt, feeds)
    quantize_static = ort_quantize_static(fp32, feeds)
    default = "rewritten (default, no calibration)"
    models = {
        "FP32": fp32,
        TRT: trt,
        default: variants["rewritten: absorb, downstream"],
        **{k: variants[k] for k in ("rewritten: exact, none", "rewritten: absorb, calibrated")},
        "ORT quantize_static": quantize_static,
    }
    for label in (TRT, default, "ORT quantize_static"):
        ops = ort_optimized_op_counts(models[label], threads=args.threads)
        kernels = {k: v for k, v in ops.items() if k.startswith("Q") or k in ("Conv", "FusedConv")}
        print(f"{label}: {dict(sorted(kernels.items()))}")

    latency = p50_latencies(models, fashion_images(1, 224, 3), args.threads, args.runs)
    print(f"\nResNet50 224x224, batch 1, {args.threads} threads, p50 of {args.runs} calls each")
    for label, ms in latency.items():
        print(
            f"{label:38s} {ms:8.2f} ms  x{ms / latency['ORT quantize_static']:.2f} of "
            f"quantize_static  FP32/this {latency['FP32'] / ms:.2f}"
        )
    ours, theirs = latency[default], latency["ORT quantize_static"]
    print(
        f"rewritten / quantize_static: {ours / theirs:.2f} (target <= 1.00);"
        f" FP32 / rewritten: {latency['FP32'] / ours:.2f} (target >= 3.5)"
    )

    accuracy_table(
        "ResNet50 (random weights, data-initialised batch norm), Fashion-MNIST at 224x224",
        {
            "FP32": fp32,
            TRT: trt,
            **variants,
            "ORT quantize_static": quantize_static,
        },
        fashion_images(args.images, 224, 3),
    )
    if not args.skip_small_cnn:
        small_cnn_accuracy()
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    raise SystemExit(main())
