"""Navigation of Keras 3 Functional/Sequential graphs: nested models, producers, consumers."""

from __future__ import annotations

from collections.abc import Iterator

import keras


def is_graph_model(layer: keras.layers.Layer) -> bool:
    """True for Functional and Sequential models (whose layers can be cloned one by one)."""
    from keras.src.models.functional import Functional

    return isinstance(layer, Functional | keras.Sequential)


def iter_models(model: keras.Model) -> Iterator[keras.Model]:
    """Yield ``model`` and every nested Functional/Sequential model inside it, depth first."""
    yield model
    for layer in model.layers:
        if is_graph_model(layer):
            yield from iter_models(layer)


def _first_node(layer: keras.layers.Layer, model: keras.Model) -> object | None:
    members = {id(x) for x in model.layers}
    for node in layer._inbound_nodes:
        producers = [t._keras_history.operation for t in node.input_tensors]
        if all(id(p) in members for p in producers):
            return node
    return layer._inbound_nodes[0] if layer._inbound_nodes else None


def producers(layer: keras.layers.Layer, model: keras.Model) -> list[keras.layers.Layer]:
    """The layers producing each input of ``layer`` inside ``model``, in input order."""
    node = _first_node(layer, model)
    if node is None:
        return []
    return [t._keras_history.operation for t in node.input_tensors]  # type: ignore[attr-defined]


def num_inputs(layer: keras.layers.Layer, model: keras.Model) -> int:
    """How many tensors ``layer`` takes in ``model`` (1 for ordinary layers)."""
    return max(1, len(producers(layer, model)))


def consumers(layer: keras.layers.Layer, model: keras.Model) -> list[keras.layers.Layer]:
    """The layers inside ``model`` that consume ``layer``'s output."""
    members = {id(x) for x in model.layers}
    found = [node.operation for node in layer._outbound_nodes]
    return [c for c in found if id(c) in members]


def topological_index(model: keras.Model) -> dict[int, int]:
    """Position of each layer (by id) in ``model.layers``, which Keras keeps in graph order."""
    return {id(layer): i for i, layer in enumerate(model.layers)}
