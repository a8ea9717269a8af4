"""evaluate: the result JSON, the metrics and the confusion matrix the KFP UI shows."""

import json
from pathlib import Path

import pytest
from kfp import dsl
from qatflow_components.evaluate.component import evaluate
from tests.chain import Chain, artifact

from qatflow.evaluation import EvaluationResult
from qatflow.tracking import OWN_METRICS


def _evaluate(
    chain: Chain, tmp_path: Path, variant: str, **extra: object
) -> dict[str, dsl.Artifact]:
    outputs = {
        "result": artifact(dsl.Artifact, tmp_path / f"{variant}-result"),
        "metrics": artifact(dsl.Metrics, tmp_path / f"{variant}-metrics"),
        "confusion": artifact(dsl.ClassificationMetrics, tmp_path / f"{variant}-confusion"),
    }
    evaluate.python_func(
        engine=artifact(dsl.Model, chain.engines[variant], file="engine.onnx"),
        dataset=artifact(dsl.Dataset, chain.dataset),
        variant=variant,
        latency_iterations=5,
        max_batches=2,
        **outputs,
        **extra,
    )
    return outputs


def test_fp32_evaluation(chain: Chain, tmp_path: Path) -> None:
    outputs = _evaluate(chain, tmp_path, "fp32")
    result = EvaluationResult.load(outputs["result"].path)
    assert result.num_samples == 32  # max_batches=2 of 16
    assert result.agreement is None
    metrics = outputs["metrics"].metadata
    assert metrics["accuracy_top1_pct"] == pytest.approx(100 * result.top1)
    assert set(metrics) == set(OWN_METRICS)  # the names MLflow logs, without agreement
    matrix = outputs["confusion"].metadata["confusionMatrix"]
    assert len(matrix["annotationSpecs"]) == 10
    assert sum(sum(row["row"]) for row in matrix["rows"]) == 32
    assert outputs["result"].metadata["variant"] == "fp32"


def test_agreement_with_reference(chain: Chain, tmp_path: Path) -> None:
    reference = artifact(dsl.Artifact, tmp_path / "reference")
    fp32 = json.loads(chain.results["fp32"].read_text())
    reference_32 = {**fp32, "predictions": fp32["predictions"][:32]}
    Path(reference.path).write_text(json.dumps(reference_32))
    outputs = _evaluate(chain, tmp_path, "ptq_int8", reference=reference)
    assert 0.0 <= outputs["metrics"].metadata["agreement_vs_fp32_pct"] <= 100.0
