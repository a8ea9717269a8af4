"""ONNX export and TensorRT-rule validation."""

from __future__ import annotations

import keras
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tests.model_zoo import images, separable_transpose_model, small_cnn
from tests.onnx_models import conv_qdq_graph

import qatflow
from qatflow.errors import ExportError
from qatflow.onnx.graph import GraphIndex
from qatflow.onnx.reference import run_reference


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    """The exported QDQ model as float math: what Keras' fake quantization computes, on any CPU
    (ORT's default kernels for a plain QDQ graph depend on the instruction set)."""
    model = onnx.load(str(path))
    return run_reference(model, {model.graph.input[0].name: x})[0]


def quantized(model: keras.Model, x: np.ndarray) -> keras.Model:
    qmodel = qatflow.quantize_model(model)
    qatflow.calibrate(qmodel, x, num_batches=2, batch_size=max(1, len(x) // 2))
    return qmodel


def test_small_model_export_matches_keras_with_dynamic_batch(tmp_path):
    x = images(6, (28, 28, 1))
    qmodel = quantized(small_cnn(), x)
    path = qatflow.export_onnx(qmodel, tmp_path / "q.onnx")
    for batch in (x[:1], x):
        np.testing.assert_allclose(run_onnx(path, batch), qmodel(batch), atol=1e-4)
    proto = onnx.load(str(path))
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert not batch_dim.HasField("dim_value")
    report = qatflow.validate_onnx(path)
    assert report.ok, str(report)
    assert len(report.quantized_ops) == 6 and report.float_ops == []  # 5 convs + dense


def test_weights_become_int8_initializers_feeding_dq_with_the_right_axis(tmp_path):
    x = images(4, (32, 32, 3))
    qmodel = quantized(separable_transpose_model(), x)
    path = qatflow.export_onnx(qmodel, tmp_path / "sep.onnx")
    proto = onnx.load(str(path))
    index = GraphIndex(proto.graph)
    expected_axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}
    weighted = [n for n in proto.graph.node if n.op_type in expected_axis]
    # separable = depthwise + pointwise conv, depthwise, down conv, transpose conv, dense
    assert sorted(n.op_type for n in weighted) == ["Conv"] * 4 + ["ConvTranspose", "MatMul"]
    for node in weighted:
        for name in node.input[:2]:
            assert index.producer[name].op_type == "DequantizeLinear", node.name
        weight_dq = index.producer[node.input[1]]
        assert index.constant(weight_dq.input[0]).dtype == np.int8
        axis = next(a.i for a in weight_dq.attribute if a.name == "axis")
        assert axis == expected_axis[node.op_type], node.name
    out = run_onnx(path, x)
    reference = qmodel(x).numpy()
    assert np.abs(out - reference).max() < 1e-3
    assert (out.argmax(1) == reference.argmax(1)).all()


def test_fp32_model_exports_the_same_way(tmp_path):
    model = small_cnn()
    x = images(3, (28, 28, 1))
    path = qatflow.export_onnx(model, tmp_path / "fp32.onnx")
    np.testing.assert_allclose(run_onnx(path, x), model(x), atol=1e-4)
    report = qatflow.validate_onnx(path)
    assert report.ok and report.qdq_nodes == 0 and len(report.float_ops) == 6


def test_dead_channel_exports_with_positive_scales(tmp_path):
    model = small_cnn()
    conv = model.get_layer("stem_conv")
    kernel, bias = conv.get_weights()
    kernel[..., 3] = 0.0  # a dead output channel
    conv.set_weights([kernel, bias])
    x = images(4, (28, 28, 1))
    qmodel = quantized(model, x)
    path = qatflow.export_onnx(qmodel, tmp_path / "dead.onnx")
    proto = onnx.load(str(path))
    scales = [
        numpy_helper.to_array(init)
        for init in proto.graph.initializer
        if init.data_type == TensorProto.FLOAT and "scale" in init.name
    ]
    assert scales and all((s > 0).all() and np.isfinite(s).all() for s in scales)
    np.testing.assert_allclose(run_onnx(path, x), qmodel(x), atol=1e-4)


def test_uncalibrated_model_is_refused_and_nothing_written(tmp_path):
    qmodel = qatflow.quantize_model(small_cnn())
    target = tmp_path / "never.onnx"
    with pytest.raises(ExportError, match="uncalibrated.*stem_conv:0"):
        qatflow.export_onnx(qmodel, target)
    assert list(tmp_path.iterdir()) == []


def test_old_opset_is_refused(tmp_path):
    with pytest.raises(ExportError, match="opset 11"):
        qatflow.export_onnx(small_cnn(), tmp_path / "x.onnx", opset=11)


# --- validate_onnx on hand-made graphs that break TensorRT's rules ---------------------


def test_validator_accepts_a_good_graph():
    report = qatflow.validate_onnx(conv_qdq_graph(np.full(4, 0.02)))
    assert report.ok, str(report)
    assert report.quantized_ops == ["conv"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_scale": np.array([0.02, 0.0, 0.02, 0.02])}, "positive and finite"),
        ({"weight_scale": np.array([0.02, np.inf, 0.02, 0.02])}, "positive and finite"),
        ({"weight_scale": np.full(4, 0.02), "zero_point_type": np.uint8}, "int8"),
        ({"weight_scale": np.full(2, 0.02), "axis": 1}, "axis is 1, TensorRT expects 0"),
        ({"weight_scale": np.full(4, 0.02), "quantize_input": False}, "only one input"),
        ({"weight_scale": np.full(4, 0.02), "output_qdq": True}, "must not sit on outputs"),
    ],
)
def test_validator_rejects_broken_graphs(kwargs, message):
    report = qatflow.validate_onnx(conv_qdq_graph(**kwargs))
    assert not report.ok
    assert any(message in e for e in report.errors), report.errors


