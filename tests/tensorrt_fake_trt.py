"""A fake ``tensorrt`` module that records builder calls and runs plans with ONNX Runtime.

A plan holds the profile and the parsed ONNX; executing it runs that ONNX as float math, then
``distort`` (if given) on the logits: a wrong engine. Every value and string form the code under
test sees is the real one (sources below); the CUDA context rules come from
:mod:`tests.tensorrt_fake_cuda`.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from tests.onnx_models import CLASSES
from tests.tensorrt_fake_cuda import ContextState, FakeDriver

from qatflow.onnx.reference import run_reference
from qatflow.runtimes.tensorrt_inference import from_bfloat16_bits, to_bfloat16_bits

# Enum values, one table for both majors. Sources:
# * 10.13: tensorrt-stubs 10.13.0.35.1, tensorrt_bindings/tensorrt.pyi (generated from the
#   10.13 bindings; e.g. ``<NetworkDefinitionCreationFlag.STRONGLY_TYPED: 1>``), which mirror
#   NvInfer.h (NetworkDefinitionCreationFlag, BuilderFlag, MemoryPoolType, ProfilingVerbosity,
#   LayerInformationFormat), NvInferRuntimeBase.h (DataType, TensorIOMode, ILogger::Severity)
#   and NvOnnxParser.h (ErrorCode).
# * 11.1: NvInfer.h ``enum class NetworkDefinitionCreationFlag`` has ``kSTRONGLY_TYPED = 0``
#   ("Deprecated in TensorRT 11.0 ... ignored"), ``kPREFER_JIT_PYTHON_PLUGINS = 1``,
#   ``kPREFER_AOT_PYTHON_PLUGINS = 2`` (kEXPLICIT_BATCH is gone); BuilderFlag has no kFP16 or
#   kINT8 (removed: "Removed and Deprecated C++ APIs in TensorRT 11.x"). The other enums are
#   unchanged from 10.13.
COMMON: dict[str, dict[str, int]] = {
    "DataType": {
        "FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5,
        "FP8": 6, "BF16": 7, "INT64": 8, "INT4": 9, "FP4": 10, "E8M0": 11,
    },
    "Severity": {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4},
    "TensorIOMode": {"NONE": 0, "INPUT": 1, "OUTPUT": 2},
    "MemoryPoolType": {"WORKSPACE": 0},
    "ProfilingVerbosity": {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2},
    "LayerInformationFormat": {"ONELINE": 0, "JSON": 1},
    "ErrorCode": {
        "SUCCESS": 0, "INTERNAL_ERROR": 1, "MEM_ALLOC_FAILED": 2, "MODEL_DESERIALIZE_FAILED": 3,
        "INVALID_VALUE": 4, "INVALID_GRAPH": 5, "INVALID_NODE": 6, "UNSUPPORTED_GRAPH": 7,
        "UNSUPPORTED_NODE": 8, "UNSUPPORTED_NODE_ATTR": 9, "UNSUPPORTED_NODE_INPUT": 10,
        "UNSUPPORTED_NODE_DATATYPE": 11, "UNSUPPORTED_NODE_DYNAMIC": 12,
        "UNSUPPORTED_NODE_SHAPE": 13, "REFIT_FAILED": 14,
    },
}  # fmt: skip
BY_MAJOR: dict[int, dict[str, dict[str, int]]] = {
    10: {
        "NetworkDefinitionCreationFlag": {
            "EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1,
            "PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3,
        },
        "BuilderFlag": {"FP16": 0, "INT8": 1, "TF32": 6, "BF16": 17},
    },
    11: {
        "NetworkDefinitionCreationFlag": {
            "STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2,
        },
        "BuilderFlag": {},
    },
}  # fmt: skip


def enums(major: int) -> dict[str, type[enum.IntEnum]]:
    """The enum classes of one TensorRT major version."""
    table = {**COMMON, **BY_MAJOR[major]}
    made = {name: enum.IntEnum(name, values) for name, values in table.items()}  # type: ignore[misc]
    # pyOnnx.cpp defines ErrorCode.__str__ as the bare name: str(code) == "UNSUPPORTED_NODE".
    made["ErrorCode"].__str__ = lambda self: self.name  # type: ignore[method-assign]
    return made


# Inspector tensor type strings: TensorRT 10 has one "Format/Datatype" string per tensor (the
# long form with an execution context, e.g. "Row major linear FP16 format"); TensorRT 11 splits
# it into "Format" and "DataType".
INSPECTOR_TYPES = {
    "FLOAT": ("Row major linear FP32", "FP32"),
    "INT8": ("Channel major INT8 format where channel % 32 == 0", "Int8"),
}


def inspector_tensor(major: int, name: str, dtype: str) -> dict[str, Any]:
    """One entry of a layer's Inputs/Outputs in the inspector JSON of ``major``."""
    long_form, short = INSPECTOR_TYPES[dtype]
    entry: dict[str, Any] = {"Name": name, "Location": "Device", "Dimensions": [-1, 8]}
    if major == 10:
        entry["Format/Datatype"] = long_form
    else:
        entry.update(Format=long_form.replace(f" {short.upper()}", ""), DataType=short)
    return entry


