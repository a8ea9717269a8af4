"""Every private Keras internal qatflow relies on, in one place.

Keras 3 has no public API for a few things qatflow needs: reading a layer's weights as other
values for one call (``StatelessScope``), telling Functional models from subclassed ones, and
walking a model's graph (nodes, a tensor's producer, the model being called). Each use goes
through this module, and tests/test_keras_compat.py checks every one of them, so a Keras
release that moves one fails there, by name, rather than deep inside quantization.
"""

from __future__ import annotations

import importlib
from typing import Any

import keras

from qatflow.errors import QatflowError

# name -> (module, attribute) of the private Keras classes qatflow imports.
INTERNAL_CLASSES: dict[str, tuple[str, str]] = {
    "StatelessScope": ("keras.src.backend.common.stateless_scope", "StatelessScope"),
    "Functional": ("keras.src.models.functional", "Functional"),
}


class KerasCompatError(QatflowError):
    """A Keras internal qatflow uses is missing from the installed Keras."""


def internal_class(name: str) -> Any:
    """The private Keras class ``name`` (a key of ``INTERNAL_CLASSES``); raises if it moved."""
    module_name, attribute = INTERNAL_CLASSES[name]
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise KerasCompatError(
            f"qatflow needs the Keras internal {name} ({module_name}.{attribute}), which "
            f"Keras {keras.__version__} does not have; update qatflow/keras_compat.py for "
            "this Keras or install a Keras 3 release qatflow supports (pyproject.toml)"
        ) from exc


StatelessScope = internal_class("StatelessScope")
Functional = internal_class("Functional")


def flatten_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """``layer`` and every layer nested inside it, at any depth."""
    return list(layer._flatten_layers())


def inbound_nodes(layer: keras.layers.Layer) -> list[Any]:
    """The graph nodes where ``layer`` is called (one per call)."""
    return list(layer._inbound_nodes)


def outbound_nodes(layer: keras.layers.Layer) -> list[Any]:
    """The graph nodes that consume ``layer``'s output."""
    return list(layer._outbound_nodes)


def producer(tensor: Any) -> keras.layers.Layer:
    """The layer (operation) whose call produced the symbolic ``tensor``."""
    return tensor._keras_history.operation


def called_model(layer: keras.layers.Layer) -> keras.layers.Layer | None:
    """The outermost layer or model being called while ``layer`` runs (None outside a call)."""
    return layer._get_call_context().entry_layer
