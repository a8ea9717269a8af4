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


def test_all_or_none_in_integer_is_the_folded_or_the_unfolded_rewrite() -> None:
    model = batch_norm_chain(3)

    def graph(**options: object) -> bytes:
        return rewrite_for_ort_int8(model, **EXACT, **options).graph.SerializeToString()  # type: ignore[arg-type]

    names = integer_convs(rewrite_for_ort_int8(model, **EXACT))
    assert graph(integer_convs=()) == graph(fold_affine=False)
    assert graph(integer_convs=names) == graph()


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
    assert [n.op_type for n in kept.graph.node].count("Max") == len(integer_convs(full))
    plain = session(full, optimize=False).run(None, feeds)[0]
    np.testing.assert_array_equal(session(kept, optimize=False).run(None, feeds)[0], plain)
    full_ops, kept_ops = ort_optimized_op_counts(full), ort_optimized_op_counts(kept)
    assert full_ops["QLinearConv"] == len(integer_convs(full)) and "Conv" not in full_ops
    assert kept_ops["Conv"] == len(integer_convs(full)) and "QLinearConv" not in kept_ops


def test_integer_convs_must_be_a_collection_of_names() -> None:
    with pytest.raises(RuntimeBackendError, match="integer_convs must be a collection"):
        rewrite_for_ort_int8(batch_norm_chain(2), **EXACT, integer_convs="c0")
