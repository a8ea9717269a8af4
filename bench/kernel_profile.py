"""Where the time goes: ONNX Runtime's per-node profile of two engines, grouped by kernel class.

Used by ``pipeline_bench`` to explain the INT8-vs-FP32 speedup of ResNet50: each convolution
is classed by its kernel size and stride (``conv 3x3``, ``conv 1x1/2``, ...), everything else
by op type. For every class it prints the summed per-node median time of both engines and
their ratio, and a ceiling: the speedup the INT8 engine would reach if every convolution ran
at the ratio of the best convolution class and the other ops stayed as measured.
"""

from __future__ import annotations

import collections
import json
import statistics
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

_CONV_OPS = {"Conv": 1, "QLinearConv": 3, "FusedConv": 1}  # op type -> index of the weight input


@dataclass(frozen=True)
class KernelClasses:
    """Summed per-node median time (ms) and node count per kernel class, for one engine."""

    times_ms: Mapping[str, float]
    counts: Mapping[str, int]

    @property
    def total_ms(self) -> float:
        """Sum over all classes."""
        return sum(self.times_ms.values())


def conv_classes(model: onnx.ModelProto) -> dict[str, str]:
    """Map each convolution node's name to ``"conv KxK"`` or ``"conv KxK/S"`` (S = stride)."""
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    classes = {}
    for node in model.graph.node:
        index = _CONV_OPS.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in shapes:
            continue
        kernel = shapes[node.input[index]][-2:]
        strides = [list(a.ints) for a in node.attribute if a.name == "strides"]
        stride = strides[0][0] if strides else 1
        suffix = f"/{stride}" if stride != 1 else ""
        classes[node.name] = f"conv {kernel[0]}x{kernel[1]}{suffix}"
    return classes


def profile_kernel_classes(
    engine_path: Path, batch: np.ndarray, *, threads: int, runs: int
) -> KernelClasses:
    """Run ``engine_path`` ``runs`` times with ORT profiling on and group node times by class."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="qatflow-profile-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = ort.InferenceSession(
            str(engine_path), options, providers=["CPUExecutionProvider"]
        )
        feeds = {session.get_inputs()[0].name: batch}
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
        classes = conv_classes(onnx.load(options.optimized_model_filepath))
    per_node: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            node = name.removesuffix("_kernel_time")
            per_node[(node, event["args"]["op_name"])].append(event["dur"] / 1000)
    times: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter[str] = collections.Counter()
    for (node, op_type), durations in per_node.items():
        kind = classes.get(node, op_type)
        times[kind] += statistics.median(durations)
        counts[kind] += 1
    return KernelClasses(dict(times), dict(counts))


def conv_ceiling(fp32: KernelClasses, int8: KernelClasses) -> tuple[str, float]:
    """Best convolution class by FP32/INT8 ratio, and the whole-model speedup it would allow."""
    ratios = {
        kind: fp32.times_ms[kind] / int8.times_ms[kind]
        for kind in fp32.times_ms
        if kind.startswith("conv ") and int8.times_ms.get(kind)
    }
    best = max(ratios, key=ratios.__getitem__)
    fp32_conv = sum(v for k, v in fp32.times_ms.items() if k.startswith("conv "))
    int8_other = sum(v for k, v in int8.times_ms.items() if not k.startswith("conv "))
    return best, fp32.total_ms / (fp32_conv / ratios[best] + int8_other)


def print_kernel_table(fp32: KernelClasses, int8: KernelClasses) -> None:
    """Print the per-class table and the ceiling line."""
    kinds = sorted(
        set(fp32.times_ms) | set(int8.times_ms),
        key=lambda k: (not k.startswith("conv "), -fp32.times_ms.get(k, 0.0), k),
    )
    header = f"{'nodes':>11s} {'FP32 ms':>8s} {'INT8 ms':>8s} {'FP32/INT8':>9s}"
    print(f"  {'kernel class':26s} {header}")
    for kind in kinds:
        a, b = fp32.times_ms.get(kind, 0.0), int8.times_ms.get(kind, 0.0)
        nodes = f"{fp32.counts.get(kind, 0)}/{int8.counts.get(kind, 0)}"
        ratio = f"{a / b:8.2f}x" if a and b else f"{'-':>9s}"
        print(f"  {kind:26s} {nodes:>11s} {a:8.2f} {b:8.2f} {ratio}")
    print(
        f"  {'all nodes':26s} {'':>11s} {fp32.total_ms:8.2f} {int8.total_ms:8.2f} "
        f"{fp32.total_ms / int8.total_ms:8.2f}x"
    )
    best, ceiling = conv_ceiling(fp32, int8)
    print(f"  ceiling: every conv at the {best} ratio, other INT8 ops as measured: {ceiling:.2f}x")
