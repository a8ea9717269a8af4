"""Batch norm folded into only the last Convs (``rewrite_for_ort_int8(fold_last=k)``): the
Convs it folds run in integer, the earlier ones stay float, and the math stays the source's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from tests.int8_models import batch_norm_chain, near_binary

from qatflow.errors import RuntimeBackendError
from qatflow.onnx.ort_int8 import fold_candidates, rewrite_for_ort_int8
from qatflow.onnx.reference import run_reference

EXACT = {"relu": "exact", "requantize": "none"}


def _unfolded_convs(model: onnx.ModelProto) -> list[str]:
    """The Conv outputs a BatchNormalization still reads (``c0`` is the first Conv's)."""
    return sorted(n.input[0] for n in model.graph.node if n.op_type == "BatchNormalization")


def test_fold_candidates_counts_the_convs_batch_norm_follows() -> None:
    for convs in (3, 5):
        rewritten = rewrite_for_ort_int8(batch_norm_chain(convs), **EXACT)
        assert fold_candidates(rewritten) == convs
    assert fold_candidates(batch_norm_chain(3)) == 0  # no rewrite summary


@pytest.mark.parametrize("folded", [0, 1, 2, 3])
def test_only_the_last_convs_are_folded(folded: int) -> None:
    model = batch_norm_chain(3)
    rewritten = rewrite_for_ort_int8(model, **EXACT, fold_last=folded)
    assert _unfolded_convs(rewritten) == [f"c{i}" for i in range(3 - folded)]


def test_folding_none_or_all_is_the_unfolded_or_the_folded_rewrite() -> None:
    model = batch_norm_chain(3)

    def graph(**options: object) -> bytes:
        return rewrite_for_ort_int8(model, **EXACT, **options).graph.SerializeToString()  # type: ignore[arg-type]

    assert graph(fold_last=0) == graph(fold_affine=False)
    assert graph(fold_last=3) == graph()
    assert graph(fold_last=7) == graph()  # more than there are: all of them


def test_partial_folds_keep_the_source_math() -> None:
    model = batch_norm_chain(3)
    feeds = {"x": near_binary(32)}
    expected = run_reference(model, feeds)[0]
    for folded in range(4):
        rewritten = rewrite_for_ort_int8(model, **EXACT, fold_last=folded)
        np.testing.assert_allclose(run_reference(rewritten, feeds)[0], expected, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, True])
def test_fold_last_must_be_a_count(bad: object) -> None:
    with pytest.raises(RuntimeBackendError, match="fold_last must be a count"):
        rewrite_for_ort_int8(batch_norm_chain(2), **EXACT, fold_last=bad)  # type: ignore[arg-type]
