"""The export's check: the exported ONNX, run as float math, against the Keras model.

tf2onnx rewrites the graph (fused ops, Q/DQ layout moves), so the export compares both on
inputs before it writes the file, with the fidelity gate's criterion
(:func:`qatflow.runtimes.fidelity.compare_outputs`), and records the result in the ONNX
``metadata_props`` under ``EXPORT_CHECK_KEY``. A failed check is logged as a warning and
recorded, not raised: TensorFlow and ONNX Runtime sum in different orders, and a network that
amplifies rounding (a barely trained EfficientNet: docs/exact-int8.md) disagrees with itself
across the two by a few percent although nothing was converted wrongly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import onnx

from qatflow.onnx.graph import metadata_json, set_metadata_json
from qatflow.onnx.reference import run_reference
from qatflow.runtimes.fidelity import (
    FidelityData,
    compare_outputs,
    fidelity_batches,
    model_input,
)

log = logging.getLogger("qatflow.export")

EXPORT_CHECK_KEY = "qatflow.export_check"
EXPORT_CHECK_SAMPLES = 64


def _outputs(values: Any) -> list[np.ndarray]:
    """Keras ``predict`` output(s) as a list of arrays, in the model's output order."""
    if isinstance(values, dict):
        values = list(values.values())
    return [np.asarray(v) for v in (values if isinstance(values, list | tuple) else [values])]


def check_export(
    model: keras.Model,
    proto: onnx.ModelProto,
    data: FidelityData | None = None,
    *,
    samples: int = EXPORT_CHECK_SAMPLES,
) -> dict[str, Any]:
    """Compare ``proto`` (as float math) with ``model`` on ``data`` (synthetic inputs in the
    input quantizer's range without data) and return the record stored with the export:
    the fidelity report of the worst output, plus ``checked`` and ``output``."""
    if len(model.inputs) != 1:
        return {"checked": False, "reason": f"{len(model.inputs)} inputs; one is checked"}
    batches, label = fidelity_batches(proto, data, max_samples=samples)
    inputs = np.concatenate(batches)
    name = model_input(proto).name
    expected = _outputs(model.predict(inputs, batch_size=32, verbose=0))
    got = run_reference(proto, {name: inputs})
    reports = [
        compare_outputs(want, have, data=label) for want, have in zip(expected, got, strict=True)
    ]
    worst = min(range(len(reports)), key=lambda i: (reports[i].passed, reports[i].agreement))
    return {
        "checked": True,
        "output": proto.graph.output[worst].name,
        **reports[worst].to_dict(),
    }


def record_export_check(
    model: keras.Model, proto: onnx.ModelProto, data: FidelityData | None = None
) -> dict[str, Any]:
    """Run :func:`check_export`, log its verdict and store it in ``proto``'s metadata."""
    record = check_export(model, proto, data)
    if not record["checked"]:
        log.warning("%s: export not checked against Keras: %s", model.name, record["reason"])
    elif record["passed"]:
        log.info(
            "%s: ONNX matches Keras: top-1 agreement %.2f%%", model.name, 100 * record["agreement"]
        )
    else:
        log.warning(
            "%s: the exported ONNX disagrees with the Keras model (output %s): top-1 agreement "
            "%.2f%% (%.2f%% of %d decided samples), p99 |error| %.4g (tolerance %.4g); data: "
            "%s. Engines are checked against this ONNX, so they inherit the difference.",
            model.name,
            record["output"],
            100 * record["agreement"],
            100 * record["decided_agreement"],
            record["decided_samples"],
            record["p99_abs_error"],
            record["tolerance"],
            record["data"],
        )
    set_metadata_json(proto, EXPORT_CHECK_KEY, record)
    return record


def read_export_check(proto: onnx.ModelProto) -> dict[str, Any] | None:
    """The record :func:`record_export_check` stored in ``proto``, if any."""
    value = metadata_json(proto, EXPORT_CHECK_KEY)
    return None if value is None else dict(value)


def export_check_line(record: Mapping[str, Any] | None) -> str:
    """One line on an export's check record (:func:`read_export_check`), for the CLI."""
    if record is None:
        return "ONNX vs Keras: not recorded"
    if not record["checked"]:
        return f"ONNX vs Keras: not checked ({record['reason']})"
    verdict = "matches" if record["passed"] else "DISAGREES"
    return (
        f"ONNX vs Keras: {verdict}: top-1 agreement {record['agreement']:.2%} "
        f"({record['decided_agreement']:.2%} of {record['decided_samples']} decided), "
        f"p99 |error| {record['p99_abs_error']:.4g} (tolerance {record['tolerance']:.4g}); "
        f"data: {record['data']}"
    )
