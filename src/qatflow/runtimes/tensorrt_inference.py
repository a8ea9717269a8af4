"""TensorRT inference with pycuda: pinned host buffers, device buffers, one CUDA stream.

Buffers are sized once for the largest profile batch and reused; larger batches are split
into chunks, and a last chunk smaller than the profile minimum is zero-padded. The sizing and
chunking rules are pure functions below.

A :class:`TensorRTEngine` runs any deserialized engine: :func:`load_tensorrt_engine` makes one
from a plan file, and the builder makes one from the plan it holds in memory (before anything
is written) to check it against its reference.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from qatflow.errors import RuntimeBackendError
from qatflow.runtimes.base import Engine, EngineMetadata, check_batch, check_same_version
from qatflow.runtimes.tensorrt_backend import gpu_info, import_tensorrt

if TYPE_CHECKING:
    import tensorrt as trt_t

logger = logging.getLogger("qatflow.runtimes.tensorrt")


@dataclasses.dataclass(frozen=True)
class TensorBuffer:
    """One engine I/O tensor and the buffer shape that holds its largest batch."""

    name: str
    is_input: bool
    dtype: np.dtype[Any]
    max_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes needed for ``max_shape``."""
        return buffer_nbytes(self.max_shape, self.dtype)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Rows ``rows`` of a batch, run as a TensorRT batch of ``size`` (>= rows, padded)."""

    rows: slice
    size: int


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
    """A deserialized TensorRT engine run through one execution context and stream."""

    def __init__(
        self,
        path: Path,
        metadata: EngineMetadata,
        *,
        trt: ModuleType,
        cuda: ModuleType,
        engine: trt_t.ICudaEngine,
        device_name: str,
    ) -> None:
        super().__init__(path, metadata)
        self._trt_version = str(trt.__version__)
        self._cuda = cuda
        self._device_name = device_name
        self._engine = engine
        low, _, high = engine.get_tensor_profile_shape(metadata.input_name, 0)
        self._min_batch, self._max_batch = int(low[0]), int(high[0])
        self._buffers = _io_buffers(trt, engine, self._max_batch)
        self._context: trt_t.IExecutionContext = engine.create_execution_context()
        self._stream = cuda.Stream()
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, Any] = {}
        for buffer in self._buffers:
            count = math.prod(buffer.max_shape)
            self._host[buffer.name] = cuda.pagelocked_empty(count, buffer.dtype)
            self._device[buffer.name] = cuda.mem_alloc(buffer.nbytes)
            self._context.set_tensor_address(buffer.name, int(self._device[buffer.name]))
        names = {b.name: b for b in self._buffers}
        for name in (metadata.input_name, metadata.output_name):
            if name not in names:
                raise RuntimeBackendError(f"{path}: the engine has no I/O tensor {name!r}")
        self._input = names[metadata.input_name]
        self._output = names[metadata.output_name]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run any batch size (split to the profile range) and return the logits."""
        array = np.ascontiguousarray(batch, dtype=self._input.dtype)
        check_batch(array, self.input_name, self.input_shape)
        results = [
            self._run_chunk(array[chunk.rows], chunk.size)
            for chunk in plan_chunks(len(array), self._min_batch, self._max_batch)
        ]
        return np.concatenate(results) if len(results) > 1 else results[0]

    def _run_chunk(self, rows: np.ndarray, size: int) -> np.ndarray:
        cuda, context = self._cuda, self._context
        shape = (size, *rows.shape[1:])
        host_in = self._host[self._input.name]
        count_in = math.prod(shape)
        host_in[: rows.size] = rows.reshape(-1)
        host_in[rows.size : count_in] = 0
        if not context.set_input_shape(self._input.name, shape):
            raise RuntimeBackendError(
                f"{self.path}: TensorRT rejected input shape {shape} for {self._input.name!r}"
            )
        cuda.memcpy_htod_async(self._device[self._input.name], host_in[:count_in], self._stream)
        if not context.execute_async_v3(self._stream.handle):
            raise RuntimeBackendError(f"{self.path}: TensorRT execution failed")
        out_shape = dims_tuple(context.get_tensor_shape(self._output.name))
        count_out = math.prod(out_shape)
        host_out = self._host[self._output.name]
        cuda.memcpy_dtoh_async(host_out[:count_out], self._device[self._output.name], self._stream)
        self._stream.synchronize()
        return host_out[:count_out].reshape(out_shape)[: len(rows)].copy()

    @property
    def runtime_version(self) -> str:
        """Installed TensorRT version."""
        return self._trt_version

    @property
    def device(self) -> str:
        """GPU name."""
        return self._device_name

    @property
    def threads(self) -> None:
        """GPU engines have no CPU thread setting."""
        return None

    @property
    def max_batch(self) -> int:
        """Largest batch of the optimization profile (bigger batches are split)."""
        return self._max_batch


def _io_buffers(trt: ModuleType, engine: trt_t.ICudaEngine, max_batch: int) -> list[TensorBuffer]:
    buffers = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        buffers.append(
            TensorBuffer(
                name=name,
                is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))),
                max_shape=max_tensor_shape(
                    name, dims_tuple(engine.get_tensor_shape(name)), max_batch
                ),
            )
        )
    return buffers


def import_pycuda(where: Path, purpose: str = "running TensorRT engines") -> ModuleType:
    """``pycuda.driver``, with a CUDA context on device 0 (``pycuda.autoinit``)."""
    try:
        import pycuda.autoinit  # noqa: F401  (creates the CUDA context on device 0)
        import pycuda.driver as cuda
    except ImportError as exc:
        raise RuntimeBackendError(
            f"{where}: {purpose} needs pycuda and a CUDA GPU "
            f"(pip install 'qatflow[tensorrt]'): {exc}"
        ) from exc
    return cuda


def deserialize_plan(
    trt: ModuleType, trt_logger: trt_t.ILogger, plan: bytes, where: Path
) -> trt_t.ICudaEngine:
    """Deserialize a plan held in memory (the engine keeps its runtime alive)."""
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
    cuda = import_pycuda(path)
    current = gpu_info()
    check_gpu(path, metadata.device, current)
    engine = deserialize_plan(trt, trt.Logger(trt.Logger.WARNING), path.read_bytes(), path)
    name = str(current.get("name", "cuda:0"))
    logger.info("loaded TensorRT engine %s on %s", path, name)
    return TensorRTEngine(path, metadata, trt=trt, cuda=cuda, engine=engine, device_name=name)
