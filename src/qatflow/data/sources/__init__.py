"""Dataset sources: each opens one kind of dataset on local disk as a ``Source``."""

from __future__ import annotations

from pathlib import Path

from qatflow.data.sources import fashion_mnist
from qatflow.data.sources.base import Examples, Source
from qatflow.data.sources.image_folder import is_image_folder, open_image_folder
from qatflow.data.sources.npz import open_npz
from qatflow.data.sources.tfrecord import is_tfrecord_file, open_tfrecords, tfrecord_files
from qatflow.errors import DataError

KINDS = (
    "the name fashion-mnist",
    "a folder of Fashion-MNIST IDX .gz files",
    "an image folder with one sub-folder per class",
    "TFRecord files (a file, a glob or a folder)",
    "an .npz file with x_train, y_train, x_test, y_test",
)


def is_builtin(uri: str) -> bool:
    """Whether ``uri`` names a built-in dataset rather than a path."""
    return uri.lower() in fashion_mnist.NAMES


def open_source(location: str, channels: int | None) -> Source:
    """Open the dataset at a local ``location`` (path or glob) or a built-in name."""
    if is_builtin(location):
        return fashion_mnist.open_builtin()
    path = Path(location)
    if path.is_dir():
        if fashion_mnist.is_idx_folder(path):
            return fashion_mnist.open_idx_folder(path)
        if is_image_folder(path):
            return open_image_folder(path, channels)
        if tfrecord_files(location):
            return open_tfrecords(location, channels)
        if not any(path.iterdir()):
            raise DataError(f"dataset folder {path} is empty")
        raise DataError(f"dataset folder {path} holds no recognised dataset; expected {_kinds()}")
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return open_npz(path)
        if is_tfrecord_file(path):
            return open_tfrecords(location, channels)
        raise DataError(f"dataset file {path} is of no known kind; expected {_kinds()}")
    if tfrecord_files(location):  # a glob pattern
        return open_tfrecords(location, channels)
    raise DataError(f"dataset not found: {location}")


def _kinds() -> str:
    return "; ".join(KINDS)


__all__ = ["Examples", "Source", "is_builtin", "open_source"]
