"""Pattern cases: objects that inspect a model and return placement entries.

A case turns a network-level rule (residual Adds, squeeze-excite multiplies, horizontal
fusion) into ordinary spec entries, so users can write their own by subclassing ``QDQCase``.
"""

from __future__ import annotations

from typing import Literal

import keras

from qatflow.params import QUANTIZE, RuntimeName
from qatflow.quantization import graph
from qatflow.quantization.batch_norm_folding import FoldedBatchNorm
from qatflow.quantization.spec import QuantizationSpec

# Layers a convolution's output may pass through and still fuse with a following Add.
_FUSIBLE_TAIL = (
    keras.layers.BatchNormalization,
    FoldedBatchNorm,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.Dropout,
)
_WEIGHTED = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.Conv2DTranspose,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    keras.layers.Dense,
)


class QDQCase:
    """Base class of pattern cases. Override ``case``; ``info`` is shown in summaries.

    ``runtime`` is the engine runtime the placement is for (``QuantizeParams.runtime``); the
    residual rule depends on it (``residual_inputs_to_quantize``).
    """

    name = "custom"

    def __init__(self, runtime: RuntimeName = QUANTIZE.runtime) -> None:
        self.runtime = runtime

    def case(self, model: keras.Model, spec: QuantizationSpec) -> QuantizationSpec:
        """Return the entries this case adds for ``model`` (``spec`` is what is placed so far)."""
        raise NotImplementedError

    def info(self) -> str:
        """A one-line description of the rule."""
        return self.__doc__.strip().splitlines()[0] if self.__doc__ else self.name

    def quantize_inputs(
        self, model: keras.Model, kind: type, index: Literal["all"] | None = None
    ) -> QuantizationSpec:
        """Entries putting Q/DQ on the inputs of every ``kind`` layer (weights untouched)."""
        out = QuantizationSpec()
        for _, layer in _layers_of(model, kind):
            out.add(layer.name, quantization_index=index, quantize_weight=False, source=self.source)
        return out

    def residual_adds(self, model: keras.Model) -> QuantizationSpec:
        """Entries for every Add by the residual rule (see ``residual_inputs_to_quantize``)."""
        out = QuantizationSpec()
        for owner, layer in _layers_of(model, keras.layers.Add):
            indices = residual_inputs_to_quantize(layer, owner, self.runtime)
            if indices:
                out.add(
                    layer.name,
                    quantization_index=indices,
                    quantize_weight=False,
                    source=self.source,
                )
        return out

    @property
    def source(self) -> str:
        """How entries of this case are labelled in the summary: its name and runtime."""
        return f"case:{self.name} for {self.runtime}"


def is_conv_branch(layer: keras.layers.Layer, model: keras.Model) -> bool:
    """True when ``layer`` ends a Conv[->BN][->Act][->Dropout] chain that TensorRT can fuse.

    Every layer on the chain must feed only the next one, so the convolution's output is
    free to be fused with the Add that consumes the branch.
    """
    current = layer
    for _ in range(len(_FUSIBLE_TAIL) + 1):
        if len(graph.consumers(current, model)) != 1:
            return False
        if isinstance(current, _WEIGHTED):
            return True
        if not isinstance(current, _FUSIBLE_TAIL):
            return False
        parents = graph.producers(current, model)
        if len(parents) != 1:
            return False
        current = parents[0]
    return False


def residual_inputs_to_quantize(
    layer: keras.layers.Layer, model: keras.Model, runtime: RuntimeName = QUANTIZE.runtime
) -> list[int]:
    """Inputs of a residual Add that get Q/DQ, for the engine ``runtime``.

    TensorRT: all but one fusible convolution branch. The branch left in float is the one
    computed last (the main path), so TensorRT fuses Conv+Add with the other inputs already
    in INT8. ONNX Runtime has no such fusion: every input, so that the Add runs as
    QLinearAdd and the convolutions before it write int8 (docs/exact-int8.md measures it).
    """
    parents = graph.producers(layer, model)
    if runtime == "onnxruntime":
        return list(range(len(parents)))
    order = graph.topological_index(model)
    conv_inputs = [i for i, p in enumerate(parents) if is_conv_branch(p, model)]
    if not conv_inputs:
        return list(range(len(parents)))
    fused = max(conv_inputs, key=lambda i: order.get(id(parents[i]), -1))
    return [i for i in range(len(parents)) if i != fused]


