"""QuantizeWrapper: Q/DQ on a layer's selected inputs and on its weights, never its outputs."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from qatflow.keras_compat import StatelessScope, called_model
from qatflow.params import ACTIVATION_RANGES
from qatflow.quantization import graph, observer, ranges
from qatflow.quantization.quantizers import (
    channel_amax,
    fake_quant_bias,
    fake_quant_per_channel,
    fake_quant_per_tensor,
)


@keras.saving.register_keras_serializable(package="qatflow")
class QuantizeWrapper(keras.layers.Wrapper):
    """Wraps a Keras layer with TensorRT-style fake quantization.

    Args:
        layer: the float layer; its weights stay trainable float variables.
        input_indices: which inputs get per-tensor Q/DQ (``[0]`` for a single-input layer).
        weight_axes: weight attribute -> output-channel axis, for per-channel weight Q/DQ
            from the weights' current abs-max at every call. A layer whose input and
            ``kernel`` are both quantized also has its bias rounded to the int32 unit
            ``s_x * s_w`` that integer kernels add it in (``fake_quant_bias``).
        reason: why the layer is quantized (shown in the placement summary).
        activation_range: how input ranges evolve in training: ``"frozen"`` keeps the
            calibrated ranges; ``"ema"`` follows an exponential moving average of each
            batch's abs-max. Either way an uncalibrated range is set from the first training
            batch; in inference an uncalibrated range raises (see ``ranges``).
        ema_momentum: the moving-average momentum for ``"ema"``.
    """

    def __init__(
        self,
        layer: keras.layers.Layer,
        input_indices: list[int] | tuple[int, ...] = (0,),
        weight_axes: dict[str, int] | None = None,
        reason: str = "default",
        activation_range: str = "frozen",
        ema_momentum: float = 0.99,
        **kwargs: Any,
    ) -> None:
        if activation_range not in ACTIVATION_RANGES:
            raise ValueError(
                f"activation_range must be one of {ACTIVATION_RANGES}, got {activation_range!r}"
            )
        kwargs.setdefault("name", f"quant_{layer.name}")
        super().__init__(layer, **kwargs)
        self.input_indices = tuple(int(i) for i in input_indices)
        self.weight_axes = dict(weight_axes or {})
        self.reason = reason
        self.activation_range = activation_range
        self.ema_momentum = float(ema_momentum)
        self.input_amax: list[keras.Variable] = []

    def build(self, input_shape: Any) -> None:
        if not self.layer.built:
            self.layer.build(input_shape)
        self.input_amax = [
            # "mean": replicas that set a range from their own batch agree on the average.
            self.add_weight(
                name=f"input_amax_{label}",
                shape=(),
                initializer="zeros",
                trainable=False,
                aggregation="mean",
            )
            for label in self.quantizer_labels
        ]
        self.built = True

    @property
    def quantizer_labels(self) -> list[str]:
        """One label per activation quantizer: the index of the input it quantizes."""
        return [str(i) for i in self.input_indices]

    def quantizer_name(self, slot: int) -> str:
        """Human-readable name of one input quantizer: ``<layer>:<input index>``."""
        return f"{self.layer.name}:{self.quantizer_labels[slot]}"

    def uncalibrated_in_call(self) -> tuple[keras.layers.Layer, list[str]]:
        """The model being called (or this wrapper, if called alone) and its unset quantizers."""
        model = called_model(self)
        if isinstance(model, keras.Model) and graph.is_graph_model(model):
            return model, uncalibrated_quantizers(model)
        unset = [s for s, amax in enumerate(self.input_amax) if not ranges.is_set(amax)]
        return self, [self.quantizer_name(s) for s in unset]

    def compute_output_shape(self, input_shape: Any) -> Any:
        return self.layer.compute_output_shape(input_shape)

    def _quantize_input(
        self, x: tf.Tensor, slot: int, training: bool
    ) -> tuple[tf.Tensor, tf.Tensor | None]:
        """``x`` fake-quantized and the range used (None while calibration observes)."""
        watcher = observer.current()
        if watcher is not None:
            watcher(self, slot, x)
            return x, None
        amax = (
            ranges.training_amax(self, slot, x) if training else ranges.inference_amax(self, slot)
        )
        return fake_quant_per_tensor(x, amax), amax

    def call(self, inputs: Any, training: bool | None = None, **kwargs: Any) -> Any:
        training = bool(training)
        input_amax = None
        if isinstance(inputs, list | tuple):
            quantized = list(inputs)
            for slot, index in enumerate(self.input_indices):
                quantized[index] = self._quantize_input(quantized[index], slot, training)[0]
            inputs = quantized
        elif self.input_indices:
            inputs, input_amax = self._quantize_input(inputs, 0, training)
        if not self.weight_axes:
            return self.layer(inputs, training=training, **kwargs)
        return self._call_with_quantized_weights(inputs, training, input_amax, **kwargs)

    def quantized_weight(self, attr: str) -> tf.Tensor:
        """The fake-quantized value of the weight ``attr`` (per-channel, current abs-max)."""
        variable = getattr(self.layer, attr)
        return fake_quant_per_channel(tf.convert_to_tensor(variable.value), self.weight_axes[attr])

    def quantized_bias(self, kernel: str, input_amax: tf.Tensor) -> tf.Tensor:
        """The bias rounded to the units of ``input_amax`` times ``kernel``'s channel scales."""
        layer = self.layer
        weights = tf.convert_to_tensor(getattr(layer, kernel).value)
        weight_amax = channel_amax(weights, self.weight_axes[kernel])
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            # Output channel i * multiplier + m uses input channel i's scale.
            weight_amax = tf.repeat(weight_amax, layer.depth_multiplier)
        return fake_quant_bias(tf.convert_to_tensor(layer.bias.value), input_amax, weight_amax)

    def _has_bias(self) -> bool:
        return bool(getattr(self.layer, "use_bias", False)) and self.layer.bias is not None

    def _call_with_quantized_weights(
        self, inputs: Any, training: bool, input_amax: tf.Tensor | None, **kwargs: Any
    ) -> Any:
        # The layer's own call runs with its weight variables read as their quantized values.
        mapping = [(getattr(self.layer, a), self.quantized_weight(a)) for a in self.weight_axes]
        if input_amax is not None and "kernel" in self.weight_axes and self._has_bias():
            mapping.append((self.layer.bias, self.quantized_bias("kernel", input_amax)))
        with StatelessScope(state_mapping=mapping):
            return self.layer(inputs, training=training, **kwargs)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            input_indices=list(self.input_indices),
            weight_axes=dict(self.weight_axes),
            reason=self.reason,
            activation_range=self.activation_range,
            ema_momentum=self.ema_momentum,
        )
        return config


