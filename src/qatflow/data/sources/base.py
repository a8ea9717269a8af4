"""What every dataset source provides: examples that can stream any subset of themselves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import tensorflow as tf

from qatflow.errors import DataError

# Records held by the shuffle buffer of a streamed (TFRecord) training split; bounds memory.
RECORD_SHUFFLE_BUFFER = 256


class Examples(Protocol):
    """A numbered collection of labelled images (one split of a source)."""

    def __len__(self) -> int: ...

    def dataset(self, indices: np.ndarray, *, shuffle: bool, seed: int) -> tf.data.Dataset:
        """Stream the examples at the sorted ``indices`` as ``(image HWC, label int32)``.

        With ``shuffle`` the order changes every epoch, reproducibly for a given ``seed``.
        """
        ...


@dataclass(frozen=True)
class Source:
    """A dataset opened from disk: its train examples, its own test examples if any, metadata.

    ``image_shape`` is the (H, W, C) of the first training image as read; ``fixed_shape`` says
    whether every image has that shape (arrays) or images may differ and must be resized.
    """

    kind: str
    train: Examples
    test: Examples | None
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    fixed_shape: bool


@dataclass(frozen=True)
class ArrayExamples:
    """Examples held in memory as arrays (N, H, W, C) and (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def dataset(self, indices: np.ndarray, *, shuffle: bool, seed: int) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices(
            (self.images[indices], self.labels[indices].astype(np.int32))
        )
        if shuffle and len(indices):
            ds = ds.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
        return ds


def check_array_labels(
    labels: np.ndarray, num_classes: int, where: str, *, class_source: str
) -> None:
    """Raise a DataError unless ``labels`` are integers in [0, num_classes)."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DataError(
            f"{where}: label {bad} is out of range; {class_source} gives {num_classes} "
            f"classes (labels 0-{num_classes - 1})"
        )


def array_source(
    kind: str,
    arrays: dict[str, np.ndarray],
    class_names: tuple[str, ...] | None,
    where: str,
) -> Source:
    """A Source from in-memory ``x_train, y_train, x_test, y_test`` arrays, after checks."""
    images: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"].reshape(-1)
        if x.ndim == 3:
            x = x[..., np.newaxis]
        if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
            raise DataError(
                f"{where}: x_{split} has shape {x.shape}; expected (N, H, W) or (N, H, W, C) "
                "with C in 1, 3, 4"
            )
        if len(x) != len(y):
            raise DataError(f"{where}: x_{split} has {len(x)} images but y_{split} {len(y)} labels")
        images[split] = x
        arrays[f"y_{split}"] = y
    if images["train"].shape[1:] != images["test"].shape[1:]:
        raise DataError(
            f"{where}: x_train images are {images['train'].shape[1:]} but x_test images are "
            f"{images['test'].shape[1:]}"
        )
    if not len(images["train"]):
        raise DataError(f"{where}: x_train is empty")
    y_train, y_test = arrays["y_train"], arrays["y_test"]
    class_source = "class_names"
    if class_names is None:
        if not np.issubdtype(y_train.dtype, np.integer):
            raise DataError(f"{where} y_train: labels must be integers, got dtype {y_train.dtype}")
        class_names = tuple(str(i) for i in range(max(int(y_train.max()), 0) + 1))
        class_source = "y_train (largest label + 1)"
    for split, y in (("train", y_train), ("test", y_test)):
        check_array_labels(y, len(class_names), f"{where} y_{split}", class_source=class_source)
    h, w, c = images["train"].shape[1:]
    return Source(
        kind=kind,
        train=ArrayExamples(images["train"], y_train),
        test=ArrayExamples(images["test"], y_test),
        class_names=class_names,
        image_shape=(h, w, c),
        fixed_shape=True,
    )
