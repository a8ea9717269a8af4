"""The steps' parameters: every default, with its unit and help text, defined once.

One frozen dataclass per step. ``qatflow.steps``, the CLI options and the pipeline's
parameters take their defaults (and the CLI its help) from here. KFP component signatures
need literal defaults, so tests/test_params.py fails when a component's, the pipeline's, the
CLI's or docs/pipeline.md's default differs from these. ``None`` means "not set" (the
library default); the components and the pipeline spell it 0 (numbers) or ``""`` (anything
else), and an image size as ``"H,W"`` (``parse_image_size``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

from qatflow import gate
from qatflow.errors import DataError

DEMO_MODEL = "demo"
DEFAULT_EXPERIMENT = "qatflow"  # the MLflow and the KFP experiment
DEFAULT_REGISTERED_MODEL = "qatflow-qat-int8"
DEFAULT_JOB_NAME = "qatflow-nightly"  # a scheduled (recurring) run
CLUSTER_RUNTIME = "tensorrt"  # the runtime `qatflow compile` builds the pipeline for

# The values a choice parameter takes: the library's types, the CLI's choices, the pipeline's
# checks. Plain Python here, so building the CLI parser imports no TensorFlow.
QuantizeMode = Literal["full", "partial"]
QUANTIZE_MODES: tuple[QuantizeMode, ...] = get_args(QuantizeMode)
CalibrationMethod = Literal["max", "percentile", "mse"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(CalibrationMethod)
ActivationRange = Literal["frozen", "ema"]
ACTIVATION_RANGES: tuple[str, ...] = get_args(ActivationRange)
OptimizerName = Literal["sgd", "adam"]
OPTIMIZERS: tuple[OptimizerName, ...] = get_args(OptimizerName)
RuntimeName = Literal["onnxruntime", "tensorrt"]
RUNTIMES: tuple[str, ...] = get_args(RuntimeName)


def param(default: Any, help: str, unit: str = "") -> Any:
    """A dataclass field with its ``help`` text and ``unit`` as metadata."""
    return dataclasses.field(default=default, metadata={"help": help, "unit": unit})


@dataclass(frozen=True)
class DataParams:
    """``steps.prepare_data``."""

    dataset_uri: str = param(
        "fashion-mnist", "fashion-mnist, an IDX/image/TFRecord folder or .npz; local or s3://"
    )
    preprocessing: str = param("scale01", "scale01, tf, caffe, torch or raw")
    batch_size: int = param(64, "batch size of every split", "images")
    image_size: tuple[int, int] | None = param(
        None, "resize images to H x W (not set: as stored)", "pixels"
    )
    calibration_size: int = param(512, "training images set aside for calibration", "images")
    limit: int | None = param(None, "cap on every split, for quick runs", "images")
    seed: int = param(0, "split/shuffle seed")


@dataclass(frozen=True)
class ModelParams:
    """``steps.prepare_model``."""

    model_uri: str = param(
        DEMO_MODEL,
        "demo, a .keras/.h5/SavedModel path or s3:// URI, or a keras.applications name",
    )
    pretrain_epochs: int = param(5, "demo model pretraining epochs (demo only; cached)", "epochs")


@dataclass(frozen=True)
class QuantizeParams:
    """``steps.quantize``."""

    mode: QuantizeMode = param("full", "full (every supported layer) or partial")
    spec: str | None = param(
        None, "YAML placement overrides (docs/quantization.md), local or s3:// (not set: none)"
    )
    calibration_method: CalibrationMethod = param(
        "max", "PTQ calibration method: max, percentile or mse"
    )
    calibration_batches: int = param(16, "batches of calibration data", "batches")
    percentile: float = param(99.99, "for calibration method percentile", "%")
    activation_range: ActivationRange = param(
        "frozen", "activation ranges during QAT: frozen or ema"
    )
    fold_batch_norm: bool = param(
        True,
        "fold each batch norm after a convolution or Dense layer into its weights before "
        "quantizing them, so INT8 engines compute exactly what the Q/DQ graph says",
    )
    runtime: RuntimeName = param(
        "tensorrt",
        "the engine runtime the placement is for: tensorrt leaves one convolution branch of "
        "each residual Add in float for its Conv+Add fusion; onnxruntime quantizes every "
        "input, so the Add and the convolutions before it run in integer",
    )


@dataclass(frozen=True)
class FinetuneParams:
    """``steps.finetune``."""

    epochs: int = param(2, "QAT fine-tuning epochs", "epochs")
    learning_rate: float = param(1e-3, "QAT peak learning rate")
    optimizer: OptimizerName = param("sgd", "SGD with momentum or Adam")
    steps_per_epoch: int | None = param(None, "cap on QAT steps per epoch", "steps")


@dataclass(frozen=True)
class ExportParams:
    """``steps.export``."""

    opset: int = param(17, "ONNX opset, 13+")


@dataclass(frozen=True)
class EngineParams:
    """``steps.build_engine``; the pipeline's runtime is the one it was compiled for."""

    runtime: RuntimeName = param("onnxruntime", "engine runtime; tensorrt needs TensorRT and a GPU")
    batch_profile: tuple[int, int, int] = param(
        (1, 8, 64), "batch sizes the engine accepts (min, max) and is tuned for (opt)", "images"
    )
    encoding: str = param("auto", "ONNX Runtime integer weight encoding: auto, u8s8 or u8u8")
    fidelity_samples: int = param(
        1024, "images the engine is checked against its reference on before it is written", "images"
    )


