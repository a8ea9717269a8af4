"""ONNX Runtime engines: the encoding chosen for the CPU, the fidelity gate, the load check.

Both encodings are forced on whatever CPU runs the suite: an encoding this CPU computes exactly
must build and match the reference; one it does not must be refused with nothing written. The
last test runs the same checks on an emulated AVX2 CPU without VNNI (qemu-user), where U8S8
kernels saturate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from tests.int8_models import batch_norm_chain, coarse_bias_cnn, near_binary, saturating_cnn

from qatflow.errors import RuntimeBackendError
from qatflow.evaluation.predictors import engine_provenance
from qatflow.onnx.reference import run_reference
from qatflow.runtimes import build_engine, load_engine, onnxruntime_backend
from qatflow.runtimes.cpu_int8 import CpuInt8, detect
from qatflow.runtimes.fidelity import compare_outputs, ideal_integer_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "qdq.onnx"
    onnx.save(saturating_cnn(), path)
    return path


@pytest.mark.parametrize("encoding", ["u8s8", "u8u8"])
def test_forced_encoding_is_exact_here_or_refused(
    source: Path, tmp_path: Path, encoding: str
) -> None:
    out = tmp_path / "out" / f"{encoding}.onnx"
    data = near_binary(128)
    if encoding not in detect().exact:
        with pytest.raises(RuntimeBackendError, match="not exact on this CPU") as info:
            build_engine(source, out, fidelity_data=data, encoding=encoding)
        assert detect().isa in str(info.value) and "--encoding auto or u8u8" in str(info.value)
        assert not out.exists()
        return
    build_engine(source, out, fidelity_data=data, encoding=encoding)
    engine = load_engine(out)
    metadata = engine.metadata
    assert metadata.build_options["encoding"] == encoding
    assert metadata.device == detect().to_dict()
    assert metadata.fidelity["passed"] and metadata.fidelity["samples"] == 128
    reference = run_reference(saturating_cnn(), {"x": data})[0]
    assert compare_outputs(reference, engine.run(data), data="test").passed
    assert metadata.build_options["optimized_ops"].get("QLinearConv") == 1


def test_any_number_of_samples_is_checked(source: Path, tmp_path: Path) -> None:
    engine = build_engine(source, tmp_path / "e.onnx", fidelity_data=near_binary(20))
    assert load_engine(engine).metadata.fidelity["samples"] == 20


def test_auto_picks_the_exact_fast_encoding(source: Path, tmp_path: Path) -> None:
    build_engine(source, tmp_path / "auto.onnx")  # no data: synthetic inputs, kernels only
    metadata = load_engine(tmp_path / "auto.onnx").metadata
    assert metadata.build_options["encoding"] == detect().best_encoding()
    assert metadata.fidelity["passed"] and metadata.fidelity["data"].startswith("synthetic")


def test_float_models_get_no_encoding_but_are_checked(tmp_path: Path) -> None:
    from tests.onnx_models import make_model, save_model

    path = save_model(make_model(), tmp_path / "fp32.onnx")
    metadata = load_engine(build_engine(path, tmp_path / "e.onnx")).metadata
    assert metadata.build_options["encoding"] is None and metadata.fidelity["passed"]


def test_loading_where_the_encoding_saturates_is_refused(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = build_engine(source, tmp_path / "e.onnx", encoding="u8u8")
    model = onnx.load(engine)
    options = next(p for p in model.metadata_props if p.key == "qatflow.build_options")
    options.value = json.dumps({**json.loads(options.value), "encoding": "u8s8"})
    onnx.save(model, engine)
    avx2 = CpuInt8(("avx2",), ("u8u8",))
    monkeypatch.setattr(onnxruntime_backend, "detect", lambda: avx2)
    with pytest.raises(RuntimeBackendError, match="saturate on this CPU") as info:
        load_engine(engine)
    message = str(info.value)
    assert "avx2 (no VNNI)" in message and detect().isa in message
    assert f"qatflow build-engine {source.resolve()} --output {engine}" in message


def negate_conv_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A graph pass that negates every convolution weight, int8 (``q``) or, under u8u8, uint8
    (``q + 128``): a stand-in for a wrong kernel on any CPU."""
    for init in model.graph.initializer:
        value = onnx.numpy_helper.to_array(init)
        if value.ndim != 4 or value.dtype not in (np.int8, np.uint8):
            continue
        negated = -value if value.dtype == np.int8 else (256 - value.astype(np.int16))
        init.CopyFrom(onnx.numpy_helper.from_array(negated.astype(value.dtype), init.name))
    return model


