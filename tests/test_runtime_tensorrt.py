"""TensorRT build and inference decisions, checked through build_engine/load_engine.

TensorRT and a GPU are not available here, so most tests install a fake ``tensorrt`` (and
``pycuda``) module that records the builder calls and emulates an engine: its plan holds the
parsed ONNX, which it runs with ONNX Runtime (optionally distorted). They verify our decisions
(flags per TensorRT version, profiles, timing cache, buffers, chunking, the fidelity gate,
errors), not TensorRT. Tests marked ``tensorrt`` run the real thing and skip without it.
"""

from __future__ import annotations

import base64
import enum
import json
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tests.test_runtimes_base import CLASSES, make_model, sample_batch, save_model

from qatflow.errors import RuntimeBackendError
from qatflow.onnx.reference import run_reference
from qatflow.runtimes import build_engine, load_engine, tensorrt_backend
from qatflow.runtimes.base import sidecar_path
from qatflow.runtimes.tensorrt_backend import (
    BuildPlan,
    build_log_path,
    convert_to_mixed_fp16,
    format_parser_error,
    import_tensorrt,
    network_flags,
    plan_build,
    resolve_timing_cache,
)
from qatflow.runtimes.tensorrt_inference import (
    Chunk,
    TensorRTEngine,
    buffer_nbytes,
    check_gpu,
    max_tensor_shape,
    plan_chunks,
)

# --------------------------------------------------------------------------- fakes


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class FakeGPU:
    """Device memory of the fake pycuda: allocations addressed by integer pointers."""

    def __init__(self) -> None:
        self.memory: dict[int, np.ndarray] = {}

    def module(self) -> dict[str, types.ModuleType]:
        gpu = self

        class Allocation:
            def __init__(self, nbytes: int) -> None:
                self.address = 0x1000 * (len(gpu.memory) + 1)
                gpu.memory[self.address] = np.zeros(nbytes, np.uint8)

            def __int__(self) -> int:
                return self.address

        class Stream:
            handle = 0xABC
            synchronized = 0

            def synchronize(self) -> None:
                Stream.synchronized += 1

        class Device:
            def __init__(self, index: int) -> None:
                assert index == 0

            def name(self) -> str:
                return "Fake GPU"

            def compute_capability(self) -> tuple[int, int]:
                return (8, 6)

        def htod(dest: Allocation, src: np.ndarray, stream: Stream) -> None:
            gpu.memory[int(dest)][: src.nbytes] = src.view(np.uint8)

        def dtoh(dest: np.ndarray, src: Allocation, stream: Stream) -> None:
            dest.view(np.uint8)[:] = gpu.memory[int(src)][: dest.nbytes]

        driver = types.ModuleType("pycuda.driver")
        driver.__dict__.update(
            init=lambda: None,
            Device=Device,
            Stream=Stream,
            pagelocked_empty=lambda count, dtype: np.zeros(count, dtype),
            mem_alloc=Allocation,
            memcpy_htod_async=htod,
            memcpy_dtoh_async=dtoh,
        )
        package = types.ModuleType("pycuda")
        autoinit = types.ModuleType("pycuda.autoinit")
        package.__dict__.update(driver=driver, autoinit=autoinit)
        return {"pycuda": package, "pycuda.driver": driver, "pycuda.autoinit": autoinit}


