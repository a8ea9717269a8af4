"""MLflow tracking: one parent run per pipeline run, one child run per variant, a champion gate.

Runs are addressed by id through ``MlflowClient`` (no fluent "active run" state), so a KFP task
in another process can add a child run given only the parent run id, and an inherited
``MLFLOW_RUN_ID`` cannot hijack it. When MLflow cannot be reached, the tracker warns once and
keeps everything it was asked to log in ``<output>/mlflow-offline/<run id>.json``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qatflow import gate
from qatflow.errors import QatflowError
from qatflow.params import DEFAULT_EXPERIMENT
from qatflow.storage import atomic_output

log = logging.getLogger("qatflow.tracking")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
VARIANTS = ("fp32", "ptq_int8", "qat_int8")
PRECISION = {"fp32": "fp32", "ptq_int8": "int8", "qat_int8": "int8"}
# The metric names written once: top-1 in percent, its delta vs FP32 in top-1 points, the
# batch-1 median latency, the speedup vs FP32.
ACCURACY_METRIC = "accuracy_top1_pct"
DELTA_METRIC = "accuracy_top1_delta_points"
LATENCY_METRIC = "latency_ms_p50"
SPEEDUP_METRIC = "speedup_vs_fp32"
# Accuracies and agreements in percent, deltas in top-1 points: one scale in MLflow's charts.
# A variant's own figures, then those relative to the FP32 baseline.
OWN_METRICS = (
    ACCURACY_METRIC,
    "accuracy_top5_pct",
    LATENCY_METRIC,
    "latency_ms_p99",
    "throughput_ips",
    "size_mb",
)
METRIC_KEYS = (*OWN_METRICS, SPEEDUP_METRIC, DELTA_METRIC)
AGREEMENT_METRIC = "agreement_vs_fp32_pct"
# The parent run's copy of each variant's headline metrics: "<variant>.<metric>".
HEADLINE_METRICS = (ACCURACY_METRIC, DELTA_METRIC, LATENCY_METRIC, SPEEDUP_METRIC)
# Build-time fidelity of a variant's engine (EvaluationResult.fidelity):
# metric -> (report key, scale).
FIDELITY_METRICS = {
    "fidelity_agreement_pct": ("agreement", 100.0),
    "fidelity_decided_agreement_pct": ("decided_agreement", 100.0),
    "fidelity_proven_agreement_pct": ("proven_agreement", 100.0),
    "fidelity_p99_abs_error": ("p99_abs_error", 1.0),
    "fidelity_samples_beyond_tolerance": ("beyond_tolerance", 1.0),
}
# Kernel provenance of a variant's engine (EvaluationResult.engine): param -> provenance key.
ENGINE_PARAMS = {"engine_encoding": "encoding", "engine_isa": "isa"}
FIDELITY_TAG = "qatflow.fidelity"
CHAMPION_ALIAS = "champion"
ACCURACY_TAG = f"qatflow.{ACCURACY_METRIC}"  # on a registered version
# Before accuracies were in percent, versions were tagged (and runs logged) with fractions.
LEGACY_ACCURACY_TAG = "qatflow.accuracy_top1"
LEGACY_ACCURACY_METRIC = "accuracy_top1"
GATE_TAG = "qatflow.gate"  # passed/refused on the parent run, promoted/refused on a version
GATE_POINTS_TAG = "qatflow.gate_points"
GATE_REASONS_TAG = "qatflow.gate_reasons"
PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment by its kind; this one is the classic runs/charts view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
OFFLINE_PREFIX = "offline-"
OFFLINE_DIR = "mlflow-offline"  # in the output folder, when MLflow is unreachable
REDACTED = "***"
VERSIONED_PACKAGES = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "tensorrt", "mlflow")

_SECRET_KEY = re.compile(
    r"password|passwd|secret|token|access_?key|credential|api_?key|private_?key", re.IGNORECASE
)
_URI_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&][^=&\s]*(?:token|signature|secret|password|credential|key)[^=&\s]*=)[^&\s]*",
    re.IGNORECASE,
)
_ONNX_SERVING = ("onnx", "onnxruntime")
_MAX_BATCH = 100


class TrackingError(QatflowError):
    """An MLflow call that failed while the server was reachable, or bad tracking input."""


@dataclass(frozen=True)
class GateDecision:
    """Outcome of the champion gate for one registered model version (top-1 in percent)."""

    promoted: bool
    model_name: str
    version: str
    candidate_accuracy_pct: float
    fp32_accuracy_pct: float
    gate_points: float
    champion_version: str | None
    champion_accuracy_pct: float | None
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the decision."""
        return {**asdict(self), "reasons": list(self.reasons)}


