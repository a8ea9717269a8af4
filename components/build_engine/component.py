"""KFP component ``build_engine``: an ONNX model to a runtime engine (ONNX Runtime or TensorRT)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from qatflow.images import TENSORRT_IMAGE


@dsl.component(base_image=TENSORRT_IMAGE, install_kfp_package=False)
def build_engine(
    onnx_model: Input[Model],
    engine: Output[Model],
    runtime: str,
    batch_min: int = 1,
    batch_opt: int = 8,
    batch_max: int = 64,
    encoding: str = "auto",
    fidelity_samples: int = 1024,
    dataset: Input[Dataset] | None = None,
) -> None:
    """Build the engine for ``runtime`` (the one the pipeline is compiled for) with the batch
    profile (min, opt, max).

    Before it is written, the engine is checked against the ONNX model run as float math on
    ``fidelity_samples`` images of ``dataset``, its validation split first, then its
    calibration split (without one: synthetic inputs, kernels only); a failed check fails the
    task. ``encoding`` (ONNX Runtime): ``auto``, ``u8s8`` or ``u8u8``.

    ``engine`` is a folder: ``engine.plan`` plus its ``engine.plan.json`` metadata for
    TensorRT, or the optimized ``engine.onnx`` for ONNX Runtime. The default image is the
    TensorRT one; the pipeline swaps in the TensorFlow image when compiled for ONNX Runtime.
    """
    import os

    from qatflow import steps

    name = "engine.plan" if runtime == "tensorrt" else "engine.onnx"
    os.makedirs(engine.path, exist_ok=True)
    built = steps.build_engine(
        os.path.join(onnx_model.path, onnx_model.metadata["file"]),
        os.path.join(engine.path, name),
        runtime=runtime,
        batch_profile=(batch_min, batch_opt, batch_max),
        dataset_spec=dataset.path if dataset is not None else None,
        encoding=encoding,
        fidelity_samples=fidelity_samples,
    )
    engine.framework = built.runtime
    engine.metadata.update(
        {
            "file": name,
            "runtime": built.runtime,
            "batch_profile": list(built.batch_profile),
            "precision": onnx_model.metadata.get("precision", "fp32"),
        }
    )
