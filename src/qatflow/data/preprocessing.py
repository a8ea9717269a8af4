"""Named preprocessing: how raw 0-255 pixels become model inputs, plus resize and channels.

Every name is recorded in ``DatasetInfo.preprocessing`` so that later steps (evaluation, engine
calibration) feed the exported model exactly what it was trained on. The constants are those of
``keras.applications.imagenet_utils.preprocess_input`` for the ``tf``, ``caffe`` and ``torch``
modes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import tensorflow as tf

from qatflow.errors import DataError

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
_TORCH_STD_RGB = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """A named pixel transform applied to float32 batches of 0-255 pixels (NHWC)."""

    name: str
    description: str
    needs_rgb: bool
    transform: Callable[[tf.Tensor], tf.Tensor]


def _caffe(images: tf.Tensor) -> tf.Tensor:
    return images[..., ::-1] - tf.constant(_CAFFE_MEAN_BGR, tf.float32)


def _torch(images: tf.Tensor) -> tf.Tensor:
    mean = tf.constant(_TORCH_MEAN_RGB, tf.float32)
    std = tf.constant(_TORCH_STD_RGB, tf.float32)
    return (images / 255.0 - mean) / std


PREPROCESSING: Mapping[str, Preprocessing] = MappingProxyType(
    {
        p.name: p
        for p in (
            Preprocessing("scale01", "x / 255, pixels in [0, 1]", False, lambda x: x / 255.0),
            Preprocessing(
                "tf",
                "x / 127.5 - 1, pixels in [-1, 1] (MobileNet)",
                False,
                lambda x: x / 127.5 - 1.0,
            ),
            Preprocessing(
                "caffe", "RGB to BGR, minus the ImageNet mean (ResNet50, VGG)", True, _caffe
            ),
            Preprocessing(
                "torch", "x / 255, minus the ImageNet mean, over its std (DenseNet)", True, _torch
            ),
            Preprocessing(
                "raw",
                "unchanged 0-255 floats, for models that rescale inside (EfficientNet)",
                False,
                lambda x: x,
            ),
        )
    }
)


def get_preprocessing(name: str) -> Preprocessing:
    """The registered preprocessing called ``name``; a DataError lists the known ones."""
    try:
        return PREPROCESSING[name]
    except KeyError:
        known = ", ".join(f"{p.name} ({p.description})" for p in PREPROCESSING.values())
        raise DataError(f"unknown preprocessing {name!r}; known: {known}") from None


def check_channels(preprocessing: Preprocessing, channels: int) -> None:
    """Raise a DataError if ``preprocessing`` needs RGB images and ``channels`` is not 3."""
    if preprocessing.needs_rgb and channels != 3:
        raise DataError(
            f"preprocessing {preprocessing.name!r} needs RGB images but the dataset gives "
            f"{channels} channel(s); pass channels=3 (--channels 3)"
        )


def to_float_image(image: tf.Tensor, *, size: tuple[int, int] | None, channels: int) -> tf.Tensor:
    """One HWC image (any dtype, 0-255) as float32, resized to ``size`` with ``channels``."""
    image = tf.cast(image, tf.float32)
    have = image.shape[-1]
    if have != channels:
        if have == 1 and channels == 3:
            image = tf.image.grayscale_to_rgb(image)
        elif have == 3 and channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        elif have == 4 and channels == 3:
            image = image[..., :3]
        else:
            raise DataError(f"cannot convert images with {have} channel(s) to channels={channels}")
    if size is not None:
        image = tf.image.resize(image, size, method="bilinear")
    return image
