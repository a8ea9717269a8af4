"""KFP component ``compare``: the FP32 / PTQ INT8 / QAT INT8 table and the report."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Output

from qatflow.images import TENSORFLOW_IMAGE


@dsl.component(base_image=TENSORFLOW_IMAGE, install_kfp_package=False)
def compare(
    fp32_result: Input[Artifact],
    ptq_result: Input[Artifact],
    qat_result: Input[Artifact],
    placement: Input[Markdown],
    report: Output[Artifact],
    report_html: Output[HTML],
    summary: Output[Metrics],
) -> None:
    """Compare the three evaluations against FP32 and write the report.

    ``report`` is a folder: ``comparison.json``, ``report.md``, ``report.html`` and
    ``plots/*.png``. ``report_html`` is the self-contained HTML page (plots embedded) for the
    KFP UI; ``summary`` holds each variant's top-1, delta and speedup (its file: the
    comparison JSON).
    """
    import shutil

    from qatflow import steps
    from qatflow.comparison import Comparison

    path = steps.compare(
        {"fp32": fp32_result.path, "ptq_int8": ptq_result.path, "qat_int8": qat_result.path},
        report.path,
        placement_summary=placement.path,
    )
    shutil.copyfile(f"{report.path}/report.html", report_html.path)
    shutil.copyfile(path, summary.path)  # a file behind the metrics, as kfp.local's cache wants
    for row in Comparison.load_json(path).rows:
        summary.log_metric(f"{row.variant}.accuracy_top1", row.top1)
        summary.log_metric(f"{row.variant}.delta_top1_points", row.delta_top1_points)
        summary.log_metric(f"{row.variant}.speedup_vs_fp32", row.speedup)
    report.metadata["file"] = "comparison.json"
