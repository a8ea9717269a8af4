"""KFP component ``qat_finetune``: quantization-aware fine-tuning of the calibrated model."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from qatflow.images import TENSORFLOW_IMAGE


@dsl.component(base_image=TENSORFLOW_IMAGE, install_kfp_package=False)
def qat_finetune(
    model: Input[Model],
    dataset: Input[Dataset],
    finetuned: Output[Model],
    training: Output[Metrics],
    epochs: int = 2,
    learning_rate: float = 1e-3,
    steps_per_epoch: int = 0,
) -> None:
    """Fine-tune the quantized model with Q/DQ active (QAT); keep the best epoch.

    ``finetuned`` is a folder: ``model.keras`` and ``model.history.json``. ``steps_per_epoch``
    0 means whole epochs. ``training`` gets the best validation accuracy and epoch as metrics
    and the per-epoch history as its file.
    """
    import os
    import shutil

    from qatflow import steps

    os.makedirs(finetuned.path, exist_ok=True)
    output = os.path.join(finetuned.path, "model.keras")
    tuned = steps.finetune(
        os.path.join(model.path, model.metadata["file"]),
        dataset.path,
        output,
        epochs=epochs,
        learning_rate=learning_rate,
        steps_per_epoch=steps_per_epoch or None,
    )
    training.log_metric("best_val_accuracy", tuned.best_val_accuracy)
    training.log_metric("best_epoch", tuned.best_epoch)
    # The per-epoch history as the artifact's file: kfp.local's cache needs the file to exist.
    shutil.copyfile(tuned.history_file, training.path)
    finetuned.framework = "keras"
    finetuned.metadata.update({"file": "model.keras", "precision": "int8", "epochs": epochs})
