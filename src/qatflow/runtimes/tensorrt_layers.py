"""Which engine layers run in which precision, read from the engine inspector's JSON.

With ``ProfilingVerbosity.DETAILED``, ``IEngineInspector.get_engine_information(JSON)`` gives
``{"Layers": [...], "Bindings": [...]}`` where each layer has ``Inputs``/``Outputs`` lists of
tensors. TensorRT 10 describes a tensor's type in one ``"Format/Datatype"`` string (e.g.
``"Channel major INT8 format where channel % 32 == 0"``, or ``"Int8"`` without an execution
context); TensorRT 11 has separate ``"Format"`` and ``"DataType"`` keys. With less verbosity
the layers are plain name strings, which say nothing about precision.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Search order of the type names inside a tensor's type string (lower case).
PRECISION_TOKENS = (("int8", "int8"), ("fp16", "fp16"), ("half", "fp16"), ("bf16", "bf16"))
FLOAT32_TOKENS = ("fp32", "float")


def tensor_precision(tensor: Mapping[str, Any]) -> str:
    """``int8``, ``fp16``, ``bf16``, ``fp32`` or ``other`` for one inspector tensor entry."""
    text = str(tensor.get("DataType", tensor.get("Format/Datatype", ""))).lower()
    for token, precision in PRECISION_TOKENS:
        if token in text:
            return precision
    return "fp32" if any(token in text for token in FLOAT32_TOKENS) else "other"


def layer_precision(layer: Mapping[str, Any]) -> str:
    """A layer runs in the narrowest type among its inputs (INT8 if any input is INT8)."""
    found = {tensor_precision(t) for t in layer.get("Inputs", ()) if isinstance(t, Mapping)}
    for precision in ("int8", "fp16", "bf16", "fp32"):
        if precision in found:
            return precision
    return "other"


def precision_summary(info: Any) -> dict[str, Any] | None:
    """Layer names per precision, or None when the JSON has no per-layer tensor types."""
    layers = info.get("Layers") if isinstance(info, Mapping) else None
    if not layers or not all(isinstance(layer, Mapping) for layer in layers):
        return None
    by_precision: dict[str, list[str]] = {}
    for layer in layers:
        by_precision.setdefault(layer_precision(layer), []).append(str(layer.get("Name", "")))
    return {
        "layers": len(layers),
        "counts": {p: len(names) for p, names in sorted(by_precision.items())},
        "int8_layers": by_precision.get("int8", []),
        "by_precision": by_precision,
    }
