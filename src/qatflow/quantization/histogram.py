"""A growing histogram of absolute values and the range choices computed from it."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from qatflow.quantization.quantizers import QMAX


class AbsHistogram:
    """Counts of |x| in ``bins`` equal bins over [0, upper]; the range grows with the data."""

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.upper = 0.0
        self.maximum = 0.0  # the largest |x| seen, exactly
        self.counts = np.zeros(bins, dtype=np.float64)

    def _grow(self, new_upper: float) -> None:
        if self.upper > 0 and self.counts.any():
            old_width = self.upper / self.bins
            centers = (np.arange(self.bins) + 0.5) * old_width
            target = np.minimum((centers / new_upper * self.bins).astype(np.int64), self.bins - 1)
            regrouped = np.zeros(self.bins, dtype=np.float64)
            np.add.at(regrouped, target, self.counts)
            self.counts = regrouped
        self.upper = new_upper

    def add(self, x: tf.Tensor) -> None:
        """Add the absolute values of ``x``."""
        values = tf.reshape(tf.abs(tf.cast(x, tf.float32)), [-1])
        batch_max = float(tf.reduce_max(values))
        self.maximum = max(self.maximum, batch_max)
        if batch_max > self.upper:
            # Grow with headroom so that slowly increasing maxima do not re-bin every batch.
            self._grow(batch_max * 1.25 if self.upper > 0 else batch_max)
        if self.upper == 0.0:
            self.counts[0] += int(tf.size(values))
            return
        counts = tf.histogram_fixed_width(values, [0.0, self.upper], nbins=self.bins)
        self.counts += counts.numpy()

    @property
    def edges(self) -> np.ndarray:
        """Upper edge of every bin."""
        return (np.arange(1, self.bins + 1)) * (self.upper / self.bins)

    def percentile(self, percent: float) -> float:
        """The smallest bin edge below which ``percent`` % of the values fall."""
        total = self.counts.sum()
        if total == 0 or self.upper == 0:
            return 0.0
        cumulative = np.cumsum(self.counts) / total
        index = int(np.searchsorted(cumulative, percent / 100.0))
        return float(self.edges[min(index, self.bins - 1)])

    def mse_optimal(self, start_bin: int = 128, stride: int = 1) -> float:
        """The range that minimises the expected quantize-dequantize squared error."""
        if self.counts.sum() == 0 or self.upper == 0:
            return 0.0
        width = self.upper / self.bins
        centers = (np.arange(self.bins) + 0.5) * width
        nonzero = self.counts > 0
        centers, counts = centers[nonzero], self.counts[nonzero]
        candidates = self.edges[min(start_bin, self.bins - 1) :: stride]
        best, best_err = float(candidates[-1]), np.inf
        for chunk in np.array_split(candidates, max(1, len(candidates) // 128)):
            scale = chunk[:, None] / QMAX
            dequantized = np.minimum(np.round(centers[None, :] / scale), QMAX) * scale
            errors = ((centers[None, :] - dequantized) ** 2 * counts[None, :]).sum(axis=1)
            i = int(np.argmin(errors))
            if errors[i] < best_err:
                best, best_err = float(chunk[i]), float(errors[i])
        return best
