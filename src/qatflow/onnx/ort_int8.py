"""Rewrite TensorRT-style INT8 QDQ graphs so ONNX Runtime's x86 CPU kernels run them in INT8.

TensorRT wants signed int8 Q/DQ (zero-point 0, narrow range) on the *inputs* of weighted ops and
never on their outputs. ONNX Runtime on x86 fuses a QDQ group into an integer kernel only when the
activations are uint8 (``QDQIsInt8Allowed()`` is false off ARM) and the op's output goes straight
into a QuantizeLinear (``DQ -> Conv -> Q`` becomes QLinearConv; a Relu in between is dropped only
when the Q's zero-point is the type minimum). This module rewrites the ONNX graph so both hold:

1. exact passes: weight Q folded into int8 initializers (with any Transpose/Reshape between DQ and
   the op applied to them), activations re-encoded as uint8 with zero-point 128 (``q_u8 = q_s8 +
   128``, same scale), Q moved above data-movement ops (MaxPool, Pad, Reshape, Transpose, Clip...),
   identical Qs of one tensor merged; and BatchNormalization/Mul/Add after a Conv folded into its
   per-channel weight scales and bias, which is the same math but not bit-exact (the folded scale
   and bias are rounded once in float32, where the reference rounds after each op);
2. fusion passes: for every op ORT can run in integer (Conv, MatMul, Gemm, Add, Mul, pools,
   Concat...) the output gets one Q: a Relu before the Q is absorbed (``relu="absorb"``: the Q's
   zero-point moves to 0, so values above 127*scale are no longer clipped) or done in uint8
   (``relu="exact"``); where the output also feeds float consumers or Qs with other scales, a
   requantization point is added (``requantize``), with the scale of a downstream Q or, for
   the float input of a residual Add, from ``calibration`` batches run through the input graph
   (else from the Q after the Add); a MatMul of two DQs followed by a bias Add becomes a
   bias-less Gemm so ORT runs QGemm instead of dequantizing the weights on every call;
3. exact clean-ups of the final layout: a zero Pad before a DQ -> Conv (Keras' ZeroPadding2D)
   folded into the Conv's pads, the swish ``x * Sigmoid(x)`` as ORT's QuickGelu, which ORT
   does not fuse itself once a DQ feeds it (docs/exact-int8.md, "Why the rewrite was slower"),
   each uint8 ReLU output stored as the 7-bit values TensorRT keeps (zero-point 0), on
   which U8S8 kernels cannot saturate (docs/exact-int8.md, "The narrow stage"), and, with
   ``integer_convs``, the other Convs and the non-Conv integer kernels before the first
   named Conv kept float (an identity Max before their Q).

See docs/ort-int8.md for the measured speed and accuracy of each option.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qatflow.errors import RuntimeBackendError
from qatflow.onnx.encoding import NARROW_MAX, NARROW_PASS_THROUGH, uint8_scalar
from qatflow.onnx.graph import (
    GraphIndex,
    apply_layout,
    drop_unused_initializers,
    quantize_constant,
    set_metadata_json,
    topological_sort,
)
from qatflow.onnx.integer_kernels import integer_kernel_scales
from qatflow.onnx.reference import session as reference_session
from qatflow.onnx.reference import with_outputs

logger = logging.getLogger("qatflow.onnx.ort_int8")

Feeds = Mapping[str, np.ndarray]
CalibrationData = Iterable[Feeds] | Callable[[], Iterable[Feeds]]
ReluMode = Literal["absorb", "exact"]
RequantizeMode = Literal["none", "downstream", "calibrated"]

METADATA_KEY = "qatflow.ort_int8"
# The rewrite's stages, in order; ``rewrite_for_ort_int8(until=...)`` stops after one, so each
# prefix can be checked against the reference on its own. EXACT_STAGES are bit-exact, except
# affine_fold, which is the same math up to float rounding (docs/exact-int8.md).
STAGES = (
    "weight_quantize",
    "weight_layout",
    "affine_fold",
    "reencode",
    "merge",
    "hoist",
    "outputs",
    "gemm",
    "collapse",
    "pad_fold",
    "swish",
    "narrow",
    "keep_float",
)
# pad_fold, swish, narrow and keep_float are bit-exact as well; they run last: they match the
# final layout.
EXACT_STAGES = (*STAGES[:6], "pad_fold", "swish", "narrow", "keep_float")
_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
_MS_DOMAIN = "com.microsoft"
# Ops whose QDQ group ORT's CPU selectors turn into an integer kernel when the output has a Q.
_INTEGER_OPS = frozenset(
    {
        "Conv",
        "MatMul",
        "Gemm",
        "Add",
        "Mul",
        "AveragePool",
        "GlobalAveragePool",
        "Concat",
        "LeakyRelu",
        "Sigmoid",
        "Softmax",
    }
)
# Ops for which a calibrated requantization point is worth it: without an output Q they run in
# float (MatMul/Gemm have MatMulIntegerToFloat/QGemm float-output kernels instead).
_CALIBRATED_OPS = frozenset({"Conv", "Add", "Mul", "AveragePool", "GlobalAveragePool", "Concat"})
# Ops with Q(op(x)) == op'(Q(x)) exactly for a per-tensor Q with positive scale.
_HOISTABLE = frozenset(
    {
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
        "Identity",
        "MaxPool",
        "Pad",
        "Clip",
        "Relu",
    }
)
_WEIGHT_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity"})
_INT_RANGE: dict[int, tuple[int, int]] = {
    TensorProto.UINT8: (0, 255),
    TensorProto.INT8: (-128, 127),
}
_NP_TYPE: dict[int, type[np.integer[Any]]] = {
    TensorProto.UINT8: np.uint8,
    TensorProto.INT8: np.int8,
}


@dataclass(frozen=True)
class _QParams:
    """Per-tensor quantization parameters of one Q or DQ node."""

    scale: float
    zero_point: int
    dtype: int

    def with_zero_point(self, zero_point: int, dtype: int | None = None) -> _QParams:
        return _QParams(self.scale, zero_point, self.dtype if dtype is None else dtype)


class _Rewriter:
    """A mutable view of one ONNX graph: lookups, node insertion and rewiring."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.stats: Counter[str] = Counter()
        self.requantized: list[str] = []
        self._consts: dict[tuple[bytes, str, tuple[int, ...]], str] = {}
        self._names = {n.name for n in self.graph.node} | {
            name for n in self.graph.node for name in (*n.input, *n.output)
        }
        self._names |= {i.name for i in self.graph.initializer} | {i.name for i in self.graph.input}
        seen: set[str] = set()
        for node in self.graph.node:  # integer_convs selects Convs by node name
            if not node.name or node.name in seen:
                node.name = self.fresh(f"{node.output[0]}_{node.op_type}")
            seen.add(node.name)
        self.index = GraphIndex(self.graph)
        self.reindex()

    # -- bookkeeping -------------------------------------------------------------------------

    def reindex(self) -> None:
        """Drop dead nodes, sort topologically and rebuild the producer/consumer index."""
        topological_sort(self.graph)
        live = {o.name for o in self.graph.output}
        keep: list[onnx.NodeProto] = []
        for node in reversed(self.graph.node):
            if any(o in live for o in node.output):
                keep.append(node)
                live.update(node.input)
        if len(keep) != len(self.graph.node):
            keep.reverse()
            del self.graph.node[:]
            self.graph.node.extend(keep)
        self.index = GraphIndex(self.graph)

    def fresh(self, hint: str) -> str:
        base = hint.replace(":", "_").replace("/", "_")
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def const(self, name: str) -> np.ndarray | None:
        return self.index.constant(name) if name else None

    def is_const(self, name: str) -> bool:
        """Whether ``name`` is an initializer or a Constant output (without converting it)."""
        producer = self.index.producer.get(name)
        return name in self.index.initializers or (
            producer is not None and producer.op_type == "Constant"
        )

    def add_const(self, value: np.ndarray, hint: str) -> str:
        key = (value.tobytes(), value.dtype.str, value.shape)
        if key not in self._consts:
            name = self.fresh(hint)
            self.graph.initializer.append(numpy_helper.from_array(value, name))
            self._consts[key] = name
        return self._consts[key]

    def add_node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        """Append a node; returns its (only) output name."""
        out = output or self.fresh(f"{inputs[0]}_{op}")
        self.graph.node.append(
            helper.make_node(op, inputs, [out], name=self.fresh(f"{out}_{op}"), **attrs)
        )
        return out

    def rewire(self, old: str, new: str) -> None:
        """Point every reader of tensor ``old`` at ``new`` (graph outputs are never renamed)."""
        for node in self.index.consumers.get(old, []):
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return list(self.index.consumers.get(name, []))

    def is_output(self, name: str) -> bool:
        return name in self.index.outputs

    # -- quantization parameters -------------------------------------------------------------

    def qparams(self, node: onnx.NodeProto) -> _QParams | None:
        """Per-tensor parameters of a Q/DQ node with constant scale and zero-point, else None."""
        if node.op_type not in (_Q, _DQ) or any(a.name == "block_size" for a in node.attribute):
            return None
        scale = self.const(node.input[1])
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zero = self.const(zp_name) if zp_name else np.zeros((), np.uint8)
        if scale is None or zero is None or scale.size != 1 or zero.size != 1:
            return None
        dtype = helper.np_dtype_to_tensor_dtype(zero.dtype)
        if dtype not in _INT_RANGE or not float(scale.reshape(())) > 0:
            return None
        return _QParams(float(scale.reshape(())), int(zero.reshape(())), dtype)

    def set_qparams(self, node: onnx.NodeProto, params: _QParams) -> None:
        scale = self.add_const(np.array(params.scale, np.float32), "ort_int8_scale")
        zero = self.add_const(
            np.array(params.zero_point, _NP_TYPE[params.dtype]), "ort_int8_zero_point"
        )
        node.input[1] = scale
        if len(node.input) > 2:
            node.input[2] = zero
        else:
            node.input.append(zero)

    def quantize(self, source: str, params: _QParams) -> str:
        out = self.add_node(_Q, [source, "", ""])
        self.set_qparams(self.graph.node[-1], params)
        return out

    def dequantize(self, source: str, params: _QParams) -> str:
        out = self.add_node(_DQ, [source, "", ""])
        self.set_qparams(self.graph.node[-1], params)
        return out

    def activation_q(self, node: onnx.NodeProto) -> _QParams | None:
        """Parameters of a Q node quantizing a non-constant tensor, else None."""
        if node.op_type != _Q or self.is_const(node.input[0]):
            return None
        return self.qparams(node)


