"""Evaluation results as ``evaluate`` builds them, for the comparison, report and tracking tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from qatflow.evaluation import (
    ClassificationMetrics,
    EvaluationResult,
    LatencyStats,
    ThroughputStats,
)
from qatflow.evaluation.result import frozen_array

LABELS = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 5])  # 10 images, 6 classes


def make_result(
    predictions: Sequence[int] | np.ndarray,
    labels: np.ndarray = LABELS,
    *,
    latency_ms: Sequence[float] = (2.0, 2.0, 2.0, 4.0),
    images_per_second: float = 100.0,
    size_bytes: int | None = 4_000_000,
    runtime: str = "onnxruntime",
    threads: int | None = 2,
    num_classes: int = 6,
    fidelity: dict[str, Any] | None = None,
    engine: dict[str, str] | None = None,
) -> EvaluationResult:
    """A result as ``evaluate`` would build it from these top-1 predictions and timings."""
    top1 = np.asarray(predictions)
    top_k = np.stack([(top1 + j) % num_classes for j in range(5)], axis=1)
    return EvaluationResult(
        source=f"{runtime}-model",
        runtime=runtime,
        runtime_version="1.0",
        device="cpu",
        threads=threads,
        class_names=[f"c{i}" for i in range(num_classes)],
        metrics=ClassificationMetrics.from_top_k(top_k, labels, num_classes),
        latency=LatencyStats(
            batch_size=1, iterations=len(latency_ms), warmup=1, samples_ms=list(latency_ms)
        ),
        throughput=ThroughputStats(
            batch_size=10, iterations=5, warmup=1, total_seconds=50 / images_per_second
        ),
        size_bytes=size_bytes,
        agreement=None,
        created_at="2026-01-01T00:00:00+00:00",
        predictions=frozen_array(top1),
        fidelity=fidelity,
        engine=engine,
    )


def fidelity_report(agreement: float = 0.999, *, passed: bool = True) -> dict[str, Any]:
    """A ``FidelityReport.to_dict()`` as an engine's build-time check records it."""
    return {
        "samples": 1000,
        "agreement": agreement,
        "decided_samples": 980,
        "decided_agreement": 1.0 if passed else agreement,
        "proven_agreement": 0.99725 if passed else agreement - 0.01,
        "max_abs_error": 0.02 if passed else 3.5,
        "p99_abs_error": 0.0125 if passed else 2.25,
        "output_range": 20.0,
        "tolerance": 1.0,
        "min_agreement": 0.999,
        "beyond_tolerance": 0 if passed else 40,
        "max_beyond": 1,
        "data": "calibration images (64)",
        "passed": passed,
        "diverging_tensor": None if passed else "conv1/quant:0",
        "details": {},
    }


FP32 = [0, 0, 1, 1, 2, 2, 3, 3, 4, 0]  # 9/10 correct
PTQ = [0, 1, 1, 1, 2, 0, 3, 3, 4, 0]  # 7/10, agrees with FP32 on 8
QAT = [0, 0, 1, 1, 2, 2, 3, 3, 4, 5]  # 10/10, agrees with FP32 on 9
