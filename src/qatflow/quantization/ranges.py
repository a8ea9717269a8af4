"""Activation ranges at run time: the QAT policy, first-batch initialisation, inference check.

In training an uncalibrated range (still 0) is set from the first batch it sees (its |x| max)
and then follows the wrapper's policy: ``"frozen"`` keeps it, ``"ema"`` moves it towards each
batch's |x| max. In inference an uncalibrated range would quantize everything to zero, so the
call raises instead. Both decisions read the range when the call is traced, which is right
before the first step runs: Keras traces its train/predict functions on their first batch.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING

import keras
import tensorflow as tf

from qatflow.errors import QuantizationError

if TYPE_CHECKING:
    from qatflow.quantization.wrapper import QuantizeWrapper

log = logging.getLogger("qatflow.quantization")

# Per model, the quantizers already announced as taking their range from a batch.
_announced: weakref.WeakKeyDictionary[keras.layers.Layer, set[str]] = weakref.WeakKeyDictionary()


def is_set(amax: keras.Variable) -> bool:
    """Whether a range variable holds a range (> 0), read eagerly even inside a trace."""
    with tf.init_scope():
        return float(amax.numpy()) > 0.0


def describe_unset(model: keras.layers.Layer, names: list[str]) -> str:
    """``model 'm' has 3 uncalibrated activation quantizer(s) (a:0, b:0, c:0)``."""
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return f"model {model.name!r} has {len(names)} uncalibrated activation quantizer(s) ({shown})"


def training_amax(wrapper: QuantizeWrapper, slot: int, x: tf.Tensor) -> tf.Tensor:
    """The range for one training step, after applying the wrapper's policy to the variable."""
    amax = wrapper.input_amax[slot]
    current = tf.convert_to_tensor(amax.value)
    calibrated = is_set(amax)
    if wrapper.activation_range == "frozen" and calibrated:
        return current
    if not calibrated:
        _announce_first_batch(wrapper)
    batch_amax = tf.reduce_max(tf.abs(tf.stop_gradient(x)))
    if wrapper.activation_range == "ema":
        m = wrapper.ema_momentum
        followed = m * current + (1.0 - m) * batch_amax
    else:
        followed = current
    updated = tf.where(current > 0, followed, batch_amax)
    amax.assign(updated)
    return updated


def inference_amax(wrapper: QuantizeWrapper, slot: int) -> tf.Tensor:
    """The stored range; raises QuantizationError if it was never set."""
    amax = wrapper.input_amax[slot]
    if not is_set(amax):
        raise QuantizationError(
            f"{describe_unset(*wrapper.uncalibrated_in_call())}: in inference they would "
            "quantize every activation to zero. Calibrate first (qatflow.calibrate(qmodel, "
            "data) or `qatflow quantize --calibration-data`), or train the model (fit), "
            "which takes each range from the first training batch"
        )
    return tf.convert_to_tensor(amax.value)


def _announce_first_batch(wrapper: QuantizeWrapper) -> None:
    """Log one line for a model whose uncalibrated ranges are about to come from a batch.

    tf.function may trace a step twice, and eager steps set one range after another: a model
    is announced again only when a quantizer not announced before is unset.
    """
    model, names = wrapper.uncalibrated_in_call()
    announced = _announced.setdefault(model, set())
    if set(names) <= announced:
        return
    announced.update(names)
    log.warning(
        "%s: each takes its range from the first training batch (|x| max) and then follows "
        "activation_range=%r; qatflow.calibrate sets them from inference-mode data instead",
        describe_unset(model, names),
        wrapper.activation_range,
    )
