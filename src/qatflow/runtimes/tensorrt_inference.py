"""TensorRT inference with pycuda: pinned host buffers, device buffers, one CUDA stream.

Buffers are sized once for the largest profile batch and reused; larger batches are split
into chunks, and a last chunk smaller than the profile minimum is zero-padded. The sizing and
chunking rules are pure functions below.

A :class:`TensorRTEngine` runs any deserialized engine: :func:`load_tensorrt_engine` makes one
from a plan file, and the builder makes one from the plan it holds in memory (before anything
is written) to check it against its reference. Every call makes the process's CUDA context
(:mod:`qatflow.runtimes.cuda_context`) current on the calling thread, so any thread may use an
engine (one call at a time). :meth:`TensorRTEngine.close` (or ``with``) frees the execution
context, the engine and the buffers in that order; engines still open at exit are closed
before the context is released.

FP16 I/O tensors are fed and returned as float32 (converted on the host); BF16 ones too,
through their 16-bit patterns (numpy has no bfloat16, and ``tensorrt.nptype`` rejects it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from qatflow.errors import RuntimeBackendError
from qatflow.runtimes.base import Engine, EngineMetadata, check_batch, check_same_version
from qatflow.runtimes.cuda_context import CudaContext, cuda_context
from qatflow.runtimes.tensorrt_module import import_tensorrt

if TYPE_CHECKING:
    import tensorrt as trt_t

logger = logging.getLogger("qatflow.runtimes.tensorrt")


@dataclasses.dataclass(frozen=True)
class TensorBuffer:
    """One engine I/O tensor and the buffer shape that holds its largest batch.

    ``dtype`` is the host storage type: uint16 bit patterns for BF16 (``bfloat16``).
    """

    name: str
    is_input: bool
    dtype: np.dtype[Any]
    max_shape: tuple[int, ...]
    bfloat16: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes needed for ``max_shape``."""
        return buffer_nbytes(self.max_shape, self.dtype)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Host values in this tensor's storage type."""
        return to_bfloat16_bits(values) if self.bfloat16 else values.astype(self.dtype, copy=False)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored values as numpy numbers: 16-bit floats widen to float32."""
        if self.bfloat16:
            return from_bfloat16_bits(stored)
        return stored.astype(np.float32) if stored.dtype == np.float16 else stored


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Rows ``rows`` of a batch, run as a TensorRT batch of ``size`` (>= rows, padded)."""

    rows: slice
    size: int


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values as BF16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    nan = np.isnan(values)
    return np.where(nan, np.uint16(0x7FC0), (rounded >> np.uint32(16)).astype(np.uint16))


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) as float32 values (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def max_tensor_shape(name: str, shape: Sequence[int], max_batch: int) -> tuple[int, ...]:
    """Shape of a tensor at the largest batch: a dynamic (-1) batch becomes ``max_batch``."""
    dims = tuple(int(d) for d in shape)
    if not dims:
        raise RuntimeBackendError(f"TensorRT tensor {name!r} is a scalar, expected a batch")
    dynamic = [axis for axis, d in enumerate(dims) if d < 0 and axis > 0]
    if dynamic:
        raise RuntimeBackendError(
            f"TensorRT tensor {name!r} has dynamic non-batch dimension(s) {dynamic} "
            f"(shape {list(dims)}); only the batch dimension may be dynamic"
        )
    return (max_batch if dims[0] < 0 else dims[0], *dims[1:])


def buffer_nbytes(shape: Sequence[int], dtype: np.dtype[Any] | type[np.generic]) -> int:
    """Bytes of a dense buffer of ``shape`` and ``dtype``."""
    if any(d < 0 for d in shape):
        raise RuntimeBackendError(f"cannot size a buffer for dynamic shape {list(shape)}")
    return math.prod(shape) * np.dtype(dtype).itemsize


def plan_chunks(total: int, min_batch: int, max_batch: int) -> list[Chunk]:
    """Split ``total`` rows into profile-sized chunks (padding a last chunk below the min)."""
    if total < 1:
        raise RuntimeBackendError(f"cannot run an empty batch (got {total} rows)")
    if not 1 <= min_batch <= max_batch:
        raise RuntimeBackendError(f"invalid profile batch range {min_batch}..{max_batch}")
    chunks = []
    for start in range(0, total, max_batch):
        stop = min(start + max_batch, total)
        chunks.append(Chunk(slice(start, stop), max(stop - start, min_batch)))
    return chunks


def dims_tuple(dims: trt_t.Dims) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple (``Dims`` is indexable but not typed as iterable)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def check_gpu(path: Path, built_on: dict[str, Any], current: dict[str, Any]) -> None:
    """Engines are GPU-architecture specific: compute capabilities must match when known."""
    built, here = built_on.get("compute_capability"), current.get("compute_capability")
    if built and here and list(built) != list(here):
        raise RuntimeBackendError(
            f"{path} was built on {built_on.get('name', 'a GPU')} (compute capability "
            f"{'.'.join(map(str, built))}) and cannot run on {current.get('name', 'this GPU')} "
            f"(compute capability {'.'.join(map(str, here))}): rebuild it on this GPU"
        )


class TensorRTEngine(Engine):
    """A deserialized TensorRT engine run through one execution context and stream.

    The engine takes ownership of ``engine``: :meth:`close` frees it.
    """

    def __init__(
        self,
        path: Path,
        metadata: EngineMetadata,
        *,
        trt: ModuleType,
        cuda: CudaContext,
        engine: trt_t.ICudaEngine,
    ) -> None:
        super().__init__(path, metadata)
        self._trt_version = str(trt.__version__)
        self._cuda = cuda
        self._engine: trt_t.ICudaEngine | None = engine
        self._context: trt_t.IExecutionContext | None = None
        self._stream: Any = None
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, Any] = {}
        try:
            with cuda.active(f"{path}: allocating TensorRT buffers"):
                self._allocate(trt, engine)
        except BaseException:
            self.close()
            raise
        cuda.track(self)

    def _allocate(self, trt: ModuleType, engine: trt_t.ICudaEngine) -> None:
        """Check the I/O tensors, then make the execution context, stream and buffers."""
        path, metadata, driver = self.path, self.metadata, self._cuda.cuda
        low, _, high = engine.get_tensor_profile_shape(metadata.input_name, 0)
        self._min_batch, self._max_batch = int(low[0]), int(high[0])
        buffers = {b.name: b for b in _io_buffers(trt, engine, self._max_batch, path)}
        for name in (metadata.input_name, metadata.output_name):
            if name not in buffers:
                raise RuntimeBackendError(f"{path}: the engine has no I/O tensor {name!r}")
        self._input = buffers[metadata.input_name]
        self._output = buffers[metadata.output_name]
        self._context = engine.create_execution_context()
        self._stream = driver.Stream()
        for buffer in buffers.values():
            count = math.prod(buffer.max_shape)
            self._host[buffer.name] = driver.pagelocked_empty(count, buffer.dtype)
            self._device[buffer.name] = driver.mem_alloc(buffer.nbytes)
            self._context.set_tensor_address(buffer.name, int(self._device[buffer.name]))

    def __enter__(self) -> TensorRTEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Free the execution context, then the engine, then the buffers (idempotent)."""
        if self._engine is None:
            return
        with self._cuda.active(f"{self.path}: closing the TensorRT engine"):
            self._context = None  # IExecutionContext before the ICudaEngine it came from
            self._engine = None
            for allocation in self._device.values():
                allocation.free()
            self._device.clear()
            self._host.clear()
            self._stream = None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._engine is None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run any batch size (split to the profile range) and return the logits."""
        if self._context is None:
            raise RuntimeBackendError(f"{self.path}: the TensorRT engine is closed")
        array = np.ascontiguousarray(batch, dtype=np.float32 if self._input.bfloat16 else None)
        check_batch(array, self.input_name, self.input_shape)
        with self._cuda.active(f"{self.path}: running the TensorRT engine"):
            results = [
                self._run_chunk(self._context, array[chunk.rows], chunk.size)
                for chunk in plan_chunks(len(array), self._min_batch, self._max_batch)
            ]
        return np.concatenate(results) if len(results) > 1 else results[0]

    def _run_chunk(
        self, context: trt_t.IExecutionContext, rows: np.ndarray, size: int
    ) -> np.ndarray:
        driver, stream = self._cuda.cuda, self._stream
        shape = (size, *rows.shape[1:])
        host_in = self._host[self._input.name]
        count_in = math.prod(shape)
        host_in[: rows.size] = self._input.encode(rows.reshape(-1))
        host_in[rows.size : count_in] = 0
        if not context.set_input_shape(self._input.name, shape):
            raise RuntimeBackendError(
                f"{self.path}: TensorRT rejected input shape {shape} for {self._input.name!r}"
            )
        driver.memcpy_htod_async(self._device[self._input.name], host_in[:count_in], stream)
        if not context.execute_async_v3(stream.handle):
            raise RuntimeBackendError(f"{self.path}: TensorRT execution failed")
        out_shape = dims_tuple(context.get_tensor_shape(self._output.name))
        count_out = math.prod(out_shape)
        host_out = self._host[self._output.name]
        driver.memcpy_dtoh_async(host_out[:count_out], self._device[self._output.name], stream)
        stream.synchronize()
        stored = host_out[:count_out].reshape(out_shape)[: len(rows)]
        return np.array(self._output.decode(stored))

    @property
    def runtime_version(self) -> str:
        """Installed TensorRT version."""
        return self._trt_version

    @property
    def device(self) -> str:
        """Name of the GPU the engine runs on."""
        return str(self._cuda.device["name"])

    @property
    def threads(self) -> None:
        """GPU engines have no CPU thread setting."""
        return None

    @property
    def max_batch(self) -> int:
        """Largest batch of the optimization profile (bigger batches are split)."""
        return self._max_batch


