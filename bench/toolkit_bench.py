"""Toolkit benchmark: quantize_model and export time on ResNet50, QAT vs FP32 training step.

Targets (issue 2, on the 2-core CI machine): quantize_model under 10 s, export under 60 s,
one QAT training step at most 1.5x the FP32 step of the same model and batch. Everything is
measured side by side in one run; numbers go to bench/README.md.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("QATFLOW_NO_PROGRESS", "1")

import keras
import numpy as np
import tensorflow as tf

import qatflow

SHAPE = (224, 224, 3)
BATCH = 8


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _step_seconds(
    models: list[keras.Model], x: np.ndarray, y: np.ndarray, steps: int
) -> list[float]:
    """Median train-step time of each model, steps interleaved so load affects all alike."""
    for model in models:
        model.compile(
            optimizer=keras.optimizers.SGD(1e-3, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.train_on_batch(x, y)  # trace and warm up
        model.train_on_batch(x, y)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(steps):
        for model, samples in zip(models, times, strict=True):
            samples.append(_seconds(lambda m=model: m.train_on_batch(x, y)))
    return [statistics.median(samples) for samples in times]


def run(steps: int = 5) -> dict[str, float]:
    """Measure and print; returns the numbers."""
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, *SHAPE), dtype=np.float32)
    y = rng.integers(0, 1000, BATCH)
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    quantize_s = statistics.median(
        _seconds(lambda: qatflow.quantize_model(model)) for _ in range(3)
    )
    qmodel = qatflow.quantize_model(model)
    qatflow.calibrate(qmodel, x, num_batches=1, batch_size=BATCH)
    with tempfile.TemporaryDirectory() as tmp:
        export_s = _seconds(lambda: qatflow.export_onnx(qmodel, Path(tmp) / "r50.onnx"))
    fp32_step, qat_step = _step_seconds([model, qmodel], x, y, steps)
    numbers = {
        "quantize_model_s": quantize_s,
        "export_s": export_s,
        "fp32_step_s": fp32_step,
        "qat_step_s": qat_step,
        "qat_over_fp32": qat_step / fp32_step,
    }
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs")
    print(f"quantize_model(ResNet50): {quantize_s:6.2f} s   (target < 10 s)")
    print(f"export_onnx(ResNet50 QDQ): {export_s:6.2f} s   (target < 60 s)")
    print(
        f"train step, batch {BATCH} at 224x224: FP32 {fp32_step:.3f} s, QAT {qat_step:.3f} s, "
        f"ratio {numbers['qat_over_fp32']:.2f}x   (target <= 1.5x)"
    )
    return numbers


if __name__ == "__main__":
    run()
