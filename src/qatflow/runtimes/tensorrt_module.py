"""The TensorRT Python module, imported on first use, with an error that says what to install."""

from __future__ import annotations

from types import ModuleType

from qatflow.errors import RuntimeBackendError


def import_tensorrt() -> ModuleType:
    """The TensorRT Python module, or RuntimeBackendError if only stubs (or nothing) exist."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeBackendError(
            "TensorRT is not installed; build and run TensorRT engines on a GPU node with "
            "pip install 'qatflow[tensorrt]'"
        ) from exc
    if not hasattr(trt, "Builder"):
        # tensorrt-stubs installs a bare 'tensorrt' namespace package that imports fine.
        raise RuntimeBackendError(
            "the installed 'tensorrt' package has no TensorRT runtime (type stubs only); "
            "build and run TensorRT engines on a GPU node with pip install 'qatflow[tensorrt]'"
        )
    return trt
