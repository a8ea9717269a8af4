"""What a dataset holds, as a digest: caches and checkpoints key on it, not on its path alone.

Rewriting a dataset file at the same path leaves its spec unchanged but changes its digest: the
digest covers every file's relative path, size and modification time, and a hash of its first
and last MiB.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qatflow import storage
from qatflow.data.sources import fashion_mnist, is_builtin

SAMPLE_BYTES = 1 << 20


def describe(info: Any) -> dict[str, Any]:
    """The identity of a dataset from its ``DatasetInfo`` (or a like object): every load fact but
    the batch size (trainers re-batch), and the ``content_digest`` of its files."""
    if hasattr(info, "to_dict"):
        described = dict(info.to_dict())
    else:
        described = {k: v for k, v in vars(info).items() if not k.startswith("_")}
    described.pop("batch_size", None)
    uri = described.get("uri")
    described["content"] = content_digest(uri) if isinstance(uri, str) else None
    return described


def dataset_digest(info: Any) -> str:
    """A hex digest of ``describe(info)``."""
    text = json.dumps(describe(info), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def content_digest(uri: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A hex digest of the files behind the dataset ``uri`` (built-in name, path, glob, s3://)."""
    digest = hashlib.sha256()
    for relative, path in sorted(_files(uri, cache_dir)):
        stat = path.stat()
        digest.update(f"{relative}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(SAMPLE_BYTES))
            if stat.st_size > 2 * SAMPLE_BYTES:
                handle.seek(-SAMPLE_BYTES, os.SEEK_END)
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _files(uri: str, cache_dir: str | os.PathLike[str] | None) -> Iterable[tuple[str, Path]]:
    if is_builtin(uri):
        root = fashion_mnist.SYSTEM_DIR
        if not fashion_mnist.is_idx_folder(root):
            root = Path("~/.keras/datasets/fashion-mnist").expanduser()
    elif storage.is_s3_uri(uri):
        root = storage.fetch(uri, cache_dir or storage.cache_dir("datasets"))
    else:
        root = Path(uri).expanduser()
    if root.is_file():
        return [(root.name, root)]
    if root.is_dir():
        return [(p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file()]
    return [(name, Path(name)) for name in glob.glob(str(root)) if Path(name).is_file()]
