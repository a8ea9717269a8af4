"""Per-step learning-rate schedules with linear warm-up."""

from __future__ import annotations

import math
from typing import Any, Literal

import keras
from keras import ops

ScheduleKind = Literal["cosine", "piecewise", "constant"]
SCHEDULES: tuple[ScheduleKind, ...] = ("cosine", "piecewise", "constant")
# "piecewise": multiplier 1 until half of the post-warm-up steps, 0.1 until three quarters, then
# 0.01 (the step decay of the ResNet recipes, placed relative to the run length).
PIECEWISE = ((0.5, 0.1), (0.75, 0.01))


@keras.saving.register_keras_serializable(package="qatflow")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up over ``warmup_steps`` optimizer steps, then ``kind`` decay to ``total_steps``.

    Steps are optimizer updates (``optimizer.iterations``), so the warm-up length must come from
    the real number of steps per epoch, not the dataset size.
    """

    def __init__(
        self, base_lr: float, total_steps: int, warmup_steps: int, kind: ScheduleKind
    ) -> None:
        super().__init__()
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.kind = kind

    def __call__(self, step: Any) -> Any:
        step = ops.cast(step, "float32")
        warmup = float(max(self.warmup_steps, 1))
        warming = self.base_lr * (step + 1.0) / warmup
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        after = self._after_warmup(progress)
        if self.warmup_steps == 0:
            return after
        return ops.where(step < self.warmup_steps, warming, after)

    def _after_warmup(self, progress: Any) -> Any:
        base = ops.cast(self.base_lr, "float32")
        if self.kind == "cosine":
            return base * 0.5 * (1.0 + ops.cos(math.pi * progress))
        if self.kind == "piecewise":
            rate = ops.ones_like(progress) * base
            for start, multiplier in PIECEWISE:
                rate = ops.where(progress >= start, base * multiplier, rate)
            return rate
        return ops.ones_like(progress) * base

    def get_config(self) -> dict[str, Any]:
        return {
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
        }
