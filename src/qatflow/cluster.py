"""Submit and schedule the compiled pipeline on a KFP API server; GPU placement for tasks.

KFP schedules recurring runs with robfig/cron v1 ``cron.Parse``: six fields, seconds first,
evaluated in UTC (kubeflow/pipelines ``backend/src/crd/controller/scheduledworkflow/util/
cron_schedule.go``). A classic five-field crontab is *accepted* there but read seconds-first,
so ``validate_cron`` rejects it with the fix.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from qatflow.errors import PipelineError
from qatflow.params import DEFAULT_EXPERIMENT, DEFAULT_JOB_NAME

if TYPE_CHECKING:
    import kfp
    from kfp.dsl import PipelineTask

T = TypeVar("T")

GPU_RESOURCE = "nvidia.com/gpu"
GPU_LIMIT = 1  # accelerators per GPU task
GPU_TOLERATION: Mapping[str, object] = MappingProxyType(
    {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
)
PROBE_TIMEOUT_S = 10.0

# -- cron -------------------------------------------------------------------------------------

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1
    )
}
_DAYS = {
    name: number for number, name in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))
}
# (name, low, high, names) per field, in robfig/cron order.
_FIELDS: tuple[tuple[str, int, int, Mapping[str, int]], ...] = (
    ("seconds", 0, 59, {}),
    ("minutes", 0, 59, {}),
    ("hours", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_GO_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+")
_GO_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
CRON_HELP = (
    "KFP cron has 6 fields, seconds first, evaluated in UTC: "
    "'sec min hour day-of-month month day-of-week', e.g. '0 0 2 * * *' = daily at 02:00:00 UTC. "
    "Fields take *, ?, a-b, a,b, */n; months JAN-DEC, weekdays SUN-SAT (0-6). "
    "Also @hourly, @daily, @weekly, @monthly, @yearly and '@every 6h'."
)


def validate_cron(expr: str) -> str:
    """Check a KFP cron expression (robfig/cron v1 syntax) and return it whitespace-normalised.

    Raises:
        PipelineError: naming the field and value at fault, with the fix for 5-field crontabs.
    """
    fields = expr.split()
    normalized = " ".join(fields)
    if not fields:
        raise PipelineError(f"cron expression is empty. {CRON_HELP}")
    if fields[0].startswith("@"):
        _check_descriptor(normalized)
        return normalized
    if len(fields) == 5:
        raise PipelineError(
            f"cron {normalized!r}: KFP cron has 6 fields, seconds first; "
            f"did you mean '0 {normalized}'?"
        )
    if len(fields) != 6:
        raise PipelineError(
            f"cron {normalized!r} has {len(fields)} fields, expected 6. {CRON_HELP}"
        )
    for text, (name, low, high, names) in zip(fields, _FIELDS, strict=True):
        for part in text.split(","):
            problem = _range_problem(part, low, high, names)
            if problem:
                raise PipelineError(f"cron {normalized!r}: {name} field {text!r}: {problem}")
    return normalized


def _check_descriptor(expr: str) -> None:
    if expr in _DESCRIPTORS:
        return
    every = re.fullmatch(r"@every (\S+)", expr)
    if every is None:
        raise PipelineError(
            f"cron {expr!r}: unknown descriptor; use one of {', '.join(_DESCRIPTORS)} "
            "or '@every <duration>' such as '@every 6h'"
        )
    duration = every.group(1)
    if not _GO_DURATION.fullmatch(duration):
        raise PipelineError(f"cron {expr!r}: {duration!r} is not a duration like 90s, 30m or 1h30m")
    seconds = sum(
        float(number) * _GO_UNIT_S[unit]
        for number, unit in re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", duration)
    )
    if seconds < 1:
        raise PipelineError(f"cron {expr!r}: the interval must be at least one second")


def _range_problem(part: str, low: int, high: int, names: Mapping[str, int]) -> str | None:
    """Why ``part`` (one comma-separated item) is invalid for a field, or None if it is fine."""
    span, _, step = part.partition("/")
    if step and not (step.isdigit() and int(step) > 0):
        return f"step {step!r} must be a positive integer"
    if span in ("*", "?"):
        return None
    start_text, dash, end_text = span.partition("-")
    try:
        start = _field_value(start_text, names)
        end = _field_value(end_text, names) if dash else start
    except ValueError as err:
        return str(err)
    for value in (start, end):
        if not low <= value <= high:
            return f"value {value} is outside {low}-{high}"
    if start > end:
        return f"range start {start} is after its end {end}"
    return None


def _field_value(text: str, names: Mapping[str, int]) -> int:
    if text.isdigit():
        return int(text)
    if text.upper() in names:
        return names[text.upper()]
    allowed = f" or one of {'/'.join(names)}" if names else ""
    raise ValueError(f"{text!r} is not a number{allowed}")


# -- pipeline package and parameters ----------------------------------------------------------


def pipeline_inputs(pipeline_package: Path) -> dict[str, dict[str, Any]]:
    """The root ``inputDefinitions.parameters`` of a compiled pipeline YAML, by name."""
    path = Path(pipeline_package)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise PipelineError(f"pipeline package {path} must be a compiled .yaml/.yml/.json file")
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except OSError as err:
        raise PipelineError(f"cannot read pipeline package {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise PipelineError(f"pipeline package {path} is not valid YAML: {err}") from err
    spec = documents[0] if documents else None
    if not isinstance(spec, dict) or "root" not in spec:
        raise PipelineError(f"pipeline package {path} is not a compiled KFP pipeline (no 'root')")
    params = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    return {str(name): dict(definition) for name, definition in params.items()}


_TYPE_CHECKS: dict[str, Callable[[object], bool]] = {
    "STRING": lambda v: isinstance(v, str),
    "NUMBER_INTEGER": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "NUMBER_DOUBLE": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "BOOLEAN": lambda v: isinstance(v, bool),
    "LIST": lambda v: isinstance(v, list),
    "STRUCT": lambda v: isinstance(v, dict),
}


def check_arguments(pipeline_package: Path, arguments: Mapping[str, object]) -> None:
    """Reject unknown, missing or wrongly typed pipeline arguments, naming each one."""
    inputs = pipeline_inputs(pipeline_package)
    unknown = sorted(set(arguments) - set(inputs))
    if unknown:
        raise PipelineError(
            f"unknown pipeline parameter(s) {', '.join(unknown)} for {pipeline_package}; "
            f"it accepts: {', '.join(sorted(inputs)) or '(none)'}"
        )
    missing = sorted(
        name
        for name, definition in inputs.items()
        if name not in arguments
        and "defaultValue" not in definition
        and not definition.get("isOptional")
    )
    if missing:
        raise PipelineError(f"pipeline parameter(s) {', '.join(missing)} have no default: set them")
    for name, value in arguments.items():
        kind = str(inputs[name].get("parameterType", "STRING"))
        check = _TYPE_CHECKS.get(kind)
        if check is not None and not check(value):
            raise PipelineError(
                f"pipeline parameter {name} expects {kind}, got {type(value).__name__} {value!r}"
            )


def parse_arguments(pipeline_package: Path, pairs: Mapping[str, str]) -> dict[str, object]:
    """Convert ``name -> text`` (from ``--param name=value``) to the pipeline's parameter types."""
    inputs = pipeline_inputs(pipeline_package)
    converted: dict[str, object] = {}
    for name, text in pairs.items():
        kind = str(inputs.get(name, {}).get("parameterType", "STRING"))
        try:
            converted[name] = _convert(kind, text)
        except ValueError as err:
            raise PipelineError(f"pipeline parameter {name}={text!r}: expected {kind}") from err
    check_arguments(pipeline_package, converted)
    return converted


