"""KFP component ``prepare_data``: check the dataset and write its spec."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from qatflow.images import TENSORFLOW_IMAGE


@dsl.component(base_image=TENSORFLOW_IMAGE, install_kfp_package=False)
def prepare_data(
    dataset_uri: str,
    dataset: Output[Dataset],
    preprocessing: str = "scale01",
    batch_size: int = 64,
    limit: int = 0,
    image_size: str = "",
) -> None:
    """Load ``dataset_uri``, check its first batches and write the dataset spec (JSON).

    ``limit`` caps every split (0 = no cap). ``image_size`` ``"H,W"`` resizes the images
    (``""``: as stored). Later steps rebuild identical splits from the spec.
    """
    from qatflow import steps
    from qatflow.params import parse_image_size

    info = steps.prepare_data(
        dataset_uri,
        dataset.path,
        preprocessing=preprocessing,
        batch_size=batch_size,
        image_size=parse_image_size(image_size),
        limit=limit or None,
    ).info
    dataset.metadata.update(
        {
            "uri": info.uri,
            "kind": info.kind,
            "input_shape": list(info.input_shape),
            "num_classes": info.num_classes,
            "sizes": dict(info.sizes),
            "preprocessing": info.preprocessing,
        }
    )