class FakeTensorRT:
    """A ``tensorrt`` module stand-in recording builder calls; plans are JSON it can run.

    A plan holds the profile and the parsed ONNX; executing it runs that ONNX as float math
    with ONNX Runtime, then ``distort`` (if given) on the logits: a wrong engine.
    """

    def __init__(
        self,
        version: str,
        gpu: FakeGPU,
        *,
        parse_errors: tuple[tuple[int, str, str, str], ...] = (),
        build_ok: bool = True,
        cache_compatible: bool = True,
        strongly_typed_flag: bool = True,
        distort: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.parsed: list[bytes] = []
        self.cache_inputs: list[bytes] = []
        fake = self
        major = int(version.split(".")[0])
        builder_flags = {"FP16": 0, "INT8": 1, "TF32": 6} if major == 10 else {"TF32": 6}
        creation_flags = {"STRONGLY_TYPED": 1} if strongly_typed_flag else {"PREFER_AOT": 3}

        class ILogger:
            Severity = Severity

            def log(self, severity: enum.IntEnum, msg: str) -> None:
                raise NotImplementedError

        class Logger(ILogger):
            WARNING = Severity.WARNING

            def __init__(self, severity: Severity) -> None:
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

            def code(self) -> str:
                return "ErrorCode.UNSUPPORTED_NODE"

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags = flags
                self.model = b""

        class OnnxParser:
            def __init__(self, network: Network, logger: ILogger) -> None:
                self.errors = [ParserError(*e) for e in parse_errors]
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
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return self.data + b"+entries"

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
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                fake.calls.append(("set_timing_cache", cache.data, ignore_mismatch))
                if cache.data and not cache_compatible:
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self) -> TimingCache:
                assert self.cache is not None
                return self.cache

        class Builder:
            def __init__(self, logger: ILogger) -> None:
                self.logger = logger

            def create_network(self, flags: int) -> Network:
                fake.calls.append(("create_network", flags))
                return Network(flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> Any:
                fake.calls.append(("build",))
                self.logger.log(Severity.INFO, "building")
                if not build_ok:
                    self.logger.log(Severity.ERROR, "out of GPU memory")
                    return None
                self.logger.log(Severity.WARNING, "some layers stay in FP32")
                onnx_text = base64.b64encode(network.model).decode()
                return json.dumps(
                    {"profile": config.profiles[0].shapes, "onnx": onnx_text}
                ).encode()

        class Engine:
            def __init__(self, plan: dict[str, Any]) -> None:
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

            def get_tensor_dtype(self, name: str) -> str:
                return "FLOAT"

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return self.tensors[name][1]

            def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
                assert (name, index) == (self.input, 0)
                return self.profile

            def create_engine_inspector(self) -> Any:
                return types.SimpleNamespace(
                    get_engine_information=lambda fmt: json.dumps(
                        {"Layers": [{"Name": "conv", "Precision": "INT8"}], "format": fmt.name}
                    )
                )

            def create_execution_context(self) -> Context:
                return Context(self)

        class Context:
            def __init__(self, engine: Engine) -> None:
                self.engine = engine
                self.addresses: dict[str, int] = {}
                self.shape: tuple[int, ...] = (0,)
                fake.contexts.append(self)
                self.input_shapes: list[tuple[int, ...]] = []

            def set_tensor_address(self, name: str, address: int) -> bool:
                self.addresses[name] = address
                return True

            def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
                low, _, high = self.engine.profile
                self.shape = tuple(shape)
                self.input_shapes.append(self.shape)
                return low[0] <= shape[0] <= high[0]

            def execute_async_v3(self, stream: int) -> bool:
                assert stream == 0xABC and set(self.addresses) == set(self.engine.tensors)
                count = int(np.prod(self.shape))
                raw = gpu.memory[self.addresses[self.engine.input]][: count * 4]
                batch = raw.view(np.float32).reshape(self.shape)
                logits = run_reference(self.engine.model, {self.engine.input: batch})[0]
                if distort is not None:
                    logits = distort(logits)
                logits = np.ascontiguousarray(logits, np.float32)
                gpu.memory[self.addresses["logits"]][: logits.nbytes] = logits.reshape(-1).view(
                    np.uint8
                )
                return True

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return (self.shape[0], *self.engine.tensors[name][1][1:])

        class Runtime:
            def __init__(self, logger: ILogger) -> None:
                pass

            def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
                try:
                    return Engine(json.loads(bytes(plan)))
                except ValueError:
                    return None

        TensorIOMode = enum.IntEnum("TensorIOMode", {"INPUT": 1, "OUTPUT": 2})
        self.contexts: list[Context] = []
        self.module = types.ModuleType("tensorrt")
        self.module.__dict__.update(
            __version__=version,
            ILogger=ILogger,
            Logger=Logger,
            Builder=Builder,
            OnnxParser=OnnxParser,
            Runtime=Runtime,
            Dims=tuple,
            BuilderFlag=enum.IntEnum("BuilderFlag", builder_flags),
            NetworkDefinitionCreationFlag=enum.IntEnum("Creation", creation_flags),
            MemoryPoolType=enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0}),
            ProfilingVerbosity=enum.IntEnum("ProfilingVerbosity", {"DETAILED": 2}),
            LayerInformationFormat=enum.IntEnum("LayerInformationFormat", {"JSON": 1}),
            TensorIOMode=TensorIOMode,
            nptype=lambda dtype: np.float32,
        )


