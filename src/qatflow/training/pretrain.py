"""``pretrain``: the cached demo FP32 baseline (``build_demo_model`` trained on a dataset)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from qatflow import storage
from qatflow.data import DatasetBundle
from qatflow.data.fingerprint import describe
from qatflow.errors import DataError
from qatflow.params import MODEL, OptimizerName
from qatflow.storage import atomic_output, file_sha256, write_json
from qatflow.training.demo_model import DEFAULT_WIDTHS, DEMO_MODEL_VERSION, build_demo_model
from qatflow.training.finetune import finetune
from qatflow.training.schedules import ScheduleKind

log = logging.getLogger("qatflow.training")

DataArg = DatasetBundle | tuple[tf.data.Dataset, tf.data.Dataset, tf.data.Dataset, Any]


@dataclass(frozen=True)
class Recipe:
    """The pretraining hyperparameters (measured on Fashion-MNIST: see docs/training.md)."""

    epochs: int = MODEL.pretrain_epochs
    batch_size: int = 128
    optimizer: OptimizerName = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.3
    schedule: ScheduleKind = "cosine"


def pretrain(
    data: DataArg,
    output_path: str | os.PathLike[str],
    *,
    epochs: int = Recipe.epochs,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train the demo model on ``data`` and write it to ``output_path`` (``.keras``).

    ``data`` is a ``DatasetBundle`` or ``(train, validation, test, info)`` where ``info`` has
    ``input_shape`` and ``num_classes`` (a ``DatasetInfo``). The trained model is cached in
    ``cache_dir`` (default ``$QATFLOW_CACHE_DIR/pretrain``) under a hash of the model version,
    the recipe, ``seed`` and the dataset's identity (all of ``info``) and content (its files:
    see ``qatflow.data.content_digest``); a later call with the same key copies the cached file
    without training, once its SHA-256 (written beside it) checks out. A cache entry that fails
    the check is discarded and the model retrained. An interrupted training resumes from its
    checkpoint in the cache. Test accuracy and time go to the log and to the ``.json`` beside
    the cached model.
    """
    train, validation, test, info = _unpack(data)
    recipe = Recipe(epochs=epochs)
    dataset = describe(info)
    key = cache_key(info, recipe, seed, dataset=dataset)
    cache = Path(cache_dir) if cache_dir is not None else storage.cache_dir("pretrain")
    cached = cache / f"demo-{key}.keras"
    if _verified(cached):
        log.info("pretrain: cache hit %s", cached)
    else:
        _train(train, validation, test, info, recipe, seed, cached, progress, dataset)
    with atomic_output(output_path) as tmp:
        shutil.copyfile(cached, tmp)
    return Path(output_path)


def cache_key(
    info: Any, recipe: Recipe, seed: int, *, dataset: dict[str, Any] | None = None
) -> str:
    """A short hash of everything that determines the pretrained model; ``dataset`` is
    ``qatflow.data.fingerprint.describe(info)`` when already computed."""
    identity = {
        "model_version": DEMO_MODEL_VERSION,
        "widths": list(DEFAULT_WIDTHS),
        "recipe": asdict(recipe),
        "seed": seed,
        "dataset": dataset if dataset is not None else describe(info),
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _train(
    train: tf.data.Dataset,
    validation: tf.data.Dataset,
    test: tf.data.Dataset,
    info: Any,
    recipe: Recipe,
    seed: int,
    cached: Path,
    progress: bool,
    dataset: dict[str, Any],
) -> None:
    started = time.monotonic()
    keras.utils.set_random_seed(seed)
    model = build_demo_model(info.input_shape, info.num_classes)
    checkpoints = cached.with_suffix(".ckpt")
    result = finetune(
        model,
        train,
        validation,
        seed=seed,
        checkpoint_dir=checkpoints,
        progress=progress,
        data_digest=cache_key(info, recipe, seed, dataset=dataset),
        **asdict(recipe),
    )
    accuracy = _accuracy(result.model, test)
    seconds = time.monotonic() - started
    log.info("pretrain: test accuracy %.4f after %.0f s", accuracy, seconds)
    with atomic_output(cached) as tmp:
        result.model.save(tmp)
    summary = {
        "test_accuracy": accuracy,
        "val_accuracy": result.history["val_accuracy"][-1],
        "seconds": round(seconds, 1),
        "recipe": asdict(recipe),
        "seed": seed,
        "dataset": dataset,
        "sha256": file_sha256(cached),
    }
    write_json(cached.with_suffix(".json"), summary)
    shutil.rmtree(checkpoints, ignore_errors=True)


def _unpack(data: DataArg) -> tuple[tf.data.Dataset, tf.data.Dataset, tf.data.Dataset, Any]:
    if isinstance(data, DatasetBundle):
        return data.train, data.validation, data.test, data.info
    if isinstance(data, tuple) and len(data) == 4:
        info = data[3]
        if not (hasattr(info, "input_shape") and hasattr(info, "num_classes")):
            raise DataError(
                "pretrain: the info in (train, val, test, info) needs input_shape and num_classes"
            )
        return data
    raise DataError(
        f"pretrain needs a DatasetBundle or (train, val, test, info), got {type(data).__name__}"
    )


def _verified(cached: Path) -> bool:
    """Whether ``cached`` exists and matches the SHA-256 in its ``.json``; a bad one is removed."""
    if not cached.exists():
        return False
    summary = cached.with_suffix(".json")
    try:
        expected = json.loads(summary.read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        expected = None
    if expected == file_sha256(cached):
        return True
    log.warning("pretrain: discarding the cache entry %s (checksum mismatch); retraining", cached)
    cached.unlink()
    summary.unlink(missing_ok=True)
    return False


def _accuracy(model: keras.Model, ds: tf.data.Dataset) -> float:
    correct = total = 0
    for images, labels in ds:
        predicted = np.argmax(keras.ops.convert_to_numpy(model(images, training=False)), axis=-1)
        correct += int(np.sum(predicted == np.reshape(labels.numpy(), -1)))
        total += int(predicted.shape[0])
    if not total:
        raise DataError("pretrain: the test split is empty")
    return correct / total
