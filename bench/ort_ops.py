"""Which ops ONNX Runtime really runs: the optimized graph of a model, as op-type counts."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx


def ort_optimized_op_counts(model: onnx.ModelProto, *, threads: int = 1) -> Counter[str]:
    """Op types in the graph ONNX Runtime (CPU, all optimizations) actually runs for ``model``."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = str(path)
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(str(path)).graph.node)
