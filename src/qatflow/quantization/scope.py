"""quantize_scope: load models holding qatflow's layers with Keras' own loading functions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from qatflow.quantization.wrapper import QuantizeWrapper, SeparableQuantizeWrapper


def custom_objects() -> dict[str, type]:
    """qatflow's serializable layers, by their registered Keras names."""
    layers = (QuantizeWrapper, SeparableQuantizeWrapper)
    return {keras.saving.get_registered_name(layer): layer for layer in layers}


@contextlib.contextmanager
def quantize_scope() -> Iterator[None]:
    """Within the block, ``keras.saving.load_model`` knows qatflow's layers (as TFMOT's does)."""
    with keras.saving.custom_object_scope(custom_objects()):
        yield
