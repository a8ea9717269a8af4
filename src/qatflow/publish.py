"""Publish a pipeline run: MLflow parent and variant runs, the registry gate, the S3 export.

``publish`` runs last (through ``qatflow.steps.publish``); the pipeline's first task, the input
checks, is ``qatflow.steps.check_inputs``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qatflow import gate, storage
from qatflow.comparison import Comparison
from qatflow.errors import DataError, PipelineError
from qatflow.evaluation import EvaluationResult
from qatflow.params import DEFAULT_EXPERIMENT, DEFAULT_REGISTERED_MODEL
from qatflow.report import rewrite_report
from qatflow.report.provenance import MlflowInfo
from qatflow.report.write import COMPARISON_FILE, HTML_FILE, MARKDOWN_FILE, PLOT_DIR
from qatflow.storage import write_json
from qatflow.tracking import (
    AGREEMENT_METRIC,
    GATE_POINTS_TAG,
    GATE_REASONS_TAG,
    GATE_TAG,
    HEADLINE_METRICS,
    VARIANTS,
    GateDecision,
    Tracker,
    redact_text,
)

log = logging.getLogger("qatflow.publish")

PathLike = str | os.PathLike[str]
SUMMARY_FILE = "publish.json"
CANDIDATE = "qat_int8"
# The final report, with the MLflow run IDs, inside the publish record folder.
REPORT_DIR = "report"
REPORT_FILES = (HTML_FILE, MARKDOWN_FILE, COMPARISON_FILE, PLOT_DIR)


# --- publish -------------------------------------------------------------------------------


def variant_metrics(comparison: Comparison) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Each variant's tracking metrics, and the keys omitted because some variant lacks them.

    A key that is ``None`` for any variant (top-5 with five classes or fewer, size without a
    file) is dropped for all of them, so every child run logs the same keys.
    """
    rows = {variant: comparison.row(variant).tracking_metrics() for variant in VARIANTS}
    omitted = sorted(
        {key for metrics in rows.values() for key, value in metrics.items() if value is None}
    )
    kept = {
        variant: {k: float(v) for k, v in metrics.items() if k not in omitted and v is not None}
        for variant, metrics in rows.items()
    }
    return kept, omitted


