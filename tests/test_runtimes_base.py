"""Runtime-independent engine logic: shapes, profiles, versions, metadata, options, dispatch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from tests.onnx_models import HEIGHT, WIDTH, make_model, save_model

from qatflow.errors import RuntimeBackendError
from qatflow.params import RUNTIMES
from qatflow.runtimes import EngineMetadata, build_engine, load_engine
from qatflow.runtimes.base import (
    check_batch,
    check_same_version,
    engine_input_shape,
    has_qdq,
    onnx_io,
    options_from_kwargs,
    physical_cores,
    profile_shapes,
    sidecar_path,
    validate_batch_profile,
    version_tuple,
)
from qatflow.runtimes.dispatch import BACKENDS
from qatflow.runtimes.onnxruntime_backend import OrtBuildOptions

# --------------------------------------------------------------------------- tests


def test_test_models_have_the_intended_structure() -> None:
    plain, quantized = make_model(), make_model(qdq=True)
    assert not has_qdq(plain) and has_qdq(quantized)
    dq_axes = {
        n.input[0]: helper.get_attribute_value(n.attribute[0])
        for n in quantized.graph.node
        if n.op_type == "DequantizeLinear" and n.attribute
    }
    assert dq_axes == {"conv_wq": 0, "dense_wq": 1}
    zero_points = [numpy_helper.to_array(i) for i in quantized.graph.initializer if "z" in i.name]
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert onnx_io(quantized, Path("m.onnx")) == ("input", ("N", HEIGHT, WIDTH, 3), "logits")


def test_onnx_io_rejects_several_inputs(tmp_path: Path) -> None:
    model = make_model()
    model.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    with pytest.raises(RuntimeBackendError, match=r"m\.onnx.*exactly one.*extra"):
        onnx_io(model, Path("m.onnx"))


def test_a_multi_output_model_is_refused_before_any_work(tmp_path: Path) -> None:
    """An engine serves one output; a second head would be dropped without a word."""
    model = make_model()
    first = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Identity", [first], ["second_head"]))
    second = model.graph.output.add()
    second.CopyFrom(model.graph.output[0])
    second.name = "second_head"
    source = save_model(model, tmp_path / "two_heads.onnx")
    with pytest.raises(RuntimeBackendError, match=r"two_heads\.onnx.*one output.*second_head"):
        build_engine(source, tmp_path / "e.onnx")
    assert not (tmp_path / "e.onnx").exists()


@pytest.mark.parametrize("profile", [(1, 8, 64), (4, 4, 4), [2, 3, 5]])
def test_valid_batch_profiles(profile: list[int]) -> None:
    assert validate_batch_profile(profile) == tuple(profile)


@pytest.mark.parametrize("profile", [(0, 8, 64), (8, 4, 64), (1, 8), (1.0, 2, 3), (1, 9, 8)])
def test_invalid_batch_profiles(profile: tuple[int, ...]) -> None:
    with pytest.raises(RuntimeBackendError, match="batch_profile"):
        validate_batch_profile(profile)


def test_profile_shapes_for_dynamic_batch() -> None:
    shapes = profile_shapes("input", ("N", 8, 8, 3), (1, 8, 64), Path("m.onnx"))
    assert shapes == ((1, 8, 8, 3), (8, 8, 8, 3), (64, 8, 8, 3))


def test_fixed_batch_must_match_the_profile() -> None:
    with pytest.raises(
        RuntimeBackendError, match=r"m\.onnx.*'input'.*fixed batch of 1.*\(1, 8, 64\)"
    ):
        profile_shapes("input", (1, 8, 8, 3), (1, 8, 64), Path("m.onnx"))
    assert profile_shapes("input", (4, 8, 8, 3), (4, 4, 4), Path("m.onnx"))[2] == (4, 8, 8, 3)


def test_dynamic_non_batch_dimension_is_rejected() -> None:
    with pytest.raises(RuntimeBackendError, match=r"dynamic non-batch dimension\(s\) \[1, 2\]"):
        profile_shapes("input", ("N", "h", None, 3), (1, 8, 64), Path("m.onnx"))


def test_engine_input_shape_keeps_fixed_dims() -> None:
    assert engine_input_shape(("N", 8, 8, 3)) == (None, 8, 8, 3)
    assert engine_input_shape((2, 8)) == (2, 8)


def test_check_batch() -> None:
    check_batch(np.zeros((5, 8, 8, 3)), "input", (None, 8, 8, 3))
    with pytest.raises(RuntimeBackendError, match=r"'input' expects 4 dimensions \(N, 8, 8, 3\)"):
        check_batch(np.zeros((8, 8, 3)), "input", (None, 8, 8, 3))
    with pytest.raises(RuntimeBackendError, match="dimension 3 is 1, expected 3"):
        check_batch(np.zeros((2, 8, 8, 1)), "input", (None, 8, 8, 3))
    with pytest.raises(RuntimeBackendError, match="empty"):
        check_batch(np.zeros((0, 8, 8, 3)), "input", (None, 8, 8, 3))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.13.0.35", (10, 13, 0, 35)), ("1.23.0rc1", (1, 23, 0)), ("11.0", (11, 0)), ("2", (2,))],
)
def test_version_tuple(text: str, expected: tuple[int, ...]) -> None:
    assert version_tuple(text) == expected


def test_version_tuple_rejects_garbage() -> None:
    with pytest.raises(RuntimeBackendError, match="cannot parse"):
        version_tuple("unknown")


def test_check_same_version() -> None:
    check_same_version(Path("e"), "TensorRT", "10.13.0.35", "10.13.0.40", 3)
    with pytest.raises(RuntimeBackendError, match=r"built with TensorRT 10\.3\.0.*11\.0\.1.*major"):
        check_same_version(Path("e"), "TensorRT", "10.3.0", "11.0.1", 1)
    with pytest.raises(RuntimeBackendError, match=r"major\.minor\.patch"):
        check_same_version(Path("e"), "TensorRT", "10.3.0", "10.4.0", 3)


def test_metadata_round_trip_and_validation() -> None:
    meta = EngineMetadata(
        runtime="tensorrt",
        runtime_version="10.13.0",
        source_onnx="/m.onnx",
        source_sha256="ab",
        input_name="input",
        input_shape=(None, 8, 8, 3),
        output_name="logits",
        batch_profile=(1, 8, 64),
        build_options={"fp16": True},
        device={"name": "GPU"},
    )
    assert EngineMetadata.from_dict(json.loads(json.dumps(meta.to_dict())), Path("x")) == meta
    broken = meta.to_dict()
    del broken["input_name"]
    with pytest.raises(RuntimeBackendError, match=r"x\.json: malformed engine metadata"):
        EngineMetadata.from_dict(broken, Path("x.json"))
    with pytest.raises(RuntimeBackendError, match="format"):
        EngineMetadata.from_dict({**meta.to_dict(), "format": "other/9"}, Path("x.json"))


def test_unknown_runtime_options_are_rejected() -> None:
    with pytest.raises(
        RuntimeBackendError, match=r"unknown onnxruntime runtime option\(s\) \['thread'\]"
    ):
        options_from_kwargs(OrtBuildOptions, "onnxruntime", {"thread": 2})


def test_every_runtime_has_a_backend() -> None:
    assert sorted(BACKENDS) == sorted(RUNTIMES)


def test_physical_cores_is_positive() -> None:
    assert physical_cores() >= 1


def test_build_engine_argument_errors(tmp_path: Path) -> None:
    model = save_model(make_model(), tmp_path / "m.onnx")
    with pytest.raises(RuntimeBackendError, match="runtime must be one of"):
        build_engine(model, tmp_path / "e", runtime="tvm")
    with pytest.raises(RuntimeBackendError, match=r"ONNX file .*missing\.onnx does not exist"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "e.onnx")
    with pytest.raises(RuntimeBackendError, match="batch_profile"):
        build_engine(model, tmp_path / "e.onnx", batch_profile=(8, 1, 64))
    assert not (tmp_path / "e.onnx").exists()


def test_load_engine_errors(tmp_path: Path) -> None:
    with pytest.raises(RuntimeBackendError, match=r"nope\.plan does not exist"):
        load_engine(tmp_path / "nope.plan")
    junk = tmp_path / "junk.plan"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(
        RuntimeBackendError, match=r"junk\.plan is neither an ONNX model nor a TensorRT engine"
    ):
        load_engine(junk)
    sidecar_path(junk).write_text("{not json")
    with pytest.raises(RuntimeBackendError, match=r"junk\.plan\.json: unreadable engine metadata"):
        load_engine(junk)
    sidecar_path(junk).write_text(json.dumps({"format": "qatflow-engine/1", "runtime": "x"}))
    with pytest.raises(RuntimeBackendError, match="malformed"):
        load_engine(junk)
    with pytest.raises(RuntimeBackendError, match="threads must be a positive integer"):
        load_engine(junk, threads=0)
