"""Calibration methods, activation-range behaviour during QAT, and save/load."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from tests.model_zoo import images, small_cnn

import qatflow
from qatflow.errors import QuantizationError
from qatflow.quantization import QuantizeWrapper, summarize
from qatflow.quantization.histogram import AbsHistogram
from qatflow.quantization.wrapper import uncalibrated_quantizers


def dense_model() -> keras.Model:
    inputs = keras.Input((64,), name="x")
    outputs = keras.layers.Dense(4, name="fc")(inputs)
    return keras.Model(inputs, outputs)


def heavy_tailed(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.normal(0.0, 1.0, (256, 64)).astype(np.float32)
    data[0, 0] = 40.0  # one outlier
    return data


def input_amax(qmodel: keras.Model, name: str = "fc") -> float:
    layer = next(
        x for x in qmodel.layers if isinstance(x, QuantizeWrapper) and x.layer.name == name
    )
    return float(layer.input_amax[0].numpy())


def test_max_uses_all_batches_not_the_last():
    qmodel = qatflow.quantize_model(dense_model())
    result = qatflow.calibrate(qmodel, heavy_tailed(), method="max", num_batches=8, batch_size=32)
    assert input_amax(qmodel) == pytest.approx(40.0)
    assert result.amax["fc:0"] == pytest.approx(40.0)
    assert result.num_batches == 8 and result.num_samples == 256


def quantization_error(data: np.ndarray, amax: float) -> float:
    scale = amax / 127
    return float(((data - np.clip(np.round(data / scale), -127, 127) * scale) ** 2).sum())


def test_percentile_clips_the_outlier_and_mse_minimises_error():
    data = heavy_tailed()
    amax = {}
    for method in ("max", "percentile", "mse"):
        qmodel = qatflow.quantize_model(dense_model())
        qatflow.calibrate(
            qmodel, data, method=method, num_batches=8, batch_size=32, percentile=99.9
        )
        amax[method] = input_amax(qmodel)
    # 99.9th percentile of |N(0,1)| is about 3.3, far below the outlier at 40.
    assert 2.5 < amax["percentile"] < 5.0
    errors = {method: quantization_error(data, value) for method, value in amax.items()}
    assert errors["mse"] <= errors["max"] * 1.01
    assert errors["mse"] <= errors["percentile"] * 1.01
    # Without the outlier, MSE clips the Gaussian tail instead of keeping the full range.
    gaussian = np.random.default_rng(1).normal(0, 1, (4096, 64)).astype(np.float32)
    qmodel = qatflow.quantize_model(dense_model())
    qatflow.calibrate(qmodel, gaussian, method="mse", num_batches=8, batch_size=512)
    assert input_amax(qmodel) < np.abs(gaussian).max()


def test_histogram_percentile_and_growth():
    hist = AbsHistogram(bins=1000)
    hist.add(np.linspace(0, 1, 10001, dtype=np.float32))
    hist.add(np.linspace(0, 4, 10001, dtype=np.float32))
    assert hist.upper >= 4.0
    assert hist.counts.sum() == 20002
    # CDF(t) = (t + t/4) / 2 for t <= 1, so the median is 0.8.
    assert hist.percentile(50) == pytest.approx(0.8, abs=0.01)


def test_bad_calibration_arguments():
    qmodel = qatflow.quantize_model(dense_model())
    with pytest.raises(QuantizationError, match="method 'entropy' is unknown"):
        qatflow.calibrate(qmodel, heavy_tailed(), method="entropy")
    bad = heavy_tailed()
    bad[3, 3] = np.nan
    with pytest.raises(QuantizationError, match="batch 0 holds NaN"):
        qatflow.calibrate(qmodel, bad, num_batches=1, batch_size=32)
    with pytest.raises(QuantizationError, match="empty"):
        qatflow.calibrate(qmodel, np.zeros((0, 64), np.float32))
    assert uncalibrated_quantizers(qmodel) == ["fc:0"]


def test_calibrate_accepts_tf_data_with_labels():
    import tensorflow as tf

    x = images(16, (28, 28, 1))
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(16, np.int32))).batch(4)
    qmodel = qatflow.quantize_model(small_cnn())
    result = qatflow.calibrate(qmodel, ds, num_batches=3)
    assert result.num_batches == 3 and result.num_samples == 12
    assert uncalibrated_quantizers(qmodel) == []


def _train_step(qmodel: keras.Model, x: np.ndarray) -> None:
    qmodel.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    qmodel.fit(x, np.zeros((len(x), 4), np.float32), epochs=1, batch_size=32, verbose=0)


def test_frozen_ranges_stay_and_ema_ranges_follow_training_data():
    data = heavy_tailed()
    frozen = qatflow.quantize_model(dense_model())
    qatflow.calibrate(frozen, data, num_batches=8, batch_size=32)
    _train_step(frozen, data * 0.1)
    assert input_amax(frozen) == pytest.approx(40.0)

    ema = qatflow.quantize_model(dense_model(), activation_range="ema")
    qatflow.calibrate(ema, data, num_batches=8, batch_size=32)
    _train_step(ema, data * 0.1)
    assert input_amax(ema) < 40.0


def test_ema_initialises_from_first_batch_when_uncalibrated():
    ema = qatflow.quantize_model(dense_model(), activation_range="ema")
    _train_step(ema, np.full((32, 64), 2.0, np.float32))
    assert input_amax(ema) == pytest.approx(2.0)


def test_save_load_round_trip_and_training_resumes(tmp_path):
    x = images(32, (28, 28, 1))
    qmodel = qatflow.quantize_model(small_cnn())
    qatflow.calibrate(qmodel, x, num_batches=2, batch_size=16)
    path = tmp_path / "q.keras"
    qmodel.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x), qmodel(x), atol=1e-6)
    assert [r.__dict__ for r in summarize(loaded).rows] == [
        r.__dict__ for r in summarize(qmodel).rows
    ]
    assert uncalibrated_quantizers(loaded) == []
    loaded.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = loaded.get_layer("quant_stem_conv").layer.kernel.numpy().copy()
    loaded.fit(x, np.arange(32) % 10, epochs=1, batch_size=16, verbose=0)
    after = loaded.get_layer("quant_stem_conv").layer.kernel.numpy()
    assert np.abs(after - before).max() > 0


def test_fake_quant_output_uses_at_most_255_levels():
    qmodel = qatflow.quantize_model(dense_model())
    qatflow.calibrate(qmodel, heavy_tailed(), num_batches=8, batch_size=32)
    wrapper = qmodel.get_layer("quant_fc")
    kernel = wrapper.layer.kernel.numpy()
    from qatflow.quantization.quantizers import fake_quant_per_channel

    quantized = fake_quant_per_channel(kernel, -1).numpy()
    for channel in range(kernel.shape[1]):
        scale = np.abs(kernel[:, channel]).max() / 127
        levels = np.round(quantized[:, channel] / scale)
        np.testing.assert_allclose(levels * scale, quantized[:, channel], rtol=1e-5, atol=1e-7)
        assert np.abs(levels).max() <= 127
