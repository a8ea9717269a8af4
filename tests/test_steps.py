"""Every ``qatflow.steps`` function returns its typed result: where its files went, plus the
metadata its callers would otherwise read back from those files."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from tests.chain import write_npz

from qatflow import steps
from qatflow.comparison import Comparison
from qatflow.data import DatasetInfo
from qatflow.errors import (
    DataError,
    ModelError,
    QuantizationError,
    RuntimeBackendError,
    StorageError,
)
from qatflow.evaluation import EvaluationResult
from qatflow.onnx.parity import read_export_check
from qatflow.publish import verdict
from qatflow.runtimes import load_engine

VARIANTS = ("fp32", "ptq_int8", "qat_int8")


@dataclass(frozen=True)
class Run:
    """Each step's result from one tiny run (QAT INT8 reuses the PTQ files, as tests/chain.py)."""

    root: Path
    data: steps.PrepareDataOutputs
    model: steps.PrepareModelOutputs
    quantized: steps.QuantizeOutputs
    finetuned: steps.FinetuneOutputs
    exported: dict[str, steps.ExportOutputs]
    engines: dict[str, steps.EngineOutputs]
    evaluated: dict[str, steps.EvaluateOutputs]
    compared: steps.CompareOutputs
    published: steps.PublishOutputs


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    from qatflow.training import build_demo_model

    root = tmp_path_factory.mktemp("steps")
    data = steps.prepare_data(
        str(write_npz(root / "data.npz", num_classes=4)),
        root / "data.json",
        batch_size=8,
        calibration_size=16,
        image_size=(12, 12),
    )
    steps.save_keras(build_demo_model((12, 12, 1), 4), root / "untrained.keras")
    model = steps.prepare_model(str(root / "untrained.keras"), data.spec, root / "fp32.keras")
    quantized = steps.quantize(
        model.model, root / "ptq.keras", dataset_spec=data.spec, calibration_batches_count=1
    )
    finetuned = steps.finetune(
        quantized.model, data.spec, root / "qat.keras", epochs=1, steps_per_epoch=1
    )
    sources = {"fp32": model.model, "ptq_int8": quantized.model}
    exported, engines, evaluated = {}, {}, {}
    for variant, source in sources.items():
        exported[variant] = steps.export(source, root / f"{variant}.onnx", dataset_spec=data.spec)
        engines[variant] = steps.build_engine(
            exported[variant].onnx, root / f"{variant}.engine.onnx", batch_profile=(1, 4, 16)
        )
        reference = evaluated["fp32"].result if variant != "fp32" else None
        evaluated[variant] = steps.evaluate(
            engines[variant].engine,
            data.spec,
            root / f"{variant}.result.json",
            reference_path=reference,
            latency_iterations=2,
            warmup=1,
            throughput_batch=4,
        )
    exported["qat_int8"], engines["qat_int8"] = exported["ptq_int8"], engines["ptq_int8"]
    evaluated["qat_int8"] = evaluated["ptq_int8"]
    compared = steps.compare(
        {variant: evaluated[variant].result for variant in VARIANTS},
        root / "report",
        placement_summary=quantized.placement_markdown,
        dataset_spec=data.spec,
    )
    with pytest.MonkeyPatch.context() as env:
        env.chdir(root)  # a sqlite store keeps its artifacts under ./mlruns
        published = steps.publish(
            compared.comparison_json.parent,
            {variant: evaluated[variant].result for variant in VARIANTS},
            {variant: exported[variant].onnx for variant in VARIANTS},
            {variant: engines[variant].engine for variant in VARIANTS},
            params={"model": {"uri": "untrained.keras"}},
            output_dir=root / "record",
            placement_summary=quantized.placement_markdown,
            tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
            experiment="steps-test",
            registered_model="steps-test",
            run_name="steps-run",
        )
    return Run(
        root, data, model, quantized, finetuned, exported, engines, evaluated, compared, published
    )


def test_results_are_frozen(run: Run) -> None:
    with pytest.raises(FrozenInstanceError):
        run.data.spec = "elsewhere.json"  # type: ignore[misc]


