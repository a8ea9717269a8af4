"""How much of an ONNX Runtime engine runs in integer kernels: by node count and by time.

Compute nodes only: data movement (Transpose, Reshape...) and the QuantizeLinear /
DequantizeLinear at the graph's edges count in neither class by node, but their time counts in
the total, so the time share says what the integer kernels buy end to end.
"""

from __future__ import annotations

import collections
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

# ORT CPU integer kernels (ONNX and com.microsoft domains).
INTEGER_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
        "QLinearLeakyRelu",
        "QLinearSigmoid",
        "QLinearSoftmax",
        "QLinearReduceMean",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "ConvInteger",
        "DynamicQuantizeMatMul",
    }
)
# Float ops that do arithmetic (what an integer kernel would replace).
FLOAT_COMPUTE_OPS = frozenset(
    {
        "Conv",
        "FusedConv",
        "ConvTranspose",
        "MatMul",
        "FusedMatMul",
        "Gemm",
        "FusedGemm",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Sum",
        "AveragePool",
        "GlobalAveragePool",
        "MaxPool",
        "GlobalMaxPool",
        "Relu",
        "Clip",
        "Sigmoid",
        "QuickGelu",
        "HardSigmoid",
        "Tanh",
        "Softmax",
        "LeakyRelu",
        "Concat",
        "ReduceMean",
        "BatchNormalization",
        "Resize",
    }
)


def node_share(op_counts: Mapping[str, int]) -> float | None:
    """Integer kernels among the compute nodes of an op histogram; None without any."""
    integer = sum(n for op, n in op_counts.items() if op in INTEGER_OPS)
    compute = integer + sum(n for op, n in op_counts.items() if op in FLOAT_COMPUTE_OPS)
    return integer / compute if compute else None


def time_share(
    model: onnx.ModelProto, session_options: Any, feeds: Mapping[str, np.ndarray], runs: int = 3
) -> float | None:
    """Share of ORT's per-node kernel time spent in integer kernels, over ``runs`` runs."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="qatflow-profile-") as tmp:
        session_options.enable_profiling = True
        session_options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(
            model.SerializeToString(), session_options, providers=["CPUExecutionProvider"]
        )
        for _ in range(runs):
            session.run(None, dict(feeds))
        events = json.loads(Path(session.end_profiling()).read_text())
    durations: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            durations[event["args"]["op_name"]] += event["dur"]
    total = sum(durations.values())
    integer = sum(d for op, d in durations.items() if op in INTEGER_OPS)
    return integer / total if total else None
