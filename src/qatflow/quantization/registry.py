"""Per-layer quantize configs: which Keras layers get Q/DQ, on what, and along which axis.

The defaults follow TensorRT's Q/DQ placement recommendations: quantize the inputs and
weights of weighted layers and the inputs of average pooling; never outputs; leave
a BatchNormalization that ``quantize_model`` did not fold (``batch_norm_folding``) for
TensorRT to fold into the preceding convolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras

from qatflow.quantization.batch_norm_folding import FoldedBatchNorm


@dataclass(frozen=True)
class LayerQuantizeConfig:
    """How one Keras layer class is quantized by default.

    Attributes:
        weight_axes: weight attribute name -> per-channel (output-channel) axis.
        quantize_input: whether the layer's inputs get Q/DQ by default.
        quantize_weight: whether the weights get Q/DQ by default.
        note: why, shown in the placement summary.
    """

    weight_axes: dict[str, int] = field(default_factory=dict)
    quantize_input: bool = False
    quantize_weight: bool = False
    note: str = ""


_WEIGHTED = "weighted layer: TensorRT runs it in INT8 when input and weights are quantized"
_POOL = "average pooling does not commute with Q/DQ: quantize its input"

_DEFAULTS: dict[type, LayerQuantizeConfig] = {
    keras.layers.Conv1D: LayerQuantizeConfig({"kernel": -1}, True, True, _WEIGHTED),
    keras.layers.Conv2D: LayerQuantizeConfig({"kernel": -1}, True, True, _WEIGHTED),
    keras.layers.Conv3D: LayerQuantizeConfig({"kernel": -1}, True, True, _WEIGHTED),
    # Transposed kernels are (h, w, out, in): the output channel is axis -2.
    keras.layers.Conv2DTranspose: LayerQuantizeConfig({"kernel": -2}, True, True, _WEIGHTED),
    # Depthwise kernels are (h, w, in, multiplier): channels are axis 2.
    keras.layers.DepthwiseConv2D: LayerQuantizeConfig({"kernel": 2}, True, True, _WEIGHTED),
    keras.layers.SeparableConv2D: LayerQuantizeConfig(
        {"depthwise_kernel": 2, "pointwise_kernel": -1}, True, True, _WEIGHTED
    ),
    keras.layers.Dense: LayerQuantizeConfig({"kernel": -1}, True, True, _WEIGHTED),
    keras.layers.AveragePooling2D: LayerQuantizeConfig(quantize_input=True, note=_POOL),
    keras.layers.GlobalAveragePooling2D: LayerQuantizeConfig(quantize_input=True, note=_POOL),
    keras.layers.MaxPooling2D: LayerQuantizeConfig(
        note="commutes with Q/DQ: left in float unless a case needs it"
    ),
    keras.layers.BatchNormalization: LayerQuantizeConfig(
        note="TensorRT folds it into the preceding convolution"
    ),
    FoldedBatchNorm: LayerQuantizeConfig(
        note="a batch norm folded into the weights of the layer before it"
    ),
    keras.layers.Add: LayerQuantizeConfig(note="residual Add: placed by the residual case"),
    keras.layers.Concatenate: LayerQuantizeConfig(note="left to TensorRT unless a case needs it"),
    keras.layers.Multiply: LayerQuantizeConfig(note="left in float unless a case needs it"),
}

# Layers that TensorRT fuses or that carry no arithmetic worth quantizing.
_PASSIVE = (
    keras.layers.InputLayer,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.Dropout,
    keras.layers.Reshape,
    keras.layers.Flatten,
    keras.layers.ZeroPadding2D,
    keras.layers.Rescaling,
    keras.layers.Normalization,
    keras.layers.Softmax,
    keras.layers.Identity,
    keras.layers.Cropping2D,
    keras.layers.UpSampling2D,
    keras.layers.Permute,
)


class LayerRegistry:
    """Layer class -> quantize config; ``quantize_model(registry=...)`` takes one.

    ``LayerRegistry()`` starts from qatflow's defaults; ``copy()`` a registry to change it for
    one model without touching the others. ``DEFAULT_REGISTRY`` is the one used when none is
    given, and ``register_layer_config`` adds to it.
    """

    def __init__(self, configs: dict[type, LayerQuantizeConfig] | None = None) -> None:
        self._configs = dict(_DEFAULTS if configs is None else configs)

    def register(self, layer_class: type, config: LayerQuantizeConfig) -> None:
        """Register (or replace) the config of a Keras layer class, custom ones included."""
        if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
            raise TypeError(f"register_layer_config: {layer_class!r} is not a Keras layer class")
        self._configs[layer_class] = config

    def copy(self) -> LayerRegistry:
        """An independent registry with the same configs."""
        return LayerRegistry(self._configs)

    def config_for(self, layer: keras.layers.Layer) -> LayerQuantizeConfig | None:
        """The config registered for ``layer``'s class (the most specific one), or None."""
        for cls in type(layer).__mro__:
            if cls in self._configs:
                return self._configs[cls]
        return None

    def is_known(self, layer: keras.layers.Layer) -> bool:
        """True when the registry knows how to treat ``layer`` (a config or a passive layer)."""
        return self.config_for(layer) is not None or isinstance(layer, _PASSIVE)

    def float_reason(self, layer: keras.layers.Layer) -> str:
        """Why ``layer`` is left in float, for the placement summary."""
        config = self.config_for(layer)
        if config is None:
            if self.is_known(layer):
                return "left in float: no arithmetic to quantize"
            return f"left in float: unknown layer class {type(layer).__name__}"
        if config.quantize_input or config.quantize_weight:
            return "left in float: not selected (partial mode or spec)"
        return f"left in float: {config.note}"


DEFAULT_REGISTRY = LayerRegistry()


def register_layer_config(layer_class: type, config: LayerQuantizeConfig) -> None:
    """Register (or replace) a layer class's config in ``DEFAULT_REGISTRY``."""
    DEFAULT_REGISTRY.register(layer_class, config)
