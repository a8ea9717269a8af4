"""KFP component ``prepare_model``: the FP32 Keras model, loaded or the demo model trained."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from qatflow.images import TENSORFLOW_IMAGE


@dsl.component(base_image=TENSORFLOW_IMAGE, install_kfp_package=False)
def prepare_model(
    dataset: Input[Dataset],
    model: Output[Model],
    model_uri: str = "demo",
    pretrain_epochs: int = 5,
) -> None:
    """Write the FP32 model as ``model.keras`` in the ``model`` folder.

    ``model_uri`` is ``demo`` (the demo CNN trained on the dataset for ``pretrain_epochs``,
    cached), a ``.keras``/``.h5``/SavedModel path or ``s3://`` URI, or a keras.applications
    name. The model must match the dataset's image shape and number of classes.
    """
    import os

    from qatflow import steps

    os.makedirs(model.path, exist_ok=True)
    steps.prepare_model(
        model_uri,
        dataset.path,
        os.path.join(model.path, "model.keras"),
        pretrain_epochs=pretrain_epochs,
    )
    model.framework = "keras"
    model.metadata.update({"file": "model.keras", "source": model_uri, "precision": "fp32"})
