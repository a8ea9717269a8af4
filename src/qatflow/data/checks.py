"""Checks on loaded data: finite images (first batches, or every batch), and data that fits a
model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from qatflow.data.bundle import SPLITS, DatasetBundle, DatasetInfo
from qatflow.errors import DataError

if TYPE_CHECKING:
    import keras


def check_first_batches(bundle: DatasetBundle) -> None:
    """Read the first batch of every split; raise a DataError naming a split that fails or that
    holds NaN/Inf values after preprocessing."""
    uri = bundle.info.uri
    for name in SPLITS:
        try:
            batch = next(iter(bundle.split(name).take(1)), None)
        except tf.errors.OpError as exc:
            raise DataError(
                f"dataset {uri}: cannot read the first batch of the {name} split: {exc.message}"
            ) from exc
        if batch is None:
            continue
        images = batch[0].numpy()
        bad = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
        if bad:
            raise DataError(
                f"dataset {uri}: the first batch of the {name} split holds {bad} non-finite "
                "values (NaN/Inf)"
            )


def check_all_finite(bundle: DatasetBundle) -> None:
    """Read every batch of every split; raise a DataError naming the split and batch of the first
    image with NaN/Inf values after preprocessing."""
    uri = bundle.info.uri
    for name in SPLITS:
        for index, (images, _) in enumerate(bundle.split(name), start=1):
            values = images.numpy()
            bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            if bad:
                raise DataError(
                    f"dataset {uri}: batch {index} of the {name} split holds {bad} non-finite "
                    "values (NaN/Inf) after preprocessing"
                )


def check_input_shape(model: keras.Model, shape: tuple[int | None, ...], source: str) -> None:
    """Raise a DataError unless images of ``shape`` (H, W, C) from ``source`` fit ``model``."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError) as exc:
        raise DataError(f"model {model.name} has no defined inputs yet: build it first") from exc
    if not inputs or len(inputs) != 1:
        raise DataError(f"model {model.name} must have one image input; it has {len(inputs or [])}")
    expected = tuple(inputs[0].shape[1:])
    if len(expected) != len(shape) or any(
        want is not None and have is not None and want != have
        for want, have in zip(expected, shape, strict=True)
    ):
        raise DataError(
            f"{source} gives images of shape {tuple(shape)} (H, W, C) but model {model.name} "
            f"expects inputs of shape {expected}; resize the data (prepare-data --image-size / "
            "--channels) or use a model for this input"
        )


def check_model_compatible(info: DatasetInfo, model: keras.Model) -> None:
    """Raise a DataError unless the dataset's images and classes fit ``model``'s input/output."""
    check_input_shape(model, info.input_shape, f"dataset {info.uri}")
    outputs = model.outputs
    if not outputs or len(outputs) != 1:
        raise DataError(
            f"model {model.name} must have one class output; it has {len(outputs or [])}"
        )
    classes = outputs[0].shape[-1]
    if classes is not None and classes != info.num_classes:
        raise DataError(
            f"dataset {info.uri} has {info.num_classes} classes but model {model.name} outputs "
            f"{classes} (output shape {tuple(outputs[0].shape)})"
        )