def reference(source: Path, batch: np.ndarray) -> np.ndarray:
    """The source ONNX run as float math: what a faithful engine returns."""
    return run_reference(onnx.load(source), {"input": batch})[0]


@pytest.fixture
def gpu() -> FakeGPU:
    return FakeGPU()


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch, gpu: FakeGPU) -> Iterator[Callable[..., FakeTensorRT]]:
    """Install a fake tensorrt of a given version and a fake pycuda (none: pycuda=False)."""

    def _install(version: str = "10.13.0.35", *, pycuda: bool = True, **kw: Any) -> FakeTensorRT:
        fake = FakeTensorRT(version, gpu, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
        for name, module in (gpu.module() if pycuda else {"pycuda.driver": None}).items():
            monkeypatch.setitem(sys.modules, name, module)
        return fake

    yield _install


@pytest.fixture
def qdq_onnx(tmp_path: Path) -> Path:
    return save_model(make_model(qdq=True), tmp_path / "qdq.onnx")


def called(fake: FakeTensorRT, name: str) -> list[tuple[Any, ...]]:
    return [call[1:] for call in fake.calls if call[0] == name]


# --------------------------------------------------------------------------- pure decisions


@pytest.mark.parametrize(
    ("version", "qdq", "fp16", "typed", "flags", "convert", "precision"),
    [
        ("10.13.0.35", True, False, False, ("INT8",), False, "int8"),
        ("10.0.1", True, True, False, ("INT8", "FP16"), False, "int8+fp16"),
        ("10.13.0", False, True, False, ("FP16",), False, "fp16"),
        ("10.13.0", False, False, False, (), False, "fp32"),
        ("11.0.0", True, False, True, (), False, "int8"),
        ("11.4.1.2", True, True, True, (), True, "int8+fp16"),
        ("11.0.0", False, True, True, (), True, "fp16"),
    ],
)
def test_plan_build(
    version: str,
    qdq: bool,
    fp16: bool,
    typed: bool,
    flags: tuple[str, ...],
    convert: bool,
    precision: str,
) -> None:
    plan = plan_build(version, qdq, fp16)
    assert (plan.strongly_typed, plan.builder_flags, plan.fp16_onnx_conversion) == (
        typed,
        flags,
        convert,
    )
    assert plan.precision == precision
    assert plan.major == int(version.split(".")[0]) and plan.notes


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "12.0.0"])
def test_unsupported_tensorrt_versions(version: str) -> None:
    with pytest.raises(RuntimeBackendError, match=rf"TensorRT {version} is not supported"):
        plan_build(version, True, False)


def test_network_flags(install: Callable[..., FakeTensorRT]) -> None:
    trt = install("11.0.0").module
    assert network_flags(trt, plan_build("11.0.0", True, False)) == 1 << 1
    assert network_flags(trt, plan_build("10.13.0", True, False)) == 0
    no_flag = install("11.5.0", strongly_typed_flag=False).module
    assert network_flags(no_flag, plan_build("11.5.0", True, False)) == 0


def test_resolve_timing_cache(tmp_path: Path) -> None:
    engine = tmp_path / "m.plan"
    assert resolve_timing_cache("auto", engine) == tmp_path / "tensorrt.timing-cache"
    assert resolve_timing_cache(None, engine) is None
    assert resolve_timing_cache(tmp_path / "c.bin", engine) == tmp_path / "c.bin"


def test_format_parser_error() -> None:
    error = types.SimpleNamespace(
        node=lambda: 3,
        node_name=lambda: "conv1",
        node_operator=lambda: "Conv",
        desc=lambda: "bad axis",
        code=lambda: "ErrorCode.INVALID_NODE",
    )
    assert format_parser_error(error) == "node 3 'conv1' (Conv): bad axis [ErrorCode.INVALID_NODE]"
    old = types.SimpleNamespace(node=lambda: -1, desc=lambda: "oops", code=lambda: 1)
    assert format_parser_error(old) == "node -1: oops [1]"


