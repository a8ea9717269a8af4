"""TensorRT build and inference decisions, checked through build_engine/load_engine.

TensorRT and a GPU are not available here, so most tests install a fake ``tensorrt``
(``tests/tensorrt_fake_trt.py``: records the builder calls, runs a plan's ONNX with ONNX
Runtime) and a fake ``pycuda`` over a fake CUDA driver (``tests/tensorrt_fake_cuda.py``: per-thread
context stacks, primary vs created contexts, exit hooks). Their enum values, string forms and
context rules are the real ones (sources in those modules). The tests verify our decisions, not
TensorRT. Tests marked ``tensorrt`` run the real thing and skip without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tests.onnx_models import make_model, sample_batch, save_model
from tests.tensorrt_fake_cuda import DeviceSpec, FakeDriver, install_fake_pycuda
from tests.tensorrt_fake_trt import BY_MAJOR, FakeTensorRT, enums

from qatflow.errors import RuntimeBackendError
from qatflow.onnx.reference import run_reference
from qatflow.runtimes import (
    build_engine,
    cuda_context,
    load_engine,
    tensorrt_backend,
    tensorrt_timing_cache,
)
from qatflow.runtimes.base import sidecar_path
from qatflow.runtimes.tensorrt_backend import (
    BuildPlan,
    build_log_path,
    format_parser_error,
    plan_build,
    resolve_timing_cache,
)
from qatflow.runtimes.tensorrt_fp16 import convert_to_mixed_fp16
from qatflow.runtimes.tensorrt_inference import (
    Chunk,
    TensorRTEngine,
    buffer_nbytes,
    check_gpu,
    from_bfloat16_bits,
    max_tensor_shape,
    plan_chunks,
    to_bfloat16_bits,
)
from qatflow.runtimes.tensorrt_layers import precision_summary
from qatflow.runtimes.tensorrt_module import import_tensorrt

# --------------------------------------------------------------------------- fakes

GPUS = (
    DeviceSpec("Fake GPU", (8, 6), "0000:01:00.0"),
    DeviceSpec("Fake GPU B", (9, 0), "0000:41:00.0"),
)


def reference(source: Path, batch: np.ndarray) -> np.ndarray:
    """The source ONNX run as float math: what a faithful engine returns."""
    return run_reference(onnx.load(source), {"input": batch})[0]


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> FakeDriver:
    """A fresh fake CUDA driver (a new process): qatflow's shared context is reset too."""
    driver = FakeDriver(GPUS)
    monkeypatch.setattr(cuda_context, "_shared", None)
    monkeypatch.setattr(
        cuda_context, "atexit", types.SimpleNamespace(register=driver.exit_hooks.append)
    )
    return driver


@pytest.fixture
def install(
    monkeypatch: pytest.MonkeyPatch, gpu: FakeDriver
) -> Iterator[Callable[..., FakeTensorRT]]:
    """Install a fake tensorrt of a given version and the fake pycuda (none: pycuda=False).

    Each call stands for a new process: qatflow's process-wide CUDA context starts anew.
    """

    def _install(version: str = "10.13.0.35", *, pycuda: bool = True, **kw: Any) -> FakeTensorRT:
        monkeypatch.setattr(cuda_context, "_shared", None)
        fake = FakeTensorRT(version, gpu, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
        install_fake_pycuda(monkeypatch, gpu if pycuda else None)
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


def test_fake_enums_are_the_cited_header_values() -> None:
    ten, eleven = enums(10), enums(11)
    assert int(ten["NetworkDefinitionCreationFlag"].STRONGLY_TYPED) == 1
    assert int(eleven["NetworkDefinitionCreationFlag"].STRONGLY_TYPED) == 0
    assert int(eleven["NetworkDefinitionCreationFlag"].PREFER_AOT_PYTHON_PLUGINS) == 2
    assert "EXPLICIT_BATCH" not in BY_MAJOR[11]["NetworkDefinitionCreationFlag"]
    assert {"FP16", "INT8"} <= set(BY_MAJOR[10]["BuilderFlag"]) and not BY_MAJOR[11]["BuilderFlag"]
    assert (int(ten["DataType"].HALF), int(ten["DataType"].BF16)) == (1, 7)
    assert str(ten["ErrorCode"].UNSUPPORTED_NODE) == "UNSUPPORTED_NODE"


@pytest.mark.parametrize("version", ["10.13.0.35", "11.1.0.5"])
def test_networks_are_created_without_flags(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path, version: str
) -> None:
    # 10: weakly typed (0). 11: always strongly typed; 1 << STRONGLY_TYPED would be 1 << 0.
    fake = install(version)
    build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    assert called(fake, "create_network") == [(0,)]


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
        code=lambda: enums(10)["ErrorCode"].INVALID_NODE,
    )
    assert format_parser_error(error) == "node 3 'conv1' (Conv): bad axis [INVALID_NODE]"
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


