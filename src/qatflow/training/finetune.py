"""``finetune``: (QAT) fine-tuning of any Keras 3 classifier with checkpoints and exact resume."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from qatflow.errors import DataError, ModelError
from qatflow.params import FINETUNE, OptimizerName
from qatflow.progress import progress_enabled
from qatflow.training.checkpoint import (
    LoopState,
    assign_values,
    checkpoint_path,
    discard_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from qatflow.training.config import FinetuneConfig, TrainingError, model_digest
from qatflow.training.datasets import EpochBatches, inspect
from qatflow.training.loop import StepSums, default_strategy, make_steps, replicate
from qatflow.training.schedules import ScheduleKind

log = logging.getLogger("qatflow.training")

EpochCallback = Callable[[int, Mapping[str, float]], None]


@dataclass(frozen=True)
class FinetuneResult:
    """The trained model and how training went.

    ``history`` maps ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy`` and
    ``learning_rate`` (at the end of the epoch) to one value per epoch run, including epochs
    run before a resume. ``best_epoch`` is 1-based (0 if no epoch ran).
    """

    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int
    best_val_accuracy: float
    stopped_early: bool
    resumed_from_epoch: int
    num_replicas: int


def finetune(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    *,
    epochs: int,
    learning_rate: float,
    optimizer: OptimizerName = FINETUNE.optimizer,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    warmup_epochs: float = 0.5,
    schedule: ScheduleKind = "cosine",
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    data_digest: str | None = None,
    early_stopping_patience: int | None = None,
    steps_per_epoch: int | None = None,
    batch_size: int | None = None,
    shuffle_buffer: int = 10_000,
    seed: int = 0,
    from_logits: bool | None = None,
    strategy: tf.distribute.Strategy | None = None,
    epoch_callback: EpochCallback | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Train ``model`` (compiled or not, plain or quantized) on ``(images, int labels)`` batches.

    Sparse cross-entropy; SGD with ``momentum`` or Adam (``momentum`` is its beta_1), decoupled
    ``weight_decay`` (not on biases or BN parameters); the learning rate warms up linearly for
    ``warmup_epochs`` and then follows ``schedule``, per optimizer step, computed from the real
    number of steps per epoch (``steps_per_epoch`` or one pass over ``train_ds``). Batches hold
    ``batch_size`` examples (default: the size of ``train_ds``'s batches). Each epoch's
    batch order depends only on (``seed``, epoch); ``train_ds`` must yield the same order on
    every pass. With ``checkpoint_dir`` a checkpoint is written atomically after every epoch,
    and with ``resume`` a run restarts from it and ends with the weights an uninterrupted run
    would have. A checkpoint is resumed only by a run with the same settings, the same starting
    model (architecture and weights) and the same ``data_digest`` (what identifies the training
    data, e.g. ``qatflow.data.dataset_digest``); otherwise a TrainingError says what differs.
    ``early_stopping_patience`` stops after that many epochs without a better validation accuracy
    and restores the best weights. ``from_logits`` None decides from the model's output on the
    first batch. Several GPUs (or logical CPUs) mean MirroredStrategy; the returned model is
    then a copy made in its scope, otherwise ``model`` is trained in place.
    ``epoch_callback(epoch, metrics)`` runs after each epoch's checkpoint.
    """
    config = FinetuneConfig(
        epochs=epochs,
        optimizer=optimizer,
        learning_rate=learning_rate,
        momentum=momentum,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        schedule=schedule,
        early_stopping_patience=early_stopping_patience,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
    )
    if not isinstance(model, keras.Model):
        raise ModelError(f"finetune needs a keras.Model, got {type(model).__name__}")
    keras.utils.set_random_seed(seed)
    facts = inspect(model, train_ds, val_ds, from_logits)
    if not model.trainable_variables:
        raise ModelError(f"model {model.name!r} has no trainable variables")
    strategy = strategy or default_strategy()
    starting_model = model_digest(model) if checkpoint_dir is not None else ""
    batch_size = batch_size or facts.batch_size
    batches = EpochBatches(
        train_ds,
        batch_size=batch_size,
        source_batch_size=facts.batch_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        steps_per_epoch=steps_per_epoch,
        drop_remainder=strategy.num_replicas_in_sync > 1,
        strategy=strategy,
    )
    model = replicate(model, strategy)
    rate = config.schedule_for(batches.steps)
    with strategy.scope():
        opt = config.build_optimizer(rate)
        opt.build(model.trainable_variables)
    fingerprint = config.fingerprint(batch_size, batches.steps, starting_model, data_digest)
    state = LoopState()
    if checkpoint_dir is not None and resume:
        state = load_checkpoint(checkpoint_dir, model, opt, fingerprint) or state
    elif checkpoint_dir is not None:
        discard_checkpoint(checkpoint_dir)
    resumed_from = state.epochs_done
    if resumed_from:
        log.info("resuming from %s after epoch %d", checkpoint_dir, resumed_from)
    log.info(
        "fine-tuning %s for %d epochs of %d steps (batch %d, %d replica(s))",
        model.name,
        epochs,
        batches.steps,
        batch_size,
        strategy.num_replicas_in_sync,
    )
    loop = _Loop(model, opt, strategy, facts.from_logits, config, checkpoint_dir, progress)
    val_batches = strategy.experimental_distribute_dataset(val_ds)
    while state.epochs_done < epochs and not loop.should_stop(state):
        epoch = state.epochs_done
        metrics = loop.train_epoch(batches.for_epoch(epoch), epoch, batches.steps)
        metrics.update(loop.evaluate(val_batches))
        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(rate(opt.iterations - 1)))
        loop.record(state, metrics)
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, model, opt, state, fingerprint)
        log.info("epoch %d/%d: %s", epoch + 1, epochs, _format(metrics))
        if epoch_callback is not None:
            epoch_callback(epoch + 1, dict(metrics))
    if early_stopping_patience is not None and state.best_values is not None:
        assign_values(model.variables, state.best_values)
        log.info("restored the weights of epoch %d (best val_accuracy)", state.best_epoch)
    return FinetuneResult(
        model=model,
        history=state.history,
        best_epoch=state.best_epoch,
        best_val_accuracy=state.best_metric if state.best_epoch else math.nan,
        stopped_early=loop.should_stop(state) and state.epochs_done < epochs,
        resumed_from_epoch=resumed_from,
        num_replicas=strategy.num_replicas_in_sync,
    )


