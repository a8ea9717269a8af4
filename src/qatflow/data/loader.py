"""``load_dataset``: a dataset URI to four batched, preprocessed ``tf.data`` splits."""

from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow as tf

from qatflow import storage
from qatflow.data.bundle import DatasetBundle, DatasetInfo
from qatflow.data.checks import check_first_batches
from qatflow.data.preprocessing import (
    Preprocessing,
    check_channels,
    get_preprocessing,
    to_float_image,
)
from qatflow.data.sources import Examples, is_builtin, open_source
from qatflow.data.splits import plan_splits
from qatflow.errors import DataError, flagged
from qatflow.params import DATA

log = logging.getLogger("qatflow.data")


def load_dataset(
    uri: str,
    *,
    preprocessing: str = DATA.preprocessing,
    batch_size: int = DATA.batch_size,
    image_size: tuple[int, int] | None = DATA.image_size,
    channels: int | None = None,
    validation_split: float = 0.1,
    calibration_size: int = DATA.calibration_size,
    seed: int = DATA.seed,
    limit: int | None = DATA.limit,
    test_split: float = 0.2,
    cache_dir: str | os.PathLike[str] | None = None,
    shuffle_train: bool = True,
) -> DatasetBundle:
    """Load a dataset as batched, prefetched ``(images float32 NHWC, labels int32)`` splits.

    ``uri`` is ``fashion-mnist``, or a local path or ``s3://`` URI of an IDX folder, an image
    folder (one sub-folder per class), TFRecord files (file, glob or folder) or an ``.npz``
    file. S3 data is downloaded once into ``cache_dir`` (default ``~/.cache/qatflow/datasets``).
    Validation (``validation_split`` of train) and calibration (``calibration_size`` train
    examples) are carved from train with ``seed``; a source without its own test split gives
    ``test_split`` of its examples to test. ``limit`` caps every split (smoke tests). Images are
    resized to ``image_size`` (H, W) and converted to ``channels`` when given, then scaled by the
    named ``preprocessing`` (see ``PREPROCESSING``). Only in-memory kinds (Fashion-MNIST, npz)
    are held in memory; image folders and TFRecords stream from disk. ``shuffle_train=False``
    keeps the train split in one fixed order on every pass (for trainers that shuffle by
    epoch themselves and must resume exactly).
    """
    prep = get_preprocessing(preprocessing)
    _check_args(
        batch_size, image_size, channels, validation_split, test_split, calibration_size, limit
    )
    source = open_source(_local(uri, cache_dir), channels)
    h, w, c = source.image_shape
    channels_out = channels or c
    check_channels(prep, channels_out)
    size = image_size or (None if source.fixed_shape else (h, w))
    input_shape = (*(size or (h, w)), channels_out)
    plan = plan_splits(
        len(source.train),
        len(source.test) if source.test is not None else None,
        validation_split=validation_split,
        test_split=test_split,
        calibration_size=calibration_size,
        seed=seed,
        limit=limit,
    )
    if not len(plan.train):
        raise DataError(f"dataset {uri}: the train split is empty after carving the other splits")
    test_examples = source.test if source.test is not None else source.train
    parts = {
        "train": (source.train, plan.train, shuffle_train),
        "validation": (source.train, plan.validation, False),
        "test": (test_examples, plan.test, False),
        "calibration": (source.train, plan.calibration, False),
    }
    splits = {
        name: _pipeline(examples, indices, shuffle, seed, prep, batch_size, size, channels_out)
        for name, (examples, indices, shuffle) in parts.items()
    }
    info = DatasetInfo(
        uri=uri,
        kind=source.kind,
        input_shape=(int(input_shape[0]), int(input_shape[1]), int(input_shape[2])),
        num_classes=len(source.class_names),
        class_names=source.class_names,
        sizes={name: len(indices) for name, (_, indices, _) in parts.items()},
        preprocessing=prep.name,
        batch_size=batch_size,
        image_size=image_size,
        channels=channels,
        validation_split=validation_split,
        test_split=test_split,
        calibration_size=calibration_size,
        seed=seed,
        limit=limit,
    )
    bundle = DatasetBundle(info=info, **splits)
    check_first_batches(bundle)
    log.info("dataset %s (%s): %s, input %s", uri, source.kind, dict(info.sizes), info.input_shape)
    return bundle


def _local(uri: str, cache_dir: str | os.PathLike[str] | None) -> str:
    """A local path (or built-in name or glob) for ``uri``, downloading S3 data first."""
    if storage.is_s3_uri(uri):
        return str(storage.fetch(uri, cache_dir or storage.cache_dir("datasets")))
    return uri if is_builtin(uri) else os.path.expanduser(uri)


def _pipeline(
    examples: Examples,
    indices: np.ndarray,
    shuffle: bool,
    seed: int,
    prep: Preprocessing,
    batch_size: int,
    size: tuple[int, int] | None,
    channels: int,
) -> tf.data.Dataset:
    ds = examples.dataset(indices, shuffle=shuffle, seed=seed)
    ds = ds.map(
        lambda image, label: (to_float_image(image, size=size, channels=channels), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.apply(tf.data.experimental.assert_cardinality(len(indices)))
    ds = ds.batch(batch_size).map(
        lambda images, labels: (prep.transform(images), labels),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return ds.prefetch(tf.data.AUTOTUNE)


def _check_args(
    batch_size: int,
    image_size: tuple[int, int] | None,
    channels: int | None,
    validation_split: float,
    test_split: float,
    calibration_size: int,
    limit: int | None,
) -> None:
    problems = []
    if batch_size < 1:
        problems.append(f"{flagged('batch_size')} must be >= 1, got {batch_size}")
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        problems.append(f"{flagged('image_size')} must be (height, width) > 0, got {image_size}")
    if channels not in (None, 1, 3):
        problems.append(f"{flagged('channels')} must be 1 or 3, got {channels}")
    for name, value in (("validation_split", validation_split), ("test_split", test_split)):
        if not 0.0 <= value < 1.0:
            problems.append(f"{name} must be in [0, 1), got {value}")
    if calibration_size < 0:
        problems.append(f"{flagged('calibration_size')} must be >= 0, got {calibration_size}")
    if limit is not None and limit < 1:
        problems.append(f"{flagged('limit')} must be >= 1, got {limit}")
    if problems:
        raise DataError("; ".join(problems))