def test_mixed_fp16_conversion_gives_qdq_fp16_scales_at_opset_19_and_runs_in_ort() -> None:
    model = make_model(qdq=True)
    conversion = convert_to_mixed_fp16(model)
    converted = conversion.model
    onnx.checker.check_model(converted, full_check=True)
    assert conversion.opset == 19 and conversion.fp32_qdq_nodes == ()
    types_of = {i.name: i.data_type for i in converted.graph.initializer}
    assert (
        types_of["conv_b"] == types_of["conv_ws"] == types_of["act_s"] == onnx.TensorProto.FLOAT16
    )
    io = [*converted.graph.input, *converted.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} == {onnx.TensorProto.FLOAT}
    # Casts only at the graph input and output: none between a Q/DQ pair and its layer.
    nodes = list(converted.graph.node)
    casts = [n for n in nodes if n.op_type == "Cast"]
    assert len(casts) == 2
    assert casts[0].input[0] == "input" and casts[1].output[0] == converted.graph.output[0].name
    batch = sample_batch(4)
    outputs = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"input": batch}
        )[0]
        for m in (model, converted)
    ]
    assert outputs[1].dtype == np.float32
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-2)


def test_mixed_fp16_keeps_qdq_with_scales_below_fp16_range_in_fp32() -> None:
    model = make_model(qdq=True)
    (act,) = [i for i in model.graph.initializer if i.name == "act_s"]
    act.CopyFrom(onnx.numpy_helper.from_array(np.array(1e-6, np.float32), "act_s"))
    conversion = convert_to_mixed_fp16(model)
    on_act_s = {n.name for n in conversion.model.graph.node if n.input[1:2] == ["act_s"]}
    assert len(on_act_s) == 4 and set(conversion.fp32_qdq_nodes) == on_act_s  # 2 Q/DQ pairs
    scales = {i.name: i.data_type for i in conversion.model.graph.initializer}
    assert scales["act_s"] == onnx.TensorProto.FLOAT
    onnx.checker.check_model(conversion.model, full_check=True)


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
    assert log["layers"]["Layers"][0]["Inputs"][0]["Format/Datatype"].startswith(
        "Channel major INT8"
    )
    assert log["precision"]["int8_layers"] == ["conv + relu"]
    assert log["precision"]["counts"] == {"fp32": 1, "int8": 1}
    assert log["messages"] == ["WARNING: some layers stay in FP32"]
    assert set(log["timings_s"]) == {"reference", "parse", "build", "inspect", "fidelity", "total"}
    # No fidelity data: 64 synthetic samples in two batches, run as one 64-row input split to
    # the profile max of 32; the fake engine runs the parsed (= source) ONNX, so no error.
    (context,) = fake.exec_contexts
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
        "tensorrt.timing-cache.lock",
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
    assert called(fake, "create_network") == [(0,)]
    assert called(fake, "set_flag") == []
    parsed = onnx.load_from_string(fake.parsed[0])
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in parsed.graph.initializer)
    assert {n.op_type for n in parsed.graph.node} >= {"Cast", "QuantizeLinear", "DequantizeLinear"}
    log = json.loads(build_log_path(engine).read_text())
    assert log["plan"]["strongly_typed"] and log["plan"]["fp16_onnx_conversion"]
    assert "fp16_conversion" in log["timings_s"]
    # TensorRT 11's inspector has separate Format and DataType keys: still read as INT8.
    assert log["layers"]["Layers"][0]["Inputs"][0]["DataType"] == "Int8"
    assert log["precision"]["int8_layers"] == ["conv + relu"]


def cache_entries(path: Path) -> dict[str, str]:
    entries: dict[str, str] = json.loads(path.read_bytes())["entries"]
    return entries


