"""``write_report``: the comparison as Markdown (plots as files) and self-contained HTML."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatflow import gate
from qatflow.comparison import (
    FIDELITY_EXPLANATION,
    NONE_MARK,
    Comparison,
    engine_cell,
    fidelity_cell,
    markdown_table,
)
from qatflow.errors import DataError, PipelineError
from qatflow.evaluation import EvaluationResult
from qatflow.params import COMPARE
from qatflow.report import plots
from qatflow.report.html import render_page
from qatflow.report.provenance import MlflowInfo, RunInfo, display_uri, provenance
from qatflow.runtimes.fidelity import MAX_BEYOND_SHARE
from qatflow.storage import atomic_output, write_json

MARKDOWN_FILE = "report.md"
HTML_FILE = "report.html"
PLOT_DIR = "plots"
SOURCE_FILE = "report.json"  # what else the report was rendered from, to render it again
COMPARISON_FILE = "comparison.json"  # beside the report, as steps.compare writes it
_SOURCE_FORMAT = "qatflow.report_source"


@dataclass(frozen=True)
class ReportFiles:
    """Paths of the written report: Markdown, HTML, and each plot PNG by name."""

    markdown: Path
    html: Path
    plots: dict[str, Path]


def write_report(
    comparison: Comparison,
    results: Mapping[str, EvaluationResult],
    output_dir: str | os.PathLike[str],
    *,
    title: str,
    run_info: RunInfo | None = None,
    extra_sections: Mapping[str, str] | None = None,
) -> ReportFiles:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into ``output_dir``.

    The report opens with the accuracy gate's verdict on every variant but the baseline and a
    provenance table (``run_info``: dataset, model, run; versions and hardware from
    ``results``); it names files, never local paths. ``results`` must hold every variant of
    ``comparison`` (the plots need per-class accuracy and the raw latency samples).
    ``extra_sections`` maps a heading to Markdown, e.g. a placement summary table. Everything
    is rendered before anything is written, and each file is written atomically.
    ``report.json`` keeps the title, ``run_info`` and ``extra_sections``, so that
    ``rewrite_report`` can render the same report again with the MLflow run IDs.
    """
    if not title.strip():
        raise PipelineError("title must not be empty")
    missing = [name for name in comparison.variants if name not in results]
    if missing:
        raise DataError(
            f"results lacks {missing}, which the comparison has; pass the EvaluationResult "
            f"of every compared variant"
        )
    info = run_info or RunInfo()
    extra = dict(extra_sections or {})
    images = _render_plots(comparison, results)
    markdown = _markdown(comparison, results, title, images, info, extra)
    page = render_page(
        markdown, title=title, images={_plot_ref(name): png for name, png in images.items()}
    )

    out = Path(output_dir)
    plot_paths = {name: out / _plot_ref(name) for name in images}
    for name, path in plot_paths.items():
        with atomic_output(path) as tmp:
            tmp.write_bytes(images[name])
    files = ReportFiles(markdown=out / MARKDOWN_FILE, html=out / HTML_FILE, plots=plot_paths)
    with atomic_output(files.markdown) as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    with atomic_output(files.html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    source = {
        "format": _SOURCE_FORMAT,
        "version": 1,
        "title": title,
        "run_info": info.to_dict(),
        "extra_sections": extra,
    }
    write_json(out / SOURCE_FILE, source)
    return files


def rewrite_report(
    source_dir: str | os.PathLike[str],
    results: Mapping[str, EvaluationResult],
    output_dir: str | os.PathLike[str],
    *,
    mlflow: MlflowInfo,
) -> ReportFiles:
    """Render the report in ``source_dir`` again into ``output_dir``, with ``mlflow``'s runs.

    ``source_dir`` is a folder ``write_report`` wrote (``comparison.json`` beside the report,
    as ``qatflow.steps.compare`` leaves it): the same comparison, title, provenance and extra
    sections, plus the MLflow experiment, parent and child run IDs and the registry's
    decision. ``comparison.json`` is copied along, so ``output_dir`` is a complete report
    folder. ``source_dir`` itself is left as it is.
    """
    source = Path(source_dir)
    comparison = Comparison.load_json(source / COMPARISON_FILE)
    stored = _load_source(source / SOURCE_FILE)
    info = dataclasses.replace(RunInfo.from_dict(stored.get("run_info") or {}), mlflow=mlflow)
    files = write_report(
        comparison,
        results,
        output_dir,
        title=str(stored.get("title") or COMPARE.title),
        run_info=info,
        extra_sections=dict(stored.get("extra_sections") or {}),
    )
    target = Path(output_dir) / COMPARISON_FILE
    if target.resolve() != (source / COMPARISON_FILE).resolve():
        with atomic_output(target) as tmp:
            shutil.copyfile(source / COMPARISON_FILE, tmp)
    return files


def _load_source(path: Path) -> dict[str, Any]:
    """The stored inputs of a report; empty for a folder an older qatflow wrote."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"report source {path} is not readable JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != _SOURCE_FORMAT:
        raise DataError(f"{path} is not a qatflow report source ({_SOURCE_FORMAT})")
    return data


def _render_plots(
    comparison: Comparison, results: Mapping[str, EvaluationResult]
) -> dict[str, bytes]:
    images = {"accuracy_vs_latency": plots.accuracy_vs_latency(comparison)}
    per_class = plots.per_class_change(comparison, results)
    if per_class is not None:
        images["per_class_change"] = per_class
    images["latency_distribution"] = plots.latency_distribution(comparison, results)
    return images


_PLOT_SECTIONS = {
    "accuracy_vs_latency": "Accuracy vs latency",
    "per_class_change": "Per-class accuracy change",
    "latency_distribution": "Latency distribution (batch 1)",
}


def _markdown(
    comparison: Comparison,
    results: Mapping[str, EvaluationResult],
    title: str,
    images: Mapping[str, bytes],
    run_info: RunInfo,
    extra_sections: Mapping[str, str],
) -> str:
    base = comparison.baseline
    reference = results[base]
    throughput_batch = reference.throughput.batch_size
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"# {title}",
        *_banners(comparison),
        *_registry_banner(run_info.mlflow),
        f"Generated {generated} by qatflow. Baseline: `{base}`; "
        f"{reference.num_samples} test images, {len(reference.class_names)} classes.",
        "## Provenance",
        markdown_table(
            ("What", "Value"),
            provenance(run_info, comparison.variants, results),
            numeric=False,
        ),
        "## Comparison",
        comparison.to_markdown(),
        f"*Gate*: the accuracy gate, at most {comparison.gate_points:g} {gate.UNIT} below "
        f"`{base}` (`--accuracy-gate`); pass or REFUSED. "
        f"Top-1/Top-5 in %. *Delta top-1* is the change vs `{base}` in percentage points. "
        f"*Agree* is the share of test images whose top-1 class equals `{base}`'s. "
        f"*Speedup* is `{base}` p50 / variant p50 at batch 1. *Img/s* is throughput at "
        f"batch {throughput_batch}. Top-5 is n/a with five classes or fewer.",
        f"*Fidelity*: {FIDELITY_EXPLANATION} (top-1 agreement, and the check's pass/FAIL; "
        f"an FP32 engine is checked against its ONNX model the same way); {NONE_MARK} where no "
        "check was recorded (Keras models, older engines). "
        "*Encoding / ISA*: the integer weight encoding and the CPU instruction set the engine "
        "was built for.",
    ]
    if any(results[name].fidelity for name in comparison.variants):
        parts += ["## Build-time fidelity", _fidelity(comparison, results)]
    for name in images:
        parts += [f"## {_PLOT_SECTIONS[name]}", f"![{_PLOT_SECTIONS[name]}]({_plot_ref(name)})"]
    for heading, body in extra_sections.items():
        parts += [f"## {heading}", body.strip()]
    parts += ["## Measurement details", _details(comparison, results)]
    return "\n\n".join(part.strip("\n") for part in parts) + "\n"


def _banners(comparison: Comparison) -> list[str]:
    """One GitHub alert per judged variant: a green TIP when it passes, a red CAUTION if not."""
    banners = []
    for name, verdict in comparison.verdicts().items():
        if verdict.passed:
            head = f"> [!TIP]\n> **{name}: passed the accuracy gate.**"
        else:
            head = f"> [!CAUTION]\n> **{name}: REFUSED by the accuracy gate.**"
        banners.append(f"{head} {verdict.reason}.")
    return banners


def _registry_banner(mlflow: MlflowInfo | None) -> list[str]:
    """The registry's decision on the registered candidate, once ``publish`` has made it."""
    if mlflow is None:
        return []
    if mlflow.offline:
        return [
            "> [!WARNING]\n> **MLflow was unreachable when publishing:** nothing was registered; "
            "the runs are kept offline in `mlflow-offline/` of the publish record."
        ]
    if mlflow.version is None or mlflow.promoted is None:
        return []
    label = f"{mlflow.registered_model} v{mlflow.version}"
    reasons = "; ".join(mlflow.registry_reasons)
    if mlflow.promoted:
        return [f"> [!TIP]\n> **Registry: {label} promoted to champion.** {reasons}."]
    return [f"> [!CAUTION]\n> **Registry: {label} REFUSED, not promoted to champion.** {reasons}."]


def _details(comparison: Comparison, results: Mapping[str, EvaluationResult]) -> str:
    headers = (
        "Variant",
        "File",
        "Runtime",
        "Device",
        "Threads",
        "Latency runs (warm-up)",
        "Throughput batch x runs (warm-up)",
        "Evaluated",
    )
    rows = []
    for name in comparison.variants:
        result = results[name]
        latency, throughput = result.latency, result.throughput
        rows.append(
            [
                name,
                f"`{display_uri(result.source)}`",
                f"{result.runtime} {result.runtime_version}",
                result.device,
                "n/a" if result.threads is None else str(result.threads),
                f"{latency.iterations} at batch {latency.batch_size} ({latency.warmup})",
                f"{throughput.batch_size} x {throughput.iterations} ({throughput.warmup})",
                result.created_at,
            ]
        )
    return markdown_table(headers, rows, numeric=False)


def _fidelity(comparison: Comparison, results: Mapping[str, EvaluationResult]) -> str:
    """Each engine's build-time check: verdict, agreement, error against tolerance, data."""
    headers = (
        "Variant",
        "Fidelity",
        "Decided agreement (%)",
        "Beyond tolerance (allowed)",
        "Tolerance",
        "p99 / max abs error",
        "Checked on",
        "Encoding / ISA",
        "Integer kernels (nodes / time)",
    )
    rows = [_fidelity_cells(name, results[name]) for name in comparison.variants]
    note = (
        f"{FIDELITY_EXPLANATION}. It passes when at most {MAX_BEYOND_SHARE:.1%} of the samples "
        "(rounded down) have a max absolute logit error beyond the tolerance (a share of the "
        "reference's output range) and top-1 agreement reaches the minimum on the samples the "
        "reference decides by more than the tolerance (*decided*); *proves*: the agreement "
        "those samples prove, a one-sided 95 % lower confidence bound. *Integer kernels*: the "
        "share of the engine's compute nodes, and of ONNX Runtime's profiled kernel time, that "
        "run as integer kernels."
    )
    return note + "\n\n" + markdown_table(headers, rows, numeric=False)


ERROR_KEYS = ("p99_abs_error", "max_abs_error")


def _fidelity_cells(name: str, result: EvaluationResult) -> list[str]:
    check = result.fidelity or {}
    decided = _number(check.get("decided_agreement"), lambda v: f"{100 * v:.2f}")
    if decided != NONE_MARK and check.get("decided_samples") is not None:
        decided += f" of {check['decided_samples']}"
    notes = [
        _number(check.get("min_agreement"), lambda v: f"need {100 * v:.2f}", ""),
        _number(check.get("proven_agreement"), lambda v: f"proves {100 * v:.2f}", ""),
    ]
    if decided != NONE_MARK and any(notes):
        decided += f" ({'; '.join(note for note in notes if note)})"
    beyond = _number(check.get("beyond_tolerance"), lambda v: f"{v:.0f}")
    if beyond != NONE_MARK:
        beyond += _number(check.get("samples"), lambda v: f" of {v:.0f}", "")
        beyond += _number(check.get("max_beyond"), lambda v: f" ({v:.0f})", "")
    errors = [_number(check.get(key), "{:.4g}".format) for key in ERROR_KEYS]
    error_cell = NONE_MARK if set(errors) == {NONE_MARK} else " / ".join(errors)
    return [
        name,
        fidelity_cell(result.fidelity),
        decided,
        beyond,
        _number(check.get("tolerance"), "{:.4g}".format),
        error_cell,
        str(check.get("data") or NONE_MARK),
        engine_cell(result.engine),
        _integer_cell(result.engine),
    ]


def _integer_cell(engine: Mapping[str, str] | None) -> str:
    shares = [engine.get(f"integer_{key}") for key in ("nodes", "time")] if engine else []
    return " / ".join(share or NONE_MARK for share in shares) or NONE_MARK


def _number(value: object, fmt: Callable[[float], str], missing: str = NONE_MARK) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return missing
    return fmt(float(value))


def _plot_ref(name: str) -> str:
    return f"{PLOT_DIR}/{name}.png"
