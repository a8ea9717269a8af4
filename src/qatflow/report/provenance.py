"""What a report measured: dataset, model, run, versions and hardware, without local paths."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any
from urllib.parse import quote, urlsplit

from qatflow import __version__
from qatflow.evaluation import EvaluationResult
from qatflow.storage import is_s3_uri
from qatflow.tracking import OFFLINE_PREFIX, package_versions, redact_text

_UNKNOWN = "not recorded"
NOT_PUBLISHED = (
    "not logged yet: the publish step logs the runs and writes this report again with their IDs"
)


@dataclass(frozen=True)
class MlflowInfo:
    """The MLflow runs ``publish`` logged the report's results as, and the registry's decision.

    ``tracking_uri`` is shown without credentials, and a local store by its file name only;
    with an ``http(s)`` URI the run IDs link to the MLflow UI. ``offline``: MLflow was
    unreachable, the IDs are those of the offline records in ``mlflow-offline/``.
    """

    tracking_uri: str
    experiment: str
    parent_run_id: str
    child_run_ids: Mapping[str, str] = field(default_factory=dict)
    experiment_id: str | None = None
    offline: bool = False
    registered_model: str | None = None
    version: str | None = None
    promoted: bool | None = None
    registry_reasons: tuple[str, ...] = ()

    def run_url(self, run_id: str) -> str | None:
        """The MLflow UI page of ``run_id``, for an ``http(s)`` tracking server; else None."""
        experiment = self.experiment_url()
        if experiment is None or run_id.startswith(OFFLINE_PREFIX):
            return None
        return f"{experiment}/runs/{quote(run_id)}"

    def experiment_url(self) -> str | None:
        """The MLflow UI page of the experiment, for an ``http(s)`` tracking server."""
        base = redact_text(self.tracking_uri).rstrip("/")
        if self.offline or not self.experiment_id or not base.startswith(("http://", "https://")):
            return None
        return f"{base}/#/experiments/{quote(self.experiment_id)}"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            **dataclasses.asdict(self),
            "child_run_ids": dict(self.child_run_ids),
            "registry_reasons": list(self.registry_reasons),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MlflowInfo:
        """Inverse of ``to_dict`` (unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["child_run_ids"] = dict(values.get("child_run_ids") or {})
        values["registry_reasons"] = tuple(values.get("registry_reasons") or ())
        return cls(**values)


@dataclass(frozen=True)
class RunInfo:
    """Where the compared results came from: the inputs and the run, as the pipeline names them.

    Every field is optional; ``dataset_uri`` and ``dataset_kind`` come from the dataset spec.
    """

    dataset_uri: str | None = None
    dataset_kind: str | None = None
    model_uri: str | None = None
    run_name: str | None = None
    run_id: str | None = None
    mlflow: MlflowInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        data = dataclasses.asdict(self)
        data["mlflow"] = self.mlflow.to_dict() if self.mlflow else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunInfo:
        """Inverse of ``to_dict`` (unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        mlflow = values.pop("mlflow", None)
        return cls(**values, mlflow=MlflowInfo.from_dict(mlflow) if mlflow else None)


def display_uri(uri: str | None) -> str:
    """``uri`` as a report shows it: names and ``s3://`` URIs as given, local paths by file name."""
    if not uri:
        return _UNKNOWN
    if is_s3_uri(uri) or "/" not in uri.replace("\\", "/"):
        return uri
    return f"{PurePath(uri).name} (local)"


def display_tracking_uri(uri: str) -> str:
    """A tracking URI as a report shows it: a server without credentials, a local store
    (``sqlite:///...``, ``file:...``, a path) by its scheme and file name."""
    clean = redact_text(uri)
    parts = urlsplit(clean)
    if parts.scheme in ("http", "https", "databricks") or is_s3_uri(clean):
        return clean
    name = PurePath(parts.path or clean).name or clean
    return f"{parts.scheme or 'file'}: {name} (local)"


def mlflow_rows(info: MlflowInfo | None) -> list[tuple[str, str]]:
    """The report's MLflow rows: experiment, parent and child run IDs (linked to the MLflow UI
    for an ``http(s)`` server), the registered version and the champion decision."""
    if info is None:
        return [("MLflow", NOT_PUBLISHED)]
    experiment = f"{info.experiment}"
    if info.experiment_id:
        experiment += f" (id {info.experiment_id})"
    experiment += f" at {display_tracking_uri(info.tracking_uri)}"
    if url := info.experiment_url():
        experiment = f"[{experiment}]({url})"
    rows = [("MLflow experiment", experiment)]
    if info.offline:
        rows.append(
            (
                "MLflow",
                "unreachable when publishing: everything to be logged is kept in "
                "`mlflow-offline/` of the publish record, under the offline run IDs below",
            )
        )
    rows.append(("MLflow parent run", _run_link(info, info.parent_run_id)))
    rows.append(
        (
            "MLflow child runs",
            "; ".join(
                f"{variant}: {_run_link(info, run_id)}"
                for variant, run_id in info.child_run_ids.items()
            )
            or _UNKNOWN,
        )
    )
    rows.append(("Model registry", _registry(info)))
    return rows


def _run_link(info: MlflowInfo, run_id: str) -> str:
    url = info.run_url(run_id)
    return f"[{run_id}]({url})" if url else run_id


def _registry(info: MlflowInfo) -> str:
    if not info.registered_model:
        return _UNKNOWN
    if info.version is None:
        return f"{info.registered_model}: not registered (MLflow unreachable)"
    label = f"{info.registered_model} v{info.version}"
    if info.promoted is None:
        return label
    return f"{label}: {'promoted to champion' if info.promoted else 'not promoted to champion'}"


def provenance(
    info: RunInfo, variants: Sequence[str], results: Mapping[str, EvaluationResult]
) -> list[tuple[str, str]]:
    """The report's provenance header as (label, value) rows, in display order."""
    dataset = display_uri(info.dataset_uri)
    if info.dataset_kind and info.dataset_kind != info.dataset_uri:
        dataset += f" ({info.dataset_kind})"
    first = results[variants[0]]
    versions = package_versions(("tensorflow", "onnxruntime"))
    return [
        (
            "Dataset",
            f"{dataset}; {first.num_samples} test images, {len(first.class_names)} classes",
        ),
        ("Model", display_uri(info.model_uri)),
        ("Pipeline run", _join(info.run_name, info.run_id)),
        *mlflow_rows(info.mlflow),
        ("qatflow", __version__),
        ("TensorFlow", versions["tensorflow"]),
        ("ONNX Runtime", versions["onnxruntime"]),
        ("Runtime", _per_variant(variants, results, lambda r: f"{r.runtime} {r.runtime_version}")),
        ("Device", _per_variant(variants, results, lambda r: r.device)),
        ("ISA", _per_variant(variants, results, lambda r: _engine(r, "isa"))),
        ("Encoding", _per_variant(variants, results, lambda r: _engine(r, "encoding"))),
        ("Threads", _per_variant(variants, results, lambda r: str(r.threads or "n/a"))),
    ]


def _join(*parts: str | None) -> str:
    return " / ".join(part for part in parts if part) or _UNKNOWN


def _engine(result: EvaluationResult, key: str) -> str:
    return (result.engine or {}).get(key) or "n/a"


def _per_variant(
    variants: Sequence[str],
    results: Mapping[str, EvaluationResult],
    describe: Callable[[EvaluationResult], str],
) -> str:
    """One value when every variant shares it, else ``variant: value`` for each."""
    values = {name: describe(results[name]) for name in variants}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return "; ".join(f"{name}: {value}" for name, value in values.items())
