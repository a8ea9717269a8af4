"""quantize_model: clone a Keras model with QuantizeWrapper layers where the plan says so."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import keras

from qatflow.errors import ModelError
from qatflow.params import QUANTIZE, QuantizeMode, RuntimeName
from qatflow.quantization import graph
from qatflow.quantization.batch_norm_folding import fold_batch_norms
from qatflow.quantization.cases import QDQCase
from qatflow.quantization.placement import Placement, plan_placement
from qatflow.quantization.registry import LayerRegistry
from qatflow.quantization.spec import QuantizationSpec
from qatflow.quantization.wrapper import QuantizeWrapper, SeparableQuantizeWrapper


def check_quantizable(model: Any) -> None:
    """Raise ModelError unless ``model`` is a built Functional/Sequential model of fixed rank."""
    if not isinstance(model, keras.Model):
        raise ModelError(f"expected a keras.Model, got {type(model).__name__}")
    if not graph.is_graph_model(model):
        raise ModelError(
            f"model {model.name!r} is a subclassed keras.Model ({type(model).__name__}) with "
            "no layer graph; qatflow rewrites models layer by layer and needs a Functional or "
            "Sequential model. If its call() only chains Keras layers and ops, trace it into "
            "one over the same layers and weights: inputs = keras.Input(shape=...); "
            "keras.Model(inputs, model.call(inputs)).save('model.keras'); otherwise rebuild "
            "it with the functional API"
        )
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ModelError(
            f"model {model.name!r} has no defined inputs (a Sequential model without an Input "
            "layer?): build it with keras.Input(shape=...) so the input rank is fixed"
        )
    for tensor in inputs:
        if tensor.shape is None or len(tensor.shape) < 2:
            raise ModelError(
                f"model {model.name!r} input {tensor.name!r} has no fixed rank "
                f"(shape {tensor.shape}); declare keras.Input(shape=(H, W, C))"
            )
    graph.check_layerwise(model)
    for sub in graph.iter_models(model):
        for layer in sub.layers:
            if isinstance(layer, keras.Model) and not graph.is_graph_model(layer):
                raise ModelError(
                    f"nested model {layer.name!r} inside {sub.name!r} is subclassed "
                    f"({type(layer).__name__}); only Functional/Sequential sub-models can be "
                    "quantized"
                )


def quantize_model(
    model: keras.Model,
    mode: QuantizeMode | str = QUANTIZE.mode,
    spec: QuantizationSpec | None = None,
    cases: Iterable[QDQCase] | None = None,
    strict: bool = False,
    *,
    activation_range: str = QUANTIZE.activation_range,
    registry: LayerRegistry | None = None,
    fold_batch_norm: bool = QUANTIZE.fold_batch_norm,
    runtime: RuntimeName | str = QUANTIZE.runtime,
) -> keras.Model:
    """Return a copy of ``model`` with TensorRT-style Q/DQ; ``model`` itself is left untouched.

    Args:
        model: a Functional or Sequential Keras 3 model (nested sub-models allowed).
        mode: ``"full"`` applies the default placement, the automatic pattern cases for
            known architectures, then ``cases`` and ``spec``; ``"partial"`` quantizes only
            what ``spec`` (and ``cases``) name.
        spec: placement overrides by layer name or Keras class.
        cases: extra pattern cases (``QDQCase`` instances), user-written ones included.
        strict: raise on layer classes qatflow does not know instead of leaving them float.
        activation_range: ``"frozen"`` (calibrated ranges kept during QAT) or ``"ema"``.
        registry: the layer configs behind the default placement (a ``LayerRegistry``);
            None uses ``DEFAULT_REGISTRY``, which ``register_layer_config`` extends.
        fold_batch_norm: fold each batch norm that follows a convolution or Dense layer into
            its kernel and bias first (``batch_norm_folding``), so that the quantized weights
            are the ones every runtime computes with. It is replaced by a ``FoldedBatchNorm``
            pass-through of the same name. A batch norm that the placement quantizes stays.
            ``model`` keeps its batch norms either way.
        runtime: the engine runtime the placement is for, ``"tensorrt"`` or
            ``"onnxruntime"``: it decides which inputs of a residual Add get Q/DQ
            (``cases.residual_inputs_to_quantize``). Either placement is correct on either
            runtime; the one placed for it is faster.

    Activation ranges start uncalibrated: run ``qatflow.calibrate`` before use.
    """
    check_quantizable(model)

    def planned(model: keras.Model) -> dict[int, Placement]:
        return plan_placement(
            model,
            mode=mode,
            spec=spec,
            cases=cases,
            strict=strict,
            registry=registry,
            runtime=runtime,
        )

    plan = planned(model)
    if fold_batch_norm:
        # A batch norm that the placement quantizes (a spec or case asked for it) stays.
        kept = {key for key, placement in plan.items() if placement.quantized}
        folded, folds = fold_batch_norms(model, keep=kept)
        if folds:
            model, plan = folded, planned(folded)
    copies: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        copy = graph.copy_layer(layer)
        copies.append((layer, copy))
        placement: Placement | None = plan.get(id(layer))
        if placement is None or not placement.quantized:
            return copy
        separable = isinstance(copy, keras.layers.SeparableConv2D) and placement.weight_axes
        wrapper_class = SeparableQuantizeWrapper if separable else QuantizeWrapper
        return wrapper_class(
            copy,
            input_indices=placement.input_indices,
            weight_axes=placement.weight_axes,
            reason=placement.reason,
            activation_range=activation_range,
        )

    quantized = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for original, copy in copies:
        graph.copy_state(original, copy)
    return quantized