# ------------------------------------------------------------------------------------------
# Exact passes
# ------------------------------------------------------------------------------------------


def _axis_of(node: onnx.NodeProto) -> int:
    for attr in node.attribute:
        if attr.name == "axis":
            return int(attr.i)
    return 1


def _fold_weight_quantize(rw: _Rewriter) -> None:
    """Constant -> QuantizeLinear becomes an int8 initializer (what ORT constant-folds anyway)."""
    for q in [n for n in rw.graph.node if n.op_type == _Q and rw.is_const(n.input[0])]:
        x, scale = rw.const(q.input[0]), rw.const(q.input[1])
        zp_name = q.input[2] if len(q.input) > 2 else ""
        zero = rw.const(zp_name) if zp_name else np.zeros((), np.uint8)
        if x is None or scale is None or zero is None or x.dtype.kind != "f":
            continue
        if rw.is_output(q.output[0]) or any(a.name == "block_size" for a in q.attribute):
            continue
        quantized = quantize_constant(x, scale, zero, _axis_of(q))
        rw.rewire(q.output[0], rw.add_const(quantized, f"{q.output[0]}_int8"))
        rw.stats["weights_prequantized"] += 1
    rw.reindex()


def _moved_channels(
    rw: _Rewriter, node: onnx.NodeProto, shape: tuple[int, ...], axis: int
) -> tuple[int, np.ndarray] | None:
    """Where channel ``axis`` of a tensor of ``shape`` ends up after layout op ``node``.

    Returns ``(new_axis, source)``: along ``new_axis`` of the moved tensor, position ``i`` holds
    only elements of source channel ``source[i]`` (a plain move has ``source == arange``; a
    depthwise Reshape that merges channels with the depth multiplier repeats each channel).
    None when no axis of the result holds a single source channel per position.
    """
    channels = np.arange(shape[axis]).reshape([-1 if a == axis else 1 for a in range(len(shape))])
    moved = apply_layout(node, np.broadcast_to(channels, shape), rw.const)
    if moved is None:
        return None
    found: list[tuple[int, np.ndarray]] = []
    for a, size in enumerate(moved.shape):
        rows = np.moveaxis(moved, a, 0).reshape(size, -1)
        if size > 1 and rows.shape[1] and np.all(rows == rows[:, :1]):
            found.append((a, rows[:, 0].copy()))
    # Prefer a plain move, which keeps the parameters as they are.
    found.sort(key=lambda f: not np.array_equal(f[1], np.arange(shape[axis])))
    return found[0] if found else None


