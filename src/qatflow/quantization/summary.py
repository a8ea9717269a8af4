"""The placement summary: one row per layer saying what is quantized and why."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import keras

from qatflow.quantization import graph
from qatflow.quantization.placement import Placement
from qatflow.quantization.registry import DEFAULT_REGISTRY, LayerRegistry
from qatflow.quantization.wrapper import QuantizeWrapper


@dataclass(frozen=True)
class SummaryRow:
    """One layer of the summary."""

    layer: str
    layer_class: str
    input_quantized: str
    weight_quantized: str
    why: str


def _describe_inputs(indices: tuple[int, ...], count: int) -> str:
    if not indices:
        return "no"
    if count == 1:
        return "yes"
    if len(indices) == count:
        return f"all {count}"
    return f"{len(indices)} of {count}: {list(indices)}"


def _row(placement: Placement) -> SummaryRow:
    weights = ", ".join(f"{name} (axis {axis})" for name, axis in placement.weight_axes.items())
    return SummaryRow(
        layer=placement.layer_name,
        layer_class=placement.layer_class,
        input_quantized=_describe_inputs(placement.input_indices, placement.num_inputs),
        weight_quantized=f"per-channel: {weights}" if weights else "no",
        why=placement.reason,
    )


class PlacementSummary:
    """A table of layer, class, input quantized, weight quantized, and why."""

    headers = ("layer", "class", "input quantized", "weight quantized", "why")

    def __init__(self, rows: Iterable[SummaryRow]) -> None:
        self.rows = list(rows)

    @classmethod
    def from_placements(cls, placements: Iterable[Placement]) -> PlacementSummary:
        """Build a summary from planned placements."""
        return cls(_row(p) for p in placements)

    def row(self, layer: str) -> SummaryRow:
        """The row of the layer named ``layer`` (KeyError if absent)."""
        for row in self.rows:
            if row.layer == layer:
                return row
        raise KeyError(layer)

    @property
    def quantized(self) -> list[SummaryRow]:
        """Rows of layers with any Q/DQ."""
        return [r for r in self.rows if r.input_quantized != "no" or r.weight_quantized != "no"]

    def _cells(self) -> list[tuple[str, ...]]:
        return [
            (r.layer, r.layer_class, r.input_quantized, r.weight_quantized, r.why)
            for r in self.rows
        ]

    def to_text(self) -> str:
        """A fixed-width table for the terminal."""
        cells = [self.headers, *self._cells()]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.headers))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        count = len(self.quantized)
        lines.append(f"{count} of {len(self.rows)} layers quantized")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """A Markdown table."""
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(row) + " |" for row in self._cells()]
        return "\n".join(lines)

    def to_dict(self) -> list[dict[str, Any]]:
        """Rows as JSON-ready dictionaries."""
        return [asdict(r) for r in self.rows]

    def __str__(self) -> str:
        return self.to_text()


def summarize(model: keras.Model, registry: LayerRegistry | None = None) -> PlacementSummary:
    """The placement summary of a quantized model (also after loading it from a file).

    ``registry`` explains the float layers (``DEFAULT_REGISTRY`` when None).
    """
    layers = DEFAULT_REGISTRY if registry is None else registry
    placements = []
    for owner in graph.iter_models(model):
        for layer in owner.layers:
            if graph.is_graph_model(layer) or isinstance(layer, keras.layers.InputLayer):
                continue
            count = graph.num_inputs(layer, owner)
            if isinstance(layer, QuantizeWrapper):
                placements.append(
                    Placement(
                        layer.layer.name,
                        type(layer.layer).__name__,
                        count,
                        layer.input_indices,
                        layer.weight_axes,
                        layer.reason,
                    )
                )
                continue
            why = layers.float_reason(layer)
            placements.append(Placement(layer.name, type(layer).__name__, count, reason=why))
    return PlacementSummary.from_placements(placements)
