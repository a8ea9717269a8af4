"""What a report measured: dataset, model, run, versions and hardware, without local paths."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath

from qatflow import __version__
from qatflow.evaluation import EvaluationResult
from qatflow.storage import is_s3_uri
from qatflow.tracking import package_versions

_UNKNOWN = "not recorded"


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


def display_uri(uri: str | None) -> str:
    """``uri`` as a report shows it: names and ``s3://`` URIs as given, local paths by file name."""
    if not uri:
        return _UNKNOWN
    if is_s3_uri(uri) or "/" not in uri.replace("\\", "/"):
        return uri
    return f"{PurePath(uri).name} (local)"


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
