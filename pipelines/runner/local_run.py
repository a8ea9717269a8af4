"""Run the QAT INT8 pipeline on this machine with ``kfp.local`` and collect its results.

With the ``subprocess`` runner every task runs as a subprocess of the current Python
(``SubprocessRunner(use_venv=False)``), so the installed qatflow is used and container images
are ignored. With the ``docker`` runner every task runs in its component's image, built by
this checkout (``local_docker``). GPU settings are not applied (``kfp.local`` ignores them),
hence the runtime is ONNX Runtime on CPU. KFP's own output (executor inputs, task and container
logs) goes to ``<output>/pipeline.log``; the terminal gets one line per task plus the final
state of the steps' progress bars (``progress``). The presets are in ``profiles``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qatflow_pipelines.runner import progress
from qatflow_pipelines.runner.profiles import (
    DEFAULT_PROFILE,
    DEFAULT_RUNNER,
    DOCKER_RUNNER,
    PROFILES,
    RUNNERS,
)

from qatflow.errors import PipelineError
from qatflow.params import ENGINE
from qatflow.tracking import DEFAULT_TRACKING_URI, OFFLINE_DIR, redact_text

# Parameters that may name local files (mounted read-only into docker tasks).
LOCAL_INPUTS = ("model_uri", "dataset_uri", "quantization_spec")
LOG_FILE = "pipeline.log"

CODE_PACKAGES = ("qatflow", "qatflow_components", "qatflow_pipelines")


def source_fingerprint(packages: Sequence[str] = CODE_PACKAGES) -> str:
    """A short hash of the Python source of ``packages`` as installed (paths and contents).

    Test folders (``components/<step>/tests``) are left out: they are not in the wheel.

    Local runs key the step cache on it, so editing qatflow, a component or the pipeline makes
    the next ``qatflow run`` recompute the steps instead of reusing stale outputs.
    """
    digest = hashlib.sha256()
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise PipelineError(f"package {package!r} is not installed")
        for location in spec.submodule_search_locations:
            root = Path(location)
            for path in sorted(root.rglob("*.py")):
                if "tests" in path.relative_to(root).parts:
                    continue  # not shipped, and no step runs it: editing a test keeps the cache
                digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
                digest.update(path.read_bytes())
                digest.update(b"\0")
    return digest.hexdigest()[:16]


def local_tracking_uri(tracking_uri: str | None = None) -> str:
    """The parameter, else ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the working directory."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def run_local(
    output_dir: str | os.PathLike[str],
    *,
    profile: str = DEFAULT_PROFILE,
    runner: str = DEFAULT_RUNNER,
    enable_caching: bool = True,
    kfp_root: str | os.PathLike[str] | None = None,
    **parameters: Any,
) -> Path:
    """Run the whole pipeline locally; copy the comparison, report and publish record out.

    ``parameters`` are pipeline parameters (see ``qatflow_pipelines.qat_int8.pipeline``); None
    values are ignored, ``profile`` supplies the rest over the pipeline defaults. ``runner``
    is ``subprocess`` or ``docker`` (see the module docstring). KFP's artifacts and step cache
    live in ``kfp_root`` (default ``<output_dir>/kfp``): a rerun with the same inputs and the
    same qatflow source (``source_fingerprint``), and in docker mode the same image IDs, reuses
    the data, model, quantization, export and engine steps. Writes
    ``comparison.json``, ``report.md``/``.html``, ``plots/``, ``publish.json`` (and
    ``mlflow-offline/`` when MLflow was unreachable) into ``output_dir``, prints the comparison
    table and returns ``output_dir``. A failed task raises ``PipelineError`` with its error.
    """
    from kfp import local
    from qatflow_pipelines.qat_int8.parameters import check_arguments
    from qatflow_pipelines.qat_int8.pipeline import build_pipeline

    if profile not in PROFILES:
        raise PipelineError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if runner not in RUNNERS:
        raise PipelineError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    given = {name: value for name, value in parameters.items() if value is not None}
    runtime = str(given.get("runtime", ENGINE.runtime))
    code_version = source_fingerprint()
    pipeline = build_pipeline(runtime=runtime, code_version=code_version)
    known = set(pipeline.component_spec.inputs or {})
    unknown = sorted(set(given) - known)
    if unknown:
        raise PipelineError(
            f"unknown pipeline parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    arguments = {**PROFILES[profile], **given, "runtime": runtime}
    arguments["tracking_uri"] = local_tracking_uri(given.get("tracking_uri"))
    check_arguments(arguments)  # before any task: a bad value never reaches a retried step
    out = Path(output_dir).resolve()
    if runner == DOCKER_RUNNER:
        from qatflow_pipelines.runner import local_docker

        image_ids = local_docker.check_images(_images(pipeline))
        code_version += f"-{local_docker.images_fingerprint(image_ids)}"
        pipeline = build_pipeline(runtime=runtime, code_version=code_version)
        kfp_runner = _docker_runner(arguments, out)
    else:
        kfp_runner = local.SubprocessRunner(use_venv=False)
    out.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=kfp_runner,
        pipeline_root=str(Path(kfp_root).resolve() if kfp_root else out / "kfp"),
        enable_caching=enable_caching,
    )
    tasks = {
        name: task.task_info.name for name, task in pipeline.pipeline_spec.root.dag.tasks.items()
    }
    started = time.monotonic()
    with progress.capture(out / LOG_FILE, tasks) as console:
        try:
            result = pipeline(**arguments)
        except RuntimeError as err:
            raise PipelineError(console.failure(str(err))) from err
    collect_results(Path(result.outputs["publish_record"].path), out)
    print(_summary(out, time.monotonic() - started, str(arguments["tracking_uri"])))
    return out