@dataclass(frozen=True)
class ChampionRecord:
    """The registry's current champion: version, top-1 in percent (None when not recorded),
    and where the accuracy was read (``tag <key>`` or ``run metric <key>``) and its raw value."""

    version: str
    accuracy_pct: float | None
    source: str | None
    raw: str | None = None
    legacy: bool = False


def _recorded_pct(
    sources: Sequence[tuple[str, object, bool]],
) -> tuple[float, str, str, bool] | None:
    """The first readable accuracy of ``sources`` (label, value, whether it is a legacy
    fraction) in percent, with its label, raw value and legacy flag; None when none is
    readable."""
    for source, value, legacy in sources:
        if value is None:
            continue
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            log.warning("champion accuracy %s=%r is not a number: skipped", source, value)
            continue
        if not math.isfinite(number):
            continue
        if legacy:
            if not 0.0 <= number <= 1.0:
                log.warning("legacy %s=%r is not a fraction in [0, 1]: skipped", source, value)
                continue
            return gate.points(number), source, str(value), True
        return number, source, str(value), False
    return None


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The tracking URI: the parameter, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def redact_text(text: str) -> str:
    """Strip ``user:pass@`` from URIs and blank secret-looking query parameters."""
    text = _URI_USERINFO.sub(r"\g<scheme>", text)
    return _SECRET_QUERY.sub(rf"\g<name>{REDACTED}", text)


def redact(key: str, value: object) -> str:
    """``value`` as a string, fully hidden when ``key`` looks secret, else with URIs cleaned."""
    if _SECRET_KEY.search(key):
        return REDACTED
    return redact_text(str(value))


