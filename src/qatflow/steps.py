"""One function per pipeline step: files in, files out, and a typed record of what came out.

The CLI commands and the KFP components call these and nothing else, so a step behaves the
same from Python, the terminal, a pipeline run or a test. Each step returns a small frozen
dataclass (``PrepareDataOutputs``, ``QuantizeOutputs``, ...): where its files went plus the
metadata its callers use (the dataset info, the validation report, the training history, the
evaluation, the comparison, the gate's verdict), so no caller reads a side file back.

Each step first checks its inputs exist and its output can be written
(``qatflow.outputs.check_output``), before TensorFlow is even imported; it then writes its
output and side files into a staging folder, and they are moved into place (or uploaded, for
an ``s3://`` output) together only when the step succeeds: a failed step leaves nothing a later
step could pick up. Side files sit next to the main output and share its stem, e.g. ``q.keras``
gets ``q.placement.md``, ``q.placement.json`` and ``q.calibration.json``. An output that is
also the step's input is refused unless ``overwrite``.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qatflow import storage
from qatflow.errors import (
    DataError,
    ModelError,
    PipelineError,
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
    PUBLISH,
    QUANTIZE,
    RUNTIMES,
)
from qatflow.storage import atomic_output, write_json

if TYPE_CHECKING:
    from qatflow.comparison import Comparison
    from qatflow.data import DatasetInfo
    from qatflow.evaluation import EvaluationResult
    from qatflow.onnx.validate import ValidationReport
    from qatflow.quantization import PlacementSummary
    from qatflow.report import ReportFiles
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


# --- input checks --------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedInputs:
    """What :func:`check_inputs` found: each input and where it resolved.

    ``model_source``: ``demo``, ``local``, ``s3`` or ``keras.applications``;
    ``dataset_source``: ``builtin``, ``local`` or ``s3``.
    """

    model_uri: str
    model_source: str
    dataset_uri: str
    dataset_source: str
    s3_prefix: str | None
    spec: str | None


def check_inputs(
    model_uri: str,
    dataset_uri: str,
    *,
    s3_prefix: str | None = PUBLISH.s3_prefix,
    spec_path: str | None = QUANTIZE.spec,
) -> CheckedInputs:
    """Check that the model, dataset and placement spec resolve and ``s3_prefix`` is writable.

    The pipeline's first task: it fails in seconds on what a run would otherwise trip over
    late. Cheap checks only: S3 objects are listed, not downloaded; a local path (or glob) must
    exist; a ``keras.applications`` name is built untrained (seconds). Raises a
    ``QatflowError`` naming the parameter or bucket at fault.
    """
    dataset_source = _check_dataset_uri(dataset_uri)
    model_source = _check_model_uri(model_uri)
    if spec_path:
        if storage.is_s3_uri(spec_path):
            _check_s3_object(spec_path, "placement spec")
        else:
            require_file(spec_path, "placement spec")
    if s3_prefix:
        _list_s3(s3_prefix)  # credentials, endpoint, bucket and access, before any work
    return CheckedInputs(
        model_uri=model_uri,
        model_source=model_source,
        dataset_uri=dataset_uri,
        dataset_source=dataset_source,
        s3_prefix=s3_prefix or None,
        spec=spec_path or None,
    )


def _check_dataset_uri(uri: str) -> str:
    from qatflow.data.sources import is_builtin

    if not uri:
        raise DataError("dataset_uri is empty: pass fashion-mnist, a path or an s3:// URI")
    if is_builtin(uri):
        return "builtin"
    if storage.is_s3_uri(uri):
        _check_s3_object(uri, "dataset_uri")
        return "s3"
    path = os.path.expanduser(uri)
    if not (os.path.exists(path) or glob.glob(path)):
        raise DataError(
            f"dataset_uri {uri} not found: not a built-in dataset name (fashion-mnist), and no "
            "file, folder or TFRecord glob matches it"
        )
    return "local"


def _check_model_uri(uri: str) -> str:
    if not uri:
        raise PipelineError("model_uri is empty: pass demo, a model file, an s3:// URI or a name")
    if uri == DEMO_MODEL:
        return "demo"
    if Path(uri).expanduser().exists():
        return "local"
    if storage.is_s3_uri(uri):
        _check_s3_object(uri, "model_uri")
        return "s3"
    from qatflow.models import load_model

    load_model(uri)  # a keras.applications name is built untrained; anything else raises
    return "keras.applications"


def _list_s3(uri: str) -> int:
    """How many objects (0 or 1) start with the key of ``uri``; S3 errors name the bucket."""
    bucket, key = storage.parse_s3_uri(uri)
    with storage._s3_errors(bucket, key):
        page = storage.s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    return int(page.get("KeyCount", 0))


def _check_s3_object(uri: str, parameter: str) -> None:
    if not _list_s3(uri):
        raise DataError(f"{parameter} {uri} not found: no object under that key")


# --- data and model ---------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareDataOutputs:
    """The dataset spec :func:`prepare_data` wrote, and what it holds."""

    spec: Location
    info: DatasetInfo


def prepare_data(
    dataset_uri: str,
    output_path: PathLike,
    *,
    preprocessing: str = DATA.preprocessing,
    batch_size: int = DATA.batch_size,
    image_size: tuple[int, int] | None = DATA.image_size,
    channels: int | None = None,
    calibration_size: int = DATA.calibration_size,
    limit: int | None = DATA.limit,
    seed: int = DATA.seed,
) -> PrepareDataOutputs:
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
    return PrepareDataOutputs(spec=out.final, info=bundle.info)


@dataclass(frozen=True)
class PrepareModelOutputs:
    """The FP32 ``.keras`` model :func:`prepare_model` wrote; ``demo``: the demo model trained."""

    model: Location
    demo: bool


def prepare_model(
    model_uri: str,
    dataset_spec: PathLike,
    output_path: PathLike,
    *,
    weights: str | None = None,
    pretrain_epochs: int = MODEL.pretrain_epochs,
    overwrite: bool = False,
) -> PrepareModelOutputs:
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
    return PrepareModelOutputs(model=out.final, demo=demo)


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
    """Files written by :func:`quantize`, and the placement summary they hold.

    ``calibration`` (the ranges' JSON) is None when no calibration data was given.
    """

    summary: PlacementSummary
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
    spec_path: PathLike | None = QUANTIZE.spec,
    calibration_method: str = QUANTIZE.calibration_method,
    calibration_batches_count: int = QUANTIZE.calibration_batches,
    percentile: float = QUANTIZE.percentile,
    activation_range: str = QUANTIZE.activation_range,
    fold_batch_norm: bool = QUANTIZE.fold_batch_norm,
    runtime: str = QUANTIZE.runtime,
    strict: bool = False,
    weights: str | None = None,
    overwrite: bool = False,
) -> QuantizeOutputs:
    """Quantize a model with TensorRT-style Q/DQ, calibrate it (PTQ) and save it as ``.keras``.

    ``dataset_spec`` (a spec written by :func:`prepare_data`, whatever its file name) gives the
    calibration split instead of ``calibration_data``.
    Without either the ranges stay unset: export refuses such a model until
    ``qatflow.calibrate`` has run. The calibration images must fit the model's input, checked
    before any work. ``weights`` is a weights file for a ``keras.applications`` name.
    ``runtime`` is the engine runtime the placement is for. The placement summary is written
    beside the model.
    """
    if runtime not in RUNTIMES:
        raise QuantizationError(
            f"runtime (--runtime) must be one of {list(RUNTIMES)}, got {runtime!r}"
        )
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
        spec = (
            q.QuantizationSpec.from_yaml(local_input(spec_path, "placement spec (--spec)"))
            if spec_path
            else None
        )
        qmodel = q.quantize_model(
            model,
            mode=mode,
            spec=spec,
            strict=strict,
            activation_range=activation_range,
            fold_batch_norm=fold_batch_norm,
            runtime=runtime,
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


@dataclass(frozen=True)
class ExportOutputs:
    """The ONNX file :func:`export` wrote, its validation and its ONNX-vs-Keras check.

    ``report`` is what ``validation`` holds (TensorRT's rules: ``ok``, ``qdq_nodes``, ...);
    ``check`` is the record stored in the ONNX file (``qatflow.onnx.parity``), None if absent.
    """

    onnx: Location
    validation: Location
    report: ValidationReport
    check: dict[str, Any] | None


def export(
    model_path: PathLike,
    output_path: PathLike,
    *,
    opset: int = EXPORT.opset,
    dataset_spec: PathLike | None = None,
    overwrite: bool = False,
) -> ExportOutputs:
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
        import onnx

        from qatflow.models import load_model
        from qatflow.onnx.export import export_onnx
        from qatflow.onnx.parity import read_export_check
        from qatflow.onnx.validate import validate_onnx

        data = None
        if dataset_spec is not None:
            from qatflow.data import load_dataset_from_spec

            data = load_dataset_from_spec(dataset_spec).calibration
        model = load_model(str(model_path))
        export_onnx(model, out.main, opset=opset, check_data=data)
        written = onnx.load(str(out.main))  # once: validated, and its stored check read
        report = validate_onnx(written)
        report.path = str(out.final)
        write_json(out.side(".validation.json"), report.to_dict())
        check = read_export_check(written)
    return ExportOutputs(
        onnx=out.final,
        validation=side_file(out.final, ".validation.json"),
        report=report,
        check=check,
    )


# --- training ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneOutputs:
    """The model :func:`finetune` wrote and how training went (what ``history_file`` holds).

    ``history`` maps ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy`` and
    ``learning_rate`` to one value per epoch; ``best_epoch`` is 1-based (0 if none ran).
    """

    model: Location
    history_file: Location
    history: dict[str, list[float]]
    best_epoch: int
    best_val_accuracy: float
    stopped_early: bool


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
) -> FinetuneOutputs:
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
    return FinetuneOutputs(
        model=out.final,
        history_file=side_file(out.final, ".history.json"),
        history=result.history,
        best_epoch=result.best_epoch,
        best_val_accuracy=result.best_val_accuracy,
        stopped_early=result.stopped_early,
    )


# --- engines and evaluation ------------------------------------------------------------------


@dataclass(frozen=True)
class EngineOutputs:
    """The engine :func:`build_engine` wrote (checked against its ONNX), for ``runtime``."""

    engine: Location
    runtime: str
    batch_profile: tuple[int, int, int]


def build_engine(
    onnx_path: PathLike,
    output_path: PathLike,
    *,
    runtime: str = ENGINE.runtime,
    batch_profile: tuple[int, int, int] = ENGINE.batch_profile,
    dataset_spec: PathLike | None = None,
    encoding: str = ENGINE.encoding,
    fidelity_samples: int = ENGINE.fidelity_samples,
    overwrite: bool = False,
) -> EngineOutputs:
    """Build the runtime engine for an ONNX model (ONNX Runtime on CPU or TensorRT on a GPU).

    The engine is checked against the ONNX run as float math before it is written, on
    ``fidelity_samples`` images of the dataset spec ``dataset_spec`` (see
    :func:`fidelity_data`), or without one on synthetic inputs, which check the integer
    kernels only. ``encoding`` (ONNX Runtime only): ``auto``, ``u8s8`` or ``u8u8``. Whatever
    engine an earlier build left at the output (a TensorRT sidecar and build log included) is
    replaced.
    """
    if runtime != "onnxruntime" and encoding != "auto":
        raise RuntimeBackendError(f"--encoding {encoding} applies to --runtime onnxruntime only")
    require_file(onnx_path, "ONNX model")
    require_file(dataset_spec, "dataset spec (--dataset)")
    from qatflow import runtimes
    from qatflow.runtimes.fidelity import check_sample_count

    check_sample_count(fidelity_samples)
    name = Path(str(output_path)).name
    sides = [f"{name}.json", f"{name}.build-log.json"]
    with staged_outputs(
        output_path, inputs=[onnx_path], overwrite=overwrite, side_names=sides
    ) as out:
        options: dict[str, Any] = {"encoding": encoding} if runtime == "onnxruntime" else {}
        runtimes.build_engine(
            local_input(onnx_path, "ONNX model"),
            out.main,
            runtime=runtime,  # type: ignore[arg-type]
            batch_profile=batch_profile,
            fidelity_data=None if dataset_spec is None else fidelity_data(dataset_spec),
            fidelity_samples=fidelity_samples,
            fidelity_source=fidelity_source(dataset_spec),
            **options,
        )
    low, opt, high = batch_profile
    return EngineOutputs(engine=out.final, runtime=runtime, batch_profile=(low, opt, high))


def fidelity_source(dataset_spec: PathLike | None) -> str:
    """What the engine's fidelity record calls :func:`fidelity_data`'s batches.

    The spec's file name only: a report must not show the machine's paths.
    """
    from qatflow.runtimes.fidelity import GIVEN_DATA

    if dataset_spec is None:
        return GIVEN_DATA
    return f"the validation, then calibration split of {Path(str(dataset_spec)).name}"


def fidelity_data(dataset_spec: PathLike) -> Iterator[Any]:
    """The batches an engine is checked on: the validation split, then the calibration split.

    Held-out images first: they stand for the data the engine will serve, which neither the
    weights nor the quantization ranges were fitted to; the calibration images top the check
    up when the validation split is short (``build_engine`` takes as many as it needs).
    """
    from qatflow.data import load_dataset_from_spec

    bundle = load_dataset_from_spec(dataset_spec)
    return itertools.chain(bundle.validation, bundle.calibration)


@dataclass(frozen=True)
class EvaluateOutputs:
    """The result JSON :func:`evaluate` wrote, and the evaluation it holds."""

    result: Location
    evaluation: EvaluationResult


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
) -> EvaluateOutputs:
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
    return EvaluateOutputs(result=out.final, evaluation=result)


@dataclass(frozen=True)
class CompareOutputs:
    """What :func:`compare` wrote: ``comparison.json`` (``comparison``) and the report."""

    comparison_json: Path
    comparison: Comparison
    report: ReportFiles


def compare(
    results: Mapping[str, PathLike],
    output_dir: PathLike,
    *,
    title: str = COMPARE.title,
    placement_summary: PathLike | None = None,
    accuracy_gate: float = COMPARE.accuracy_gate,
    run_info: RunInfo | None = None,
    dataset_spec: PathLike | None = None,
) -> CompareOutputs:
    """Write ``comparison.json`` and the Markdown/HTML report with plots into ``output_dir``.

    ``accuracy_gate`` (top-1 points, ``qatflow.gate``) judges each variant against FP32;
    ``run_info`` (dataset, model, run) fills the report's provenance header, its dataset URI
    and kind taken from the dataset spec ``dataset_spec`` when one is given.
    """
    for variant, path in results.items():
        require_file(path, f"result of variant {variant!r}")
    require_file(placement_summary, "placement summary (--placement)")
    require_file(dataset_spec, "dataset spec (--dataset)")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise storage.StorageError(f"report folder {out} is a file: give a folder (--output)")
    from qatflow.report.write import COMPARISON_FILE

    check_output(out / COMPARISON_FILE)
    from qatflow import comparison
    from qatflow.evaluation import EvaluationResult
    from qatflow.report import write_report

    if dataset_spec is not None:
        run_info = _with_dataset(run_info, local_input(dataset_spec, "dataset spec (--dataset)"))
    loaded = {variant: EvaluationResult.load(path) for variant, path in results.items()}
    table = comparison.compare(loaded, accuracy_gate=accuracy_gate)
    extra = {}
    if placement_summary is not None:
        extra["Q/DQ placement"] = Path(placement_summary).read_text(encoding="utf-8")
    files = write_report(table, loaded, out, title=title, run_info=run_info, extra_sections=extra)
    written = table.save_json(out / COMPARISON_FILE)
    return CompareOutputs(comparison_json=written, comparison=table, report=files)


def _with_dataset(run_info: RunInfo | None, dataset_spec: Path) -> RunInfo:
    """``run_info`` with the dataset URI and kind of the dataset spec at ``dataset_spec``."""
    import dataclasses

    from qatflow.report.provenance import RunInfo

    try:
        spec = json.loads(dataset_spec.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"dataset spec {dataset_spec} is not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise DataError(f"dataset spec {dataset_spec} must hold a JSON object")
    return dataclasses.replace(
        run_info or RunInfo(), dataset_uri=spec.get("uri"), dataset_kind=spec.get("kind")
    )


# --- publish -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishOutputs:
    """The record :func:`publish` wrote (``publish.json``) and its headline facts.

    ``outcome`` is the accuracy gate's verdict on the QAT INT8 candidate, ``passed`` or
    ``refused``. ``offline``: MLflow was unreachable, the run ids are those of the offline
    records and nothing was registered (``registered_version`` None). ``s3_uris``: None
    without an S3 export. ``report``: the folder of the final report (Markdown, HTML, plots),
    re-rendered with the MLflow run IDs; ``report_html``: its self-contained HTML page.
    """

    record: Path
    report: Path
    report_html: Path
    outcome: str
    run_name: str
    parent_run_id: str | None
    child_run_ids: dict[str, str]
    registered_version: str | None
    offline: bool
    s3_uris: dict[str, Any] | None


def publish(
    comparison_dir: PathLike,
    results: Mapping[str, PathLike],
    onnx: Mapping[str, PathLike],
    engines: Mapping[str, PathLike],
    *,
    params: Mapping[str, object],
    output_dir: PathLike,
    placement_summary: PathLike | None = None,
    tracking_uri: str | None = PUBLISH.tracking_uri,
    experiment: str = PUBLISH.experiment,
    registered_model: str = PUBLISH.registered_model,
    s3_prefix: str | None = PUBLISH.s3_prefix,
    run_name: str | None = None,
    tags: Mapping[str, object] | None = None,
) -> PublishOutputs:
    """Publish a run with ``qatflow.publish.publish``: MLflow runs, the registry and champion
    gate, the S3 export; ``publish.json`` goes into ``output_dir``.

    ``comparison_dir`` is :func:`compare`'s folder; ``results``, ``onnx`` and ``engines`` map
    each variant (fp32, ptq_int8, qat_int8) to its evaluation JSON, ONNX file and engine.
    """
    require_file(placement_summary, "placement summary (--placement)")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise storage.StorageError(f"record folder {out} is a file: give a folder")
    from qatflow import publish as publishing
    from qatflow.report.write import HTML_FILE

    path = publishing.publish(
        comparison_dir,
        results,
        onnx,
        engines,
        params=params,
        output_dir=out,
        placement_summary=placement_summary,
        tracking_uri=tracking_uri,
        experiment=experiment,
        register_name=registered_model,
        s3_prefix=s3_prefix,
        run_name=run_name,
        tags=tags,
    )
    outcome = publishing.verdict(path)
    summary = json.loads(path.read_text(encoding="utf-8"))
    mlflow, registry = summary.get("mlflow") or {}, summary.get("registry") or {}
    report = out / publishing.REPORT_DIR
    return PublishOutputs(
        record=path,
        report=report,
        report_html=report / HTML_FILE,
        outcome=outcome,
        run_name=str(summary["run_name"]),
        parent_run_id=mlflow.get("parent_run_id"),
        child_run_ids=dict(mlflow.get("child_run_ids") or {}),
        registered_version=registry.get("version"),
        offline=bool(mlflow.get("offline")),
        s3_uris=(summary.get("s3") or {}).get("uris"),
    )
