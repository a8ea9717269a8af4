"""What ``load_dataset`` returns: the four batched splits and the facts needed to rebuild them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import tensorflow as tf

from qatflow.errors import DataError

SPLITS = ("train", "validation", "test", "calibration")
# The keyword arguments of load_dataset that DatasetInfo records (all but cache locations).
LOAD_ARGS = (
    "uri",
    "preprocessing",
    "batch_size",
    "image_size",
    "channels",
    "validation_split",
    "test_split",
    "calibration_size",
    "seed",
    "limit",
)


@dataclass(frozen=True)
class DatasetInfo:
    """The load arguments of a dataset and what was found in it.

    ``input_shape`` is (H, W, C) of the images the splits yield; ``sizes`` maps each split to
    its number of examples. ``load_args()`` calls ``load_dataset`` again identically.
    """

    uri: str
    kind: str
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    sizes: Mapping[str, int]
    preprocessing: str
    batch_size: int
    image_size: tuple[int, int] | None
    channels: int | None
    validation_split: float
    test_split: float
    calibration_size: int
    seed: int
    limit: int | None

    def load_args(self) -> dict[str, Any]:
        """The keyword arguments of ``load_dataset`` that rebuild this dataset."""
        return {name: getattr(self, name) for name in LOAD_ARGS}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        data = asdict(self)
        data["sizes"] = dict(self.sizes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetInfo:
        """Rebuild from ``to_dict()`` output (e.g. read back from JSON)."""
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data))
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise DataError(
                f"not a DatasetInfo: missing fields {missing or 'none'}, "
                f"unknown fields {unknown or 'none'}"
            )
        values = dict(data)
        values["input_shape"] = tuple(values["input_shape"])
        values["class_names"] = tuple(values["class_names"])
        values["sizes"] = dict(values["sizes"])
        if values["image_size"] is not None:
            values["image_size"] = tuple(values["image_size"])
        return cls(**values)


@dataclass(frozen=True)
class DatasetBundle:
    """Batched, prefetched ``(images float32 NHWC, labels int32)`` datasets per split."""

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    calibration: tf.data.Dataset
    info: DatasetInfo

    def split(self, name: str) -> tf.data.Dataset:
        """The split called ``name`` (one of ``SPLITS``)."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; splits are {', '.join(SPLITS)}")
        dataset: tf.data.Dataset = getattr(self, name)
        return dataset
