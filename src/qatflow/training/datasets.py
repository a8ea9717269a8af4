"""Training data for the epoch loop: checks against the model and a per-epoch batch order that
is a pure function of (seed, epoch), so a resumed run sees exactly the batches it would have."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from qatflow.errors import DataError, ModelError
from qatflow.quantization.observer import float_activations

log = logging.getLogger("qatflow.training")


@dataclass(frozen=True)
class DataFacts:
    """What the loop needs to know about the model and the train data before the first step."""

    batch_size: int
    num_classes: int
    from_logits: bool


def inspect(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    from_logits: bool | None,
) -> DataFacts:
    """Check that both datasets yield ``(images, int labels)`` batches that fit ``model``.

    Compares image shapes with the model input, runs the model on the first train batch,
    checks that its labels are class indices below the model's class count, and decides whether
    the model outputs logits or probabilities when ``from_logits`` is None. Raises a DataError
    naming the dataset and what does not fit, before any training step.
    """
    for name, ds in (("train_ds", train_ds), ("val_ds", val_ds)):
        _check_spec(model, name, ds)
    images, labels = _first_batch("train_ds", train_ds)
    try:
        # Float activations: a quantized model whose ranges are still unset can be probed too.
        with float_activations():
            outputs = keras.ops.convert_to_numpy(model(images, training=False))
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
        raise DataError(
            f"model {model.name!r} cannot run on a train_ds batch of shape {images.shape}: {exc}"
        ) from exc
    if outputs.ndim != 2 or outputs.shape[0] != images.shape[0]:
        raise ModelError(
            f"model {model.name!r} must output one row of class scores per image, got output "
            f"shape {outputs.shape} for a batch of {images.shape[0]}"
        )
    num_classes = int(outputs.shape[1])
    for name, ds in (("train_ds", train_ds), ("val_ds", val_ds)):
        batch_labels = labels if name == "train_ds" else _first_batch(name, ds)[1]
        _check_labels(model, name, batch_labels, num_classes)
    if from_logits is None:
        from_logits = not _looks_like_probabilities(outputs)
    return DataFacts(int(images.shape[0]), num_classes, from_logits)


def full_epoch_steps(
    ds: tf.data.Dataset, batch_size: int, source_batch_size: int, drop_remainder: bool
) -> int:
    """The number of batches of ``batch_size`` in one pass over the batched ``ds``.

    A dataset of known cardinality re-batched to its own batch size needs no pass over it;
    otherwise its examples are counted once (unless its batch dimension is static).
    """
    cardinality = int(ds.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise DataError("train_ds is infinite (repeat()?): pass steps_per_epoch")
    if cardinality >= 0 and batch_size == source_batch_size and not drop_remainder:
        return cardinality
    batch_dim = ds.element_spec[0].shape[0]
    if cardinality >= 0 and batch_dim is not None:
        examples = cardinality * int(batch_dim)
    else:
        log.info("counting the train examples (one pass over train_ds)")
        examples = int(
            ds.reduce(np.int64(0), lambda n, batch: n + tf.cast(tf.shape(batch[1])[0], tf.int64))
        )
    steps = examples // batch_size if drop_remainder else math.ceil(examples / batch_size)
    if steps == 0:
        raise DataError(
            f"train_ds has {examples} examples, fewer than one batch of {batch_size}; "
            "use a smaller batch_size"
        )
    return steps


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of ``epoch``: distinct per (seed, epoch), the same in every process."""
    return (seed * 1_000_003 + epoch * 7919 + 1) % (2**31 - 1)


