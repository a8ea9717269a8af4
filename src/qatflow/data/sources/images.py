"""Decoding encoded images (JPEG, PNG, BMP, GIF) for the streamed sources."""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from qatflow.errors import DataError

# Encoded images looked at to choose the default channel count and the image shape.
PROBE_COUNT = 16


def decode_image(contents: tf.Tensor, channels: int) -> tf.Tensor:
    """Decode image bytes into a uint8 HWC image with ``channels`` channels (0: as stored)."""
    image = tf.io.decode_image(contents, channels=channels, expand_animations=False)
    if channels:
        image.set_shape([None, None, channels])
    return image


def probe_images(
    samples: Sequence[tuple[str, bytes]], channels: int | None
) -> tuple[int, int, int]:
    """(H, W, C) of the first sample as it will be decoded.

    ``samples`` are (name for errors, encoded bytes). Without ``channels``, C is 1 when every
    sample is stored as grayscale and 3 otherwise (colour, or a few grayscale/RGBA files among
    colour ones, as in ImageNet).
    """
    native = []
    for name, contents in samples:
        try:
            native.append(tuple(int(d) for d in decode_image(contents, 0).shape))
        except tf.errors.OpError as exc:
            raise DataError(f"{name} is not a readable image: {exc.message}") from exc
    if channels is None:
        channels = 1 if all(shape[2] == 1 for shape in native) else 3
    h, w, _ = native[0]
    return h, w, channels
