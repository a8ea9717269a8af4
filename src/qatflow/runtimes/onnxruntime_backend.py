"""ONNX Runtime (CPU) engines: an offline-optimized ONNX model with qatflow metadata.

Build: ONNX graph passes (the int8 rewrite hook) -> ORT offline optimization at the
``extended`` level (QDQ pairs fused into integer kernels, no hardware-specific layout
transforms) -> the float Convs' weights precomputed (``qatflow.onnx.float_weights``) -> the
fidelity check (and, for an engine that passes, one more with those weights constant, kept if it
passes too) -> metadata_props -> atomic save, checked to load in a plain InferenceSession.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import platform
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

from qatflow.errors import QatflowError, RuntimeBackendError
from qatflow.onnx.encoding import Encoding, encode_weights
from qatflow.onnx.float_weights import overridable_form, precompute_float_weights
from qatflow.onnx.validate import check_runnable
from qatflow.runtimes.base import (
    BatchProfile,
    Engine,
    EngineMetadata,
    check_batch,
    check_same_version,
    engine_input_shape,
    file_sha256,
    has_qdq,
    onnx_io,
    physical_cores,
    profile_shapes,
    sidecar_path,
    version_tuple,
)
from qatflow.runtimes.cpu_int8 import (
    ENCODING_CHOICES,
    EncodingChoice,
    choose_encoding,
    detect,
    float_kernels,
)
from qatflow.runtimes.fidelity import (
    FidelityCheck,
    FidelityReport,
    compare_outputs,
    first_divergence,
    ideal_integer_check,
    ideal_integer_line,
    reference_outputs,
)
from qatflow.runtimes.integer_share import node_share, time_share
from qatflow.storage import atomic_output

if TYPE_CHECKING:
    from qatflow.onnx.ort_int8 import ReluMode, RequantizeMode

logger = logging.getLogger("qatflow.runtimes.onnxruntime")

GraphPass = Callable[[onnx.ModelProto], onnx.ModelProto]
OptimizationLevel = Literal["basic", "extended", "all"]
ExecutionMode = Literal["sequential", "parallel"]

_LEVELS: dict[str, str] = {
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_MODES: dict[str, str] = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}
_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}
_INT8_REWRITE_MODULE = "qatflow.onnx.ort_int8"
_FIDELITY_BATCH = 32
# rewrite_for_ort_int8 (relu, requantize, fold_affine), tried in turn until the engine passes:
# the fast default, then no new requantization points, then that with only the last Convs in
# integer (bisected; the earlier ones float, every pass bit-exact but the folds of the integer
# ones), down to none. Relus stay exact in all: "absorb" keeps values above 127 x scale that
# TensorRT clips, and a QAT model learns to rely on that clipping (its smoke-run engine agreed
# on 95.5 % only; docs/exact-int8.md).
RewriteMode = tuple["ReluMode", "RequantizeMode", bool]
# A rewrite fitted to the check's own samples must pass with its p99 error within this share
# of the tolerance, so that other data pass too (_search_rewrites): the fast rewrite's new
# requantization points are calibrated on those samples, and the bisection keeps the largest
# number of integer Convs that passes on them.
FITTED_REWRITE_MARGIN = 0.75
FAST_REWRITE: RewriteMode = ("exact", "calibrated", True)
EXACT_REWRITE: RewriteMode = ("exact", "none", True)
_REWRITE_KEYS = ("relu", "requantize", "fold_affine")
_METADATA_PREFIX = "qatflow."
_STRING_FIELDS = frozenset(
    {
        "format",
        "runtime",
        "runtime_version",
        "source_onnx",
        "source_sha256",
        "input_name",
        "output_name",
    }
)


@dataclasses.dataclass(frozen=True)
class OrtBuildOptions:
    """ONNX Runtime build options (``build_engine(..., runtime="onnxruntime", **options)``).

    threads: intra-op threads recorded as the engine's default (None: physical cores at load).
    encoding: integer weight encoding, ``"auto"`` (the exact fast one on this CPU, see
        :mod:`qatflow.runtimes.cpu_int8`), ``"u8s8"`` or ``"u8u8"``.
    execution_mode: ``"sequential"`` or ``"parallel"`` (inter-op parallelism of branches).
    optimization_level: ORT level baked into the saved model; ``"extended"`` (default) fuses
        QDQ pairs into integer kernels and stays portable; ``"all"`` adds layout transforms
        that ORT marks as valid only on the machine that built them.
    int8_rewrite: apply ``qatflow.onnx.ort_int8.rewrite_for_ort_int8``.
    """

    threads: int | None = None
    encoding: EncodingChoice = "auto"
    execution_mode: ExecutionMode = "sequential"
    optimization_level: OptimizationLevel = "extended"
    int8_rewrite: bool = True

    def __post_init__(self) -> None:
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise RuntimeBackendError(f"threads must be a positive integer, got {self.threads!r}")
        if self.encoding not in ENCODING_CHOICES:
            raise RuntimeBackendError(
                f"encoding must be one of {list(ENCODING_CHOICES)}, got {self.encoding!r}"
            )
        if self.execution_mode not in _MODES:
            raise RuntimeBackendError(
                f"execution_mode must be one of {sorted(_MODES)}, got {self.execution_mode!r}"
            )
        if self.optimization_level not in _LEVELS:
            raise RuntimeBackendError(
                f"optimization_level must be one of {sorted(_LEVELS)}, "
                f"got {self.optimization_level!r}"
            )


# --------------------------------------------------------------------------- graph passes


def ort_graph_passes(
    model: onnx.ModelProto,
    *,
    int8_rewrite: bool,
    encoding: Encoding = "u8s8",
    rewrite: RewriteMode = FAST_REWRITE,
    calibration: list[dict[str, np.ndarray]] | None = None,
    integer_convs: Collection[str] | None = None,
) -> list[tuple[str, GraphPass]]:
    """Ordered ONNX graph passes applied before ORT optimizes and saves the model.

    For a graph with QuantizeLinear nodes: ``rewrite_for_ort_int8`` (when ``int8_rewrite`` is on,
    with the ``(relu, requantize, fold_affine)`` of ``rewrite``, ``calibration`` and
    ``integer_convs``), then the weight ``encoding``
    (:func:`qatflow.onnx.encoding.encode_weights`).
    """
    passes: list[tuple[str, GraphPass]] = []
    if not has_qdq(model):
        return passes
    if int8_rewrite:
        from qatflow.onnx.ort_int8 import rewrite_for_ort_int8

        relu, requantize, fold_affine = rewrite

        def rewritten(graph: onnx.ModelProto) -> onnx.ModelProto:
            return rewrite_for_ort_int8(
                graph,
                calibration=calibration,
                relu=relu,
                requantize=requantize,
                fold_affine=fold_affine,
                integer_convs=integer_convs,
            )

        passes.append((f"{_INT8_REWRITE_MODULE}.rewrite_for_ort_int8", rewritten))
    if encoding != "u8s8":

        def encoded(graph: onnx.ModelProto) -> onnx.ModelProto:
            encode_weights(graph, encoding)
            return graph

        passes.append((f"qatflow.onnx.encoding.encode_weights({encoding})", encoded))
    return passes


def _apply_passes(
    model: onnx.ModelProto, passes: list[tuple[str, GraphPass]], source: Path
) -> onnx.ModelProto:
    for name, graph_pass in passes:
        try:
            model = graph_pass(model)
        except QatflowError:
            raise
        except Exception as exc:
            raise RuntimeBackendError(f"{source}: graph pass {name} failed: {exc!r}") from exc
        logger.info("applied graph pass %s to %s", name, source)
    return model


# --------------------------------------------------------------------------- metadata


def write_ort_metadata(model: onnx.ModelProto, metadata: EngineMetadata) -> None:
    """Store ``metadata`` as ``qatflow.<field>`` entries of ``model.metadata_props``."""
    keep = [p for p in model.metadata_props if not p.key.startswith(_METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in metadata.to_dict().items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        model.metadata_props.add(key=_METADATA_PREFIX + key, value=text)


def read_ort_metadata(model: onnx.ModelProto, path: Path) -> EngineMetadata | None:
    """qatflow metadata of an ORT engine, or None for a plain ONNX model (an exported one's
    ``qatflow.source_model`` and ``qatflow.quantized`` props are no engine metadata)."""
    raw = {
        p.key[len(_METADATA_PREFIX) :]: p.value
        for p in model.metadata_props
        if p.key.startswith(_METADATA_PREFIX)
    }
    if "format" not in raw:
        return None
    data: dict[str, Any] = {}
    for key, text in raw.items():
        try:
            data[key] = text if key in _STRING_FIELDS else json.loads(text)
        except json.JSONDecodeError as exc:
            raise RuntimeBackendError(f"{path}: metadata entry qatflow.{key} is not JSON") from exc
    return EngineMetadata.from_dict(data, path)


# --------------------------------------------------------------------------- build


def build_ort_engine(
    source: Path,
    output: Path,
    batch_profile: BatchProfile,
    options: OrtBuildOptions,
    check: FidelityCheck,
) -> Path:
    """Optimize ``source`` offline with ONNX Runtime, check it against its reference and save it.

    ``check`` says which inputs the engine is compared with its reference on.
    When the engine fails the check, it is rebuilt with the exact rewrites in turn (no
    requantization points; then batch norm folded into fewer Convs, the others float; then
    none: see :func:`_search_rewrites`); if it still fails, nothing is written and the error
    names the first diverging tensor.
    """
    import onnxruntime as ort

    model = _read_onnx(source)
    input_name, dims, output_name = onnx_io(model, source)
    profile_shapes(input_name, dims, batch_profile, source)
    quantized = has_qdq(model)
    encoding = choose_encoding(options.encoding) if quantized else None
    if encoding is not None and encoding not in detect().exact:
        raise RuntimeBackendError(
            f"{source}: encoding {encoding} is not exact on this CPU ({detect().isa}): ONNX "
            f"Runtime's {encoding} kernels saturate here; use --encoding auto or u8u8"
        )
    batches, data_label = check.batches(model, source)
    chunk = dims[0] if isinstance(dims[0], int) else _FIDELITY_BATCH
    inputs = np.concatenate(batches)
    if isinstance(dims[0], int):  # a fixed batch: whole batches only
        inputs = inputs[: len(inputs) - len(inputs) % chunk]
    if not len(inputs):
        raise RuntimeBackendError(
            f"{source}: the fidelity data holds fewer samples than the model's fixed batch {chunk}"
        )
    # With data the engine is compared with the source model; synthetic inputs (no data) are
    # out of distribution, so they check the kernels only: engine vs the prepared graph.
    reference = (
        None if check.data is None else _outputs(model, inputs, input_name, output_name, chunk)
    )
    calibration = None if check.data is None else [{input_name: b} for b in batches]
    threads = options.threads or physical_cores()
    trials = _Trials(
        source,
        model,
        options,
        encoding or "u8s8",
        threads,
        calibration,
        data_label,
        inputs,
        reference,
        (input_name, output_name, chunk),
    )
    built = _search_rewrites(trials, quantized and options.int8_rewrite)
    if built.accepted:
        built = trials.with_constant_weights(built)
    else:
        raise _fidelity_error(
            source, built.prepared, input_name, inputs, built.report, encoding, trials.ideal
        )
    passes, optimized, report = built.passes, built.optimized, built.report
    if trials.ideal is not None:
        details = {**report.details, "ideal_integer": trials.ideal}
        report = dataclasses.replace(report, details=details)
    logger.info("%s: %s", source, report.summary())
    ops = collections.Counter(node.op_type for node in optimized.graph.node)
    share = {
        "nodes": node_share(ops),
        "time": time_share(
            optimized,
            _session_options(threads, options.execution_mode, "all"),
            {input_name: inputs[:chunk]},
        ),
    }
    metadata = EngineMetadata(
        runtime="onnxruntime",
        runtime_version=ort.__version__,
        source_onnx=str(source.resolve()),
        source_sha256=file_sha256(source),
        input_name=input_name,
        input_shape=engine_input_shape(dims),
        output_name=output_name,
        batch_profile=batch_profile,
        build_options={
            **dataclasses.asdict(options),
            "encoding": encoding,
            "rewrite": built.record() if quantized and options.int8_rewrite else None,
            "refused_rewrites": trials.refused,
            "graph_passes": [name for name, _ in passes],
            "optimized_ops": dict(sorted(ops.items())),
            "float_weights": built.float_weights,
            "float_weights_constant": built.constant_weights,
            "constant_weights_refused": trials.constant_refused,
            "integer_share": share,
        },
        device=detect().to_dict(),
        fidelity=report.to_dict(),
    )
    write_ort_metadata(optimized, metadata)
    with atomic_output(output) as tmp_output:
        onnx.save(optimized, tmp_output)
        _check_plain_session(tmp_output, output)
    logger.info(
        "ONNX Runtime engine %s built from %s (ops %s; integer share %s)",
        output,
        source,
        dict(ops),
        share,
    )
    return output


@dataclasses.dataclass(frozen=True)
class _IntegerLast:
    """The last ``count`` of ``candidates`` (Conv names in graph order) allowed in integer."""

    candidates: tuple[str, ...]
    count: int

    @property
    def names(self) -> tuple[str, ...]:
        return self.candidates[len(self.candidates) - self.count :] if self.count else ()


@dataclasses.dataclass(frozen=True)
class _Attempt:
    """One engine built with one rewrite, and how it scored against its reference."""

    rewrite: RewriteMode
    integer: _IntegerLast | None  # None: every Conv that can run in integer does
    passes: list[tuple[str, GraphPass]]
    prepared: onnx.ModelProto
    expected: np.ndarray  # what it is checked against: the reference, or (synthetic) prepared's
    fused: onnx.ModelProto  # ORT's offline optimization
    optimized: onnx.ModelProto  # fused, then precompute_float_weights
    float_weights: int  # float Convs given precomputed weights
    report: FidelityReport
    accepted: bool  # passed, within the search margin where one applies
    constant_weights: bool = False  # the float weights are constants (NCHWc), not overridable

    def record(self) -> dict[str, Any]:
        """The rewrite as the engine metadata records it (``integer_last`` only when partial,
        ``float_weights`` only when constant)."""
        record: dict[str, Any] = dict(zip(_REWRITE_KEYS, self.rewrite, strict=True))
        if self.integer is not None:
            record["integer_last"] = self.integer.count
            record["integer_candidates"] = len(self.integer.candidates)
        if self.constant_weights:
            record["float_weights"] = "constant"
        return record


@dataclasses.dataclass
class _Trials:
    """What each engine attempt of one build shares, and what the refused ones left."""

    source: Path
    model: onnx.ModelProto
    options: OrtBuildOptions
    encoding: Encoding
    threads: int
    calibration: list[dict[str, np.ndarray]] | None
    data_label: str
    inputs: np.ndarray
    reference: np.ndarray | None  # None: synthetic data, each engine vs its prepared graph
    io: tuple[str, str, int]  # input name, output name, batch chunk
    refused: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    constant_refused: dict[str, Any] | None = None  # the refused constant-weights check
    ideal: dict[str, Any] | None = None

    def outputs(self, model: onnx.ModelProto, threads: int | None = None) -> np.ndarray:
        return _outputs(model, self.inputs, *self.io, threads, self.options.execution_mode)

    def attempt(
        self, rewrite: RewriteMode, integer: _IntegerLast | None = None, margin: float = 1.0
    ) -> _Attempt:
        """Build with ``rewrite`` (``integer``: only those Convs in integer, see
        ``rewrite_for_ort_int8``'s ``integer_convs``) and score it. Accepted when it passes with
        its p99 error within ``margin`` of the tolerance; a refused attempt is logged and
        recorded, with the ideal integer check (with data)."""
        passes = ort_graph_passes(
            self.model,
            int8_rewrite=self.options.int8_rewrite,
            encoding=self.encoding,
            rewrite=rewrite,
            calibration=self.calibration,
            integer_convs=None if integer is None else integer.names,
        )
        prepared = _apply_passes(self.model, passes, self.source)
        fused = _optimize(prepared, self.source, passes, self.threads, self.options)
        expected = self.reference if self.reference is not None else self.outputs(prepared)
        optimized, float_weights = precompute_float_weights(fused)
        report, accepted = self._score(expected, optimized, margin)
        tried = _Attempt(
            rewrite,
            integer,
            passes,
            prepared,
            expected,
            fused,
            optimized,
            float_weights,
            report,
            accepted,
        )
        if not accepted:
            self.refused.append(self._refuse(tried, margin))
        return tried

    def with_constant_weights(self, chosen: _Attempt) -> _Attempt:
        """``chosen`` (an accepted attempt) with its float weights constant, if that passes too
        with its p99 error within ``FITTED_REWRITE_MARGIN`` of the tolerance (the choice is
        made on the check's samples), else ``chosen``.

        Constant weights let ONNX Runtime fold batch norms into the float Convs and run them on
        its NCHWc kernels (1.7-2x faster where measured), in another summation order; some nets
        amplify that rounding past the tolerance (docs/exact-int8.md, "Float weights").
        """
        if not chosen.float_weights:
            return chosen
        optimized, _ = precompute_float_weights(chosen.fused, overridable=False)
        report, accepted = self._score(chosen.expected, optimized, FITTED_REWRITE_MARGIN)
        tried = dataclasses.replace(
            chosen, optimized=optimized, report=report, accepted=accepted, constant_weights=True
        )
        if accepted:  # the report keeps what the overridable form, the loader's fallback, scored
            details = {**report.details, "overridable_weights": chosen.report.summary()}
            return dataclasses.replace(tried, report=dataclasses.replace(report, details=details))
        self.constant_refused = self._refuse(tried, FITTED_REWRITE_MARGIN, ideal=False)
        return chosen

    def _score(
        self, expected: np.ndarray, optimized: onnx.ModelProto, margin: float
    ) -> tuple[FidelityReport, bool]:
        """``optimized`` checked against ``expected``, and whether it passes with its p99 error
        within ``margin`` of the tolerance."""
        report = compare_outputs(
            expected, self.outputs(optimized, self.threads), data=self.data_label
        )
        return report, report.passed and report.p99_abs_error <= margin * report.tolerance

    def _refuse(self, tried: _Attempt, margin: float, *, ideal: bool = True) -> dict[str, Any]:
        """Log a refused attempt and return its record; ``ideal``: with the ideal integer check
        (once, with data), which says nothing about a float-weight form."""
        wanted = ideal and self.options.int8_rewrite
        if self.ideal is None and self.reference is not None and wanted:
            self.ideal = ideal_integer_check(
                self.model, self.reference, self.outputs, data=self.data_label
            )
        because = f"; {ideal_integer_line(self.ideal)}" if self.ideal and ideal else ""
        if tried.report.passed:
            because = (
                f"; p99 above {margin:.0%} of the tolerance, the margin a choice fitted to "
                f"these samples needs{because}"
            )
        logger.warning(
            "%s: %s (rewrite %s)%s", self.source, tried.report.summary(), tried.record(), because
        )
        return {
            **tried.record(),
            "agreement": tried.report.agreement,
            "decided_agreement": tried.report.decided_agreement,
            "beyond_tolerance": tried.report.beyond_tolerance,
            "p99_abs_error": tried.report.p99_abs_error,
            "p99_required": margin * tried.report.tolerance,
        }


def _search_rewrites(trials: _Trials, rewriting: bool) -> _Attempt:
    """The first engine that passes its check, else the last one tried.

    Tried in turn: the fast rewrite (accepted with p99 within ``FITTED_REWRITE_MARGIN`` of the
    tolerance: its requantization points are calibrated on the check's samples), the exact
    one, then the exact one with only the last ``k`` of the Convs it runs in integer still
    integer, ``k`` found by bisection (deep nets amplify the rounding of each integer Conv,
    most of all the early ones), and last with none (every pass bit-exact). The earlier Convs
    stay float exactly: unfolded beside their batch norms, or kept from fusing
    (``rewrite_for_ort_int8``'s ``integer_convs``), and so do the non-Conv integer kernels
    before them. The bisection picks the largest ``k`` that
    passes on the check's samples, so it asks for room: p99 within ``FITTED_REWRITE_MARGIN`` of
    the tolerance, so that other data pass too.
    """
    if not rewriting:
        return trials.attempt(FAST_REWRITE)
    for rewrite, margin in ((FAST_REWRITE, FITTED_REWRITE_MARGIN), (EXACT_REWRITE, 1.0)):
        tried = trials.attempt(rewrite, margin=margin)
        if tried.accepted:
            return tried
    from qatflow.onnx.integer_kernels import integer_convs

    candidates = tuple(integer_convs(tried.prepared))  # what the exact rewrite runs in integer
    low, high, best = 0, len(candidates), None
    while high - low > 1:
        middle = (low + high) // 2
        partial = trials.attempt(
            EXACT_REWRITE, _IntegerLast(candidates, middle), FITTED_REWRITE_MARGIN
        )
        if partial.accepted:
            low, best = middle, partial
        else:
            high = middle
    return best or trials.attempt(EXACT_REWRITE, _IntegerLast(candidates, 0))


def _outputs(
    model: onnx.ModelProto,
    inputs: np.ndarray,
    input_name: str,
    output_name: str,
    chunk: int,
    threads: int | None = None,
    execution_mode: str = "sequential",
) -> np.ndarray:
    """``output_name`` of ``model`` on ``inputs``, in batches of ``chunk``: as float math (the
    reference) without ``threads``, else in a session as ``load_ort_engine`` opens one."""
    run: Callable[[np.ndarray], np.ndarray]
    if threads is None:
        run = functools.partial(reference_outputs, model, input_name)
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(
            model.SerializeToString(),
            _session_options(threads, execution_mode, "all"),
            providers=["CPUExecutionProvider"],
        )
        run = lambda batch: session.run([output_name], {input_name: batch})[0]  # noqa: E731
    return np.concatenate([run(inputs[i : i + chunk]) for i in range(0, len(inputs), chunk)])


def _optimize(
    prepared: onnx.ModelProto,
    source: Path,
    passes: list[tuple[str, GraphPass]],
    threads: int,
    options: OrtBuildOptions,
) -> onnx.ModelProto:
    """ORT's offline optimization of ``prepared`` at ``options.optimization_level``."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="qatflow-ort-") as tmp:
        prepared_path = Path(tmp) / "prepared.onnx"
        onnx.save(prepared, prepared_path)
        optimized_path = Path(tmp) / "optimized.onnx"
        session_options = _session_options(
            threads, options.execution_mode, options.optimization_level
        )
        session_options.optimized_model_filepath = str(optimized_path)
        try:
            ort.InferenceSession(
                str(prepared_path), session_options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            after = f" (after graph passes {[name for name, _ in passes]})" if passes else ""
            raise RuntimeBackendError(
                f"{source}: ONNX Runtime {ort.__version__} cannot optimize this model{after}: {exc}"
            ) from exc
        return onnx.load(optimized_path)


def _fidelity_error(
    source: Path,
    prepared: onnx.ModelProto,
    input_name: str,
    inputs: np.ndarray,
    report: FidelityReport,
    encoding: str | None,
    ideal: dict[str, Any] | None,
) -> RuntimeBackendError:
    isa = detect().isa
    divergence = first_divergence(prepared, input_name, inputs[:32])
    where = (
        f"first diverging tensor {divergence[0]!r} ({divergence[1]:.1%} of its values differ "
        "by more than one step between the integer kernels and float math)"
        if divergence
        else "no quantized tensor diverges between integer kernels and float math, so the "
        "graph passes themselves moved the result"
    )
    if ideal is not None:
        where += f"; {ideal_integer_line(ideal)}"
    advice = (
        "Try --encoding u8u8 (exact on every CPU), or report the model."
        if encoding == "u8s8"
        else "Report the model, with this message."
    )
    return RuntimeBackendError(
        f"{source}: the ONNX Runtime engine (encoding {encoding}, CPU {isa}) disagrees with its "
        f"reference, the same QDQ model run as float math: {report.summary()}; {where}. "
        f"No engine was written. {advice}"
    )


def _check_plain_session(path: Path, final: Path) -> None:
    """The saved engine must load in a default ``InferenceSession`` (default optimization)."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RuntimeBackendError(
            f"{final}: the optimized model does not load in a plain ONNX Runtime session: {exc}"
        ) from exc


def _session_options(threads: int, execution_mode: str, level: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # not one warning per overridable float weight
    options.intra_op_num_threads = threads
    options.execution_mode = getattr(ort.ExecutionMode, _MODES[execution_mode])
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    return options


def _read_onnx(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(path)
    except Exception as exc:
        raise RuntimeBackendError(
            f"{path} is neither an ONNX model nor a TensorRT engine with a "
            f"{sidecar_path(path).name} sidecar ({type(exc).__name__}: {exc})"
        ) from exc
    if model.ir_version < 1 or not model.graph.node:
        raise RuntimeBackendError(
            f"{path} is neither an ONNX model nor a TensorRT engine with a "
            f"{sidecar_path(path).name} sidecar (no ONNX graph in it)"
        )
    return model


# --------------------------------------------------------------------------- load and run


class OnnxRuntimeEngine(Engine):
    """An ONNX model run by an ONNX Runtime CPU session."""

    def __init__(self, path: Path, metadata: EngineMetadata, session: Any, threads: int) -> None:
        super().__init__(path, metadata)
        self._session = session
        self._threads = threads
        input_type = session.get_inputs()[0].type
        if input_type not in _DTYPES:
            raise RuntimeBackendError(
                f"{path}: input {metadata.input_name!r} has unsupported type {input_type}"
            )
        self._dtype = _DTYPES[input_type]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch of any size and return the first model output (logits)."""
        array = np.ascontiguousarray(batch, dtype=self._dtype)
        check_batch(array, self.input_name, self.input_shape)
        outputs = self._session.run([self._metadata.output_name], {self.input_name: array})
        return np.asarray(outputs[0])

    @property
    def runtime_version(self) -> str:
        """Installed onnxruntime version."""
        import onnxruntime as ort

        return str(ort.__version__)

    @property
    def device(self) -> str:
        """``"cpu (<machine>)"``, as for Keras models evaluated on the CPU."""
        return f"cpu ({platform.machine()})"

    @property
    def threads(self) -> int:
        """Intra-op threads of the session."""
        return self._threads

    @property
    def session(self) -> Any:
        """The underlying ``onnxruntime.InferenceSession``."""
        return self._session


def load_ort_engine(path: Path, *, threads: int | None = None) -> OnnxRuntimeEngine:
    """Load an ORT engine (or a plain ONNX model without qatflow metadata)."""
    import onnxruntime as ort

    model = _read_onnx(path)
    metadata = read_ort_metadata(model, path)
    if metadata is None:
        logger.info("%s has no qatflow metadata; loading it as a plain ONNX model", path)
        check_runnable(model, path)
        metadata = _plain_model_metadata(model, path)
    elif metadata.runtime != "onnxruntime":
        raise RuntimeBackendError(
            f"{path} was built for runtime {metadata.runtime!r}, not onnxruntime"
        )
    else:
        check_same_version(path, "onnxruntime", metadata.runtime_version, ort.__version__, 1)
        if version_tuple(metadata.runtime_version)[:2] != version_tuple(ort.__version__)[:2]:
            logger.warning(
                "%s was built with onnxruntime %s and is loaded by %s; rebuild it if loading fails",
                path,
                metadata.runtime_version,
                ort.__version__,
            )
    check_encoding_exact(path, metadata)
    options = metadata.build_options
    chosen = threads or options.get("threads") or physical_cores()
    session_options = _session_options(chosen, options.get("execution_mode", "sequential"), "all")
    try:
        session = ort.InferenceSession(
            _checked_form(path, model, metadata),
            session_options,
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:
        built = metadata.runtime_version or "an unknown version"
        raise RuntimeBackendError(
            f"{path}: onnxruntime {ort.__version__} cannot load this model (built with "
            f"{built}): {exc}"
        ) from exc
    return OnnxRuntimeEngine(path, metadata, session, chosen)


def _checked_form(path: Path, model: onnx.ModelProto, metadata: EngineMetadata) -> str | bytes:
    """What the session runs: the file, or, for an engine whose float Convs read constant
    weights built on a CPU with other float kernels, the overridable form, which its build
    checked too.

    Constant weights run on NCHWc kernels whose summation order depends on the CPU's float
    kernel family (``cpu_int8.float_kernels``); the build checked them on its own. The
    overridable form runs ORT's plain Conv kernels, which computed the same numbers on AVX-512
    and AVX2 in every engine measured (docs/exact-int8.md, "Float weights").
    """
    if not metadata.build_options.get("float_weights_constant"):
        return str(path)
    built = float_kernels(metadata.device.get("flags") or ())
    here = float_kernels(detect().flags)
    if built == here:
        return str(path)
    logger.info(
        "%s: built with constant float weights on %s float kernels; this CPU runs %s ones, so "
        "its float Convs read the overridable form the build checked too (%s)",
        path,
        built,
        here,
        (metadata.fidelity.get("details") or {}).get("overridable_weights", "not recorded"),
    )
    return overridable_form(model).SerializeToString()


def check_encoding_exact(path: Path, metadata: EngineMetadata) -> None:
    """Refuse an engine whose integer encoding this CPU's ORT kernels do not compute exactly."""
    encoding = metadata.build_options.get("encoding")
    here = detect()
    if not encoding or encoding in here.exact:
        return
    built = metadata.device.get("isa", "an unknown CPU")
    raise RuntimeBackendError(
        f"{path}: this engine stores {encoding} integer weights, exact on the CPU it was built "
        f"on ({built}), but ONNX Runtime's {encoding} kernels saturate on this CPU "
        f"({here.isa}; exact here: {', '.join(here.exact) or 'none'}), so its results would be "
        f"wrong. Rebuild it on this machine: qatflow build-engine {metadata.source_onnx} "
        f"--output {path} --encoding auto"
    )


def _plain_model_metadata(model: onnx.ModelProto, path: Path) -> EngineMetadata:
    input_name, dims, output_name = onnx_io(model, path)
    batch = dims[0] if dims and isinstance(dims[0], int) else 1
    return EngineMetadata(
        runtime="onnxruntime",
        runtime_version="",
        source_onnx=str(path.resolve()),
        source_sha256=file_sha256(path),
        input_name=input_name,
        input_shape=engine_input_shape(dims),
        output_name=output_name,
        batch_profile=(batch, batch, batch),
    )


__all__ = [
    "GraphPass",
    "OnnxRuntimeEngine",
    "OrtBuildOptions",
    "build_ort_engine",
    "check_encoding_exact",
    "load_ort_engine",
    "ort_graph_passes",
    "read_ort_metadata",
    "write_ort_metadata",
]
