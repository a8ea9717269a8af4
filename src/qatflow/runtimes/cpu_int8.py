"""Which integer encoding ONNX Runtime's x86 CPU kernels compute exactly on this machine.

ONNX Runtime runs an INT8 convolution or matrix product on uint8 activations with either int8
weights (U8S8) or uint8 weights (U8U8). Without VNNI, its U8S8 kernels add pairs of u8 x s8
products in int16 with saturation (VPMADDUBSW: 2 x 255 x 127 > 32767), so large activations
give wrong sums. With AVX-512 VNNI, AVX-VNNI or AMX the products accumulate in int32 and
nothing saturates. U8U8 (the same int8 weights stored as uint8 with zero-point 128, an exact
re-encoding) never saturates but is slower.

The CPU flags are read with CPUID for the record; the decision itself comes from a
probe that runs ORT's fused kernels on worst-case values and compares them with exact integer
arithmetic, so it holds for whatever kernel ORT picks on this CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qatflow.errors import RuntimeBackendError
from qatflow.onnx.encoding import ENCODINGS, NARROW_MAX, Encoding, encode_weights
from qatflow.runtimes import cpuid

EncodingChoice = Literal["auto", "u8s8", "u8u8"]
ENCODING_CHOICES: tuple[str, ...] = get_args(EncodingChoice)
# CPU flags (as /proc/cpuinfo spells them) that decide how ORT's integer kernels accumulate.
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2")


@dataclass(frozen=True)
class CpuInt8:
    """What this CPU offers for INT8: its relevant flags and which encodings ORT runs exactly."""

    flags: tuple[str, ...]
    exact: tuple[str, ...]

    @property
    def isa(self) -> str:
        """A short name: ``amx_int8``, ``avx512_vnni``, ``avx_vnni``, ``avx512bw (no VNNI)``..."""
        for flag in INT8_FLAGS[:3]:
            if flag in self.flags:
                return flag
        for flag in INT8_FLAGS[3:]:
            if flag in self.flags:
                return f"{flag} (no VNNI)"
        return "x86 without AVX2" if self.flags else "unknown"

    def best_encoding(self) -> Encoding:
        """U8S8 where it is exact (the fast kernels), else U8U8."""
        if "u8s8" in self.exact:
            return "u8s8"
        if "u8u8" in self.exact:
            return "u8u8"
        raise RuntimeBackendError(
            f"no integer encoding runs exactly on this CPU ({self.isa}) with ONNX Runtime"
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready record for engine metadata and results."""
        return {"isa": self.isa, "flags": list(self.flags), "exact_encodings": list(self.exact)}


def float_kernels(flags: Iterable[str]) -> str:
    """``avx512``, ``avx2`` or ``other``: which float kernels MLAS picks on a CPU with ``flags``.

    They sum in different orders: NCHWc convolutions block 16 channels with AVX-512 and 8 with
    AVX2, so a Conv on them rounds differently from one family to the other (a random-weight
    ResNet50 engine: up to 0.25 apart, 2026-12-03). ``avx512bw`` stands for AVX-512: every
    AVX-512 CPU but the Xeon Phi has it.
    """
    present = set(flags)
    return "avx512" if "avx512bw" in present else "avx2" if "avx2" in present else "other"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The INT8-relevant flags of this CPU, in ``/proc/cpuinfo`` spelling.

    Read with CPUID (``qatflow.runtimes.cpuid``): what this process can execute, which is what
    ONNX Runtime picks its kernels from, also under an emulator or a CPUID mask. ``cpuinfo`` is
    the fallback where CPUID cannot be run.
    """
    from_cpuid = cpuid.read_flags()
    if from_cpuid is not None:
        return from_cpuid
    try:
        text = cpuinfo.read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            present = set(value.split())
            return tuple(flag for flag in INT8_FLAGS if flag in present)
    return ()


@functools.cache
def detect() -> CpuInt8:
    """This machine's INT8 capabilities (flags read once, encodings probed once per process)."""
    return CpuInt8(flags=cpu_flags(), exact=tuple(e for e in ENCODINGS if probe_exact(e)))  # type: ignore[arg-type]


def choose_encoding(requested: str) -> Encoding:
    """The encoding for ``requested`` (``auto``: the exact fast one on this CPU)."""
    if requested not in ENCODING_CHOICES:
        raise RuntimeBackendError(
            f"encoding must be one of {list(ENCODING_CHOICES)}, got {requested!r}"
        )
    if requested == "auto":
        return detect().best_encoding()
    return requested  # type: ignore[return-value]


