"""One atomic ``.npz`` file per run: model and optimizer variables plus the loop's own state.

The file is replaced (never rewritten in place) after every epoch, so an interruption at any
moment leaves either the previous checkpoint or the new one, both complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from qatflow.storage import atomic_output
from qatflow.training.config import TrainingError

log = logging.getLogger("qatflow.training")

CHECKPOINT_NAME = "finetune-state.npz"
FORMAT_VERSION = 2
# Fingerprint entries that are digests, and what they stand for in messages.
_DIGESTS = {"model": "the starting model (architecture or weights)", "data": "the training data"}


@dataclass
class LoopState:
    """Where the epoch loop stands: epochs done, history and early-stopping bookkeeping."""

    epochs_done: int = 0
    best_metric: float = -math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    best_values: list[np.ndarray] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "epochs_done": self.epochs_done,
            "best_metric": self.best_metric if math.isfinite(self.best_metric) else None,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
            "history": self.history,
        }


def checkpoint_path(directory: str | os.PathLike[str]) -> Path:
    """The checkpoint file inside ``directory``."""
    return Path(directory) / CHECKPOINT_NAME


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    state: LoopState,
    fingerprint: dict[str, Any],
) -> Path:
    """Write model variables (weights and RNG seed states), optimizer variables and ``state``."""
    arrays: dict[str, Any] = {}
    _put(arrays, "model", _values(model.variables))
    _put(arrays, "optimizer", _values(optimizer.variables))
    if state.best_values is not None:
        _put(arrays, "best", state.best_values)
    meta = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "state": state.to_json()}
    arrays["meta"] = np.array(json.dumps(meta))
    path = checkpoint_path(directory)
    with atomic_output(path) as tmp, tmp.open("wb") as handle:
        np.savez(handle, **arrays)
    return path


def load_checkpoint(
    directory: str | os.PathLike[str],
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    fingerprint: dict[str, Any],
) -> LoopState | None:
    """Restore the checkpoint in ``directory`` into ``model`` and the built ``optimizer``.

    Returns None when there is none. Leftovers of writes that were killed are removed. Raises a
    TrainingError naming the file when it was written by a run with other hyperparameters or
    for a model with other variables.
    """
    path = checkpoint_path(directory)
    for stale in path.parent.glob(f".{CHECKPOINT_NAME}.*"):
        stale.unlink(missing_ok=True)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError) as exc:
        raise TrainingError(f"checkpoint {path} cannot be read: {exc}") from exc
    _check_fingerprint(path, meta.get("fingerprint", {}), fingerprint)
    _assign(path, "model", model.variables, _take(arrays, "model"))
    _assign(path, "optimizer", optimizer.variables, _take(arrays, "optimizer"))
    saved = meta["state"]
    best = _take(arrays, "best")
    return LoopState(
        epochs_done=int(saved["epochs_done"]),
        best_metric=-math.inf if saved["best_metric"] is None else float(saved["best_metric"]),
        best_epoch=int(saved["best_epoch"]),
        epochs_without_improvement=int(saved["epochs_without_improvement"]),
        history={key: [float(v) for v in values] for key, values in saved["history"].items()},
        best_values=best or None,
    )


def discard_checkpoint(directory: str | os.PathLike[str]) -> None:
    """Remove the checkpoint in ``directory`` (a run that starts over must not resume it later)."""
    path = checkpoint_path(directory)
    if path.exists():
        log.info("not resuming: removing the old checkpoint %s", path)
        path.unlink()


def assign_values(variables: Sequence[Any], values: Sequence[np.ndarray]) -> None:
    """Assign ``values`` to ``variables`` one by one (shapes already known to match)."""
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


def _values(variables: Sequence[Any]) -> list[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in variables]


def _put(arrays: dict[str, Any], prefix: str, values: Sequence[np.ndarray]) -> None:
    for index, value in enumerate(values):
        arrays[f"{prefix}/{index:05d}"] = value


def _take(arrays: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    keys = sorted(key for key in arrays if key.startswith(prefix + "/"))
    return [arrays[key] for key in keys]


def _check_fingerprint(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    changed = [
        _describe_change(key, saved.get(key), current.get(key))
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if changed:
        raise TrainingError(
            f"checkpoint {path} was written by another run: {'; '.join(changed)}. Pass "
            "--no-resume (resume=False) to discard it and start over, or give another "
            "--checkpoint-dir"
        )


def _describe_change(key: str, saved: Any, current: Any) -> str:
    if key in _DIGESTS:
        return f"{_DIGESTS[key]} differs (digest {str(saved)[:12]}, now {str(current)[:12]})"
    return f"{key}={saved!r} (now {current!r})"


def _assign(path: Path, what: str, variables: Sequence[Any], values: list[np.ndarray]) -> None:
    if len(variables) != len(values):
        raise TrainingError(
            f"checkpoint {path} holds {len(values)} {what} variables but the run has "
            f"{len(variables)}: it belongs to another model"
        )
    for variable, value in zip(variables, values, strict=True):
        if tuple(variable.shape) != value.shape:
            raise TrainingError(
                f"checkpoint {path}: {what} variable {variable.path!r} has shape "
                f"{tuple(variable.shape)} but the checkpoint holds {value.shape}"
            )
    assign_values(variables, values)