def test_buffer_and_shape_rules() -> None:
    assert max_tensor_shape("input", (-1, 8, 8, 3), 64) == (64, 8, 8, 3)
    assert max_tensor_shape("logits", (4, 5), 64) == (4, 5)
    with pytest.raises(
        RuntimeBackendError, match=r"'feat' has dynamic non-batch dimension\(s\) \[2\]"
    ):
        max_tensor_shape("feat", (-1, 3, -1), 8)
    assert buffer_nbytes((64, 8, 8, 3), np.float32) == 64 * 8 * 8 * 3 * 4
    assert buffer_nbytes((16, 5), np.float16) == 160
    with pytest.raises(RuntimeBackendError, match="dynamic shape"):
        buffer_nbytes((-1, 5), np.float32)


def test_plan_chunks() -> None:
    assert plan_chunks(20, 1, 8) == [
        Chunk(slice(0, 8), 8),
        Chunk(slice(8, 16), 8),
        Chunk(slice(16, 20), 4),
    ]
    assert plan_chunks(3, 4, 8) == [Chunk(slice(0, 3), 4)]
    assert plan_chunks(8, 1, 8) == [Chunk(slice(0, 8), 8)]
    with pytest.raises(RuntimeBackendError, match="empty"):
        plan_chunks(0, 1, 8)


def test_check_gpu() -> None:
    ampere = {"name": "A100", "compute_capability": [8, 0]}
    check_gpu(Path("e"), ampere, {"name": "A100", "compute_capability": [8, 0]})
    check_gpu(Path("e"), {}, ampere)
    with pytest.raises(RuntimeBackendError, match=r"built on A100 \(compute capability 8\.0\).*T4"):
        check_gpu(Path("e"), ampere, {"name": "T4", "compute_capability": [7, 5]})


def test_mixed_fp16_conversion_keeps_qdq_and_io_in_fp32_and_runs_in_ort() -> None:
    model = make_model(qdq=True)
    converted = convert_to_mixed_fp16(model)
    onnx.checker.check_model(converted, full_check=True)
    types_of = {i.name: i.data_type for i in converted.graph.initializer}
    assert types_of["conv_b"] == onnx.TensorProto.FLOAT16
    assert types_of["conv_ws"] == types_of["act_s"] == onnx.TensorProto.FLOAT
    io = [*converted.graph.input, *converted.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} == {onnx.TensorProto.FLOAT}
    assert sum(n.op_type == "Cast" for n in converted.graph.node) > 0
    batch = sample_batch(4)
    outputs = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"input": batch}
        )[0]
        for m in (model, converted)
    ]
    assert outputs[1].dtype == np.float32
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-2)


# --------------------------------------------------------------------------- TensorRT presence


def test_stub_only_tensorrt_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(RuntimeBackendError, match="type stubs only"):
        import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RuntimeBackendError, match="TensorRT is not installed"):
        import_tensorrt()


# --------------------------------------------------------------------------- builds (fake TRT)


