"""``EvaluationResult``: everything measured about one model variant, saved as JSON."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qatflow.errors import DataError, StorageError
from qatflow.evaluation.latency import LatencyStats, ThroughputStats
from qatflow.evaluation.metrics import ClassificationMetrics
from qatflow.storage import write_json

FORMAT = "qatflow.evaluation_result"
VERSION = 1


@dataclass(frozen=True)
class EvaluationResult:
    """Accuracy, latency, throughput and size of one model on one test set.

    ``predictions`` holds this model's top-1 class per evaluated image, in dataset order, so an
    FP32 result can serve as ``reference_predictions`` for the INT8 variants. ``agreement`` is
    the fraction of images where it matches that reference (``None`` without one).

    ``fidelity`` is the engine's build-time check against its reference, the same QDQ model run
    as float math (``qatflow.runtimes.fidelity.FidelityReport.to_dict()``), and ``engine`` the
    kernels it was built for: ``encoding`` (``u8s8``/``u8u8``) and CPU ``isa``, where known.
    Both are ``None`` for Keras models and engines that recorded nothing (older results too).
    ``started_at`` and ``created_at`` (UTC, ISO 8601) bracket the evaluation; ``started_at`` is
    ``None`` in results written before it was recorded.
    """

    source: str
    runtime: str
    runtime_version: str
    device: str
    threads: int | None
    class_names: list[str]
    metrics: ClassificationMetrics
    latency: LatencyStats
    throughput: ThroughputStats
    size_bytes: int | None
    agreement: float | None
    created_at: str
    predictions: np.ndarray = field(compare=False, repr=False)
    fidelity: dict[str, Any] | None = None
    engine: dict[str, str] | None = None
    started_at: str | None = None

    @property
    def top1(self) -> float:
        """Top-1 accuracy in [0, 1]."""
        return self.metrics.top1

    @property
    def top5(self) -> float | None:
        """Top-5 accuracy in [0, 1]; ``None`` with five classes or fewer."""
        return self.metrics.top5

    @property
    def num_samples(self) -> int:
        """Number of images evaluated."""
        return self.metrics.num_samples

    @property
    def size_mb(self) -> float | None:
        """Size on disk in MB (10^6 bytes), if the model came from a file."""
        return None if self.size_bytes is None else self.size_bytes / 1e6

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (strict JSON: no NaN)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "source": self.source,
            "runtime": self.runtime,
            "runtime_version": self.runtime_version,
            "device": self.device,
            "threads": self.threads,
            "class_names": list(self.class_names),
            "metrics": self.metrics.to_dict(),
            "latency": self.latency.to_dict(),
            "throughput": self.throughput.to_dict(),
            "size_bytes": self.size_bytes,
            "agreement": self.agreement,
            "started_at": self.started_at,
            "created_at": self.created_at,
            "predictions": self.predictions.tolist(),
            "fidelity": None if self.fidelity is None else json_safe(self.fidelity),
            "engine": None if self.engine is None else dict(self.engine),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        """Inverse of :meth:`to_dict`; raises ``DataError`` for anything else.

        Results written before ``fidelity``/``engine`` existed load with both ``None``.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"not a {FORMAT} document")
        if data.get("version") != VERSION:
            raise DataError(f"{FORMAT} version {data.get('version')!r} is not {VERSION}")
        try:
            return cls(
                source=str(data["source"]),
                runtime=str(data["runtime"]),
                runtime_version=str(data["runtime_version"]),
                device=str(data["device"]),
                threads=None if data["threads"] is None else int(data["threads"]),
                class_names=[str(name) for name in data["class_names"]],
                metrics=ClassificationMetrics.from_dict(data["metrics"]),
                latency=LatencyStats.from_dict(data["latency"]),
                throughput=ThroughputStats.from_dict(data["throughput"]),
                size_bytes=None if data["size_bytes"] is None else int(data["size_bytes"]),
                agreement=None if data["agreement"] is None else float(data["agreement"]),
                created_at=str(data["created_at"]),
                started_at=None if data.get("started_at") is None else str(data["started_at"]),
                predictions=frozen_array(data["predictions"]),
                fidelity=_optional_mapping(data.get("fidelity"), "fidelity"),
                engine=_engine_provenance(data.get("engine")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed {FORMAT}: {type(exc).__name__}: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result as JSON, atomically; return the path."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EvaluationResult:
        """Read a result written by :meth:`save`."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise StorageError(f"cannot read evaluation result {path}: {exc.strerror}") from exc
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, DataError) as exc:
            raise DataError(f"{path}: {exc}") from exc


def frozen_array(values: Any) -> np.ndarray:
    """Read-only int64 copy of ``values`` (a 1-D sequence of class ids)."""
    array = np.array(values, dtype=np.int64).reshape(-1)
    array.setflags(write=False)
    return array


def json_safe(value: Any) -> Any:
    """``value`` as strict-JSON data: NaN/Inf become ``None``, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _optional_mapping(value: Any, key: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"{key} must be an object or null, got {type(value).__name__}")
    return dict(value)


def _engine_provenance(value: Any) -> dict[str, str] | None:
    mapping = _optional_mapping(value, "engine")
    return None if mapping is None else {str(k): str(v) for k, v in mapping.items()}
