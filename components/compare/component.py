"""KFP component ``compare``: the FP32 / PTQ INT8 / QAT INT8 table, the gate and the report."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output

from qatflow.images import TENSORFLOW_IMAGE


@dsl.component(base_image=TENSORFLOW_IMAGE, install_kfp_package=False)
def compare(
    fp32_result: Input[Artifact],
    ptq_result: Input[Artifact],
    qat_result: Input[Artifact],
    placement: Input[Markdown],
    dataset: Input[Dataset],
    report: Output[Artifact],
    report_html: Output[HTML],
    summary: Output[Metrics],
    accuracy_gate: float,
    model_uri: str = "",
    run_name: str = "",
    run_id: str = "",
) -> None:
    """Compare the three evaluations against FP32, judge them by the accuracy gate
    (``accuracy_gate`` top-1 points) and write the report.

    ``report`` is a folder: ``comparison.json``, ``report.md``, ``report.html``,
    ``plots/*.png`` and ``report.json`` (for ``publish`` to render it again). ``report_html``
    is the self-contained HTML page (plots embedded) for the KFP UI; ``summary`` holds each
    variant's top-1 (%), delta (top-1 points), speedup and gate verdict (1 passed, 0 refused;
    its file: the comparison JSON). ``dataset`` (the spec), ``model_uri``, ``run_name`` and
    ``run_id`` fill the report's provenance header.
    """
    import shutil

    from qatflow import steps
    from qatflow.report.provenance import RunInfo
    from qatflow.tracking import HEADLINE_METRICS

    compared = steps.compare(
        {"fp32": fp32_result.path, "ptq_int8": ptq_result.path, "qat_int8": qat_result.path},
        report.path,
        placement_summary=placement.path,
        accuracy_gate=accuracy_gate,
        dataset_spec=dataset.path,
        run_info=RunInfo(
            model_uri=model_uri or None, run_name=run_name or None, run_id=run_id or None
        ),
    )
    shutil.copyfile(compared.report.html, report_html.path)
    # A file behind the metrics, as kfp.local's cache wants.
    shutil.copyfile(compared.comparison_json, summary.path)
    comparison = compared.comparison
    for row in comparison.rows:
        metrics = row.tracking_metrics()
        for key in HEADLINE_METRICS:
            summary.log_metric(f"{row.variant}.{key}", metrics[key])
    for variant, verdict in comparison.verdicts().items():
        summary.log_metric(f"{variant}.gate_passed", float(verdict.passed))
    report.metadata["file"] = compared.comparison_json.name
