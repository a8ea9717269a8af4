"""One function per pipeline step: files in, files out.

The CLI commands and the KFP components call these and nothing else, so a step behaves the
same from Python, the terminal, a pipeline run or a test. Each step first checks its inputs
exist and its output can be written (``qatflow.outputs.check_output``), before TensorFlow is
even imported; it then writes its output and side files into a staging folder, and they are
moved into place (or uploaded, for an ``s3://`` output) together only when the step succeeds:
a failed step leaves nothing a later step could pick up. Side files sit next to the main output
and share its stem, e.g. ``q.keras`` gets ``q.placement.md``, ``q.placement.json`` and
``q.calibration.json``. An output that is also the step's input is refused unless
``overwrite``.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatflow import storage
from qatflow.errors import (
    DataError,
    ModelError,
    QatflowError,
    QuantizationError,
    RuntimeBackendError,
)
from qatflow.outputs import Location, check_output, staged_outputs
from qatflow.outputs import side_location as side_file
from qatflow.params import (
    COMPARE,
    DATA,
    DEMO_MODEL,
    ENGINE,
    EVALUATE,
    EXPORT,
    FINETUNE,
    MODEL,
    QUANTIZE,
)
from qatflow.storage import atomic_output, write_json

if TYPE_CHECKING:
    from qatflow.report.provenance import RunInfo

log = logging.getLogger("qatflow.steps")

PathLike = str | os.PathLike[str]


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text``, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def require_model(uri: PathLike) -> None:
    """Fail fast, before TensorFlow loads, on a model path that is missing or a corrupt .keras.

    ``uri`` may also be an ``s3://`` URI or a ``keras.applications`` name (checked when loaded).
    """
    text = str(uri)
    if storage.is_s3_uri(text):
        storage.parse_s3_uri(text)
        return
    path = Path(text).expanduser()
    if not path.exists():
        if "/" in text or path.suffix:
            raise ModelError(f"model file not found: {text}")
        return
    if path.is_file() and path.suffix.lower() == ".keras":
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelError(
                f"{text} is not a valid Keras (.keras) file: not a readable zip archive ({exc})"
            ) from None
        if bad is not None:
            raise ModelError(
                f"{text} is corrupted: its member {bad} fails the zip CRC check; save or copy "
                "the model again"
            )


def require_file(path: PathLike | None, what: str) -> None:
    """Fail fast on a local input file that does not exist (``s3://`` URIs are fetched later)."""
    if path is None or storage.is_s3_uri(path):
        return
    local = Path(path).expanduser()
    if not local.exists():
        raise storage.StorageError(f"{what} not found: {path}")
    if local.is_dir():
        raise storage.StorageError(f"{what} {path} is a folder, not a file")


def local_input(path: PathLike, what: str) -> Path:
    """A local copy of an input file (downloaded when it is an ``s3://`` URI)."""
    require_file(path, what)
    return storage.fetch(path, storage.cache_dir("inputs"))


def save_keras(model: Any, path: PathLike) -> Path:
    """Save a Keras model atomically (the temporary file keeps the ``.keras`` suffix)."""
    with atomic_output(path) as tmp:
        model.save(tmp)
    return Path(path)


def _side_names(output: PathLike, *suffixes: str) -> list[str]:
    return [Path(side_file(Path(str(output)).name, suffix)).name for suffix in suffixes]


def _positive_int(value: object, flag: str, error: type[QatflowError]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{flag} must be an integer >= 1, got {value!r}")


# --- data and model ---------------------------------------------------------------------


def prepare_data(
    dataset_uri: str,
    output_path: PathLike,
    *,
    preprocessing: str = DATA.preprocessing,
    batch_size: int = DATA.batch_size,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    calibration_size: int = DATA.calibration_size,
    limit: int | None = DATA.limit,
    seed: int = DATA.seed,
) -> Location:
    """Check that the dataset loads (every image finite, labels in range) and write its spec.

    The spec (JSON) is what later steps pass to ``load_dataset_from_spec`` to rebuild exactly
    the same splits and preprocessing.
    """
    with staged_outputs(output_path, inputs=[dataset_uri]) as out:
        from qatflow.data import check_all_finite, load_dataset, write_dataset_spec

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
        check_all_finite(bundle)
        write_dataset_spec(bundle, out.main)
    return out.final


def prepare_model(
    model_uri: str,
    dataset_spec: PathLike,
    output_path: PathLike,
    *,
    weights: str | None = None,
    pretrain_epochs: int = MODEL.pretrain_epochs,
    overwrite: bool = False,
) -> Location:
    """Write the FP32 model as ``.keras``: loaded from ``model_uri``, or the demo model trained.

    ``model_uri`` is ``"demo"`` (train the demo ResNet-style model on the dataset, cached), a
    model file or SavedModel (local or ``s3://``), or a ``keras.applications`` name with an
    optional ``weights`` file. The model must match the dataset's image shape and classes.
    """
    from qatflow.training.config import TrainingError

    _positive_int(pretrain_epochs, "pretrain_epochs (--pretrain-epochs)", TrainingError)
    require_file(dataset_spec, "dataset spec (--dataset)")
    demo = model_uri == DEMO_MODEL
    if not demo:
        require_model(model_uri)
    require_file(weights, "weights file (--weights)")
    with staged_outputs(output_path, inputs=[model_uri, weights], overwrite=overwrite) as out:
        from qatflow.data import check_model_compatible, load_dataset_from_spec

        # The trainer shuffles per (seed, epoch) itself; a fixed source order keeps resume exact.
        bundle = load_dataset_from_spec(dataset_spec, shuffle_train=False)
        if demo:
            from qatflow.training.pretrain import pretrain

            pretrain(bundle, out.main, epochs=pretrain_epochs)
        else:
            from qatflow.models import load_model

            model = load_model(
                model_uri,
                weights=weights,
                input_shape=bundle.info.input_shape,
                num_classes=bundle.info.num_classes,
            )
            check_model_compatible(bundle.info, model)
            save_keras(model, out.main)
    return out.final


# --- quantization and export ---------------------------------------------------------------


def calibration_batches(source: PathLike, *, preprocessing: str = DATA.preprocessing) -> Any:
    """Calibration data from a dataset spec (``.json``), an array file (``.npy``) or a dataset URI.

    A dataset spec or URI yields its calibration split (a deterministic subset of train).
    """
    import numpy as np

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


def image_shape(data: Any) -> tuple[int | None, ...]:
    """The (H, W, C) of the images in calibration data (an array or batched dataset)."""
    spec = getattr(data, "element_spec", None)
    if spec is not None:
        images = spec[0] if isinstance(spec, tuple) else spec
        return tuple(images.shape[1:])
    return tuple(getattr(data, "shape", ())[1:])


@dataclass(frozen=True)
class QuantizeOutputs:
    """Files written by :func:`quantize`, and the placement summary they hold."""

    summary: Any  # PlacementSummary
    model: Location
    placement_markdown: Location
    placement_json: Location
    calibration: Location | None


QUANTIZE_SIDE_FILES = (".placement.md", ".placement.json", ".calibration.json")


def quantize(
    model_path: PathLike,
    output_path: PathLike,
    *,
    calibration_data: PathLike | None = None,
    dataset_spec: PathLike | None = None,
    preprocessing: str = DATA.preprocessing,
    mode: str = QUANTIZE.mode,
    spec_path: PathLike | None = None,
    calibration_method: str = QUANTIZE.calibration_method,
    calibration_batches_count: int = QUANTIZE.calibration_batches,
    percentile: float = QUANTIZE.percentile,
    activation_range: str = QUANTIZE.activation_range,
    strict: bool = False,
    weights: str | None = None,
    overwrite: bool = False,
) -> QuantizeOutputs:
    """Quantize a model with TensorRT-style Q/DQ, calibrate it (PTQ) and save it as ``.keras``.

    ``dataset_spec`` (a spec written by :func:`prepare_data`, whatever its file name) gives the
    calibration split instead of ``calibration_data``.
    Without either the ranges stay unset: export refuses such a model until
    ``qatflow.calibrate`` has run. The calibration images must fit the model's input, checked
    before any work. ``weights`` is a weights file for a ``keras.applications`` name. The
    placement summary is written beside the model.
    """
    require_model(model_path)
    require_file(weights, "weights file (--weights)")
    require_file(spec_path, "placement spec (--spec)")
    require_file(dataset_spec, "dataset spec")
    if calibration_data is not None and dataset_spec is not None:
        raise QuantizationError("give calibration data or a dataset spec, not both")
    if calibration_data is not None and str(calibration_data).endswith((".json", ".npy")):
        require_file(calibration_data, "calibration data (--calibration-data)")
    _positive_int(
        calibration_batches_count,
        "calibration_batches_count (--calibration-batches)",
        QuantizationError,
    )
    sides = _side_names(output_path, *QUANTIZE_SIDE_FILES)
    inputs = [model_path, weights, spec_path, calibration_data, dataset_spec]
    with staged_outputs(output_path, inputs=inputs, overwrite=overwrite, side_names=sides) as out:
        import qatflow.quantization as q
        from qatflow.data import check_input_shape
        from qatflow.models import load_model

        model = load_model(str(model_path), weights=weights)
        data = None
        if dataset_spec is not None:
            from qatflow.data import load_dataset_from_spec

            data = load_dataset_from_spec(dataset_spec).calibration
            check_input_shape(model, image_shape(data), f"dataset spec {dataset_spec}")
        elif calibration_data is not None:
            data = calibration_batches(calibration_data, preprocessing=preprocessing)
            check_input_shape(model, image_shape(data), f"calibration data {calibration_data}")
        spec = q.QuantizationSpec.from_yaml(spec_path) if spec_path else None
        qmodel = q.quantize_model(
            model, mode=mode, spec=spec, strict=strict, activation_range=activation_range
        )
        calibrated = data is not None
        if calibrated:
            result = q.calibrate(
                qmodel,
                data,
                method=calibration_method,  # type: ignore[arg-type]
                num_batches=calibration_batches_count,
                percentile=percentile,
            )
            write_json(out.side(".calibration.json"), result.to_dict())
        else:
            log.warning("no calibration data: activation ranges are unset; calibrate before export")
        summary = q.summarize(qmodel)
        write_text(out.side(".placement.md"), summary.to_markdown() + "\n")
        write_json(out.side(".placement.json"), summary.to_dict())
        save_keras(qmodel, out.main)
    return QuantizeOutputs(
        summary=summary,
        model=out.final,
        placement_markdown=side_file(out.final, ".placement.md"),
        placement_json=side_file(out.final, ".placement.json"),
        calibration=side_file(out.final, ".calibration.json") if calibrated else None,
    )


def export(
    model_path: PathLike,
    output_path: PathLike,
    *,
    opset: int = EXPORT.opset,
    dataset_spec: PathLike | None = None,
    overwrite: bool = False,
) -> Location:
    """Export a ``.keras`` model (FP32 or quantized) to ONNX; the validation report goes beside.

    The ONNX is compared with the Keras model on the calibration split of the dataset spec
    ``dataset_spec`` (synthetic inputs without one) and the verdict is stored in it.
    """
    require_model(model_path)
    require_file(dataset_spec, "dataset spec (--dataset)")
    sides = _side_names(output_path, ".validation.json")
    with staged_outputs(
        output_path, inputs=[model_path], overwrite=overwrite, side_names=sides
    ) as out:
        from qatflow.models import load_model
        from qatflow.onnx.export import export_onnx
        from qatflow.onnx.validate import validate_onnx

        data = None
        if dataset_spec is not None:
            from qatflow.data import load_dataset_from_spec

            data = load_dataset_from_spec(dataset_spec).calibration
        model = load_model(str(model_path))
        export_onnx(model, out.main, opset=opset, check_data=data)
        report = validate_onnx(out.main)
        report.path = str(out.final)
        write_json(out.side(".validation.json"), report.to_dict())
    return out.final


# --- training ------------------------------------------------------------------------------


def finetune(
    model_path: PathLike,
    dataset_spec: PathLike,
    output_path: PathLike,
    *,
    epochs: int = FINETUNE.epochs,
    learning_rate: float = FINETUNE.learning_rate,
    optimizer: str = FINETUNE.optimizer,
    checkpoint_dir: PathLike | None = None,
    resume: bool = True,
    early_stopping_patience: int | None = None,
    steps_per_epoch: int | None = FINETUNE.steps_per_epoch,
    overwrite: bool = False,
) -> Location:
    """QAT fine-tuning of a calibrated quantized model; the history goes beside the output.

    With ``checkpoint_dir`` a run resumes the checkpoint there only if it was written for the
    same model, data and settings; ``resume=False`` discards it and starts over.
    """
    require_model(model_path)
    require_file(dataset_spec, "dataset spec (--dataset)")
    sides = _side_names(output_path, ".history.json")
    with staged_outputs(
        output_path, inputs=[model_path], overwrite=overwrite, side_names=sides
    ) as out:
        from qatflow import training
        from qatflow.data import dataset_digest, load_dataset_from_spec
        from qatflow.models import load_model

        model = load_model(str(model_path))
        bundle = load_dataset_from_spec(dataset_spec, shuffle_train=False)
        result = training.finetune(
            model,
            bundle.train,
            bundle.validation,
            epochs=epochs,
            learning_rate=learning_rate,
            optimizer=optimizer,  # type: ignore[arg-type]
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            data_digest=dataset_digest(bundle.info) if checkpoint_dir is not None else None,
            early_stopping_patience=early_stopping_patience,
            steps_per_epoch=steps_per_epoch,
        )
        write_json(
            out.side(".history.json"),
            {
                "history": result.history,
                "best_epoch": result.best_epoch,
                "best_val_accuracy": result.best_val_accuracy,
                "stopped_early": result.stopped_early,
            },
        )
        save_keras(result.model, out.main)
    return out.final


# --- engines and evaluation ------------------------------------------------------------------


def build_engine(
    onnx_path: PathLike,
    output_path: PathLike,
    *,
    runtime: str = ENGINE.runtime,
    batch_profile: tuple[int, int, int] = ENGINE.batch_profile,
    dataset_spec: PathLike | None = None,
    encoding: str = ENGINE.encoding,
    overwrite: bool = False,
) -> Location:
    """Build the runtime engine for an ONNX model (ONNX Runtime on CPU or TensorRT on a GPU).

    The engine is checked against the ONNX run as float math before it is written: on the
    calibration split of the dataset spec ``dataset_spec``, or without one on synthetic inputs,
    which check the integer kernels only. ``encoding`` (ONNX Runtime only): ``auto``, ``u8s8``
    or ``u8u8``. Whatever engine an earlier build left at the output (a TensorRT sidecar and
    build log included) is replaced.
    """
    if runtime != "onnxruntime" and encoding != "auto":
        raise RuntimeBackendError(f"--encoding {encoding} applies to --runtime onnxruntime only")
    require_file(onnx_path, "ONNX model")
    require_file(dataset_spec, "dataset spec (--dataset)")
    name = Path(str(output_path)).name
    sides = [f"{name}.json", f"{name}.build-log.json"]
    with staged_outputs(
        output_path, inputs=[onnx_path], overwrite=overwrite, side_names=sides
    ) as out:
        from qatflow import runtimes

        options: dict[str, Any] = {"encoding": encoding} if runtime == "onnxruntime" else {}
        data = None
        if dataset_spec is not None:
            from qatflow.data import load_dataset_from_spec

            data = load_dataset_from_spec(dataset_spec).calibration
        runtimes.build_engine(
            local_input(onnx_path, "ONNX model"),
            out.main,
            runtime=runtime,  # type: ignore[arg-type]
            batch_profile=batch_profile,
            fidelity_data=data,
            **options,
        )
    return out.final


def evaluate(
    engine_path: PathLike,
    dataset_spec: PathLike,
    output_path: PathLike,
    *,
    reference_path: PathLike | None = None,
    latency_iterations: int = EVALUATE.latency_iterations,
    warmup: int = EVALUATE.warmup,
    throughput_batch: int = EVALUATE.throughput_batch,
    threads: int | None = None,
    max_batches: int | None = EVALUATE.max_batches,
) -> Location:
    """Evaluate an engine (or a ``.keras``/``.h5`` model) on the dataset's test split and
    write the result JSON.

    ``reference_path`` is the FP32 variant's result, for top-1 agreement.
    """
    require_file(engine_path, "engine or model")
    require_file(dataset_spec, "dataset spec (--dataset)")
    require_file(reference_path, "reference result (--reference)")
    inputs = [engine_path, dataset_spec, reference_path]
    with staged_outputs(output_path, inputs=inputs) as out:
        from qatflow import evaluation
        from qatflow.data import load_dataset_from_spec

        reference = (
            evaluation.EvaluationResult.load(reference_path).predictions if reference_path else None
        )
        result = evaluation.evaluate(
            str(engine_path),
            load_dataset_from_spec(dataset_spec),
            reference_predictions=reference,
            latency_iterations=latency_iterations,
            warmup=warmup,
            throughput_batch=throughput_batch,
            threads=threads,
            max_batches=max_batches,
        )
        result.save(out.main)
    return out.final


def compare(
    results: Mapping[str, PathLike],
    output_dir: PathLike,
    *,
    title: str = COMPARE.title,
    placement_summary: PathLike | None = None,
    accuracy_gate: float = COMPARE.accuracy_gate,
    run_info: RunInfo | None = None,
) -> Path:
    """Write ``comparison.json`` and the Markdown/HTML report with plots into ``output_dir``.

    ``accuracy_gate`` (top-1 points, ``qatflow.gate``) judges each variant against FP32;
    ``run_info`` (dataset, model, run) fills the report's provenance header.
    """
    for variant, path in results.items():
        require_file(path, f"result of variant {variant!r}")
    require_file(placement_summary, "placement summary (--placement)")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise storage.StorageError(f"report folder {out} is a file: give a folder (--output)")
    check_output(out / "comparison.json")
    from qatflow import comparison
    from qatflow.evaluation import EvaluationResult
    from qatflow.report import write_report

    loaded = {variant: EvaluationResult.load(path) for variant, path in results.items()}
    table = comparison.compare(loaded, accuracy_gate=accuracy_gate)
    extra = {}
    if placement_summary is not None:
        extra["Q/DQ placement"] = Path(placement_summary).read_text(encoding="utf-8")
    write_report(table, loaded, out, title=title, run_info=run_info, extra_sections=extra)
    return table.save_json(out / "comparison.json")
