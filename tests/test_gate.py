"""qatflow.gate: one accuracy gate in top-1 points, its verdicts and its checks."""

from __future__ import annotations

import math

import pytest

from qatflow import gate
from qatflow.errors import PipelineError


def test_drop_within_the_gate_passes_and_beyond_it_is_refused() -> None:
    within = gate.judge("qat_int8", 91.2, "fp32", 92.0, 1.0)
    assert within.passed and within.outcome == gate.PASSED
    assert within.delta_points == pytest.approx(-0.8)
    assert within.reason == (
        "qat_int8 -0.80 top-1 points vs fp32 (91.20% vs 92.00%): within the 1-point gate, passed"
    )
    refused = gate.judge("qat_int8", 31.1, "fp32", 92.0, 1.0)
    assert not refused.passed and refused.outcome == gate.REFUSED
    assert "-60.90 top-1 points" in refused.reason and "outside the 1-point gate" in refused.reason


def test_edges_improvements_and_a_zero_gate() -> None:
    assert gate.judge("a", 91.0, "b", 92.0, 1.0).passed  # exactly at the gate
    assert not gate.judge("a", 90.99, "b", 92.0, 1.0).passed
    assert gate.judge("a", 95.0, "b", 92.0, 0.0).passed  # an improvement always passes
    assert not gate.judge("a", 91.99, "b", 92.0, 0.0).passed
    # Float noise at the edge: 0.7 - 0.6 in fractions is 10.000000000000009 points.
    assert gate.judge("a", gate.points(0.6), "b", gate.points(0.7), 10.0).passed


def test_points_are_percent_of_a_fraction() -> None:
    assert gate.points(0.9183) == pytest.approx(91.83)


@pytest.mark.parametrize("bad", [-5, -0.01, math.nan, math.inf, "1.0", True, None])
def test_check_gate_rejects_what_is_not_a_number_of_points(bad: object) -> None:
    with pytest.raises(PipelineError, match=r"accuracy_gate must be .*top-1 points"):
        gate.check_gate(bad)
    with pytest.raises(PipelineError, match="accuracy_gate"):
        gate.judge("a", 1.0, "b", 1.0, bad)  # type: ignore[arg-type]


def test_check_gate_names_the_parameter_and_accepts_ints() -> None:
    assert gate.check_gate(2) == 2.0
    with pytest.raises(PipelineError, match="--accuracy-gate must be 0 or more"):
        gate.check_gate(-5, "--accuracy-gate")


def test_verdict_to_dict_carries_the_derived_fields() -> None:
    doc = gate.judge("ptq_int8", 70.0, "fp32", 90.0, 5.0).to_dict()
    assert doc["delta_points"] == pytest.approx(-20.0)
    assert doc["outcome"] == "refused" and doc["gate_points"] == 5.0
    assert doc["reason"].startswith("ptq_int8 -20.00 top-1 points vs fp32")
