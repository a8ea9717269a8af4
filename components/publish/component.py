"""KFP component ``publish``: MLflow runs, model registry and champion gate, S3 export."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Model, Output

from qatflow.images import TENSORFLOW_IMAGE


@dsl.component(base_image=TENSORFLOW_IMAGE, install_kfp_package=False)
def publish(
    report: Input[Artifact],
    fp32_result: Input[Artifact],
    ptq_result: Input[Artifact],
    qat_result: Input[Artifact],
    fp32_onnx: Input[Model],
    ptq_onnx: Input[Model],
    qat_onnx: Input[Model],
    fp32_engine: Input[Model],
    ptq_engine: Input[Model],
    qat_engine: Input[Model],
    placement: Input[Markdown],
    record: Output[Artifact],
    report_html: Output[HTML],
    model_uri: str,
    dataset_uri: str,
    preprocessing: str,
    batch_size: int,
    limit: int,
    pretrain_epochs: int,
    epochs: int,
    learning_rate: float,
    qat_steps_per_epoch: int,
    calibration_method: str,
    calibration_batches: int,
    runtime: str,
    batch_min: int,
    batch_opt: int,
    batch_max: int,
    tracking_uri: str = "",
    experiment: str = "qatflow",
    registered_model: str = "qatflow-qat-int8",
    s3_prefix: str = "",
    run_name: str = "",
    run_id: str = "",
    image_size: str = "",
    percentile: float = 99.99,
    activation_range: str = "frozen",
    spec: str = "",
) -> str:
    """Publish the run: S3 export (if ``s3_prefix``), then the MLflow parent run with the
    report, one child run per variant, the QAT INT8 ONNX registered as ``registered_model``,
    and the ``champion`` alias moved only if the accuracy gate of the comparison in ``report``
    passes (top-1 points vs FP32 and vs the current champion).

    Returns the gate's verdict on the QAT INT8 candidate, ``passed`` or ``refused``: the
    pipeline output a scheduled retraining branches on. ``record`` is a folder:
    ``publish.json`` (run ids, version, gate verdict, S3 URIs) and, when MLflow is
    unreachable, ``mlflow-offline/`` with everything that was to be logged.
    ``report_html`` is the final report page, with the MLflow run IDs, for the KFP UI.
    ``tracking_uri`` empty means ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.
    """
    import os
    import shutil

    from qatflow import steps

    params = {
        "model": {"uri": model_uri, "pretrain_epochs": pretrain_epochs},
        "dataset": {
            "uri": dataset_uri,
            "preprocessing": preprocessing,
            "batch_size": batch_size,
            "limit": limit or "all",
            "image_size": image_size or "as stored",
        },
        "qat": {
            "epochs": epochs,
            "learning_rate": learning_rate,
            "steps_per_epoch": qat_steps_per_epoch or "epoch",
        },
        "calibration": {
            "method": calibration_method,
            "batches": calibration_batches,
            "percentile": percentile,
        },
        "quantization": {"spec": spec or "none", "activation_range": activation_range},
        "engine": {"runtime": runtime, "batch_profile": f"{batch_min},{batch_opt},{batch_max}"},
    }
    onnx = {"fp32": fp32_onnx, "ptq_int8": ptq_onnx, "qat_int8": qat_onnx}
    os.makedirs(record.path, exist_ok=True)
    published = steps.publish(
        report.path,
        {"fp32": fp32_result.path, "ptq_int8": ptq_result.path, "qat_int8": qat_result.path},
        {name: os.path.join(art.path, art.metadata["file"]) for name, art in onnx.items()},
        {"fp32": fp32_engine.path, "ptq_int8": ptq_engine.path, "qat_int8": qat_engine.path},
        params=params,
        output_dir=record.path,
        placement_summary=placement.path,
        tracking_uri=tracking_uri or None,
        experiment=experiment,
        registered_model=registered_model,
        s3_prefix=s3_prefix or None,
        run_name=run_name or None,
        tags={"kfp.run_name": run_name, "kfp.run_id": run_id},
    )
    record.metadata["file"] = published.record.name
    shutil.copyfile(published.report_html, report_html.path)
    return published.outcome
