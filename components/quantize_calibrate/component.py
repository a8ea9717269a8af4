"""KFP component ``quantize_calibrate``: TensorRT-style Q/DQ placement plus calibration (PTQ)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from qatflow.images import TENSORFLOW_IMAGE


@dsl.component(base_image=TENSORFLOW_IMAGE, install_kfp_package=False)
def quantize_calibrate(
    model: Input[Model],
    dataset: Input[Dataset],
    quantized: Output[Model],
    placement: Output[Markdown],
    runtime: str,
    calibration_method: str = "max",
    calibration_batches: int = 16,
    percentile: float = 99.99,
    activation_range: str = "frozen",
    spec: str = "",
) -> None:
    """Quantize the FP32 model for the engine ``runtime`` (the one the pipeline is compiled
    for) and calibrate it on the dataset's calibration split.

    ``percentile`` applies to ``calibration_method`` ``percentile``; ``activation_range`` is
    how ranges evolve in QAT (``frozen`` or ``ema``); ``spec`` is a YAML file of placement
    overrides, local or ``s3://`` (``""``: none).

    ``quantized`` is a folder: ``model.keras`` and its side files (``model.placement.md``,
    ``model.placement.json``, ``model.calibration.json``). ``placement`` is the Q/DQ placement
    summary as Markdown, rendered by the KFP UI. The QAT branch fine-tunes this same model.
    """
    import os
    import shutil

    from qatflow import steps

    os.makedirs(quantized.path, exist_ok=True)
    outputs = steps.quantize(
        os.path.join(model.path, model.metadata["file"]),
        os.path.join(quantized.path, "model.keras"),
        dataset_spec=dataset.path,
        calibration_method=calibration_method,
        calibration_batches_count=calibration_batches,
        percentile=percentile,
        activation_range=activation_range,
        spec_path=spec or None,
        runtime=runtime,
    )
    shutil.copyfile(outputs.placement_markdown, placement.path)
    quantized.framework = "keras"
    quantized.metadata.update(
        {
            "file": "model.keras",
            "precision": "int8",
            "calibration_method": calibration_method,
            "calibration_batches": calibration_batches,
            "runtime": runtime,
        }
    )
