"""Test support: a tiny real dataset and the files each pipeline step consumes.

Used by tests/ and the component tests (``components/<step>/tests``); it lives here, out of the
wheel.

``build_chain`` runs the real ``qatflow.steps`` on a small ``.npz`` dataset (untrained demo
model, few latency iterations), so component and publish tests get genuine inputs in seconds.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from kfp import dsl

from qatflow import steps

A = TypeVar("A", bound=dsl.Artifact)


def artifact(kind: type[A], path: str | os.PathLike[str], **metadata: Any) -> A:
    """A KFP artifact of ``kind`` whose ``.path`` is the local ``path``."""
    return kind(name=Path(path).name, uri=str(path), metadata=dict(metadata))


def write_npz(path: Path, *, num_classes: int = 10, size: int = 16, seed: int = 0) -> Path:
    """A small image-classification ``.npz``: 20 train and 6 test images per class."""
    rng = np.random.default_rng(seed)

    def split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(num_classes), per_class)
        noise = rng.integers(0, 60, size=(len(labels), size, size, 1))
        images = (labels[:, None, None, None] * (190 // num_classes) + noise).astype(np.uint8)
        return images, labels.astype(np.int64)

    x_train, y_train = split(20)
    x_test, y_test = split(6)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@dataclass(frozen=True)
class Chain:
    """Files of one tiny pipeline run; each model/engine lives in a folder like an artifact."""

    root: Path
    dataset: Path  # the dataset spec (JSON)
    fp32: Path  # folder with model.keras
    quantized: Path  # folder with model.keras and its placement/calibration side files
    onnx: dict[str, Path]  # folders with model.onnx, per variant
    engines: dict[str, Path]  # folders with engine.onnx, per variant
    results: dict[str, Path]  # evaluation JSON files, per variant
    report: Path  # folder with comparison.json, report.md/.html and plots


def build_chain(root: Path, *, num_classes: int = 10) -> Chain:
    """Run data -> model -> quantize -> export -> engine -> evaluate -> compare on tiny data.

    The QAT variant reuses the PTQ model (no fine-tuning): publish and compare only need
    three evaluated variants.
    """
    from qatflow.training import build_demo_model

    spec = steps.prepare_data(
        str(write_npz(root / "data.npz", num_classes=num_classes)),
        root / "dataset.json",
        batch_size=16,
        calibration_size=32,
    ).spec
    fp32 = root / "fp32"
    steps.save_keras(build_demo_model((16, 16, 1), num_classes), fp32 / "model.keras")
    quantized = root / "quantized"
    steps.quantize(
        fp32 / "model.keras",
        quantized / "model.keras",
        calibration_data=spec,
        calibration_batches_count=2,
    )
    sources = {"fp32": fp32, "ptq_int8": quantized, "qat_int8": quantized}
    onnx: dict[str, Path] = {}
    engines: dict[str, Path] = {}
    results: dict[str, Path] = {}
    for variant, source in sources.items():
        if variant == "qat_int8":  # the same model as PTQ: reuse its files
            onnx[variant], engines[variant] = onnx["ptq_int8"], engines["ptq_int8"]
        else:
            onnx[variant] = root / f"{variant}-onnx"
            steps.export(source / "model.keras", onnx[variant] / "model.onnx")
            engines[variant] = root / f"{variant}-engine"
            steps.build_engine(onnx[variant] / "model.onnx", engines[variant] / "engine.onnx")
        results[variant] = steps.evaluate(
            engines[variant] / "engine.onnx",
            spec,
            root / f"{variant}-result.json",
            reference_path=results.get("fp32"),
            latency_iterations=5,
            warmup=1,
        ).result
    report = root / "report"
    steps.compare(results, report, placement_summary=quantized / "model.placement.md")
    return Chain(root, spec, fp32, quantized, onnx, engines, results, report)
