"""The one reference runner: a QDQ ONNX model executed as plain float math by ONNX Runtime.

With every graph optimization off, ONNX Runtime runs each QuantizeLinear and DequantizeLinear
as written and every Conv/MatMul in float, so no integer kernel (and none of its ISA-dependent
accumulation) is involved. Engines, tests and benchmarks compare against this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper


def session(model: onnx.ModelProto, *, optimize: bool, threads: int | None = None) -> Any:
    """An ORT CPU session for ``model``: all optimizations (``optimize``) or none."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the intermediate tensors ``names``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    missing = [n for n in dict.fromkeys(names) if n not in known]
    if missing:
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {
            info.name: info.type.tensor_type.elem_type
            for info in (*inferred.graph.value_info, *inferred.graph.input)
        }
        probe.graph.output.extend(
            helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None) for n in missing
        )
    return probe


def _run(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    names: Sequence[str] | None,
    optimize: bool,
) -> list[np.ndarray]:
    wanted = list(names) if names is not None else [o.name for o in model.graph.output]
    runner = session(with_outputs(model, wanted), optimize=optimize)
    return [np.asarray(v) for v in runner.run(wanted, dict(feeds))]


def run_reference(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Outputs (or the tensors ``names``) of ``model`` run as float math, no graph optimization."""
    return _run(model, feeds, names, optimize=False)


def run_optimized(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: Sequence[str] | None = None
) -> list[np.ndarray]:
    """The same with all of ORT's optimizations: QDQ groups fused into integer kernels."""
    return _run(model, feeds, names, optimize=True)