def test_timing_cache_is_reused_and_a_mismatching_one_is_not_overwritten(
    install: Callable[..., FakeTensorRT],
    gpu: FakeDriver,
    qdq_onnx: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "shared.cache"
    fake = install()
    build_engine(qdq_onnx, tmp_path / "a.plan", runtime="tensorrt", timing_cache=cache)
    assert fake.cache_inputs == [b""] and len(cache_entries(cache)) == 1
    first = cache.read_bytes()
    fake = install()
    engine = build_engine(qdq_onnx, tmp_path / "b.plan", runtime="tensorrt", timing_cache=cache)
    assert fake.cache_inputs[0] == first
    log = json.loads(build_log_path(engine).read_text())["timing_cache"]
    assert log["loaded"] is True and log["saved"] is True
    assert cache.read_bytes() == first  # the same network: nothing new
    # Another GPU (other compute capability): TensorRT refuses the file; it is left as it is.
    monkeypatch.setenv("CUDA_DEVICE", "1")
    install()
    engine = build_engine(qdq_onnx, tmp_path / "c.plan", runtime="tensorrt", timing_cache=cache)
    log = json.loads(build_log_path(engine).read_text())["timing_cache"]
    assert log["loaded"] is False and log["saved"] is False
    assert "another GPU" in log["note"]
    assert cache.read_bytes() == first


def test_concurrent_builds_combine_their_timing_caches_under_a_lock(
    install: Callable[..., FakeTensorRT],
    qdq_onnx: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "shared.cache"
    other = save_model(make_model(qdq=True, seed=1), tmp_path / "other.onnx")

    others: list[Path] = []

    def another_build_finishes() -> None:
        # A second build (another process) writes its cache while this one is building.
        if not others:
            others.append(tmp_path / "o.plan")
            build_engine(other, others[0], runtime="tensorrt", timing_cache=cache)

    install(during_build=another_build_finishes)
    held: list[bool] = []
    real_lock = tensorrt_timing_cache.locked

    @contextlib.contextmanager
    def probing_lock(path: Path) -> Iterator[None]:
        with real_lock(path):
            held.append(_lock_is_held(path))
            yield

    monkeypatch.setattr(tensorrt_timing_cache, "locked", probing_lock)
    build_engine(qdq_onnx, tmp_path / "a.plan", runtime="tensorrt", timing_cache=cache)
    assert len(cache_entries(cache)) == 2  # both builds' entries: neither overwrote the other
    assert held == [True, True]  # each build merged and wrote under the lock


def _lock_is_held(cache: Path) -> bool:
    with tensorrt_timing_cache.lock_path(cache).open("ab") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False


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
    (context,) = fake.exec_contexts
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
    (context,) = fake.exec_contexts
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
    # An ideal integer engine of the same model passes: the engine, not the net, is at fault.
    assert "Also, an ideal integer engine of this model" in message and "so it passes" in message
    assert ("Try fp16=False" in message) is fp16
    assert called(fake, "build") == [()] and fake.exec_contexts[0].input_shapes  # built and run
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
        match=r"qdq\.onnx: building and checking a TensorRT engine needs pycuda",
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
    (context,) = fake.exec_contexts
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
    garbage = b"\x00garbage"
    path.write_bytes(garbage)
    with pytest.raises(RuntimeBackendError, match=r"was written for another plan than .*e\.plan"):
        load_engine(path)
    sidecar.write_text(json.dumps({**meta, "engine_sha256": hashlib.sha256(garbage).hexdigest()}))
    with pytest.raises(RuntimeBackendError, match="could not deserialize"):
        load_engine(path)


def test_a_sidecar_beside_another_plan_is_refused(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path
) -> None:
    """A plan copied over an engine keeps the old sidecar: that sidecar must not vouch for it."""
    install()
    first = build_engine(qdq_onnx, tmp_path / "a.plan", runtime="tensorrt")
    second = build_engine(
        qdq_onnx, tmp_path / "b.plan", runtime="tensorrt", batch_profile=(1, 2, 4)
    )
    first.write_bytes(second.read_bytes() + b"\x00")
    install(pycuda=True)
    with pytest.raises(RuntimeBackendError, match=r"a\.plan\.json was written for another plan"):
        load_engine(first)
    meta = json.loads(sidecar_path(second).read_text())
    del meta["engine_sha256"]
    sidecar_path(second).write_text(json.dumps(meta))
    with pytest.raises(RuntimeBackendError, match="names no engine hash"):
        load_engine(second)


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


# ------------------------------------------------- CUDA context, threads, devices (fake pycuda)


def test_close_frees_context_engine_and_buffers_and_refuses_to_run(
    install: Callable[..., FakeTensorRT], gpu: FakeDriver, qdq_onnx: Path, tmp_path: Path
) -> None:
    install()
    path = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    assert gpu.memory == {}  # the build's fidelity runner was closed
    with load_engine(path) as engine:
        assert isinstance(engine, TensorRTEngine) and len(gpu.memory) == 3
        engine.run(sample_batch(2))
    assert engine.closed and gpu.memory == {} and gpu.errors == []
    engine.close()  # idempotent
    with pytest.raises(RuntimeBackendError, match=r"e\.plan: the TensorRT engine is closed"):
        engine.run(sample_batch(2))


def test_engines_still_open_at_exit_are_closed_before_the_context_goes(
    install: Callable[..., FakeTensorRT], gpu: FakeDriver, qdq_onnx: Path, tmp_path: Path
) -> None:
    install()
    path = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    engine = load_engine(path)  # still referenced when the interpreter exits
    gpu.exit()
    del engine
    assert gpu.errors == []  # nothing freed in a destroyed context
    assert gpu.memory == {} and not any(c.alive for c in gpu.contexts)


def test_engine_loads_and_runs_from_any_thread(
    install: Callable[..., FakeTensorRT], gpu: FakeDriver, qdq_onnx: Path, tmp_path: Path
) -> None:
    install()
    path = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    batch = sample_batch(3)
    loaded: list[Any] = []
    results: list[np.ndarray] = []
    for work in (
        lambda: loaded.append(load_engine(path)),
        lambda: results.append(loaded[0].run(batch)),
    ):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    np.testing.assert_allclose(results[0], reference(qdq_onnx, batch), rtol=1e-5)
    assert gpu.current() is None  # nothing left pushed on this thread either


def test_build_and_run_share_one_context_the_devices_primary(
    install: Callable[..., FakeTensorRT], gpu: FakeDriver, qdq_onnx: Path, tmp_path: Path
) -> None:
    fake = install()  # one process: build, then load and run
    path = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    load_engine(path).run(sample_batch(2))
    (context,) = {id(c): c for c in fake.used_contexts}.values()
    assert context.primary and gpu.contexts == [context]
    assert gpu.errors == []


def test_missing_gpu_or_bad_device_is_a_backend_error(
    install: Callable[..., FakeTensorRT],
    gpu: FakeDriver,
    qdq_onnx: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install()
    path = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    monkeypatch.setenv("CUDA_DEVICE", "7")
    install()
    with pytest.raises(
        RuntimeBackendError,
        match=r"e\.plan: running TensorRT engines needs a CUDA GPU, but none is usable: cuDevic",
    ):
        load_engine(path)
    monkeypatch.delenv("CUDA_DEVICE")
    gpu.devices.clear()
    install()
    with pytest.raises(
        RuntimeBackendError,
        match=r"cuInit failed: no CUDA-capable device is detected \(check the NVIDIA driver",
    ):
        build_engine(qdq_onnx, tmp_path / "f.plan", runtime="tensorrt")


def test_the_contexts_device_is_recorded_and_checked(
    install: Callable[..., FakeTensorRT],
    qdq_onnx: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_DEVICE", "1")
    install()
    path = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    device = json.loads(sidecar_path(path).read_text())["device"]
    assert device["name"] == "Fake GPU B" and device["compute_capability"] == [9, 0]
    assert device["pci_bus_id"] == "0000:41:00.0"
    assert "uuid" in device  # read from libcuda: None where there is no driver library
    assert json.loads(build_log_path(path).read_text())["gpu"] == device
    monkeypatch.delenv("CUDA_DEVICE")
    install()
    with pytest.raises(
        RuntimeBackendError,
        match=r"built on Fake GPU B \(compute capability 9\.0\) and cannot run on Fake GPU ",
    ):
        load_engine(path)


@pytest.mark.parametrize(("io_dtype", "rtol"), [("HALF", 2e-3), ("BF16", 2e-2)])
def test_fp16_and_bf16_engine_io(
    install: Callable[..., FakeTensorRT], qdq_onnx: Path, tmp_path: Path, io_dtype: str, rtol: float
) -> None:
    install(io_dtype=io_dtype)
    path = build_engine(qdq_onnx, tmp_path / "e.plan", runtime="tensorrt")
    batch = sample_batch(5)
    with load_engine(path) as engine:
        got = engine.run(batch)
    assert got.dtype == np.float32
    # What the engine saw: the batch rounded to its input type (a rounding may cross a Q step).
    if io_dtype == "BF16":
        seen = from_bfloat16_bits(to_bfloat16_bits(batch))
    else:
        seen = batch.astype(np.float16).astype(np.float32)
    expected = reference(qdq_onnx, seen)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * float(np.abs(expected).max()))


def test_bfloat16_bit_patterns() -> None:
    values = np.array([1.0, -2.5, 3.140625, 1.00390625, np.inf, 0.0], np.float32)
    bits = to_bfloat16_bits(values)
    assert bits.dtype == np.uint16 and bits[0] == 0x3F80
    np.testing.assert_array_equal(from_bfloat16_bits(bits)[:4], [1.0, -2.5, 3.140625, 1.0])
    assert (
        np.isinf(from_bfloat16_bits(bits)[4])
        and np.isnan(from_bfloat16_bits(to_bfloat16_bits(np.array([np.nan], np.float32))))[0]
    )


def test_precision_summary_needs_detailed_layers() -> None:
    assert precision_summary({"Layers": ["conv", "dense"], "Bindings": []}) is None
    assert precision_summary(None) is None
    half = {"Name": "gemm", "Inputs": [{"Format/Datatype": "Row major linear FP16 format"}]}
    assert precision_summary({"Layers": [half]})["counts"] == {"fp16": 1}  # type: ignore[index]


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
