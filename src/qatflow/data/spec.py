"""Dataset specs: a JSON file from which the next pipeline step rebuilds the same splits."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qatflow import storage
from qatflow.data.bundle import LOAD_ARGS, DatasetBundle, DatasetInfo
from qatflow.data.loader import load_dataset
from qatflow.errors import DataError
from qatflow.storage import write_json


def write_dataset_spec(
    source: DatasetBundle | DatasetInfo | Mapping[str, Any], path: str | os.PathLike[str]
) -> Path:
    """Write the spec of a loaded bundle (its full ``DatasetInfo``) or of ``load_dataset``
    keyword arguments (must include ``uri``) to ``path`` as JSON; return the path."""
    if isinstance(source, DatasetBundle):
        source = source.info
    if isinstance(source, DatasetInfo):
        data = source.to_dict()
    else:
        data = dict(source)
        _check_keys(data, set(LOAD_ARGS), f"load_dataset arguments {sorted(data)}")
    return write_json(path, data)


def load_dataset_from_spec(
    path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    shuffle_train: bool = True,
) -> DatasetBundle:
    """Call ``load_dataset`` with the arguments in the spec at ``path`` (local or ``s3://``).

    When the spec holds a full ``DatasetInfo``, the reloaded dataset must match it (same
    classes, shapes and split sizes), otherwise a DataError says what changed.
    """
    if storage.is_s3_uri(path):
        path = storage.fetch(path, storage.cache_dir("specs"))
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"dataset spec not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"dataset spec {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"dataset spec {path} must hold a JSON object")
    full = set(DatasetInfo.__dataclass_fields__)
    _check_keys(data, full, f"dataset spec {path}")
    args = {key: data[key] for key in LOAD_ARGS if key in data}
    if args.get("image_size") is not None:
        args["image_size"] = tuple(args["image_size"])
    bundle = load_dataset(**args, cache_dir=cache_dir, shuffle_train=shuffle_train)
    if set(data) == full:
        expected = DatasetInfo.from_dict(data).to_dict()
        got = bundle.info.to_dict()
        changed = [f"{k}: {expected[k]} -> {got[k]}" for k in sorted(full) if expected[k] != got[k]]
        if changed:
            raise DataError(
                f"dataset {bundle.info.uri} no longer matches spec {path}: {'; '.join(changed)}"
            )
    return bundle


def _check_keys(data: Mapping[str, Any], allowed: set[str], what: str) -> None:
    if "uri" not in data:
        raise DataError(f"{what} lacks the dataset 'uri'")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise DataError(f"{what}: unknown keys {', '.join(unknown)}")
