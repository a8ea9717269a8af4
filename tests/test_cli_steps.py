"""The pipeline's steps by hand from the command line, as `qatflow finetune --help` shows them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.model_zoo import small_cnn

from qatflow.cli import main
from qatflow.comparison import Comparison
from qatflow.evaluation import EvaluationResult
from qatflow.runtimes import load_engine


def test_the_whole_flow_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def qatflow(*argv: str) -> str:
        assert main([str(a) for a in argv]) == 0, argv
        return capsys.readouterr().out

    data = tmp_path / "data.json"
    assert "wrote" in qatflow(
        "prepare-data", "fashion-mnist", "-o", data, "--limit", 256, "--batch-size", 32,
        "--calibration-size", 64,
    )  # fmt: skip
    assert json.loads(data.read_text())["num_classes"] == 10

    small_cnn().save(tmp_path / "untrained.keras")
    fp32 = tmp_path / "fp32.keras"
    qatflow("prepare-model", tmp_path / "untrained.keras", "--dataset", data, "-o", fp32)
    ptq = tmp_path / "ptq.keras"
    qatflow("quantize", fp32, "--calibration-data", data, "--calibration-batches", 2, "-o", ptq)
    qat = tmp_path / "qat.keras"
    out = qatflow(
        "finetune", ptq, "--dataset", data, "-o", qat, "--epochs", 1, "--steps-per-epoch", 2,
        "--optimizer", "adam",
    )  # fmt: skip
    assert "qat.history.json" in out
    assert len(json.loads((tmp_path / "qat.history.json").read_text())["history"]["loss"]) == 1

    results = {}
    for name, model in (("fp32", fp32), ("qat_int8", qat)):
        onnx_path, engine = tmp_path / f"{name}.onnx", tmp_path / f"{name}.engine.onnx"
        qatflow("export", model, "-o", onnx_path)
        # The INT8 engine is checked on 48 images: the dataset's validation split, then
        # calibration.
        check = ["--dataset", data, "--fidelity-samples", 48] if name == "qat_int8" else []
        qatflow("build-engine", onnx_path, "-o", engine, "--batch-profile", 1, 4, 32, *check)
        results[name] = tmp_path / f"{name}.json"
        reference = ["--reference", results["fp32"]] if name != "fp32" else []
        out = qatflow(
            "evaluate", engine, "--dataset", data, "-o", results[name], "--latency-iterations", 5,
            "--warmup", 1, "--throughput-batch", 8, "--threads", 1, "--max-batches", 2, *reference,
        )  # fmt: skip
        assert "top-1" in out and "latency p50" in out and "onnxruntime" in out
    assert load_engine(tmp_path / "qat_int8.engine.onnx").metadata.fidelity["samples"] == 48
    qat_result = EvaluationResult.load(results["qat_int8"])
    assert qat_result.num_samples == 64 and qat_result.agreement is not None

    # A .keras model evaluates too (on TensorFlow) and agrees with its own ONNX Runtime engine.
    keras_result = tmp_path / "fp32_keras.json"
    qatflow(
        "evaluate", fp32, "--dataset", data, "-o", keras_result, "--latency-iterations", 3,
        "--warmup", 1, "--throughput-batch", 8, "--max-batches", 2, "--reference", results["fp32"],
    )  # fmt: skip
    evaluated = EvaluationResult.load(keras_result)
    assert evaluated.runtime.startswith("tensorflow") and evaluated.agreement >= 0.95
    assert evaluated.size_bytes == fp32.stat().st_size

    report = tmp_path / "report"
    out = qatflow(
        "compare", f"fp32={results['fp32']}", f"qat_int8={results['qat_int8']}", "-o", report,
        "--placement", tmp_path / "ptq.placement.md",
    )  # fmt: skip
    assert "qat_int8" in out
    assert Comparison.load_json(report / "comparison.json").variants == ["fp32", "qat_int8"]
    assert "Q/DQ placement" in (report / "report.md").read_text()


def test_compare_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "fp32.json", "-o", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "expected VARIANT=RESULT.json, got 'fp32.json'" in capsys.readouterr().err

    assert main(["compare", "fp32=a.json", "fp32=b.json", "-o", str(tmp_path)]) == 2
    assert "variant 'fp32' is given twice" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_missing_dataset_spec_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small_cnn().save(tmp_path / "m.keras")
    code = main(
        ["finetune", str(tmp_path / "m.keras"), "--dataset", str(tmp_path / "nope.json"),
         "-o", str(tmp_path / "out.keras")]
    )  # fmt: skip
    assert code == 2
    assert "nope.json" in capsys.readouterr().err
    assert not (tmp_path / "out.keras").exists()
