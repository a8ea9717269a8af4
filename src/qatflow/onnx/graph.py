"""Small ONNX graph utilities shared by the exporter and the validator."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

# Ops that only move data around: a per-tensor Q/DQ commutes with them.
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


class GraphIndex:
    """Producer, consumer and constant lookups over one ONNX graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.initializers = {init.name: init for init in graph.initializer}
        self.outputs = {out.name for out in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output, or None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def source_through_layout(self, name: str) -> onnx.NodeProto | None:
        """The first non-layout node producing ``name``, looking back through layout ops."""
        node = self.producer.get(name)
        while node is not None and node.op_type in LAYOUT_OPS:
            node = self.producer.get(node.input[0])
        return node


def apply_layout(
    node: onnx.NodeProto, value: np.ndarray, constant: Callable[[str], np.ndarray | None]
) -> np.ndarray | None:
    """Evaluate a data-movement op (Identity, Transpose, Reshape, Squeeze, Unsqueeze) on a
    constant ``value``; None for other ops or when an argument is not a constant.

    ``constant`` looks up the value of a tensor name (e.g. ``GraphIndex.constant``).
    """
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    extra: list[np.ndarray] = []
    for name in node.input[1:]:
        found = constant(name) if name else None
        if name and found is None:
            return None
        if found is not None:
            extra.append(found)
    if node.op_type == "Identity":
        return value
    if node.op_type == "Transpose":
        return np.transpose(value, attrs.get("perm"))
    if node.op_type == "Reshape" and extra:
        target = [value.shape[i] if d == 0 else int(d) for i, d in enumerate(extra[0].tolist())]
        return value.reshape(target)
    axes = [int(a) for a in (extra[0] if extra else attrs.get("axes", []))]
    if node.op_type == "Squeeze":
        return np.squeeze(value, tuple(axes) if axes else None)
    if node.op_type == "Unsqueeze":
        return np.expand_dims(value, tuple(axes))
    return None


def quantize_constant(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int, *, narrow: bool = False
) -> np.ndarray:
    """ONNX QuantizeLinear of a constant, as ONNX Runtime computes it: ``x / scale`` in float32,
    rounded half to even, plus the zero-point, saturated to the zero-point's type.

    A per-channel ``scale`` (and ``zero_point``) runs along ``axis``. ``narrow`` saturates
    signed values to ``[-127, 127]``: Keras' narrow-range fake quantization, which an ONNX Q
    cannot express.
    """
    shape = [1] * x.ndim
    if scale.size > 1:
        shape[axis % x.ndim] = scale.size
    scaled = np.rint(x.astype(np.float32) / scale.astype(np.float32).reshape(shape))
    zero = zero_point.astype(np.int64).reshape(shape if zero_point.size > 1 else [])
    info = np.iinfo(zero_point.dtype)
    low = info.min + 1 if narrow and info.min < 0 else info.min
    return np.clip(scaled + zero, low, info.max).astype(zero_point.dtype)


def attribute(node: onnx.NodeProto, name: str, default: int | None = None) -> int | None:
    """An integer attribute of ``node`` or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return int(onnx.helper.get_attribute_value(attr))
    return default


def set_metadata_json(model: onnx.ModelProto, key: str, value: object) -> None:
    """Store ``value`` as JSON under ``key`` in ``model.metadata_props``, replacing any entry."""
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=key, value=json.dumps(value, sort_keys=True))


def metadata_json(model: onnx.ModelProto, key: str) -> Any:
    """The value :func:`set_metadata_json` stored under ``key``, or None."""
    text = next((p.value for p in model.metadata_props if p.key == key), None)
    return None if text is None else json.loads(text)


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove initializers that no node and no graph output reads, in place."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so every node follows the producers of its inputs."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        remaining = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                remaining.append(node)
        if not progressed:
            names = ", ".join(n.name for n in remaining[:5])
            raise ValueError(f"ONNX graph has a cycle or a missing input near: {names}")
        pending = remaining
    del graph.node[:]
    graph.node.extend(ordered)


def op_counts(nodes: Iterable[onnx.NodeProto]) -> dict[str, int]:
    """How many nodes of each op type."""
    counts: dict[str, int] = defaultdict(int)
    for node in nodes:
        counts[node.op_type] += 1
    return dict(counts)
