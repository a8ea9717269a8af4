"""A hook that lets calibration see the float tensors entering each input quantizer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

Observer = Callable[[Any, int, Any], None]
_active: list[Observer] = []


def current() -> Observer | None:
    """The observer in effect, or None outside ``observing``."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def observing(observer: Observer) -> Iterator[None]:
    """While active, quantizers pass inputs through in float and report them to ``observer``.

    ``observer(wrapper, slot, tensor)`` is called eagerly for every quantized input; use it
    only around eager model calls.
    """
    _active.append(observer)
    try:
        yield
    finally:
        _active.pop()


def float_activations() -> contextlib.AbstractContextManager[None]:
    """While active, quantizers pass activations through in float and need no range.

    For probing a quantized model (output shape, logits or probabilities) whose ranges may
    not be set yet; weights stay quantized. Eager calls only, as for ``observing``.
    """
    return observing(lambda wrapper, slot, tensor: None)
