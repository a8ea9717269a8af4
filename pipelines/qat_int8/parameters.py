"""The pipeline's parameter rules, checked before a run starts (no task, no retry, no wait).

Each rule is the one the step that consumes the parameter applies; checking them up front
turns a late, retried task failure into one message before anything runs.
"""

import math
import textwrap
from collections.abc import Callable, Mapping

from qatflow import gate
from qatflow.errors import DataError, PipelineError
from qatflow.params import ACTIVATION_RANGES, CALIBRATION_METHODS, RUNTIMES, parse_image_size

_COUNTS_FROM_1 = (
    "batch_size",
    "pretrain_epochs",
    "epochs",
    "calibration_batches",
    "fidelity_samples",
    "latency_iterations",
    "batch_profile_min",
)
_COUNTS_FROM_0 = ("limit", "qat_steps_per_epoch", "eval_max_batches")
_NON_EMPTY = ("model_uri", "dataset_uri", "mlflow_experiment", "registered_model")


def check_arguments(arguments: Mapping[str, object]) -> None:
    """Raise ``PipelineError`` naming the first pipeline parameter whose value no step accepts.

    ``arguments`` maps parameter names to values; absent ones (pipeline defaults) are fine.
    """
    rules = _rules()
    for name, value in arguments.items():
        rule = rules.get(name)
        problem = rule(value) if rule else None
        if problem:
            raise PipelineError(f"pipeline parameter {name}={value!r}: {problem}")
    given = [arguments.get(f"batch_profile_{key}") for key in ("min", "opt", "max")]
    profile = [size for size in given if isinstance(size, int)]
    if len(profile) == len(given) and profile != sorted(profile):
        raise PipelineError(
            f"pipeline parameters batch_profile_min/opt/max={profile}: need min <= opt <= max"
        )


def _rules() -> dict[str, Callable[[object], str | None]]:
    from qatflow.data.preprocessing import PREPROCESSING
    from qatflow.onnx.encoding import ENCODINGS

    rules: dict[str, Callable[[object], str | None]] = {
        "accuracy_gate": _gate,
        "learning_rate": _positive_number,
        "preprocessing": _one_of(tuple(PREPROCESSING)),
        "calibration_method": _one_of(CALIBRATION_METHODS),
        "percentile": _percentile,
        "activation_range": _one_of(ACTIVATION_RANGES),
        "quantization_spec": _string,
        "image_size": _image_size,
        "runtime": _one_of(RUNTIMES),
        "int8_encoding": _one_of(("auto", *ENCODINGS)),
        "s3_prefix": _s3_prefix,
        "batch_profile_opt": _count(1),
        "batch_profile_max": _count(1),
    }
    rules.update({name: _count(1) for name in _COUNTS_FROM_1})
    rules.update({name: _count(0) for name in _COUNTS_FROM_0})
    rules.update({name: _non_empty for name in _NON_EMPTY})
    return rules


def _gate(value: object) -> str | None:
    try:
        gate.check_gate(value)
    except PipelineError as err:
        return str(err).removeprefix(f"{gate.PARAMETER} ").split(", got ")[0]
    return None


def _count(low: int) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            return f"must be an integer >= {low}"
        return None

    return check


def _positive_number(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "must be a finite number"
    return None if value > 0 else "must be > 0"


def _percentile(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "must be a finite number"
    return None if 0 < value <= 100 else "must be in (0, 100]"


def _string(value: object) -> str | None:
    return None if isinstance(value, str) else "must be a string (empty: not set)"


def _image_size(value: object) -> str | None:
    if not isinstance(value, str):
        return "must be H,W (e.g. 224,224) or empty"
    try:
        parse_image_size(value)
    except DataError:
        return "must be H,W with two integers >= 1 (e.g. 224,224) or empty"
    return None


def _one_of(choices: tuple[str, ...]) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _s3_prefix(value: object) -> str | None:
    if value == "" or (isinstance(value, str) and value.startswith("s3://") and len(value) > 5):
        return None
    return "must be empty (no export) or an s3://bucket/prefix URI"


def _non_empty(value: object) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def describe() -> str:
    """The pipeline's parameters with their types, defaults and descriptions, for ``--help``."""
    from qatflow_pipelines.qat_int8.pipeline import build_pipeline

    lines = ["parameters of the qatflow pipeline (--param NAME=VALUE):"]
    for name, spec in (build_pipeline().component_spec.inputs or {}).items():
        default = "" if spec.default is None else f", default {spec.default!r}"
        lines.append(f"  {name} ({spec.type}{default})")
        summary = " ".join((spec.description or "").replace("``", "").split())
        lines += textwrap.wrap(summary, width=92, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"
