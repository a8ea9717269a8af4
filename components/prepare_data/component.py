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
) -> None:
    """Load ``dataset_uri``, check its first batches and write the dataset spec (JSON).

    ``limit`` caps every split (0 = no cap). Later steps rebuild identical splits from the spec.
    """
    import json

    from qatflow import steps

    steps.prepare_data(
        dataset_uri,
        dataset.path,
        preprocessing=preprocessing,
        batch_size=batch_size,
        limit=limit or None,
    )
    with open(dataset.path, encoding="utf-8") as spec:
        info = json.load(spec)
    dataset.metadata.update(
        {
            "uri": info["uri"],
            "kind": info["kind"],
            "input_shape": info["input_shape"],
            "num_classes": info["num_classes"],
            "sizes": info["sizes"],
            "preprocessing": info["preprocessing"],
        }
    )
