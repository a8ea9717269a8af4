"""A fake ``pycuda`` over a fake CUDA driver, with the context semantics of the real ones.

What it encodes (pycuda 2026.1 source: ``src/wrapper/wrap_cudadrv.cpp``, ``pycuda/tools.py``,
``pycuda/autoinit.py``, ``pycuda/autoprimaryctx.py``; the CUDA driver API's context rules):

* Each thread has its own context stack: a context made current on one thread is not current
  on another. Allocations, streams and copies need a current context; pycuda raises
  ``LogicError("cuMemAlloc failed: invalid device context")`` and the like otherwise.
* ``Device.make_context()`` creates a new, non-primary context and pushes it;
  ``Device.retain_primary_context()`` returns the device's one primary context, not pushed.
  ``Context.detach()`` destroys a non-primary context and releases a primary one (destroyed at
  the last release).
* ``pycuda.tools.make_default_context`` picks ``CUDA_DEVICE`` or the first usable device and
  raises a plain ``RuntimeError`` when there is none (``~/.cuda_device`` is not modelled).
* ``import pycuda.autoinit`` makes a non-primary context current on the importing thread and
  registers an exit hook that pops it; ``pycuda.autoprimaryctx`` does the same with the primary
  context. Exit hooks run last-registered first (``atexit``); :meth:`FakeDriver.exit` runs them.
* ``cuInit`` without a GPU raises ``pycuda.driver.RuntimeError`` ("no CUDA-capable device is
  detected"); pycuda's errors derive from ``pycuda.driver.Error``, not from the builtins.
* Freeing memory of a destroyed context fails; pycuda and TensorRT print it ("context is
  destroyed") rather than raise, so the fake records it in :attr:`FakeDriver.errors`.

The CUDA runtime (which TensorRT uses) runs in the thread's current context, or else in the
primary context of device 0: :meth:`FakeDriver.runtime_context`.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import itertools
import os
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """What a fake device reports."""

    name: str
    compute_capability: tuple[int, int]
    pci_bus_id: str
    total_memory: int = 80 << 30


@dataclasses.dataclass(eq=False)
class ContextState:
    """One CUDA context of the fake driver."""

    device: int
    primary: bool
    alive: bool = True
    retains: int = 0


class FakeDriver:
    """Process-wide CUDA driver state: devices, contexts, per-thread stacks, memory."""

    def __init__(self, devices: Sequence[DeviceSpec]) -> None:
        self.devices = list(devices)
        self.contexts: list[ContextState] = []
        self.primary: dict[int, ContextState] = {}
        self.memory: dict[int, tuple[np.ndarray, ContextState]] = {}
        self.errors: list[str] = []
        self.exit_hooks: list[Callable[[], object]] = []
        self._threads = threading.local()
        self._addresses = itertools.count(1)

    # ---------------------------------------------------------------- contexts
    def stack(self) -> list[ContextState]:
        if not hasattr(self._threads, "stack"):
            self._threads.stack = []
        stack: list[ContextState] = self._threads.stack
        return stack

    def current(self) -> ContextState | None:
        stack = self.stack()
        return stack[-1] if stack else None

    def runtime_context(self) -> ContextState:
        """The context the CUDA runtime (TensorRT) uses on this thread."""
        return self.current() or self.primary_of(0)

    def primary_of(self, device: int) -> ContextState:
        if device not in self.primary or not self.primary[device].alive:
            self.primary[device] = ContextState(device, primary=True)
            self.contexts.append(self.primary[device])
        return self.primary[device]

    def exit(self) -> None:
        """Interpreter exit: run the exit hooks, last registered first."""
        while self.exit_hooks:
            self.exit_hooks.pop()()

    # ---------------------------------------------------------------- memory
    def allocate(self, nbytes: int, what: str) -> tuple[int, ContextState]:
        context = self.require_context(what)
        address = 0x1000 * next(self._addresses)
        self.memory[address] = (np.zeros(nbytes, np.uint8), context)
        return address, context

    def free(self, address: int, what: str) -> None:
        _, context = self.memory.pop(address)
        if not context.alive:
            self.errors.append(f"{what} failed: context is destroyed")

    def require_context(self, what: str) -> ContextState:
        context = self.current()
        if context is None or not context.alive:
            raise self.module["pycuda.driver"].LogicError(f"{what} failed: invalid device context")
        return context

    def bytes_at(self, address: int) -> np.ndarray:
        return self.memory[address][0]

    # ---------------------------------------------------------------- the pycuda modules
    def modules(self) -> dict[str, types.ModuleType]:
        """``pycuda``, ``pycuda.driver`` and ``pycuda.tools`` (autoinit modules: :meth:`finder`)."""
        self.module = {
            "pycuda": types.ModuleType("pycuda"),
            "pycuda.driver": self._driver_module(),
            "pycuda.tools": self._tools_module(),
        }
        self.module["pycuda"].__dict__.update(
            __path__=[], driver=self.module["pycuda.driver"], tools=self.module["pycuda.tools"]
        )
        return self.module

    def finder(self) -> importlib.abc.MetaPathFinder:
        """Imports ``pycuda.autoinit``/``autoprimaryctx`` with their import-time side effects."""
        return _AutoInitFinder(self)

    def _driver_module(self) -> types.ModuleType:
        fake = self

        class Error(Exception):
            pass

        class LogicError(Error):
            pass

        class RuntimeError(Error):
            pass

        class MemoryError(Error):
            pass

        class Context:
            def __init__(self, state: ContextState) -> None:
                self.state = state

            def push(self) -> None:
                if not self.state.alive:
                    raise LogicError("cuCtxPushCurrent failed: invalid device context")
                fake.stack().append(self.state)

            @staticmethod
            def pop() -> None:
                if not fake.stack():
                    raise LogicError("cannot pop non-current context")
                fake.stack().pop()

            def detach(self) -> None:
                state = self.state
                if state in fake.stack():
                    fake.stack().remove(state)
                if state.primary:
                    state.retains -= 1
                    state.alive = state.retains > 0
                else:
                    state.alive = False

            @staticmethod
            def get_current() -> Context | None:
                current = fake.current()
                return None if current is None else Context(current)

            @staticmethod
            def get_device() -> Device:
                return Device(fake.require_context("cuCtxGetDevice").device)

        class Device:
            def __init__(self, index: int) -> None:
                if not 0 <= index < len(fake.devices):
                    raise LogicError("cuDeviceGet failed: invalid device ordinal")
                self.index = index
                self.spec = fake.devices[index]

            @staticmethod
            def count() -> int:
                return len(fake.devices)

            def name(self) -> str:
                return self.spec.name

            def compute_capability(self) -> tuple[int, int]:
                return self.spec.compute_capability

            def pci_bus_id(self) -> str:
                return self.spec.pci_bus_id

            def total_memory(self) -> int:
                return self.spec.total_memory

            def make_context(self) -> Context:
                state = ContextState(self.index, primary=False)
                fake.contexts.append(state)
                fake.stack().append(state)
                return Context(state)

            def retain_primary_context(self) -> Context:
                state = fake.primary_of(self.index)
                state.retains += 1
                return Context(state)

        class DeviceAllocation:
            def __init__(self, nbytes: int) -> None:
                self.address, _ = fake.allocate(nbytes, "cuMemAlloc")

            def __int__(self) -> int:
                return self.address

            def free(self) -> None:
                if self.address in fake.memory:
                    fake.free(self.address, "cuMemFree")

            def __del__(self) -> None:
                self.free()

        class Stream:
            def __init__(self) -> None:
                self.context = fake.require_context("cuStreamCreate")
                self.handle = 0xABC
                self.synchronized = 0

            def synchronize(self) -> None:
                fake.require_context("cuStreamSynchronize")
                self.synchronized += 1

        def init() -> None:
            if not fake.devices:
                raise RuntimeError("cuInit failed: no CUDA-capable device is detected")

        def pagelocked_empty(count: int, dtype: Any) -> np.ndarray:
            fake.require_context("cuMemHostAlloc")
            return np.zeros(count, dtype)

        def htod(dest: DeviceAllocation, src: np.ndarray, stream: Stream) -> None:
            fake.require_context("cuMemcpyHtoDAsync")
            fake.bytes_at(int(dest))[: src.nbytes] = src.view(np.uint8)

        def dtoh(dest: np.ndarray, src: DeviceAllocation, stream: Stream) -> None:
            fake.require_context("cuMemcpyDtoHAsync")
            dest.view(np.uint8)[:] = fake.bytes_at(int(src))[: dest.nbytes]

        driver = types.ModuleType("pycuda.driver")
        driver.__dict__.update(
            Error=Error,
            LogicError=LogicError,
            RuntimeError=RuntimeError,
            MemoryError=MemoryError,
            Context=Context,
            Device=Device,
            Stream=Stream,
            init=init,
            pagelocked_empty=pagelocked_empty,
            mem_alloc=DeviceAllocation,
            memcpy_htod_async=htod,
            memcpy_dtoh_async=dtoh,
        )
        return driver

    def _tools_module(self) -> types.ModuleType:
        fake = self

        def make_default_context(maker: Callable[[Any], Any] | None = None) -> Any:
            driver = fake.module["pycuda.driver"]
            make = maker or (lambda device: device.make_context())
            if driver.Device.count() == 0:
                raise RuntimeError("No CUDA enabled device found. Please check your installation.")
            chosen = os.environ.get("CUDA_DEVICE")
            if chosen is not None:
                return make(driver.Device(int(chosen)))
            for index in range(driver.Device.count()):
                try:
                    return make(driver.Device(index))
                except driver.Error:
                    continue
            raise RuntimeError("make_default_context() wasn't able to create a context")

        tools = types.ModuleType("pycuda.tools")
        tools.__dict__.update(make_default_context=make_default_context)
        return tools


class _AutoInitFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import pycuda.autoinit`` / ``pycuda.autoprimaryctx`` run their side effects once."""

    def __init__(self, driver: FakeDriver) -> None:
        self.driver = driver

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name in ("pycuda.autoinit", "pycuda.autoprimaryctx"):
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        cuda = self.driver.module["pycuda.driver"]
        cuda.init()
        tools = self.driver.module["pycuda.tools"]
        if module.__name__.endswith("autoprimaryctx"):

            def retain_and_push(device: Any) -> Any:
                context = device.retain_primary_context()
                context.push()
                return context

            context = tools.make_default_context(retain_and_push)
        else:
            context = tools.make_default_context()

        def finish_up() -> None:
            cuda.Context.pop()
            context.detach()  # the Context object is dropped: pycuda detaches it

        module.__dict__.update(context=context, device=cuda.Context.get_device())
        self.driver.exit_hooks.append(finish_up)


def install_fake_pycuda(monkeypatch: Any, driver: FakeDriver | None) -> None:
    """Install ``driver``'s pycuda into ``sys.modules``; None: ``import pycuda`` fails."""
    for name in ("pycuda.autoinit", "pycuda.autoprimaryctx"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    if driver is None:
        monkeypatch.setitem(sys.modules, "pycuda.driver", None)
        return
    for name, module in driver.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sys, "meta_path", [driver.finder(), *sys.meta_path])
