"""``evaluate``: accuracy pass over the test set, then latency and throughput on its images."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qatflow.errors import DataError, ModelError, PipelineError
from qatflow.evaluation.latency import check_counts, measure_latency, measure_throughput
from qatflow.evaluation.metrics import TOP_K, ClassificationMetrics, agreement, top_k_indices
from qatflow.evaluation.predictors import Predictor, Shape, make_predictor
from qatflow.evaluation.result import EvaluationResult, frozen_array
from qatflow.params import EVALUATE
from qatflow.progress import progress

log = logging.getLogger("qatflow.evaluation")


def evaluate(
    model_or_engine: Any,
    dataset: Any,
    *,
    class_names: Sequence[str] | None = None,
    reference_predictions: Sequence[int] | np.ndarray | None = None,
    latency_iterations: int = EVALUATE.latency_iterations,
    warmup: int = EVALUATE.warmup,
    throughput_batch: int = EVALUATE.throughput_batch,
    throughput_iterations: int | None = None,
    threads: int | None = None,
    max_batches: int | None = None,
    model_file: str | os.PathLike[str] | None = None,
) -> EvaluationResult:
    """Measure accuracy, batch-1 latency, throughput and size of one model variant.

    ``model_or_engine`` is a Keras model, a ``qatflow.runtimes`` engine, or the path of an
    engine file or a ``.keras``/``.h5`` model.
    ``dataset`` is a ``DatasetBundle`` (its ``.test`` split and ``.info`` are used) or any
    iterable of ``(images NHWC, int labels)`` batches. Its order must be deterministic so that
    ``reference_predictions`` (the FP32 model's ``result.predictions``) line up image by image.
    Latency is timed on real test images after ``warmup`` untimed calls; throughput runs
    ``throughput_iterations`` (default ``latency_iterations // 10``) batches of
    ``throughput_batch`` images after ``ceil(warmup / 10)`` untimed ones. ``model_file`` names
    the file whose size is reported for an in-memory Keras model.
    """
    started_at = _utc_now()
    if throughput_iterations is None:
        throughput_iterations = max(1, latency_iterations // 10)
    _check_parameters(latency_iterations, warmup, throughput_batch, threads, max_batches)
    check_counts(throughput_iterations, 0, name="throughput_iterations")
    predictor = make_predictor(model_or_engine, threads=threads, model_file=model_file)
    batches, names = _dataset_parts(dataset, class_names)
    latency_batch = predictor.fixed_batch or 1
    throughput_batch = predictor.fixed_batch or throughput_batch

    scan = _accuracy_pass(
        predictor,
        batches,
        names,
        max_batches=max_batches,
        pool_size=max(throughput_batch, latency_batch),
    )
    num_classes = len(scan.class_names)
    metrics = ClassificationMetrics.from_top_k(scan.top_k, scan.labels, num_classes)
    predictions = frozen_array(scan.top_k[:, 0])
    match = None
    if reference_predictions is not None:
        reference = np.asarray(reference_predictions)
        match = agreement(predictions, reference, name="reference_predictions")

    single_count = max(1, len(scan.pool) // latency_batch)
    single_inputs = _cyclic_batches(scan.pool, latency_batch, single_count)
    latency = measure_latency(
        predictor.run, single_inputs, iterations=latency_iterations, warmup=warmup
    )
    throughput = measure_throughput(
        predictor.run,
        _cyclic_batches(scan.pool, throughput_batch, 1)[0],
        iterations=throughput_iterations,
        warmup=-(-warmup // 10),
    )
    result = EvaluationResult(
        source=predictor.source,
        runtime=predictor.runtime,
        runtime_version=predictor.runtime_version,
        device=predictor.device,
        threads=predictor.threads,
        class_names=scan.class_names,
        metrics=metrics,
        latency=latency,
        throughput=throughput,
        size_bytes=predictor.size_bytes,
        agreement=match,
        started_at=started_at,
        created_at=_utc_now(),
        predictions=predictions,
        fidelity=predictor.fidelity,
        engine=predictor.engine,
    )
    log.info(
        "%s: top-1 %.4f on %d images, p50 %.3f ms, %.1f images/s (%s %s, %s threads)",
        result.source,
        result.top1,
        result.num_samples,
        latency.p50_ms,
        throughput.images_per_second,
        result.runtime,
        result.runtime_version,
        result.threads,
    )
    if result.fidelity is not None and result.fidelity.get("passed") is False:
        log.warning(
            "%s failed its build-time fidelity check (top-1 agreement %s with the same QDQ "
            "model run as float math): its accuracy reflects the kernels, not the model",
            result.source,
            _percent(result.fidelity.get("agreement")),
        )
    return result


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, int | float) else "unknown"


@dataclass(frozen=True)
class _Scan:
    top_k: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    pool: np.ndarray


def _accuracy_pass(
    predictor: Predictor,
    batches: Iterable[Any],
    class_names: list[str] | None,
    *,
    max_batches: int | None,
    pool_size: int,
) -> _Scan:
    """Run every batch once, checking shapes and values; keep top-k indices and a few images."""
    top_k: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    pool: list[np.ndarray] = []
    pooled = 0
    limited = itertools.islice(batches, max_batches)
    total = max_batches or _length(batches)
    for index, batch in enumerate(progress(limited, desc="evaluate", total=total)):
        images, batch_labels = _split_batch(index, batch)
        _check_images(index, images, predictor.input_shape)
        logits = np.asarray(predictor.run(images))
        if index == 0:
            class_names = _check_outputs(predictor, logits, class_names)
        assert class_names is not None
        _check_logits(index, logits, images.shape[0], len(class_names), predictor.source)
        _check_labels(index, batch_labels, images.shape[0], len(class_names))
        top_k.append(top_k_indices(logits, TOP_K))
        labels.append(batch_labels.astype(np.int64))
        if pooled < pool_size:
            pool.append(images[: pool_size - pooled])
            pooled += pool[-1].shape[0]
    if not top_k or class_names is None:
        raise DataError("dataset is empty: it yielded no test batches")
    return _Scan(
        top_k=np.concatenate(top_k),
        labels=np.concatenate(labels),
        class_names=class_names,
        pool=np.concatenate(pool),
    )


def _dataset_parts(
    dataset: Any, class_names: Sequence[str] | None
) -> tuple[Iterable[Any], list[str] | None]:
    """The test batches and the class names (``None`` = take the count from the model)."""
    names = None if class_names is None else [str(name) for name in class_names]
    if hasattr(dataset, "test") and hasattr(dataset, "info"):
        info_names = [str(name) for name in getattr(dataset.info, "class_names", None) or []]
        num_classes = int(dataset.info.num_classes)
        if names is not None and len(names) != num_classes:
            raise DataError(
                f"class_names has {len(names)} entries but the dataset info declares "
                f"{num_classes} classes"
            )
        names = names or info_names or [str(i) for i in range(num_classes)]
        return dataset.test, names
    return dataset, names


def _split_batch(index: int, batch: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise DataError(
            f"dataset batch {index} is not an (images, labels) pair: {type(batch).__name__}"
        )
    images, labels = batch
    return np.asarray(images, dtype=np.float32), np.asarray(labels)


def _check_images(index: int, images: np.ndarray, expected: Shape | None) -> None:
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(
            f"dataset batch {index}: images have shape {images.shape}, expected a non-empty "
            f"NHWC batch"
        )
    if expected is not None:
        wanted = expected[1:]
        got = images.shape[1:]
        if len(wanted) != len(got) or any(
            w is not None and w != g for w, g in zip(wanted, got, strict=True)
        ):
            raise DataError(
                f"dataset batch {index}: image shape {tuple(got)} does not match the model "
                f"input shape {tuple(wanted)} (HWC; None = any)"
            )
    if not np.isfinite(images).all():
        bad = np.flatnonzero(~np.isfinite(images).reshape(images.shape[0], -1).all(axis=1))
        raise DataError(
            f"dataset batch {index}: images contain NaN or Inf "
            f"(positions {bad[:5].tolist()} within the batch)"
        )


def _check_outputs(
    predictor: Predictor, logits: np.ndarray, class_names: list[str] | None
) -> list[str]:
    """Match the model's class count to the dataset's; return the class names to use."""
    if logits.ndim != 2:
        raise ModelError(f"{predictor.source}: output shape {logits.shape} is not (batch, classes)")
    outputs = logits.shape[1]
    if class_names is None:
        return [str(i) for i in range(outputs)]
    if outputs != len(class_names):
        raise DataError(
            f"{predictor.source} outputs {outputs} classes but the dataset has "
            f"{len(class_names)} classes"
        )
    return class_names


def _check_logits(index: int, logits: np.ndarray, rows: int, classes: int, source: str) -> None:
    if logits.shape != (rows, classes):
        raise ModelError(
            f"{source}: output shape {logits.shape} for dataset batch {index}, "
            f"expected {(rows, classes)}"
        )
    if not np.isfinite(logits).all():
        raise ModelError(f"{source}: produced NaN or Inf outputs on dataset batch {index}")


def _check_labels(index: int, labels: np.ndarray, rows: int, classes: int) -> None:
    if labels.shape != (rows,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"dataset batch {index}: labels have shape {labels.shape} and dtype {labels.dtype}, "
            f"expected ({rows},) integer class ids"
        )
    outside = labels[(labels < 0) | (labels >= classes)]
    if outside.size:
        raise DataError(
            f"dataset batch {index}: label {int(outside[0])} is outside the {classes} classes "
            f"[0, {classes - 1}]"
        )


def _cyclic_batches(pool: np.ndarray, size: int, count: int) -> list[np.ndarray]:
    """``count`` contiguous batches of ``size`` images taken in turn from ``pool`` (wrapping)."""
    return [pool[(start * size + np.arange(size)) % len(pool)] for start in range(count)]


def _length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_parameters(
    latency_iterations: int,
    warmup: int,
    throughput_batch: int,
    threads: int | None,
    max_batches: int | None,
) -> None:
    check_counts(latency_iterations, warmup)
    if throughput_batch < 1:
        raise PipelineError(f"throughput_batch must be at least 1, got {throughput_batch}")
    if threads is not None and threads < 1:
        raise PipelineError(f"threads must be at least 1, got {threads}")
    if max_batches is not None and max_batches < 1:
        raise PipelineError(f"max_batches must be at least 1, got {max_batches}")


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
