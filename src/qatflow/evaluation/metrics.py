"""Classification metrics computed from top-k class indices: top-1/top-5, per-class, confusion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qatflow.errors import DataError

TOP_K = 5


def top_k_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """Return the ``k`` highest-scoring class indices per row, best first (ties: lower index)."""
    k = min(k, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")
    return order[:, :k].astype(np.int64)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with true classes as rows and predicted classes as columns."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class_accuracy(confusion: np.ndarray) -> list[float | None]:
    """Recall of each class (diagonal over row sum); ``None`` for a class with no samples."""
    support = confusion.sum(axis=1)
    return [
        float(confusion[i, i] / support[i]) if support[i] else None for i in range(len(support))
    ]


def agreement(predictions: np.ndarray, reference: np.ndarray, *, name: str) -> float:
    """Fraction of samples whose top-1 prediction equals ``reference`` (e.g. the FP32 model's)."""
    predictions = np.asarray(predictions)
    reference = np.asarray(reference)
    if reference.ndim != 1 or reference.shape != predictions.shape:
        raise DataError(
            f"{name}: expected {predictions.shape[0]} top-1 predictions (one per evaluated "
            f"image, in dataset order), got an array of shape {reference.shape}"
        )
    if predictions.size == 0:
        raise DataError(f"{name}: no predictions to compare")
    return float(np.mean(predictions == reference))


@dataclass(frozen=True)
class ClassificationMetrics:
    """Accuracy metrics of one model on one labelled dataset.

    ``top5`` is ``None`` when the task has five classes or fewer: every label is then in the
    top five, so the number would always be 1.0 and carry no information.
    """

    num_samples: int
    top1: float
    top5: float | None
    per_class_accuracy: list[float | None]
    confusion_matrix: list[list[int]]

    @property
    def num_classes(self) -> int:
        """Number of classes (rows of the confusion matrix)."""
        return len(self.confusion_matrix)

    @classmethod
    def from_top_k(
        cls, top_k: np.ndarray, labels: np.ndarray, num_classes: int
    ) -> ClassificationMetrics:
        """Compute metrics from ``(N, k)`` best-first class indices and ``(N,)`` labels."""
        if top_k.shape[0] != labels.shape[0] or top_k.ndim != 2:
            raise ValueError(f"top_k shape {top_k.shape} does not match labels {labels.shape}")
        if labels.size == 0:
            raise DataError("no samples to compute accuracy on")
        hits = top_k == labels[:, None]
        top5 = float(hits[:, :TOP_K].any(axis=1).mean()) if num_classes > TOP_K else None
        confusion = confusion_matrix(labels, top_k[:, 0], num_classes)
        return cls(
            num_samples=int(labels.size),
            top1=float(hits[:, 0].mean()),
            top5=top5,
            per_class_accuracy=per_class_accuracy(confusion),
            confusion_matrix=confusion.tolist(),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "num_samples": self.num_samples,
            "top1": self.top1,
            "top5": self.top5,
            "per_class_accuracy": list(self.per_class_accuracy),
            "confusion_matrix": [list(row) for row in self.confusion_matrix],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassificationMetrics:
        """Inverse of :meth:`to_dict`."""
        return cls(
            num_samples=int(data["num_samples"]),
            top1=float(data["top1"]),
            top5=None if data["top5"] is None else float(data["top5"]),
            per_class_accuracy=[
                None if value is None else float(value) for value in data["per_class_accuracy"]
            ],
            confusion_matrix=[[int(v) for v in row] for row in data["confusion_matrix"]],
        )