def publish(
    comparison_dir: PathLike,
    results: Mapping[str, PathLike],
    onnx: Mapping[str, PathLike],
    engines: Mapping[str, PathLike],
    *,
    params: Mapping[str, object],
    output_dir: PathLike,
    placement_summary: PathLike | None = None,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    register_name: str = DEFAULT_REGISTERED_MODEL,
    s3_prefix: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, object] | None = None,
) -> Path:
    """Log the run to MLflow, register the QAT INT8 ONNX, gate the champion, export to S3.

    ``comparison_dir`` holds ``comparison.json`` and the report; ``results``, ``onnx`` and
    ``engines`` map each variant (fp32, ptq_int8, qat_int8) to its evaluation JSON, ONNX file
    and engine (file or folder). The comparison's accuracy gate (top-1 points, ``qatflow.gate``,
    set by ``steps.compare``) bounds the QAT model's drop against FP32 and against the current
    champion, so the report, the registry and this record give one verdict. The ONNX files
    and engines go to S3 first (the same keys are overwritten when retried), then MLflow: one
    parent run with ``params``, each variant's headline metrics and the gate verdict as tags;
    one child run per variant, spanning its evaluation, with the same metric keys, its ONNX
    and engine. The report is then written again into ``<output_dir>/report/`` with the
    MLflow experiment, the parent and child run IDs and the registry's decision
    (``qatflow.report.rewrite_report``): that version is the parent run's ``report``
    artifact and the one exported to S3; ``comparison_dir`` is left as it is. When MLflow is
    unreachable everything is kept in ``<output_dir>/mlflow-offline``. Returns the path of
    ``<output_dir>/publish.json``: run ids, registered version, the gate's verdict
    (``gate.outcome``, see ``verdict``), the report folder, S3 URIs.
    """
    report_dir = Path(comparison_dir)
    comparison = Comparison.load_json(report_dir / COMPARISON_FILE)
    _check_variant_files(results=results, onnx=onnx, engines=engines)
    for variant in VARIANTS:
        comparison.row(variant)  # every variant must be in the table
    loaded = {variant: EvaluationResult.load(results[variant]) for variant in VARIANTS}
    spans = {variant: _span(result) for variant, result in loaded.items()}
    name = run_name or dt.datetime.now(dt.UTC).strftime("qatflow-%Y%m%d-%H%M%S")
    uploaded = _export_s3(s3_prefix, name, onnx, engines) if s3_prefix else {}
    final_report = Path(output_dir) / REPORT_DIR

    metrics, omitted = variant_metrics(comparison)
    tracker = Tracker(output_dir, tracking_uri=tracking_uri, experiment=experiment)
    parent = tracker.start_pipeline_run(
        name,
        params={**params, gate.PARAMETER: comparison.gate_points},
        tags=tags,
        start_time=min(start for start, _ in spans.values()),
    )
    children: dict[str, str] = {}
    version: str | None = None
    with tracker.ending(parent):
        if placement_summary is not None:
            tracker.log_artifact(parent, placement_summary, "placement", file_name="placement.md")
        tracker.log_metrics(parent, _headline(metrics))
        for variant in VARIANTS:
            row = comparison.row(variant)
            start, end = spans[variant]
            child = tracker.start_variant_run(
                parent, variant, params={"runtime": row.runtime}, start_time=start
            )
            children[variant] = child
            with tracker.ending(child, end_time=end):
                tracker.log_variant_metrics(child, metrics[variant], omit=omitted)
                tracker.log_metrics(child, {AGREEMENT_METRIC: gate.points(row.agreement)})
                tracker.log_engine_fidelity(child, row.fidelity, row.engine)
                tracker.log_artifact(child, onnx[variant], "onnx", file_name=f"{variant}.onnx")
                tracker.log_artifact(child, engines[variant], "engine")
                tracker.log_artifact(child, results[variant], "evaluation", file_name="result.json")
                if variant == CANDIDATE:
                    version = tracker.register_onnx_model(
                        child,
                        onnx[variant],
                        register_name,
                        accuracy_top1_pct=gate.points(row.top1),
                    )
        decision = _champion_gate(tracker, comparison, register_name, version)
        verdict = _verdict(comparison, decision)
        tracker.set_tags(parent, _gate_tags(verdict))
        mlflow_info = MlflowInfo(
            tracking_uri=redact_text(tracker.tracking_uri),
            experiment=experiment,
            parent_run_id=parent,
            child_run_ids=dict(children),
            experiment_id=tracker.experiment_id or None,
            offline=tracker.offline,
            registered_model=register_name,
            version=version,
            promoted=decision.promoted if decision else None,
            registry_reasons=decision.reasons if decision else (),
        )
        # The report a user reads names the runs it was logged as: rendered again, with them.
        rewrite_report(report_dir, loaded, final_report, mlflow=mlflow_info)
        tracker.log_artifact(parent, final_report, "report")
    if s3_prefix:
        base = _run_prefix(s3_prefix, name)
        uploaded["report"] = storage.upload(final_report, f"{base}/report")
        uploaded["comparison"] = f"{base}/report/{COMPARISON_FILE}"
    summary = {
        "run_name": name,
        "gate": verdict,
        "report": {
            "dir": REPORT_DIR,
            "files": [f"{REPORT_DIR}/{file}" for file in REPORT_FILES],
        },
        "mlflow": {
            "tracking_uri": redact_text(tracker.tracking_uri),
            "experiment": experiment,
            "experiment_id": tracker.experiment_id or None,
            "offline": tracker.offline,
            "offline_reason": tracker.offline_reason,
            "offline_dir": str(tracker.offline_dir) if tracker.offline else None,
            "parent_run_id": parent,
            "child_run_ids": children,
            "metrics_omitted": omitted,
        },
        "registry": {
            "model_name": register_name,
            "version": version,
            "gate": decision.to_dict() if decision else None,
        },
        "s3": {"prefix": s3_prefix, "uris": uploaded} if s3_prefix else None,
    }
    path = write_json(Path(output_dir) / SUMMARY_FILE, summary)
    if s3_prefix:
        storage.upload(path, f"{_run_prefix(s3_prefix, name)}/{SUMMARY_FILE}")
    return path


