"""KFP component ``evaluate``: accuracy, latency, throughput and size of one engine."""

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from qatflow.images import TENSORRT_IMAGE


@dsl.component(base_image=TENSORRT_IMAGE, install_kfp_package=False)
def evaluate(
    engine: Input[Model],
    dataset: Input[Dataset],
    result: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    variant: str,
    latency_iterations: int = 200,
    max_batches: int = 0,
    reference: Input[Artifact] | None = None,
) -> None:
    """Evaluate the engine on the dataset's test split (``max_batches`` 0 = all of it).

    ``result`` is the evaluation JSON (predictions included). ``reference``, the FP32 result,
    adds top-1 agreement. ``metrics`` and ``confusion`` are what the KFP UI shows.
    """
    import os

    from qatflow import steps
    from qatflow.comparison import own_metrics
    from qatflow.gate import points
    from qatflow.tracking import AGREEMENT_METRIC

    evaluation = steps.evaluate(
        os.path.join(engine.path, engine.metadata["file"]),
        dataset.path,
        result.path,
        reference_path=reference.path if reference is not None else None,
        latency_iterations=latency_iterations,
        max_batches=max_batches or None,
    ).evaluation
    agreement = evaluation.agreement
    values = {
        **own_metrics(evaluation),
        AGREEMENT_METRIC: None if agreement is None else points(agreement),
    }
    for name, value in values.items():
        if value is not None:
            metrics.log_metric(name, value)
    confusion.log_confusion_matrix(
        list(evaluation.class_names), evaluation.metrics.confusion_matrix
    )
    result.metadata.update(
        {"variant": variant, "runtime": evaluation.runtime, "device": evaluation.device}
    )
