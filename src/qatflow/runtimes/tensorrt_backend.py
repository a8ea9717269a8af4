"""TensorRT engine builder: ONNX -> serialized plan, sidecar metadata and build log.

Every precision decision comes from :func:`plan_build` (pure, keyed by the TensorRT major
version), so it is unit-tested without TensorRT:

* TensorRT 10 is weakly typed: ``BuilderFlag.INT8`` when the graph has Q/DQ (explicit
  quantization; no calibrator), ``BuilderFlag.FP16`` on request for the float layers.
* TensorRT 11 is strongly typed only: no precision flags; FP16 float layers come from
  converting the ONNX to mixed precision (:mod:`qatflow.runtimes.tensorrt_fp16`) before parsing.

Everything runs in the process's one CUDA context (:mod:`qatflow.runtimes.cuda_context`), and
the build log lists the layers that run in INT8, read from the engine inspector.

Before anything is written, the built plan is deserialized and run on the fidelity data
(:mod:`qatflow.runtimes.fidelity`) and its outputs are compared with the source ONNX run as
float math; an engine that fails the check is an error and leaves no files behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from qatflow.errors import RuntimeBackendError
from qatflow.runtimes import tensorrt_timing_cache
from qatflow.runtimes.base import (
    BatchProfile,
    Engine,
    EngineMetadata,
    check_batch,
    engine_input_shape,
    file_sha256,
    has_qdq,
    onnx_io,
    profile_shapes,
    sidecar_path,
    sidecar_record,
    version_tuple,
)
from qatflow.runtimes.cuda_context import CudaContext, cuda_context
from qatflow.runtimes.fidelity import (
    FidelityCheck,
    FidelityReport,
    collect,
    compare_outputs,
    ideal_integer_check,
    ideal_integer_line,
    reference_outputs,
)
from qatflow.runtimes.tensorrt_fp16 import convert_to_mixed_fp16
from qatflow.runtimes.tensorrt_inference import TensorRTEngine, deserialize_plan
from qatflow.runtimes.tensorrt_layers import precision_summary
from qatflow.runtimes.tensorrt_module import import_tensorrt
from qatflow.storage import atomic_output

if TYPE_CHECKING:
    import tensorrt as trt_t

logger = logging.getLogger("qatflow.runtimes.tensorrt")

SUPPORTED_MAJORS = (10, 11)
BUILD_LOG_FORMAT = "qatflow-trt-build-log/2"


@dataclasses.dataclass(frozen=True)
class TensorRTBuildOptions:
    """TensorRT build options (``build_engine(..., runtime="tensorrt", **options)``).

    fp16: let float (non-Q/DQ) layers run in FP16 (TRT 10: builder flag; TRT 11: ONNX
        mixed-precision conversion before the build).
    workspace_bytes: workspace memory pool limit (None: TensorRT default, the device memory).
    builder_optimization_level: 0-5, TensorRT's default is 3.
    timing_cache: ``"auto"`` (``tensorrt.timing-cache`` beside the engine), a path, or None.
    layer_info: build with detailed profiling verbosity and put per-layer info in the log.
    """

    fp16: bool = False
    workspace_bytes: int | None = None
    builder_optimization_level: int = 3
    timing_cache: str | os.PathLike[str] | None = "auto"
    layer_info: bool = True

    def __post_init__(self) -> None:
        level = self.builder_optimization_level
        if not isinstance(level, int) or not 0 <= level <= 5:
            raise RuntimeBackendError(
                f"builder_optimization_level must be an integer 0-5, got {level!r}"
            )
        workspace = self.workspace_bytes
        if workspace is not None and (not isinstance(workspace, int) or workspace < 1):
            raise RuntimeBackendError(
                f"workspace_bytes must be a positive integer, got {workspace!r}"
            )


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """Precision decisions for one build."""

    trt_version: str
    major: int
    strongly_typed: bool
    builder_flags: tuple[str, ...]
    fp16_onnx_conversion: bool
    notes: tuple[str, ...]
    # The precisions the plan allows besides FP32: "int8" (Q/DQ layers), "fp16" (float
    # layers), both ("int8+fp16"), or "fp32" for neither.
    precision: str = "fp32"


def plan_build(trt_version: str, has_qdq: bool, fp16: bool) -> BuildPlan:
    """Decide typing mode, builder flags and ONNX conversion for a TensorRT version."""
    major = version_tuple(trt_version)[0]
    if major not in SUPPORTED_MAJORS:
        raise RuntimeBackendError(
            f"TensorRT {trt_version} is not supported; qatflow builds with TensorRT "
            f"{' or '.join(str(m) for m in SUPPORTED_MAJORS)}"
        )
    notes: list[str] = []
    precision = "+".join(p for p, used in (("int8", has_qdq), ("fp16", fp16)) if used) or "fp32"
    if major == 10:
        flags: list[str] = []
        notes.append("TensorRT 10: weakly typed network")
        if has_qdq:
            flags.append("INT8")
            notes.append("Q/DQ graph: INT8 flag set (explicit quantization, no calibrator)")
        else:
            notes.append("no Q/DQ: float engine (implicit INT8 calibration is not used)")
        if fp16:
            flags.append("FP16")
            notes.append("FP16 flag set: layers outside Q/DQ may run in FP16")
        return BuildPlan(trt_version, major, False, tuple(flags), False, tuple(notes), precision)
    notes.append("TensorRT 11: strongly typed network; precision comes from the graph")
    notes.append("Q/DQ layers run in INT8" if has_qdq else "no Q/DQ: no INT8 layers")
    if fp16:
        notes.append(
            "FP16: ONNX converted to mixed precision (opset 19, FP16 Q/DQ scales), I/O FP32"
        )
    return BuildPlan(trt_version, major, True, (), fp16, tuple(notes), precision)


def resolve_timing_cache(option: str | os.PathLike[str] | None, output: Path) -> Path | None:
    """Timing cache file for ``output``: ``"auto"`` means ``tensorrt.timing-cache`` beside it."""
    if option is None:
        return None
    if option == "auto":
        return output.parent / "tensorrt.timing-cache"
    return Path(option)


def format_parser_error(error: Any) -> str:
    """One line per ONNX parser error: node index, name, operator, description, code."""
    name = _call_or(error, "node_name", "")
    operator = _call_or(error, "node_operator", "")
    where = (
        f"node {error.node()}"
        + (f" {name!r}" if name else "")
        + (f" ({operator})" if operator else "")
    )
    return f"{where}: {error.desc()} [{error.code()}]"


def _call_or(obj: Any, method: str, default: str) -> str:
    # node_name/node_operator exist from TensorRT 10.x on; older 10.0 builds lack them.
    func = getattr(obj, method, None)
    return str(func()) if callable(func) else default


def _make_logger(trt: ModuleType, messages: list[str]) -> trt_t.ILogger:
    """A TensorRT logger that keeps warnings and errors for the build log."""
    warning = int(trt.ILogger.Severity.WARNING)

    def log(self: Any, severity: Any, msg: str) -> None:
        if int(severity) <= warning:
            messages.append(f"{getattr(severity, 'name', severity)}: {msg}")
            logger.warning("TensorRT: %s", msg)
        else:
            logger.debug("TensorRT: %s", msg)

    logger_class = type("QatflowTensorRTLogger", (trt.ILogger,), {"log": log})
    trt_logger: trt_t.ILogger = logger_class()
    return trt_logger


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)


def build_tensorrt_engine(
    source: Path,
    output: Path,
    batch_profile: BatchProfile,
    options: TensorRTBuildOptions,
    check: FidelityCheck,
) -> Path:
    """Build a TensorRT plan from ``source``, check it against its reference, then write it.

    The plan is deserialized and run (pycuda, within ``batch_profile``) on the inputs of
    ``check``; its outputs are compared with ``source`` itself run as float math (not with the
    FP16-converted ONNX of a TensorRT 11 FP16 build). The report goes into the sidecar and the
    build log. An engine that fails the check raises RuntimeBackendError and nothing (plan,
    sidecar, build log, timing cache) is written. The whole build runs in the process's CUDA
    context, current on the calling thread for its duration.
    """
    trt = import_tensorrt()
    # Checked before the (long) build: the fidelity check runs the plan on the GPU.
    cuda = cuda_context(source, "building and checking a TensorRT engine")
    with cuda.active(f"{source}: building a TensorRT engine"):
        return _build(trt, cuda, source, output, batch_profile, options, check)


def _build(
    trt: ModuleType,
    cuda: CudaContext,
    source: Path,
    output: Path,
    batch_profile: BatchProfile,
    options: TensorRTBuildOptions,
    check: FidelityCheck,
) -> Path:
    started = time.perf_counter()
    clock = _Stopwatch()
    source_model = onnx.load(source)
    input_name, dims, output_name = onnx_io(source_model, source)
    shapes = profile_shapes(input_name, dims, batch_profile, source)
    plan = plan_build(str(trt.__version__), has_qdq(source_model), options.fp16)
    with clock.phase("reference"):
        inputs, expected, data_label = _reference(source_model, source, input_name, dims, check)
    model, notes = source_model, list(plan.notes)
    if plan.fp16_onnx_conversion:
        with clock.phase("fp16_conversion"):
            conversion = convert_to_mixed_fp16(source_model)
        model = conversion.model
        if conversion.fp32_qdq_nodes:
            notes.append(
                "Q/DQ kept FP32 (scale below the FP16 range): "
                + ", ".join(conversion.fp32_qdq_nodes)
            )
    plan = dataclasses.replace(plan, notes=tuple(notes))
    logger.info("TensorRT build plan for %s: %s", source, "; ".join(plan.notes))
    messages: list[str] = []
    trt_logger = _make_logger(trt, messages)
    builder: trt_t.Builder = trt.Builder(trt_logger)
    # Flags 0 in both majors: TensorRT 10 builds weakly typed; TensorRT 11 networks are always
    # strongly typed and its STRONGLY_TYPED flag (0 there, 1 in 10) is deprecated and ignored.
    network: trt_t.INetworkDefinition = builder.create_network(0)
    with clock.phase("parse"):
        _parse(trt, network, trt_logger, model, source)
    config = _configure(trt, builder, plan, options, input_name, shapes)
    cache_path = resolve_timing_cache(options.timing_cache, output)
    cache_loaded = tensorrt_timing_cache.attach(config, cache_path)
    with clock.phase("build"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(messages[-5:]) or "no message from TensorRT"
        raise RuntimeBackendError(f"{source}: TensorRT could not build an engine: {detail}")
    plan_bytes = bytes(serialized)
    engine = deserialize_plan(trt, trt_logger, plan_bytes, source)
    with clock.phase("inspect"):
        layers, layer_error = _layer_info(trt, engine, options.layer_info)
    precision = precision_summary(layers)
    _log_precision(source, plan, precision)
    metadata = EngineMetadata(
        runtime="tensorrt",
        runtime_version=str(trt.__version__),
        source_onnx=str(source.resolve()),
        source_sha256=file_sha256(source),
        input_name=input_name,
        input_shape=engine_input_shape(dims),
        output_name=output_name,
        batch_profile=batch_profile,
        build_options=_options_dict(options, cache_path),
        device=cuda.device,
    )
    with (
        clock.phase("fidelity"),
        TensorRTEngine(output, metadata, trt=trt, cuda=cuda, engine=engine) as runner,
    ):
        del engine  # the runner owns it now and frees it on close
        report = _check_fidelity(runner, source, inputs, expected, data_label)
    if not report.passed:
        ideal = _ideal_integer(source_model, input_name, dims, inputs, expected, data_label)
        raise fidelity_error(source, plan, report, ideal)
    logger.info("%s: TensorRT %s", source, report.summary())
    metadata = dataclasses.replace(metadata, fidelity=report.to_dict())
    clock.timings["total"] = round(time.perf_counter() - started, 3)
    log = {
        "format": BUILD_LOG_FORMAT,
        "engine": str(output),
        "source_onnx": metadata.source_onnx,
        "tensorrt_version": metadata.runtime_version,
        "plan": dataclasses.asdict(plan),
        "options": metadata.build_options,
        "profile": {
            "input": input_name,
            "min": list(shapes[0]),
            "opt": list(shapes[1]),
            "max": list(shapes[2]),
        },
        "gpu": cuda.device,
        "timing_cache": {
            "path": None if cache_path is None else str(cache_path),
            "loaded": cache_loaded,
        },
        "fidelity": metadata.fidelity,
        "timings_s": clock.timings,
        "messages": messages,
        "precision": precision,
        "layers": layers,
        "layer_info_error": layer_error,
    }
    _write_outputs(output, plan_bytes, metadata, log, config, cache_path)
    logger.info(
        "TensorRT engine %s built from %s in %.1f s", output, source, clock.timings["total"]
    )
    return output


def _log_precision(source: Path, plan: BuildPlan, precision: dict[str, Any] | None) -> None:
    """Say how many layers run in INT8 (and warn when a Q/DQ graph got none)."""
    if precision is None:
        logger.info("%s: no per-layer precision (layer_info=False or no inspector)", source)
        return
    int8 = precision["int8_layers"]
    logger.info(
        "%s: %d of %d engine layers run in INT8%s",
        source,
        len(int8),
        precision["layers"],
        f": {', '.join(int8)}" if int8 else "",
    )
    if "int8" in plan.precision and not int8:
        logger.warning("%s: the graph has Q/DQ but no engine layer runs in INT8", source)


def _reference(
    model: onnx.ModelProto,
    source: Path,
    input_name: str,
    dims: tuple[int | str | None, ...],
    check: FidelityCheck,
) -> tuple[np.ndarray, np.ndarray, str]:
    """The check's inputs, the outputs of ``model`` (the source ONNX) on them, the data label."""
    batches, data_label = check.batches(model, source)
    shape = engine_input_shape(dims)

    def reference(batch: np.ndarray) -> np.ndarray:
        try:
            check_batch(batch, input_name, shape)
        except RuntimeBackendError as exc:
            raise RuntimeBackendError(f"{source}: fidelity data: {exc}") from exc
        return reference_outputs(model, input_name, batch)

    inputs, expected = collect(batches, reference)
    return inputs, expected, data_label


