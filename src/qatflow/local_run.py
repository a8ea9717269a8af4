"""Run the QAT INT8 pipeline on this machine with ``kfp.local`` and collect its results.

With the ``subprocess`` runner every task runs as a subprocess of the current Python
(``SubprocessRunner(use_venv=False)``), so the installed qatflow is used and container images
are ignored. With the ``docker`` runner every task runs in its component's image, built by
this checkout (``qatflow.local_docker``). GPU settings are not applied (``kfp.local`` ignores
them), hence the runtime is ONNX Runtime on CPU. KFP's own output (executor inputs, task and
container logs) goes to ``<output>/pipeline.log``; the terminal gets one line per task plus the
final state of the steps' progress bars.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from qatflow.errors import PipelineError
from qatflow.params import ENGINE, MODEL
from qatflow.tracking import DEFAULT_TRACKING_URI, redact_text

PROFILES: Mapping[str, Mapping[str, object]] = {
    # The full demo: all of Fashion-MNIST, the demo model pretrained with its full recipe
    # (5 epochs, >= 91 % top-1, cached after the first run) and one epoch of QAT.
    "default": {"pretrain_epochs": MODEL.pretrain_epochs, "epochs": 1},
    # A few minutes end to end: small splits, a few QAT steps, and enough pretraining to learn
    # (4 epochs of 2000 images, 63 steps: about 70 % top-1; one epoch stayed near chance).
    "smoke": {
        "limit": 2000,
        "eval_max_batches": 8,
        "pretrain_epochs": 4,
        "epochs": 1,
        "qat_steps_per_epoch": 10,
        "calibration_batches": 4,
        "latency_iterations": 20,
    },
}
RUNNERS = ("subprocess", "docker")
LOCAL_INPUTS = ("model_uri", "dataset_uri")  # parameters that may name local files
REPORT_FILES = ("comparison.json", "report.md", "report.html", "plots")
RECORD_FILES = ("publish.json", "mlflow-offline")
LOG_FILE = "pipeline.log"
BAR_INTERVAL_S = 15.0  # progress-bar lines shown at most this often (plus each bar at 100%)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_CACHE_HIT = re.compile(r"Task (\S+) cache hit")
_RETRY = re.compile(r"Task (\S+) failed \(attempt (\d+/\d+)\)\. Retrying in ([\d.]+)s")
_ERROR = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$")
_BAR = re.compile(r"\d+%\|")


CODE_PACKAGES = ("qatflow", "qatflow_components", "qatflow_pipelines")


def source_fingerprint(packages: Sequence[str] = CODE_PACKAGES) -> str:
    """A short hash of the Python source of ``packages`` as installed (paths and contents).

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
    profile: str = "default",
    runner: str = "subprocess",
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
    if runner == "docker":
        from qatflow import local_docker

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
    with _progress(out / LOG_FILE, tasks) as progress:
        try:
            result = pipeline(**arguments)
        except RuntimeError as err:
            raise PipelineError(progress.failure(str(err))) from err
    _copy(Path(result.outputs["report"].path), out, REPORT_FILES)
    _copy(Path(result.outputs["publish_record"].path), out, RECORD_FILES)
    print(_summary(out, time.monotonic() - started, str(arguments["tracking_uri"])))
    return out


def _images(pipeline: Any) -> set[str]:
    """The container images of the pipeline's tasks."""
    executors = pipeline.pipeline_spec.deployment_spec["executors"]
    return {str(executor["container"]["image"]) for executor in executors.values()}


def _docker_runner(arguments: dict[str, Any], out: Path) -> Any:
    """The DockerRunner for ``arguments``, whose local input paths it makes absolute."""
    from qatflow import local_docker

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