def verdict(record: PathLike) -> str:
    """``passed`` or ``refused``: the gate's verdict on the candidate in a ``publish.json``."""
    try:
        outcome = json.loads(Path(record).read_text(encoding="utf-8"))["gate"]["outcome"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{record} is not a publish record with a gate verdict: {err}") from err
    if outcome not in (gate.PASSED, gate.REFUSED):
        raise DataError(f"{record}: gate outcome {outcome!r} is not passed or refused")
    return str(outcome)


def _span(result: EvaluationResult) -> tuple[int, int]:
    """A result's evaluation as (start, end) in ms since the epoch; start = end when unknown."""
    end = _epoch_ms(result.created_at)
    return (end if result.started_at is None else _epoch_ms(result.started_at)), end


def _epoch_ms(stamp: str) -> int:
    return int(dt.datetime.fromisoformat(stamp).timestamp() * 1000)


def _headline(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The parent run's ``<variant>.<metric>`` copies of the headline metrics."""
    return {
        f"{variant}.{key}": values[key]
        for variant, values in metrics.items()
        for key in HEADLINE_METRICS
        if key in values
    }


def _check_variant_files(**groups: Mapping[str, PathLike]) -> None:
    for group, paths in groups.items():
        missing = [variant for variant in VARIANTS if variant not in paths]
        if missing:
            raise PipelineError(f"publish: {group} lacks the variant(s) {', '.join(missing)}")
        for variant in VARIANTS:
            if not Path(paths[variant]).exists():
                raise PipelineError(
                    f"publish: {group}[{variant!r}] {paths[variant]} does not exist"
                )


def _champion_gate(
    tracker: Tracker, comparison: Comparison, register_name: str, version: str | None
) -> GateDecision | None:
    """Move ``champion`` to the new version if it passes; None when nothing was registered."""
    if version is None:
        log.warning("model not registered (%s): champion gate skipped", tracker.offline_reason)
        return None
    return tracker.promote_if_better(
        register_name,
        version,
        gate.points(comparison.row(CANDIDATE).top1),
        gate.points(comparison.row(comparison.baseline).top1),
        gate_points=comparison.gate_points,
    )


def _verdict(comparison: Comparison, decision: GateDecision | None) -> dict[str, Any]:
    """The candidate's outcome: refused if it fails vs FP32 or the registry refuses it."""
    verdicts = comparison.verdicts()
    candidate = verdicts[CANDIDATE]
    reasons = [candidate.reason]
    passed = candidate.passed
    if decision is not None:
        passed = passed and decision.promoted
        reasons += [f"registry: {reason}" for reason in decision.reasons]
    return {
        "points": comparison.gate_points,
        "unit": gate.UNIT,
        "candidate": CANDIDATE,
        "outcome": gate.PASSED if passed else gate.REFUSED,
        "reasons": reasons,
        "variants": {name: v.to_dict() for name, v in verdicts.items()},
    }


def _gate_tags(verdict: Mapping[str, Any]) -> dict[str, str]:
    """The parent run's gate tags: the verdict, the gate, the reasons, each variant's outcome."""
    return {
        GATE_TAG: verdict["outcome"],
        GATE_POINTS_TAG: f"{verdict['points']:g}",
        GATE_REASONS_TAG: "; ".join(verdict["reasons"]),
        **{f"{GATE_TAG}.{name}": v["outcome"] for name, v in verdict["variants"].items()},
    }


def _run_prefix(s3_prefix: str, run_name: str) -> str:
    return f"{s3_prefix.rstrip('/')}/{run_name}"


def _export_s3(
    s3_prefix: str,
    run_name: str,
    onnx: Mapping[str, PathLike],
    engines: Mapping[str, PathLike],
) -> dict[str, Any]:
    """Upload the ONNX files and engines under the run's prefix (the report comes later,
    once it names the MLflow runs)."""
    base = _run_prefix(s3_prefix, run_name)
    uris: dict[str, Any] = {"onnx": {}, "engines": {}}
    for variant in VARIANTS:
        uris["onnx"][variant] = storage.upload(onnx[variant], f"{base}/onnx/{variant}.onnx")
        engine = Path(engines[variant])
        target = f"{base}/engines/{variant}"
        uris["engines"][variant] = storage.upload(
            engine, target if engine.is_dir() else f"{target}/{engine.name}"
        )
    log.info("exported the run to %s", base)
    return uris