def _check_fidelity(
    engine: Engine, source: Path, inputs: np.ndarray, expected: np.ndarray, data_label: str
) -> FidelityReport:
    """Run ``engine`` on ``inputs`` (split to its profile) and score it against ``expected``."""
    try:
        got = engine.run(inputs)
        return compare_outputs(expected, got, data=data_label)
    except (RuntimeBackendError, ValueError) as exc:
        raise RuntimeBackendError(
            f"{source}: cannot check the built TensorRT engine against its reference: {exc}"
        ) from exc


def _ideal_integer(
    model: onnx.ModelProto,
    input_name: str,
    dims: tuple[int | str | None, ...],
    inputs: np.ndarray,
    expected: np.ndarray,
    data_label: str,
) -> dict[str, Any] | None:
    """:func:`qatflow.runtimes.fidelity.ideal_integer_check` of a Q/DQ ``model`` on ``inputs``
    (None for a float model, or where the ideal graph cannot be built: it only explains)."""
    if not has_qdq(model):
        return None
    step = dims[0] if isinstance(dims[0], int) else len(inputs)

    def outputs_of(graph: onnx.ModelProto) -> np.ndarray:
        chunks = range(0, len(inputs), step)
        return np.concatenate(
            [reference_outputs(graph, input_name, inputs[i : i + step]) for i in chunks]
        )

    try:
        return ideal_integer_check(model, expected, outputs_of, data=data_label)
    except Exception as exc:  # a diagnostic of a failure already found: never mask it
        logger.warning("cannot score an ideal integer engine of this model: %r", exc)
        return None


