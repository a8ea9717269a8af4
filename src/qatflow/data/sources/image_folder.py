"""Image folders with one sub-folder per class (ImageNet validation layout), streamed from disk.

Either ``root/<class>/*.jpg`` (one pool; the test split is carved from it) or
``root/train/<class>/...`` next to ``root/test`` (or ``val``, ``validation``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from qatflow.data.sources.base import Source
from qatflow.data.sources.images import PROBE_COUNT, decode_image, probe_images
from qatflow.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
TEST_FOLDER_NAMES = ("test", "val", "validation")


@dataclass(frozen=True)
class FileExamples:
    """Image files and their labels; images are read and decoded while streaming."""

    paths: np.ndarray
    labels: np.ndarray
    channels: int

    def __len__(self) -> int:
        return len(self.labels)

    def dataset(self, indices: np.ndarray, *, shuffle: bool, seed: int) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices(
            (self.paths[indices], self.labels[indices].astype(np.int32))
        )
        if shuffle and len(indices):
            ds = ds.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
        channels = self.channels
        return ds.map(
            lambda path, label: (decode_image(tf.io.read_file(path), channels), label),
            num_parallel_calls=tf.data.AUTOTUNE,
        )


def is_image_folder(path: Path) -> bool:
    """Whether ``path`` has class sub-folders holding images (directly or under ``train/``)."""
    root = path / "train" if _split_layout(path) else path
    return any(_images(d) for d in _class_dirs(root))


def open_image_folder(path: Path, channels: int | None) -> Source:
    """Index the image files under ``path``; decode with ``channels`` (see ``probe_images``)."""
    test_dir = _split_layout(path)
    train_root = path / "train" if test_dir else path
    class_dirs = _class_dirs(train_root)
    if not class_dirs:
        raise DataError(f"image folder {train_root} has no class sub-folders")
    class_names = tuple(d.name for d in class_dirs)
    train_paths, train_labels = _index(train_root, class_names)
    if not len(train_paths):
        raise DataError(f"image folder {train_root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    step = max(1, len(train_paths) // PROBE_COUNT)
    samples = [(p, Path(p).read_bytes()) for p in train_paths[::step][:PROBE_COUNT]]
    h, w, c = probe_images(samples, channels)
    test = None
    if test_dir:
        unknown = sorted({d.name for d in _class_dirs(test_dir)} - set(class_names))
        if unknown:
            raise DataError(
                f"{test_dir} has class folders missing from {train_root}: {', '.join(unknown)}"
            )
        test_paths, test_labels = _index(test_dir, class_names)
        test = FileExamples(test_paths, test_labels, c)
    return Source(
        kind="image-folder",
        train=FileExamples(train_paths, train_labels, c),
        test=test,
        class_names=class_names,
        image_shape=(h, w, c),
        fixed_shape=False,
    )


def _split_layout(path: Path) -> Path | None:
    """The test folder if ``path`` holds ``train/`` plus a test folder, each with classes."""
    if not _class_dirs(path / "train"):
        return None
    return next((path / n for n in TEST_FOLDER_NAMES if _class_dirs(path / n)), None)


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


def _index(root: Path, class_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        folder = root / name
        if folder.is_dir():
            files = _images(folder)
            paths += [str(f) for f in files]
            labels += [label] * len(files)
    return np.array(paths, dtype=str), np.array(labels, dtype=np.int32)
