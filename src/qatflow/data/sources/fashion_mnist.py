"""Fashion-MNIST from IDX .gz files (Debian's dataset-fashion-mnist) or the Keras download."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np

from qatflow.data.sources.base import Source, array_source
from qatflow.errors import DataError

log = logging.getLogger("qatflow.data")

NAMES = frozenset({"fashion-mnist", "fashion_mnist", "fashionmnist"})
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_UBYTE = 0x08


def is_idx_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding the four Fashion-MNIST IDX .gz files."""
    return path.is_dir() and all((path / name).is_file() for name in IDX_FILES.values())


def read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file of unsigned bytes (images or labels) into an array."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable gzipped IDX file: {exc}") from exc
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != _IDX_UBYTE:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{path} is truncated: its header announces shape {shape}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def open_idx_folder(folder: Path) -> Source:
    """Fashion-MNIST from a folder holding its four IDX .gz files."""
    arrays = {key: read_idx(folder / name) for key, name in IDX_FILES.items()}
    return array_source("fashion-mnist", arrays, CLASS_NAMES, str(folder))


def open_builtin() -> Source:
    """Fashion-MNIST from the Debian package's folder, else from ``keras.datasets``."""
    if is_idx_folder(SYSTEM_DIR):
        return open_idx_folder(SYSTEM_DIR)
    log.info("%s not found; trying keras.datasets.fashion_mnist (downloads once)", SYSTEM_DIR)
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as exc:  # keras reports download failures as bare Exceptions
        raise DataError(
            f"Fashion-MNIST is not installed in {SYSTEM_DIR} and could not be downloaded "
            f"({exc}); install it with: apt-get install dataset-fashion-mnist"
        ) from exc
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    return array_source("fashion-mnist", arrays, CLASS_NAMES, "keras.datasets.fashion_mnist")