def fidelity_error(
    source: Path, plan: BuildPlan, report: FidelityReport, ideal: dict[str, Any] | None = None
) -> RuntimeBackendError:
    """The error for an engine that failed its fidelity check (nothing has been written);
    ``ideal``: whether an ideal integer engine of the model passes (:func:`_ideal_integer`)."""
    hint = (
        " Try fp16=False (FP16 float layers lose precision), or report the model."
        if "fp16" in plan.precision
        else " Report the model with its build log messages."
    )
    because = f" Also, {ideal_integer_line(ideal)}." if ideal else ""
    return RuntimeBackendError(
        f"{source}: the TensorRT {plan.trt_version} engine (precision {plan.precision}) "
        f"disagrees with its reference, the source ONNX run as float math on ONNX Runtime: "
        f"{report.summary()}.{because} No engine was written.{hint}"
    )


def _configure(
    trt: ModuleType,
    builder: trt_t.Builder,
    plan: BuildPlan,
    options: TensorRTBuildOptions,
    input_name: str,
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
) -> trt_t.IBuilderConfig:
    """Builder config: plan flags, optimization level, workspace, verbosity, batch profile."""
    config: trt_t.IBuilderConfig = builder.create_builder_config()
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.builder_optimization_level = options.builder_optimization_level
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.layer_info:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile: trt_t.IOptimizationProfile = builder.create_optimization_profile()
    profile.set_shape(input_name, *(trt.Dims(list(shape)) for shape in shapes))
    config.add_optimization_profile(profile)
    return config


