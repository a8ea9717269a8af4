"""ONNX Runtime engines: offline optimization, metadata, graph-pass hook, loading and running."""

from __future__ import annotations

import logging
import platform
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tests.onnx_models import CLASSES, make_model, sample_batch, save_model

from qatflow.errors import ExportError, RuntimeBackendError
from qatflow.onnx.reference import run_reference
from qatflow.runtimes import build_engine, load_engine
from qatflow.runtimes.base import physical_cores
from qatflow.runtimes.cpu_int8 import detect
from qatflow.runtimes.onnxruntime_backend import (
    OnnxRuntimeEngine,
    ort_graph_passes,
    read_ort_metadata,
    write_ort_metadata,
)

INTEGER_OPS = {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm"}
HOOK = "qatflow.onnx.ort_int8"


def reference(model_path: Path, batch: np.ndarray) -> np.ndarray:
    """Outputs of the source model run as float math (the engines' reference)."""
    return run_reference(onnx.load(model_path), {"input": batch})[0]


def ops(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(path).graph.node)


@pytest.fixture
def fp32_model(tmp_path: Path) -> Path:
    return save_model(make_model(), tmp_path / "fp32.onnx")


def test_fp32_engine_is_a_plain_optimized_onnx_model_with_metadata(
    fp32_model: Path, tmp_path: Path
) -> None:
    engine_path = build_engine(fp32_model, tmp_path / "out" / "fp32.ort.onnx", threads=1)
    assert engine_path == tmp_path / "out" / "fp32.ort.onnx"
    session = ort.InferenceSession(str(engine_path), providers=["CPUExecutionProvider"])
    batch = sample_batch(6)
    np.testing.assert_allclose(
        session.run(None, {"input": batch})[0], reference(fp32_model, batch), atol=1e-5
    )
    props = session.get_modelmeta().custom_metadata_map
    assert props["qatflow.runtime"] == "onnxruntime"
    assert props["qatflow.runtime_version"] == ort.__version__
    assert props["qatflow.source_onnx"] == str(fp32_model.resolve())
    assert '"optimization_level": "extended"' in props["qatflow.build_options"]
    assert "Gemm" in ops(engine_path)  # MatMul + Add fused offline by ORT
    assert [p.name for p in engine_path.parent.iterdir()] == ["fp32.ort.onnx"]


def test_qdq_pairs_become_integer_kernels_that_load_at_any_level(tmp_path: Path) -> None:
    source = save_model(make_model(qdq=True, output_q=True), tmp_path / "qdq.onnx")
    engine_path = build_engine(source, tmp_path / "qdq.ort.onnx", int8_rewrite=False)
    built_ops = ops(engine_path)
    assert INTEGER_OPS & set(built_ops), built_ops
    assert built_ops["QuantizeLinear"] < ops(source)["QuantizeLinear"]
    assert not any(
        node.domain == "com.microsoft.nchwc" for node in onnx.load(engine_path).graph.node
    )
    batch, expected = sample_batch(5), reference(source, sample_batch(5))
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        session = ort.InferenceSession(
            str(engine_path), options, providers=["CPUExecutionProvider"]
        )
        np.testing.assert_allclose(session.run(None, {"input": batch})[0], expected, atol=1e-4)


def test_load_and_run_with_threads(fp32_model: Path, tmp_path: Path) -> None:
    engine_path = build_engine(
        fp32_model, tmp_path / "e.onnx", threads=1, execution_mode="parallel"
    )
    engine = load_engine(engine_path)
    assert isinstance(engine, OnnxRuntimeEngine)
    assert (engine.runtime, engine.runtime_version, engine.device) == (
        "onnxruntime",
        ort.__version__,
        f"cpu ({platform.machine()})",
    )
    assert (engine.input_name, engine.input_shape, engine.path) == (
        "input",
        (None, 8, 8, 3),
        engine_path,
    )
    assert engine.size_bytes == engine_path.stat().st_size
    assert engine.threads == 1
    session_options = engine.session.get_session_options()
    assert session_options.intra_op_num_threads == 1
    assert session_options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert (
        load_engine(engine_path, threads=2).session.get_session_options().intra_op_num_threads == 2
    )
    for size in (1, 7, 70):
        batch = sample_batch(size)
        logits = engine.run(batch.astype(np.float64))
        assert logits.shape == (size, CLASSES)
        np.testing.assert_allclose(logits, reference(fp32_model, batch), atol=1e-5)
    with pytest.raises(RuntimeBackendError, match=r"'input' expects shape \(N, 8, 8, 3\)"):
        engine.run(np.zeros((2, 8, 8, 1), np.float32))


def test_default_threads_are_physical_cores(fp32_model: Path, tmp_path: Path) -> None:
    engine = load_engine(build_engine(fp32_model, tmp_path / "e.onnx"))
    assert engine.threads == physical_cores()


def test_plain_onnx_without_metadata_loads_as_is(fp32_model: Path) -> None:
    engine = load_engine(fp32_model)
    assert engine.metadata.runtime_version == ""
    assert engine.runtime_version == ort.__version__
    batch = sample_batch(3)
    np.testing.assert_allclose(engine.run(batch), reference(fp32_model, batch), atol=1e-5)


def _restamp(path: Path, version: str) -> None:
    model = onnx.load(path)
    metadata = read_ort_metadata(model, path)
    assert metadata is not None
    write_ort_metadata(model, type(metadata)(**{**metadata.__dict__, "runtime_version": version}))
    onnx.save(model, path)


def test_version_checks(fp32_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine_path = build_engine(fp32_model, tmp_path / "e.onnx")
    _restamp(engine_path, "2.1.0")
    with pytest.raises(
        RuntimeBackendError,
        match=rf"e\.onnx was built with onnxruntime 2\.1\.0, but .*{ort.__version__}",
    ):
        load_engine(engine_path)
    _restamp(engine_path, "1.0.0")
    with caplog.at_level(logging.WARNING, logger="qatflow.runtimes.onnxruntime"):
        assert load_engine(engine_path).run(sample_batch(1)).shape == (1, CLASSES)
    assert "built with onnxruntime 1.0.0" in caplog.text


def test_engine_of_another_runtime_is_rejected(fp32_model: Path, tmp_path: Path) -> None:
    engine_path = build_engine(fp32_model, tmp_path / "e.onnx")
    model = onnx.load(engine_path)
    for prop in model.metadata_props:
        if prop.key == "qatflow.runtime":
            prop.value = "tensorrt"
    onnx.save(model, engine_path)
    with pytest.raises(RuntimeBackendError, match="built for runtime 'tensorrt', not onnxruntime"):
        load_engine(engine_path)


def test_option_and_shape_errors(tmp_path: Path, fp32_model: Path) -> None:
    with pytest.raises(RuntimeBackendError, match="execution_mode must be one of"):
        build_engine(fp32_model, tmp_path / "e.onnx", execution_mode="fast")
    with pytest.raises(RuntimeBackendError, match="optimization_level must be one of"):
        build_engine(fp32_model, tmp_path / "e.onnx", optimization_level="max")
    with pytest.raises(
        RuntimeBackendError, match=r"unknown onnxruntime runtime option\(s\) \['fp16'\]"
    ):
        build_engine(fp32_model, tmp_path / "e.onnx", fp16=True)
    fixed = save_model(make_model(batch=1), tmp_path / "fixed.onnx")
    with pytest.raises(
        RuntimeBackendError, match=r"fixed\.onnx: input 'input' has a fixed batch of 1"
    ):
        build_engine(fixed, tmp_path / "e.onnx")
    engine = load_engine(build_engine(fixed, tmp_path / "e.onnx", batch_profile=(1, 1, 1)))
    assert engine.input_shape == (1, 8, 8, 3)
    with pytest.raises(RuntimeBackendError, match="dimension 0 is 2, expected 1"):
        engine.run(sample_batch(2))


def test_a_broken_graph_is_refused_before_any_work(tmp_path: Path) -> None:
    model = make_model()
    model.graph.node[1].input[1] = "no_such_weight"
    source = tmp_path / "broken.onnx"
    onnx.save(model, source)
    with pytest.raises(ExportError, match=r"broken\.onnx cannot be run .*'no_such_weight'"):
        build_engine(source, tmp_path / "e.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]


# --------------------------------------------------------------------------- int8 rewrite hook


def _fake_rewrite_module(calls: list[str], mode: str = "ok") -> types.ModuleType:
    """A stand-in ort_int8 pass that marks the graph it rewrote (or fails, or breaks it)."""
    module = types.ModuleType(HOOK)

    def rewrite_for_ort_int8(model: onnx.ModelProto, **options: object) -> onnx.ModelProto:
        assert set(options) <= {"calibration", "requantize", "relu", "fold_affine", "integer_convs"}
        if mode == "raise":
            raise ValueError("cannot rewrite")
        calls.append(model.graph.name)
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(model)
        rewritten.graph.doc_string = "rewritten for ORT int8"
        if mode == "break":
            rewritten.graph.node[-1].input[0] = "dangling"
        return rewritten

    module.rewrite_for_ort_int8 = rewrite_for_ort_int8  # type: ignore[attr-defined]
    return module


def test_int8_rewrite_hook_runs_on_qdq_graphs_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, HOOK, _fake_rewrite_module(calls))
    assert [name for name, _ in ort_graph_passes(make_model(qdq=True), int8_rewrite=True)] == [
        f"{HOOK}.rewrite_for_ort_int8"
    ]
    assert ort_graph_passes(make_model(qdq=True), int8_rewrite=False) == []
    assert ort_graph_passes(make_model(), int8_rewrite=True) == []
    source = save_model(make_model(qdq=True), tmp_path / "qdq.onnx")
    engine_path = build_engine(source, tmp_path / "e.onnx")
    assert calls == ["tiny_qdq"]
    assert onnx.load(engine_path).graph.doc_string == "rewritten for ORT int8"
    engine = load_engine(engine_path)
    # Where U8S8 saturates (no VNNI), auto re-encodes the weights after the rewrite.
    encoding = detect().best_encoding()
    encoded = [] if encoding == "u8s8" else [f"qatflow.onnx.encoding.encode_weights({encoding})"]
    assert engine.metadata.build_options["graph_passes"] == [
        f"{HOOK}.rewrite_for_ort_int8",
        *encoded,
    ]
    build_engine(source, tmp_path / "plain.onnx", int8_rewrite=False)
    assert calls == ["tiny_qdq"]
    assert load_engine(tmp_path / "plain.onnx").metadata.build_options["graph_passes"] == encoded


def test_failing_graph_pass_names_itself_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, HOOK, _fake_rewrite_module([], mode="break"))
    source = save_model(make_model(qdq=True), tmp_path / "qdq.onnx")
    with pytest.raises(
        RuntimeBackendError, match=r"cannot optimize this model \(after graph passes"
    ):
        build_engine(source, tmp_path / "out" / "e.onnx")
    monkeypatch.setitem(sys.modules, HOOK, _fake_rewrite_module([], mode="raise"))
    with pytest.raises(
        RuntimeBackendError, match=r"qdq\.onnx: graph pass .*rewrite_for_ort_int8 failed"
    ):
        build_engine(source, tmp_path / "out" / "e.onnx")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------- Keras export


def test_keras_model_exported_with_tf2onnx(tmp_path: Path) -> None:
    import keras
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="input")
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES)(x))
    source = tmp_path / "keras.onnx"
    spec = [tf.TensorSpec((None, 8, 8, 3), tf.float32, name="input")]
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(source))
    engine = load_engine(build_engine(source, tmp_path / "keras.ort.onnx", threads=1))
    assert engine.input_shape == (None, 8, 8, 3)
    batch = sample_batch(9)
    np.testing.assert_allclose(engine.run(batch), model.predict(batch, verbose=0), atol=1e-4)
