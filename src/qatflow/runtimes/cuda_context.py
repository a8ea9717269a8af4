"""The process's one CUDA context: the primary context of the chosen GPU, through pycuda.

TensorRT's own CUDA runtime calls use the primary context of the current device, so building,
checking and running engines in that same context keeps one context per process (no
``pycuda.autoinit``, whose context is a second, non-primary one, current on the importing thread
only and popped at exit while engines may still hold memory in it).

The device is chosen as ``pycuda.tools.make_default_context`` does (``CUDA_DEVICE``, then
``~/.cuda_device``, then the first usable device, numbered within ``CUDA_VISIBLE_DEVICES``).
:meth:`CudaContext.active` makes the context current on the calling thread for the duration
of one call, so engines may be loaded, run and closed from any thread. At exit, engines still
open are closed (while the context is alive) before the context is released.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from qatflow.errors import RuntimeBackendError

logger = logging.getLogger("qatflow.runtimes.cuda")

INSTALL_HINT = "pip install 'qatflow[tensorrt]'"


class Closable(Protocol):
    """What the context closes at exit: an engine holding device memory."""

    def close(self) -> None:
        """Free the object's GPU resources."""


class CudaContext:
    """The retained primary context of one device, pushed around each call."""

    def __init__(self, cuda: ModuleType, context: Any) -> None:
        self.cuda = cuda
        self._context = context
        self._open: weakref.WeakSet[Closable] = weakref.WeakSet()
        self.device: dict[str, Any] = {"name": "the GPU"}
        with self.active("querying the GPU"):
            self.device = device_info(cuda.Context.get_device())

    @contextlib.contextmanager
    def active(self, doing: str) -> Iterator[None]:
        """Make the context current on this thread; CUDA errors become RuntimeBackendError."""
        if self._context is None:
            raise RuntimeBackendError(f"{doing}: the CUDA context was released at exit")
        try:
            self._context.push()
        except self.cuda.Error as exc:
            raise RuntimeBackendError(f"{doing}: cannot activate the CUDA context: {exc}") from exc
        try:
            yield
        except self.cuda.Error as exc:
            raise RuntimeBackendError(
                f"{doing}: CUDA error on {self.device['name']}: {exc}"
            ) from exc
        finally:
            self.cuda.Context.pop()

    def track(self, engine: Closable) -> None:
        """Close ``engine`` at exit if it is still open then."""
        self._open.add(engine)

    def release(self) -> None:
        """Close the engines still open, then release the primary context (at exit)."""
        for engine in list(self._open):
            try:
                engine.close()
            except RuntimeBackendError as exc:  # at exit: release the others and the context
                logger.warning("at exit: %s", exc)
        if self._context is not None:
            self._context.detach()
            self._context = None


_lock = threading.Lock()
_shared: CudaContext | None = None


def cuda_context(where: Path, purpose: str) -> CudaContext:
    """The process's CUDA context, created on first use; errors name what is missing."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = _create(where, purpose)
            atexit.register(_shared.release)
        return _shared


def _create(where: Path, purpose: str) -> CudaContext:
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise RuntimeBackendError(
            f"{where}: {purpose} needs pycuda, the NVIDIA driver (libcuda) and a CUDA GPU "
            f"({INSTALL_HINT}): {exc}"
        ) from exc
    try:
        cuda.init()
        from pycuda.tools import make_default_context

        context = make_default_context(lambda device: device.retain_primary_context())
    except (cuda.Error, RuntimeError) as exc:  # make_default_context raises plain RuntimeError
        raise RuntimeBackendError(
            f"{where}: {purpose} needs a CUDA GPU, but none is usable: {exc} (check the NVIDIA "
            "driver, CUDA_VISIBLE_DEVICES and CUDA_DEVICE)"
        ) from exc
    shared = CudaContext(cuda, context)
    logger.info("CUDA primary context on %s", shared.device)
    return shared


def device_info(device: Any) -> dict[str, Any]:
    """Name, compute capability, PCI bus id and UUID of a pycuda device."""
    bus_id = str(device.pci_bus_id())
    return {
        "name": str(device.name()),
        "compute_capability": list(device.compute_capability()),
        "pci_bus_id": bus_id,
        "uuid": device_uuid(bus_id),
        "total_memory_bytes": int(device.total_memory()),
    }


def device_uuid(pci_bus_id: str) -> str | None:
    """The ``GPU-...`` UUID (as nvidia-smi prints it) of a device, from libcuda; None if unknown.

    pycuda has no UUID query, so the driver's ``cuDeviceGetByPCIBusId`` and
    ``cuDeviceGetUuid_v2`` are called directly.
    """
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, raw = ctypes.c_int(), (ctypes.c_ubyte * 16)()
    if libcuda.cuDeviceGetByPCIBusId(ctypes.byref(device), pci_bus_id.encode()) != 0:
        return None
    if libcuda.cuDeviceGetUuid_v2(raw, device) != 0:
        return None
    text = bytes(raw).hex()
    return f"GPU-{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
