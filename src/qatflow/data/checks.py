"""Checks on loaded data: finite first batches, and a dataset that fits a model."""

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


def check_model_compatible(info: DatasetInfo, model: keras.Model) -> None:
    """Raise a DataError unless the dataset's images and classes fit ``model``'s input/output."""
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError) as exc:
        raise DataError(
            f"model {model.name} has no defined inputs/outputs yet: build it first"
        ) from exc
    if not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
        raise DataError(
            f"model {model.name} must have one image input and one class output; it has "
            f"{len(inputs or [])} input(s) and {len(outputs or [])} output(s)"
        )
    expected = tuple(inputs[0].shape[1:])
    if len(expected) != 3 or any(
        want is not None and want != have
        for want, have in zip(expected, info.input_shape, strict=True)
    ):
        raise DataError(
            f"dataset {info.uri} gives images of shape {info.input_shape} (H, W, C) but model "
            f"{model.name} expects inputs of shape {expected}; set image_size / channels"
        )
    classes = outputs[0].shape[-1]
    if classes is not None and classes != info.num_classes:
        raise DataError(
            f"dataset {info.uri} has {info.num_classes} classes but model {model.name} outputs "
            f"{classes} (output shape {tuple(outputs[0].shape)})"
        )
