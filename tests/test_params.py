"""Every default lives in ``qatflow.params``: steps, CLI, components, pipeline and docs agree."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qatflow_pipelines.runner.compile import compile_pipeline

from qatflow import cluster, params, publish, runtimes, steps, tracking, training
from qatflow.cli import build_parser
from qatflow.data import load_dataset
from qatflow.evaluation import evaluate
from qatflow.onnx.export import export_onnx, to_onnx_proto
from qatflow.params import DATA, ENGINE, EVALUATE, EXPORT, FINETUNE, MODEL, PUBLISH, QUANTIZE, Ref
from qatflow.quantization import calibrate, quantize_model

DOCS = Path(__file__).resolve().parents[1] / "docs" / "pipeline.md"
# Library functions and the schema whose fields set their keyword arguments (step name first).
FUNCTIONS: list[tuple[Callable[..., Any], object, dict[str, str]]] = [
    (steps.prepare_data, params.DATA, {}),
    (steps.prepare_model, params.MODEL, {}),
    (
        steps.quantize,
        params.QUANTIZE,
        {"calibration_batches": "calibration_batches_count", "spec": "spec_path"},
    ),
    (steps.calibration_batches, params.DATA, {}),
    (steps.export, params.EXPORT, {}),
    (steps.finetune, params.FINETUNE, {}),
    (steps.build_engine, params.ENGINE, {}),
    (steps.evaluate, params.EVALUATE, {}),
    (evaluate, params.EVALUATE, {}),
    (steps.compare, params.COMPARE, {}),
    (steps.check_inputs, params.PUBLISH, {}),
    (steps.check_inputs, params.QUANTIZE, {"spec": "spec_path"}),
    (steps.publish, params.PUBLISH, {}),
    (publish.publish, params.PUBLISH, {"registered_model": "register_name"}),
    (tracking.Tracker.__init__, params.PUBLISH, {}),
    # The library functions the steps call, for a caller that skips the steps.
    (load_dataset, params.DATA, {}),
    (quantize_model, params.QUANTIZE, {}),
    (
        calibrate,
        params.QUANTIZE,
        {"calibration_method": "method", "calibration_batches": "num_batches"},
    ),
    (export_onnx, params.EXPORT, {}),
    (to_onnx_proto, params.EXPORT, {}),
    (training.pretrain, params.MODEL, {"pretrain_epochs": "epochs"}),
    (training.finetune, params.FINETUNE, {}),
    (runtimes.build_engine, params.ENGINE, {}),
]
# Each component's parameters with a default, and the step fields they set.
COMPONENTS: dict[str, dict[str, Ref]] = {
    "prepare_data": {
        "preprocessing": Ref(DATA, "preprocessing"),
        "batch_size": Ref(DATA, "batch_size"),
        "limit": Ref(DATA, "limit"),
        "image_size": Ref(DATA, "image_size"),
    },
    "prepare_model": {
        "model_uri": Ref(MODEL, "model_uri"),
        "pretrain_epochs": Ref(MODEL, "pretrain_epochs"),
    },
    "quantize_calibrate": {
        "calibration_method": Ref(QUANTIZE, "calibration_method"),
        "calibration_batches": Ref(QUANTIZE, "calibration_batches"),
        "percentile": Ref(QUANTIZE, "percentile"),
        "activation_range": Ref(QUANTIZE, "activation_range"),
        "spec": Ref(QUANTIZE, "spec"),
    },
    "qat_finetune": {
        "epochs": Ref(FINETUNE, "epochs"),
        "learning_rate": Ref(FINETUNE, "learning_rate"),
        "steps_per_epoch": Ref(FINETUNE, "steps_per_epoch"),
    },
    "export_onnx": {"opset": Ref(EXPORT, "opset")},
    "build_engine": {
        "batch_min": Ref(ENGINE, "batch_profile", 0),
        "batch_opt": Ref(ENGINE, "batch_profile", 1),
        "batch_max": Ref(ENGINE, "batch_profile", 2),
        "encoding": Ref(ENGINE, "encoding"),
    },
    "evaluate": {
        "latency_iterations": Ref(EVALUATE, "latency_iterations"),
        "max_batches": Ref(EVALUATE, "max_batches"),
    },
    "publish": {
        "tracking_uri": Ref(PUBLISH, "tracking_uri"),
        "experiment": Ref(PUBLISH, "experiment"),
        "registered_model": Ref(PUBLISH, "registered_model"),
        "s3_prefix": Ref(PUBLISH, "s3_prefix"),
        "image_size": Ref(DATA, "image_size"),
        "percentile": Ref(QUANTIZE, "percentile"),
        "activation_range": Ref(QUANTIZE, "activation_range"),
        "spec": Ref(QUANTIZE, "spec"),
    },
    "check_inputs": {"s3_prefix": Ref(PUBLISH, "s3_prefix"), "spec": Ref(QUANTIZE, "spec")},
}
# A command line per command, and the schema its options' defaults come from.
COMMANDS: list[tuple[list[str], object]] = [
    (["prepare-data", "d", "-o", "x"], params.DATA),
    (["prepare-model", "m", "--dataset", "d", "-o", "x"], params.MODEL),
    (["quantize", "m", "-o", "x"], params.QUANTIZE),
    (["quantize", "m", "-o", "x"], params.DATA),
    (["export", "m", "-o", "x"], params.EXPORT),
    (["finetune", "m", "--dataset", "d", "-o", "x"], params.FINETUNE),
    (["build-engine", "m", "-o", "x"], params.ENGINE),
    (["evaluate", "e", "--dataset", "d", "-o", "x"], params.EVALUATE),
    (["compare", "fp32=r", "-o", "x"], params.COMPARE),
    (["run"], params.ENGINE),
    (["compile"], params.ENGINE),
]


def _defaults(function: Callable[..., Any]) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _fields(schema: object) -> list[str]:
    return [field.name for field in dataclasses.fields(schema)]  # type: ignore[arg-type]


@pytest.mark.parametrize(("function", "schema", "renamed"), FUNCTIONS)
def test_library_defaults_are_the_schema(
    function: Callable[..., Any], schema: object, renamed: dict[str, str]
) -> None:
    defaults = _defaults(function)
    checked = [name for name in _fields(schema) if renamed.get(name, name) in defaults]
    assert checked, f"{function.__qualname__} takes none of {type(schema).__name__}'s fields"
    for name in checked:
        assert defaults[renamed.get(name, name)] == getattr(schema, name), name


@pytest.mark.parametrize(("argv", "schema"), COMMANDS)
def test_cli_defaults_are_the_schema(argv: list[str], schema: object) -> None:
    args = vars(build_parser().parse_args(argv))
    options = {name for name in _fields(schema) if name in args}
    if argv[0] == "compile":  # compiles for the cluster, unlike every other command
        assert args["runtime"] == params.CLUSTER_RUNTIME
        options -= {"runtime"}
    for name in options:
        value = args[name]
        assert (tuple(value) if isinstance(value, list) else value) == getattr(schema, name), name


def test_cluster_defaults_are_the_schema() -> None:
    assert _defaults(cluster.schedule)["job_name"] == params.DEFAULT_JOB_NAME
    assert _defaults(cluster.submit)["experiment"] == params.DEFAULT_EXPERIMENT
    args = build_parser().parse_args(["schedule", "--cron", "* * * * * *"])
    assert args.job_name == params.DEFAULT_JOB_NAME
    assert args.experiment == params.DEFAULT_EXPERIMENT
    assert _defaults(compile_pipeline)["runtime"] == params.CLUSTER_RUNTIME
    compiled = build_parser().parse_args(["compile"])
    gpu = _defaults(cluster.apply_gpu_settings)
    assert (compiled.accelerator_type, compiled.accelerator_limit) == (
        gpu["accelerator_type"],
        gpu["accelerator_limit"],
    )


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_component_defaults_are_the_schema(component: str) -> None:
    module = importlib.import_module(f"qatflow_components.{component}.component")
    defaults = _defaults(getattr(module, component).python_func)
    for name, ref in COMPONENTS[component].items():
        assert defaults[name] == ref.kfp_default, f"{component}.{name}"


def test_build_engine_component_takes_the_pipeline_runtime() -> None:
    from qatflow_components.build_engine.component import build_engine

    assert "runtime" not in _defaults(build_engine.python_func)


@pytest.mark.parametrize("runtime", ["tensorrt", "onnxruntime"])
def test_pipeline_defaults_are_the_schema(runtime: str) -> None:
    from qatflow_pipelines.qat_int8.pipeline import build_pipeline

    inputs = build_pipeline(runtime=runtime).component_spec.inputs
    assert set(inputs) == {*params.PIPELINE_PARAMETERS, "runtime"}
    assert inputs["runtime"].default == runtime
    for name, ref in params.PIPELINE_PARAMETERS.items():
        assert inputs[name].default == ref.kfp_default, name
    assert _defaults(build_pipeline)["runtime"] == params.CLUSTER_RUNTIME


def _docs_table() -> dict[str, str]:
    """docs/pipeline.md's parameter table: parameter name -> default as written."""
    section = DOCS.read_text(encoding="utf-8").split("## Parameters", 1)[1].split("\n## ", 1)[0]
    section = section.split("**Fixed in the pipeline.**", 1)[0]
    table: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = [name.strip("` ") for name in cells[0].split(",")]
        expanded = []
        for name in names:
            stem, _, rest = name.rpartition("_")
            parts = rest.split("/")
            expanded += [f"{stem}_{part}" for part in parts] if len(parts) > 1 else [name]
        values = [value.strip() for value in cells[1].split(",")]
        values = values if len(values) == len(expanded) else [cells[1]] * len(expanded)
        table.update(zip(expanded, values, strict=True))
    return table