def test_a_failing_engine_is_rebuilt_then_refused_and_nothing_is_written(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass that corrupts the weights stands in for a wrong kernel."""
    attempts: list[str] = []
    real_passes = onnxruntime_backend.ort_graph_passes

    def passes(model: onnx.ModelProto, **options: object) -> list[object]:
        integer = options.get("integer_convs")
        rewrite = "/".join(map(str, options["rewrite"]))  # type: ignore[call-overload]
        attempts.append(rewrite if integer is None else f"{rewrite}/{len(integer)}")  # type: ignore[arg-type]
        return [*real_passes(model, **options), ("negate", negate_conv_weights)]

    monkeypatch.setattr(onnxruntime_backend, "ort_graph_passes", passes)
    out = tmp_path / "out" / "e.onnx"
    with pytest.raises(RuntimeBackendError, match="No engine was written") as refused:
        build_engine(source, out, fidelity_data=near_binary(64))
    # fast, exact, then (one integer Conv: nothing to bisect) the exact one with none in integer
    assert attempts == ["exact/calibrated/True", "exact/none/True", "exact/none/True/0"]
    assert not out.exists()
    # An ideal integer engine of the same model passes: the fault is the engine's, not the net's.
    assert "an ideal integer engine of this model" in str(refused.value)
    assert "so it passes" in str(refused.value)


def shift_outputs(by: float):  # type: ignore[no-untyped-def]
    """A graph pass adding ``by`` to every output value: an error of exactly ``by`` on every
    sample that moves no top-1."""

    def shift(model: onnx.ModelProto) -> onnx.ModelProto:
        output = model.graph.output[0].name
        shifted = f"{output}_before_shift"
        for node in model.graph.node:
            node.output[:] = [shifted if name == output else name for name in node.output]
        constant = onnx.numpy_helper.from_array(np.array(by, np.float32), f"{output}_shift")
        model.graph.initializer.append(constant)
        model.graph.node.append(onnx.helper.make_node("Add", [shifted, constant.name], [output]))
        return model

    return shift


def test_the_fast_rewrite_needs_room_under_the_tolerance(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its requantization points are calibrated on the check's own samples, so it must pass
    with p99 within FITTED_REWRITE_MARGIN of the tolerance; at 90 % of it the exact rewrite is
    built instead (on the demo QAT model, a fast engine at 82 % agreed on 99.84 % of 9,904
    decided held-out samples, the exact one on all)."""
    data = near_binary(64)
    reference = run_reference(onnx.load(source), {"x": data})[0]
    tolerance = compare_outputs(reference, reference, data="x").tolerance
    real_passes = onnxruntime_backend.ort_graph_passes

    def passes(model: onnx.ModelProto, **options: object) -> list[object]:
        fast = options["rewrite"] == onnxruntime_backend.FAST_REWRITE
        shift = [("shift", shift_outputs(0.9 * tolerance))] * fast
        return [*real_passes(model, **options), *shift]

    monkeypatch.setattr(onnxruntime_backend, "ort_graph_passes", passes)
    engine = load_engine(build_engine(source, tmp_path / "e.onnx", fidelity_data=data))
    options = engine.metadata.build_options
    assert options["rewrite"]["requantize"] == "none"
    [refused] = options["refused_rewrites"]
    assert refused["requantize"] == "calibrated" and refused["decided_agreement"] == 1.0
    required = onnxruntime_backend.FITTED_REWRITE_MARGIN * tolerance
    assert refused["p99_required"] == pytest.approx(required, rel=1e-6)
    assert required < refused["p99_abs_error"] <= tolerance  # it passed, without the room


def test_as_many_of_the_last_convs_run_in_integer_as_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in for a net that amplifies the rounding of each integer Conv: weights corrupted
    whenever more than one Conv runs in integer. The build bisects to the last one."""
    source = tmp_path / "chain.onnx"
    onnx.save(batch_norm_chain(3), source)
    real_passes = onnxruntime_backend.ort_graph_passes
    tried: list[object] = []

    def passes(model: onnx.ModelProto, **options: object) -> list[object]:
        integer = options.get("integer_convs")
        tried.append(None if integer is None else len(integer))  # type: ignore[arg-type]
        corrupt = integer is None or len(integer) > 1  # type: ignore[arg-type]
        return [*real_passes(model, **options), *([("negate", negate_conv_weights)] * corrupt)]

    monkeypatch.setattr(onnxruntime_backend, "ort_graph_passes", passes)
    engine = load_engine(build_engine(source, tmp_path / "e.onnx", fidelity_data=near_binary(64)))
    assert tried == [None, None, 1, 2]  # fast, exact, then bisection over 1..2 of 3
    options = engine.metadata.build_options
    assert _rewrite(options) == {
        "relu": "exact",
        "requantize": "none",
        "fold_affine": True,
        "integer_last": 1,
        "integer_candidates": 3,
    }
    refused = [(r["requantize"], r.get("integer_last")) for r in options["refused_rewrites"]]
    assert refused == [("calibrated", None), ("none", None), ("none", 2)]
    assert engine.metadata.fidelity["passed"]
    # One Conv folded and in integer, the other two float beside their batch norms.
    assert engine.metadata.build_options["optimized_ops"].get("QLinearConv") == 1
    assert engine.metadata.build_options["optimized_ops"].get("BatchNormalization") == 2


def test_a_model_that_integer_rounding_moves_keeps_its_conv_float_and_says_why(
    tmp_path: Path,
) -> None:
    """Every integer engine rounds a Conv bias to its int32 unit; here that alone moves the
    logits past the tolerance. The Conv is kept float, and the metadata says that an ideal
    integer engine fails too (the network, not the kernels)."""
    source = tmp_path / "coarse.onnx"
    onnx.save(coarse_bias_cnn(), source)
    engine = load_engine(build_engine(source, tmp_path / "e.onnx", fidelity_data=near_binary(64)))
    options = engine.metadata.build_options
    assert options["rewrite"]["integer_last"] == 0
    ops = options["optimized_ops"]
    assert ops.get("Conv") == 1 and "QLinearConv" not in ops
    assert engine.metadata.fidelity["passed"]
    assert not engine.metadata.fidelity["details"]["ideal_integer"]["passed"]
    assert "fails too: the network amplifies rounding" in ideal_integer_line(
        engine.metadata.fidelity["details"]["ideal_integer"]
    )


def _rewrite(build_options: dict[str, Any]) -> dict[str, Any]:
    """The rewrite an engine's build kept, without its float-weight form: the float Convs read
    constant weights wherever this CPU's float kernels round the engine within the margin."""
    rewrite = dict(build_options["rewrite"])
    assert rewrite.pop("float_weights", "constant") == "constant"
    return rewrite


def test_a_fallback_engine_records_the_rewrites_it_refused(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights corrupted whenever every Conv runs in integer: the float-Conv rewrite is built
    and its metadata says which faster rewrites were refused, and how far they agreed."""
    real_passes = onnxruntime_backend.ort_graph_passes

    def passes(model: onnx.ModelProto, **options: object) -> list[object]:
        corrupt = options.get("integer_convs") is None
        return [*real_passes(model, **options), *([("negate", negate_conv_weights)] * corrupt)]

    monkeypatch.setattr(onnxruntime_backend, "ort_graph_passes", passes)
    engine = load_engine(build_engine(source, tmp_path / "e.onnx", fidelity_data=near_binary(64)))
    options = engine.metadata.build_options
    assert _rewrite(options) == {
        "relu": "exact",
        "requantize": "none",
        "fold_affine": True,
        "integer_last": 0,
        "integer_candidates": 1,
    }
    refused = options["refused_rewrites"]
    assert [(r["requantize"], r.get("integer_last")) for r in refused] == [
        ("calibrated", None),
        ("none", None),
    ]
    assert all(r["decided_agreement"] < 0.999 for r in refused)
    assert engine.metadata.fidelity["passed"]
    ideal = engine.metadata.fidelity["details"]["ideal_integer"]
    assert ideal["passed"] and ideal["decided_agreement"] == 1.0
    # What evaluate, the comparison table and the report say of this engine.
    fallback = engine_provenance(engine.metadata)[1]["fallback"]  # type: ignore[index]
    assert fallback == "2 faster rewrite(s) refused: they failed the fidelity check"
    network = {**engine.metadata.fidelity, "details": {"ideal_integer": {**ideal, "passed": False}}}
    renamed = dataclasses.replace(engine.metadata, fidelity=network)
    assert "integer rounding alone" in engine_provenance(renamed)[1]["fallback"]  # type: ignore[index]


EMULATED = """
import json, sys
import onnx
sys.path.insert(0, {root!r})
from tests.int8_models import batch_norm_chain, coarse_bias_cnn, near_binary, saturating_cnn
from qatflow.errors import RuntimeBackendError
from qatflow.evaluation.predictors import engine_provenance
from qatflow.runtimes import build_engine, load_engine
from qatflow.runtimes.cpu_int8 import detect
from qatflow.runtimes.fidelity import compare_outputs, first_divergence
from qatflow.onnx.ort_int8 import rewrite_for_ort_int8
from qatflow.onnx.reference import run_optimized, run_reference
out = {{"isa": detect().isa, "exact": list(detect().exact)}}
onnx.save(saturating_cnn(), sys.argv[1] + "/qdq.onnx")
try:
    build_engine(sys.argv[1] + "/qdq.onnx", sys.argv[1] + "/u8s8.onnx",
                 fidelity_data=near_binary(64), encoding="u8s8")
    out["u8s8"] = "built"
except RuntimeBackendError as exc:
    out["u8s8"] = str(exc)
# What the gate would see in a u8s8 engine here: the saturating convolution, named.
prepared = rewrite_for_ort_int8(saturating_cnn())
out["divergence"] = first_divergence(prepared, "x", near_binary(32))
report = compare_outputs(run_reference(saturating_cnn(), {{"x": near_binary(64)}})[0],
                         run_optimized(prepared, {{"x": near_binary(64)}})[0], data="u8s8")
out["u8s8_passed"] = report.passed
build_engine(sys.argv[1] + "/qdq.onnx", sys.argv[1] + "/auto.onnx", fidelity_data=near_binary(64))
out["auto"] = load_engine(sys.argv[1] + "/auto.onnx").metadata.build_options["encoding"]
try:
    load_engine(sys.argv[2])
    out["native"] = "loaded"
except RuntimeBackendError as exc:
    out["native"] = str(exc)
print(json.dumps(out))
"""


def test_on_an_emulated_avx2_cpu_u8s8_is_refused_and_auto_is_exact(
    source: Path, tmp_path: Path
) -> None:
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-user is needed for the AVX2 test: `make setup` installs it"
    native = build_engine(source, tmp_path / "native.onnx")  # auto on this CPU
    script = tmp_path / "emulated.py"
    script.write_text(EMULATED.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [qemu, "-cpu", "Haswell", sys.executable, str(script), str(tmp_path), str(native)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["isa"] == "avx2 (no VNNI)" and result["exact"] == ["u8u8"]
    assert "encoding u8s8 is not exact on this CPU (avx2 (no VNNI))" in result["u8s8"]
    assert result["u8s8_passed"] is False  # the gate refuses saturated U8S8 kernels
    name, share = result["divergence"]  # localized at the Q the rewrite puts on the conv output
    assert name == "c_QuantizeLinear_1" and share > 0.01
    assert result["auto"] == "u8u8"
    if "u8s8" in detect().exact:  # built here as u8s8: refused on the AVX2 CPU
        assert "saturate on this CPU (avx2 (no VNNI)" in result["native"]
    else:
        assert result["native"] == "loaded"
