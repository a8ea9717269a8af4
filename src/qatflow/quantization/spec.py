"""QuantizationSpec: user placement overrides, by layer name or by Keras class."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import keras
import yaml

from qatflow.errors import QuantizationError

QuantizationIndex = Sequence[int] | Literal["any", "all"] | None


@dataclass(frozen=True)
class SpecEntry:
    """One placement override.

    Attributes:
        name: a layer name, or a Keras class name when ``is_keras_class`` is true.
        quantize_input: put Q/DQ on the layer's inputs.
        quantize_weight: put per-channel Q/DQ on the layer's weights.
        quantization_index: for multi-input layers, which inputs get Q/DQ: a list of
            indices, ``"all"``, or ``"any"`` (exactly one, chosen by the residual rule:
            the non-convolution branch, else the earliest). ``None`` means all inputs.
        source: where the entry came from ("spec" or a case name), shown in the summary.
    """

    name: str
    is_keras_class: bool = False
    quantize_input: bool = True
    quantize_weight: bool = True
    quantization_index: tuple[int, ...] | Literal["any", "all"] | None = None
    source: str = "spec"

    def matches(self, layer: keras.layers.Layer) -> bool:
        """True when this entry names ``layer`` (by name, or by its class or a base class)."""
        if self.is_keras_class:
            return any(cls.__name__ == self.name for cls in type(layer).__mro__)
        return layer.name == self.name


def _normalize_index(index: QuantizationIndex) -> tuple[int, ...] | Literal["any", "all"] | None:
    if index is None or index in ("any", "all"):
        return index
    if isinstance(index, str):
        raise QuantizationError(
            f"quantization_index {index!r} is not valid: use a list of input indices, "
            "'any' or 'all'"
        )
    if isinstance(index, int):
        return (index,)
    values = tuple(index)
    if not values or not all(isinstance(i, int) and i >= 0 for i in values):
        raise QuantizationError(
            f"quantization_index {index!r} is not valid: indices must be non-negative integers"
        )
    return values


class QuantizationSpec:
    """An ordered list of placement overrides; later entries win over earlier ones."""

    def __init__(self, entries: Iterable[SpecEntry] = ()) -> None:
        self.entries: list[SpecEntry] = list(entries)

    def add(
        self,
        name: str | Sequence[str],
        is_keras_class: bool | Sequence[bool] = False,
        quantize_input: bool | Sequence[bool] = True,
        quantize_weight: bool | Sequence[bool] = True,
        quantization_index: QuantizationIndex | Sequence[QuantizationIndex] = None,
        source: str = "spec",
    ) -> QuantizationSpec:
        """Add one entry, or several when ``name`` is a list (other arguments may be lists too)."""
        names = [name] if isinstance(name, str) else list(name)
        count = len(names)

        def per_entry(value: Any, label: str, scalar: bool) -> list[Any]:
            if scalar:
                return [value] * count
            values = list(value)
            if len(values) != count:
                raise QuantizationError(
                    f"QuantizationSpec.add: {label} has {len(values)} values for {count} names"
                )
            return values

        # A list of per-name index values is told apart from one index list by its items:
        # [[0], [1]] gives one value per name, [0, 1] is one index list for every name.
        index_is_scalar = isinstance(name, str) or not (
            isinstance(quantization_index, list | tuple)
            and any(isinstance(i, list | tuple | str) or i is None for i in quantization_index)
        )
        for n, cls, q_in, q_w, idx in zip(
            names,
            per_entry(is_keras_class, "is_keras_class", isinstance(is_keras_class, bool)),
            per_entry(quantize_input, "quantize_input", isinstance(quantize_input, bool)),
            per_entry(quantize_weight, "quantize_weight", isinstance(quantize_weight, bool)),
            per_entry(quantization_index, "quantization_index", index_is_scalar),
            strict=True,
        ):
            self.entries.append(
                SpecEntry(n, bool(cls), bool(q_in), bool(q_w), _normalize_index(idx), source)
            )
        return self

    def extend(self, other: QuantizationSpec) -> QuantizationSpec:
        """Append every entry of ``other``."""
        self.entries.extend(other.entries)
        return self

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Any:
        return iter(self.entries)

    @classmethod
    def from_dict(cls, data: Any, *, origin: str = "spec") -> QuantizationSpec:
        """Build a spec from ``{"layers": [{"name": ..., ...}, ...]}`` (the YAML layout)."""
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise QuantizationError(f"{origin}: expected a mapping with a 'layers' list")
        spec = cls()
        allowed = {
            "name",
            "class",
            "quantize_input",
            "quantize_weight",
            "quantization_index",
        }
        for i, item in enumerate(data["layers"]):
            if not isinstance(item, dict) or ("name" in item) == ("class" in item):
                raise QuantizationError(
                    f"{origin}: layers[{i}] needs exactly one of 'name' or 'class'"
                )
            unknown = set(item) - allowed
            if unknown:
                raise QuantizationError(
                    f"{origin}: layers[{i}] has unknown keys {sorted(unknown)}; "
                    f"allowed: {sorted(allowed)}"
                )
            spec.add(
                name=str(item.get("name") or item["class"]),
                is_keras_class="class" in item,
                quantize_input=bool(item.get("quantize_input", True)),
                quantize_weight=bool(item.get("quantize_weight", True)),
                quantization_index=item.get("quantization_index"),
            )
        return spec

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> QuantizationSpec:
        """Load a spec file; errors name the file."""
        file = Path(path)
        try:
            data = yaml.safe_load(file.read_text())
        except FileNotFoundError:
            raise QuantizationError(f"spec file {file} does not exist") from None
        except yaml.YAMLError as err:
            raise QuantizationError(f"spec file {file} is not valid YAML: {err}") from None
        return cls.from_dict(data, origin=f"spec file {file}")
