"""Precomputed float weights for the float Convs of an ORT engine: the same numbers, no
per-call dequantization, and ONNX Runtime keeps those Convs on the kernel it ran before."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tests.int8_models import batch_norm_chain, near_binary

from qatflow.onnx.encoding import encode_weights
from qatflow.onnx.float_weights import overridable_form, precompute_float_weights
from qatflow.onnx.integer_kernels import integer_convs
from qatflow.onnx.ort_int8 import rewrite_for_ort_int8
from qatflow.onnx.reference import session
from qatflow.runtimes import build_engine, load_engine, onnxruntime_backend
from qatflow.runtimes.cpu_int8 import CpuInt8, detect, float_kernels
from qatflow.tracking import onnx_signature

EXACT = {"relu": "exact", "requantize": "none"}


def _ort_optimized(model: onnx.ModelProto, path: Path, level: str) -> onnx.ModelProto:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(path)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """As ``load_engine`` runs an engine: every ORT optimization on."""
    return np.asarray(session(model, optimize=True).run(None, {"x": x})[0])


def _engine_graph(encoding: str, tmp_path: Path) -> onnx.ModelProto:
    """ORT's offline optimization of batch_norm_chain(3) with only its last Conv in integer."""
    model = batch_norm_chain(3)
    names = integer_convs(rewrite_for_ort_int8(model, **EXACT))  # type: ignore[arg-type]
    rewritten = rewrite_for_ort_int8(model, **EXACT, integer_convs=names[-1:])  # type: ignore[arg-type]
    encode_weights(rewritten, encoding)  # type: ignore[arg-type]
    return _ort_optimized(rewritten, tmp_path / f"{encoding}.onnx", "EXTENDED")


def test_float_convs_read_float_weights_and_compute_the_same_values(tmp_path: Path) -> None:
    x = near_binary(32)
    for encoding in ("u8s8", "u8u8"):
        optimized = _engine_graph(encoding, tmp_path)
        faster, count = precompute_float_weights(optimized)
        assert count == 2  # the two float Convs; the integer one is a QLinearConv
        producers = {o: n.op_type for n in faster.graph.node for o in n.output}
        convs = [n for n in faster.graph.node if n.op_type in ("Conv", "FusedConv")]
        assert len(convs) == 2
        assert all(producers.get(conv.input[1]) is None for conv in convs)
        initializers = {i.name for i in faster.graph.initializer}
        assert {conv.input[1] for conv in convs} <= initializers & {
            i.name for i in faster.graph.input
        }
        np.testing.assert_array_equal(_run(faster, x), _run(optimized, x))


def test_overridable_weights_keep_ort_from_folding_and_relayouting_the_float_convs(
    tmp_path: Path,
) -> None:
    """Constant float weights would let ORT fold the batch norm into the Conv and move it to
    its NCHWc kernels (other rounding); overridable ones keep the Conv as it ran."""
    fused = _engine_graph("u8s8", tmp_path)
    faster, _ = precompute_float_weights(fused)
    constant, count = precompute_float_weights(fused, overridable=False)
    assert count == 2 and [i.name for i in constant.graph.input] == ["x"]

    def ops(model: onnx.ModelProto, name: str) -> collections.Counter[str]:
        optimized = _ort_optimized(model, tmp_path / name, "ALL")
        return collections.Counter(f"{n.domain}:{n.op_type}" for n in optimized.graph.node)

    kept, folded = ops(faster, "kept.onnx"), ops(constant, "folded.onnx")
    assert kept[":BatchNormalization"] == 2 and not any("nchwc" in op for op in kept)
    assert folded[":BatchNormalization"] == 0


