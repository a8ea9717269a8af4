"""Batch norm folded into the layer before it, before quantization (batch_norm_folding)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
from tests.model_zoo import images, nested_model, small_cnn

import qatflow
import qatflow.errors
from qatflow.onnx.graph import op_counts
from qatflow.quantization.batch_norm_folding import (
    FoldedBatchNorm,
    find_batch_norm_folds,
    fold_batch_norms,
)

Layer = Callable[[], keras.layers.Layer]

FOLDABLE: dict[str, tuple[tuple[int, ...], Layer]] = {
    "conv2d": ((9, 9, 3), lambda: keras.layers.Conv2D(6, 3, use_bias=False)),
    "conv2d_bias": ((9, 9, 3), lambda: keras.layers.Conv2D(6, 3, strides=2)),
    "conv1d": ((12, 4), lambda: keras.layers.Conv1D(5, 3)),
    "depthwise_x2": ((9, 9, 3), lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2)),
    "transpose": ((5, 5, 4), lambda: keras.layers.Conv2DTranspose(6, 3, strides=2)),
    "separable": ((9, 9, 3), lambda: keras.layers.SeparableConv2D(7, 3, depth_multiplier=2)),
    "dense": ((11,), lambda: keras.layers.Dense(8)),
}


def _randomize_norms(model: keras.Model, seed: int = 0) -> keras.Model:
    """Moving statistics, gamma and beta far from their initial values."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.1, 3.0, n).astype(np.float32))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.2, 2.0, n).astype(np.float32))
            if layer.center:
                layer.beta.assign(rng.normal(0, 0.5, n).astype(np.float32))
    return model


def _one_layer_model(shape: tuple[int, ...], make: Layer, **norm: object) -> keras.Model:
    inputs = keras.Input(shape)
    x = make()(inputs)
    x = keras.layers.BatchNormalization(name="norm", **norm)(x)  # type: ignore[arg-type]
    return _randomize_norms(keras.Model(inputs, keras.layers.ReLU()(x)))


def _norms(model: keras.Model) -> list[str]:
    return [
        layer.name
        for sub in qatflow.quantization.graph.iter_models(model)
        for layer in sub.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


@pytest.mark.parametrize("kind", sorted(FOLDABLE))
@pytest.mark.parametrize("affine", [True, False])
def test_the_folded_layer_computes_what_layer_and_norm_did(kind: str, affine: bool) -> None:
    shape, make = FOLDABLE[kind]
    model = _one_layer_model(shape, make, scale=affine, center=affine)
    folded, folds = fold_batch_norms(model)
    x = images(4, shape)
    expected = model.predict(x, verbose=0)
    got = folded.predict(x, verbose=0)
    assert [f.norm.name for f in folds] == ["norm"]
    assert _norms(folded) == [] and _norms(model) == ["norm"]
    stand_in = folded.get_layer("norm")
    assert isinstance(stand_in, FoldedBatchNorm)
    assert stand_in.folded_into == folds[0].layer.name
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def _conv_then(after: Callable[[keras.KerasTensor], keras.KerasTensor], **conv: object):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv", **conv)(inputs)  # type: ignore[arg-type]
    return keras.Model(inputs, after(x))


def test_a_norm_that_is_not_an_affine_map_of_a_linear_layer_is_left_alone() -> None:
    def norm(x: keras.KerasTensor, axis: int = -1) -> keras.KerasTensor:
        return keras.layers.BatchNormalization(axis=axis)(x)

    not_foldable = {
        "activation before the norm": _conv_then(norm, activation="relu"),
        "conv output read twice": _conv_then(lambda x: keras.layers.Add()([x, norm(x)])),
        "norm over a spatial axis": _conv_then(lambda x: norm(x, axis=1)),
        "conv output is a model output": None,
    }
    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3)(inputs)
    not_foldable["conv output is a model output"] = keras.Model(inputs, [conv, norm(conv)])
    for why, model in not_foldable.items():
        assert find_batch_norm_folds(model) == [], why
        folded, folds = fold_batch_norms(model)
        assert folds == [] and len(_norms(folded)) == 1, why


def test_norms_in_nested_models_are_folded_and_outputs_agree() -> None:
    model = nested_model()
    for sub in qatflow.quantization.graph.iter_models(model):
        _randomize_norms(sub)
    folded, folds = fold_batch_norms(model)
    assert len(folds) == 5 and _norms(folded) == []
    x = images(4, (28, 28, 1))
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(folded.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5)


