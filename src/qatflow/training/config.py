"""Fine-tuning hyperparameters: validation (naming the bad parameter) and a resume fingerprint."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import keras
import numpy as np

from qatflow.errors import QatflowError, flagged
from qatflow.params import OPTIMIZERS, OptimizerName
from qatflow.training.schedules import SCHEDULES, ScheduleKind, WarmupSchedule

# Variables whose names contain these are never weight-decayed (biases, BN scale and offset).
NO_DECAY = ["bias", "gamma", "beta"]
# Settings that ``qatflow finetune`` takes as flags: messages name the flag too.
CLI_FLAGS = frozenset(
    {"epochs", "optimizer", "learning_rate", "early_stopping_patience", "steps_per_epoch"}
)


class TrainingError(QatflowError):
    """Bad hyperparameters, a diverging run, or a checkpoint that does not fit the run."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that shapes the training trajectory besides the model and the data."""

    epochs: int
    optimizer: OptimizerName
    learning_rate: float
    momentum: float
    weight_decay: float
    warmup_epochs: float
    schedule: ScheduleKind
    early_stopping_patience: int | None
    steps_per_epoch: int | None
    batch_size: int | None
    shuffle_buffer: int
    seed: int

    def __post_init__(self) -> None:
        problems = [
            *_check(
                _is_int(self.epochs) and self.epochs >= 1, "epochs", "an int >= 1", self.epochs
            ),
            *_check(
                self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}", self.optimizer
            ),
            *_check(
                _finite(self.learning_rate) and self.learning_rate > 0,
                "learning_rate",
                "a finite number > 0",
                self.learning_rate,
            ),
            *_check(
                _finite(self.momentum) and 0 <= self.momentum < 1,
                "momentum",
                "in [0, 1)",
                self.momentum,
            ),
            *_check(
                _finite(self.weight_decay) and self.weight_decay >= 0,
                "weight_decay",
                "a finite number >= 0",
                self.weight_decay,
            ),
            *_check(
                _finite(self.warmup_epochs)
                and 0 <= self.warmup_epochs < max(_number(self.epochs), 1),
                "warmup_epochs",
                "in [0, epochs)",
                self.warmup_epochs,
            ),
            *_check(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}", self.schedule),
            *_check(
                self.early_stopping_patience is None
                or (_is_int(self.early_stopping_patience) and self.early_stopping_patience >= 1),
                "early_stopping_patience",
                "None or an int >= 1",
                self.early_stopping_patience,
            ),
            *_check(
                self.steps_per_epoch is None
                or (_is_int(self.steps_per_epoch) and self.steps_per_epoch >= 1),
                "steps_per_epoch",
                "None or an int >= 1",
                self.steps_per_epoch,
            ),
            *_check(
                self.batch_size is None or (_is_int(self.batch_size) and self.batch_size >= 1),
                "batch_size",
                "None or an int >= 1",
                self.batch_size,
            ),
            *_check(
                _is_int(self.shuffle_buffer) and self.shuffle_buffer >= 0,
                "shuffle_buffer",
                "an int >= 0",
                self.shuffle_buffer,
            ),
            *_check(_is_int(self.seed) and self.seed >= 0, "seed", "an int >= 0", self.seed),
        ]
        if problems:
            raise TrainingError("invalid fine-tuning settings: " + "; ".join(problems))

    def schedule_for(self, steps_per_epoch: int) -> WarmupSchedule:
        """The learning-rate schedule for ``steps_per_epoch`` real optimizer steps per epoch."""
        return WarmupSchedule(
            self.learning_rate,
            total_steps=self.epochs * steps_per_epoch,
            warmup_steps=round(self.warmup_epochs * steps_per_epoch),
            kind=self.schedule,
        )

    def build_optimizer(self, rate: WarmupSchedule) -> keras.optimizers.Optimizer:
        """A fresh SGD (with momentum) or Adam optimizer following ``rate``."""
        decay = self.weight_decay or None
        optimizer: keras.optimizers.Optimizer
        if self.optimizer == "sgd":
            optimizer = keras.optimizers.SGD(rate, momentum=self.momentum, weight_decay=decay)
        else:
            optimizer = keras.optimizers.Adam(rate, beta_1=self.momentum, weight_decay=decay)
        if decay:
            optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
        return optimizer

    def fingerprint(
        self, batch_size: int, steps_per_epoch: int, model: str, data: str | None
    ) -> dict[str, Any]:
        """What a checkpoint must have been written with to be resumed by this run: these
        settings, the digest of the starting ``model`` and that of the training ``data``."""
        return {
            **asdict(self),
            "batch_size": batch_size,
            "real_steps_per_epoch": steps_per_epoch,
            "model": model,
            "data": data,
        }


def model_digest(model: keras.Model) -> str:
    """A digest of ``model``'s architecture (layer classes, weight shapes and dtypes, in order)
    and of its current weights; layer names are left out (they vary between processes)."""
    digest = hashlib.sha256()
    for layer in _layers(model):
        digest.update(f"{type(layer).__module__}.{type(layer).__qualname__}\n".encode())
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.shape}\t{value.dtype}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _layers(model: keras.Model) -> Iterator[keras.Layer]:
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def _check(ok: bool, name: str, wanted: str, got: object) -> list[str]:
    label = flagged(name) if name in CLI_FLAGS else name
    return [] if ok else [f"{label} must be {wanted}, got {got!r}"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
