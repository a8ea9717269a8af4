"""Calibration: set activation ranges from real data (max, percentile or MSE)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from qatflow.errors import QuantizationError
from qatflow.params import CALIBRATION_METHODS, QUANTIZE, CalibrationMethod
from qatflow.progress import progress
from qatflow.quantization import observer
from qatflow.quantization.histogram import AbsHistogram
from qatflow.quantization.wrapper import QuantizeWrapper, wrappers


@dataclass
class CalibrationResult:
    """The ranges chosen for every input quantizer, keyed ``"<layer>:<input index>"``."""

    method: str
    num_batches: int
    num_samples: int
    amax: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "method": self.method,
            "num_batches": self.num_batches,
            "num_samples": self.num_samples,
            "amax": dict(self.amax),
        }


def _batches(data: Any, batch_size: int) -> Iterator[Any]:
    if isinstance(data, np.ndarray):
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size]
        return
    if isinstance(data, tf.data.Dataset):
        data = data.as_numpy_iterator()
    for item in data:
        yield item[0] if isinstance(item, tuple | list) else item


class _Collector:
    def __init__(self, method: str) -> None:
        self.method = method
        self.maxima: dict[tuple[int, int], float] = {}
        self.histograms: dict[tuple[int, int], AbsHistogram] = {}

    def __call__(self, wrapper: QuantizeWrapper, slot: int, x: tf.Tensor) -> None:
        key = (id(wrapper), slot)
        if self.method == "max":
            self.maxima[key] = max(self.maxima.get(key, 0.0), float(tf.reduce_max(tf.abs(x))))
        else:
            self.histograms.setdefault(key, AbsHistogram()).add(x)

    def seen(self, key: tuple[int, int]) -> bool:
        return key in self.maxima or key in self.histograms

    def amax(self, key: tuple[int, int], percentile: float) -> float:
        if self.method == "max":
            return self.maxima[key]
        histogram = self.histograms[key]
        if self.method == "percentile":
            return min(histogram.percentile(percentile), histogram.maximum)
        return min(histogram.mse_optimal(), histogram.maximum)


def calibrate(
    qmodel: keras.Model,
    data: tf.data.Dataset | np.ndarray | Iterable[Any],
    method: CalibrationMethod = QUANTIZE.calibration_method,
    num_batches: int = QUANTIZE.calibration_batches,
    percentile: float = QUANTIZE.percentile,
    *,
    batch_size: int = 32,
) -> CalibrationResult:
    """Set every activation range of ``qmodel`` from ``num_batches`` batches of ``data``.

    Statistics are gathered over all batches (not the last one) with quantization turned
    off, the model in inference mode. ``max`` takes the largest |x| seen; ``percentile``
    the given percentile of |x|; ``mse`` the range minimising the quantization error.
    Weights need no calibration: they use their per-channel abs-max.
    """
    if method not in CALIBRATION_METHODS:
        raise QuantizationError(
            f"calibration method {method!r} is unknown; use one of {CALIBRATION_METHODS}"
        )
    if num_batches < 1:
        raise QuantizationError(f"num_batches must be at least 1, got {num_batches}")
    if not 0.0 < percentile <= 100.0:
        raise QuantizationError(f"percentile must be in (0, 100], got {percentile}")
    targets = wrappers(qmodel)
    if not any(w.input_indices for w in targets):
        raise QuantizationError(f"model {qmodel.name!r} has no input quantizers to calibrate")
    collector = _Collector(method)
    seen_batches = seen_samples = 0
    batches = itertools.islice(_batches(data, batch_size), num_batches)
    with observer.observing(collector):
        for batch in progress(batches, total=num_batches, desc=f"calibrate ({method})"):
            batch = np.asarray(batch, dtype=np.float32)
            if not np.isfinite(batch).all():
                raise QuantizationError(
                    f"calibration batch {seen_batches} holds NaN or Inf values; "
                    "fix the dataset or its preprocessing"
                )
            qmodel(batch, training=False)
            seen_batches += 1
            seen_samples += len(batch)
    if seen_batches == 0:
        raise QuantizationError("calibration data is empty: no batch could be read")
    result = CalibrationResult(method, seen_batches, seen_samples)
    for wrapper in targets:
        for slot, variable in enumerate(wrapper.input_amax):
            key = (id(wrapper), slot)
            if not collector.seen(key):
                raise QuantizationError(
                    f"quantizer {wrapper.quantizer_name(slot)} saw no data during calibration"
                )
            value = collector.amax(key, percentile)
            variable.assign(value)
            result.amax[wrapper.quantizer_name(slot)] = value
    return result
