"""A NumPy ``.npz`` file with ``x_train, y_train, x_test, y_test`` (optional ``class_names``)."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from qatflow.data.sources.base import Source, array_source
from qatflow.errors import DataError

log = logging.getLogger("qatflow.data")

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def open_npz(path: Path) -> Source:
    """Load the arrays of ``path`` (in memory) after checking keys, shapes and labels."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in REQUIRED_KEYS if key not in npz.files]
            if missing:
                raise DataError(
                    f"{path} lacks the arrays {', '.join(missing)}; an .npz dataset needs "
                    f"{', '.join(REQUIRED_KEYS)} (found: {', '.join(npz.files) or 'none'})"
                )
            arrays = {key: npz[key] for key in REQUIRED_KEYS}
            names = tuple(str(n) for n in npz["class_names"]) if "class_names" in npz else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a valid .npz file: {exc}") from exc
    x_train = arrays["x_train"]
    if np.issubdtype(x_train.dtype, np.floating) and x_train.size and np.nanmax(x_train) <= 1.0:
        log.warning(
            "%s: x_train is already in [0, 1]; qatflow expects raw 0-255 pixels and applies "
            "the named preprocessing itself",
            path,
        )
    return array_source("npz", arrays, names, str(path))
