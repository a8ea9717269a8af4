"""Placement planning: which layer gets Q/DQ on which inputs and weights, and why."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

import keras

from qatflow.errors import QuantizationError
from qatflow.params import QUANTIZE, QUANTIZE_MODES, RUNTIMES, QuantizeMode, RuntimeName
from qatflow.quantization import graph
from qatflow.quantization.cases import QDQCase, cases_for_model, residual_inputs_to_quantize
from qatflow.quantization.registry import DEFAULT_REGISTRY, LayerRegistry
from qatflow.quantization.spec import QuantizationSpec, SpecEntry


@dataclass
class Placement:
    """The Q/DQ decision for one layer."""

    layer_name: str
    layer_class: str
    num_inputs: int = 1
    input_indices: tuple[int, ...] = ()
    weight_axes: dict[str, int] = field(default_factory=dict)
    reason: str = ""

    @property
    def quantized(self) -> bool:
        """True when the layer gets any Q/DQ (and so a QuantizeWrapper)."""
        return bool(self.input_indices or self.weight_axes)


def _resolve_index(
    entry: SpecEntry, layer: keras.layers.Layer, owner: keras.Model, count: int
) -> tuple[int, ...]:
    index = entry.quantization_index
    if index is None or index == "all":
        return tuple(range(count))
    if index == "any":
        return tuple(residual_inputs_to_quantize(layer, owner)[:1] or [0])
    bad = [i for i in index if i >= count]
    if bad:
        raise QuantizationError(
            f"layer {layer.name!r} ({type(layer).__name__}) has {count} input(s); "
            f"quantization_index {list(index)} from {entry.source} is out of range"
        )
    return tuple(sorted(set(index)))


def _default_placement(
    layer: keras.layers.Layer, count: int, mode: QuantizeMode, layers: LayerRegistry
) -> Placement:
    placement = Placement(layer.name, type(layer).__name__, count)
    config = layers.config_for(layer)
    if config is not None and mode == "full":
        if config.quantize_input:
            placement.input_indices = tuple(range(count))
        if config.quantize_weight:
            placement.weight_axes = dict(config.weight_axes)
    placement.reason = "default" if placement.quantized else layers.float_reason(layer)
    return placement


def _apply_entry(
    placement: Placement,
    entry: SpecEntry,
    layer: keras.layers.Layer,
    owner: keras.Model,
    layers: LayerRegistry,
) -> None:
    config = layers.config_for(layer)
    placement.input_indices = (
        _resolve_index(entry, layer, owner, placement.num_inputs) if entry.quantize_input else ()
    )
    placement.weight_axes = dict(config.weight_axes) if (entry.quantize_weight and config) else {}
    placement.reason = entry.source if placement.quantized else f"left in float by {entry.source}"


def _check_spec_names(spec: QuantizationSpec, layers: Sequence[keras.layers.Layer]) -> None:
    names = [layer.name for layer in layers]
    for entry in spec:
        if entry.source != "spec" or any(entry.matches(layer) for layer in layers):
            continue
        kind = "class" if entry.is_keras_class else "layer"
        pool = sorted({type(x).__name__ for x in layers}) if entry.is_keras_class else names
        hint = difflib.get_close_matches(entry.name, pool, n=3)
        suggestion = f"; did you mean {', '.join(map(repr, hint))}?" if hint else ""
        raise QuantizationError(
            f"the spec names {kind} {entry.name!r}, which the model does not have{suggestion}"
        )


def plan_placement(
    model: keras.Model,
    *,
    mode: QuantizeMode | str = QUANTIZE.mode,
    spec: QuantizationSpec | None = None,
    cases: Iterable[QDQCase] | None = None,
    strict: bool = False,
    registry: LayerRegistry | None = None,
    runtime: RuntimeName | str = QUANTIZE.runtime,
) -> dict[int, Placement]:
    """Decide the placement for every layer of ``model`` and its nested models, keyed by id.

    Order of precedence: defaults (full mode only) < automatic cases (full mode only) <
    the user's cases < the user's spec. The defaults come from ``registry``
    (``DEFAULT_REGISTRY`` when None); the automatic cases place for the engine ``runtime``.
    """
    layers = DEFAULT_REGISTRY if registry is None else registry
    if mode not in QUANTIZE_MODES:
        raise QuantizationError(f"mode must be 'full' or 'partial', got {mode!r}")
    if runtime not in RUNTIMES:
        raise QuantizationError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    if mode == "partial" and not spec and not cases:
        raise QuantizationError("partial mode quantizes only what the spec names: pass a spec")
    spec = spec or QuantizationSpec()
    owned = [
        (owner, layer)
        for owner in graph.iter_models(model)
        for layer in owner.layers
        if not graph.is_graph_model(layer) and not isinstance(layer, keras.layers.InputLayer)
    ]
    _check_spec_names(spec, [layer for _, layer in owned])
    entries = QuantizationSpec()
    automatic = cases_for_model(model, cast(RuntimeName, runtime)) if mode == "full" else []
    all_cases = automatic + list(cases or [])
    for case in all_cases:
        entries.extend(case.case(model, entries))
    entries.extend(spec)
    plan: dict[int, Placement] = {}
    for owner, layer in owned:
        placement = _default_placement(layer, graph.num_inputs(layer, owner), mode, layers)
        matching = [entry for entry in entries if entry.matches(layer)]
        if strict and not matching and not layers.is_known(layer):
            raise QuantizationError(
                f"layer {layer.name!r} has class {type(layer).__name__}, which qatflow does "
                "not know how to quantize (strict mode). Register it with "
                "qatflow.register_layer_config, name it in a spec, or drop strict=True."
            )
        for entry in matching:
            _apply_entry(placement, entry, layer, owner, layers)
        plan[id(layer)] = placement
    return plan
