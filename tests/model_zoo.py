"""Small Keras models shared by the quantization tests (no weights are downloaded)."""

from __future__ import annotations

import keras
import numpy as np


def small_cnn(
    num_classes: int = 10, input_shape: tuple[int, int, int] = (28, 28, 1)
) -> keras.Model:
    """Conv-BN-ReLU stem, one identity and one projection residual block, GAP, Dense."""
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    y = keras.layers.Conv2D(16, 3, padding="same", name="id_conv1")(x)
    y = keras.layers.BatchNormalization(momentum=0.9, name="id_bn1")(y)
    y = keras.layers.ReLU(name="id_relu1")(y)
    y = keras.layers.Conv2D(16, 3, padding="same", name="id_conv2")(y)
    y = keras.layers.BatchNormalization(momentum=0.9, name="id_bn2")(y)
    x = keras.layers.Add(name="id_add")([x, y])
    x = keras.layers.ReLU(name="id_out")(x)
    shortcut = keras.layers.Conv2D(32, 1, strides=2, name="proj_shortcut")(x)
    shortcut = keras.layers.BatchNormalization(momentum=0.9, name="proj_shortcut_bn")(shortcut)
    y = keras.layers.Conv2D(32, 3, strides=2, padding="same", name="proj_conv")(x)
    y = keras.layers.BatchNormalization(momentum=0.9, name="proj_bn")(y)
    x = keras.layers.Add(name="proj_add")([shortcut, y])
    x = keras.layers.ReLU(name="proj_out")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def separable_transpose_model() -> keras.Model:
    """SeparableConv2D, DepthwiseConv2D, Conv2DTranspose and AveragePooling2D in one model."""
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.SeparableConv2D(16, 3, padding="same", depth_multiplier=2, name="sep")(inputs)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="down")(x)
    x = keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same", name="up")(x)
    x = keras.layers.AveragePooling2D(2, name="avg")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(5, name="logits")(x)
    return keras.Model(inputs, outputs, name="sep_transpose")


def nested_model() -> keras.Model:
    """A Sequential head on a Functional backbone used as a layer."""
    backbone = small_cnn(num_classes=8)
    backbone_features = keras.Model(
        backbone.input, backbone.get_layer("gap").output, name="backbone"
    )
    inputs = keras.Input((28, 28, 1), name="outer_image")
    features = backbone_features(inputs)
    outputs = keras.layers.Dense(3, name="head")(features)
    return keras.Model(inputs, outputs, name="nested")


def images(count: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Deterministic random images in [0, 1]."""
    return np.random.default_rng(seed).random((count, *shape), dtype=np.float32)