class _Loop:
    """The per-epoch work of ``finetune``: steps with checks, evaluation and bookkeeping."""

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        strategy: tf.distribute.Strategy,
        from_logits: bool,
        config: FinetuneConfig,
        checkpoint_dir: str | os.PathLike[str] | None,
        progress: bool,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.checkpoint_dir = checkpoint_dir
        self.show_progress = progress and progress_enabled()
        self.train_step, self.eval_step = make_steps(model, optimizer, strategy, from_logits)

    def train_epoch(self, batches: Iterator[Any], epoch: int, steps: int) -> dict[str, float]:
        """Run one epoch of train steps; stop with a TrainingError at a non-finite loss."""
        sums = np.zeros(3)
        with tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            leave=False,
            disable=not self.show_progress,
        ) as bar:
            for step, batch in enumerate(batches, start=1):
                values = self._run(
                    self.train_step, batch, f"train step {step} of epoch {epoch + 1}"
                )
                if not math.isfinite(values[0]):
                    raise TrainingError(self._diverged(values[0], epoch, step))
                sums += values
                bar.update(1)
                bar.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", acc=f"{sums[1] / sums[2]:.4f}")
        return {"loss": sums[0] / sums[2], "accuracy": sums[1] / sums[2]}

    def evaluate(self, batches: Any) -> dict[str, float]:
        """Validation loss and accuracy over all of ``batches``."""
        sums = np.zeros(3)
        for index, batch in enumerate(batches, start=1):
            sums += self._run(self.eval_step, batch, f"validation batch {index}")
        if not sums[2]:
            raise DataError("val_ds yielded no examples")
        return {"val_loss": sums[0] / sums[2], "val_accuracy": sums[1] / sums[2]}

    def record(self, state: LoopState, metrics: Mapping[str, float]) -> None:
        """Append ``metrics`` to the history and update the early-stopping bookkeeping."""
        state.epochs_done += 1
        for key, value in metrics.items():
            state.history.setdefault(key, []).append(float(value))
        if metrics["val_accuracy"] > state.best_metric:
            state.best_metric = float(metrics["val_accuracy"])
            state.best_epoch = state.epochs_done
            state.epochs_without_improvement = 0
            if self.config.early_stopping_patience is not None:
                state.best_values = [
                    np.array(keras.ops.convert_to_numpy(v)) for v in self.model.variables
                ]
        else:
            state.epochs_without_improvement += 1

    def should_stop(self, state: LoopState) -> bool:
        """Whether early stopping has run out of patience."""
        patience = self.config.early_stopping_patience
        return patience is not None and state.epochs_without_improvement >= patience

    def _run(self, step: Callable[[Any], StepSums], batch: Any, where: str) -> np.ndarray:
        try:
            return np.array([float(value) for value in step(batch)])
        except tf.errors.InvalidArgumentError as exc:
            raise DataError(f"{where} failed: {exc.message.splitlines()[0]}") from exc

    def _diverged(self, loss: float, epoch: int, step: int) -> str:
        global_step = int(keras.ops.convert_to_numpy(self.optimizer.iterations))
        message = (
            f"loss became {loss} at train step {step} of epoch {epoch + 1} "
            f"(optimizer step {global_step}); stopped. Lower learning_rate "
            f"(now {self.config.learning_rate}) or check the data."
        )
        if self.checkpoint_dir is None:
            return message + " No checkpoint_dir was given, so nothing was saved."
        path = checkpoint_path(self.checkpoint_dir)
        if not Path(path).exists():
            return message + f" No epoch had finished, so {path} was not written."
        return message + f" The last good checkpoint {path} (after epoch {epoch}) is kept."


def _format(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{key}={value:.4g}" for key, value in metrics.items())
