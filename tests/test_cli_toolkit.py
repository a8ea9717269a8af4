"""`qatflow quantize`, `export` and `validate` from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tests.model_zoo import images, small_cnn

from qatflow.cli import main


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.keras"
    small_cnn().save(path)
    return path


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "calib.npy"
    np.save(path, images(64, (28, 28, 1)))
    return path


def test_quantize_export_validate(tmp_path, fp32_model, calibration_file, capsys):
    q = tmp_path / "q.keras"
    code = main(
        [
            "quantize",
            str(fp32_model),
            "--output",
            str(q),
            "--calibration-data",
            str(calibration_file),
            "--calibration-method",
            "percentile",
            "--calibration-batches",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    # 5 convs + dense + GAP inputs + both residual Adds
    assert "stem_conv" in out and "case:residual" in out and "9 of 18 layers quantized" in out
    assert q.exists()
    assert (tmp_path / "q.placement.md").read_text().startswith("| layer |")
    calibration = json.loads((tmp_path / "q.calibration.json").read_text())
    assert calibration["method"] == "percentile" and calibration["num_batches"] == 2

    onnx_path = tmp_path / "q.onnx"
    assert main(["export", str(q), "--output", str(onnx_path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "ONNX vs Keras: matches" in out and "data: synthetic" in out
    assert json.loads((tmp_path / "q.validation.json").read_text())["ok"] is True

    assert main(["validate", str(onnx_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["quantized_ops"] == 6


@pytest.mark.parametrize("flag", ["--fold-batch-norm", "--no-fold-batch-norm"])
def test_batch_norm_folding_flag(tmp_path, fp32_model, flag, capsys):
    q = tmp_path / "q.keras"
    assert main(["quantize", str(fp32_model), "--output", str(q), flag]) == 0
    rows = {row["layer"]: row for row in json.loads((tmp_path / "q.placement.json").read_text())}
    why = rows["stem_bn"]["why"]
    if flag == "--fold-batch-norm":
        assert rows["stem_bn"]["layer_class"] == "FoldedBatchNorm" and "folded into" in why
    else:
        assert rows["stem_bn"]["layer_class"] == "BatchNormalization" and "TensorRT folds" in why


@pytest.mark.parametrize(
    ("runtime", "add_inputs"), [("tensorrt", "1 of 2"), ("onnxruntime", "all 2")]
)
def test_runtime_flag_sets_the_residual_placement(tmp_path, fp32_model, runtime, add_inputs):
    q = tmp_path / "q.keras"
    assert main(["quantize", str(fp32_model), "--output", str(q), "--runtime", runtime]) == 0
    rows = json.loads((tmp_path / "q.placement.json").read_text())
    adds = [row for row in rows if row["layer_class"] == "Add"]
    assert adds and all(row["input_quantized"].startswith(add_inputs) for row in adds)
    assert all(row["why"] == f"case:residual for {runtime}" for row in adds)


def test_partial_mode_with_spec_file(tmp_path, fp32_model, calibration_file, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("layers:\n  - name: stem_conv\n")
    q = tmp_path / "partial.keras"
    args = ["quantize", str(fp32_model), "-o", str(q), "--mode", "partial", "--spec", str(spec)]
    assert main([*args, "--calibration-data", str(calibration_file)]) == 0
    assert "1 of 18 layers quantized" in capsys.readouterr().out


def test_uncalibrated_model_cannot_be_exported(tmp_path, fp32_model, capsys):
    q = tmp_path / "q.keras"
    assert main(["quantize", str(fp32_model), "--output", str(q)]) == 0
    assert "not calibrated" in capsys.readouterr().err
    assert main(["export", str(q), "--output", str(tmp_path / "q.onnx")]) == 2
    assert "uncalibrated" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("content", [None, b"this is not a keras file"])
def test_missing_or_corrupt_model_is_named_and_nothing_written(tmp_path, content, capsys):
    model = tmp_path / "broken.keras"
    if content is not None:
        model.write_bytes(content)
    out = tmp_path / "out" / "q.keras"
    assert main(["quantize", str(model), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "broken.keras" in err and "Traceback" not in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_unknown_layer_in_strict_mode_names_the_layer(tmp_path, capsys):
    import keras

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Lambda(lambda t: t * 2.0, name="scale_by_two")(inputs)
    outputs = keras.layers.Conv2D(2, 3)(x)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    out = tmp_path / "q.keras"
    code = main(["quantize", str(path), "--output", str(out), "--strict"])
    # Loading a Lambda layer needs safe_mode off; either way the error names what is wrong.
    assert code == 2
    err = capsys.readouterr().err
    assert "scale_by_two" in err or "lambda" in err.lower()
    assert not out.exists()


def test_validate_exit_code_on_a_broken_graph(tmp_path, capsys):
    import onnx
    from tests.onnx_models import conv_qdq_graph

    path = tmp_path / "bad.onnx"
    onnx.save(conv_qdq_graph(np.full(4, 0.02), quantize_input=False), str(path))
    assert main(["validate", str(path)]) == 1
    assert "only one input is dequantized" in capsys.readouterr().out


def test_help_is_fast_and_explains(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "qatflow", "quantize", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--calibration-data" in result.stdout and "quantization_index" in result.stdout