@dataclass(frozen=True)
class EvaluateParams:
    """``steps.evaluate``."""

    latency_iterations: int = param(200, "timed batch-1 runs", "runs")
    warmup: int = param(20, "untimed runs first", "runs")
    throughput_batch: int = param(64, "batch for throughput", "images")
    max_batches: int | None = param(None, "test batches to use (not set: all)", "batches")


@dataclass(frozen=True)
class CompareParams:
    """``steps.compare``."""

    title: str = param("qatflow: FP32 vs PTQ INT8 vs QAT INT8", "report title")
    accuracy_gate: float = param(
        gate.DEFAULT_POINTS, "the largest top-1 drop vs FP32 that passes", "top-1 points"
    )


@dataclass(frozen=True)
class PublishParams:
    """``steps.publish`` (``qatflow.publish.publish``) and ``steps.check_inputs``."""

    tracking_uri: str | None = param(None, "MLflow tracking URI (not set: $MLFLOW_TRACKING_URI)")
    experiment: str = param(DEFAULT_EXPERIMENT, "MLflow experiment name")
    registered_model: str = param(DEFAULT_REGISTERED_MODEL, "MLflow registered model name")
    s3_prefix: str | None = param(None, "s3:// prefix for the final artifacts (not set: none)")


DATA = DataParams()
MODEL = ModelParams()
QUANTIZE = QuantizeParams()
FINETUNE = FinetuneParams()
EXPORT = ExportParams()
ENGINE = EngineParams()
EVALUATE = EvaluateParams()
COMPARE = CompareParams()
PUBLISH = PublishParams()


class Ref(NamedTuple):
    """A schema field (``item``: one item of a tuple field)."""

    params: object
    field: str
    item: int | None = None

    @property
    def default(self) -> Any:
        """The field's default."""
        value = getattr(self.params, self.field)
        return value if self.item is None else value[self.item]

    @property
    def kfp_default(self) -> Any:
        """The default as a KFP signature spells it: "not set" is ``""`` or 0."""
        if self.default is not None:
            return self.default
        number = str(_field(self.params, self.field).type).startswith(("int", "float"))
        return 0 if number else ""


def _field(params: object, name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(params) if f.name == name)  # type: ignore[arg-type]


def help_text(params: object, name: str) -> str:
    """The help text of field ``name``, escaped for argparse (a required argument's help)."""
    return str(_field(params, name).metadata["help"]).replace("%", "%%")


def help_of(params: object, name: str) -> str:
    """The help text of field ``name`` with its default and unit, for an argparse option."""
    default = getattr(params, name)
    if default is None:
        return help_text(params, name)
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    unit = _field(params, name).metadata["unit"]
    suffix = f" (default: {shown}{' ' + unit if unit else ''})".replace("%", "%%")
    return help_text(params, name) + suffix