class FakeTensorRT:
    """A ``tensorrt`` module stand-in: records calls, keeps track of CUDA contexts."""

    def __init__(
        self,
        version: str,
        driver: FakeDriver,
        *,
        parse_errors: tuple[tuple[int, str, str, str], ...] = (),
        build_ok: bool = True,
        io_dtype: str = "FLOAT",
        distort: Callable[[np.ndarray], np.ndarray] | None = None,
        during_build: Callable[[], object] | None = None,
    ) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.parsed: list[bytes] = []
        self.cache_inputs: list[bytes] = []
        self.used_contexts: list[ContextState] = []
        self.exec_contexts: list[Any] = []
        self.driver = driver
        major = int(version.split(".")[0])
        e = enums(major)
        fake = self
        DataType, TensorIOMode = e["DataType"], e["TensorIOMode"]
        Severity = e["Severity"]

        def cuda_runtime() -> ContextState:
            context = driver.runtime_context()
            fake.used_contexts.append(context)
            return context

        class OnGpu:
            """A TensorRT object holding GPU memory of the context it was made in."""

            def __init__(self) -> None:
                self.cuda = cuda_runtime()

            def __del__(self) -> None:
                if not self.cuda.alive:
                    driver.errors.append(
                        f"[TRT] Error Code 1: Cuda Runtime (context is destroyed) "
                        f"freeing {type(self).__name__}"
                    )

        class ILogger:
            def log(self, severity: enum.IntEnum, msg: str) -> None:
                raise NotImplementedError

        ILogger.Severity = Severity  # type: ignore[attr-defined]

        class Logger(ILogger):
            WARNING = Severity.WARNING

            def __init__(self, severity: enum.IntEnum) -> None:
                pass

        class ParserError:
            def __init__(self, node: int, name: str, op: str, desc: str) -> None:
                self.values = (node, name, op, desc)

            def node(self) -> int:
                return self.values[0]

            def node_name(self) -> str:
                return self.values[1]

            def node_operator(self) -> str:
                return self.values[2]

            def desc(self) -> str:
                return self.values[3]

            def code(self) -> enum.IntEnum:
                return e["ErrorCode"].UNSUPPORTED_NODE

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags = flags
                self.model = b""

        class OnnxParser:
            def __init__(self, network: Network, logger: ILogger) -> None:
                self.errors = [ParserError(*err) for err in parse_errors]
                self.network = network

            def parse(self, model: bytes, path: str) -> bool:
                fake.calls.append(("parse", path))
                fake.parsed.append(model)
                self.network.model = model
                return not self.errors

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, index: int) -> ParserError:
                return self.errors[index]

        class TimingCache:
            """Entries plus the header TensorRT checks: its version and the device."""

            def __init__(self, key: str, entries: dict[str, str]) -> None:
                self.key, self.entries = key, dict(entries)

            def serialize(self) -> bytes:
                return json.dumps({"key": self.key, "entries": self.entries}).encode()

            def combine(self, other: TimingCache, ignore_mismatch: bool) -> bool:
                if other.key != self.key and not ignore_mismatch:
                    return False
                for name, value in other.entries.items():
                    self.entries.setdefault(name, value)  # conflicting entries are skipped
                return True

        def cache_key() -> str:
            device = driver.devices[driver.runtime_context().device]
            return f"{version}/sm{device.compute_capability}"

        class Profile:
            def set_shape(self, name: str, *shapes: tuple[int, ...]) -> None:
                fake.calls.append(("set_shape", name, *shapes))
                self.shapes = {name: [list(s) for s in shapes]}

        class Config:
            def __init__(self) -> None:
                self.cache: TimingCache | None = None
                self.profiles: list[Profile] = []

            def __setattr__(self, name: str, value: Any) -> None:
                if name not in ("cache", "profiles"):
                    fake.calls.append(("config", name, value))
                object.__setattr__(self, name, value)

            def set_flag(self, flag: enum.IntEnum) -> None:
                fake.calls.append(("set_flag", flag.name))

            def set_memory_pool_limit(self, pool: enum.IntEnum, size: int) -> None:
                fake.calls.append(("pool_limit", pool.name, size))

            def add_optimization_profile(self, profile: Profile) -> int:
                self.profiles.append(profile)
                return 0

            def create_timing_cache(self, data: bytes) -> TimingCache:
                fake.cache_inputs.append(bytes(data))
                if not data:
                    return TimingCache(cache_key(), {})
                stored = json.loads(bytes(data))
                return TimingCache(stored["key"], stored["entries"])

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                fake.calls.append(("set_timing_cache", ignore_mismatch))
                if cache.key != cache_key() and not ignore_mismatch:
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self) -> TimingCache:
                assert self.cache is not None
                return self.cache

        class Builder(OnGpu):
            def __init__(self, logger: ILogger) -> None:
                super().__init__()
                self.logger = logger

            def create_network(self, flags: int) -> Network:
                fake.calls.append(("create_network", flags))
                return Network(flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> Any:
                cuda_runtime()
                fake.calls.append(("build",))
                if during_build is not None:
                    during_build()
                self.logger.log(Severity.INFO, "building")
                if not build_ok:
                    self.logger.log(Severity.ERROR, "out of GPU memory")
                    return None
                self.logger.log(Severity.WARNING, "some layers stay in FP32")
                if config.cache is not None:  # the tactics timed for this network
                    digest = hashlib.sha256(network.model).hexdigest()[:12]
                    config.cache.entries.setdefault(f"conv:{digest}", "tactic-7")
                onnx_text = base64.b64encode(network.model).decode()
                return json.dumps(
                    {"profile": config.profiles[0].shapes, "onnx": onnx_text}
                ).encode()

        class Engine(OnGpu):
            def __init__(self, plan: dict[str, Any]) -> None:
                super().__init__()
                ((self.input, shapes),) = plan["profile"].items()
                self.profile = [tuple(s) for s in shapes]
                self.model = onnx.load_from_string(base64.b64decode(plan["onnx"]))
                self.tensors = {
                    self.input: (TensorIOMode.INPUT, (-1, *shapes[0][1:])),
                    "logits": (TensorIOMode.OUTPUT, (-1, CLASSES)),
                    "features": (TensorIOMode.OUTPUT, (-1, 2)),
                }

            num_io_tensors = 3

            def get_tensor_name(self, index: int) -> str:
                return list(self.tensors)[index]

            def get_tensor_mode(self, name: str) -> enum.IntEnum:
                return self.tensors[name][0]

            def get_tensor_dtype(self, name: str) -> enum.IntEnum:
                return DataType[io_dtype]

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return self.tensors[name][1]

            def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
                assert (name, index) == (self.input, 0)
                return self.profile

            def create_engine_inspector(self) -> Any:
                engine = self

                class Inspector:
                    def get_engine_information(self, fmt: enum.IntEnum) -> str:
                        assert fmt == e["LayerInformationFormat"].JSON
                        return json.dumps(engine.layer_information())

                return Inspector()

            def layer_information(self) -> dict[str, Any]:
                return {
                    "Layers": [
                        {
                            "Name": "conv + relu",
                            "LayerType": "CaskConvolution",
                            "Inputs": [inspector_tensor(major, "x_q", "INT8")],
                            "Outputs": [inspector_tensor(major, "y", "FLOAT")],
                            "TacticName": "sm80_xmma_fprop_implicit_gemm_i8i8_i8i32_f32",
                        },
                        {
                            "Name": "dense",
                            "LayerType": "CaskGemmMatrixMultiply",
                            "Inputs": [inspector_tensor(major, "y", "FLOAT")],
                            "Outputs": [inspector_tensor(major, "logits", "FLOAT")],
                        },
                    ],
                    "Bindings": list(self.tensors),
                }

            def create_execution_context(self) -> Context:
                return Context(self)

        class Context(OnGpu):
            def __init__(self, engine: Engine) -> None:
                super().__init__()
                self.engine = engine
                self.addresses: dict[str, int] = {}
                self.shape: tuple[int, ...] = (0,)
                self.input_shapes: list[tuple[int, ...]] = []
                fake.exec_contexts.append(self)

            def set_tensor_address(self, name: str, address: int) -> bool:
                self.addresses[name] = address
                return True

            def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
                low, _, high = self.engine.profile
                self.shape = tuple(shape)
                self.input_shapes.append(self.shape)
                return low[0] <= shape[0] <= high[0]

            def execute_async_v3(self, stream: int) -> bool:
                running = cuda_runtime()
                assert stream == 0xABC and set(self.addresses) == set(self.engine.tensors)
                # Device pointers are only valid in the context they were allocated in.
                if any(driver.memory[a][1] is not running for a in self.addresses.values()):
                    driver.errors.append("[TRT] an I/O address belongs to another CUDA context")
                    return False
                count = int(np.prod(self.shape))
                raw = driver.bytes_at(self.addresses[self.engine.input])
                batch = decode(raw, count).reshape(self.shape)
                logits = run_reference(self.engine.model, {self.engine.input: batch})[0]
                if distort is not None:
                    logits = distort(logits)
                stored = encode(np.ascontiguousarray(logits, np.float32)).reshape(-1)
                driver.bytes_at(self.addresses["logits"])[: stored.nbytes] = stored.view(np.uint8)
                return True

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return (self.shape[0], *self.engine.tensors[name][1][1:])

        def decode(raw: np.ndarray, count: int) -> np.ndarray:
            if io_dtype == "BF16":
                return from_bfloat16_bits(raw[: count * 2].view(np.uint16))
            dtype = np.float16 if io_dtype == "HALF" else np.float32
            return raw[: count * np.dtype(dtype).itemsize].view(dtype).astype(np.float32)

        def encode(values: np.ndarray) -> np.ndarray:
            if io_dtype == "BF16":
                return to_bfloat16_bits(values)
            return values.astype(np.float16 if io_dtype == "HALF" else np.float32)

        class Runtime:
            def __init__(self, logger: ILogger) -> None:
                pass

            def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
                try:
                    return Engine(json.loads(bytes(plan)))
                except ValueError:
                    return None

        def nptype(dtype: enum.IntEnum) -> type[np.generic]:
            # tensorrt/__init__.py: no numpy equivalent for BF16/FP8/INT4/FP4 -> TypeError.
            mapping = {
                "FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
                "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8,
            }  # fmt: skip
            if dtype.name in mapping:
                return mapping[dtype.name]
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

        self.module = type(onnx)("tensorrt")
        self.module.__dict__.update(
            __version__=version,
            ILogger=ILogger,
            Logger=Logger,
            Builder=Builder,
            OnnxParser=OnnxParser,
            Runtime=Runtime,
            Dims=tuple,
            nptype=nptype,
            **{name: cls for name, cls in e.items() if name != "Severity"},
        )