def _io_buffers(
    trt: ModuleType, engine: trt_t.ICudaEngine, max_batch: int, path: Path
) -> list[TensorBuffer]:
    buffers = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        dtype, bfloat16 = host_dtype(trt, engine.get_tensor_dtype(name), name, path)
        buffers.append(
            TensorBuffer(
                name=name,
                is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                dtype=dtype,
                max_shape=max_tensor_shape(
                    name, dims_tuple(engine.get_tensor_shape(name)), max_batch
                ),
                bfloat16=bfloat16,
            )
        )
    return buffers


def host_dtype(
    trt: ModuleType, trt_dtype: trt_t.DataType, name: str, path: Path
) -> tuple[np.dtype[Any], bool]:
    """Host storage type of a TensorRT tensor type, and whether it holds BF16 bit patterns."""
    if trt_dtype == trt.DataType.BF16:
        return np.dtype(np.uint16), True
    try:
        return np.dtype(trt.nptype(trt_dtype)), False
    except TypeError as exc:
        raise RuntimeBackendError(
            f"{path}: I/O tensor {name!r} has TensorRT type {trt_dtype}, which has no numpy "
            "equivalent; export the model with float32, float16 or bfloat16 inputs and outputs"
        ) from exc


def deserialize_plan(
    trt: ModuleType, trt_logger: trt_t.ILogger, plan: bytes, where: Path
) -> trt_t.ICudaEngine:
    """Deserialize a plan held in memory (the engine keeps its runtime alive).

    Call with the CUDA context active: the engine's weights go to the GPU.
    """
    runtime: trt_t.Runtime = trt.Runtime(trt_logger)
    engine: trt_t.ICudaEngine | None = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeBackendError(
            f"{where}: TensorRT {trt.__version__} could not deserialize this engine"
        )
    return engine


def load_tensorrt_engine(path: Path, metadata: EngineMetadata) -> TensorRTEngine:
    """Check runtime, version and GPU against the sidecar, then deserialize the engine."""
    try:
        trt = import_tensorrt()
    except RuntimeBackendError as exc:
        raise RuntimeBackendError(
            f"{path} is a TensorRT {metadata.runtime_version} engine, but {exc}"
        ) from exc
    check_same_version(path, "TensorRT", metadata.runtime_version, str(trt.__version__), 3)
    cuda = cuda_context(path, "running TensorRT engines")
    check_gpu(path, metadata.device, cuda.device)
    with cuda.active(f"{path}: loading the TensorRT engine"):
        engine = deserialize_plan(trt, trt.Logger(trt.Logger.WARNING), path.read_bytes(), path)
        loaded = TensorRTEngine(path, metadata, trt=trt, cuda=cuda, engine=engine)
    logger.info("loaded TensorRT engine %s on %s", path, loaded.device)
    return loaded
