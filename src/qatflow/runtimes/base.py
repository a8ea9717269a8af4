"""Engine interface, engine metadata, shape/profile checks and version checks.

Everything here is pure Python (numpy + onnx): the runtime backends import it, never the
other way round; ``qatflow.runtimes.dispatch`` picks the backend.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx

from qatflow.errors import RuntimeBackendError
from qatflow.storage import file_sha256 as file_sha256  # re-exported for the backends

Shape = tuple[int | None, ...]
BatchProfile = tuple[int, int, int]
METADATA_FORMAT = "qatflow-engine/1"


@dataclasses.dataclass(frozen=True)
class EngineMetadata:
    """What qatflow records about a built engine (ORT: model metadata_props; TRT: sidecar)."""

    runtime: str
    runtime_version: str
    source_onnx: str
    source_sha256: str
    input_name: str
    input_shape: Shape
    output_name: str
    batch_profile: BatchProfile
    build_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    device: dict[str, Any] = dataclasses.field(default_factory=dict)
    # FidelityReport.to_dict() of the build-time check against the reference (empty if none).
    fidelity: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, tagged with the metadata format."""
        return {"format": METADATA_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: Path) -> EngineMetadata:
        """Parse metadata read from ``origin``; a missing or malformed field names the file."""
        if data.get("format") != METADATA_FORMAT:
            raise RuntimeBackendError(
                f"{origin}: engine metadata format {data.get('format')!r} is not "
                f"{METADATA_FORMAT!r}; rebuild the engine with this qatflow"
            )
        try:
            return cls(
                runtime=str(data["runtime"]),
                runtime_version=str(data["runtime_version"]),
                source_onnx=str(data["source_onnx"]),
                source_sha256=str(data["source_sha256"]),
                input_name=str(data["input_name"]),
                input_shape=tuple(None if d is None else int(d) for d in data["input_shape"]),
                output_name=str(data["output_name"]),
                batch_profile=_as_profile(data["batch_profile"]),
                build_options=dict(data.get("build_options", {})),
                device=dict(data.get("device", {})),
                fidelity=dict(data.get("fidelity", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RuntimeBackendError(f"{origin}: malformed engine metadata ({exc!r})") from exc


def _as_profile(value: Sequence[Any]) -> BatchProfile:
    low, opt, high = (int(v) for v in value)
    return low, opt, high


class Engine(ABC):
    """A loaded inference engine: ``run`` maps a batch of inputs to logits."""

    def __init__(self, path: Path, metadata: EngineMetadata) -> None:
        self._path = path
        self._metadata = metadata

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch (any size; first axis is the batch) and return the logits."""

    @property
    def metadata(self) -> EngineMetadata:
        """Metadata recorded at build time (synthesized for a plain ONNX model)."""
        return self._metadata

    @property
    def runtime(self) -> str:
        """``"onnxruntime"`` or ``"tensorrt"``."""
        return self._metadata.runtime

    @property
    @abstractmethod
    def runtime_version(self) -> str:
        """Version of the runtime library that runs this engine."""

    @property
    @abstractmethod
    def device(self) -> str:
        """``"cpu (<machine>)"`` or the GPU name."""

    @property
    @abstractmethod
    def threads(self) -> int | None:
        """CPU intra-op threads (None for GPU engines)."""

    @property
    def path(self) -> Path:
        """The engine file."""
        return self._path

    @property
    def input_name(self) -> str:
        """Name of the single model input."""
        return self._metadata.input_name

    @property
    def input_shape(self) -> Shape:
        """Input shape with ``None`` for the (dynamic) batch dimension."""
        return self._metadata.input_shape

    @property
    def size_bytes(self) -> int:
        """Size of the engine file on disk."""
        return self._path.stat().st_size


# --------------------------------------------------------------------------- ONNX inspection


def onnx_io(model: onnx.ModelProto, source: Path) -> tuple[str, tuple[int | str | None, ...], str]:
    """Return (input name, input dims, output name); dims are ints, symbols or None.

    Engines have one output: an engine of a multi-output model would serve its first head
    only, so such a model is refused.
    """
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise RuntimeBackendError(f"{source}: expected exactly one model input, found {names}")
    if len(model.graph.output) != 1:
        names = [o.name for o in model.graph.output]
        raise RuntimeBackendError(
            f"{source}: an engine takes a model with exactly one output, found {names}; "
            "export one head at a time (keras.Model(model.input, model.outputs[i]))"
        )
    dims: list[int | str | None] = []
    for dim in inputs[0].type.tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or None)
    return inputs[0].name, tuple(dims), model.graph.output[0].name


def has_qdq(model: onnx.ModelProto) -> bool:
    """True if the graph holds QuantizeLinear nodes (explicit quantization)."""
    return any(node.op_type == "QuantizeLinear" for node in model.graph.node)


# --------------------------------------------------------------------------- shapes and profiles


def validate_batch_profile(batch_profile: Sequence[int]) -> BatchProfile:
    """Check ``(min, opt, max)`` is three integers with ``1 <= min <= opt <= max``."""
    values = tuple(batch_profile)
    if len(values) != 3 or not all(isinstance(v, int | np.integer) for v in values):
        raise RuntimeBackendError(
            f"batch_profile must be three integers (min, opt, max), got {batch_profile!r}"
        )
    low, opt, high = (int(v) for v in values)
    if not 1 <= low <= opt <= high:
        raise RuntimeBackendError(
            f"batch_profile must satisfy 1 <= min <= opt <= max, got {(low, opt, high)}"
        )
    return low, opt, high


def profile_shapes(
    input_name: str,
    dims: Sequence[int | str | None],
    batch_profile: Sequence[int],
    source: Path,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Min/opt/max input shapes for a dynamic-batch profile.

    The batch (first) dimension comes from ``batch_profile``; every other dimension must be
    fixed in the ONNX. A fixed ONNX batch is accepted only if the profile is that batch.
    """
    low, opt, high = validate_batch_profile(batch_profile)
    if not dims:
        raise RuntimeBackendError(f"{source}: input {input_name!r} is a scalar, not a batch")
    batch, rest = dims[0], dims[1:]
    unknown = [i + 1 for i, d in enumerate(rest) if not isinstance(d, int)]
    if unknown:
        raise RuntimeBackendError(
            f"{source}: input {input_name!r} has dynamic non-batch dimension(s) {unknown} "
            f"(shape {list(dims)}); only the batch dimension may be dynamic"
        )
    if isinstance(batch, int) and (low, opt, high) != (batch, batch, batch):
        raise RuntimeBackendError(
            f"{source}: input {input_name!r} has a fixed batch of {batch}, which conflicts "
            f"with batch_profile {(low, opt, high)}; re-export the ONNX with a dynamic batch "
            f"or pass batch_profile=({batch}, {batch}, {batch})"
        )
    fixed = tuple(int(d) for d in rest if isinstance(d, int))
    return (low, *fixed), (opt, *fixed), (high, *fixed)


def engine_input_shape(dims: Sequence[int | str | None]) -> Shape:
    """Input shape as reported by ``Engine.input_shape``: symbolic dimensions become ``None``."""
    return tuple(d if isinstance(d, int) else None for d in dims)


def check_batch(batch: np.ndarray, input_name: str, input_shape: Shape) -> None:
    """Raise if ``batch`` does not fit ``input_shape`` (None dims accept any size)."""
    if batch.ndim != len(input_shape):
        raise RuntimeBackendError(
            f"input {input_name!r} expects {len(input_shape)} dimensions "
            f"{_fmt(input_shape)}, got an array of shape {batch.shape}"
        )
    if batch.shape[0] < 1:
        raise RuntimeBackendError(f"input {input_name!r}: the batch is empty")
    for axis, (want, got) in enumerate(zip(input_shape, batch.shape, strict=True)):
        if want is not None and want != got:
            raise RuntimeBackendError(
                f"input {input_name!r} expects shape {_fmt(input_shape)}, got {batch.shape} "
                f"(dimension {axis} is {got}, expected {want})"
            )


def _fmt(shape: Shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


# --------------------------------------------------------------------------- versions


def version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric components of a version string: ``"10.13.0.35"`` -> (10, 13, 0, 35)."""
    parts: list[int] = []
    for part in version.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() < len(part):
            break
    if not parts:
        raise RuntimeBackendError(f"cannot parse runtime version {version!r}")
    return tuple(parts)


def check_same_version(
    path: Path, runtime: str, built: str, installed: str, components: int
) -> None:
    """Raise unless the first ``components`` version numbers of built and installed agree."""
    if version_tuple(built)[:components] != version_tuple(installed)[:components]:
        which = ("major", "major.minor", "major.minor.patch")[min(components, 3) - 1]
        raise RuntimeBackendError(
            f"{path} was built with {runtime} {built}, but {runtime} {installed} is installed; "
            f"the {which} versions must match: rebuild the engine with this {runtime}"
        )


# --------------------------------------------------------------------------- options and threads

OptionsT = TypeVar("OptionsT")


def options_from_kwargs(cls: type[OptionsT], runtime: str, kwargs: Mapping[str, Any]) -> OptionsT:
    """Build an options dataclass, rejecting keys it does not define (typos fail loudly)."""
    allowed = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise RuntimeBackendError(
            f"unknown {runtime} runtime option(s) {unknown}; allowed: {sorted(allowed)}"
        )
    return cls(**kwargs)


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads not counted)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores: set[tuple[str, str]] = set()
    try:
        blocks = Path("/proc/cpuinfo").read_text().split("\n\n")
    except OSError:
        blocks = []
    for block in blocks:
        fields = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in block.splitlines())
        )
        if "processor" not in fields or "core id" not in fields:
            continue
        if allowed is not None and int(fields["processor"]) not in allowed:
            continue
        cores.add((fields.get("physical id", "0"), fields["core id"]))
    if cores:
        return len(cores)
    return len(allowed) if allowed else os.cpu_count() or 1


# --------------------------------------------------------------------------- engine files


def sidecar_path(engine_path: Path) -> Path:
    """``<engine>.json``: metadata of a TensorRT engine."""
    return engine_path.with_name(engine_path.name + ".json")


def is_onnx_model(path: Path) -> bool:
    """Whether ``path`` holds an ONNX graph (then it is no TensorRT plan, whatever lies beside)."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # onnx raises DecodeError and others for what is not ONNX
        return False
    return bool(model.graph.node)


# The sidecar names the plan it describes by hash: a sidecar left beside another file (an older
# build, a copied plan) must not lend that file its identity.
ENGINE_HASH_KEY = "engine_sha256"


def sidecar_record(metadata: EngineMetadata, plan: bytes) -> dict[str, Any]:
    """What a TensorRT engine's sidecar holds: ``metadata`` and the plan's SHA-256."""
    return {**metadata.to_dict(), ENGINE_HASH_KEY: hashlib.sha256(plan).hexdigest()}


def read_sidecar(sidecar: Path, engine_path: Path) -> EngineMetadata:
    """Read and validate the sidecar of the TensorRT engine ``engine_path``."""
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RuntimeBackendError(f"{sidecar}: unreadable engine metadata ({exc})") from exc
    if not isinstance(data, dict):
        raise RuntimeBackendError(f"{sidecar}: engine metadata is not a JSON object")
    metadata = EngineMetadata.from_dict(data, sidecar)
    recorded = data.get(ENGINE_HASH_KEY)
    if recorded != file_sha256(engine_path):
        what = "names no engine hash" if recorded is None else "was written for another plan"
        raise RuntimeBackendError(
            f"{sidecar} {what} than {engine_path} (SHA-256 differs); rebuild the engine with "
            f"`qatflow build-engine {metadata.source_onnx} --runtime tensorrt --output "
            f"{engine_path}`"
        )
    return metadata
