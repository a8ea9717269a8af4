"""build_engine and load_engine: pick the runtime backend from the table of backends.

The backends import ``qatflow.runtimes.base`` and nothing here; this module imports them. Each
imports its runtime library (onnxruntime, tensorrt) only when it builds or loads an engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatflow.errors import RuntimeBackendError
from qatflow.onnx.validate import check_runnable
from qatflow.params import ENGINE, RUNTIMES, RuntimeName
from qatflow.runtimes.base import (
    BatchProfile,
    Engine,
    is_onnx_model,
    options_from_kwargs,
    read_sidecar,
    sidecar_path,
    validate_batch_profile,
)
from qatflow.runtimes.fidelity import GIVEN_DATA, FidelityCheck, check_sample_count
from qatflow.runtimes.onnxruntime_backend import OrtBuildOptions, build_ort_engine, load_ort_engine
from qatflow.runtimes.tensorrt_backend import TensorRTBuildOptions, build_tensorrt_engine
from qatflow.runtimes.tensorrt_inference import load_tensorrt_engine


@dataclass(frozen=True)
class Backend:
    """One runtime: the dataclass of its build options and its build function."""

    options: type[Any]
    build: Callable[[Path, Path, BatchProfile, Any, FidelityCheck], Path]


BACKENDS: dict[str, Backend] = {
    "onnxruntime": Backend(OrtBuildOptions, build_ort_engine),
    "tensorrt": Backend(TensorRTBuildOptions, build_tensorrt_engine),
}


def build_engine(
    onnx_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    runtime: RuntimeName = ENGINE.runtime,
    *,
    batch_profile: tuple[int, int, int] = ENGINE.batch_profile,
    fidelity_data: Any = None,
    fidelity_samples: int = ENGINE.fidelity_samples,
    fidelity_source: str = GIVEN_DATA,
    **runtime_options: Any,
) -> Path:
    """Build an engine for ``runtime`` from an ONNX file, check it, and return the engine path.

    Every engine is checked against its reference (the same ONNX run as float math) on
    ``fidelity_data`` (an array of inputs or an iterable of batches, at most
    ``fidelity_samples`` samples, recorded as "N samples of ``fidelity_source``"; None:
    synthetic inputs over the input's quantization range)
    before it is written; an engine that fails the check is an error (see
    :mod:`qatflow.runtimes.fidelity`). A source graph with fatal problems (``validate_onnx``:
    the ONNX checker fails, or a Q/DQ scale is not positive and finite) is refused first.

    ``onnxruntime`` options: ``threads``, ``encoding``, ``execution_mode``,
    ``optimization_level``, ``int8_rewrite``. ``tensorrt`` options: ``fp16``,
    ``workspace_bytes``, ``builder_optimization_level``, ``timing_cache``, ``layer_info``.
    See docs/runtimes.md.
    """
    if runtime not in RUNTIMES:
        raise RuntimeBackendError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    source, output = Path(onnx_path), Path(output_path)
    if not source.is_file():
        raise RuntimeBackendError(f"ONNX file {source} does not exist")
    check_runnable(source)
    profile = validate_batch_profile(batch_profile)
    check = FidelityCheck(fidelity_data, check_sample_count(fidelity_samples), fidelity_source)
    backend = BACKENDS[runtime]
    options = options_from_kwargs(backend.options, runtime, runtime_options)
    return backend.build(source, output, profile, options, check)


def load_engine(path: str | os.PathLike[str], *, threads: int | None = None) -> Engine:
    """Load an engine file built by ``build_engine`` (or a plain ONNX model, run by ORT).

    An ONNX model is run by ONNX Runtime (an ORT engine carries its metadata inside, so a
    ``<engine>.json`` beside it is no sidecar of it and is ignored); any other file with a
    ``<engine>.json`` sidecar is a TensorRT engine. Mismatched runtimes or versions raise
    ``RuntimeBackendError``.
    """
    engine_path = Path(path)
    if not engine_path.is_file():
        raise RuntimeBackendError(f"engine file {engine_path} does not exist")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise RuntimeBackendError(f"threads must be a positive integer, got {threads!r}")
    sidecar = sidecar_path(engine_path)
    if sidecar.is_file() and not is_onnx_model(engine_path):
        metadata = read_sidecar(sidecar, engine_path)
        if metadata.runtime != "tensorrt":
            raise RuntimeBackendError(
                f"{sidecar} says runtime {metadata.runtime!r}; only TensorRT engines have a "
                "sidecar (ONNX Runtime engines carry their metadata inside the model)"
            )
        return load_tensorrt_engine(engine_path, metadata)
    return load_ort_engine(engine_path, threads=threads)
