"""Batch-1 latency percentiles and batched throughput, measured after warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qatflow.errors import PipelineError
from qatflow.progress import progress

RunFn = Callable[[np.ndarray], object]


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock time of single ``run`` calls, in milliseconds, one sample per timed call."""

    batch_size: int
    iterations: int
    warmup: int
    samples_ms: list[float]

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) of the samples in ms."""
        return float(np.percentile(self.samples_ms, q))

    @property
    def p50_ms(self) -> float:
        """Median latency in ms."""
        return self.percentile(50)

    @property
    def p90_ms(self) -> float:
        """90th-percentile latency in ms."""
        return self.percentile(90)

    @property
    def p99_ms(self) -> float:
        """99th-percentile latency in ms."""
        return self.percentile(99)

    @property
    def mean_ms(self) -> float:
        """Mean latency in ms."""
        return float(np.mean(self.samples_ms))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; the percentiles are included for readers and ignored on load."""
        return {
            "batch_size": self.batch_size,
            "iterations": self.iterations,
            "warmup": self.warmup,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "mean_ms": self.mean_ms,
            "samples_ms": list(self.samples_ms),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyStats:
        """Inverse of :meth:`to_dict`."""
        return cls(
            batch_size=int(data["batch_size"]),
            iterations=int(data["iterations"]),
            warmup=int(data["warmup"]),
            samples_ms=[float(v) for v in data["samples_ms"]],
        )


@dataclass(frozen=True)
class ThroughputStats:
    """Images per second over ``iterations`` back-to-back calls with ``batch_size`` images."""

    batch_size: int
    iterations: int
    warmup: int
    total_seconds: float

    @property
    def images_per_second(self) -> float:
        """Images processed per second of wall-clock time."""
        return self.batch_size * self.iterations / self.total_seconds

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``images_per_second`` is included for readers and ignored on load."""
        return {
            "batch_size": self.batch_size,
            "iterations": self.iterations,
            "warmup": self.warmup,
            "total_seconds": self.total_seconds,
            "images_per_second": self.images_per_second,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThroughputStats:
        """Inverse of :meth:`to_dict`."""
        return cls(
            batch_size=int(data["batch_size"]),
            iterations=int(data["iterations"]),
            warmup=int(data["warmup"]),
            total_seconds=float(data["total_seconds"]),
        )


def measure_latency(
    run: RunFn, inputs: Sequence[np.ndarray], *, iterations: int, warmup: int
) -> LatencyStats:
    """Time ``iterations`` calls of ``run`` (after ``warmup`` untimed ones), cycling ``inputs``."""
    check_counts(iterations, warmup)
    for i in range(warmup):
        run(inputs[i % len(inputs)])
    samples: list[float] = []
    for i in progress(range(iterations), desc="latency", total=iterations):
        batch = inputs[i % len(inputs)]
        start = time.perf_counter_ns()
        run(batch)
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return LatencyStats(
        batch_size=int(inputs[0].shape[0]), iterations=iterations, warmup=warmup, samples_ms=samples
    )


def measure_throughput(
    run: RunFn, batch: np.ndarray, *, iterations: int, warmup: int
) -> ThroughputStats:
    """Time ``iterations`` back-to-back calls of ``run(batch)`` after ``warmup`` untimed ones."""
    check_counts(iterations, warmup)
    for _ in range(warmup):
        run(batch)
    start = time.perf_counter_ns()
    for _ in progress(range(iterations), desc="throughput", total=iterations):
        run(batch)
    total = (time.perf_counter_ns() - start) / 1e9
    return ThroughputStats(
        batch_size=int(batch.shape[0]), iterations=iterations, warmup=warmup, total_seconds=total
    )


def check_counts(iterations: int, warmup: int, *, name: str = "latency_iterations") -> None:
    """Reject timing loops that would measure nothing; ``name`` is the parameter at fault."""
    if iterations < 1:
        raise PipelineError(f"{name} must be at least 1, got {iterations}")
    if warmup < 0:
        raise PipelineError(f"warmup must be 0 or more, got {warmup}")