class EpochBatches:
    """The batches of each epoch, identical whenever (seed, epoch) are.

    Full epochs (``steps_per_epoch`` None) re-batch ``train_ds`` after a shuffle seeded by
    (seed, epoch). With ``steps_per_epoch``, one endless shuffled stream is cut into epochs of
    that many batches, so short epochs walk through all the data; a resumed run skips the
    batches of the epochs already done. Either way ``train_ds`` itself must yield the same
    order on every pass (shuffling is done here).
    """

    def __init__(
        self,
        train_ds: tf.data.Dataset,
        *,
        batch_size: int,
        source_batch_size: int,
        seed: int,
        shuffle_buffer: int,
        steps_per_epoch: int | None,
        drop_remainder: bool,
        strategy: tf.distribute.Strategy,
    ) -> None:
        self._examples = train_ds.unbatch()
        self._batch_size = batch_size
        self._seed = seed
        self._shuffle_buffer = shuffle_buffer
        self._fixed_steps = steps_per_epoch
        self._drop_remainder = drop_remainder
        self._strategy = strategy
        self._stream: Iterator[Any] | None = None
        self._stream_epoch = -1
        if steps_per_epoch is None:
            self.steps = full_epoch_steps(train_ds, batch_size, source_batch_size, drop_remainder)
        else:
            self.steps = steps_per_epoch

    def for_epoch(self, epoch: int) -> Iterator[Any]:
        """The distributed batches of ``epoch`` (0-based), ``self.steps`` of them."""
        if self._fixed_steps is None:
            ds = self._shuffled(epoch_seed(self._seed, epoch))
            ds = ds.batch(self._batch_size, drop_remainder=self._drop_remainder)
            return iter(
                self._strategy.experimental_distribute_dataset(ds.prefetch(tf.data.AUTOTUNE))
            )
        if self._stream is None or self._stream_epoch != epoch:
            stream = self._shuffled(epoch_seed(self._seed, 0)).repeat()
            stream = stream.batch(self._batch_size, drop_remainder=True)
            stream = stream.skip(epoch * self.steps).prefetch(tf.data.AUTOTUNE)
            self._stream = iter(self._strategy.experimental_distribute_dataset(stream))
        self._stream_epoch = epoch + 1
        return _take(self._stream, self.steps)

    def _shuffled(self, seed: int) -> tf.data.Dataset:
        if not self._shuffle_buffer:
            return self._examples
        return self._examples.shuffle(self._shuffle_buffer, seed=seed)


def _take(iterator: Iterator[Any], count: int) -> Iterator[Any]:
    for _ in range(count):
        yield next(iterator)


def _check_spec(model: keras.Model, name: str, ds: tf.data.Dataset) -> None:
    spec = ds.element_spec
    if not isinstance(spec, tuple) or len(spec) != 2:
        raise DataError(f"{name} must yield (images, labels) batches, it yields {spec}")
    image_spec, label_spec = spec
    if not label_spec.dtype.is_integer:
        raise DataError(
            f"{name} labels must be integer class indices, got {label_spec.dtype.name} "
            "(one-hot labels are not supported)"
        )
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return
    if not inputs:
        return
    expected = tuple(inputs[0].shape[1:])
    got = tuple(image_spec.shape[1:])
    if len(expected) != len(got) or any(
        want is not None and have is not None and want != have
        for want, have in zip(expected, got, strict=True)
    ):
        raise DataError(
            f"{name} yields images of shape {got} but model {model.name!r} expects "
            f"{expected} (batch dimension left out)"
        )


def _first_batch(name: str, ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    batch = next(iter(ds.take(1)), None)
    if batch is None:
        raise DataError(f"{name} is empty")
    images, labels = (np.asarray(part) for part in batch)
    return images, labels


def _check_labels(model: keras.Model, name: str, labels: np.ndarray, classes: int) -> None:
    if (labels.ndim == 2 and labels.shape[1] != 1) or labels.ndim > 2:
        raise DataError(
            f"{name} labels must have shape (batch,) with class indices, got {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = int(labels.max()) if labels.max() >= classes else int(labels.min())
        raise DataError(
            f"{name} has label {bad} but model {model.name!r} outputs {classes} classes "
            f"(labels must be 0..{classes - 1})"
        )


def _looks_like_probabilities(outputs: np.ndarray) -> bool:
    return bool(
        np.all(outputs >= 0)
        and np.all(outputs <= 1)
        and np.allclose(outputs.sum(axis=1), 1, atol=1e-3)
    )
