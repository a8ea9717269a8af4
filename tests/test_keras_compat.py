"""Every Keras internal in qatflow.keras_compat still exists and behaves as qatflow expects.

A Keras release that moves one fails here, with the internal's name, instead of deep inside
quantization or model loading.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from qatflow import keras_compat
from qatflow.keras_compat import KerasCompatError


def _nested() -> tuple[keras.Model, keras.layers.Layer, keras.layers.Layer]:
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.Dense(3, name="inner_dense")(inner_in))
    inputs = keras.Input((4,))
    first = keras.layers.Dense(4, name="first")
    return keras.Model(inputs, inner(first(inputs)), name="outer"), first, inner


@pytest.mark.parametrize("name", sorted(keras_compat.INTERNAL_CLASSES))
def test_every_internal_class_resolves(name: str) -> None:
    assert isinstance(keras_compat.internal_class(name), type), name


def test_a_moved_internal_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(keras_compat.INTERNAL_CLASSES, "Functional", ("keras.src.nowhere", "F"))
    with pytest.raises(KerasCompatError, match=r"Keras internal Functional \(keras\.src\.nowhere"):
        keras_compat.internal_class("Functional")


def test_functional_is_the_class_of_functional_models() -> None:
    model, _, inner = _nested()
    assert isinstance(model, keras_compat.Functional)
    assert isinstance(inner, keras_compat.Functional)
    assert not isinstance(keras.layers.Dense(2), keras_compat.Functional)


def test_stateless_scope_reads_weights_as_given_values() -> None:
    layer = keras.layers.Dense(2, use_bias=False, kernel_initializer="ones")
    x = np.ones((1, 3), np.float32)
    layer.build((None, 3))
    with keras_compat.StatelessScope(state_mapping=[(layer.kernel, np.full((3, 2), 2.0))]):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), [[6.0, 6.0]])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), [[3.0, 3.0]])


def test_graph_walking() -> None:
    model, first, inner = _nested()
    assert {x.name for x in keras_compat.flatten_layers(model)} >= {"first", "inner_dense"}
    (node,) = keras_compat.inbound_nodes(inner)
    assert [keras_compat.producer(t) for t in node.input_tensors] == [first]
    assert [n.operation for n in keras_compat.outbound_nodes(first)] == [inner]


def test_called_model_is_the_outermost_model_in_a_call() -> None:
    seen: list[keras.layers.Layer | None] = []

    class Probe(keras.layers.Layer):
        def call(self, x: object) -> object:
            seen.append(keras_compat.called_model(self))
            return x

    inputs = keras.Input((2,))
    model = keras.Model(inputs, Probe()(inputs))
    seen.clear()
    model(np.ones((1, 2), np.float32))
    assert seen == [model]