def _parse(
    trt: ModuleType,
    network: trt_t.INetworkDefinition,
    trt_logger: trt_t.ILogger,
    model: onnx.ModelProto,
    source: Path,
) -> None:
    parser: trt_t.OnnxParser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(model.SerializeToString(), str(source)):
        errors = [format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeBackendError(
            f"{source}: the TensorRT ONNX parser rejected the model:\n  " + "\n  ".join(errors)
        )


def _layer_info(trt: ModuleType, engine: trt_t.ICudaEngine, wanted: bool) -> tuple[Any, str | None]:
    """Per-layer engine information from the engine inspector, or the reason it is missing."""
    if not wanted:
        return None, "layer_info=False"
    try:
        inspector = engine.create_engine_inspector()
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        return json.loads(text), None
    except Exception as exc:  # informational only: never fail a good build over it
        return None, f"{type(exc).__name__}: {exc}"


def _options_dict(options: TensorRTBuildOptions, cache_path: Path | None) -> dict[str, Any]:
    values = dataclasses.asdict(options)
    values["timing_cache"] = None if cache_path is None else str(cache_path)
    return values


def _write_outputs(
    output: Path,
    plan_bytes: bytes,
    metadata: EngineMetadata,
    log: dict[str, Any],
    config: trt_t.IBuilderConfig,
    cache_path: Path | None,
) -> None:
    """Write engine, sidecar, build log and timing cache; all renamed only if all succeed.

    The timing cache is merged with the file's current content under its lock, held until the
    new file is in place.
    """
    with contextlib.ExitStack() as stack:
        writers: list[tuple[Path, Callable[[Path], object]]] = [
            (output, lambda tmp: tmp.write_bytes(plan_bytes))
        ]
        if cache_path is not None:
            stack.enter_context(tensorrt_timing_cache.locked(cache_path))
            update = tensorrt_timing_cache.merged(config, cache_path)
            log["timing_cache"].update(saved=update.data is not None, note=update.note)
            if update.data is not None:
                cache_bytes = update.data
                writers.append((cache_path, lambda tmp: tmp.write_bytes(cache_bytes)))
        writers += [
            (
                sidecar_path(output),
                lambda tmp: _write_json(tmp, sidecar_record(metadata, plan_bytes)),
            ),
            (build_log_path(output), lambda tmp: _write_json(tmp, log)),
        ]
        for final, write in writers:
            write(stack.enter_context(atomic_output(final)))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def build_log_path(engine_path: Path) -> Path:
    """``<engine>.build-log.json`` beside the engine."""
    return engine_path.with_name(engine_path.name + ".build-log.json")
