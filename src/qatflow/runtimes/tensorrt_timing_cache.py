"""The TensorRT timing cache file, shared by builds: loaded before, merged into after.

Builds into one folder share ``tensorrt.timing-cache``. A build loads it if it matches this GPU
and TensorRT (else it starts from an empty cache and says so). When the build is written, the
file is read again under an exclusive lock (``<cache>.lock``, ``fcntl.flock``), combined into
this build's cache with ``ITimingCache.combine`` and written back, so concurrent builds add to
each other's entries instead of overwriting them. A file that does not combine (made by another
GPU or TensorRT version) is left as it is and this build's cache is not saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorrt as trt_t

logger = logging.getLogger("qatflow.runtimes.tensorrt")


@dataclasses.dataclass(frozen=True)
class CacheUpdate:
    """What to write to the cache file (None: leave it) and why."""

    data: bytes | None
    note: str


def lock_path(cache: Path) -> Path:
    """``<cache>.lock`` beside the cache file (the cache itself is replaced by renames)."""
    return cache.with_name(cache.name + ".lock")


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    """Hold the cache's exclusive lock (blocking) for a read-combine-write."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with lock_path(cache).open("ab") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def attach(config: trt_t.IBuilderConfig, path: Path | None) -> bool:
    """Attach a timing cache (from ``path`` if readable and compatible); True if reused."""
    if path is None:
        return False
    data = _read(path)
    if data:
        cache = _deserialize(config, data, path)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            logger.info("reusing TensorRT timing cache %s", path)
            return True
        logger.warning("timing cache %s does not match this GPU/TensorRT; starting anew", path)
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return False


def merged(config: trt_t.IBuilderConfig, path: Path) -> CacheUpdate:
    """This build's cache combined with the file as it is now (call under :func:`locked`)."""
    ours = config.get_timing_cache()
    data = _read(path)
    theirs = _deserialize(config, data, path) if data else None
    if data and theirs is None:
        note = "replaced an unreadable cache file"
    elif theirs is not None and not ours.combine(theirs, ignore_mismatch=False):
        logger.warning(
            "timing cache %s is from another GPU or TensorRT version: left as it is, this "
            "build's cache is not saved (give this GPU its own timing_cache path)",
            path,
        )
        return CacheUpdate(None, "not saved: the file holds another GPU's or TensorRT's cache")
    else:
        note = "combined with the file's entries" if theirs is not None else "new file"
    return CacheUpdate(bytes(ours.serialize()), note)


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b""


def _deserialize(
    config: trt_t.IBuilderConfig, data: bytes, path: Path
) -> trt_t.ITimingCache | None:
    try:
        cache: trt_t.ITimingCache | None = config.create_timing_cache(data)
    except Exception as exc:  # a corrupt cache file must not fail the build
        logger.warning("ignoring unreadable timing cache %s: %s", path, exc)
        return None
    return cache