def _fold_weight_layout(rw: _Rewriter) -> None:
    """DQ(int8 constant) -> Transpose/Reshape/... becomes DQ(moved int8 constant).

    Per-channel scales and zero-points follow their channels: moved with a Transpose, repeated
    per output channel where a depthwise Reshape merges channels and the depth multiplier.
    Every weight keeps its own scale and zero-point, so the result is bit-exact.
    """
    changed = True
    while changed:
        changed = False
        for dq in [n for n in rw.graph.node if n.op_type == _DQ and rw.is_const(n.input[0])]:
            users = [
                u
                for u in rw.consumers(dq.output[0])
                if u.op_type in _WEIGHT_LAYOUT_OPS
                and u.input[0] == dq.output[0]
                and not rw.is_output(u.output[0])
            ]
            data, scale = rw.const(dq.input[0]), rw.const(dq.input[1])
            zp_name = dq.input[2] if len(dq.input) > 2 else ""
            zero = rw.const(zp_name) if zp_name else None
            if not users or data is None or scale is None or (zp_name and zero is None):
                continue
            if any(a.name == "block_size" for a in dq.attribute):
                continue
            for user in users:
                moved = apply_layout(user, data, rw.const)
                if moved is None:
                    continue
                attrs = {}
                params = list(dq.input[1:])
                if scale.size > 1:
                    axis = _axis_of(dq) % data.ndim
                    if scale.size != data.shape[axis]:
                        continue
                    found = _moved_channels(rw, user, data.shape, axis)
                    if found is None:
                        continue
                    attrs["axis"], source = found
                    if not np.array_equal(source, np.arange(data.shape[axis])):
                        gathered = scale.reshape(-1)[source]
                        params = [rw.add_const(gathered, f"{user.output[0]}_scale")]
                        if zero is not None:
                            gathered = zero.reshape(-1)[source] if zero.size > 1 else zero
                            params.append(rw.add_const(gathered, f"{user.output[0]}_zero_point"))
                inputs = [rw.add_const(moved, f"{user.output[0]}_int8"), *params]
                detached = rw.fresh(f"{user.output[0]}_float")
                rw.add_node(_DQ, inputs, user.output[0], **attrs)
                user.output[0] = detached
                rw.stats["weight_layout_folded"] += 1
                changed = True
        rw.reindex()