def test_prepare_data_returns_the_spec_and_its_info(run: Run) -> None:
    assert run.data.spec == run.root / "data.json"
    written = json.loads(Path(run.data.spec).read_text())
    assert run.data.info == DatasetInfo.from_dict(written)
    assert run.data.info.input_shape == (12, 12, 1) and run.data.info.image_size == (12, 12)
    assert run.data.info.num_classes == 4 and run.data.info.kind == "npz"


def test_prepare_model_returns_the_model(run: Run) -> None:
    assert run.model.model == run.root / "fp32.keras" and Path(run.model.model).is_file()
    assert run.model.demo is False


def test_quantize_returns_the_summary_and_side_files(run: Run) -> None:
    placement = json.loads(Path(run.quantized.placement_json).read_text())
    assert placement == run.quantized.summary.to_dict()
    assert run.quantized.calibration == run.root / "ptq.calibration.json"


def test_finetune_returns_the_history(run: Run) -> None:
    tuned = run.finetuned
    assert tuned.model == run.root / "qat.keras"
    assert tuned.history_file == run.root / "qat.history.json"
    assert json.loads(Path(tuned.history_file).read_text()) == {
        "history": tuned.history,
        "best_epoch": tuned.best_epoch,
        "best_val_accuracy": tuned.best_val_accuracy,
        "stopped_early": tuned.stopped_early,
    }
    assert tuned.best_epoch == 1 and len(tuned.history["loss"]) == 1


def test_export_returns_the_validation_and_the_check(run: Run) -> None:
    for variant in ("fp32", "ptq_int8"):
        exported = run.exported[variant]
        assert exported.onnx == run.root / f"{variant}.onnx"
        assert exported.validation == run.root / f"{variant}.validation.json"
        assert json.loads(Path(exported.validation).read_text()) == exported.report.to_dict()
        stored = read_export_check(onnx.load(str(exported.onnx), load_external_data=False))
        assert exported.check == stored and stored is not None and stored["passed"]
    assert run.exported["fp32"].report.qdq_nodes == 0
    assert run.exported["ptq_int8"].report.qdq_nodes > 0 and run.exported["ptq_int8"].report.ok


def test_build_engine_returns_the_engine_and_its_profile(run: Run) -> None:
    built = run.engines["ptq_int8"]
    assert built.engine == run.root / "ptq_int8.engine.onnx"
    assert (built.runtime, built.batch_profile) == ("onnxruntime", (1, 4, 16))
    assert load_engine(built.engine).metadata.batch_profile == built.batch_profile


def test_build_engine_checks_the_validation_split_first_then_the_calibration_split(
    run: Run,
) -> None:
    from qatflow.data import load_dataset_from_spec

    bundle = load_dataset_from_spec(run.data.spec)
    held_out = np.concatenate([images for images, _ in bundle.validation])
    calibration = np.concatenate([images for images, _ in bundle.calibration])
    checked = np.concatenate([images for images, _ in steps.fidelity_data(run.data.spec)])
    np.testing.assert_array_equal(checked, np.concatenate([held_out, calibration]))

    samples = len(held_out) + 4  # all the held-out images, topped up from calibration
    built = steps.build_engine(
        run.exported["ptq_int8"].onnx,
        run.root / "checked.engine.onnx",
        batch_profile=(1, 4, 16),
        dataset_spec=run.data.spec,
        fidelity_samples=samples,
    )
    fidelity = load_engine(built.engine).metadata.fidelity
    assert fidelity["samples"] == samples and fidelity["passed"]
    where = f"the validation, then calibration split of {Path(str(run.data.spec)).name}"
    assert fidelity["data"] == f"{samples} samples of {where}"


def test_build_engine_refuses_a_bad_sample_count_before_any_work(run: Run) -> None:
    output = run.root / "never.engine.onnx"
    with pytest.raises(RuntimeBackendError, match="fidelity_samples must be at least 1, got 0"):
        steps.build_engine(
            run.exported["ptq_int8"].onnx, output, dataset_spec=run.data.spec, fidelity_samples=0
        )
    assert not output.exists()


def test_evaluate_returns_the_evaluation(run: Run) -> None:
    evaluated = run.evaluated["ptq_int8"]
    assert evaluated.result == run.root / "ptq_int8.result.json"
    assert EvaluationResult.load(evaluated.result).to_dict() == evaluated.evaluation.to_dict()
    assert evaluated.evaluation.agreement is not None  # the FP32 reference was used
    assert run.evaluated["fp32"].evaluation.agreement is None