# The pipeline's parameters and the step fields they set; `runtime` is the compiled one.
PIPELINE_PARAMETERS: Mapping[str, Ref] = {
    "model_uri": Ref(MODEL, "model_uri"),
    "dataset_uri": Ref(DATA, "dataset_uri"),
    "preprocessing": Ref(DATA, "preprocessing"),
    "batch_size": Ref(DATA, "batch_size"),
    "image_size": Ref(DATA, "image_size"),
    "limit": Ref(DATA, "limit"),
    "pretrain_epochs": Ref(MODEL, "pretrain_epochs"),
    "epochs": Ref(FINETUNE, "epochs"),
    "learning_rate": Ref(FINETUNE, "learning_rate"),
    "qat_steps_per_epoch": Ref(FINETUNE, "steps_per_epoch"),
    "calibration_method": Ref(QUANTIZE, "calibration_method"),
    "calibration_batches": Ref(QUANTIZE, "calibration_batches"),
    "percentile": Ref(QUANTIZE, "percentile"),
    "quantization_spec": Ref(QUANTIZE, "spec"),
    "activation_range": Ref(QUANTIZE, "activation_range"),
    "batch_profile_min": Ref(ENGINE, "batch_profile", 0),
    "batch_profile_opt": Ref(ENGINE, "batch_profile", 1),
    "batch_profile_max": Ref(ENGINE, "batch_profile", 2),
    "int8_encoding": Ref(ENGINE, "encoding"),
    "fidelity_samples": Ref(ENGINE, "fidelity_samples"),
    "latency_iterations": Ref(EVALUATE, "latency_iterations"),
    "eval_max_batches": Ref(EVALUATE, "max_batches"),
    "accuracy_gate": Ref(COMPARE, "accuracy_gate"),
    "tracking_uri": Ref(PUBLISH, "tracking_uri"),
    "mlflow_experiment": Ref(PUBLISH, "experiment"),
    "registered_model": Ref(PUBLISH, "registered_model"),
    "s3_prefix": Ref(PUBLISH, "s3_prefix"),
}

# Step fields the pipeline runs at their default, on purpose; every other field is a pipeline
# parameter above (tests/test_params.py fails on a field that is neither).
PIPELINE_FIXED: Mapping[Ref, str] = {
    Ref(DATA, "calibration_size"): "`calibration_batches` sets how much of it PTQ uses",
    Ref(DATA, "seed"): "a fixed seed keeps runs comparable and the step cache valid",
    Ref(QUANTIZE, "mode"): "the pipeline compares full INT8 engines; partial is a toolkit option",
    Ref(QUANTIZE, "fold_batch_norm"): "the pipeline's INT8 engines are exact only with batch "
    "norm folded before quantization (docs/exact-int8.md); not folding is a toolkit option",
    Ref(FINETUNE, "optimizer"): "the QAT recipe's optimizer (docs/training.md)",
    Ref(EXPORT, "opset"): "the opset the exporter and the validator are tested with",
    Ref(ENGINE, "runtime"): "set when the pipeline is compiled (`runtime`), not per run",
    Ref(QUANTIZE, "runtime"): "the compiled `runtime`: the placement is for the engine the "
    "pipeline builds",
    Ref(EVALUATE, "warmup"): "benchmark hygiene, not a result",
    Ref(EVALUATE, "throughput_batch"): "one batch size keeps throughput comparable across runs",
    Ref(COMPARE, "title"): "the report names the run in its provenance header",
}


def pipeline_default(name: str) -> Any:
    """The default of the pipeline parameter ``name``, as KFP spells it."""
    return PIPELINE_PARAMETERS[name].kfp_default


def parse_image_size(text: str) -> tuple[int, int] | None:
    """``DATA.image_size`` as the pipeline and the components spell it: ``"H,W"`` (e.g.
    ``"224,224"``), or ``""`` for not set (the images' own size)."""
    if not text.strip():
        return None
    try:
        height, width = (int(part) for part in text.split(","))
    except ValueError:
        raise DataError(f"image_size {text!r} must be H,W (two integers, e.g. 224,224)") from None
    if height < 1 or width < 1:
        raise DataError(f"image_size {text!r}: height and width must be >= 1")
    return height, width
