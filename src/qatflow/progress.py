"""Progress bars on stderr for long work; QATFLOW_NO_PROGRESS=1 turns them off."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    """False when the QATFLOW_NO_PROGRESS environment variable is set to a true value."""
    return os.environ.get("QATFLOW_NO_PROGRESS", "").lower() not in ("1", "true", "yes")


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar unless progress bars are turned off."""
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not progress_enabled())