def _layers_of(
    model: keras.Model, kind: type | tuple[type, ...]
) -> list[tuple[keras.Model, keras.layers.Layer]]:
    return [
        (m, layer)
        for m in graph.iter_models(model)
        for layer in m.layers
        if isinstance(layer, kind)
    ]


class ResidualAddCase(QDQCase):
    """Residual Add: quantize the identity branch, leave one convolution branch to fuse."""

    name = "residual"

    def case(self, model: keras.Model, spec: QuantizationSpec) -> QuantizationSpec:
        return self.residual_adds(model)


class ResNetV1Case(ResidualAddCase):
    """ResNet v1: residual Adds (projection blocks get exactly one quantized input)."""

    name = "resnet_v1"


class MobileNetCase(ResidualAddCase):
    """MobileNet v1/v2: residual Adds of the inverted-residual blocks."""

    name = "mobilenet"


class MaxPoolCase(QDQCase):
    """MaxPooling2D inputs quantized, so TensorRT can fuse horizontally across branches."""

    name = "maxpool"

    def case(self, model: keras.Model, spec: QuantizationSpec) -> QuantizationSpec:
        return self.quantize_inputs(model, keras.layers.MaxPooling2D)


class ResNetV2Case(QDQCase):
    """ResNet v2: residual Adds, pre-activation BatchNorms not after a conv, and MaxPools."""

    name = "resnet_v2"

    def case(self, model: keras.Model, spec: QuantizationSpec) -> QuantizationSpec:
        out = self.residual_adds(model).extend(
            self.quantize_inputs(model, keras.layers.MaxPooling2D)
        )
        for owner, layer in _layers_of(model, keras.layers.BatchNormalization):
            parents = graph.producers(layer, owner)
            if not (len(parents) == 1 and isinstance(parents[0], _WEIGHTED)):
                out.add(layer.name, quantize_weight=False, source=self.source)
        return out


class EfficientNetCase(QDQCase):
    """EfficientNet: residual Adds and both inputs of the squeeze-excite Multiply."""

    name = "efficientnet"

    def case(self, model: keras.Model, spec: QuantizationSpec) -> QuantizationSpec:
        multiplies = self.quantize_inputs(model, keras.layers.Multiply, "all")
        return self.residual_adds(model).extend(multiplies)


class InceptionCase(QDQCase):
    """Inception: Concatenate and MaxPool inputs quantized for horizontal fusion."""

    name = "inception"

    def case(self, model: keras.Model, spec: QuantizationSpec) -> QuantizationSpec:
        pools = self.quantize_inputs(model, keras.layers.MaxPooling2D)
        return pools.extend(self.quantize_inputs(model, keras.layers.Concatenate, "all"))


_BY_MODEL_NAME: list[tuple[str, type[QDQCase]]] = [
    ("resnet50v2", ResNetV2Case),
    ("resnet101v2", ResNetV2Case),
    ("resnet152v2", ResNetV2Case),
    ("resnet", ResNetV1Case),
    ("mobilenet", MobileNetCase),
    ("efficientnet", EfficientNetCase),
    ("inception", InceptionCase),
]


def cases_for_model(model: keras.Model, runtime: RuntimeName = QUANTIZE.runtime) -> list[QDQCase]:
    """Pick the built-in cases for a model: by keras.applications name, else the residual rule."""
    names = [m.name.lower() for m in graph.iter_models(model)]
    for prefix, case_class in _BY_MODEL_NAME:
        if any(n.startswith(prefix) for n in names):
            return [case_class(runtime)]
    return [ResidualAddCase(runtime)]