def _channel_vector(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``value`` as a per-output-channel vector for an NC... tensor of ``rank``, else None."""
    if value.size == 1:
        return np.full(channels, float(value.reshape(())), np.float32)
    position = value.ndim - (rank - 1)
    if position < 0 or value.shape[position] != channels or value.size != channels:
        return None
    return value.reshape(channels).astype(np.float32)


def _affine_after(
    rw: _Rewriter, node: onnx.NodeProto, channels: int, rank: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(gain, shift) per channel of a BatchNormalization/Mul/Add with constant parameters."""
    if node.op_type == "BatchNormalization":
        params = [rw.const(name) for name in node.input[1:5]]
        if any(node.output[1:]) or len(params) != 4:
            return None
        gamma, beta, mean, var = (
            p.astype(np.float64).reshape(-1) if p is not None else None for p in params
        )
        if gamma is None or beta is None or mean is None or var is None:
            return None
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        gain = gamma / np.sqrt(var + eps)
        return gain, beta - mean * gain
    if node.op_type not in ("Mul", "Add") or len(node.input) != 2:
        return None
    constant = [rw.const(name) for name in node.input]
    vectors = [_channel_vector(c, channels, rank) for c in constant if c is not None]
    if len(vectors) != 1 or vectors[0] is None:
        return None
    if node.op_type == "Mul":
        return vectors[0].astype(np.float64), np.zeros(channels)
    return np.ones(channels), vectors[0].astype(np.float64)


def _conv_weight(rw: _Rewriter, conv: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 weights, per-output-channel scale) of a Conv whose weight is DQ(int8 constant)."""
    w_dq = rw.index.producer.get(conv.input[1])
    if w_dq is None or w_dq.op_type != _DQ or not rw.is_const(w_dq.input[0]):
        return None
    data, scale = rw.const(w_dq.input[0]), rw.const(w_dq.input[1])
    zp_name = w_dq.input[2] if len(w_dq.input) > 2 else ""
    zero = rw.const(zp_name) if zp_name else np.zeros((), np.int8)
    if data is None or scale is None or zero is None or data.dtype != np.int8 or np.any(zero):
        return None
    if scale.size > 1 and _axis_of(w_dq) % data.ndim != 0:
        return None
    return data, np.broadcast_to(scale.reshape(-1), (data.shape[0],)).astype(np.float64)


def _fold_affine_into_conv(rw: _Rewriter, integer: Collection[str] | None = None) -> None:
    """Fold BatchNormalization (or per-channel Mul/Add) after a Conv into its DQ'd weights.

    ``conv(x, q * s) * g + h == conv(x, (q * sign(g)) * (s * |g|)) + h``: exact up to float
    rounding, as TensorRT does when it folds batch norm into an INT8 convolution. With
    ``integer`` (Conv node names), only those Convs are folded; the others stay float, as
    without folding.
    """
    changed = True
    while changed:
        changed = False
        for conv in [n for n in rw.graph.node if n.op_type == "Conv"]:
            if integer is not None and conv.name not in integer:
                continue
            plan = _fold_plan(rw, conv)
            if plan is None:
                continue
            _fold(rw, conv, *plan)
            rw.stats["affine_folded"] += 1
            changed = True
        rw.reindex()


_FoldPlan = tuple[onnx.NodeProto, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]


def _fold_plan(rw: _Rewriter, conv: onnx.NodeProto) -> _FoldPlan | None:
    """(the affine op, int8 weights, their scale, gain, shift, bias) when ``conv`` folds."""
    users = rw.consumers(conv.output[0])
    if len(users) != 1 or users[0].op_type not in ("BatchNormalization", "Mul", "Add"):
        return None
    has_bias = len(conv.input) > 2 and bool(conv.input[2])
    bias_value = rw.const(conv.input[2]) if has_bias else None
    weight = _conv_weight(rw, conv)
    if rw.is_output(conv.output[0]) or weight is None or (has_bias and bias_value is None):
        return None
    data, scale = weight
    affine = _affine_after(rw, users[0], data.shape[0], data.ndim)
    if affine is None or not np.all(np.isfinite(affine[0])) or np.any(affine[0] == 0):
        return None
    gain, shift = affine
    sign = np.sign(gain).reshape([-1] + [1] * (data.ndim - 1))
    if np.any((data == -128) & (sign < 0)):
        return None
    return users[0], data, scale, gain, shift, bias_value


def _fold(
    rw: _Rewriter,
    conv: onnx.NodeProto,
    affine: onnx.NodeProto,
    data: np.ndarray,
    scale: np.ndarray,
    gain: np.ndarray,
    shift: np.ndarray,
    bias_value: np.ndarray | None,
) -> None:
    """Fold ``affine`` (gain, shift per channel) into ``conv``'s weight scale and bias."""
    sign = np.sign(gain).astype(np.int8).reshape([-1] + [1] * (data.ndim - 1))
    bias = np.zeros(data.shape[0]) if bias_value is None else bias_value.astype(np.float64)
    inputs = [
        rw.add_const((data * sign).astype(np.int8), f"{conv.input[1]}_folded"),
        rw.add_const((scale * np.abs(gain)).astype(np.float32), f"{conv.input[1]}_scale"),
        rw.add_const(np.zeros(data.shape[0], np.int8), f"{conv.input[1]}_zero_point"),
    ]
    conv.input[1] = rw.add_node(_DQ, inputs, rw.fresh(f"{conv.input[1]}_folded"), axis=0)
    new_bias = rw.add_const((bias * gain + shift).astype(np.float32), f"{conv.name}_bias")
    if len(conv.input) > 2 and conv.input[2]:
        conv.input[2] = new_bias
    else:
        del conv.input[2:]
        conv.input.append(new_bias)
    # The Conv takes over the folded op's output name; the folded op becomes dead.
    conv.output[0], affine.output[0] = affine.output[0], conv.output[0]
    del affine.input[:]


def _after_integer_relu(rw: _Rewriter, name: str) -> bool:
    """Whether ``name`` is, through data-movement ops, the Relu of an integer-capable op."""
    node = rw.index.producer.get(name)
    while node is not None and node.op_type in _HOISTABLE - {"Clip", "Relu"}:
        pad_value = (
            rw.const(node.input[2]) if node.op_type == "Pad" and len(node.input) > 2 else None
        )
        if pad_value is not None and float(pad_value.reshape(())) < 0:
            return False  # a negative pad value would be clipped by a zero-point-0 Q
        node = rw.index.producer.get(node.input[0])
    if node is None or node.op_type != "Relu":
        return False
    source = rw.index.producer.get(node.input[0])
    return source is not None and source.op_type in _INTEGER_OPS


def _reencode_activations(rw: _Rewriter, relu: ReluMode) -> None:
    """int8 activation Q/DQ -> uint8 with the same scale.

    Zero-point 0 + 128 represents exactly the same values. With ``relu="absorb"`` a Q of a Relu
    output gets zero-point 0 instead, so the Relu becomes redundant; values above 127*scale
    are then kept rather than clipped.
    """
    for q in [n for n in rw.graph.node if n.op_type == _Q]:
        params = rw.activation_q(q)
        if params is None or params.dtype != TensorProto.INT8 or rw.is_output(q.output[0]):
            continue
        users = rw.consumers(q.output[0])
        if not all(u.op_type == _DQ and rw.qparams(u) == params for u in users):
            logger.debug("%s: int8 output read by non-matching nodes; left signed", q.name)
            continue
        zero_point = params.zero_point + 128
        if relu == "absorb" and params.zero_point == 0 and _after_integer_relu(rw, q.input[0]):
            zero_point = 0
            rw.stats["relu_absorbed"] += 1
        unsigned = params.with_zero_point(zero_point, TensorProto.UINT8)
        for node in (q, *users):
            rw.set_qparams(node, unsigned)
        rw.stats["activations_reencoded"] += 1
    rw.reindex()


def _merge_equal_quantizers(rw: _Rewriter) -> None:
    """Several Qs of one tensor with identical parameters become one."""
    for name in list(rw.index.consumers):
        seen: dict[_QParams, str] = {}
        for node in rw.consumers(name):
            params = rw.activation_q(node)
            # Only Qs *of* ``name``: a shared scale or zero-point constant is read by many Qs.
            if params is None or node.input[0] != name or rw.is_output(node.output[0]):
                continue
            if params in seen:
                rw.rewire(node.output[0], seen[params])
                rw.stats["quantizers_merged"] += 1
            else:
                seen[params] = node.output[0]
    rw.reindex()


def _integer_op(rw: _Rewriter, op: onnx.NodeProto, q_out: str, params: _QParams, x_q: str) -> None:
    """Append ``op`` computed on the quantized input ``x_q`` and writing ``q_out``."""
    inputs = [x_q, *op.input[1:]]
    qmin, qmax = _INT_RANGE[params.dtype]
    np_type = _NP_TYPE[params.dtype]

    def quantized_const(value: float) -> str:
        q = np.clip(
            np.rint(np.float32(value) / np.float32(params.scale)) + params.zero_point, qmin, qmax
        )
        return rw.add_const(np.array(q, np_type), "ort_int8_bound")

    if op.op_type == "Pad":
        pad_value = rw.const(inputs[2]) if len(inputs) > 2 else None
        value = 0.0 if pad_value is None else float(pad_value.reshape(()))
        inputs = [*inputs[:2], quantized_const(value), *inputs[3:]]
    if op.op_type == "Relu":
        rw.add_node("Max", [x_q, quantized_const(0.0)], q_out)
        return
    if op.op_type == "Clip":
        bounds = [rw.const(name) if name else None for name in inputs[1:3]]
        inputs = [x_q] + [
            quantized_const(float(b.reshape(()))) if b is not None else "" for b in bounds
        ]
    attrs = {a.name: helper.get_attribute_value(a) for a in op.attribute}
    rw.graph.node.append(
        helper.make_node(op.op_type, inputs, [q_out], name=rw.fresh(f"{op.name}_int"), **attrs)
    )


def _hoistable(rw: _Rewriter, op: onnx.NodeProto) -> bool:
    """Whether a per-tensor Q after ``op`` can move before it (see _integer_op)."""
    extra = [rw.const(name) for name in op.input[1:] if name]
    if op.op_type == "Pad":
        mode = next((a.s for a in op.attribute if a.name == "mode"), b"constant")
        return mode == b"constant" and all(c is not None for c in extra)
    if op.op_type == "Clip":
        return all(c is not None and c.size == 1 for c in extra)
    if op.op_type == "MaxPool":
        return len([o for o in op.output if o]) == 1
    return op.op_type in _HOISTABLE


def _hoist_quantizers(rw: _Rewriter, requantize: RequantizeMode) -> None:
    """Move Q above data-movement ops: ``Q(op(x)) == op(Q(x))`` for MaxPool, Pad, Reshape...

    Applied where every reader of the op's output is a Q. Readers with other parameters than
    the largest-scale one are requantized from it, unless ``requantize`` is ``"none"``.
    """
    changed = True
    while changed:
        changed = False
        for q in [n for n in rw.graph.node if n.op_type == _Q]:
            op = rw.index.producer.get(q.input[0])
            if op is None or not _hoistable(rw, op) or rw.is_const(op.input[0]):
                continue
            point = q.input[0]
            readers = [(r, rw.activation_q(r)) for r in rw.consumers(point)]
            found = [p for _, p in readers if p is not None]
            if rw.is_output(point) or len(found) != len(readers):
                continue
            params = max(found, key=lambda p: p.scale)
            if len(set(found)) > 1 and (requantize == "none" or len({p.dtype for p in found}) > 1):
                continue
            out = rw.quantize(op.input[0], params)
            if op.op_type != "Relu" or params.zero_point != _INT_RANGE[params.dtype][0]:
                quantized, out = out, rw.fresh(f"{q.output[0]}_hoisted")
                _integer_op(rw, op, out, params, quantized)
            requantized = ""
            for reader, reader_params in readers:
                if reader_params == params:
                    rw.rewire(reader.output[0], out)
                else:
                    requantized = requantized or rw.dequantize(out, params)
                    reader.input[0] = requantized
            if requantized:
                rw.requantized.append(point)
            rw.stats["quantizers_hoisted"] += 1
            changed = True
            rw.reindex()
            break


# ------------------------------------------------------------------------------------------
# Fusion passes
# ------------------------------------------------------------------------------------------


def _has_integer_inputs(rw: _Rewriter, node: onnx.NodeProto) -> bool:
    """Every input of ``node`` is a uint8/int8 DequantizeLinear as ORT's QDQ selectors want."""
    inputs = [name for name in node.input if name]
    if node.op_type == "Conv" and len(inputs) == 3 and rw.is_const(inputs[2]):
        inputs = inputs[:2]  # ORT quantizes a float bias constant itself (BiasQuantization)
    if node.op_type not in _INTEGER_OPS or len(node.output) != 1 or not inputs:
        return False
    producers = [rw.index.producer.get(name) for name in inputs]
    params = [rw.qparams(p) if p is not None and p.op_type == _DQ else None for p in producers]
    if node.op_type in ("Conv", "MatMul", "Gemm"):
        weight = producers[1]
        return (
            params[0] is not None
            and params[0].dtype == TensorProto.UINT8
            and weight is not None
            and weight.op_type == _DQ
            and rw.is_const(weight.input[0])
        )
    return all(p is not None and p.dtype == TensorProto.UINT8 for p in params)


def _calibration_points(rw: _Rewriter) -> list[str]:
    """Tensors that may need a calibrated scale: outputs of ops in _CALIBRATED_OPS (and Relus)."""
    points: list[str] = []
    for node in rw.graph.node:
        if node.op_type in _CALIBRATED_OPS and len(node.output) == 1:
            points.append(node.output[0])
            users = rw.consumers(node.output[0])
            if len(users) == 1 and users[0].op_type == "Relu":
                points.append(users[0].output[0])
    return points


def _calibrate(
    model: onnx.ModelProto, names: list[str], calibration: CalibrationData
) -> dict[str, tuple[float, float]]:
    """Min and max of each tensor in ``names`` over the calibration batches.

    ``model`` runs as float math (:func:`qatflow.onnx.reference.session`): ORT's default
    optimizations would fuse some of its QDQ groups into integer kernels, whose U8S8 sums
    saturate on CPUs without VNNI and would corrupt the measured ranges.
    """
    produced = {name for node in model.graph.node for name in node.output}
    wanted = [n for n in dict.fromkeys(names) if n in produced]
    session = reference_session(with_outputs(model, wanted), optimize=False)
    input_names = [i.name for i in session.get_inputs()]
    ranges: dict[str, tuple[float, float]] = {}
    batches = calibration() if callable(calibration) else calibration
    for number, feeds in enumerate(batches):
        missing = [n for n in input_names if n not in feeds]
        if missing:
            raise RuntimeBackendError(
                f"calibration batch {number} lacks model input(s) {missing}; it has {sorted(feeds)}"
            )
        for name, value in zip(
            wanted, session.run(wanted, {n: feeds[n] for n in input_names}), strict=True
        ):
            lo, hi = ranges.get(name, (np.inf, -np.inf))
            ranges[name] = (min(lo, float(value.min())), max(hi, float(value.max())))
    if not ranges:
        raise RuntimeBackendError("calibration yielded no batches")
    return ranges


def _calibrated_params(lo: float, hi: float) -> _QParams | None:
    """Asymmetric uint8 parameters covering [min(lo, 0), max(hi, 0)]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not hi > lo:
        return None
    scale = float(np.float32((hi - lo) / 255.0))
    return _QParams(scale, int(np.clip(np.rint(-lo / scale), 0, 255)), TensorProto.UINT8)


def _downstream_params(rw: _Rewriter, point: str) -> _QParams | None:
    """Scale of the Q after the Add that ``point`` feeds (through a Relu), zero-point 128.

    For the float input of a residual Add, whose sum TensorRT quantizes next.
    """
    readers = rw.consumers(point)
    if len(readers) != 1 or readers[0].op_type != "Add" or rw.is_output(readers[0].output[0]):
        return None
    after = rw.consumers(readers[0].output[0])
    if len(after) == 1 and after[0].op_type == "Relu" and not rw.is_output(after[0].output[0]):
        after = rw.consumers(after[0].output[0])
    found = [rw.activation_q(n) for n in after]
    scales = [p.scale for p in found if p is not None and p.dtype == TensorProto.UINT8]
    return _QParams(max(scales), 128, TensorProto.UINT8) if scales else None


def _output_params(
    rw: _Rewriter,
    node: onnx.NodeProto,
    point: str,
    requantize: RequantizeMode,
    ranges: Mapping[str, tuple[float, float]],
) -> tuple[_QParams, list[tuple[onnx.NodeProto, _QParams]], list[onnx.NodeProto]] | None:
    """The Q parameters for tensor ``point``, its uint8 Q readers and its other readers.

    None when the tensor should stay float under ``requantize``.
    """
    qs: list[tuple[onnx.NodeProto, _QParams]] = []
    floats: list[onnx.NodeProto] = []
    for reader in rw.consumers(point):
        params = rw.activation_q(reader)
        if params is not None and params.dtype == TensorProto.UINT8:
            qs.append((reader, params))
        else:
            floats.append(reader)
    chosen: _QParams | None = None
    if qs:
        chosen = max((p for _, p in qs), key=lambda p: p.scale)
    elif requantize != "none" and node.op_type in _CALIBRATED_OPS:
        if requantize == "calibrated" and point in ranges:
            chosen = _calibrated_params(*ranges[point])
        else:
            chosen = _downstream_params(rw, point)
    if chosen is None or (requantize == "none" and (floats or any(p != chosen for _, p in qs))):
        return None
    return chosen, qs, floats


def _quantize_output(
    rw: _Rewriter,
    node: onnx.NodeProto,
    relu: ReluMode,
    requantize: RequantizeMode,
    ranges: Mapping[str, tuple[float, float]],
) -> None:
    """Give ``node``'s output exactly one Q, directly or through a Relu, so ORT fuses ``node``.

    Readers that are Qs with the chosen parameters read the new Q's output instead; other Qs
    and float readers read its dequantized value (a requantization).
    """
    out = node.output[0]
    users = rw.consumers(out)
    relu_node = users[0] if len(users) == 1 and users[0].op_type == "Relu" else None
    point = relu_node.output[0] if relu_node is not None else out
    found = (
        None
        if rw.is_output(out) or rw.is_output(point)
        else _output_params(rw, node, point, requantize, ranges)
    )
    if found is None:
        return
    chosen, qs, floats = found
    final = chosen
    if relu_node is not None and relu == "absorb":
        final = chosen.with_zero_point(_INT_RANGE[chosen.dtype][0])
        quantized = rw.quantize(out, final)
    elif relu_node is not None:
        zero = rw.add_const(np.array(chosen.zero_point, _NP_TYPE[chosen.dtype]), "ort_int8_relu")
        quantized = rw.add_node("Max", [rw.quantize(out, chosen), zero])
    else:
        quantized = rw.quantize(out, chosen)
    requantized = ""
    for reader, params in qs:
        readers = rw.consumers(reader.output[0])
        if params == chosen and (final == chosen or all(r.op_type == _DQ for r in readers)):
            for dq in readers if final != chosen else []:
                rw.set_qparams(dq, final)
            rw.rewire(reader.output[0], quantized)
        else:
            requantized = requantized or rw.dequantize(quantized, final)
            reader.input[0] = requantized
    for reader in floats:
        requantized = requantized or rw.dequantize(quantized, final)
        for i, name in enumerate(reader.input):
            if name == point:
                reader.input[i] = requantized
    if requantized:
        rw.requantized.append(point)
    if relu_node is not None:
        rw.stats[f"relu_{relu}"] += 1
    rw.stats["outputs_quantized"] += 1
    rw.reindex()


def _quantize_outputs(
    rw: _Rewriter,
    relu: ReluMode,
    requantize: RequantizeMode,
    ranges: Mapping[str, tuple[float, float]],
) -> None:
    """Visit integer-capable ops in topological order (a requantized Conv output makes the
    residual Add after it integer-capable) and quantize their outputs."""
    done: set[str] = set()
    while True:
        todo = [
            n
            for n in rw.graph.node
            if n.output and n.output[0] not in done and _has_integer_inputs(rw, n)
        ]
        if not todo:
            return
        done.add(todo[0].output[0])
        _quantize_output(rw, todo[0], relu, requantize, ranges)


def _matmul_to_gemm(rw: _Rewriter) -> None:
    """``MatMul(DQ a, DQ w) -> Add(bias)`` with 2-D ``a``: the MatMul becomes a Gemm.

    Otherwise ORT first fuses MatMul and Add into a float Gemm, which its QDQ rules reject (the
    bias is no DQ), and dequantizes the weights on every call. A bias-less Gemm of two DQs runs
    as ORT's integer QGemm with float output; the Add stays as it is.
    """
    inferred = onnx.shape_inference.infer_shapes(rw.model)
    ranks = {
        info.name: len(info.type.tensor_type.shape.dim)
        for info in [*inferred.graph.value_info, *inferred.graph.input]
        if info.type.tensor_type.HasField("shape")
    }
    for matmul in [n for n in rw.graph.node if n.op_type == "MatMul"]:
        users = rw.consumers(matmul.output[0])
        producers = [rw.index.producer.get(name) for name in matmul.input]
        if not users or any(u.op_type != "Add" for u in users) or ranks.get(matmul.input[0]) != 2:
            continue
        if any(p is None or p.op_type != _DQ for p in producers) or ranks.get(matmul.input[1]) != 2:
            continue
        matmul.op_type = "Gemm"
        rw.stats["matmul_to_gemm"] += 1
    rw.reindex()


def _collapse_requantize(rw: _Rewriter) -> None:
    """DQ -> Q with identical parameters is the identity."""
    for q in [n for n in rw.graph.node if n.op_type == _Q]:
        dq = rw.index.producer.get(q.input[0])
        if dq is None or dq.op_type != _DQ or rw.is_output(q.output[0]):
            continue
        params = rw.qparams(q)
        if params is not None and rw.qparams(dq) == params:
            rw.rewire(q.output[0], dq.input[0])
    rw.reindex()


def _constant_pad(rw: _Rewriter, pad: onnx.NodeProto) -> tuple[list[int], float] | None:
    """(pads, value) of a constant-mode Pad with constant arguments over all axes, else None."""
    attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
    mode = attrs.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return None
    if "pads" in attrs:  # opset < 11
        return [int(p) for p in attrs["pads"]], float(attrs.get("value", 0.0))
    if len(pad.input) > 3 and pad.input[3]:
        return None  # opset 18 ``axes``: not needed by any exporter seen here
    pads = rw.const(pad.input[1]) if len(pad.input) > 1 else None
    value = rw.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
    if pads is None or value is None or value.size != 1:
        return None
    return [int(p) for p in pads.reshape(-1)], float(value.reshape(()))


def _fold_pad_into_conv(rw: _Rewriter) -> None:
    """``Pad(q, zero-point) [-> Transpose...] -> DQ -> Conv`` becomes ``DQ -> Conv(pads)``.

    Keras' ZeroPadding2D (before a strided or 'valid' convolution) comes out as a Pad that the
    hoisting pass moves onto uint8 with the zero-point as its value, where ORT's Pad fusion (float
    Pad value 0 before a Conv) no longer sees it, so it runs as a separate node. The padded
    values dequantize to exactly 0.0, and a Conv's own padding adds 0.0 as well (a
    QLinearConv pads with the input zero-point): the same numbers, in float and in integer.
    Applied where every reader of the Pad (through Transposes) is a per-tensor DQ with that
    zero-point whose readers are all Convs reading it as their data input.
    """
    while any(_fold_one_pad(rw, pad) for pad in [n for n in rw.graph.node if n.op_type == "Pad"]):
        rw.reindex()  # node references are stale after this: start over


def _fold_one_pad(rw: _Rewriter, pad: onnx.NodeProto) -> bool:
    """Fold ``pad`` as :func:`_fold_pad_into_conv` says; whether it was folded."""
    found = _constant_pad(rw, pad)
    if found is None or rw.is_output(pad.output[0]):
        return False
    pads, value = found
    rank = len(pads) // 2
    if rank < 3 or any(p < 0 for p in pads) or not any(pads):
        return False
    begin, end = pads[:rank], pads[rank:]
    # Follow a chain of single-reader Transposes, permuting the pads with the data.
    tail, chain = pad, []
    while True:
        readers = rw.consumers(tail.output[0])
        if len(readers) != 1 or readers[0].op_type != "Transpose":
            break
        perm = next((list(a.ints) for a in readers[0].attribute if a.name == "perm"), None)
        if perm is None or len(perm) != rank or rw.is_output(readers[0].output[0]):
            break
        begin, end = [begin[p] for p in perm], [end[p] for p in perm]
        tail = readers[0]
        chain.append(tail)
    dqs = rw.consumers(tail.output[0])
    if not dqs or any(begin[:2]) or any(end[:2]):
        return False  # padded along the batch or channel axis: no Conv padding
    convs: list[onnx.NodeProto] = []
    for dq in dqs:
        params = rw.qparams(dq) if dq.op_type == _DQ and dq.input[0] == tail.output[0] else None
        if params is None or params.zero_point != value or rw.is_output(dq.output[0]):
            return False
        readers = rw.consumers(dq.output[0])
        if not readers or any(not _pads_foldable(c, dq.output[0], rank) for c in readers):
            return False
        convs.extend(readers)
    for conv in convs:
        old = next(
            (list(a.ints) for a in conv.attribute if a.name == "pads"), [0] * (2 * (rank - 2))
        )
        new = [o + p for o, p in zip(old, [*begin[2:], *end[2:]], strict=True)]
        kept = [a for a in conv.attribute if a.name not in ("pads", "auto_pad")]
        del conv.attribute[:]
        conv.attribute.extend([*kept, helper.make_attribute("pads", new)])
    for reader in chain[:1] or dqs:
        reader.input[0] = pad.input[0]
    # The moved tensors lost their padding: new names, so that nothing compares them by name
    # with the padded tensors of the source graph.
    for node in (*chain, *dqs):
        unpadded = rw.fresh(f"{node.output[0]}_unpadded")
        rw.rewire(node.output[0], unpadded)
        node.output[0] = unpadded
    rw.stats["pads_folded"] += 1
    return True


def _pads_foldable(conv: onnx.NodeProto, name: str, rank: int) -> bool:
    """Whether Conv ``conv`` reads ``name`` as its data input with explicit (or no) padding."""
    if conv.op_type != "Conv" or conv.input[0] != name or name in conv.input[1:]:
        return False
    auto_pad = next((a.s for a in conv.attribute if a.name == "auto_pad"), b"NOTSET")
    pads = next((list(a.ints) for a in conv.attribute if a.name == "pads"), None)
    return auto_pad == b"NOTSET" and (pads is None or len(pads) == 2 * (rank - 2))


def _fuse_swish(rw: _Rewriter) -> None:
    """``Mul(x, Sigmoid(x))`` (Keras' swish, EfficientNet's activation) becomes ORT's
    ``com.microsoft.QuickGelu(x, alpha=1)``.

    ORT fuses this itself in float graphs, but not when ``x`` is a DequantizeLinear: its
    EnsureUniqueDQForNodeUnit pass first gives the Sigmoid and the Mul a DQ each, and the two
    inputs are then different tensors. So the swish runs as two DQs, a Sigmoid and a Mul. ORT's
    QuickGelu kernel with alpha 1 computes ``x * MlasComputeLogistic(x)``, the same
    elementwise logistic as its Sigmoid kernel and the same float32 product as its Mul kernel:
    bit-identical (``tests/test_ort_int8_mobile.py``), one pass and one DQ instead of four nodes.
    """
    fused = 0
    for sigmoid in [n for n in rw.graph.node if n.op_type == "Sigmoid"]:
        x, out = sigmoid.input[0], sigmoid.output[0]
        readers = rw.consumers(out)
        if len(readers) != 1 or readers[0].op_type != "Mul" or rw.is_output(out):
            continue
        mul = readers[0]
        if sorted(mul.input) != sorted([x, out]) or x == out:
            continue
        rw.add_node("QuickGelu", [x], mul.output[0], domain=_MS_DOMAIN, alpha=1.0)
        del mul.input[:]
        mul.output[0] = rw.fresh(f"{mul.output[0]}_unfused")
        fused += 1
    if fused:
        if not any(o.domain == _MS_DOMAIN for o in rw.model.opset_import):
            rw.model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
        rw.stats["swish_fused"] += fused
        rw.reindex()


def _uint8_bound(rw: _Rewriter, name: str) -> int | None:
    """The value of a scalar uint8 constant (initializer or Constant), else None."""
    return uint8_scalar(rw.const(name) if name else None)


def _relu_clamp_top(rw: _Rewriter, clamp: onnx.NodeProto) -> int | None:
    """For the uint8 ReLU of a zero-point-128 tensor, ``Max(q, 128)`` or ``Clip(q, 128, hi)``
    (ReLU6), its upper bound (255 for Max); else None."""
    if clamp.op_type == "Max" and len(clamp.input) == 2:
        return 255 if _uint8_bound(rw, clamp.input[1]) == 128 else None
    if (
        clamp.op_type == "Clip"
        and len(clamp.input) >= 2
        and _uint8_bound(rw, clamp.input[1]) == 128
    ):
        if len(clamp.input) < 3 or not clamp.input[2]:
            return 255
        return _uint8_bound(rw, clamp.input[2])
    return None


def _narrow_readers(
    rw: _Rewriter, name: str, params: _QParams
) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]] | None:
    """The DQs (with ``params``) that read ``name``, directly or through ops that commute with
    a zero-point shift (``NARROW_PASS_THROUGH``), and the Pads on the way; None if any other
    node, a Pad of another value than the zero-point, or a graph output reads it."""
    dqs: list[onnx.NodeProto] = []
    pads: list[onnx.NodeProto] = []
    todo = [name]
    while todo:
        tensor = todo.pop()
        if rw.is_output(tensor):
            return None
        for reader in rw.consumers(tensor):
            if reader.op_type == _DQ and reader.input[0] == tensor and rw.qparams(reader) == params:
                dqs.append(reader)
            elif reader.op_type in NARROW_PASS_THROUGH and list(reader.input).index(tensor) == 0:
                if reader.op_type == "Pad":
                    if len(reader.input) < 3 or _uint8_bound(rw, reader.input[2]) != 128:
                        return None
                    pads.append(reader)
                todo.extend(o for o in reader.output if o)
            else:
                return None
    return dqs, pads


def _narrow_relu_outputs(rw: _Rewriter) -> None:
    """A uint8 ReLU of a zero-point-128 tensor, ``Q(x, s, 128) -> Max(q, 128)`` (or
    ``Clip(q, 128, hi)``), becomes ``Q(x, s, 0) -> Clip(q, 0, min(hi - 128, 127))``.

    The same integers minus 128 and the same real values: ``clamp(round(x/s), 0, 127)``, the
    int8 values TensorRT keeps after a ReLU. The readers' DQs (and the Pads between, whose value
    is the zero-point) follow. The tensor then holds 7-bit values, on which ORT's U8S8 kernels
    cannot saturate even without VNNI (``NARROW_MAX``): ``encode_weights(..., "u8u8")`` keeps the
    int8 weights, and the faster U8S8 kernels, of every op that reads only such a tensor. The
    integer kernel's requantization adds the zero-point after rounding, so moving it changes
    nothing (``tests/test_ort_int8_narrow.py`` compares the two graphs on ORT's kernels).
    """
    narrowed = 0
    for clamp in [n for n in rw.graph.node if n.op_type in ("Max", "Clip")]:
        top = _relu_clamp_top(rw, clamp)
        q = rw.index.producer.get(clamp.input[0])
        if (
            top is None
            or top < 128
            or q is None
            or q.op_type != _Q
            or len(rw.consumers(q.output[0])) != 1
        ):
            continue
        params = rw.activation_q(q)
        if params is None or params.dtype != TensorProto.UINT8 or params.zero_point != 128:
            continue
        found = _narrow_readers(rw, clamp.output[0], params)
        if found is None:
            continue
        narrow = params.with_zero_point(0)
        rw.set_qparams(q, narrow)
        zero = rw.add_const(np.array(0, np.uint8), "ort_int8_narrow_zero")
        bound = rw.add_const(np.array(min(top - 128, NARROW_MAX), np.uint8), "ort_int8_narrow_top")
        clamp.op_type = "Clip"
        del clamp.input[:]
        clamp.input.extend([q.output[0], zero, bound])
        dqs, pads = found
        for pad in pads:
            pad.input[2] = zero
        for dq in dqs:
            rw.set_qparams(dq, narrow)
        narrowed += 1
    if narrowed:
        rw.stats["relu_narrowed"] += narrowed
        rw.reindex()


def _fuses_into_integer_kernel(rw: _Rewriter, node: onnx.NodeProto) -> bool:
    """True for a non-Conv op ORT's selectors turn into an integer kernel (QLinearAdd,
    QLinearGlobalAveragePool, ...): integer inputs (``_has_integer_inputs``) and a Q reads it.
    MatMul and Gemm are left out: their integer kernels write float."""
    return (
        node.op_type not in ("Conv", "MatMul", "Gemm")
        and _has_integer_inputs(rw, node)
        and any(reader.op_type == _Q for reader in rw.consumers(node.output[0]))
    )


def _keep_float(rw: _Rewriter, integer: Collection[str] | None) -> None:
    """Keep each integer-kernel Conv not named in ``integer`` float: an identity ``Max`` of its
    output alone goes before its Qs, so ORT's selectors no longer see ``DQ -> Conv -> Q``.

    Every other op that would become an integer kernel (QLinearAdd, QLinearMul,
    QLinearGlobalAveragePool, ...) and comes before the first named Conv in graph order stays
    float the same way (all of them when none is named): those kernels round with precomputed
    scale ratios and flip an output by one step now and then, which a deep net amplifies
    (measured: EfficientNetB0's squeeze-excite pools and products, docs/exact-int8.md,
    "Partial engines keep the other integer kernels float"). The integer part of a partial
    engine is thus the tail of the graph. Bit-exact: the ops, biases and weights are as they
    were (ORT folds neither the runtime weight DequantizeLinear nor the Max away).
    """
    if integer is None:
        return
    nodes = list(rw.graph.node)  # in graph order (reindex sorts topologically)
    first = next(
        (i for i, n in enumerate(nodes) if n.op_type == "Conv" and n.name in integer), None
    )
    for position, node in enumerate(nodes):
        if node.op_type == "Conv":
            if node.name in integer or integer_kernel_scales(rw.index, node) is None:
                continue
        elif (first is not None and position > first) or not _fuses_into_integer_kernel(rw, node):
            continue
        original = node.output[0]  # its Qs keep reading this name, now the Max's
        node.output[0] = rw.fresh(f"{original}_float")
        rw.add_node("Max", [node.output[0]], original)
        rw.stats["kept_float"] += 1
    rw.reindex()


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------


def rewrite_for_ort_int8(
    model: onnx.ModelProto,
    *,
    calibration: CalibrationData | None = None,
    relu: ReluMode = "exact",
    requantize: RequantizeMode = "calibrated",
    until: str = STAGES[-1],
    fold_affine: bool = True,
    integer_convs: Collection[str] | None = None,
) -> onnx.ModelProto:
    """Rewrite a TensorRT-style INT8 QDQ model so ONNX Runtime's CPU kernels run it in integer.

    Args:
        model: ONNX model (opset >= 13) with TensorRT's explicit-quantization Q/DQ placement.
            Not modified; a rewritten copy is returned.
        calibration: batches of input feeds (``{input_name: array}``), or a callable returning
            them, run through ``model`` on ONNX Runtime to pick min/max scales for
            requantization points that no Q reads (the float input of a residual Add).
        relu: ``"exact"`` (default) keeps TensorRT's clipping and runs the Relu as a uint8
            ``Max`` after the integer kernel; ``"absorb"`` drops the Relu into the kernel by
            moving the Q's zero-point to 0 (same scale), which also keeps values above
            127*scale that TensorRT clips: faster, but QAT models rely on that clipping
            (docs/exact-int8.md).
        requantize: where an op's output also feeds float consumers or Qs with other scales,
            ``"none"`` leaves it in float (the op then runs in float); ``"downstream"`` adds a
            Q/DQ with the scale of a Q of that tensor or, for the float input of a residual
            Add, of the Q after the Add (zero-point 128); ``"calibrated"`` uses min/max from
            ``calibration`` for the latter where given, the downstream scale elsewhere.

        until: stop after this stage of ``STAGES`` (to check a prefix of the rewrite alone).
        fold_affine: fold BatchNormalization/Mul/Add after a Conv into its weight scales and
            bias (the same math, not bit-exact); without it those Convs stay float and every
            remaining stage is bit-exact.
        integer_convs: the names of the Conv nodes allowed to run as integer kernels; None
            allows all. The others stay float exactly: batch norm is not folded into them, and
            one that would still be an integer kernel gets an identity Max before its Q
            (``keep_float``); so does every non-Conv op that would become an integer kernel
            before the first named Conv, so with none named the result is bit-exact. Deep
            nets amplify the rounding
            of each integer Conv; keeping the early ones float bounds the error
            (docs/exact-int8.md). Unnamed or duplicate-named nodes are named first, so every
            Conv of the result has its own name
            (:func:`qatflow.onnx.integer_kernels.integer_convs` lists the integer ones).

    Returns:
        A valid ONNX model with the same inputs and outputs (dynamic batch kept); a summary of
        what was rewritten is stored in ``metadata_props`` under ``qatflow.ort_int8``.

    Raises:
        RuntimeBackendError: opset below 13, an unknown option, or calibration batches that do
            not match the model inputs.
    """
    if relu not in ("absorb", "exact"):
        raise RuntimeBackendError(f"relu must be 'absorb' or 'exact', got {relu!r}")
    if until not in STAGES:
        raise RuntimeBackendError(f"until must be one of {list(STAGES)}, got {until!r}")
    if requantize not in ("none", "downstream", "calibrated"):
        raise RuntimeBackendError(
            f"requantize must be 'none', 'downstream' or 'calibrated', got {requantize!r}"
        )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if isinstance(integer_convs, str):
        raise RuntimeBackendError(
            f"integer_convs must be a collection of Conv node names, got {integer_convs!r}"
        )
    if opset < 13:
        raise RuntimeBackendError(f"model opset is {opset}; per-channel Q/DQ needs opset >= 13")
    allowed = None if integer_convs is None else frozenset(integer_convs)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]  # Q/DQ element types change; ORT infers shapes again
    rw = _Rewriter(out)

    def quantize_outputs(rw: _Rewriter) -> None:
        ranges: dict[str, tuple[float, float]] = {}
        if requantize == "calibrated" and calibration is not None:
            ranges = _calibrate(model, _calibration_points(rw), calibration)
        _quantize_outputs(rw, relu, requantize, ranges)
        _hoist_quantizers(rw, requantize)

    passes: dict[str, Callable[[_Rewriter], None]] = {
        "weight_quantize": _fold_weight_quantize,
        "weight_layout": _fold_weight_layout,
        "affine_fold": lambda rw: _fold_affine_into_conv(rw, allowed),
        "reencode": lambda rw: _reencode_activations(rw, relu),
        "merge": _merge_equal_quantizers,
        "hoist": lambda rw: _hoist_quantizers(rw, requantize),
        "outputs": quantize_outputs,
        "gemm": _matmul_to_gemm,
        "collapse": _collapse_requantize,
        "pad_fold": _fold_pad_into_conv,
        "swish": _fuse_swish,
        "narrow": _narrow_relu_outputs,
        "keep_float": lambda rw: _keep_float(rw, allowed),
    }
    for stage in STAGES[: STAGES.index(until) + 1]:
        if stage != "affine_fold" or fold_affine:
            passes[stage](rw)
    drop_unused_initializers(rw.graph)
    summary = {**rw.stats, "requantized": rw.requantized, "relu": relu, "requantize": requantize}
    set_metadata_json(out, METADATA_KEY, summary)
    onnx.checker.check_model(out)
    logger.info("ORT int8 rewrite: %s", summary)
    return out
