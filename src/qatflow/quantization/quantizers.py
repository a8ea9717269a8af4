"""Fake-quantization ops in TensorRT's INT8 format: symmetric, zero-point 0, narrow range.

Both ops are TensorFlow QuantizeAndDequantize ops, which tf2onnx turns into
QuantizeLinear/DequantizeLinear pairs with constant scales.
"""

from __future__ import annotations

import tensorflow as tf

NUM_BITS = 8
QMAX = 2 ** (NUM_BITS - 1) - 1  # 127: narrow range [-127, 127]
# Smallest range a quantizer may use. An all-zero weight channel (a dead channel) would
# otherwise give a zero scale, which TensorRT and ONNX Runtime reject.
MIN_AMAX = 1e-7
INT32_MAX = 2.0**31 - 1


def fake_quant_per_tensor(x: tf.Tensor, amax: tf.Tensor) -> tf.Tensor:
    """Quantize-dequantize ``x`` with one symmetric range ``[-amax, amax]``.

    The gradient is straight-through inside the range and zero outside it.
    """
    amax = tf.maximum(tf.cast(amax, x.dtype), MIN_AMAX)
    return tf.quantization.quantize_and_dequantize_v2(
        x,
        -amax,
        amax,
        signed_input=True,
        num_bits=NUM_BITS,
        range_given=True,
        narrow_range=True,
    )


def amax_to_scale(amax: tf.Tensor) -> tf.Tensor:
    """The int8 scale of a symmetric narrow range ``[-amax, amax]`` (floored at ``MIN_AMAX``)."""
    return tf.maximum(amax, MIN_AMAX) / QMAX


def fake_quant_bias(bias: tf.Tensor, input_amax: tf.Tensor, weight_amax: tf.Tensor) -> tf.Tensor:
    """Round ``bias`` to the int32 unit ``s_x * s_w`` (per output channel) that an integer
    convolution adds it in, so the Q/DQ graph holds the bias the kernel adds.

    The gradient is straight-through; the unit is a constant to it.
    """
    unit = tf.stop_gradient(
        amax_to_scale(tf.cast(input_amax, bias.dtype)) * amax_to_scale(weight_amax)
    )
    units = tf.clip_by_value(tf.round(bias / unit), -INT32_MAX, INT32_MAX)
    return bias + tf.stop_gradient(units * unit - bias)


def channel_amax(w: tf.Tensor, axis: int) -> tf.Tensor:
    """Per-channel absolute maximum of ``w`` along ``axis``, floored at ``MIN_AMAX``."""
    axis = axis % len(w.shape)
    reduce_axes = [i for i in range(len(w.shape)) if i != axis]
    return tf.maximum(tf.reduce_max(tf.abs(w), axis=reduce_axes), MIN_AMAX)


def fake_quant_per_channel(w: tf.Tensor, axis: int) -> tf.Tensor:
    """Quantize-dequantize weights per channel along ``axis`` with their current abs-max.

    QuantizeAndDequantizeV3 is used because V4 only takes scalar ranges in TF 2.21; its
    gradient is straight-through, exact here since the range covers every weight.
    """
    axis = axis % len(w.shape)
    amax = channel_amax(w, axis)
    return tf.raw_ops.QuantizeAndDequantizeV3(
        input=w,
        input_min=-amax,
        input_max=amax,
        num_bits=NUM_BITS,
        signed_input=True,
        range_given=True,
        narrow_range=True,
        axis=axis,
    )
