"""The four lines users write with no calibration: quantize_model, compile, fit, save_weights.

Uncalibrated activation quantizers take their ranges from the first training batch, so the
QAT model trains like the FP32 one; in inference they refuse to run instead of giving zeros.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pytest

import qatflow
from qatflow.data import DatasetBundle, load_dataset
from qatflow.errors import ExportError, QuantizationError
from qatflow.quantization.wrapper import uncalibrated_quantizers, wrappers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def small_cnn() -> keras.Model:
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv_a")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv_b")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x), name="fashion_cnn")


@pytest.fixture(scope="module")
def fashion() -> DatasetBundle:
    return load_dataset("fashion-mnist", limit=5000, batch_size=64)


@pytest.fixture(scope="module")
def pretrained(fashion: DatasetBundle) -> tuple[keras.Model, float]:
    """A small CNN trained briefly on real Fashion-MNIST, and its test accuracy."""
    keras.utils.set_random_seed(0)
    model = small_cnn()
    model.compile(optimizer="adam", loss=LOSS, metrics=["accuracy"])
    model.fit(fashion.train, epochs=2, verbose=0)
    _, accuracy = model.evaluate(fashion.test, verbose=0)
    assert accuracy > 0.7
    return model, accuracy


def test_four_lines_train_a_live_qat_model_that_exports(
    pretrained: tuple[keras.Model, float],
    fashion: DatasetBundle,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, fp32_accuracy = pretrained
    first_images = next(iter(fashion.train))[0].numpy()

    with caplog.at_level(logging.WARNING, logger="qatflow.quantization"):
        q = qatflow.quantize_model(model)
        q.compile(optimizer=keras.optimizers.Adam(1e-4), loss=LOSS, metrics=["accuracy"])
        q.fit(fashion.train, epochs=1, verbose=0)
        q.save_weights(tmp_path / "qat.weights.h5")

    announced = [r.getMessage() for r in caplog.records if "first training batch" in r.message]
    assert len(announced) == 1, announced
    assert "3 uncalibrated activation quantizer(s) (conv_a:0, conv_b:0, logits:0)" in announced[0]
    assert uncalibrated_quantizers(q) == []
    # The model input's range is the first batch's |x| max (frozen afterwards), not +-6.
    input_range = float(wrappers(q)[0].input_amax[0].numpy())
    assert input_range == pytest.approx(float(np.abs(first_images).max()))

    _, qat_accuracy = q.evaluate(fashion.test, verbose=0)
    print(f"FP32 {fp32_accuracy:.4f}, QAT after one epoch {qat_accuracy:.4f}")
    assert qat_accuracy >= fp32_accuracy - 0.01

    restored = qatflow.quantize_model(model)
    restored.load_weights(tmp_path / "qat.weights.h5")
    x = first_images[:8]
    np.testing.assert_allclose(restored.predict(x, verbose=0), q.predict(x, verbose=0), atol=1e-5)

    path = qatflow.export_onnx(q, tmp_path / "qat.onnx")
    report = qatflow.validate_onnx(path)
    assert report.ok and len(report.quantized_ops) == 3, str(report)


def test_inference_on_uncalibrated_quantizers_raises_at_the_first_step(
    pretrained: tuple[keras.Model, float], fashion: DatasetBundle, tmp_path: Path
) -> None:
    q = qatflow.quantize_model(pretrained[0])
    q.compile(loss=LOSS, metrics=["accuracy"])
    images = next(iter(fashion.test))[0].numpy()
    expected = r"model 'fashion_cnn' has 3 uncalibrated activation quantizer\(s\) \(conv_a:0, "
    for run in (
        lambda: q.predict(images, verbose=0),
        lambda: q.evaluate(fashion.test, verbose=0),
        lambda: q(images),
    ):
        with pytest.raises(QuantizationError, match=expected) as caught:
            run()
        assert "Calibrate first" in str(caught.value)
    with pytest.raises(ExportError, match=expected):
        qatflow.export_onnx(q, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("run_eagerly", [False, True])
@pytest.mark.parametrize("activation_range", ["frozen", "ema"])
def test_first_batch_sets_the_range_then_the_policy_applies(
    activation_range: str, run_eagerly: bool, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4, kernel_initializer="identity", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden), name="two_dense")
    q = qatflow.quantize_model(model, activation_range=activation_range)
    q.compile(optimizer="sgd", loss="mse", run_eagerly=run_eagerly)
    first, second = np.full((8, 4), 0.5, np.float32), np.full((8, 4), 2.0, np.float32)
    amax = wrappers(q)[0].input_amax[0]
    with caplog.at_level(logging.WARNING, logger="qatflow.quantization"):
        q.train_on_batch(first, np.zeros((8, 2), np.float32))
        assert float(amax.numpy()) == pytest.approx(0.5)
        q.train_on_batch(second, np.zeros((8, 2), np.float32))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert (
        "model 'two_dense' has 2 uncalibrated activation quantizer(s) (hidden:0, head:0)"
        in (messages[0])
    )
    expected = 0.5 if activation_range == "frozen" else 0.99 * 0.5 + 0.01 * 2.0
    assert float(amax.numpy()) == pytest.approx(expected)
