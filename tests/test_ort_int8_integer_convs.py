"""Only some Convs in integer (``rewrite_for_ort_int8(integer_convs=...)``): the named ones are
folded and run in integer, the others stay float, and the math stays the source's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from bench.ort_ops import ort_optimized_op_counts
from tests.int8_models import batch_norm_chain, near_binary, saturating_cnn

from qatflow.errors import RuntimeBackendError
from qatflow.onnx.integer_kernels import integer_convs
from qatflow.onnx.ort_int8 import rewrite_for_ort_int8
from qatflow.onnx.reference import run_reference, session

EXACT = {"relu": "exact", "requantize": "none"}


def _unfolded_convs(model: onnx.ModelProto) -> list[str]:
    """The Conv outputs a BatchNormalization still reads (``c0`` is the first Conv's)."""
    return sorted(n.input[0] for n in model.graph.node if n.op_type == "BatchNormalization")


def test_integer_convs_lists_the_convs_the_rewrite_runs_in_integer() -> None:
    for convs in (3, 5):
        rewritten = rewrite_for_ort_int8(batch_norm_chain(convs), **EXACT)
        assert len(integer_convs(rewritten)) == convs
        assert len(set(integer_convs(rewritten))) == convs  # each Conv has its own name
    assert integer_convs(batch_norm_chain(3)) == []  # batch norm after every Conv: float


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_only_the_named_convs_are_folded(count: int) -> None:
    model = batch_norm_chain(3)
    names = integer_convs(rewrite_for_ort_int8(model, **EXACT))
    rewritten = rewrite_for_ort_int8(model, **EXACT, integer_convs=names[3 - count :])
    assert _unfolded_convs(rewritten) == [f"c{i}" for i in range(3 - count)]
    assert integer_convs(rewritten) == names[3 - count :]


def test_all_in_integer_is_the_folded_rewrite_and_none_the_unfolded_one_all_float() -> None:
    model = batch_norm_chain(3)

    def graph(**options: object) -> onnx.ModelProto:
        return rewrite_for_ort_int8(model, **EXACT, **options)  # type: ignore[arg-type]

    names = integer_convs(graph())
    assert graph(integer_convs=names).graph == graph().graph
    # None in integer: the unfolded rewrite, plus an identity Max before the Q of every other
    # op ORT would run as an integer kernel (here the GAP), so that it runs none.
    none, unfolded = graph(integer_convs=()), graph(fold_affine=False)
    added = [n for n in none.graph.node if n not in unfolded.graph.node]
    assert [n.op_type for n in added] == ["GlobalAveragePool", "Max"]
    assert not any(op.startswith("QLinear") for op in ort_optimized_op_counts(none))


def _qdq(source: str, scale: str) -> list[onnx.NodeProto]:
    """Q/DQ of ``source`` with the scalar ``scale`` and the int8 zero-point ``zero``."""
    return [
        onnx.helper.make_node("QuantizeLinear", [source, scale, "zero"], [f"{source}_q"]),
        onnx.helper.make_node("DequantizeLinear", [f"{source}_q", scale, "zero"], [f"{source}_dq"]),
    ]


def _after_residual_add(
    name: str,
    tail: list[onnx.NodeProto],
    output: tuple[str, list[int | None]],
    inits: list[onnx.TensorProto],
    scales: dict[str, float],
    size: int,
) -> onnx.ModelProto:
    """Q/DQ(x), Q/DQ(y) -> Add -> Q/DQ(``s``) -> ``tail`` (reading ``s_dq``, writing
    ``output``), inputs ``[N, 8, size, size]``; ``scales``: ``sx``, ``sy``, ``ss`` and the
    tail's."""
    helper = onnx.helper
    nodes = [
        *_qdq("x", "sx"),
        *_qdq("y", "sy"),
        helper.make_node("Add", ["x_dq", "y_dq"], ["s"], name="residual"),
        *_qdq("s", "ss"),
        *tail,
    ]
    scalars = [
        onnx.numpy_helper.from_array(np.array(value, np.float32), key)
        for key, value in scales.items()
    ]
    zero = onnx.numpy_helper.from_array(np.array(0, np.int8), "zero")
    shape = [None, 8, size, size]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n in ("x", "y")],
        [helper.make_tensor_value_info(output[0], onnx.TensorProto.FLOAT, output[1])],
        [*scalars, zero, *inits],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


_RESIDUAL_SCALES = {"sx": 0.0213, "sy": 0.0371, "ss": 0.0419}


def _residual_add_and_pool() -> onnx.ModelProto:
    """Q/DQ(x), Q/DQ(y) -> Add -> Q/DQ -> GlobalAveragePool -> Q/DQ: both ops would become
    QLinearAdd and QLinearGlobalAveragePool, which round with precomputed scale ratios."""
    pool = [
        onnx.helper.make_node("GlobalAveragePool", ["s_dq"], ["p"], name="pool"),
        *_qdq("p", "sp"),
    ]
    scales = {**_RESIDUAL_SCALES, "sp": 0.0067}
    return _after_residual_add("add_pool", pool, ("p_dq", [None, 8, 1, 1]), [], scales, 14)