def wrappers(model: keras.Model) -> list[QuantizeWrapper]:
    """Every QuantizeWrapper in ``model`` and its nested models."""
    return [
        layer
        for sub in graph.iter_models(model)
        for layer in sub.layers
        if isinstance(layer, QuantizeWrapper)
    ]


def uncalibrated_quantizers(model: keras.Model) -> list[str]:
    """Names of input quantizers whose range was never set (still zero)."""
    return [
        w.quantizer_name(slot)
        for w in wrappers(model)
        for slot, amax in enumerate(w.input_amax)
        if not ranges.is_set(amax)
    ]


@keras.saving.register_keras_serializable(package="qatflow")
class SeparableQuantizeWrapper(QuantizeWrapper):
    """QuantizeWrapper for SeparableConv2D: also quantizes the depthwise output.

    TensorRT runs a separable convolution as two convolutions; the pointwise one needs
    Q/DQ on its input too, so this wrapper computes the two steps itself with an extra
    activation quantizer between them.
    """

    @property
    def quantizer_labels(self) -> list[str]:
        return [*super().quantizer_labels, "pointwise"]

    def _call_with_quantized_weights(
        self, inputs: Any, training: bool, input_amax: tf.Tensor | None, **kwargs: Any
    ) -> Any:
        layer = self.layer
        x = keras.ops.depthwise_conv(
            inputs,
            self.quantized_weight("depthwise_kernel"),
            strides=layer.strides,
            padding=layer.padding,
            data_format=layer.data_format,
            dilation_rate=layer.dilation_rate,
        )
        x, pointwise_amax = self._quantize_input(x, len(self.input_indices), training)
        x = keras.ops.conv(
            x,
            self.quantized_weight("pointwise_kernel"),
            padding="valid",
            data_format=layer.data_format,
        )
        if layer.use_bias:
            channel_axis = -1 if layer.data_format == "channels_last" else 1
            shape = [1] * len(x.shape)
            shape[channel_axis] = layer.filters
            bias = (
                layer.bias
                if pointwise_amax is None
                else self.quantized_bias("pointwise_kernel", pointwise_amax)
            )
            x = x + keras.ops.reshape(bias, shape)
        return layer.activation(x) if layer.activation is not None else x
