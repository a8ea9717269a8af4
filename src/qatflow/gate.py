"""The accuracy gate, in points of top-1 accuracy: one rule for every place that judges a variant.

A candidate passes when its top-1 accuracy is at most ``gate_points`` percentage points below a
reference (FP32, or the registry's champion); an improvement always passes. The comparison, the
report, ``publish`` and the Model Registry all call ``judge``, and every flag, metric, tag and
message names the unit: *top-1 points*.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from qatflow.errors import PipelineError

UNIT = "top-1 points"
PARAMETER = "accuracy_gate"
DEFAULT_POINTS = 1.0
PASSED = "passed"
REFUSED = "refused"
EXIT_REFUSED = 3  # `qatflow run` when the candidate is refused (2 is an input error)
_TOLERANCE = 1e-9


def points(fraction: float) -> float:
    """A top-1 accuracy in [0, 1] as percent, the scale the gate's points are counted on."""
    return 100.0 * fraction


def check_gate(value: object, name: str = PARAMETER) -> float:
    """``value`` as a gate in top-1 points; ``PipelineError`` naming ``name`` if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PipelineError(f"{name} must be a finite number of {UNIT}, got {value!r}")
    if value < 0:
        raise PipelineError(
            f"{name} must be 0 or more {UNIT} (the largest top-1 drop allowed), got {value}"
        )
    return float(value)


@dataclass(frozen=True)
class Verdict:
    """One candidate judged against one reference; accuracies in percent, the gate in points."""

    candidate: str
    reference: str
    candidate_pct: float
    reference_pct: float
    gate_points: float

    @property
    def delta_points(self) -> float:
        """Candidate minus reference, in top-1 points (negative = the candidate is worse)."""
        return self.candidate_pct - self.reference_pct

    @property
    def passed(self) -> bool:
        """True if the candidate is at most ``gate_points`` below the reference."""
        return -self.delta_points <= self.gate_points + _TOLERANCE

    @property
    def outcome(self) -> str:
        """``passed`` or ``refused``."""
        return PASSED if self.passed else REFUSED

    @property
    def reason(self) -> str:
        """One line: the delta, the gate and the outcome, in top-1 points."""
        relation = "within" if self.passed else "outside"
        return (
            f"{self.candidate} {self.delta_points:+.2f} {UNIT} vs {self.reference} "
            f"({self.candidate_pct:.2f}% vs {self.reference_pct:.2f}%): {relation} the "
            f"{self.gate_points:g}-point gate, {self.outcome}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON, with the derived delta, outcome and reason."""
        return {
            **asdict(self),
            "delta_points": self.delta_points,
            "outcome": self.outcome,
            "reason": self.reason,
        }


def judge(
    candidate: str,
    candidate_pct: float,
    reference: str,
    reference_pct: float,
    gate_points: float,
) -> Verdict:
    """Judge ``candidate`` against ``reference`` (top-1 in percent) with a gate in top-1 points."""
    return Verdict(
        candidate=candidate,
        reference=reference,
        candidate_pct=float(candidate_pct),
        reference_pct=float(reference_pct),
        gate_points=check_gate(gate_points),
    )
