"""A trained model: the exported INT8 ONNX agrees with the Keras QDQ model and with FP32.

Random-weight networks amplify every int8 rounding flip (see test_applications.py); a
trained network does not, so this is where agreement numbers mean something.
"""

from __future__ import annotations

import keras
import numpy as np
import onnx
import pytest
from tests.model_zoo import small_cnn

import qatflow
import qatflow.errors
from qatflow.data import load_dataset
from qatflow.onnx.reference import run_reference
from qatflow.runtimes import build_engine, load_engine
from qatflow.runtimes.cpu_int8 import detect
from qatflow.runtimes.fidelity import compare_outputs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(0)
    data = load_dataset("fashion-mnist", batch_size=64, limit=6000, calibration_size=256)
    model = small_cnn()
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(data.train, epochs=2, verbose=0)
    x = np.concatenate([images for images, _ in data.test.take(16)])
    y = np.concatenate([labels for _, labels in data.test.take(16)])
    return model, data, x, y


def test_int8_onnx_agrees_with_keras_qdq_and_fp32(trained, tmp_path):
    model, data, x, y = trained
    qmodel = qatflow.quantize_model(model)
    qatflow.calibrate(qmodel, data.calibration, method="percentile", num_batches=4)
    path = qatflow.export_onnx(qmodel, tmp_path / "trained_int8.onnx")
    onnx_logits = run_reference(onnx.load(path), {"image": x})[0]
    qdq_logits = qmodel.predict(x, verbose=0)
    fp32_logits = model.predict(x, verbose=0)

    max_abs_diff = np.abs(onnx_logits - qdq_logits).max()
    agreement_qdq = (onnx_logits.argmax(1) == qdq_logits.argmax(1)).mean()
    agreement_fp32 = (onnx_logits.argmax(1) == fp32_logits.argmax(1)).mean()
    accuracy = {
        "fp32": (fp32_logits.argmax(1) == y).mean(),
        "int8_onnx": (onnx_logits.argmax(1) == y).mean(),
    }
    print(
        f"{len(x)} images: max|onnx-keras_qdq| {max_abs_diff:.3g} "
        f"(logit range {np.abs(qdq_logits).max():.3g}), top-1 agreement with Keras QDQ "
        f"{agreement_qdq:.4f}, with FP32 {agreement_fp32:.4f}, accuracy {accuracy}"
    )
    # Measured on 1024 test images: top-1 agreement with the Keras QDQ model 1.0, max abs
    # difference 0.02 for a logit range of 10; PTQ INT8 agrees with FP32 on 97-98%.
    assert agreement_qdq >= 0.995
    assert max_abs_diff <= 0.05 * np.abs(qdq_logits).max()
    assert agreement_fp32 >= 0.96
    assert abs(accuracy["fp32"] - accuracy["int8_onnx"]) <= 0.02


@pytest.mark.parametrize("encoding", ["u8s8", "u8u8"])
def test_int8_engine_matches_its_reference_in_each_exact_encoding(trained, tmp_path, encoding):
    """The engine of a trained model against the QDQ ONNX run as float math, on held-out images
    (the build checked it on calibration images). An encoding this CPU does not compute exactly
    is refused at build time instead."""
    model, data, x, _ = trained
    qmodel = qatflow.quantize_model(model)
    qatflow.calibrate(qmodel, data.calibration, method="percentile", num_batches=4)
    path = qatflow.export_onnx(qmodel, tmp_path / "int8.onnx")
    try:
        built = build_engine(
            path, tmp_path / "e.onnx", fidelity_data=data.calibration, encoding=encoding
        )
    except qatflow.errors.RuntimeBackendError as exc:
        # Only where this CPU's kernels for the encoding saturate, before any work.
        assert encoding not in detect().exact, exc
        assert "not exact on this CPU" in str(exc)
        return
    engine = load_engine(built)
    assert engine.metadata.build_options["encoding"] == encoding
    assert engine.metadata.fidelity["passed"]
    report = compare_outputs(
        run_reference(onnx.load(path), {"image": x})[0], engine.run(x), data="test"
    )
    print(report.summary())
    assert report.passed