class _Progress(io.TextIOBase):
    """KFP's stdout: everything to the log file; task lines and progress bars to ``console``."""

    def __init__(self, log: TextIO, console: TextIO, tasks: Mapping[str, str]) -> None:
        self._log = log
        self._console = console
        self._tasks = tasks
        self._buffer = ""
        self._started = time.monotonic()
        self._done = 0
        self._task_lines: list[str] = []
        self._failed: tuple[str, str | None] | None = None
        self._last_bar = 0.0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._log.write(text)
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._line(_ANSI.sub("", line))
        return len(text)

    def _name(self, task: str) -> str:
        return self._tasks.get(task, task)

    def _say(self, message: str) -> None:
        print(message, file=self._console, flush=True)

    def _line(self, line: str) -> None:
        if match := _EXECUTING.search(line):
            self._started, self._task_lines = time.monotonic(), []
        elif match := _FINISHED.search(line):
            task, seconds = match[1], time.monotonic() - self._started
            if match[2] == "SUCCESS":
                self._done += 1
                self._say(
                    f"[{self._done:2d}/{len(self._tasks)}] {self._name(task)}: done "
                    f"({seconds:.0f} s)"
                )
            else:
                self._failed = (task, self._error())
                self._say(
                    f"        {self._name(task)}: {match[2]} after {seconds:.0f} s: "
                    f"{self._failed[1] or 'see the log'}"
                )
        elif match := _RETRY.search(line):
            self._say(
                f"        {self._name(match[1])}: attempt {match[2]} failed, retrying "
                f"in {float(match[3]):.0f} s"
            )
        elif match := _CACHE_HIT.search(line):
            self._done += 1
            self._say(f"[{self._done:2d}/{len(self._tasks)}] {self._name(match[1])}: cached")
        else:
            self._task_lines.append(line)
            bar = _BAR.search(line)
            now = time.monotonic()
            if bar and (bar[0] == "100%|" or now - self._last_bar >= BAR_INTERVAL_S):
                self._last_bar = now
                self._say(f"      {line.strip()}")

    def _error(self) -> str | None:
        for line in reversed(self._task_lines):
            if match := _ERROR.match(line):
                return f"{match[1]}: {match[2]}"
        return None

    def failure(self, kfp_message: str) -> str:
        """A one-line description of the failed task, for the error raised to the caller."""
        log_hint = f"full log: {self._log.name}"
        if self._failed is None:
            return f"pipeline failed: {_ANSI.sub('', kfp_message)}; {log_hint}"
        task, error = self._failed
        return f"pipeline task '{self._name(task)}' failed: {error or 'see the log'}; {log_hint}"


@contextlib.contextmanager
def _progress(log_path: Path, tasks: Mapping[str, str]) -> Iterator[_Progress]:
    """Send KFP's stdout through a ``_Progress`` and silence its local-runner warnings."""
    console = sys.stderr
    with (
        log_path.open("w", encoding="utf-8") as log,
        warnings.catch_warnings(),
    ):
        # Images and GPU/display settings only matter on a cluster.
        warnings.filterwarnings("ignore", message=r".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=r".*no effect in the current local runner.*")
        progress = _Progress(log, console, tasks)
        # kfp.local logs cache hits and retries on the root logger at INFO, outside the
        # per-task logging set-up it prints through: route those to the progress too.
        root = logging.getLogger()
        saved = root.handlers[:], root.level
        root.handlers = [logging.StreamHandler(progress)]
        root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(progress):
                yield progress
        finally:
            root.handlers = saved[0]
            root.setLevel(saved[1])


def _copy(source: Path, destination: Path, names: tuple[str, ...]) -> None:
    for name in names:
        item = source / name
        if item.is_dir():
            shutil.copytree(item, destination / name, dirs_exist_ok=True)
        elif item.is_file():
            shutil.copy2(item, destination / name)


def _summary(out: Path, seconds: float, tracking_uri: str) -> str:
    from qatflow.comparison import Comparison

    comparison = Comparison.load_json(out / "comparison.json")
    record = json.loads((out / "publish.json").read_text(encoding="utf-8"))
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
            f"artifact list are kept in {out / 'mlflow-offline'}"
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
    lines.append(f"\nReport: {out / 'report.html'} (Markdown: {out / 'report.md'})")
    if tracking_uri.startswith("sqlite:"):
        lines.append(
            f"MLflow UI: `make mlflow-ui` (serves {DEFAULT_TRACKING_URI} of the repository) or "
            f"`mlflow ui --backend-store-uri {tracking_uri}`, then http://127.0.0.1:5000"
        )
    elif not mlflow["offline"]:
        lines.append(f"MLflow UI: {redact_text(tracking_uri)}")
    return "\n".join(lines)