def flatten_params(params: Mapping[str, object], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to dotted keys and redact every value."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            nested = flatten_params(value, f"{name}.")
            flat.update(nested if not _SECRET_KEY.search(name) else dict.fromkeys(nested, REDACTED))
        else:
            flat[name] = redact(name, value)
    return flat


def package_versions(packages: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (``"not installed"`` when missing), without importing."""
    versions: dict[str, str] = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Temporarily set (``None``: unset) environment variables, e.g. MLflow's HTTP settings."""
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (used by ``log_model``) at ``uri`` for the block only.

    Restores MLflow's own explicit setting (usually None, meaning "follow the environment") and
    ``MLFLOW_TRACKING_URI`` exactly, so later fluent calls are not pinned to ``uri``.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    explicit = getattr(tracking_utils, "_tracking_uri", None)
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(explicit)  # type: ignore[arg-type]  # None is handled: "unset"
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


class Tracker:
    """Log a pipeline run and its variants to MLflow, or to offline JSON when MLflow is down.

    Args:
        output_dir: the run's output folder; offline records go to ``<output_dir>/mlflow-offline``.
        tracking_uri: overrides ``MLFLOW_TRACKING_URI``; default ``sqlite:///mlflow.db``.
        experiment: MLflow experiment name, created if missing.
        probe_timeout: seconds the reachability probe may take (no retries).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        probe_timeout: float = 5.0,
    ) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.offline_dir = Path(output_dir) / OFFLINE_DIR
        self.probe_timeout = probe_timeout
        self.offline_reason: str | None = None
        self._client = MlflowClient(self.tracking_uri)
        self._experiment_id = ""
        try:
            with self._probe_env():
                self._experiment_id = self._ensure_experiment()
        except Exception as err:
            self._go_offline(f"cannot reach MLflow: {err}")

    @property
    def experiment_id(self) -> str:
        """The experiment's id in MLflow (``""`` when MLflow was unreachable from the start)."""
        return self._experiment_id

    @property
    def offline(self) -> bool:
        """True once MLflow was found unreachable; everything then goes to offline JSON."""
        return self.offline_reason is not None

    # -- runs ---------------------------------------------------------------------------------

    def start_pipeline_run(
        self,
        run_name: str | None = None,
        *,
        params: Mapping[str, object] | None = None,
        tags: Mapping[str, object] | None = None,
        start_time: int | None = None,
    ) -> str:
        """Create the parent run of one pipeline run (left RUNNING) and return its id.

        ``params`` (model, dataset, training and quantization settings) are flattened and
        redacted; package versions are added as ``version.<package>``. ``start_time`` (ms since
        the epoch, default now) is when the pipeline's work began.
        """
        all_tags = {"qatflow.role": "pipeline", **(tags or {})}
        run_id = self._create_run(
            run_name, self._experiment_id, all_tags, parent_run_id=None, start_time=start_time
        )
        versions = {f"version.{name}": value for name, value in package_versions().items()}
        self.log_params(run_id, {**(params or {}), **versions})
        return run_id

    def start_variant_run(
        self,
        parent_run_id: str,
        variant: str,
        *,
        params: Mapping[str, object] | None = None,
        start_time: int | None = None,
    ) -> str:
        """Create the child run for ``variant`` under ``parent_run_id`` and return its id.

        Works from any process: the parent is looked up by id and the child lands in the
        parent's experiment, tagged ``variant`` and ``precision``. ``start_time`` (ms since the
        epoch, default now) is when the step that measured the variant began.
        """
        if variant not in VARIANTS:
            raise TrackingError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
        experiment_id = self._experiment_id
        if not self.offline and not parent_run_id.startswith(OFFLINE_PREFIX):
            try:
                experiment_id = self._client.get_run(parent_run_id).info.experiment_id
            except Exception as err:
                if self._reachable():
                    raise TrackingError(
                        f"parent_run_id {parent_run_id!r} is not a run at "
                        f"{redact_text(self.tracking_uri)}: {redact_text(str(err))}"
                    ) from err
                self._go_offline(f"looking up parent run failed: {err}")
        tags = {"variant": variant, "precision": PRECISION[variant]}
        run_id = self._create_run(
            variant, experiment_id, tags, parent_run_id=parent_run_id, start_time=start_time
        )
        if params:
            self.log_params(run_id, params)
        return run_id

    def end_run(self, run_id: str, *, failed: bool = False, end_time: int | None = None) -> None:
        """Mark ``run_id`` FINISHED (or FAILED) at ``end_time`` (ms since the epoch; now)."""
        status = "FAILED" if failed else "FINISHED"
        end = _now_ms() if end_time is None else end_time
        self._apply(
            run_id,
            f"ending run {run_id}",
            lambda: self._client.set_terminated(run_id, status, end_time=end),
            lambda doc: doc.update(status=status, end_time=end),
        )

    @contextlib.contextmanager
    def ending(self, run_id: str, *, end_time: int | None = None) -> Iterator[str]:
        """Yield ``run_id`` and end it afterwards: FAILED (now) if the block raised, else
        FINISHED at ``end_time`` (default now)."""
        try:
            yield run_id
        except BaseException:
            self.end_run(run_id, failed=True)
            raise
        self.end_run(run_id, end_time=end_time)

    # -- params, metrics, tags, artifacts -------------------------------------------------------

    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        """Log flattened, redacted params (nested mappings become dotted keys)."""
        from mlflow.entities import Param

        flat = flatten_params(params)
        entities = [Param(key, value) for key, value in flat.items()]
        self._apply(
            run_id,
            f"logging params to run {run_id}",
            lambda: self._log_batch(run_id, params=entities),
            lambda doc: doc["params"].update(flat),
        )

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], *, step: int | None = None
    ) -> None:
        """Log any metrics (use ``log_variant_metrics`` for the comparison set)."""
        from mlflow.entities import Metric

        values = {key: float(value) for key, value in metrics.items()}
        stamp = _now_ms()
        entities = [Metric(key, value, stamp, step or 0) for key, value in values.items()]
        self._apply(
            run_id,
            f"logging metrics to run {run_id}",
            lambda: self._log_batch(run_id, metrics=entities),
            lambda doc: doc["metrics"].update(values),
        )

    def log_variant_metrics(
        self, run_id: str, metrics: Mapping[str, float], *, omit: Collection[str] = ()
    ) -> None:
        """Log exactly the ``METRIC_KEYS`` set, so every variant lines up in the compare view.

        ``omit`` names keys that do not apply to any variant of this pipeline run (top-5 with
        five classes or fewer, size without a file): pass the same ``omit`` for every variant.
        """
        expected = [key for key in METRIC_KEYS if key not in omit]
        missing = [key for key in expected if key not in metrics]
        unknown = sorted(set(metrics) - set(expected))
        if missing or unknown:
            raise TrackingError(
                f"variant metrics for run {run_id}: missing {missing}, unknown {unknown}; "
                f"every variant logs exactly {expected} (extras go through log_metrics)"
            )
        self.log_metrics(run_id, metrics)

    def log_engine_fidelity(
        self,
        run_id: str,
        fidelity: Mapping[str, Any] | None,
        engine: Mapping[str, Any] | None = None,
    ) -> None:
        """Log a variant engine's build-time fidelity check and the kernels it was built for.

        ``fidelity`` and ``engine`` are ``EvaluationResult.fidelity``/``.engine`` (or the same
        fields of its ``ComparisonRow``). Logs the ``FIDELITY_METRICS`` that are present, the
        ``ENGINE_PARAMS`` that are known, and tags ``qatflow.fidelity`` ``passed``/``failed``.
        Nothing is logged for what is ``None`` (a Keras model, an engine without a check).
        """
        fidelity = fidelity or {}
        metrics = {
            metric: scale * float(fidelity[key])
            for metric, (key, scale) in FIDELITY_METRICS.items()
            if _is_finite_number(fidelity.get(key))
        }
        if metrics:
            self.log_metrics(run_id, metrics)
        params = {
            param: engine[key]
            for param, key in ENGINE_PARAMS.items()
            if engine and engine.get(key) not in (None, "")
        }
        if params:
            self.log_params(run_id, params)
        if "passed" in fidelity:
            self.set_tags(run_id, {FIDELITY_TAG: "passed" if fidelity["passed"] else "failed"})

    def set_tags(self, run_id: str, tags: Mapping[str, object]) -> None:
        """Set redacted tags on ``run_id``."""
        from mlflow.entities import RunTag

        clean = {key: redact(key, value) for key, value in tags.items()}
        entities = [RunTag(key, value) for key, value in clean.items()]
        self._apply(
            run_id,
            f"setting tags on run {run_id}",
            lambda: self._log_batch(run_id, tags=entities),
            lambda doc: doc["tags"].update(clean),
        )

    def log_artifact(
        self,
        run_id: str,
        path: str | os.PathLike[str],
        artifact_path: str | None = None,
        *,
        file_name: str | None = None,
    ) -> None:
        """Upload a file, or a folder under ``artifact_path`` (default: the folder's name).

        ``file_name`` renames a file on upload, e.g. to give an extensionless KFP artifact the
        ``.json``/``.md`` suffix MLflow's artifact viewer previews by.
        """
        local = Path(path)
        if not local.exists():
            raise TrackingError(f"artifact {local} for run {run_id} does not exist")
        if local.is_dir():
            target = artifact_path or local.name

            def upload() -> None:
                self._client.log_artifacts(run_id, str(local), target)

        else:
            target = artifact_path or ""

            def upload() -> None:
                if file_name is None:
                    self._client.log_artifact(run_id, str(local), artifact_path)
                    return
                with tempfile.TemporaryDirectory(prefix="qatflow-artifact-") as tmp:
                    renamed = Path(tmp) / file_name
                    shutil.copyfile(local, renamed)
                    self._client.log_artifact(run_id, str(renamed), artifact_path)

        record = {
            "path": str(local.resolve()),
            "artifact_path": target,
            "file_name": file_name or local.name,
        }
        self._apply(
            run_id,
            f"uploading {local} to run {run_id}",
            upload,
            lambda doc: doc["artifacts"].append(record),
        )

    # -- registry -------------------------------------------------------------------------------

    def register_onnx_model(
        self,
        run_id: str,
        onnx_path: str | os.PathLike[str],
        model_name: str,
        *,
        accuracy_top1_pct: float,
    ) -> str | None:
        """Log ``onnx_path`` with the ONNX flavor and its input/output signature under
        ``run_id``, in that run's experiment, and register it.

        Returns the new model version (``None`` when offline). The version is tagged with its
        top-1 accuracy (percent) so the champion gate can compare later versions against it.
        """
        import mlflow.onnx
        import onnx

        source = Path(onnx_path)
        if not source.is_file():
            raise TrackingError(f"ONNX model {source} to register as {model_name!r} does not exist")
        tags = {ACCURACY_TAG: str(accuracy_top1_pct), "variant": "qat_int8", "precision": "int8"}
        # Pinned here: MLflow would otherwise infer them in a subprocess (seconds per model).
        requirements = [f"{name}=={v}" for name, v in package_versions(_ONNX_SERVING).items()]
        registered: list[str] = []

        def register() -> None:
            model = onnx.load(str(source))
            experiment_id = self._client.get_run(run_id).info.experiment_id
            # log_model files its LoggedModel under the fluent API's experiment, not the run's.
            with (
                _global_tracking_uri(self.tracking_uri),
                _environ(MLFLOW_EXPERIMENT_ID=experiment_id, MLFLOW_EXPERIMENT_NAME=None),
            ):
                info = mlflow.onnx.log_model(
                    model,
                    name="model",
                    registered_model_name=model_name,
                    run_id=run_id,
                    pip_requirements=requirements,
                    signature=onnx_signature(model),
                )
            version = str(info.registered_model_version)
            for key, value in tags.items():
                self._client.set_model_version_tag(model_name, version, key, value)
            registered.append(version)

        record = {"model_name": model_name, "path": str(source.resolve()), "tags": tags}
        self._apply(
            run_id,
            f"registering {source} as {model_name!r}",
            register,
            lambda doc: doc["registered_models"].append(record),
        )
        return registered[0] if registered else None

    def champion_record(self, model_name: str) -> ChampionRecord | None:
        """The current champion: its version, top-1 accuracy in percent and where that came
        from, or None if there is no champion.

        The accuracy is read, in this order, from the version's ``qatflow.accuracy_top1_pct``
        tag, the legacy ``qatflow.accuracy_top1`` tag (a fraction, as qatflow recorded it
        before accuracies were in percent: converted), and its run's ``accuracy_top1_pct``
        metric, then legacy ``accuracy_top1`` fraction. A value that is not a number, or a
        fraction outside [0, 1], is skipped.
        """
        from mlflow.exceptions import MlflowException

        try:
            current = self._client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        version = str(current.version)
        tags = current.tags
        accuracy = _recorded_pct(
            [
                (f"tag {ACCURACY_TAG}", tags.get(ACCURACY_TAG), False),
                (f"tag {LEGACY_ACCURACY_TAG}", tags.get(LEGACY_ACCURACY_TAG), True),
            ]
        )
        if accuracy is None and current.run_id:
            metrics = self._client.get_run(current.run_id).data.metrics
            accuracy = _recorded_pct(
                [
                    (f"run metric {ACCURACY_METRIC}", metrics.get(ACCURACY_METRIC), False),
                    (
                        f"run metric {LEGACY_ACCURACY_METRIC}",
                        metrics.get(LEGACY_ACCURACY_METRIC),
                        True,
                    ),
                ]
            )
        if accuracy is None:
            return ChampionRecord(version, None, None)
        return ChampionRecord(version, *accuracy)

    def promote_if_better(
        self,
        model_name: str,
        version: str,
        candidate_pct: float,
        fp32_pct: float,
        *,
        gate_points: float,
    ) -> GateDecision:
        """Move the ``champion`` alias to ``version`` only if it passes the accuracy gate twice.

        Accuracies are top-1 in percent; ``gate_points`` is ``qatflow.gate``'s gate in top-1
        points. The candidate must be at most ``gate_points`` below FP32, and at most
        ``gate_points`` below the current champion (passes when there is none). The decision is
        returned, logged, and tagged on the model version.
        """
        gate_points = gate.check_gate(gate_points, "gate_points")
        version = str(version)
        decisions = [
            GateDecision(
                promoted=False,
                model_name=model_name,
                version=version,
                candidate_accuracy_pct=candidate_pct,
                fp32_accuracy_pct=fp32_pct,
                gate_points=gate_points,
                champion_version=None,
                champion_accuracy_pct=None,
                reasons=("MLflow unreachable: registry not updated",),
            )
        ]

        def decide() -> None:
            decision = self._decide(model_name, version, candidate_pct, fp32_pct, gate_points)
            if decision.promoted:
                self._client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
            outcome = "promoted" if decision.promoted else "refused"
            self._client.set_model_version_tag(model_name, version, GATE_TAG, outcome)
            self._client.set_model_version_tag(
                model_name, version, GATE_POINTS_TAG, f"{gate_points:g}"
            )
            self._client.set_model_version_tag(
                model_name, version, GATE_REASONS_TAG, "; ".join(decision.reasons)
            )
            decisions.append(decision)

        self._apply(
            "registry",
            f"champion gate for {model_name!r} version {version}",
            decide,
            lambda doc: doc["gate_decisions"].append(decisions[0].to_dict()),
        )
        decision = decisions[-1]
        log.info(
            "champion gate for %s v%s: %s (%s)",
            model_name,
            version,
            "promoted" if decision.promoted else "refused",
            "; ".join(decision.reasons),
        )
        return decision

    def _decide(
        self, model_name: str, version: str, candidate: float, fp32: float, gate_points: float
    ) -> GateDecision:
        label = f"{model_name} v{version}"
        vs_fp32 = gate.judge(label, candidate, "fp32", fp32, gate_points)
        reasons = [vs_fp32.reason]
        current = self.champion_record(model_name)
        champion_version = current.version if current else None
        champion_accuracy = current.accuracy_pct if current else None
        if current is None:
            champion_ok = True
            reasons.append("no current champion")
        elif champion_accuracy is None:
            champion_ok = False
            reasons.append(
                f"champion v{champion_version} has no recorded accuracy to compare (no "
                f"{ACCURACY_TAG} or legacy {LEGACY_ACCURACY_TAG} tag, no {ACCURACY_METRIC} or "
                f"{LEGACY_ACCURACY_METRIC} metric on its run): move the alias by hand"
            )
        else:
            vs_champion = gate.judge(
                label, candidate, f"champion v{champion_version}", champion_accuracy, gate_points
            )
            champion_ok = vs_champion.passed
            if current.legacy:
                reasons.append(
                    f"champion v{champion_version}'s accuracy is its legacy {current.source} "
                    f"{current.raw} (a fraction), read as {champion_accuracy:.2f}%"
                )
            reasons.append(vs_champion.reason)
        return GateDecision(
            promoted=vs_fp32.passed and champion_ok,
            model_name=model_name,
            version=version,
            candidate_accuracy_pct=candidate,
            fp32_accuracy_pct=fp32,
            gate_points=gate_points,
            champion_version=champion_version,
            champion_accuracy_pct=champion_accuracy,
            reasons=tuple(reasons),
        )

    # -- plumbing -------------------------------------------------------------------------------

    def _probe_env(self) -> contextlib.AbstractContextManager[None]:
        return _environ(
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
            MLFLOW_HTTP_REQUEST_TIMEOUT=str(max(1, round(self.probe_timeout))),
        )

    def _ensure_experiment(self) -> str:
        """The experiment's id, created if missing; one without a kind is marked as model
        development, so the MLflow 3 UI opens it on its runs, not on the GenAI overview."""
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(self.experiment)
        if found is not None:
            if EXPERIMENT_KIND_TAG not in found.tags:
                self._client.set_experiment_tag(
                    found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                )
            return str(found.experiment_id)
        try:
            return str(
                self._client.create_experiment(
                    self.experiment, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            )
        except MlflowException:  # created meanwhile by a parallel task
            found = self._client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return str(found.experiment_id)

    def _reachable(self) -> bool:
        try:
            with self._probe_env():
                self._client.search_experiments(max_results=1)
        except Exception:
            return False
        return True

    def _go_offline(self, reason: str) -> None:
        first = self.offline_reason is None
        self.offline_reason = redact_text(reason)
        if first:
            log.warning(
                "MLflow at %s is unreachable (%s); tracking continues offline in %s",
                redact_text(self.tracking_uri),
                self.offline_reason,
                self.offline_dir,
            )

    def _create_run(
        self,
        run_name: str | None,
        experiment_id: str,
        tags: Mapping[str, object],
        *,
        parent_run_id: str | None,
        start_time: int | None = None,
    ) -> str:
        clean = {key: redact(key, value) for key, value in tags.items()}
        start = _now_ms() if start_time is None else start_time
        if parent_run_id:
            clean[PARENT_TAG] = parent_run_id
        offline_parent = bool(parent_run_id and parent_run_id.startswith(OFFLINE_PREFIX))
        if not self.offline and not offline_parent:
            try:
                run = self._client.create_run(
                    experiment_id, start_time=start, run_name=run_name, tags=clean
                )
                return str(run.info.run_id)
            except Exception as err:
                if self._reachable():
                    raise TrackingError(
                        f"creating run {run_name!r} in experiment {self.experiment!r} failed: "
                        f"{redact_text(str(err))}"
                    ) from err
                self._go_offline(f"creating run {run_name!r} failed: {err}")
        run_id = f"{OFFLINE_PREFIX}{uuid.uuid4().hex}"
        self._write(
            run_id,
            {
                "run_id": run_id,
                "run_name": run_name,
                "parent_run_id": parent_run_id,
                "experiment": self.experiment,
                "tracking_uri": redact_text(self.tracking_uri),
                "status": "RUNNING",
                "start_time": start,
                "params": {},
                "metrics": {},
                "tags": clean,
                "artifacts": [],
                "registered_models": [],
            },
        )
        return run_id

    def _log_batch(
        self,
        run_id: str,
        *,
        metrics: Sequence[Any] = (),
        params: Sequence[Any] = (),
        tags: Sequence[Any] = (),
    ) -> None:
        for start in range(0, max(len(metrics), len(params), len(tags)), _MAX_BATCH):
            window = slice(start, start + _MAX_BATCH)
            self._client.log_batch(
                run_id,
                metrics=list(metrics[window]),
                params=list(params[window]),
                tags=list(tags[window]),
            )

    def _apply(
        self,
        doc_name: str,
        what: str,
        online: Callable[[], None],
        offline: Callable[[dict[str, Any]], None],
    ) -> None:
        """Run ``online``; if MLflow is (or turns out to be) unreachable, record offline."""
        if not self.offline and not doc_name.startswith(OFFLINE_PREFIX):
            try:
                online()
                return
            except Exception as err:
                if self._reachable():
                    raise TrackingError(f"{what} failed: {redact_text(str(err))}") from err
                self._go_offline(f"{what} failed: {err}")
        path = self.offline_dir / f"{doc_name}.json"
        doc: dict[str, Any] = {
            "params": {},
            "metrics": {},
            "tags": {},
            "artifacts": [],
            "registered_models": [],
            "gate_decisions": [],
        }
        if path.exists():
            doc.update(json.loads(path.read_text()))
        offline(doc)
        self._write(doc_name, doc)

    def _write(self, doc_name: str, doc: Mapping[str, Any]) -> None:
        with atomic_output(self.offline_dir / f"{doc_name}.json") as tmp:
            tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))


def onnx_signature(model: Any) -> Any:
    """An MLflow ``ModelSignature`` from an ONNX graph's data inputs (not its overridable
    initializers, such as an ORT engine's float weights) and outputs (dynamic dims -1)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    from onnx import helper

    def schema(values: Any) -> Schema:
        specs: list[ColSpec | TensorSpec] = []
        for value in values:
            tensor = value.type.tensor_type
            shape = tuple(
                dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor.shape.dim
            )
            dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
            specs.append(TensorSpec(dtype, shape, value.name))
        return Schema(specs)

    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    return ModelSignature(inputs=schema(inputs), outputs=schema(model.graph.output))


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _now_ms() -> int:
    return int(time.time() * 1000)
