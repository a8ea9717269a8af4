"""Evaluation of one model variant: accuracy metrics, latency, throughput, size."""

from qatflow.evaluation.evaluate import evaluate
from qatflow.evaluation.latency import LatencyStats, ThroughputStats
from qatflow.evaluation.metrics import ClassificationMetrics
from qatflow.evaluation.result import EvaluationResult

__all__ = [
    "ClassificationMetrics",
    "EvaluationResult",
    "LatencyStats",
    "ThroughputStats",
    "evaluate",
]
