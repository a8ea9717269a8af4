"""KFP component ``check_inputs``: fail fast on a bad model/dataset URI or S3 destination."""

from kfp import dsl

from qatflow.images import TENSORFLOW_IMAGE


@dsl.component(base_image=TENSORFLOW_IMAGE, install_kfp_package=False)
def check_inputs(model_uri: str, dataset_uri: str, s3_prefix: str = "", spec: str = "") -> None:
    """Check that ``model_uri``, ``dataset_uri`` and the placement ``spec`` (``""``: none)
    resolve and that ``s3_prefix`` is writable.

    Runs first and is never cached: credentials and buckets can change between runs.
    """
    from qatflow import steps

    steps.check_inputs(model_uri, dataset_uri, s3_prefix=s3_prefix or None, spec_path=spec or None)
