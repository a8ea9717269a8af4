"""One function per pipeline step: files in, files out.

The CLI commands and the KFP components call these and nothing else, so a step behaves the
same from Python, the terminal, a pipeline run or a test. Every file is written atomically
(``qatflow.storage.atomic_output``): a failed step leaves nothing a later step could pick up.
Side files sit next to the main output and share its stem, e.g. ``q.keras`` gets
``q.placement.md``, ``q.placement.json`` and ``q.calibration.json``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qatflow.errors import DataError, RuntimeBackendError
from qatflow.storage import atomic_output, write_json

log = logging.getLogger("qatflow.steps")

PathLike = str | os.PathLike[str]
DEMO_MODEL = "demo"


def side_file(path: PathLike, suffix: str) -> Path:
    """The side file of ``path`` with ``suffix``: ``q.keras`` + ``.placement.md``."""
    main = Path(path)
    return main.with_name(main.stem + suffix)


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text``, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def load_any_model(uri: PathLike) -> Any:
    """Load a model (file, SavedModel, ``s3://``, or application name), quantized ones included."""
    from qatflow.models import load_model

    return load_model(str(uri))


def save_keras(model: Any, path: PathLike) -> Path:
    """Save a Keras model atomically (the temporary file keeps the ``.keras`` suffix)."""
    with atomic_output(path) as tmp:
        model.save(tmp)
    return Path(path)


# --- data and model ---------------------------------------------------------------------


def prepare_data(
    dataset_uri: str,
    output_path: PathLike,
    *,
    preprocessing: str = "scale01",
    batch_size: int = 64,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    calibration_size: int = 512,
    limit: int | None = None,
    seed: int = 0,
) -> Path:
    """Check that the dataset loads (first batches finite, labels in range) and write its spec.

    The spec (JSON) is what later steps pass to ``load_dataset_from_spec`` to rebuild exactly
    the same splits and preprocessing.
    """
    from qatflow.data import load_dataset, write_dataset_spec

    bundle = load_dataset(
        dataset_uri,
        preprocessing=preprocessing,
        batch_size=batch_size,
        image_size=image_size,
        channels=channels,
        calibration_size=calibration_size,
        limit=limit,
        seed=seed,
    )
    return write_dataset_spec(bundle, output_path)


def prepare_model(
    model_uri: str,
    dataset_spec: PathLike,
    output_path: PathLike,
    *,
    weights: str | None = None,
    pretrain_epochs: int = 5,
) -> Path:
    """Write the FP32 model as ``.keras``: loaded from ``model_uri``, or the demo model trained.

    ``model_uri`` is ``"demo"`` (train the demo ResNet-style model on the dataset, cached), a
    model file or SavedModel (local or ``s3://``), or a ``keras.applications`` name with an
    optional ``weights`` file. The model must match the dataset's image shape and classes.
    """
    from qatflow.data import check_model_compatible, load_dataset_from_spec

    # The trainer shuffles per (seed, epoch) itself; a fixed source order keeps resume exact.
    bundle = load_dataset_from_spec(dataset_spec, shuffle_train=False)
    if model_uri == DEMO_MODEL:
        from qatflow.training.pretrain import pretrain

        return pretrain(bundle, output_path, epochs=pretrain_epochs)
    from qatflow.models import load_model

    model = load_model(
        model_uri,
        weights=weights,
        input_shape=bundle.info.input_shape,
        num_classes=bundle.info.num_classes,
    )
    check_model_compatible(bundle.info, model)
    return save_keras(model, output_path)


# --- quantization and export ---------------------------------------------------------------


def calibration_batches(source: PathLike, *, preprocessing: str = "scale01") -> Any:
    """Calibration data from a dataset spec (``.json``), an array file (``.npy``) or a dataset URI.

    A dataset spec or URI yields its calibration split (a deterministic subset of train).
    """
    text = str(source)
    if text.endswith(".npy"):
        try:
            return np.load(text)
        except FileNotFoundError:
            raise DataError(f"calibration data {text} does not exist") from None
        except ValueError as err:
            raise DataError(f"calibration data {text} is not a .npy array: {err}") from None
    from qatflow.data import load_dataset, load_dataset_from_spec

    if text.endswith(".json"):
        return load_dataset_from_spec(text).calibration
    return load_dataset(text, preprocessing=preprocessing).calibration


@dataclass(frozen=True)
class QuantizeOutputs:
    """Files written by :func:`quantize`, and the placement summary they hold."""

    summary: Any  # PlacementSummary
    model: Path
    placement_markdown: Path
    placement_json: Path
    calibration: Path | None


def quantize(
    model_path: PathLike,
    output_path: PathLike,
    *,
    calibration_data: PathLike | None = None,
    preprocessing: str = "scale01",
    mode: str = "full",
    spec_path: PathLike | None = None,
    calibration_method: str = "max",
    calibration_batches_count: int = 16,
    percentile: float = 99.99,
    activation_range: str = "frozen",
    strict: bool = False,
) -> QuantizeOutputs:
    """Quantize a model with TensorRT-style Q/DQ, calibrate it (PTQ) and save it as ``.keras``.

    Without ``calibration_data`` the ranges stay unset: export refuses such a model until
    ``qatflow.calibrate`` has run. The placement summary is written beside the model.
    """
    import qatflow.quantization as q

    model = load_any_model(model_path)
    spec = q.QuantizationSpec.from_yaml(spec_path) if spec_path else None
    qmodel = q.quantize_model(
        model,
        mode=mode,
        spec=spec,
        strict=strict,
        activation_range=activation_range,
    )
    calibration_file = None
    if calibration_data is not None:
        data = calibration_batches(calibration_data, preprocessing=preprocessing)
        result = q.calibrate(
            qmodel,
            data,
            method=calibration_method,  # type: ignore[arg-type]
            num_batches=calibration_batches_count,
            percentile=percentile,
        )
        calibration_file = write_json(side_file(output_path, ".calibration.json"), result.to_dict())
    else:
        log.warning("no calibration data: activation ranges are unset; calibrate before export")
    summary = q.summarize(qmodel)
    saved = save_keras(qmodel, output_path)
    return QuantizeOutputs(
        summary=summary,
        model=saved,
        placement_markdown=write_text(
            side_file(output_path, ".placement.md"), summary.to_markdown() + "\n"
        ),
        placement_json=write_json(side_file(output_path, ".placement.json"), summary.to_dict()),
        calibration=calibration_file,
    )


def export(model_path: PathLike, output_path: PathLike, *, opset: int = 17) -> Path:
    """Export a ``.keras`` model (FP32 or quantized) to ONNX; the validation report goes beside."""
    from qatflow.onnx.export import export_onnx
    from qatflow.onnx.validate import validate_onnx

    path = export_onnx(load_any_model(model_path), output_path, opset=opset)
    write_json(side_file(path, ".validation.json"), validate_onnx(path).to_dict())
    return path


# --- training ------------------------------------------------------------------------------


def finetune(
    model_path: PathLike,
    dataset_spec: PathLike,
    output_path: PathLike,
    *,
    epochs: int = 2,
    learning_rate: float = 1e-3,
    optimizer: str = "sgd",
    checkpoint_dir: PathLike | None = None,
    early_stopping_patience: int | None = None,
    steps_per_epoch: int | None = None,
) -> Path:
    """QAT fine-tuning of a calibrated quantized model; the history goes beside the output."""
    from qatflow.data import load_dataset_from_spec
    from qatflow.training import finetune as run_finetune

    model = load_any_model(model_path)
    bundle = load_dataset_from_spec(dataset_spec, shuffle_train=False)
    result = run_finetune(
        model,
        bundle.train,
        bundle.validation,
        epochs=epochs,
        learning_rate=learning_rate,
        optimizer=optimizer,  # type: ignore[arg-type]
        checkpoint_dir=checkpoint_dir,
        early_stopping_patience=early_stopping_patience,
        steps_per_epoch=steps_per_epoch,
    )
    write_json(
        side_file(output_path, ".history.json"),
        {
            "history": result.history,
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy,
            "stopped_early": result.stopped_early,
        },
    )
    return save_keras(result.model, output_path)


# --- engines and evaluation ------------------------------------------------------------------


def build_engine(
    onnx_path: PathLike,
    output_path: PathLike,
    *,
    runtime: str = "onnxruntime",
    batch_profile: tuple[int, int, int] = (1, 8, 64),
    dataset_spec: PathLike | None = None,
    encoding: str = "auto",
) -> Path:
    """Build the runtime engine for an ONNX model (ONNX Runtime on CPU or TensorRT on a GPU).

    The engine is checked against the ONNX run as float math before it is written: on the
    calibration split of the dataset spec ``dataset_spec``, or without one on synthetic inputs,
    which check the integer kernels only. ``encoding`` (ONNX Runtime only): ``auto``, ``u8s8``
    or ``u8u8``.
    """
    from qatflow.data import load_dataset_from_spec
    from qatflow.runtimes import build_engine as build

    options: dict[str, Any] = {}
    if runtime == "onnxruntime":
        options["encoding"] = encoding
    elif encoding != "auto":
        raise RuntimeBackendError(f"encoding {encoding!r} applies to onnxruntime only")
    data = None if dataset_spec is None else load_dataset_from_spec(dataset_spec).calibration
    return build(
        onnx_path,
        output_path,
        runtime=runtime,  # type: ignore[arg-type]
        batch_profile=batch_profile,
        fidelity_data=data,
        **options,
    )


def evaluate(
    engine_path: PathLike,
    dataset_spec: PathLike,
    output_path: PathLike,
    *,
    reference_path: PathLike | None = None,
    latency_iterations: int = 200,
    warmup: int = 20,
    throughput_batch: int = 64,
    threads: int | None = None,
    max_batches: int | None = None,
) -> Path:
    """Evaluate an engine (or a ``.keras``/``.h5`` model) on the dataset's test split and
    write the result JSON.

    ``reference_path`` is the FP32 variant's result, for top-1 agreement.
    """
    from qatflow.data import load_dataset_from_spec
    from qatflow.evaluation import EvaluationResult
    from qatflow.evaluation import evaluate as run_evaluate

    reference = EvaluationResult.load(reference_path).predictions if reference_path else None
    result = run_evaluate(
        str(engine_path),
        load_dataset_from_spec(dataset_spec),
        reference_predictions=reference,
        latency_iterations=latency_iterations,
        warmup=warmup,
        throughput_batch=throughput_batch,
        threads=threads,
        max_batches=max_batches,
    )
    return result.save(output_path)


def compare(
    results: Mapping[str, PathLike],
    output_dir: PathLike,
    *,
    title: str = "qatflow: FP32 vs PTQ INT8 vs QAT INT8",
    placement_summary: PathLike | None = None,
) -> Path:
    """Write ``comparison.json`` and the Markdown/HTML report with plots into ``output_dir``."""
    from qatflow.comparison import compare as tabulate
    from qatflow.evaluation import EvaluationResult
    from qatflow.report import write_report

    loaded = {variant: EvaluationResult.load(path) for variant, path in results.items()}
    comparison = tabulate(loaded)
    out = Path(output_dir)
    extra = {}
    if placement_summary is not None:
        extra["Q/DQ placement"] = Path(placement_summary).read_text(encoding="utf-8")
    write_report(comparison, loaded, out, title=title, extra_sections=extra)
    return comparison.save_json(out / "comparison.json")