def _convert(kind: str, text: str) -> object:
    if kind == "NUMBER_INTEGER":
        return int(text)
    if kind == "NUMBER_DOUBLE":
        return float(text)
    if kind == "BOOLEAN":
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(text)
        return lowered in ("true", "1", "yes")
    if kind in ("LIST", "STRUCT"):
        return json.loads(text)  # JSONDecodeError is a ValueError
    return text


# -- KFP API ----------------------------------------------------------------------------------


def normalize_host(host: str) -> str:
    """``host`` checked as an ``http(s)://name[:port][/path]`` URL, without a trailing slash.

    Raises ``PipelineError`` naming the host before any connection: no scheme, another
    scheme (``ftp://``), no host name, or a port outside 1-65535.
    """
    host = host.strip().rstrip("/")
    if not host:
        raise PipelineError("KFP host is empty: pass --host or set KF_PIPELINES_ENDPOINT")
    scheme, has_scheme, _ = host.partition("://")
    if not has_scheme:
        raise PipelineError(
            f"KFP host {host!r} has no scheme: pass http://{host} or https://{host}"
        )
    if scheme.lower() not in ("http", "https"):
        raise PipelineError(f"KFP host {host!r}: the scheme must be http or https, not {scheme}")
    parts = urllib.parse.urlsplit(host)
    try:
        port = parts.port  # ValueError for a port outside 0-65535 or not a number
    except ValueError as err:
        raise PipelineError(f"KFP host {host!r}: invalid port ({err})") from err
    if not parts.hostname:
        raise PipelineError(f"KFP host {host!r} has no host name")
    if port == 0:
        raise PipelineError(f"KFP host {host!r}: the port must be 1-65535")
    return host


