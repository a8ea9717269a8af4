"""FP32 vs PTQ-INT8 vs QAT-INT8: one table row per evaluated variant, deltas against a baseline."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qatflow import gate
from qatflow.errors import DataError, PipelineError
from qatflow.evaluation import EvaluationResult
from qatflow.storage import write_json
from qatflow.tracking import METRIC_KEYS, OWN_METRICS

FORMAT = "qatflow.comparison"
VERSION = 3  # 3: rows name the latencies latency_ms_p50/p99, like the metrics
NONE_MARK = "\u2013"  # en dash: no build-time fidelity check, or no kernel record
FIDELITY_EXPLANATION = "INT8 engine vs the same QDQ model run as float math, checked at build time"


@dataclass(frozen=True)
class ComparisonRow:
    """One variant's numbers; deltas, agreement and speedup are relative to the baseline.

    ``fidelity`` and ``engine`` are the variant's ``EvaluationResult.fidelity`` (its engine's
    build-time check against its own reference, not against the baseline) and ``.engine``.
    """

    variant: str
    top1: float
    top5: float | None
    delta_top1_points: float
    agreement: float
    latency_ms_p50: float
    latency_ms_p99: float
    speedup: float
    throughput: float
    size_mb: float | None
    runtime: str
    fidelity: dict[str, Any] | None = None
    engine: dict[str, str] | None = None

    @property
    def fidelity_passed(self) -> bool | None:
        """The build-time fidelity verdict; ``None`` when the engine recorded no check."""
        if not self.fidelity or "passed" not in self.fidelity:
            return None
        return bool(self.fidelity["passed"])

    def tracking_metrics(self) -> dict[str, float | None]:
        """This row under the ``qatflow.tracking.METRIC_KEYS`` names; ``None`` where n/a.

        Accuracies are in percent and the delta in top-1 points, one scale for all three.
        """
        values = (  # in METRIC_KEYS order
            gate.points(self.top1),
            None if self.top5 is None else gate.points(self.top5),
            self.latency_ms_p50,
            self.latency_ms_p99,
            self.throughput,
            self.size_mb,
            self.speedup,
            self.delta_top1_points,
        )
        return dict(zip(METRIC_KEYS, values, strict=True))


HEADERS = (
    "Variant",
    "Top-1 (%)",
    "Top-5 (%)",
    "Delta top-1 (pts)",
    "Gate",
    "Agree (%)",
    "Fidelity",
    "p50 (ms)",
    "p99 (ms)",
    "Speedup",
    "Img/s",
    "Size (MB)",
    "Encoding / ISA",
)


@dataclass(frozen=True)
class Comparison:
    """The comparison table; ``notes`` warn about numbers that are not like for like.

    ``gate_points`` is the accuracy gate (``qatflow.gate``) every other variant is judged by
    against the baseline.
    """

    baseline: str
    rows: tuple[ComparisonRow, ...]
    notes: tuple[str, ...] = ()
    gate_points: float = gate.DEFAULT_POINTS

    @property
    def variants(self) -> list[str]:
        """Variant names in table order (baseline first)."""
        return [row.variant for row in self.rows]

    def row(self, variant: str) -> ComparisonRow:
        """The row of ``variant``; ``DataError`` if it was not compared."""
        for row in self.rows:
            if row.variant == variant:
                return row
        raise DataError(f"variant {variant!r} is not in the comparison (have {self.variants})")

    def verdict(self, variant: str) -> gate.Verdict:
        """``variant`` judged against the baseline by the comparison's accuracy gate."""
        row, base = self.row(variant), self.row(self.baseline)
        return gate.judge(
            variant, gate.points(row.top1), self.baseline, gate.points(base.top1), self.gate_points
        )

    def verdicts(self) -> dict[str, gate.Verdict]:
        """The verdict of every variant but the baseline, in table order."""
        return {name: self.verdict(name) for name in self.variants if name != self.baseline}

    def table(self) -> tuple[tuple[str, ...], list[list[str]]]:
        """Column headers and formatted cells, shared by the Markdown, text and HTML views."""
        return HEADERS, [self._cells(row) for row in self.rows]

    def _cells(self, row: ComparisonRow) -> list[str]:
        is_base = row.variant == self.baseline
        return [
            row.variant,
            f"{100 * row.top1:.2f}",
            _optional(row.top5, lambda v: f"{100 * v:.2f}"),
            "baseline" if is_base else f"{row.delta_top1_points:+.2f}",
            "baseline" if is_base else _gate_cell(self.verdict(row.variant)),
            "baseline" if is_base else f"{100 * row.agreement:.2f}",
            fidelity_cell(row.fidelity),
            f"{row.latency_ms_p50:.3f}",
            f"{row.latency_ms_p99:.3f}",
            "baseline" if is_base else f"{row.speedup:.2f}x",
            f"{row.throughput:.1f}",
            _optional(row.size_mb, lambda v: f"{v:.3f}"),
            engine_cell(row.engine),
        ]

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown table, followed by the notes as a list."""
        headers, rows = self.table()
        text = markdown_table(headers, rows)
        if self.notes:
            text += "\n" + "".join(f"- {note}\n" for note in self.notes)
        return text

    def to_text(self) -> str:
        """Fixed-width table for the terminal, followed by the notes."""
        headers, rows = self.table()
        widths = [max(len(line[i]) for line in (headers, *rows)) for i in range(len(headers))]

        def line(cells: tuple[str, ...] | list[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
            return "  ".join([first, *rest]).rstrip()

        out = [line(headers), "  ".join("-" * width for width in widths)]
        out += [line(cells) for cells in rows]
        out += [f"note: {note}" for note in self.notes]
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "baseline": self.baseline,
            "gate_points": self.gate_points,
            "rows": [dataclasses.asdict(row) for row in self.rows],
            "notes": list(self.notes),
            "verdicts": {name: v.to_dict() for name, v in self.verdicts().items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Comparison:
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise DataError(f"not a {FORMAT} version {VERSION} document")
        try:
            rows = tuple(ComparisonRow(**row) for row in data["rows"])
            return cls(
                baseline=str(data["baseline"]),
                rows=rows,
                notes=tuple(data["notes"]),
                gate_points=gate.check_gate(data["gate_points"], "gate_points"),
            )
        except (KeyError, TypeError, PipelineError) as exc:
            raise DataError(f"malformed {FORMAT}: {exc}") from exc

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON, atomically; return the path."""
        return write_json(path, self.to_dict())

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> Comparison:
        """Read a comparison written by :meth:`save_json`."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, DataError) as exc:
            raise DataError(f"cannot read comparison {path}: {exc}") from exc


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: bool = True
) -> str:
    """A Markdown pipe table; with ``numeric`` all columns but the first are right-aligned."""
    rule = "---:" if numeric else "---"
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] + [rule] * (len(headers) - 1)) + "|",
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in rows),
    ]
    return "\n".join(lines) + "\n"


def compare(
    results: Mapping[str, EvaluationResult],
    *,
    baseline: str = "fp32",
    accuracy_gate: float = gate.DEFAULT_POINTS,
) -> Comparison:
    """Tabulate ``results`` (e.g. ``fp32``, ``ptq_int8``, ``qat_int8``) against ``baseline``.

    Any subset of variants works as long as the baseline is there. All results must come
    from the same test images (same count and classes); agreement is recomputed from the
    stored top-1 predictions. ``accuracy_gate`` (top-1 points) judges every other variant.
    """
    accuracy_gate = gate.check_gate(accuracy_gate)
    if baseline not in results:
        raise DataError(
            f"baseline {baseline!r} is not among the results {list(results)}; "
            f"evaluate it or pass baseline= one of them"
        )
    base = results[baseline]
    order = [baseline, *(name for name in results if name != baseline)]
    for name in order:
        _check_comparable(name, results[name], baseline, base)
    rows = tuple(_row(name, results[name], base) for name in order)
    return Comparison(
        baseline=baseline, rows=rows, notes=_notes(results, order), gate_points=accuracy_gate
    )


def own_metrics(result: EvaluationResult) -> dict[str, float | None]:
    """``result``'s own figures under the ``qatflow.tracking.OWN_METRICS`` names (what a task
    that evaluates one variant logs): its row compared with itself, less the relative ones."""
    row = _row("", result, result).tracking_metrics()
    return {key: row[key] for key in OWN_METRICS}


def _row(name: str, result: EvaluationResult, base: EvaluationResult) -> ComparisonRow:
    return ComparisonRow(
        variant=name,
        top1=result.top1,
        top5=result.top5,
        delta_top1_points=gate.points(result.top1) - gate.points(base.top1),
        agreement=float(np.mean(result.predictions == base.predictions)),
        latency_ms_p50=result.latency.p50_ms,
        latency_ms_p99=result.latency.p99_ms,
        speedup=base.latency.p50_ms / result.latency.p50_ms,
        throughput=result.throughput.images_per_second,
        size_mb=result.size_mb,
        runtime=result.runtime,
        fidelity=None if result.fidelity is None else dict(result.fidelity),
        engine=None if result.engine is None else dict(result.engine),
    )


def _check_comparable(
    name: str, result: EvaluationResult, baseline: str, base: EvaluationResult
) -> None:
    if not name:
        raise DataError("results: variant names must be non-empty")
    if result.num_samples != base.num_samples or len(result.predictions) != len(base.predictions):
        raise DataError(
            f"results[{name!r}] covers {result.num_samples} images but the baseline "
            f"{baseline!r} covers {base.num_samples}: evaluate both on the same test set"
        )
    if result.class_names != base.class_names:
        raise DataError(
            f"results[{name!r}] has classes {result.class_names[:5]}... but the baseline "
            f"{baseline!r} has {base.class_names[:5]}...: evaluate both on the same test set"
        )


def _notes(results: Mapping[str, EvaluationResult], order: list[str]) -> tuple[str, ...]:
    """Warn about engines that failed their fidelity check, and about speed numbers that were
    not measured under the same conditions."""
    conditions: dict[str, Callable[[EvaluationResult], str]] = {
        "runtime": lambda r: f"{r.runtime} {r.runtime_version}",
        "device": lambda r: r.device,
        "threads": lambda r: str(r.threads),
        "latency batch size": lambda r: str(r.latency.batch_size),
        "throughput batch size": lambda r: str(r.throughput.batch_size),
    }
    notes = []
    for name in order:
        fidelity = results[name].fidelity
        if fidelity and fidelity.get("passed") is False:
            agreement = _percent(fidelity.get("agreement"))
            notes.append(
                f"{name}: the engine FAILED its build-time fidelity check ({agreement or 'no'} "
                f"top-1 agreement with the same QDQ model run as float math, on "
                f"{fidelity.get('data') or 'unrecorded data'}): its accuracy measures the "
                "integer kernels, not the quantized model."
            )
    for label, describe in conditions.items():
        values = {name: describe(results[name]) for name in order}
        if len(set(values.values())) > 1:
            listed = ", ".join(f"{name}: {value}" for name, value in values.items())
            notes.append(f"Speed numbers are not like for like: {label} differs ({listed}).")
    return tuple(notes)


def _gate_cell(verdict: gate.Verdict) -> str:
    return "pass" if verdict.passed else "REFUSED"


def fidelity_cell(fidelity: Mapping[str, Any] | None) -> str:
    """``99.90% pass``, ``61.25% FAIL``: the check's top-1 agreement and verdict; else NONE_MARK."""
    if not fidelity:
        return NONE_MARK
    verdict = "pass" if fidelity.get("passed") else "FAIL"
    agreement = _percent(fidelity.get("agreement"))
    return f"{agreement} {verdict}" if agreement else verdict


def engine_cell(engine: Mapping[str, str] | None) -> str:
    """``u8s8 / avx512_vnni``: the integer encoding and CPU ISA where known, and why the engine
    is a fallback where it is one, else ``NONE_MARK``."""
    keys = ("encoding", "isa", "fallback")
    parts = [str(engine[key]) for key in keys if engine and engine.get(key)]
    return " / ".join(parts) or NONE_MARK


def _percent(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return f"{100 * value:.2f}%"


def _optional(value: float | None, fmt: Callable[[float], str]) -> str:
    return "n/a" if value is None else fmt(value)