def test_with_no_conv_in_integer_no_op_runs_as_an_integer_kernel() -> None:
    model = _residual_add_and_pool()
    fast = ort_optimized_op_counts(rewrite_for_ort_int8(model, **EXACT))
    assert fast["QLinearAdd"] == 1 and fast["QLinearGlobalAveragePool"] == 1
    none = rewrite_for_ort_int8(model, **EXACT, integer_convs=())
    assert not any(op.startswith("QLinear") for op in ort_optimized_op_counts(none))
    rng = np.random.default_rng(0)
    feeds = {name: rng.normal(0, 1.5, (64, 8, 14, 14)).astype(np.float32) for name in "xy"}
    fused = session(none, optimize=True).run(None, feeds)[0]
    np.testing.assert_array_equal(fused, run_reference(model, feeds)[0])


def _add_then_conv() -> onnx.ModelProto:
    """Q/DQ(x), Q/DQ(y) -> Add -> Q/DQ -> Conv(1x1) -> Q/DQ: a non-Conv integer kernel (the
    QLinearAdd) before a Conv."""
    weights = np.random.default_rng(0).normal(0, 1, (8, 8, 1, 1))
    w_scale = (np.abs(weights).reshape(8, -1).max(axis=1) / 127).astype(np.float32)
    inits = [
        onnx.numpy_helper.from_array(np.zeros(8, np.int8), "w_zero"),
        onnx.numpy_helper.from_array(
            np.rint(weights / w_scale[:, None, None, None]).astype(np.int8), "w"
        ),
        onnx.numpy_helper.from_array(w_scale, "w_scale"),
    ]
    conv = [
        onnx.helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=0),
        onnx.helper.make_node("Conv", ["s_dq", "wd"], ["c"], name="conv"),
        *_qdq("c", "so"),
    ]
    scales = {**_RESIDUAL_SCALES, "so": 0.0831}
    return _after_residual_add("add_conv", conv, ("c_dq", [None, 8, 6, 6]), inits, scales, 6)


def test_non_conv_integer_kernels_before_the_first_integer_conv_stay_float() -> None:
    """A partial engine's integer part is the tail of the graph: a QLinearAdd before the first
    named Conv rounds with precomputed scale ratios, so it stays float; one after it (the GAP of
    ``batch_norm_chain``) stays integer."""
    model = _add_then_conv()
    full = ort_optimized_op_counts(rewrite_for_ort_int8(model, **EXACT))
    assert full["QLinearAdd"] == 1 and full["QLinearConv"] == 1
    named = rewrite_for_ort_int8(model, **EXACT, integer_convs=["conv"])
    partial = ort_optimized_op_counts(named)
    assert partial["QLinearConv"] == 1 and "QLinearAdd" not in partial
    rng = np.random.default_rng(1)
    feeds = {name: rng.normal(0, 1.5, (16, 8, 6, 6)).astype(np.float32) for name in "xy"}
    np.testing.assert_array_equal(
        session(named, optimize=False).run(None, feeds)[0], run_reference(model, feeds)[0]
    )
    chain = batch_norm_chain(3)
    last = integer_convs(rewrite_for_ort_int8(chain, **EXACT))[-1:]
    tail = ort_optimized_op_counts(rewrite_for_ort_int8(chain, **EXACT, integer_convs=last))
    assert tail["QLinearConv"] == 1 and tail["QLinearGlobalAveragePool"] == 1


def test_partly_integer_rewrites_keep_the_source_math() -> None:
    model = batch_norm_chain(3)
    feeds = {"x": near_binary(32)}
    expected = run_reference(model, feeds)[0]
    names = integer_convs(rewrite_for_ort_int8(model, **EXACT))
    for count in range(4):
        rewritten = rewrite_for_ort_int8(model, **EXACT, integer_convs=names[3 - count :])
        np.testing.assert_allclose(run_reference(rewritten, feeds)[0], expected, atol=1e-5)


@pytest.mark.parametrize("encoding", ["u8s8", "u8u8"])
def test_a_conv_kept_float_is_bit_exact_and_runs_in_float(encoding: str) -> None:
    """A Conv with no batch norm after it (``DQ -> Conv -> Q``): kept float by an identity Max,
    the float math is bit-identical to the all-integer rewrite's, and ORT no longer fuses it."""
    from qatflow.onnx.encoding import encode_weights

    model = saturating_cnn()
    feeds = {model.graph.input[0].name: near_binary(32, seed=3)}
    full = rewrite_for_ort_int8(model, **EXACT)
    kept = rewrite_for_ort_int8(model, **EXACT, integer_convs=())
    for graph in (full, kept):
        encode_weights(graph, encoding)  # type: ignore[arg-type]
    assert integer_convs(full) and not integer_convs(kept)
    producers = {out: node.op_type for node in kept.graph.node for out in node.output}
    after_conv = [
        n for n in kept.graph.node if n.op_type == "Max" and producers[n.input[0]] == "Conv"
    ]
    assert len(after_conv) == len(integer_convs(full))
    plain = session(full, optimize=False).run(None, feeds)[0]
    np.testing.assert_array_equal(session(kept, optimize=False).run(None, feeds)[0], plain)
    full_ops, kept_ops = ort_optimized_op_counts(full), ort_optimized_op_counts(kept)
    assert full_ops["QLinearConv"] == len(integer_convs(full)) and "Conv" not in full_ops
    assert kept_ops["Conv"] == len(integer_convs(full)) and "QLinearConv" not in kept_ops


def test_integer_convs_must_be_a_collection_of_names() -> None:
    with pytest.raises(RuntimeBackendError, match="integer_convs must be a collection"):
        rewrite_for_ort_int8(batch_norm_chain(2), **EXACT, integer_convs="c0")
