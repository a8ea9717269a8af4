"""Datasets as streaming ``tf.data`` pipelines with named, recorded preprocessing."""

from qatflow.data.bundle import SPLITS, DatasetBundle, DatasetInfo
from qatflow.data.checks import check_all_finite, check_input_shape, check_model_compatible
from qatflow.data.fingerprint import content_digest, dataset_digest
from qatflow.data.loader import load_dataset
from qatflow.data.preprocessing import PREPROCESSING, Preprocessing, get_preprocessing
from qatflow.data.spec import load_dataset_from_spec, write_dataset_spec

__all__ = [
    "PREPROCESSING",
    "SPLITS",
    "DatasetBundle",
    "DatasetInfo",
    "Preprocessing",
    "check_all_finite",
    "check_input_shape",
    "check_model_compatible",
    "content_digest",
    "dataset_digest",
    "get_preprocessing",
    "load_dataset",
    "load_dataset_from_spec",
    "write_dataset_spec",
]
