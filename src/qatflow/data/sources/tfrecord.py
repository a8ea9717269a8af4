"""TFRecord files of ``tf.train.Example`` (encoded image + integer label), streamed from disk.

Feature names: ``image/encoded`` and ``image/class/label`` (the ImageNet TFRecord convention),
or ``image`` and ``label``. Files whose names contain ``train`` and ``validation``/``val``/
``test`` (ImageNet shards: ``train-00000-of-01024``) give the train and test splits; otherwise
all files form one pool from which the test split is carved.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from qatflow.data.sources.base import RECORD_SHUFFLE_BUFFER, Source
from qatflow.data.sources.images import PROBE_COUNT, decode_image, probe_images
from qatflow.errors import DataError

SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec", ".record")
IMAGE_KEYS = ("image/encoded", "image")
LABEL_KEYS = ("image/class/label", "label")
_SHARD_RE = re.compile(r"-\d+-of-\d+$")
_TRAIN_RE = re.compile(r"(^|[^a-z])train")
_TEST_RE = re.compile(r"(^|[^a-z])(validation|val|test)([^a-z]|$)")
_SCAN_BATCH = 1024


def is_tfrecord_file(path: Path) -> bool:
    """Whether the name of ``path`` marks it as a TFRecord file (suffix or shard pattern)."""
    return path.suffix.lower() in SUFFIXES or bool(_SHARD_RE.search(path.name))


def tfrecord_files(pattern: str) -> list[Path]:
    """The TFRecord files of a file, a folder or a glob pattern, sorted."""
    path = Path(pattern)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and is_tfrecord_file(p))
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())


@dataclass(frozen=True)
class RecordExamples:
    """Records of TFRecord files numbered in file order; ``counts`` records per file."""

    files: tuple[str, ...]
    counts: tuple[int, ...]
    image_key: str
    label_key: str
    channels: int

    def __len__(self) -> int:
        return sum(self.counts)

    def dataset(self, indices: np.ndarray, *, shuffle: bool, seed: int) -> tf.data.Dataset:
        mask = np.zeros(len(self), dtype=bool)
        mask[indices] = True
        wanted = tf.constant(mask)
        starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        files = tf.data.Dataset.from_tensor_slices((list(self.files), starts))
        if shuffle:
            files = files.shuffle(len(self.files), seed=seed, reshuffle_each_iteration=True)

        def numbered(path: tf.Tensor, start: tf.Tensor) -> tf.data.Dataset:
            return tf.data.Dataset.zip(
                tf.data.Dataset.range(start, tf.int64.max), tf.data.TFRecordDataset(path)
            )

        records = files.interleave(
            numbered,
            cycle_length=min(4, len(self.files)) if shuffle else 1,
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        records = records.filter(lambda i, _: tf.gather(wanted, i)).map(lambda _, r: r)
        if shuffle:
            records = records.shuffle(RECORD_SHUFFLE_BUFFER, seed=seed)
        features = {
            self.image_key: tf.io.FixedLenFeature([], tf.string),
            self.label_key: tf.io.FixedLenFeature([], tf.int64),
        }
        image_key, label_key, channels = self.image_key, self.label_key, self.channels

        def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            example = tf.io.parse_single_example(record, features)
            return (
                decode_image(example[image_key], channels),
                tf.cast(example[label_key], tf.int32),
            )

        return records.take(len(indices)).map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def open_tfrecords(pattern: str, channels: int | None) -> Source:
    """Index the records of ``pattern`` (one pass over labels) and check their features."""
    files = tfrecord_files(pattern)
    if not files:
        raise DataError(f"no TFRecord files found at {pattern} (names ending in {SUFFIXES})")
    image_key, label_key, first_images = _feature_keys(files[0])
    h, w, c = probe_images(first_images, channels)
    train_files = [f for f in files if _TRAIN_RE.search(f.name.lower())]
    test_files = [f for f in files if _TEST_RE.search(f.name.lower()) and f not in train_files]
    if not (train_files and test_files):
        train_files, test_files = files, []
    groups = {"train": train_files, "test": test_files}
    counts: dict[str, list[int]] = {}
    top = 0
    for split, group in groups.items():
        counts[split] = []
        for file in group:
            count, largest = _scan_labels(file, label_key)
            counts[split].append(count)
            top = max(top, largest)
    if not sum(counts["train"]):
        raise DataError(f"the TFRecord files at {pattern} hold no records")

    def examples(split: str) -> RecordExamples:
        names = tuple(str(f) for f in groups[split])
        return RecordExamples(names, tuple(counts[split]), image_key, label_key, c)

    return Source(
        kind="tfrecord",
        train=examples("train"),
        test=examples("test") if test_files else None,
        class_names=tuple(str(i) for i in range(top + 1)),
        image_shape=(h, w, c),
        fixed_shape=False,
    )


def _feature_keys(file: Path) -> tuple[str, str, list[tuple[str, bytes]]]:
    """The image and label feature names of the first records, plus their encoded images."""
    try:
        raw = [r.numpy() for r in tf.data.TFRecordDataset(str(file)).take(PROBE_COUNT)]
        examples = [tf.train.Example.FromString(r) for r in raw]
    except (tf.errors.OpError, ValueError) as exc:
        raise DataError(f"{file} is not a valid TFRecord file of tf.train.Example: {exc}") from exc
    if not examples:
        raise DataError(f"TFRecord file {file} is empty")
    found = examples[0].features.feature
    image_key = next((k for k in IMAGE_KEYS if k in found), None)
    label_key = next((k for k in LABEL_KEYS if k in found), None)
    if (
        image_key is None
        or label_key is None
        or not found[image_key].bytes_list.value
        or not found[label_key].int64_list.value
    ):
        raise DataError(
            f"{file}: records need an encoded image bytes feature ({' or '.join(IMAGE_KEYS)}) "
            f"and an int64 label feature ({' or '.join(LABEL_KEYS)}); found "
            f"{', '.join(sorted(found)) or 'no features'}"
        )
    images = [
        (f"{file} record {i}", e.features.feature[image_key].bytes_list.value[0])
        for i, e in enumerate(examples)
    ]
    return image_key, label_key, images


def _scan_labels(file: Path, label_key: str) -> tuple[int, int]:
    """Count the records of ``file`` and return (count, largest label); checks labels >= 0."""
    spec = {label_key: tf.io.FixedLenFeature([], tf.int64)}
    labels = tf.data.TFRecordDataset(str(file)).batch(_SCAN_BATCH)
    count, largest = 0, -1
    try:
        for batch in labels.map(lambda r: tf.io.parse_example(r, spec)[label_key]):
            values = batch.numpy()
            count += len(values)
            largest = max(largest, int(values.max()))
            if values.min() < 0:
                raise DataError(f"{file}: label {values.min()} is out of range (labels start at 0)")
    except tf.errors.OpError as exc:
        raise DataError(f"{file}: cannot read the {label_key!r} labels: {exc.message}") from exc
    return count, largest
