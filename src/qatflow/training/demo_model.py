"""The demo FP32 baseline: a small ResNet-style CNN whose INT8 placement is worth studying."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

# Bump when build_demo_model changes in any way that alters the trained model (pretrain cache key).
DEMO_MODEL_VERSION = 2
# BatchNorm moving averages follow 10% of each batch (Keras default 1%): the statistics settle
# within tens of steps, so even a short smoke-test pretrain yields a usable model.
BN_MOMENTUM = 0.9
DEFAULT_WIDTHS = (16, 32, 64)


def build_demo_model(
    input_shape: Sequence[int], num_classes: int, *, widths: Sequence[int] = DEFAULT_WIDTHS
) -> keras.Model:
    """Conv-BN-ReLU stem, then one residual block per width in ``widths``.

    The first block keeps the stem's resolution and width (identity shortcut); each later block
    halves the resolution and changes the width (1x1 Conv + BN projection shortcut). Global
    average pooling and a softmax Dense classifier follow. Layer names are stable
    (``stem_conv``, ``block2_add``...) so QDQ placement reports are readable.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _conv_bn(inputs, widths[0], 3, 1, "stem")
    x = layers.ReLU(name="stem_relu")(x)
    for index, width in enumerate(widths, start=1):
        x = _residual_block(x, width, 1 if index == 1 else 2, f"block{index}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="demo_resnet")


def _conv_bn(
    x: keras.KerasTensor, width: int, kernel: int, stride: int, name: str
) -> keras.KerasTensor:
    x = layers.Conv2D(
        width, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    return layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)


def _residual_block(x: keras.KerasTensor, width: int, stride: int, name: str) -> keras.KerasTensor:
    shortcut = x
    if stride != 1 or x.shape[-1] != width:
        shortcut = _conv_bn(x, width, 1, stride, f"{name}_proj")
    y = _conv_bn(x, width, 3, stride, f"{name}_a")
    y = layers.ReLU(name=f"{name}_a_relu")(y)
    y = _conv_bn(y, width, 3, 1, f"{name}_b")
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_relu")(y)
