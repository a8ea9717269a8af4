"""Navigation of Keras 3 Functional/Sequential graphs: nested models, producers, consumers."""

from __future__ import annotations

from collections.abc import Iterator

import keras

from qatflow.errors import ModelError
from qatflow.keras_compat import Functional, inbound_nodes, outbound_nodes, producer


def is_graph_model(layer: keras.layers.Layer) -> bool:
    """True for Functional and Sequential models (whose layers can be cloned one by one)."""
    return isinstance(layer, Functional | keras.Sequential)


def check_layerwise(model: keras.Model) -> None:
    """Raise a ModelError if ``model`` hides its layers in a SavedModel (``TFSMLayer``)."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.TFSMLayer):
            raise ModelError(
                f"model {model.name} wraps the SavedModel {layer.filepath} in one TFSMLayer, so "
                "its layers cannot be quantized one by one; save the original Keras model as "
                ".keras or .h5 and load that instead"
            )


def iter_models(model: keras.Model) -> Iterator[keras.Model]:
    """Yield ``model`` and every nested Functional/Sequential model inside it, depth first."""
    yield model
    for layer in model.layers:
        if is_graph_model(layer):
            yield from iter_models(layer)


def _first_node(layer: keras.layers.Layer, model: keras.Model) -> object | None:
    members = {id(x) for x in model.layers}
    nodes = inbound_nodes(layer)
    for node in nodes:
        if all(id(producer(t)) in members for t in node.input_tensors):
            return node
    return nodes[0] if nodes else None


def producers(layer: keras.layers.Layer, model: keras.Model) -> list[keras.layers.Layer]:
    """The layers producing each input of ``layer`` inside ``model``, in input order."""
    node = _first_node(layer, model)
    if node is None:
        return []
    return [producer(t) for t in node.input_tensors]  # type: ignore[attr-defined]


def num_inputs(layer: keras.layers.Layer, model: keras.Model) -> int:
    """How many tensors ``layer`` takes in ``model`` (1 for ordinary layers)."""
    return max(1, len(producers(layer, model)))


def consumers(layer: keras.layers.Layer, model: keras.Model) -> list[keras.layers.Layer]:
    """The layers inside ``model`` that consume ``layer``'s output."""
    members = {id(x) for x in model.layers}
    found = [node.operation for node in outbound_nodes(layer)]
    return [c for c in found if id(c) in members]


def topological_index(model: keras.Model) -> dict[int, int]:
    """Position of each layer (by id) in ``model.layers``, which Keras keeps in graph order."""
    return {id(layer): i for i, layer in enumerate(model.layers)}


def copy_layer(layer: keras.layers.Layer, **changes: object) -> keras.layers.Layer:
    """A new, unbuilt layer of ``layer``'s class and config, with ``changes`` to the config."""
    return layer.__class__.from_config({**layer.get_config(), **changes})


def copy_state(original: keras.layers.Layer, copy: keras.layers.Layer) -> None:
    """Give a cloned layer ``original``'s weights and the state derived from them."""
    copy.set_weights(original.get_weights())
    # Adapted preprocessing layers (Normalization's mean and variance) derive their state
    # from their weights: recompute it, as Keras does after loading a file.
    if hasattr(copy, "finalize_state"):
        copy.finalize_state()