def check_reachable(
    host: str, *, token: str | None = None, timeout: float = PROBE_TIMEOUT_S
) -> None:
    """Fail fast, naming ``host``, if no HTTP server answers at the KFP healthz endpoint."""
    request = urllib.request.Request(f"{host}/apis/v2beta1/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # something answered (auth proxy, 404 behind a prefix...): let kfp report details
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise PipelineError(f"KFP API server {host} is unreachable: {reason}") from err


def _client(host: str, namespace: str | None, existing_token: str | None) -> kfp.Client:
    import kfp

    check_reachable(host, token=existing_token)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP >= 2.0.0-beta.2"
        return _kfp_call(
            host,
            "connecting",
            lambda: kfp.Client(
                host=host, namespace=namespace or "kubeflow", existing_token=existing_token
            ),
        )


def _kfp_call(host: str, what: str, call: Callable[[], T]) -> T:
    """Run a kfp call, turning API and network errors into a PipelineError naming ``host``."""
    import kfp_server_api
    import urllib3

    try:
        return call()
    except kfp_server_api.ApiException as err:
        detail = (err.body or err.reason or "").strip()
        raise PipelineError(
            f"KFP API server {host} rejected {what}: HTTP {err.status} {detail}"
        ) from err
    except (urllib3.exceptions.HTTPError, TimeoutError) as err:
        raise PipelineError(f"KFP API server {host} failed while {what}: {err}") from err


def submit(
    host: str,
    pipeline_package: Path,
    *,
    arguments: Mapping[str, object],
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    namespace: str | None = None,
    existing_token: str | None = None,
    enable_caching: bool | None = None,
) -> str:
    """Run a compiled pipeline once in ``experiment`` (created if missing); return the run id."""
    host = normalize_host(host)
    check_arguments(pipeline_package, arguments)
    client = _client(host, namespace, existing_token)
    result = _kfp_call(
        host,
        f"run of {pipeline_package}",
        lambda: client.create_run_from_pipeline_package(
            str(pipeline_package),
            arguments=dict(arguments),
            run_name=run_name,
            experiment_name=experiment,
            namespace=namespace,
            enable_caching=enable_caching,
        ),
    )
    return str(result.run_id)


def schedule(
    host: str,
    pipeline_package: Path,
    *,
    cron: str,
    arguments: Mapping[str, object],
    experiment: str = DEFAULT_EXPERIMENT,
    job_name: str = DEFAULT_JOB_NAME,
    description: str | None = None,
    max_concurrency: int = 1,
    no_catchup: bool = True,
    namespace: str | None = None,
    existing_token: str | None = None,
    enable_caching: bool | None = None,
) -> str:
    """Create a recurring run on a 6-field ``cron`` schedule; return the recurring run id.

    KFP cannot update a recurring run: to change it, delete it and schedule again.
    """
    cron = validate_cron(cron)
    if max_concurrency < 1:
        raise PipelineError(f"max_concurrency must be >= 1, got {max_concurrency}")
    host = normalize_host(host)
    check_arguments(pipeline_package, arguments)
    client = _client(host, namespace, existing_token)
    experiment_id = _kfp_call(
        host,
        f"experiment {experiment!r}",
        lambda: client.create_experiment(experiment, namespace=namespace).experiment_id,
    )
    recurring = _kfp_call(
        host,
        f"recurring run {job_name!r} ({cron})",
        lambda: client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=job_name,
            description=description,
            cron_expression=cron,
            max_concurrency=max_concurrency,
            no_catchup=no_catchup,
            params=dict(arguments),
            pipeline_package_path=str(pipeline_package),
            enable_caching=enable_caching,
        ),
    )
    return str(recurring.recurring_run_id)


# -- GPU placement ------------------------------------------------------------------------------

_TOLERATION_KEYS = ("key", "operator", "value", "effect", "toleration_seconds")


def apply_gpu_settings(
    task: PipelineTask,
    *,
    accelerator_type: str = GPU_RESOURCE,
    accelerator_limit: int = GPU_LIMIT,
    toleration: Mapping[str, object] | None = GPU_TOLERATION,
    node_selector: Mapping[str, str] | None = None,
) -> PipelineTask:
    """Request GPUs for ``task`` and let it land on tainted GPU nodes.

    Sets the accelerator type and limit, adds ``toleration`` (default: tolerate the
    ``nvidia.com/gpu`` NoSchedule taint; None for none) and one nodeSelector entry per item of
    ``node_selector``. These only take effect on a cluster; ``kfp.local`` ignores them.
    """
    from kfp import kubernetes

    if isinstance(accelerator_limit, bool) or accelerator_limit < 1:
        raise PipelineError(
            f"accelerator_limit for task {task.name} must be a positive integer, "
            f"got {accelerator_limit!r}"
        )
    task.set_accelerator_type(accelerator_type)
    task.set_accelerator_limit(accelerator_limit)
    if toleration is not None:
        bad = sorted(set(toleration) - set(_TOLERATION_KEYS))
        if bad:
            raise PipelineError(
                f"toleration for task {task.name} has unknown field(s) {', '.join(bad)}; "
                f"allowed: {', '.join(_TOLERATION_KEYS)}"
            )
        kubernetes.add_toleration(task, **toleration)
    for label, value in (node_selector or {}).items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    return task
