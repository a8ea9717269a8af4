"""Compiled train and evaluation steps that run on every replica of a tf.distribute strategy."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from qatflow.errors import ModelError

# (sum of per-example losses, number of correct predictions, number of examples)
StepSums = tuple[tf.Tensor, tf.Tensor, tf.Tensor]


@functools.cache
def default_strategy() -> tf.distribute.Strategy:
    """MirroredStrategy over all GPUs, or over all logical CPUs when there is no GPU and several
    CPU devices are configured; otherwise the default (single-device) strategy.

    One per process: separate MirroredStrategy objects reuse collective-op keys and clash.
    """
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    return tf.distribute.get_strategy()


def replicate(model: keras.Model, strategy: tf.distribute.Strategy) -> keras.Model:
    """``model`` itself if its variables belong to ``strategy``, else a copy made in its scope
    with the same variable values (weights and seed states)."""
    if all(strategy.extended.variable_created_in_scope(v.value) for v in model.variables):
        return model
    with strategy.scope():
        try:
            copy = keras.models.clone_model(model)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise ModelError(
                f"model {model.name!r} cannot be copied onto {strategy.num_replicas_in_sync} "
                f"devices ({exc}); pass strategy=tf.distribute.get_strategy() to train on one"
            ) from exc
    if len(copy.variables) == len(model.variables):
        for target, source in zip(copy.variables, model.variables, strict=True):
            target.assign(source.value)
    else:
        copy.set_weights(model.get_weights())
    return copy


def make_steps(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
    from_logits: bool,
) -> tuple[Callable[[Any], StepSums], Callable[[Any], StepSums]]:
    """A train step and an evaluation step taking one distributed ``(images, labels)`` batch.

    The loss is the mean sparse cross-entropy over the global batch (plus the model's own
    regularization losses); the summed loss, correct count and example count come back reduced
    over replicas.
    """
    trainable = model.trainable_variables
    replicas = strategy.num_replicas_in_sync

    def sums(outputs: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, StepSums]:
        outputs = tf.cast(outputs, tf.float32)
        per_example = keras.losses.sparse_categorical_crossentropy(
            labels, outputs, from_logits=from_logits
        )
        correct = tf.equal(tf.argmax(outputs, axis=-1), labels)
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        total = tf.reduce_sum(per_example)
        return total, (total, tf.reduce_sum(tf.cast(correct, tf.float32)), count)

    def train_replica(images: tf.Tensor, labels: tf.Tensor) -> StepSums:
        labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
        context = tf.distribute.get_replica_context()
        global_count = context.all_reduce(
            tf.distribute.ReduceOp.SUM, tf.cast(tf.shape(labels)[0], tf.float32)
        )
        with tf.GradientTape() as tape:
            total, result = sums(model(images, training=True), labels)
            loss = total / tf.maximum(global_count, 1.0)
            if model.losses:
                loss += tf.add_n(model.losses) / replicas
        gradients = tape.gradient(loss, trainable)
        optimizer.apply_gradients(zip(gradients, trainable, strict=True))
        return result

    def eval_replica(images: tf.Tensor, labels: tf.Tensor) -> StepSums:
        labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
        return sums(model(images, training=False), labels)[1]

    def distributed(replica_fn: Callable[[tf.Tensor, tf.Tensor], StepSums]) -> Any:
        def step(batch: Any) -> StepSums:
            results = strategy.run(replica_fn, args=tuple(batch))
            total, correct, count = (
                strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in results
            )
            return total, correct, count

        return tf.function(step, reduce_retracing=True)

    return distributed(train_replica), distributed(eval_replica)