def collect_results(record: Path, out: Path) -> None:
    """Copy the final report (the one publish re-rendered with the MLflow run IDs, not the
    compare step's draft) and the publish record from the publish task's ``record`` folder
    into ``out``. Folders an earlier run left there (plots, offline MLflow records) go first,
    so nothing stale is mistaken for this run's."""
    from qatflow.publish import REPORT_DIR, REPORT_FILES, SUMMARY_FILE
    from qatflow.report.write import PLOT_DIR

    for stale in (PLOT_DIR, OFFLINE_DIR):
        shutil.rmtree(out / stale, ignore_errors=True)
    _copy(record / REPORT_DIR, out, REPORT_FILES)
    _copy(record, out, (SUMMARY_FILE, OFFLINE_DIR))


def _images(pipeline: Any) -> set[str]:
    """The container images of the pipeline's tasks."""
    executors = pipeline.pipeline_spec.deployment_spec["executors"]
    return {str(executor["container"]["image"]) for executor in executors.values()}


def _docker_runner(arguments: dict[str, Any], out: Path) -> Any:
    """The DockerRunner for ``arguments``, whose local input paths it makes absolute."""
    from qatflow_pipelines.runner import local_docker

    inputs = {
        name: path
        for name in LOCAL_INPUTS
        for path in local_docker.local_inputs(str(arguments.get(name, "")))
    }
    arguments.update({name: str(path) for name, path in inputs.items()})
    mlflow_dir = local_docker.mlflow_store_dir(str(arguments["tracking_uri"]))
    if mlflow_dir is not None:
        mlflow_dir.mkdir(parents=True, exist_ok=True)
    return local_docker.docker_runner(
        run_label=str(out), read_only=list(inputs.values()), mlflow_dir=mlflow_dir
    )


def _copy(source: Path, destination: Path, names: tuple[str, ...]) -> None:
    for name in names:
        item = source / name
        if item.is_dir():
            shutil.copytree(item, destination / name, dirs_exist_ok=True)
        elif item.is_file():
            shutil.copy2(item, destination / name)


def _summary(out: Path, seconds: float, tracking_uri: str) -> str:
    from qatflow.comparison import Comparison
    from qatflow.publish import SUMMARY_FILE
    from qatflow.report.write import COMPARISON_FILE, HTML_FILE, MARKDOWN_FILE

    comparison = Comparison.load_json(out / COMPARISON_FILE)
    record = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
    mlflow, registry = record["mlflow"], record["registry"]
    lines = [
        f"\nqatflow pipeline finished in {seconds / 60:.1f} min: FP32 vs PTQ INT8 vs QAT INT8\n",
        comparison.to_text(),
    ]
    lines += [verdict.reason for verdict in comparison.verdicts().values()]
    lines.append(f"Accuracy gate on {record['gate']['candidate']}: {record['gate']['outcome']}")
    if mlflow["offline"]:
        lines.append(
            f"MLflow was unreachable ({mlflow['offline_reason']}): the run's metrics, params and "
            f"artifact list are kept in {out / OFFLINE_DIR}"
        )
    else:
        lines.append(
            f"MLflow: parent run {mlflow['parent_run_id']} in experiment "
            f"'{mlflow['experiment']}' at {redact_text(tracking_uri)}"
        )
        gate_record = registry["gate"]
        if gate_record is not None:
            outcome = "promoted to champion" if gate_record["promoted"] else "not promoted"
            lines.append(
                f"Registry: {registry['model_name']} v{registry['version']} {outcome} "
                f"({'; '.join(gate_record['reasons'])})"
            )
    if record["s3"]:
        lines.append(f"S3: exported to {record['s3']['uris']['report'].rsplit('/', 1)[0]}")
    lines.append(f"\nReport: {out / HTML_FILE} (Markdown: {out / MARKDOWN_FILE})")
    if tracking_uri.startswith("sqlite:"):
        lines.append(
            f"MLflow UI: `make mlflow-ui` (serves {DEFAULT_TRACKING_URI} of the repository) or "
            f"`mlflow ui --backend-store-uri {tracking_uri}`, then http://127.0.0.1:5000"
        )
    elif not mlflow["offline"]:
        lines.append(f"MLflow UI: {redact_text(tracking_uri)}")
    return "\n".join(lines)
