"""Keep TensorFlow's C++ start-up lines off the ``qatflow`` command line.

TensorFlow writes a few lines to file descriptor 2 from C++ while it is imported (the absl
"before InitializeLog" notice, oneDNN, ``cudart_stub``, CPU-feature and ``cuInit`` lines),
before it reads ``TF_CPP_MIN_LOG_LEVEL``, so the variable cannot silence them. ``install()``
puts a one-shot import hook in front of ``import tensorflow``: the first import (direct, or
through Keras or tf2onnx) runs with file descriptor 2 redirected to a temporary file, and
afterwards every captured line that is not one of those known notices is written back to
standard error, so real errors still show. ``QATFLOW_TF_LOGS=1`` turns all of this off and
keeps TensorFlow's raw output.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

ENV = "QATFLOW_TF_LOGS"  # "1": keep TensorFlow's start-up lines and its C++ log level
MODULE = "tensorflow"

# C++ sources whose start-up lines say nothing a qatflow user acts on.
_NOISY_SOURCES = (
    "port.cc",  # oneDNN custom operations are on
    "cudart_stub.cc",  # Could not find cuda drivers on your machine
    "cpu_feature_guard.cc",  # This TensorFlow binary is optimized to use ...
    "cuda_platform.cc",  # failed call to cuInit (no GPU)
    "cuda_executor.cc",
    "cuda_diagnostics.cc",
    "cuda_dnn.cc",  # Unable to register cuDNN factory
    "cuda_fft.cc",
    "cuda_blas.cc",
    "computation_placer.cc",
    "dso_loader.cc",  # Could not load dynamic library 'libcudart.so.12'
    "gpu_device.cc",  # Cannot dlopen some GPU libraries
    "py_utils.cc",  # TF-TRT Warning: Could not find TensorRT
)
NOISE: tuple[re.Pattern[str], ...] = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    # glog/absl format: I0000 00:00:1796136555.682206   11618 port.cc:153] ... (not F: fatal)
    re.compile(
        r"^[IWE]\d{4} [\d:.]+\s+\d+ "
        rf"(?:{'|'.join(re.escape(name) for name in _NOISY_SOURCES)}):\d+\]"
    ),
    # The second line of cpu_feature_guard's notice.
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow with"),
)


def is_noise(line: str) -> bool:
    """Whether ``line`` is one of TensorFlow's known start-up notices."""
    return any(pattern.search(line) for pattern in NOISE)


def enabled() -> bool:
    """False when ``QATFLOW_TF_LOGS`` asks for TensorFlow's raw output."""
    return os.environ.get(ENV, "").strip().lower() not in ("1", "true", "yes", "on")


@contextlib.contextmanager
def quiet_stderr(noise: Callable[[str], bool] = is_noise) -> Iterator[None]:
    """Redirect file descriptor 2 for the block; then write back the lines that are not
    ``noise``. Python's ``sys.stderr`` is flushed around the block, so order is kept."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2 (or a closed sys.stderr)
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = "".join(line for line in text.splitlines(keepends=True) if not noise(line))
            _write_fd(2, kept.encode("utf-8"))


def _write_fd(fd: int, data: bytes) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _probe_devices(module: Any) -> None:
    """List the physical devices: that is when TensorFlow probes CUDA and logs ``cuInit`` on
    a machine without a GPU. It does not initialise the runtime, so thread settings can still
    be made afterwards."""
    with contextlib.suppress(Exception):
        module.config.list_physical_devices()


class _QuietLoader(importlib.abc.Loader):
    """Wraps TensorFlow's own loader: ``exec_module`` runs inside ``quiet_stderr``."""

    def __init__(self, loader: importlib.abc.Loader, finder: _QuietFinder) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._finder.remove()
        # Later code sees TensorFlow's real loader, as without the hook.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        with quiet_stderr():
            self._loader.exec_module(module)
            _probe_devices(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` like the rest of ``sys.meta_path`` and wraps its loader."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != MODULE or self._busy:
            return None
        self._busy = True
        try:
            spec = _find_elsewhere(fullname, path, target, self)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader, self)
        return spec

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)


def _find_elsewhere(
    fullname: str, path: Sequence[str] | None, target: ModuleType | None, skip: object
) -> importlib.machinery.ModuleSpec | None:
    for finder in list(sys.meta_path):
        if finder is skip or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def install() -> bool:
    """Quiet the first ``import tensorflow`` of this process, and TensorFlow's C++ INFO and
    WARNING logs after it (``TF_CPP_MIN_LOG_LEVEL=2`` unless set). Returns whether the hook
    is in place: not with ``QATFLOW_TF_LOGS=1``, nor once TensorFlow is imported."""
    if not enabled():
        return False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if MODULE in sys.modules:
        return False
    if not any(isinstance(finder, _QuietFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
    return True