def test_validator_names_a_corrupt_or_missing_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ExportError, match="bad.onnx is not a valid ONNX model"):
        qatflow.validate_onnx(bad)
    with pytest.raises(ExportError, match="missing.onnx does not exist"):
        qatflow.validate_onnx(tmp_path / "missing.onnx")


def test_export_records_its_check_against_keras(tmp_path):
    """The export compares the ONNX with the Keras model and stores the verdict in the file."""
    from qatflow.onnx.parity import read_export_check

    x = images(32, (28, 28, 1))
    qmodel = quantized(small_cnn(), x)
    path = qatflow.export_onnx(qmodel, tmp_path / "q.onnx", check_data=x)
    record = read_export_check(onnx.load(str(path)))
    assert record is not None and record["checked"] and record["passed"]
    assert record["samples"] == 32 and record["data"] == "32 samples of the given data"
    synthetic = read_export_check(onnx.load(str(qatflow.export_onnx(qmodel, tmp_path / "s.onnx"))))
    assert synthetic is not None and synthetic["data"].startswith("synthetic")


def test_an_export_that_disagrees_with_keras_is_recorded_and_warned(tmp_path, monkeypatch, caplog):
    """A conversion that changes the math (here: a shift added to the logits) is not silent."""
    from qatflow.onnx import export, parity

    real = export.to_onnx_proto

    def wrong(model, opset=17):
        proto = real(model, opset)
        output = proto.graph.output[0].name
        last = next(n for n in proto.graph.node if output in n.output)
        last.output[0] = "raw_logits"
        shift = numpy_helper.from_array(np.arange(10, dtype=np.float32), "class_shift")
        proto.graph.initializer.append(shift)
        proto.graph.node.append(helper.make_node("Add", ["raw_logits", "class_shift"], [output]))
        return proto

    monkeypatch.setattr(export, "to_onnx_proto", wrong)
    x = images(32, (28, 28, 1))
    with caplog.at_level("WARNING", logger="qatflow.export"):
        path = qatflow.export_onnx(quantized(small_cnn(), x), tmp_path / "q.onnx", check_data=x)
    record = parity.read_export_check(onnx.load(str(path)))
    assert record is not None and not record["passed"]
    assert "disagrees with the Keras model" in caplog.text