# --------------------------------------------------------------------------- the probe


def probe_model(encoding: Encoding) -> onnx.ModelProto:
    """A QDQ model whose convolutions and matrix products ORT fuses into integer kernels.

    Worst case for int16 pair sums: uint8 activations at 255 and weights at +127 (half of the
    output channels) or -127 (the other half). Covers QLinearConv with a channel count that
    takes MLAS's symmetric kernel (a multiple of 4) and one that does not, QLinearMatMul and
    QGemm. Output scales are such that a halved (saturated) sum lands on another value. Each
    op also appears on 7-bit activations (at 127 after a ``Clip``, which ``encode_weights``
    leaves in U8S8 under ``u8u8``), so the probe of ``u8u8`` covers those kernels too.
    """
    inits = [
        numpy_helper.from_array(np.array(1.0 / 255.0, np.float32), "s"),
        numpy_helper.from_array(np.array(1.0 / NARROW_MAX, np.float32), "s_narrow"),
        numpy_helper.from_array(np.array(0, np.uint8), "z"),
        numpy_helper.from_array(np.array(NARROW_MAX, np.uint8), "z_top"),
        numpy_helper.from_array(np.array(1.0 / 127.0, np.float32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"),
        numpy_helper.from_array(np.array(128, np.uint8), "z_out"),
    ]
    nodes: list[onnx.NodeProto] = []
    inputs, outputs = [], []
    # name, op, input shape, weight shape, output scale (exact |sum| / 100; None: float output)
    cases = (
        ("conv8", "Conv", [1, 8, 6, 6], (16, 8, 3, 3), 0.72),
        ("conv3", "Conv", [1, 3, 6, 6], (16, 3, 3, 3), 0.27),
        ("matmul", "MatMul", [1, 288], (288, 16), 2.88),
        ("gemm", "Gemm", [1, 288], (288, 16), None),
    )
    for base, op, shape, weight_shape, out_scale in cases:
        for narrow in (False, True):
            name = f"{base}_narrow" if narrow else base
            weights = np.full(weight_shape, 127, np.int8)
            channel_axis = 0 if op == "Conv" else 1
            np.moveaxis(weights, channel_axis, 0)[weight_shape[channel_axis] // 2 :] = -127
            inits.append(numpy_helper.from_array(weights, f"{name}_wq"))
            attrs: dict[str, Any] = {"pads": [1, 1, 1, 1]} if op == "Conv" else {}
            scale = "s_narrow" if narrow else "s"
            nodes.append(helper.make_node("QuantizeLinear", [name, scale, "z"], [f"{name}_xq"]))
            quantized = f"{name}_xq"
            if narrow:
                quantized = f"{name}_x7"
                nodes.append(helper.make_node("Clip", [f"{name}_xq", "z", "z_top"], [quantized]))
            nodes += [
                helper.make_node("DequantizeLinear", [quantized, scale, "z"], [f"{name}_x"]),
                helper.make_node("DequantizeLinear", [f"{name}_wq", "ws", "wz"], [f"{name}_w"]),
                helper.make_node(op, [f"{name}_x", f"{name}_w"], [f"{name}_y"], **attrs),
            ]
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            out_shape = [1, 16, 6, 6] if op == "Conv" else [1, 16]
            if out_scale is None:
                outputs.append(
                    helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, out_shape)
                )
                continue
            inits.append(numpy_helper.from_array(np.array(out_scale, np.float32), f"{name}_s"))
            nodes.append(
                helper.make_node(
                    "QuantizeLinear", [f"{name}_y", f"{name}_s", "z_out"], [f"{name}_q"]
                )
            )
            outputs.append(helper.make_tensor_value_info(f"{name}_q", TensorProto.UINT8, out_shape))
    graph = helper.make_graph(nodes, "qatflow_int8_probe", inputs, outputs, inits)
    # IR 8 (opset 17): loadable by every ONNX Runtime the project supports, whatever onnx made.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    encode_weights(model, encoding)
    return model


def probe_exact(encoding: Encoding) -> bool:
    """Whether ORT's fused integer kernels match float math on the worst-case probe model."""
    from qatflow.onnx.reference import run_optimized, run_reference

    model = probe_model(encoding)
    feeds = {
        i.name: np.ones([d.dim_value for d in i.type.tensor_type.shape.dim], np.float32)
        for i in model.graph.input
    }
    names = [o.name for o in model.graph.output]
    expected = run_reference(model, feeds, names)
    fused = run_optimized(model, feeds, names)
    return all(
        np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        for a, b in zip(expected, fused, strict=True)
    )
