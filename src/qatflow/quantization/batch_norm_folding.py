"""Batch norm folded into the layer before it, before quantization.

A BatchNormalization right after a convolution or Dense layer is, in inference, a per-channel
affine map. Folded into that layer's kernel and bias *before* the weights are quantized, the
exported Q/DQ graph has no batch norm left, and every runtime that fuses the layer into an
integer kernel computes exactly what the graph says. Left in, TensorRT and ONNX Runtime fold it
into weights that are already quantized, which rounds them a second time: the engine then
differs from its reference (docs/exact-int8.md, "Batch norm and bias folded before
quantization").

During QAT a folded model trains without batch norm: the moving statistics are frozen into the
weights, as PyTorch's QAT recipe freezes them for its last epochs (``freeze_bn_stats``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from qatflow.keras_compat import inbound_nodes
from qatflow.quantization import graph

# Layer class -> the kernel attribute the batch norm scales and its output-channel axis.
_FOLDABLE: tuple[tuple[type, str, int], ...] = (
    (keras.layers.SeparableConv2D, "pointwise_kernel", -1),
    (keras.layers.DepthwiseConv2D, "kernel", 2),
    (keras.layers.Conv2DTranspose, "kernel", -2),
    (keras.layers.Conv1D, "kernel", -1),
    (keras.layers.Conv2D, "kernel", -1),
    (keras.layers.Conv3D, "kernel", -1),
    (keras.layers.Dense, "kernel", -1),
)


@dataclass(frozen=True)
class BatchNormFold:
    """One batch norm to fold: ``norm`` is the only consumer of ``layer``'s output."""

    layer: keras.layers.Layer
    norm: keras.layers.BatchNormalization


@keras.saving.register_keras_serializable(package="qatflow")
class FoldedBatchNorm(keras.layers.Layer):
    """Where a folded batch norm was: passes its input through, names the layer it went into."""

    def __init__(self, folded_into: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.folded_into = folded_into

    def call(self, inputs: Any, **kwargs: Any) -> Any:
        return inputs

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "folded_into": self.folded_into}


def _kernel_of(layer: keras.layers.Layer) -> tuple[str, int] | None:
    for cls, attr, axis in _FOLDABLE:
        if isinstance(layer, cls):
            return attr, axis
    return None


def _channel_axis(layer: keras.layers.Layer, rank: int) -> int:
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return 1
    return rank - 1


def _is_linear(layer: keras.layers.Layer) -> bool:
    activation = getattr(layer, "activation", None)
    return activation is None or activation is keras.activations.linear


def _foldable(norm: keras.layers.Layer, owner: keras.Model) -> BatchNormFold | None:
    """The fold of ``norm`` into its producer, or None when it cannot be folded exactly."""
    if not isinstance(norm, keras.layers.BatchNormalization) or len(inbound_nodes(norm)) != 1:
        return None
    parents = graph.producers(norm, owner)
    if len(parents) != 1:
        return None
    layer = parents[0]
    if _kernel_of(layer) is None or len(inbound_nodes(layer)) != 1 or not _is_linear(layer):
        return None
    if len(graph.consumers(layer, owner)) != 1 or any(layer.output is out for out in owner.outputs):
        return None
    rank = len(layer.output.shape)
    axis = norm.axis if isinstance(norm.axis, int) else None
    if axis is None or axis % rank != _channel_axis(layer, rank):
        return None
    return BatchNormFold(layer, norm)


def find_batch_norm_folds(model: keras.Model) -> list[BatchNormFold]:
    """Every batch norm of ``model`` (nested models included) that can be folded exactly:
    the only consumer of a linear convolution or Dense layer, normalizing its channels."""
    folds = []
    for owner in graph.iter_models(model):
        for layer in owner.layers:
            fold = _foldable(layer, owner)
            if fold is not None:
                folds.append(fold)
    return folds


def _norm_affine(norm: keras.layers.BatchNormalization) -> tuple[np.ndarray, np.ndarray]:
    """(gain, shift) per channel: ``norm(x) == x * gain + shift`` in inference."""
    mean = np.asarray(norm.moving_mean, np.float64)
    variance = np.asarray(norm.moving_variance, np.float64)
    gamma = np.asarray(norm.gamma, np.float64) if norm.scale else np.ones_like(mean)
    beta = np.asarray(norm.beta, np.float64) if norm.center else np.zeros_like(mean)
    gain = gamma / np.sqrt(variance + norm.epsilon)
    return gain, beta - mean * gain


def folded_weights(fold: BatchNormFold) -> dict[str, np.ndarray]:
    """The folded layer's kernel (and, for a separable convolution, depthwise kernel) and
    bias, computed in float64 and stored as float32."""
    layer = fold.layer
    attr, axis = _kernel_of(layer)  # type: ignore[misc]
    gain, shift = _norm_affine(fold.norm)
    kernel = np.asarray(getattr(layer, attr), np.float64)
    shape = [1] * kernel.ndim
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        shape[2:] = kernel.shape[2:]  # output channel = input channel * multiplier + m
    else:
        shape[axis] = kernel.shape[axis]
    bias = np.asarray(layer.bias, np.float64) if layer.use_bias else np.zeros_like(gain)
    weights = {attr: (kernel * gain.reshape(shape)).astype(np.float32)}
    weights["bias"] = (bias * gain + shift).astype(np.float32)
    if isinstance(layer, keras.layers.SeparableConv2D):
        weights["depthwise_kernel"] = np.asarray(layer.depthwise_kernel, np.float32)
    return weights


def fold_batch_norms(
    model: keras.Model, keep: Collection[int] = ()
) -> tuple[keras.Model, list[BatchNormFold]]:
    """A copy of ``model`` with every foldable batch norm (:func:`find_batch_norm_folds`)
    but those whose ``id`` is in ``keep`` folded into the layer before it and replaced by a
    :class:`FoldedBatchNorm` of the same name, and the folds made; ``model`` itself is left
    untouched (and returned as it is when there is nothing to fold)."""
    folds = [f for f in find_batch_norm_folds(model) if id(f.norm) not in keep]
    if not folds:
        return model, []
    by_layer = {id(f.layer): f for f in folds}
    norms = {id(f.norm): f.layer.name for f in folds}
    copies: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if id(layer) in norms:
            return FoldedBatchNorm(folded_into=norms[id(layer)], name=layer.name)
        takes_fold = id(layer) in by_layer
        copy = graph.copy_layer(layer, use_bias=True) if takes_fold else graph.copy_layer(layer)
        copies.append((layer, copy))
        return copy

    folded = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for original, copy in copies:
        fold = by_layer.get(id(original))
        if fold is None:
            graph.copy_state(original, copy)
            continue
        values = folded_weights(fold)
        for variable in copy.weights:
            variable.assign(values[variable.name])
    return folded, folds