def test_quantize_model_folds_by_default_and_keeps_the_norms_when_asked(tmp_path: Path) -> None:
    model = _randomize_norms(small_cnn())
    folded = qatflow.quantize_model(model)
    kept = qatflow.quantize_model(model, fold_batch_norm=False)
    assert _norms(folded) == [] and len(_norms(kept)) == 5 and len(_norms(model)) == 5
    rows = {row.layer: row.why for row in qatflow.summarize(folded).rows}
    assert "folded into the weights" in rows["stem_bn"]
    # The folded, quantized model saves and loads like any other.
    x = images(8, (28, 28, 1))
    qatflow.calibrate(folded, x, num_batches=1, batch_size=8)
    folded.save(tmp_path / "q.keras")
    loaded = keras.models.load_model(tmp_path / "q.keras")
    assert isinstance(loaded.get_layer("stem_bn"), FoldedBatchNorm)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), folded.predict(x, verbose=0))


def test_the_exported_graph_has_no_batch_norm_arithmetic(tmp_path: Path) -> None:
    """Folded: each Conv reads int8 weights and its output goes to ReLU, Add or the next Q,
    never to a Mul/Add/BatchNormalization that a runtime would fold into quantized weights."""
    model = _randomize_norms(small_cnn())
    x = images(16, (28, 28, 1))
    counts = {}
    for fold in (True, False):
        qmodel = qatflow.quantize_model(model, fold_batch_norm=fold)
        qatflow.calibrate(qmodel, x, num_batches=2, batch_size=8)
        path = qatflow.export_onnx(qmodel, tmp_path / f"fold_{fold}.onnx", check_data=x)
        counts[fold] = op_counts(onnx.load(path).graph.node)
    affine = ("BatchNormalization", "Mul")
    assert not any(counts[True].get(op) for op in affine)
    assert any(counts[False].get(op) for op in affine)


@pytest.fixture(scope="module")
def folded_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, np.ndarray]:
    """small_cnn with far-from-initial batch-norm statistics, folded, calibrated, exported."""
    keras.utils.set_random_seed(0)
    model = _randomize_norms(small_cnn())
    x = images(64, (28, 28, 1), seed=1)
    qmodel = qatflow.quantize_model(model)
    qatflow.calibrate(qmodel, x, num_batches=4, batch_size=16)
    path = qatflow.export_onnx(qmodel, tmp_path_factory.mktemp("fold") / "q.onnx", check_data=x)
    return onnx.load(path), x


def test_exported_biases_are_on_the_integer_kernels_grid(folded_onnx) -> None:
    """Every integer-kernel bias of the rewritten graph is already a multiple of ``s_x * s_w``:
    rounding it to int32 changes no bit, so the ideal integer engine of the graph is the graph
    itself, bit for bit (it was not before biases were quantized in Keras)."""
    from qatflow.onnx.integer_bias import round_biases_to_integer_units
    from qatflow.onnx.ort_int8 import rewrite_for_ort_int8
    from qatflow.onnx.reference import run_reference
    from qatflow.runtimes.fidelity import ideal_integer_graph

    model, x = folded_onnx
    rewritten = rewrite_for_ort_int8(model, relu="exact", requantize="none", fold_affine=True)
    rounded, count = round_biases_to_integer_units(rewritten)
    # The three Convs whose output is quantized; the two main-branch Convs feed their residual
    # Add in float, and the Dense runs as MatMul + float Add.
    assert count == 3
    assert [i.SerializeToString() for i in rounded.graph.initializer] == [
        i.SerializeToString() for i in rewritten.graph.initializer
    ]
    feeds = {model.graph.input[0].name: x}
    np.testing.assert_array_equal(
        run_reference(ideal_integer_graph(model), feeds)[0], run_reference(model, feeds)[0]
    )


@pytest.mark.parametrize("encoding", ["u8s8", "u8u8"])
def test_a_folded_model_builds_an_all_integer_engine(folded_onnx, tmp_path, encoding) -> None:
    """With batch norm folded and biases on the grid, the first (fast) rewrite passes the gate
    and every Conv runs as QLinearConv, in each encoding this CPU computes exactly."""
    from bench.ort_ops import ort_optimized_op_counts

    from qatflow.runtimes import build_engine, load_engine
    from qatflow.runtimes.cpu_int8 import detect

    model, x = folded_onnx
    source = tmp_path / "q.onnx"
    onnx.save(model, source)
    if encoding not in detect().exact:
        with pytest.raises(qatflow.errors.RuntimeBackendError, match="not exact on this CPU"):
            build_engine(source, tmp_path / "e.onnx", fidelity_data=x, encoding=encoding)
        return
    built = build_engine(source, tmp_path / "e.onnx", fidelity_data=x, encoding=encoding)
    engine = load_engine(built)
    assert engine.metadata.fidelity["passed"]
    assert engine.metadata.build_options["refused_rewrites"] == []
    ops = ort_optimized_op_counts(onnx.load(built))
    assert ops["QLinearConv"] == 5 and "Conv" not in ops