def test_an_engine_records_its_float_weights_and_takes_only_its_data_input(
    tmp_path: Path,
) -> None:
    """Without the int8 rewrite ORT runs every Conv of the chain in float: all get weights."""
    source = tmp_path / "chain.onnx"
    onnx.save(batch_norm_chain(3), source)
    built = build_engine(
        source, tmp_path / "e.onnx", fidelity_data=near_binary(64), int8_rewrite=False
    )
    engine = load_engine(built)
    options = engine.metadata.build_options
    assert options["float_weights"] == options["optimized_ops"]["Conv"] == 3
    assert engine.metadata.fidelity["passed"]
    # this small chain tolerates the constant form's rounding, so the faster form is kept
    assert options["float_weights_constant"] and options["constant_weights_refused"] is None
    assert engine.input_name == "x"
    assert engine.run(near_binary(4)).shape == (4, 10)
    assert [spec.name for spec in onnx_signature(onnx.load(built)).inputs] == ["x"]


def test_constant_weights_that_disagree_are_refused_and_the_overridable_engine_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A constant-weights form that computes other numbers (here: one float Conv's weights
    doubled) fails its own check; the build keeps the overridable engine and records why."""

    def doubled(model: onnx.ModelProto, *, overridable: bool = True) -> tuple[onnx.ModelProto, int]:
        out, count = precompute_float_weights(model, overridable=overridable)
        if not overridable:
            conv = next(n for n in out.graph.node if n.op_type in ("Conv", "FusedConv"))
            weight = next(i for i in out.graph.initializer if i.name == conv.input[1])
            weight.CopyFrom(numpy_helper.from_array(2 * numpy_helper.to_array(weight), weight.name))
        return out, count

    monkeypatch.setattr(onnxruntime_backend, "precompute_float_weights", doubled)
    source = tmp_path / "chain.onnx"
    onnx.save(batch_norm_chain(3), source)
    data = near_binary(64)
    built = build_engine(source, tmp_path / "e.onnx", fidelity_data=data, int8_rewrite=False)
    engine = load_engine(built)
    options = engine.metadata.build_options
    assert not options["float_weights_constant"]
    refused = options["constant_weights_refused"]
    assert refused["float_weights"] == "constant" and refused["beyond_tolerance"] > 0
    assert options["refused_rewrites"] == []  # a float-weight form is no rewrite
    assert engine.metadata.fidelity["passed"]
    assert len(onnx.load(built).graph.input) == 4  # x and the 3 overridable weights


def test_a_cpu_with_other_float_kernels_loads_the_overridable_form_the_build_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Constant float weights run on NCHWc kernels that sum in an order of the CPU's float
    kernel family; loaded on another family, the engine runs its overridable form instead."""
    source = tmp_path / "chain.onnx"
    onnx.save(batch_norm_chain(3), source)
    built = build_engine(
        source, tmp_path / "e.onnx", fidelity_data=near_binary(64), int8_rewrite=False
    )
    x = near_binary(16)
    same = load_engine(built)
    assert same.metadata.build_options["float_weights_constant"]
    assert "passed" in same.metadata.fidelity["details"]["overridable_weights"]
    assert not same.session.get_overridable_initializers()
    np.testing.assert_array_equal(same.run(x), _run(onnx.load(built), x))

    here = detect()
    other = ("avx2",) if float_kernels(here.flags) == "avx512" else ("avx512bw", "avx2")
    monkeypatch.setattr(onnxruntime_backend, "detect", lambda: CpuInt8(other, here.exact))
    moved = load_engine(built)
    weights = {i.name for i in moved.session.get_overridable_initializers()}
    assert len(weights) == 3
    overridable = overridable_form(onnx.load(built))
    assert weights == {i.name for i in overridable.graph.input} - {"x"}
    np.testing.assert_array_equal(moved.run(x), _run(overridable, x))


def test_float_kernel_families() -> None:
    assert float_kernels(("amx_int8", "avx512_vnni", "avx512bw", "avx2")) == "avx512"
    assert float_kernels(("avx_vnni", "avx2")) == "avx2"
    assert float_kernels(()) == "other"