def _written(value: Any) -> str | float:
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return float(value)


def test_docs_table_is_the_schema() -> None:
    table = _docs_table()
    assert set(table) == {*params.PIPELINE_PARAMETERS, "runtime"}
    assert table["runtime"] == "as compiled"
    for name, ref in params.PIPELINE_PARAMETERS.items():
        written = table[name]
        expected = _written(ref.kfp_default)
        got = float(written) if re.fullmatch(r"[-+0-9.e]+", written) else written
        assert got == expected, f"docs/pipeline.md: {name} is {written}, the schema says {expected}"


def _schemas() -> dict[str, object]:
    """The step schemas of ``qatflow.params``, by their module-level name."""
    return {
        name: value
        for name, value in vars(params).items()
        if name.isupper() and dataclasses.is_dataclass(value) and not isinstance(value, type)
    }


def test_every_step_field_is_a_pipeline_parameter_or_fixed_on_purpose() -> None:
    set_by_pipeline = {(id(ref.params), ref.field) for ref in params.PIPELINE_PARAMETERS.values()}
    fixed = {(id(ref.params), ref.field) for ref in params.PIPELINE_FIXED}
    assert not set_by_pipeline & fixed
    for name, schema in _schemas().items():
        for field in dataclasses.fields(schema):  # type: ignore[arg-type]
            key = (id(schema), field.name)
            assert key in set_by_pipeline | fixed, (
                f"{name}.{field.name} is neither a pipeline parameter nor in params.PIPELINE_FIXED"
            )


def test_docs_list_the_fixed_fields_with_their_defaults() -> None:
    text = DOCS.read_text(encoding="utf-8")
    names = {id(schema): name for name, schema in _schemas().items()}
    for ref, reason in params.PIPELINE_FIXED.items():
        row = f"| `{names[id(ref.params)]}.{ref.field}` | `{ref.default!r}` | {reason} |"
        assert row in text, f"docs/pipeline.md lacks the row {row}"


def test_help_shows_the_default() -> None:
    assert params.help_of(params.EVALUATE, "latency_iterations") == (
        "timed batch-1 runs (default: 200 runs)"
    )
    assert params.help_of(params.ENGINE, "batch_profile").endswith("(default: 1 8 64 images)")
    assert "default" not in params.help_of(params.EVALUATE, "max_batches")


def test_every_command_help_renders() -> None:
    actions = build_parser()._actions
    (commands,) = [a for a in actions if isinstance(a, argparse._SubParsersAction)]
    for name, parser in commands.choices.items():
        assert parser.format_help(), name
