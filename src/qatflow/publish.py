"""Publish a pipeline run: MLflow parent and variant runs, the registry gate, the S3 export.

``preflight`` runs as the pipeline's first task and fails fast, before any heavy work, on the
inputs a run would otherwise trip over late: a model or dataset URI that does not resolve, or an
S3 prefix that cannot be written (no credentials, no bucket). ``publish`` runs last.
"""

from __future__ import annotations

import datetime as dt
import glob
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
from qatflow.params import DEFAULT_EXPERIMENT, DEFAULT_REGISTERED_MODEL, DEMO_MODEL
from qatflow.steps import write_json
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
COMPARISON_FILE = "comparison.json"


# --- preflight -----------------------------------------------------------------------------


def preflight(model_uri: str, dataset_uri: str, *, s3_prefix: str | None = None) -> None:
    """Check that the model and dataset URIs resolve and that ``s3_prefix`` is writable.

    Cheap checks only: S3 objects are listed, not downloaded; a local path (or glob) must
    exist; a ``keras.applications`` name is built untrained (seconds). Raises a
    ``QatflowError`` naming the parameter or bucket at fault.
    """
    _check_dataset_uri(dataset_uri)
    _check_model_uri(model_uri)
    if s3_prefix:
        _list_s3(s3_prefix)  # credentials, endpoint, bucket and access, before any work


def _check_dataset_uri(uri: str) -> None:
    from qatflow.data.sources import is_builtin

    if not uri:
        raise DataError("dataset_uri is empty: pass fashion-mnist, a path or an s3:// URI")
    if is_builtin(uri):
        return
    if storage.is_s3_uri(uri):
        _check_s3_object(uri, "dataset_uri")
        return
    path = os.path.expanduser(uri)
    if not (os.path.exists(path) or glob.glob(path)):
        raise DataError(
            f"dataset_uri {uri} not found: not a built-in dataset name (fashion-mnist), and no "
            "file, folder or TFRecord glob matches it"
        )


def _check_model_uri(uri: str) -> None:
    if not uri:
        raise PipelineError("model_uri is empty: pass demo, a model file, an s3:// URI or a name")
    if uri == DEMO_MODEL or Path(uri).expanduser().exists():
        return
    if storage.is_s3_uri(uri):
        _check_s3_object(uri, "model_uri")
        return
    from qatflow.models import load_model

    load_model(uri)  # a keras.applications name is built untrained; anything else raises


def _list_s3(uri: str) -> int:
    """How many objects (0 or 1) start with the key of ``uri``; S3 errors name the bucket."""
    bucket, key = storage.parse_s3_uri(uri)
    with storage._s3_errors(bucket, key):
        page = storage.s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    return int(page.get("KeyCount", 0))


def _check_s3_object(uri: str, parameter: str) -> None:
    if not _list_s3(uri):
        raise DataError(f"{parameter} {uri} not found: no object under that key")


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
    champion, so the report, the registry and this record give one verdict. The S3 upload goes first
    (it overwrites the same keys when retried), then MLflow: one parent run with ``params``,
    the report, each variant's headline metrics and the gate verdict as tags; one child run
    per variant, spanning its evaluation, with the same metric keys, its ONNX and engine. When
    MLflow is unreachable everything is kept in ``<output_dir>/mlflow-offline``. Returns the
    path of ``<output_dir>/publish.json``: run ids, registered version, the gate's verdict
    (``gate.outcome``, see ``verdict``), S3 URIs.
    """
    report_dir = Path(comparison_dir)
    comparison = Comparison.load_json(report_dir / COMPARISON_FILE)
    _check_variant_files(results=results, onnx=onnx, engines=engines)
    for variant in VARIANTS:
        comparison.row(variant)  # every variant must be in the table
    spans = {variant: _span(EvaluationResult.load(results[variant])) for variant in VARIANTS}
    name = run_name or dt.datetime.now(dt.UTC).strftime("qatflow-%Y%m%d-%H%M%S")
    uploaded = _export_s3(s3_prefix, name, report_dir, onnx, engines) if s3_prefix else {}

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
        tracker.log_artifact(parent, report_dir, "report")
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
    summary = {
        "run_name": name,
        "gate": verdict,
        "mlflow": {
            "tracking_uri": redact_text(tracker.tracking_uri),
            "experiment": experiment,
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
    report_dir: Path,
    onnx: Mapping[str, PathLike],
    engines: Mapping[str, PathLike],
) -> dict[str, Any]:
    """Upload the report (with comparison.json), ONNX files and engines under the run's prefix."""
    base = _run_prefix(s3_prefix, run_name)
    uris: dict[str, Any] = {
        "report": storage.upload(report_dir, f"{base}/report"),
        "comparison": f"{base}/report/{COMPARISON_FILE}",
        "onnx": {},
        "engines": {},
    }
    for variant in VARIANTS:
        uris["onnx"][variant] = storage.upload(onnx[variant], f"{base}/onnx/{variant}.onnx")
        engine = Path(engines[variant])
        target = f"{base}/engines/{variant}"
        uris["engines"][variant] = storage.upload(
            engine, target if engine.is_dir() else f"{target}/{engine.name}"
        )
    log.info("exported the run to %s", base)
    return uris