def test_compare_returns_the_comparison_and_report(run: Run) -> None:
    compared = run.compared
    assert compared.comparison_json == run.root / "report" / "comparison.json"
    loaded = Comparison.load_json(compared.comparison_json)
    assert loaded.to_dict() == compared.comparison.to_dict()
    assert compared.comparison.variants == list(VARIANTS)
    assert compared.report.markdown == run.root / "report" / "report.md"
    assert compared.report.html.is_file() and compared.report.plots
    assert all(plot.is_file() for plot in compared.report.plots.values())
    # The dataset spec fills the provenance header's dataset.
    assert "| Dataset | data.npz (local) (npz);" in compared.report.markdown.read_text()


def test_publish_returns_the_record_and_its_verdict(run: Run) -> None:
    published = run.published
    assert published.record == run.root / "record" / "publish.json"
    summary = json.loads(published.record.read_text())
    assert published.outcome == verdict(published.record) == summary["gate"]["outcome"]
    assert published.run_name == "steps-run" and not published.offline
    assert published.parent_run_id == summary["mlflow"]["parent_run_id"]
    assert published.child_run_ids == summary["mlflow"]["child_run_ids"]
    assert set(published.child_run_ids) == set(VARIANTS)
    assert published.registered_version == summary["registry"]["version"] == "1"
    assert published.s3_uris is None
    assert published.report == run.root / "record" / "report"
    assert published.report_html == published.report / "report.html"
    assert published.parent_run_id in published.report_html.read_text()  # the final report


def test_publish_checks_its_inputs_first(run: Run, tmp_path: Path) -> None:
    def publish(output_dir: Path, placement: Path | None = None) -> steps.PublishOutputs:
        return steps.publish(
            run.compared.comparison_json.parent,
            {variant: run.evaluated[variant].result for variant in VARIANTS},
            {variant: run.exported[variant].onnx for variant in VARIANTS},
            {variant: run.engines[variant].engine for variant in VARIANTS},
            params={},
            output_dir=output_dir,
            placement_summary=placement,
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        )

    with pytest.raises(StorageError, match="placement summary .*missing.md"):
        publish(tmp_path / "record", tmp_path / "missing.md")
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="record folder .*file is a file"):
        publish(tmp_path / "file")
    assert not (tmp_path / "record").exists() and not (tmp_path / "mlflow.db").exists()


def test_check_inputs_says_where_each_input_resolved(tmp_path: Path) -> None:
    checked = steps.check_inputs("demo", "fashion-mnist")
    assert checked == steps.CheckedInputs(
        model_uri="demo",
        model_source="demo",
        dataset_uri="fashion-mnist",
        dataset_source="builtin",
        s3_prefix=None,
        spec=None,
    )
    model, data, spec = tmp_path / "m.keras", tmp_path / "d.npz", tmp_path / "spec.yaml"
    for path in (model, data, spec):
        path.write_bytes(b"not read by the check")
    checked = steps.check_inputs(str(model), str(data), s3_prefix="", spec_path=str(spec))
    assert (checked.model_source, checked.dataset_source) == ("local", "local")
    assert (checked.spec, checked.s3_prefix) == (str(spec), None)


def test_check_inputs_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="placement spec not found: .*nope.yaml"):
        steps.check_inputs("demo", "fashion-mnist", spec_path=str(tmp_path / "nope.yaml"))
    with pytest.raises(DataError, match="dataset_uri is empty"):
        steps.check_inputs("demo", "")
    with pytest.raises(ModelError, match="missing.keras"):
        steps.check_inputs(str(tmp_path / "missing.keras"), "fashion-mnist")


def test_quantize_refuses_an_unknown_runtime_before_loading(tmp_path: Path) -> None:
    # The model file does not exist: the runtime is checked first, and nothing is written.
    with pytest.raises(QuantizationError, match=r"runtime \(--runtime\) .*'openvino'"):
        steps.quantize(tmp_path / "missing.keras", tmp_path / "q.keras", runtime="openvino")
    assert not any(tmp_path.iterdir())