def test_tensorrt_10_qdq_build(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    fake = install("10.13.0.35")
    engine = build_engine(
        qdq_onnx,
        tmp_path / "out" / "qdq.plan",
        runtime="tensorrt",
        batch_profile=(1, 8, 32),
        workspace_bytes=1 << 30,
        builder_optimization_level=4,
    )
    assert called(fake, "create_network") == [(0,)]
    assert called(fake, "parse") == [(str(qdq_onnx),)]
    assert onnx.load_from_string(fake.parsed[0]) == onnx.load(qdq_onnx)
    assert called(fake, "set_flag") == [("INT8",)]
    assert called(fake, "pool_limit") == [("WORKSPACE", 1 << 30)]
    assert ("builder_optimization_level", 4) in called(fake, "config")
    assert called(fake, "set_shape") == [
        ("input", (1, 8, 8, 3), (8, 8, 8, 3), (32, 8, 8, 3)),
    ]
    order = [
        c[0] for c in fake.calls if c[0] in ("parse", "set_shape", "set_timing_cache", "build")
    ]
    assert order == ["parse", "set_shape", "set_timing_cache", "build"]
    sidecar = json.loads(sidecar_path(engine).read_text())
    assert sidecar["runtime"] == "tensorrt" and sidecar["runtime_version"] == "10.13.0.35"
    assert sidecar["batch_profile"] == [1, 8, 32] and sidecar["input_shape"] == [None, 8, 8, 3]
    log = json.loads(build_log_path(engine).read_text())
    assert log["plan"]["builder_flags"] == ["INT8"] and not log["plan"]["strongly_typed"]
    assert log["profile"] == {
        "input": "input",
        "min": [1, 8, 8, 3],
        "opt": [8, 8, 8, 3],
        "max": [32, 8, 8, 3],
    }
    assert log["layers"]["Layers"][0]["Precision"] == "INT8"
    assert log["messages"] == ["WARNING: some layers stay in FP32"]
    assert set(log["timings_s"]) == {"reference", "parse", "build", "inspect", "fidelity", "total"}
    # No fidelity data: 64 synthetic samples in two batches, run as one 64-row input split to
    # the profile max of 32; the fake engine runs the parsed (= source) ONNX, so no error.
    (context,) = fake.contexts
    assert context.input_shapes == [(32, 8, 8, 3), (32, 8, 8, 3)]
    assert sidecar["fidelity"] == log["fidelity"]
    assert sidecar["fidelity"]["passed"] and sidecar["fidelity"]["samples"] == 64
    assert sidecar["fidelity"]["data"].startswith("synthetic")
    assert sidecar["fidelity"]["max_abs_error"] == 0.0
    assert sorted(p.name for p in engine.parent.iterdir()) == [
        "qdq.plan",
        "qdq.plan.build-log.json",
        "qdq.plan.json",
        "tensorrt.timing-cache",
    ]


def test_tensorrt_10_fp16_flag_without_qdq(
    install: Callable[..., FakeTensorRT], tmp_path: Path
) -> None:
    fake = install("10.13.0")
    source = save_model(make_model(), tmp_path / "fp32.onnx")
    build_engine(source, tmp_path / "e.plan", runtime="tensorrt", fp16=True, timing_cache=None)
    assert called(fake, "set_flag") == [("FP16",)]
    assert called(fake, "set_timing_cache") == []
    assert not (tmp_path / "tensorrt.timing-cache").exists()


def test_tensorrt_11_is_strongly_typed_and_converts_for_fp16(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    fake = install("11.0.0.1")  # its BuilderFlag has no INT8/FP16: touching them would fail
    engine = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt", fp16=True)
    assert called(fake, "create_network") == [(1 << 1,)]
    assert called(fake, "set_flag") == []
    parsed = onnx.load_from_string(fake.parsed[0])
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in parsed.graph.initializer)
    assert {n.op_type for n in parsed.graph.node} >= {"Cast", "QuantizeLinear", "DequantizeLinear"}
    log = json.loads(build_log_path(engine).read_text())
    assert log["plan"]["strongly_typed"] and log["plan"]["fp16_onnx_conversion"]
    assert "fp16_conversion" in log["timings_s"]


def test_timing_cache_is_reused_and_replaced_when_incompatible(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "shared.cache"
    fake = install()
    build_engine(qdq_onnx, tmp_path / "a.plan", runtime="tensorrt", timing_cache=cache)
    assert fake.cache_inputs == [b""] and cache.read_bytes() == b"+entries"
    fake = install()
    engine = build_engine(qdq_onnx, tmp_path / "b.plan", runtime="tensorrt", timing_cache=cache)
    assert fake.cache_inputs == [b"+entries"]
    assert json.loads(build_log_path(engine).read_text())["timing_cache"]["loaded"] is True
    assert cache.read_bytes() == b"+entries+entries"
    fake = install(cache_compatible=False)
    engine = build_engine(qdq_onnx, tmp_path / "c.plan", runtime="tensorrt", timing_cache=cache)
    assert fake.cache_inputs == [b"+entries+entries", b""]
    assert json.loads(build_log_path(engine).read_text())["timing_cache"]["loaded"] is False
    assert cache.read_bytes() == b"+entries"


def test_parser_errors_name_the_nodes_and_leave_nothing(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    install(
        parse_errors=(
            (4, "conv", "Conv", "Scale coefficients must all be positive"),
            (9, "dense", "MatMul", "unsupported axis"),
        )
    )
    with pytest.raises(RuntimeBackendError) as info:
        build_engine(qdq_onnx, tmp_path / "out" / "e.plan", runtime="tensorrt")
    message = str(info.value)
    assert "qdq.onnx: the TensorRT ONNX parser rejected the model" in message
    assert "node 4 'conv' (Conv): Scale coefficients must all be positive" in message
    assert "node 9 'dense' (MatMul): unsupported axis" in message
    assert not (tmp_path / "out").exists()


def test_failed_build_reports_tensorrt_errors(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    install(build_ok=False)
    with pytest.raises(RuntimeBackendError, match=r"could not build an engine: ERROR: out of GPU"):
        build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qdq.onnx"]


def test_build_option_and_profile_errors(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    install()
    with pytest.raises(RuntimeBackendError, match="builder_optimization_level must be"):
        build_engine(
            qdq_onnx, tmp_path / "e.plan", runtime="tensorrt", builder_optimization_level=7
        )
    with pytest.raises(
        RuntimeBackendError, match=r"unknown tensorrt runtime option\(s\) \['threads'\]"
    ):
        build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt", threads=2)
    fixed = save_model(make_model(qdq=True, batch=1), tmp_path / "fixed.onnx")
    with pytest.raises(RuntimeBackendError, match=r"fixed\.onnx: input 'input' has a fixed batch"):
        build_engine(fixed, tmp_path / "e.plan", runtime="tensorrt")


def test_build_without_tensorrt_runtime(
    monkeypatch: pytest.MonkeyPatch, qdq_onnx: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(RuntimeBackendError, match="no TensorRT runtime"):
        build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")


# ------------------------------------------------------------------------ fidelity gate (fake TRT)


def test_fidelity_check_runs_the_plan_within_the_profile_and_is_recorded(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    fake = install(distort=lambda logits: logits + 1e-3)
    data = sample_batch(19)
    path = build_engine(
        qdq_onnx,
        tmp_path / "e.plan",
        runtime="tensorrt",
        batch_profile=(2, 4, 8),
        fidelity_data=data,
    )
    (context,) = fake.contexts
    assert context.input_shapes == [(8, 8, 8, 3), (8, 8, 8, 3), (3, 8, 8, 3)]
    sidecar = json.loads(sidecar_path(path).read_text())
    log = json.loads(build_log_path(path).read_text())
    report = sidecar["fidelity"]
    assert log["fidelity"] == report
    assert report["passed"] and report["samples"] == 19 and report["agreement"] == 1.0
    assert report["data"] == "19 samples of the given data"
    assert report["max_abs_error"] == pytest.approx(1e-3, rel=1e-2)
    expected = reference(qdq_onnx, data)
    per_sample = expected.reshape(len(expected), -1)
    typical_range = float(np.median(per_sample.max(axis=1) - per_sample.min(axis=1)))
    assert report["output_range"] == pytest.approx(typical_range)
    assert load_engine(path).metadata.fidelity == report
    # One sample is below the profile min of 2: the check pads it, as inference does.
    fake = install()
    build_engine(
        qdq_onnx,
        tmp_path / "one.plan",
        runtime="tensorrt",
        batch_profile=(2, 4, 8),
        fidelity_data=data[:1],
    )
    (context,) = fake.contexts
    assert context.input_shapes == [(2, 8, 8, 3)]
    assert json.loads(sidecar_path(tmp_path / "one.plan").read_text())["fidelity"]["samples"] == 1


@pytest.mark.parametrize(
    ("version", "fp16", "precision"),
    [("10.13.0.35", False, "int8"), ("11.0.0.1", True, "int8+fp16")],
)
def test_engine_that_disagrees_with_its_reference_is_not_written(
    install: Callable[..., FakeTensorRT],
    qdq_onnx: Path,
    tmp_path: Path,
    version: str,
    fp16: bool,
    precision: str,
) -> None:
    fake = install(version, distort=lambda logits: -logits)
    out = tmp_path / "out"
    with pytest.raises(RuntimeBackendError) as info:
        build_engine(qdq_onnx, out / "e.plan", runtime="tensorrt", fp16=fp16)
    message = str(info.value)
    assert message.startswith(
        f"{qdq_onnx}: the TensorRT {version} engine (precision {precision}) disagrees with its "
        "reference, the source ONNX run as float math on ONNX Runtime: fidelity FAILED: "
    )
    assert "over 64 samples" in message and "No engine was written." in message
    assert ("Try fp16=False" in message) is fp16
    assert called(fake, "build") == [()] and fake.contexts[0].input_shapes  # built and run
    assert not out.exists()  # no plan, sidecar, build log or "auto" timing cache
    cache = tmp_path / "shared.cache"
    cache.write_bytes(b"old")
    install(version, distort=lambda logits: -logits)
    with pytest.raises(RuntimeBackendError, match="fidelity FAILED"):
        build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt", timing_cache=cache)
    assert cache.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qdq.onnx", "shared.cache"]


def test_fidelity_reference_is_the_source_onnx_not_its_fp16_conversion(
    install: Callable[..., FakeTensorRT],
    qdq_onnx: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = install("11.0.0.1")
    seen: list[onnx.ModelProto] = []
    real = tensorrt_backend.reference_outputs

    def spy(model: onnx.ModelProto, input_name: str, batch: np.ndarray) -> np.ndarray:
        seen.append(model)
        return real(model, input_name, batch)

    monkeypatch.setattr(tensorrt_backend, "reference_outputs", spy)
    engine = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt", fp16=True)
    parsed = onnx.load_from_string(fake.parsed[0])
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in parsed.graph.initializer)
    source = onnx.load(qdq_onnx)
    assert len(seen) == 2 and all(model == source for model in seen)  # two synthetic batches
    # The fake engine runs the FP16 graph it parsed: close to the FP32 source, not equal.
    report = json.loads(sidecar_path(engine).read_text())["fidelity"]
    assert report["passed"] and 0 < report["max_abs_error"] <= report["tolerance"]


def test_fidelity_prerequisites_fail_before_the_build(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    fake = install(pycuda=False)
    with pytest.raises(
        RuntimeBackendError,
        match=r"qdq\.onnx: checking a TensorRT engine against its reference needs pycuda",
    ):
        build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    assert fake.calls == []
    fake = install()
    with pytest.raises(
        RuntimeBackendError,
        match=r"qdq\.onnx: fidelity data: input 'input' expects shape \(N, 8, 8, 3\)",
    ):
        build_engine(
            qdq_onnx,
            tmp_path / "e.plan",
            runtime="tensorrt",
            fidelity_data=np.zeros((4, 3, 8, 8), np.float32),
        )
    assert called(fake, "build") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qdq.onnx"]


# --------------------------------------------------------------------------- loading and running


def test_load_and_run_splits_and_pads_batches(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    install()
    path = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt", batch_profile=(2, 4, 8))
    fake = install(pycuda=True)
    engine = load_engine(path, threads=3)
    assert isinstance(engine, TensorRTEngine)
    assert (engine.runtime, engine.runtime_version, engine.device, engine.threads) == (
        "tensorrt",
        "10.13.0.35",
        "Fake GPU",
        None,
    )
    assert (engine.input_name, engine.input_shape, engine.max_batch) == (
        "input",
        (None, 8, 8, 3),
        8,
    )
    assert engine.size_bytes == path.stat().st_size
    batch = sample_batch(19)
    np.testing.assert_allclose(engine.run(batch), reference(qdq_onnx, batch), rtol=1e-5)
    np.testing.assert_allclose(engine.run(batch[:1]), reference(qdq_onnx, batch[:1]), rtol=1e-5)
    (context,) = fake.contexts
    assert [s[0] for s in context.input_shapes] == [8, 8, 3, 2]  # 19 = 8+8+3, then 1 padded to 2
    assert set(context.addresses) == {"input", "logits", "features"}
    with pytest.raises(RuntimeBackendError, match=r"'input' expects shape \(N, 8, 8, 3\)"):
        engine.run(np.zeros((2, 3, 8, 8), np.float32))


def test_engine_of_another_tensorrt_version_is_rejected(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    install("10.13.0.35")
    path = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    install("11.0.0.1", pycuda=True)
    with pytest.raises(
        RuntimeBackendError, match=r"e\.plan was built with TensorRT 10\.13\.0\.35, but TensorRT 11"
    ):
        load_engine(path)
    install("10.14.1", pycuda=True)
    with pytest.raises(RuntimeBackendError, match=r"major\.minor\.patch"):
        load_engine(path)


def test_engine_without_tensorrt_or_pycuda(
    install: Callable[..., FakeTensorRT],
    qdq_onnx: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install()
    path = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    install(pycuda=False)
    with pytest.raises(RuntimeBackendError, match="needs pycuda"):
        load_engine(path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(
        RuntimeBackendError,
        match=r"e\.plan is a TensorRT 10\.13\.0\.35 engine, but TensorRT is not",
    ):
        load_engine(path)


def test_engine_from_another_gpu_and_corrupt_plans(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    install()
    path = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    sidecar = sidecar_path(path)
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "device": {"name": "T4", "compute_capability": [7, 5]}}))
    install(pycuda=True)
    with pytest.raises(RuntimeBackendError, match=r"built on T4 .* cannot run on Fake GPU"):
        load_engine(path)
    sidecar.write_text(json.dumps(meta))
    path.write_bytes(b"\x00garbage")
    with pytest.raises(RuntimeBackendError, match="could not deserialize"):
        load_engine(path)


def test_onnx_engine_is_not_taken_for_tensorrt(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    install()
    path = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    sidecar_path(path).unlink()
    with pytest.raises(
        RuntimeBackendError,
        match=r"neither an ONNX model nor a TensorRT engine with a e\.plan\.json sidecar",
    ):
        load_engine(path)


def test_build_plan_is_recorded_in_full(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    install("11.0.0")
    engine = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    log = json.loads(build_log_path(engine).read_text())
    assert BuildPlan(**{**log["plan"], "builder_flags": (), "notes": ()}) == BuildPlan(
        "11.0.0", 11, True, (), False, (), "int8"
    )
    assert log["options"]["timing_cache"] == str(tmp_path / "tensorrt.timing-cache")


# --------------------------------------------------------------------------- live (GPU nodes)


def _tensorrt_ready() -> bool:
    # tensorrt-stubs makes 'import tensorrt' succeed without TensorRT, so check for Builder.
    try:
        import pycuda.driver  # noqa: F401
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")


live = pytest.mark.skipif(not _tensorrt_ready(), reason="needs TensorRT, pycuda and a GPU")


@pytest.mark.tensorrt
@live
def test_live_qdq_engine_matches_onnxruntime(qdq_onnx: Path, tmp_path: Path) -> None:
    path = build_engine(
        qdq_onnx, tmp_path / "qdq.plan", runtime="tensorrt", batch_profile=(1, 4, 8)
    )
    engine = load_engine(path)
    batch = sample_batch(19)
    expected = ort.InferenceSession(str(qdq_onnx)).run(None, {"input": batch})[0]
    np.testing.assert_allclose(engine.run(batch), expected, atol=0.05)
    log = json.loads(build_log_path(path).read_text())
    assert log["timing_cache"]["loaded"] is False
    again = build_engine(
        qdq_onnx, tmp_path / "again.plan", runtime="tensorrt", batch_profile=(1, 4, 8)
    )
    assert json.loads(build_log_path(again).read_text())["timing_cache"]["loaded"] is True


@pytest.mark.tensorrt
@live
@pytest.mark.parametrize("fp16", [False, True])
def test_live_fp32_model_with_and_without_fp16(fp16: bool, tmp_path: Path) -> None:
    source = save_model(make_model(), tmp_path / "fp32.onnx")
    engine = load_engine(build_engine(source, tmp_path / "e.plan", runtime="tensorrt", fp16=fp16))
    batch = sample_batch(5)
    expected = ort.InferenceSession(str(source)).run(None, {"input": batch})[0]
    np.testing.assert_allclose(engine.run(batch), expected, atol=0.02 if fp16 else 1e-4)
