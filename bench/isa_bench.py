"""INT8 on every CPU: latency and fidelity of qatflow's ORT INT8 engines, labelled with the ISA.

Run: ``.venv/bin/python -m bench.isa_bench [--part latency|fidelity] [--runs N] [--threads 2]
[--save DIR] [--from DIR]``.

It prints this CPU's INT8 facts first (``qatflow.runtimes.cpu_int8.detect()``: the flags, the
ISA and the integer encodings ONNX Runtime computes exactly here), and labels every table with
them. Then, each part measured in one run:

1. **Latency** at batch 1 (``--threads`` intra-op threads, 2 by default): for
   ``keras.applications`` ResNet50, MobileNetV2 and EfficientNetB0 (``weights=None``,
   224x224x3, 1000 classes, batch-norm statistics from Fashion-MNIST images via
   ``bench.ort_int8_bench.data_init_batchnorm``), side by side with calls interleaved in blocks:
   the FP32 engine (``build_engine`` of the FP32 ONNX), the qatflow INT8 engine (placed for
   ONNX Runtime, ``quantize_model(runtime="onnxruntime")``; PTQ on a few Fashion-MNIST-as-RGB
   images, ``encoding="auto"``) and ONNX Runtime's own ``quantize_static``
   (QDQ, per-channel, uint8 activations) with int8 weights (U8S8) and with uint8 weights (U8U8),
   run as saved in a plain session. Each table gives p50, the speed-up over FP32, the ratio to
   the ``quantize_static`` configuration that is exact on this CPU (U8S8 where its kernels do not
   saturate, else U8U8), the engine's encoding, the share of convolutions/matrix products that
   run as integer kernels and the fidelity verdict (engine vs its QDQ source run as float math,
   on the calibration images).

   ``--save DIR`` keeps the ONNX files and calibration images; ``--from DIR`` times such a
   folder on another machine with no TensorFlow at all (or on the same one as a CPU without
   VNNI: ``CPUID_MASK=avx2 LD_PRELOAD=bench/cpuid_mask.so``, where the kernel offers CPUID
   faulting; this module imports only numpy, onnx, onnxruntime, ``qatflow.runtimes``,
   ``qatflow.onnx.reference`` and ``qatflow.params`` at its top level; Keras is imported
   inside the functions that need it).
2. **Fidelity** on models trained briefly here on Fashion-MNIST: the demo model (28x28x1, also
   on images thresholded to 0/1, the saturation worst case) and ResNet50, MobileNetV2
   (alpha 0.35), EfficientNetB0, ResNet50V2 and DenseNet121 at 32x32x3 and InceptionV3 at
   75x75x3. For each: Keras FP32 accuracy, PTQ (quantize placed for ONNX Runtime +
   percentile calibration) -> export -> ``build_engine`` (fidelity data: ``--fidelity-check``
   further training images, used neither to train nor to calibrate, as the pipeline checks on
   its validation split), then on held-out test images the engine's top-1 agreement with the
   Keras QDQ model and with the ONNX reference (``run_reference``), the gate's measures on them
   (decided agreement, p99 error and tolerance: ``compare_outputs``), its accuracy, its
   encoding and its build-time fidelity report.

A step that fails (an export, a build) is recorded with its error text in the table and the
bench goes on with the next one.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("QATFLOW_NO_PROGRESS", "1")

import numpy as np
import onnx

from bench import PLACEMENT_RUNTIME
from qatflow.onnx.reference import run_reference
from qatflow.params import ENGINE
from qatflow.runtimes import build_engine, load_engine
from qatflow.runtimes.cpu_int8 import INT8_FLAGS, CpuInt8, choose_encoding, detect
from qatflow.runtimes.fidelity import compare_outputs

CPUINFO = Path("/proc/cpuinfo")
LATENCY_MODELS = ("ResNet50", "MobileNetV2", "EfficientNetB0")
FP32 = "FP32"
QATFLOW = "qatflow INT8"
STATIC = {"u8s8": "quantize_static U8S8", "u8u8": "quantize_static U8U8"}
VARIANTS = (FP32, QATFLOW, STATIC["u8s8"], STATIC["u8u8"])
# Timed only when the qatflow engine could not be built: the graph build_engine would have
# optimized, unchecked (so the latency is known while the build fails).
UNGATED = "qatflow INT8, ungated"
# File of each variant in a saved folder (one sub-folder per model).
VARIANT_FILES = {
    FP32: "fp32.onnx",
    QATFLOW: "qatflow_qdq.onnx",
    STATIC["u8s8"]: "quantize_static_u8s8.onnx",
    STATIC["u8u8"]: "quantize_static_u8u8.onnx",
}
# Variants built with build_engine (the others are timed as saved, in a plain session).
ENGINE_VARIANTS = (FP32, QATFLOW)
CALIBRATION_FILE = "calibration.npy"
MANIFEST = "manifest.json"
NONE = "-"
# Models whose keras.applications preprocessing expects pixels in [0, 255].
PIXELS_0_255 = frozenset({"EfficientNetB0"})

_INTEGER_PREFIXES = ("QLinear", "QGemm")
_FLOAT_COMPUTE = frozenset(
    {"Conv", "FusedConv", "NhwcFusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"}
)
_INTEGER_COMPUTE = frozenset(
    {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "NhwcQLinearConv"}
)


# ---------------------------------------------------------------------------------------------
# The CPU
# ---------------------------------------------------------------------------------------------


def cpu_model_name(cpuinfo: Path = CPUINFO) -> str:
    """``model name`` of the first processor in ``cpuinfo`` (``"unknown CPU"`` if none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "unknown CPU"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return " ".join(value.split())
    return "unknown CPU"


def flags_line(cpuinfo: Path = CPUINFO) -> str:
    """The INT8 flags of ``cpuinfo``, as ``grep -ow -E 'amx_int8|...' /proc/cpuinfo | sort -u``
    would list them, on one line (``(none)`` when there are none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    present: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            present |= set(value.split())
    found = sorted(flag for flag in INT8_FLAGS if flag in present)
    return " ".join(found) or "(none)"


def cpuid_mask(environ: Mapping[str, str] = os.environ) -> str | None:
    """The profile of ``bench/cpuid_mask.so`` when this process runs under it, else None."""
    if "cpuid_mask" not in environ.get("LD_PRELOAD", ""):
        return None
    return environ.get("CPUID_MASK")


def isa_label(cpu: CpuInt8, model_name: str | None = None, mask: str | None = None) -> str:
    """``"AMD EPYC, avx512_vnni (exact: u8s8, u8u8)"``: the label every table carries; with
    ``, CPUID masked to avx2`` when the kernels were chosen from a masked CPUID."""
    name = model_name if model_name is not None else cpu_model_name()
    exact = ", ".join(cpu.exact) or "none"
    masked = f", CPUID masked to {mask}" if mask else ""
    return f"{name}, {cpu.isa} (exact: {exact}){masked}"


def exact_baseline(exact: Sequence[str]) -> str:
    """The ``quantize_static`` configuration that is exact on a CPU whose exact encodings are
    ``exact``: U8S8 (the fast kernels) where they do not saturate, else U8U8."""
    return STATIC["u8s8"] if "u8s8" in exact else STATIC["u8u8"]


def print_cpu(cpu: CpuInt8) -> None:
    """The CPU block printed before any table."""
    print(f"CPU: {cpu_model_name()}")
    print(f"detect(): {json.dumps(cpu.to_dict())}")
    print(f"grep -ow -E '{'|'.join(INT8_FLAGS)}' {CPUINFO} | sort -u: {flags_line()}")
    mask = cpuid_mask()
    if mask:
        print(
            f"CPUID masked to {mask} by bench/cpuid_mask.so: native instructions, kernels "
            "chosen from the masked CPUID (detect() above); /proc/cpuinfo lists the host"
        )
    print(f"exact quantize_static baseline here: {exact_baseline(cpu.exact)}")


# ---------------------------------------------------------------------------------------------
# Table formatting (pure)
# ---------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table (what bench/README.md holds); a ``|`` inside a cell becomes ``/``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(fidelity: Mapping[str, Any] | None) -> str:
    """One cell for a fidelity report dict (``FidelityReport.to_dict()``)."""
    if not fidelity:
        return NONE
    word = "pass" if fidelity.get("passed") else "**FAIL**"
    decided = fidelity.get("decided_samples")
    of = f" of {decided}" if decided is not None else ""
    return (
        f"{word}: {fidelity['agreement']:.1%} agree, {fidelity['decided_agreement']:.1%}{of} "
        f"decided{_proves(fidelity)},{_beyond(fidelity)} p99 {fidelity['p99_abs_error']:.3g} "
        f"(tol {fidelity['tolerance']:.3g})"
    )


def _beyond(report: Mapping[str, Any]) -> str:
    """How many samples lie beyond the tolerance (of how many allowed), where recorded."""
    beyond = report.get("beyond_tolerance")
    if beyond is None:
        return ""
    return f" {beyond} of {report['samples']} beyond tol (at most {report['max_beyond']}),"


def _proves(report: Mapping[str, Any]) -> str:
    """What the decided samples prove (95 % lower bound), where the report records it."""
    proven = report.get("proven_agreement")
    return "" if proven is None else f" (proves {proven:.2%})"


def _rewrite_name(rewrite: Mapping[str, Any]) -> str:
    """``exact/calibrated``, or ``exact/none/integer 26 of 53`` when only the last 26 of the 53
    Convs the rewrite can run in integer do; ``+constant weights`` when its float Convs read
    constant weights."""
    partial = ""
    if rewrite.get("integer_last") is not None:
        partial = f"/integer {rewrite['integer_last']} of {rewrite.get('integer_candidates', '?')}"
    if rewrite.get("float_weights") == "constant":
        partial += "+constant weights"
    return f"{rewrite['relu']}/{rewrite['requantize']}{partial}"


def engine_encoding(build_options: Mapping[str, Any]) -> str | None:
    """``"u8s8 (exact/calibrated)"``: an engine's encoding and the rewrite its build kept
    (relu/requantize, ``/integer k of n`` when partly integer), then the faster rewrites the
    fidelity check refused with what it measured (:func:`_refusal`), from its
    ``build_options``."""
    encoding = build_options.get("encoding")
    rewrite = build_options.get("rewrite") or {}
    if not (encoding and rewrite.get("relu") and rewrite.get("requantize")):
        return encoding
    text = f"{encoding} ({_rewrite_name(rewrite)})"
    refused = build_options.get("refused_rewrites") or []
    if refused:
        text += "; refused " + ", ".join(_refusal(r) for r in refused)
    return text


def _refusal(refused: Mapping[str, Any]) -> str:
    """A refused rewrite and what its check measured: ``exact/none (99.5% decided, 1 beyond
    tol)``, plus ``p99 over the margin`` where only the fitted rewrite's margin refused it."""
    measured = [f"{refused['decided_agreement']:.1%} decided"]
    if refused.get("beyond_tolerance") is not None:
        measured.append(f"{refused['beyond_tolerance']} beyond tol")
    required = refused.get("p99_required")
    if required is not None and refused.get("p99_abs_error", 0.0) > required:
        measured.append("p99 over the margin")
    return f"{_rewrite_name(refused)} ({', '.join(measured)})"


def short_error(error: BaseException | str, limit: int = 300) -> str:
    """An exception as one line for a table cell (type and the start of its message)."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class LatencyRow:
    """One variant of one model in a latency table."""

    variant: str
    p50_ms: float | None = None
    encoding: str | None = None
    integer_ops: str = NONE
    fidelity: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    error: str | None = None


def latency_table(rows: Sequence[LatencyRow], exact: Sequence[str]) -> str:
    """p50, speed-up vs FP32, ratio vs the exact ``quantize_static``, encoding, fidelity."""
    by_name = {row.variant: row for row in rows}
    baseline_name = exact_baseline(exact)
    fp32 = by_name.get(FP32)
    baseline = by_name.get(baseline_name)
    headers = (
        "variant",
        "p50 ms",
        "speed-up vs FP32",
        f"vs {baseline_name} (exact here)",
        "encoding (rewrite)",
        "integer conv/matmul",
        "fidelity",
    )
    cells = []
    for row in rows:
        if row.p50_ms is None:
            failure = f"failed: {row.error}" if row.error else NONE
            blank = [NONE, NONE, NONE]
            cells.append([row.variant, *blank, row.encoding or NONE, row.integer_ops, failure])
            continue
        speedup = f"{fp32.p50_ms / row.p50_ms:.2f}x" if fp32 and fp32.p50_ms else NONE
        ratio = f"{row.p50_ms / baseline.p50_ms:.2f}x" if baseline and baseline.p50_ms else NONE
        check = verdict(row.fidelity)
        if row.note:
            check = f"{check} ({row.note})"
        cells.append(
            [
                row.variant,
                f"{row.p50_ms:.2f}",
                speedup,
                ratio,
                row.encoding or NONE,
                row.integer_ops,
                check,
            ]
        )
    return markdown_table(headers, cells)


@dataclass
class FidelityRow:
    """One trained model in the fidelity table."""

    model: str
    fp32_accuracy: float | None = None
    qdq_accuracy: float | None = None
    engine_accuracy: float | None = None
    agree_keras: float | None = None
    agree_reference: float | None = None
    encoding: str | None = None
    build: dict[str, Any] = field(default_factory=dict)
    integer_ops: str = NONE
    seconds: float = 0.0
    error: str | None = None
    heldout: dict[str, Any] = field(default_factory=dict)


def _pct(value: float | None) -> str:
    return NONE if value is None else f"{value:.2%}"


def heldout_cell(report: Mapping[str, Any]) -> str:
    """The held-out images' decided agreement, samples beyond the tolerance and p99 error
    against the reference."""
    if not report:
        return NONE
    return (
        f"{report['decided_agreement']:.2%} of {report['decided_samples']}{_proves(report)}; "
        f"{report['beyond_tolerance']} beyond; {report['p99_abs_error']:.2g} / "
        f"{report['tolerance']:.2g}"
    )


def fidelity_table(rows: Sequence[FidelityRow], test_images: int) -> str:
    """Accuracy and agreement of each engine; failures keep their error text."""
    headers = (
        "model",
        "FP32 (Keras)",
        "PTQ QDQ (Keras)",
        "engine",
        "engine vs Keras QDQ",
        "engine vs ONNX reference",
        "held-out vs reference: decided; beyond tol; p99 / tol",
        "encoding (rewrite)",
        "integer conv/matmul",
        "build-time fidelity",
        "time",
    )
    cells = []
    for row in rows:
        check = verdict(row.build)
        if row.error:
            check = f"failed: {row.error}"
        cells.append(
            [
                row.model,
                _pct(row.fp32_accuracy),
                _pct(row.qdq_accuracy),
                _pct(row.engine_accuracy),
                _pct(row.agree_keras),
                _pct(row.agree_reference),
                heldout_cell(row.heldout),
                row.encoding or NONE,
                row.integer_ops,
                check,
                f"{row.seconds:.0f} s",
            ]
        )
    return f"top-1 on {test_images} Fashion-MNIST test images\n\n" + markdown_table(headers, cells)


# ---------------------------------------------------------------------------------------------
# Measurements (no TensorFlow)
# ---------------------------------------------------------------------------------------------


def interleaved_p50(
    runners: Mapping[str, Callable[[], object]], runs: int, block: int = 10
) -> dict[str, float]:
    """Median latency (ms) of each runner, ``runs`` timed calls each, measured side by side.

    Also what ``bench.ort_int8_bench.p50_latencies`` times with (this module imports no
    TensorFlow, that one does): runners take turns in blocks of ``block`` timed calls, each
    block after one untimed call, so load on the machine hits every runner alike and no runner
    is billed for another's still-spinning ORT threads.
    """
    times: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(max(1, -(-runs // block))):
        for label, call in runners.items():
            call()
            for _ in range(block):
                start = time.perf_counter()
                call()
                times[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(t) for label, t in times.items()}


def compute_op_share(ops: Mapping[str, int]) -> str:
    """``"integer/all"`` convolutions and matrix products among ``ops`` (op type -> count)."""
    integer = sum(n for op, n in ops.items() if op in _INTEGER_COMPUTE)
    floating = sum(n for op, n in ops.items() if op in _FLOAT_COMPUTE)
    return f"{integer}/{integer + floating}" if integer + floating else NONE


def _op_share(path: Path, threads: int) -> str:
    from bench.ort_ops import ort_optimized_op_counts

    try:
        return compute_op_share(ort_optimized_op_counts(onnx.load(str(path)), threads=threads))
    except Exception as exc:  # the count is informative only
        return f"? ({short_error(exc, 60)})"


def _batches(images: np.ndarray, size: int) -> list[np.ndarray]:
    return [images[i : i + size] for i in range(0, len(images), size)]


def plain_fidelity(
    path: Path, engine: Any, images: np.ndarray, reference_path: Path | None = None
) -> dict[str, Any]:
    """Fidelity of ``engine`` against ``reference_path`` (default: ``path``, the file the engine
    runs) run as float math, on ``images``."""
    model = onnx.load(str(reference_path or path))
    name = engine.input_name
    reference = np.concatenate([run_reference(model, {name: b})[0] for b in _batches(images, 32)])
    got = np.concatenate([engine.run(b) for b in _batches(images, 32)])
    report = compare_outputs(reference, got, data=f"{len(images)} calibration images")
    return report.to_dict()


def build_with_fallback(
    source: Path, work: Path, images: np.ndarray, threads: int
) -> tuple[Path, str]:
    """``build_engine(encoding="auto")`` checked on ``images``; if that check fails, the engine
    built with the kernel-only check (no data: synthetic inputs, engine vs the rewritten graph
    as float math), so it can still be timed. Returns the engine and a note ("" or why)."""
    from qatflow.errors import RuntimeBackendError

    target = work / f"{source.stem}.engine.onnx"
    try:
        return build_engine(
            source, target, fidelity_data=images, threads=threads, encoding="auto"
        ), ""
    except RuntimeBackendError as exc:
        data_failure = build_failure(exc)
    try:
        built = build_engine(source, target, fidelity_data=None, threads=threads, encoding="auto")
    except RuntimeBackendError as exc:
        raise RuntimeBackendError(
            f"vs its source on the images: {data_failure}; kernel-only check: {build_failure(exc)}"
        ) from exc
    return built, f"kernel-only check; vs its source on the images: {data_failure}"


def build_failure(error: BaseException) -> str:
    """The gist of a failed ``build_engine``: the failing fidelity numbers and the first
    diverging tensor when its message has them, else the start of the message."""
    text = " ".join(str(error).split())
    agreement = re.search(r"top-1 agreement ([\d.]+%) over (\d+) samples", text)
    tail = re.search(
        r"(\d+) beyond the tolerance (\S+) \(at most (\d+) allowed\), p99 \|error\| ([^,]+)",
        text,
    )
    if not (agreement and tail):
        return short_error(error)
    where = re.search(r"; (first diverging tensor .*?\)|no quantized tensor diverges[^.]*)", text)
    found = f"; {where.group(1)}" if where else ""
    beyond, tolerance, allowed, p99 = tail.groups()
    gist = (
        f"FAILED, {agreement.group(1)} agree over {agreement.group(2)}, {beyond} beyond tol "
        f"{tolerance} (at most {allowed}), p99 {p99}{found}"
    )
    return short_error(gist)


def ungated_graph(source: Path, images: np.ndarray, target: Path) -> Path:
    """The graph ``build_engine`` checks for ``source``, written to ``target`` unchecked: its
    ORT graph passes (the fast int8 rewrite calibrated on ``images``, the ``auto`` encoding).
    For timing only, when no engine could be built."""
    from qatflow.runtimes.onnxruntime_backend import ort_graph_passes

    model = onnx.load(str(source))
    name = model.graph.input[0].name
    passes = ort_graph_passes(
        model,
        int8_rewrite=True,
        encoding=choose_encoding("auto"),
        calibration=[{name: batch} for batch in _batches(images, 32)],
    )
    for _, graph_pass in passes:
        model = graph_pass(model)
    onnx.save(strip_qatflow_metadata(model), str(target))
    return target


NO_ENGINE_NOTE = "no engine written (row above): unchecked, plain session"
REFUSED_NOTE = (
    "the fast rewrite the gate refused here (the engine above is the fallback): "
    "unchecked, plain session"
)


def _ungated_row(
    source: Path, images: np.ndarray, threads: int, work: Path, note: str = NO_ENGINE_NOTE
) -> tuple[Any, Any]:
    row = LatencyRow(UNGATED, note=note)
    try:
        path = ungated_graph(source, images, work / "qatflow_ungated.onnx")
        engine = load_engine(path, threads=threads)
        row.encoding = choose_encoding("auto")
        row.fidelity = plain_fidelity(path, engine, images, reference_path=source)
        row.integer_ops = _op_share(path, threads)
    except Exception as exc:
        row.error = short_error(exc)
        return row, None
    return row, engine


def time_folder(
    folder: Path, threads: int, runs: int, work: Path
) -> tuple[list[LatencyRow], Mapping[str, Any]]:
    """Build the engines of one model's saved folder and time every variant side by side.

    FP32 and the qatflow QDQ file go through ``build_engine`` (fidelity data: the saved
    calibration images; ``encoding="auto"``; see :func:`build_with_fallback`); the
    ``quantize_static`` files are loaded as saved (what their user gets) and checked against
    themselves run as float math. When no qatflow engine can be built, the row keeps the
    error and an extra row times the unchecked graph (:func:`ungated_graph`); so does an
    engine that is a fallback (its build refused the fast rewrite), so that the kernels' speed
    is still measured where the gate's verdict on random weights means little.
    """
    info = json.loads((folder / MANIFEST).read_text())
    images = np.load(folder / CALIBRATION_FILE)
    rows: dict[str, LatencyRow] = {v: LatencyRow(v) for v in VARIANTS}
    engines: dict[str, Any] = {}
    for variant in VARIANTS:
        row, path = rows[variant], folder / VARIANT_FILES[variant]
        if variant in info.get("errors", {}):
            row.error = info["errors"][variant]
            continue
        if not path.is_file():
            row.error = f"{path.name} was not saved"
            continue
        try:
            if variant in ENGINE_VARIANTS:
                built, row.note = build_with_fallback(path, work, images, threads)
                engine = load_engine(built, threads=threads)
                row.encoding = engine_encoding(engine.metadata.build_options)
                row.fidelity = dict(engine.metadata.fidelity)
                row.integer_ops = _op_share(built, threads)
                if variant == QATFLOW and engine.metadata.build_options.get("refused_rewrites"):
                    rows[UNGATED], ungated = _ungated_row(path, images, threads, work, REFUSED_NOTE)
                    if ungated is not None:
                        engines[UNGATED] = ungated
            else:
                engine = load_engine(path, threads=threads)
                row.encoding = variant.rsplit(" ", 1)[-1].lower()
                row.fidelity = plain_fidelity(path, engine, images)
                row.integer_ops = _op_share(path, threads)
                row.note = "as saved, plain session"
        except Exception as exc:
            row.error = short_error(exc)
            print(f"  {folder.name} {variant}: {row.error}", flush=True)
            if variant == QATFLOW:
                rows[UNGATED], ungated = _ungated_row(path, images, threads, work)
                if ungated is not None:
                    engines[UNGATED] = ungated
            continue
        engines[variant] = engine
    image = np.ascontiguousarray(images[:1])
    p50 = interleaved_p50(
        {v: functools.partial(e.run, image) for v, e in engines.items()}, runs=runs
    )
    for variant, value in p50.items():
        rows[variant].p50_ms = value
    del engines
    gc.collect()
    order = [FP32, QATFLOW, UNGATED, *VARIANTS[2:]]
    return [rows[v] for v in order if v in rows], info


def latency_from(
    root: Path, threads: int, runs: int, models: Sequence[str] | None = None
) -> dict[str, list[LatencyRow]]:
    """``--from DIR``: time every model folder saved under ``root`` and print its table."""
    manifest = json.loads((root / MANIFEST).read_text())
    cpu = detect()
    label = isa_label(cpu, mask=cpuid_mask())
    results: dict[str, list[LatencyRow]] = {}
    names = [m for m in manifest["models"] if models is None or m in models]
    with tempfile.TemporaryDirectory(prefix="isa-bench-") as tmp:
        for name in names:
            start = time.perf_counter()
            work = Path(tmp) / name
            work.mkdir()
            rows, info = time_folder(root / name, threads, runs, work)
            results[name] = rows
            shape = "x".join(str(d) for d in info.get("input_shape", [])[1:]) or "?"
            plural = "thread" if threads == 1 else "threads"
            print(
                f"\n{name} {shape}, batch 1, {threads} {plural}, p50 of {runs} calls each "
                f"(interleaved blocks), {label} [{time.perf_counter() - start:.0f} s]\n"
            )
            print(latency_table(rows, cpu.exact), flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Saved folders
# ---------------------------------------------------------------------------------------------


def save_model_folder(
    folder: Path,
    files: Mapping[str, onnx.ModelProto | Path],
    calibration: np.ndarray,
    *,
    errors: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write one model's variants (``VARIANTS`` label -> ONNX model or file), its calibration
    images and a manifest into ``folder``: what ``--from`` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for variant, model in files.items():
        target = folder / VARIANT_FILES[variant]
        if variant not in ENGINE_VARIANTS:
            # quantize_static copies the FP32 export's qatflow.* metadata, which would make
            # load_engine read the file as a (malformed) qatflow engine: it is a plain model.
            proto = onnx.load(str(model)) if isinstance(model, Path) else model
            strip_qatflow_metadata(proto)
            onnx.save(proto, str(target))
        elif isinstance(model, Path):
            if model.resolve() != target.resolve():
                target.write_bytes(model.read_bytes())
        else:
            onnx.save(model, str(target))
    np.save(folder / CALIBRATION_FILE, np.ascontiguousarray(calibration, np.float32))
    info = {
        "files": {v: VARIANT_FILES[v] for v in files},
        "errors": dict(errors or {}),
        "input_shape": [None, *calibration.shape[1:]],
        **dict(extra or {}),
    }
    (folder / MANIFEST).write_text(json.dumps(info, indent=2))
    return folder


def strip_qatflow_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the ``qatflow.*`` entries of ``model.metadata_props``, in place."""
    keep = [p for p in model.metadata_props if not p.key.startswith("qatflow.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    return model


def write_root_manifest(root: Path, models: Sequence[str], **extra: Any) -> None:
    """The folder-level manifest: which model folders there are, and where they were made."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"models": list(models), "prepared_on": detect().to_dict(), **extra}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))


# ---------------------------------------------------------------------------------------------
# Preparing the latency models (Keras, TensorFlow: imported here, not at the top)
# ---------------------------------------------------------------------------------------------


def to_model_range(name: str, images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] mapped to the input range ``name``'s Keras preprocessing expects."""
    if name.split(" ")[0] in PIXELS_0_255:
        return ((images + 1.0) * 127.5).astype(np.float32)
    return images.astype(np.float32)


def _application(name: str, size: int) -> Any:
    """The random-weight ``keras.applications`` net, seeded: what the gate keeps in integer
    depends on the weights, so an unseeded run timed another engine each time."""
    import keras

    keras.utils.set_random_seed(0)
    return getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=1000, classifier_activation=None
    )


def prepare_latency_models(
    root: Path, models: Sequence[str], size: int, calibration_images: int
) -> None:
    """Export each model's FP32, qatflow QDQ and quantize_static files into ``root/<model>``."""
    import qatflow
    from bench.ort_int8_bench import data_init_batchnorm, fashion_images, ort_quantize_static

    init = fashion_images(16, size, 3, offset=8000)
    calib = fashion_images(calibration_images, size, 3, offset=9000)
    for name in models:
        start = time.perf_counter()
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        images = to_model_range(name, calib)
        files: dict[str, onnx.ModelProto | Path] = {}
        errors: dict[str, str] = {}
        try:
            model = _application(name, size)
            data_init_batchnorm(model, to_model_range(name, init))
            files[FP32] = qatflow.export_onnx(model, folder / VARIANT_FILES[FP32])
        except Exception as exc:
            errors.update({v: f"FP32 model/export: {short_error(exc)}" for v in VARIANTS})
            save_model_folder(folder, files, images, errors=errors)
            print(f"  {name}: {errors[FP32]}", flush=True)
            continue
        try:
            qmodel = qatflow.quantize_model(model, runtime=PLACEMENT_RUNTIME)
            batch = min(8, len(images))
            qatflow.calibrate(
                qmodel,
                images,
                method="percentile",
                num_batches=-(-len(images) // batch),
                batch_size=batch,
            )
            files[QATFLOW] = qatflow.export_onnx(qmodel, folder / VARIANT_FILES[QATFLOW])
            del qmodel
        except Exception as exc:
            errors[QATFLOW] = f"quantize/export: {short_error(exc)}"
        fp32 = onnx.load(str(files[FP32]))
        input_name = fp32.graph.input[0].name
        feeds = [{input_name: images[i : i + 1]} for i in range(len(images))]
        for variant, quantize in (
            (STATIC["u8s8"], ort_quantize_static),
            (STATIC["u8u8"], functools.partial(ort_quantize_static, uint8_weights=True)),
        ):
            try:
                files[variant] = quantize(fp32, feeds)
            except Exception as exc:
                errors[variant] = f"quantize_static: {short_error(exc)}"
        save_model_folder(
            folder, files, images, errors=errors, extra={"pixels": _pixels(name), "size": size}
        )
        for variant, text in errors.items():
            print(f"  {name} {variant}: {text}", flush=True)
        print(f"  {name}: files ready in {time.perf_counter() - start:.0f} s", flush=True)
        del model, fp32, files
        gc.collect()


def _pixels(name: str) -> str:
    return "[0, 255]" if name.split(" ")[0] in PIXELS_0_255 else "[-1, 1]"


def latency_part(
    threads: int,
    runs: int,
    models: Sequence[str],
    size: int,
    calibration_images: int,
    save: Path | None,
) -> dict[str, list[LatencyRow]]:
    """Part 1: prepare the files (into ``save`` or a temporary folder), then time them."""
    with tempfile.TemporaryDirectory(prefix="isa-bench-files-") as tmp:
        root = save or Path(tmp)
        start = time.perf_counter()
        write_root_manifest(root, models, size=size)
        prepare_latency_models(root, models, size, calibration_images)
        print(f"latency files prepared in {time.perf_counter() - start:.0f} s", flush=True)
        return latency_from(root, threads, runs, models)


# ---------------------------------------------------------------------------------------------
# Part 2: fidelity on briefly trained models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FidelityModel:
    """A model of the fidelity part: how to build it and what it is fed."""

    name: str
    size: int
    channels: int
    binary: bool = False


FIDELITY_MODELS = (
    FidelityModel("demo", 28, 1),
    FidelityModel("demo, near-binary 0/1", 28, 1, binary=True),
    FidelityModel("ResNet50", 32, 3),
    FidelityModel("MobileNetV2 (alpha 0.35)", 32, 3),
    FidelityModel("EfficientNetB0", 32, 3),
    FidelityModel("ResNet50V2", 32, 3),
    FidelityModel("DenseNet121", 32, 3),
    FidelityModel("InceptionV3", 75, 3),  # its smallest input
)


def resize(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 28x28 images as float32 NHWC in [-1, 1], nearest-resized to ``size``, with
    ``channels`` copies of the grey channel (as ``bench.ort_int8_bench.fashion_images``)."""
    out = images.astype(np.float32) / 127.5 - 1.0
    if size != images.shape[1]:
        index = (np.arange(size) * images.shape[1]) // size
        out = out[:, index][:, :, index]
    return np.repeat(out[..., None], channels, axis=-1)


def fashion_split(
    split: str, count: int, offset: int, spec: FidelityModel
) -> tuple[np.ndarray, np.ndarray]:
    """Images (in ``spec``'s input range, thresholded for a near-binary spec) and labels."""
    from qatflow.data.sources.fashion_mnist import IDX_FILES, SYSTEM_DIR, read_idx

    raw = read_idx(SYSTEM_DIR / IDX_FILES[f"x_{split}"])[offset : offset + count]
    labels = read_idx(SYSTEM_DIR / IDX_FILES[f"y_{split}"])[offset : offset + count]
    images = resize(raw, spec.size, spec.channels)
    if spec.binary:
        images = (images > 0.0).astype(np.float32)
    return to_model_range(spec.name, images), labels.astype(np.int64)


def build_fidelity_model(spec: FidelityModel) -> tuple[Any, bool]:
    """(Keras model, outputs are logits) for ``spec``, batch-norm momentum 0.9 (short training
    leaves the Keras default 0.99 moving averages far from the data)."""
    import keras

    if spec.name.startswith("demo"):
        from qatflow.training.demo_model import build_demo_model

        return build_demo_model((spec.size, spec.size, spec.channels), 10), False
    shape = (spec.size, spec.size, spec.channels)
    family = spec.name.split(" ")[0]
    kwargs: dict[str, Any] = {"alpha": 0.35} if family == "MobileNetV2" else {}
    model = getattr(keras.applications, family)(
        weights=None, input_shape=shape, classes=10, classifier_activation=None, **kwargs
    )
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model, True


def _top1(outputs: np.ndarray) -> np.ndarray:
    return np.asarray(outputs).reshape(len(outputs), -1).argmax(axis=1)


def fidelity_model(
    spec: FidelityModel,
    *,
    train: int,
    epochs: int,
    test: int,
    calibration: int,
    check: int,
    threads: int,
    work: Path,
) -> FidelityRow:
    """Train ``spec`` briefly, PTQ it, build its engine and score it (see the module doc)."""
    import keras

    import qatflow

    row = FidelityRow(spec.name)
    start = time.perf_counter()
    step = "training"
    try:
        keras.utils.set_random_seed(0)
        x_train, y_train = fashion_split("train", train, 0, spec)
        x_calib, _ = fashion_split("train", calibration, train, spec)
        x_check, _ = fashion_split("train", check, train + calibration, spec)
        x_test, y_test = fashion_split("test", test, 0, spec)
        model, logits = build_fidelity_model(spec)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=logits),
        )
        model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
        row.fp32_accuracy = float(np.mean(_top1(model.predict(x_test, verbose=0)) == y_test))
        step = "PTQ"
        qmodel = qatflow.quantize_model(model, runtime=PLACEMENT_RUNTIME)
        qatflow.calibrate(
            qmodel, x_calib, method="percentile", num_batches=-(-calibration // 64), batch_size=64
        )
        keras_qdq = _top1(qmodel.predict(x_test, verbose=0))
        row.qdq_accuracy = float(np.mean(keras_qdq == y_test))
        step = "export"
        tag = "".join(c if c.isalnum() else "_" for c in spec.name)
        source = qatflow.export_onnx(qmodel, work / f"{tag}.onnx")
        step = "build_engine"
        built = build_engine(
            source,
            work / f"{tag}.engine.onnx",
            fidelity_data=x_check,
            fidelity_samples=check,
            threads=threads,
        )
        engine = load_engine(built, threads=threads)
        row.encoding = engine_encoding(engine.metadata.build_options)
        row.build = dict(engine.metadata.fidelity)
        row.integer_ops = _op_share(built, threads)
        step = "evaluation"
        outputs = np.concatenate([engine.run(b) for b in _batches(x_test, 64)])
        reference_outputs = run_reference(onnx.load(str(source)), {engine.input_name: x_test})[0]
        got, reference = _top1(outputs), _top1(reference_outputs)
        row.engine_accuracy = float(np.mean(got == y_test))
        row.agree_keras = float(np.mean(got == keras_qdq))
        row.agree_reference = float(np.mean(got == reference))
        row.heldout = compare_outputs(reference_outputs, outputs, data="test").to_dict()
    except Exception as exc:
        row.error = f"{step}: {short_error(exc)}"
        print(f"  {spec.name}: {row.error}", flush=True)
    row.seconds = time.perf_counter() - start
    keras.backend.clear_session()
    gc.collect()
    return row


def fidelity_part(
    *,
    train: int,
    epochs: int,
    test: int,
    calibration: int,
    check: int,
    threads: int,
    models: Sequence[str] | None = None,
) -> list[FidelityRow]:
    """Part 2: every model of ``FIDELITY_MODELS`` (or those named in ``models``)."""
    specs = [
        s for s in FIDELITY_MODELS if models is None or s.name.split(" ")[0].rstrip(",") in models
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="isa-bench-fidelity-") as tmp:
        for spec in specs:
            rows.append(
                fidelity_model(
                    spec,
                    train=train,
                    epochs=epochs,
                    test=test,
                    calibration=calibration,
                    check=check,
                    threads=threads,
                    work=Path(tmp),
                )
            )
            print(f"  {spec.name}: {rows[-1].seconds:.0f} s", flush=True)
    print(
        f"\nFidelity, PTQ engines ({train} training images, {epochs} epoch(s), "
        f"{calibration} calibration images, checked on {check} others), "
        f"{isa_label(detect(), mask=cpuid_mask())}\n"
    )
    print(fidelity_table(rows, test), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.isa_bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--part", choices=("latency", "fidelity"), help="one part only")
    parser.add_argument("--runs", type=int, default=100, help="timed calls per variant")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument(
        "--save", type=Path, metavar="DIR", help="keep the latency part's ONNX files in DIR"
    )
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="DIR",
        help="time a folder written by --save (no TensorFlow needed); implies --part latency",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        help=f"latency: some of {list(LATENCY_MODELS)}; fidelity: some of "
        "demo ResNet50 MobileNetV2 EfficientNetB0 ResNet50V2 DenseNet121 InceptionV3",
    )
    parser.add_argument("--size", type=int, default=224, help="latency input size (224)")
    parser.add_argument(
        "--calibration",
        type=int,
        default=32,
        help="latency calibration and fidelity images (32; build_engine checks multiples of 32)",
    )
    parser.add_argument("--train", type=int, default=6000, help="fidelity training images")
    parser.add_argument("--epochs", type=int, default=2, help="fidelity training epochs")
    parser.add_argument("--test", type=int, default=1000, help="fidelity test images")
    parser.add_argument(
        "--fidelity-calibration", type=int, default=256, help="fidelity calibration images"
    )
    parser.add_argument(
        "--fidelity-check",
        type=int,
        default=ENGINE.fidelity_samples,
        help="images (neither trained nor calibrated on) each engine is checked on at build "
        "(default: %(default)s, build_engine's default)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the CPU, then the latency and fidelity tables.

    Returns 0 also when a model's export or build failed: that is a measured result, printed in
    its table and counted on the last line.
    """
    args = parse_args(argv)
    cpu = detect()
    print_cpu(cpu)
    failed = 0
    if args.source is not None:
        start = time.perf_counter()
        results = latency_from(args.source, args.threads, args.runs, args.models)
        print(f"\nlatency part: {time.perf_counter() - start:.0f} s")
        _print_failures(sum(bool(r.error) for rows in results.values() for r in rows))
        return 0
    if args.part in (None, "latency"):
        start = time.perf_counter()
        models = [m for m in LATENCY_MODELS if not args.models or m in args.models]
        results = latency_part(
            args.threads, args.runs, models, args.size, args.calibration, args.save
        )
        failed += sum(bool(r.error) for rows in results.values() for r in rows)
        print(f"\nlatency part: {time.perf_counter() - start:.0f} s", flush=True)
    if args.part in (None, "fidelity"):
        start = time.perf_counter()
        rows = fidelity_part(
            train=args.train,
            epochs=args.epochs,
            test=args.test,
            calibration=args.fidelity_calibration,
            check=args.fidelity_check,
            threads=args.threads,
            models=args.models,
        )
        failed += sum(bool(r.error) for r in rows)
        print(f"\nfidelity part: {time.perf_counter() - start:.0f} s", flush=True)
    _print_failures(failed)
    return 0


def _print_failures(count: int) -> None:
    print(f"{count} step(s) failed; their error text is in the tables" if count else "no failures")


if __name__ == "__main__":
    sys.exit(main())
