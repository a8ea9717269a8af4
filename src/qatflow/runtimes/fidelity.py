"""The fidelity gate: an engine's outputs checked against its reference before it is written.

The reference is the QDQ ONNX model the engine was built from, run as plain float math
(:mod:`qatflow.onnx.reference`). Integer kernels round differently from float math now and
then (ONNX Runtime stores a Conv bias as int32 in units of ``s_x * s_w``), and a network can
turn such one-step differences into a flipped top-1 where the reference itself is torn between
two classes. So the gate compares decisions where the reference makes one:

* ``tolerance``: a logit tolerance, ``DEFAULT_TOLERANCE`` of the reference's typical output
  range (the median over samples of max - min across classes, so that a few outlier samples
  cannot widen it);
* pass when at most ``MAX_BEYOND_SHARE`` of the samples (rounded down: 1 of 1,024) have a
  max ``|engine - reference|`` beyond the tolerance, and top-1 agreement is at least
  ``DEFAULT_MIN_AGREEMENT`` over the samples whose reference top-1 leads its runner-up by more
  than the tolerance (``decided``).

The tail rule is there because integer kernels that diverge do so on a few inputs, by far: an
EfficientNetB0 engine whose 99th-percentile error was within the tolerance moved 0.8 % of
held-out images by up to ten tolerances and flipped 0.35 % of the decided ones
(docs/exact-int8.md, "The tail criterion"). A 99th percentile lets 1 % of the samples be
arbitrarily wrong; the tail rule lets 0.1 %, the share the agreement bound allows to flip.
Plain top-1 agreement over all samples, the 99th percentile and the max error are recorded
beside the verdict, and so is what the sample proves: ``proven_agreement``, the one-sided
95 % lower confidence bound on the decided agreement (Wilson's score bound; closed form, so no
SciPy). 1,000 decided samples with no disagreement prove about 99.7 %; proving 99.9 % takes
some 2,700.

A tail is rare, so the check needs many samples to see it: ``DEFAULT_SAMPLES`` (1,024, where
1 beyond the tolerance is allowed) catches a tail on 0.5 % of the inputs with 96 %
probability, where 256 samples (none allowed) caught it with 72 %. The EfficientNetB0 above
passed a 256-sample check with 12 of its 16 Convs in integer; a 1,024-sample check kept 3, and
that engine agreed on every decided held-out image (docs/exact-int8.md, "How many samples the
check needs").

A saturating kernel (U8S8 without VNNI) moves most logits by a large part of the range and
fails both conditions by far.

When an engine fails, :func:`ideal_integer_graph` tells a kernel defect from a network that
amplifies rounding: the graph an ideal integer engine computes (batch norms folded, biases
rounded to their int32 units), run as float math with no kernel involved. Deep, briefly trained
nets fail the gate that way too; the check keeps its bound and says so
(docs/exact-int8.md, "Rounding noise: why the gate keeps its bound").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from qatflow.errors import RuntimeBackendError
from qatflow.onnx.reference import run_optimized, run_reference
from qatflow.params import ENGINE

DEFAULT_MIN_AGREEMENT = 0.999
DEFAULT_TOLERANCE = 0.05
MAX_BEYOND_SHARE = 0.001  # of the samples, whose max |error| may exceed the tolerance
ERROR_PERCENTILE = 99.0  # recorded, and the margin a fitted rewrite needs (onnxruntime_backend)
CONFIDENCE_Z = 1.6449  # one-sided 95 %

Feeds = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class FidelityReport:
    """How closely an engine reproduced its reference on the checked samples."""

    samples: int
    agreement: float
    decided_samples: int
    decided_agreement: float
    proven_agreement: float  # 95 % lower bound on the decided agreement (see the module doc)
    max_abs_error: float
    p99_abs_error: float
    output_range: float
    tolerance: float
    min_agreement: float
    beyond_tolerance: int  # samples whose max |error| exceeds the tolerance
    max_beyond: int  # the most the gate allows: MAX_BEYOND_SHARE of the samples, rounded down
    data: str
    passed: bool
    diverging_tensor: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (engine metadata, evaluation results, MLflow)."""
        return asdict(self)

    def summary(self) -> str:
        """One line for logs and error messages."""
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"fidelity {verdict}: top-1 agreement {self.agreement:.2%} over {self.samples} "
            f"samples ({self.decided_agreement:.2%} over the {self.decided_samples} the "
            f"reference decides by more than {self.tolerance:.4g}, need "
            f">= {self.min_agreement:.1%}; proves >= {self.proven_agreement:.2%} at 95% "
            f"confidence); {self.beyond_tolerance} beyond the tolerance {self.tolerance:.4g} "
            f"(at most {self.max_beyond} allowed), p99 |error| {self.p99_abs_error:.4g}, "
            f"max {self.max_abs_error:.4g}; data: {self.data}"
        )


def proven_agreement(agreeing: int, samples: int) -> float:
    """The agreement rate that ``agreeing`` of ``samples`` proves: the one-sided 95 % Wilson
    score lower bound (0 for no samples)."""
    if samples <= 0:
        return 0.0
    rate, z2 = agreeing / samples, CONFIDENCE_Z**2
    spread = CONFIDENCE_Z * np.sqrt(rate * (1 - rate) / samples + z2 / (4 * samples**2))
    return float(max(0.0, (rate + z2 / (2 * samples) - spread) / (1 + z2 / samples)))


def compare_outputs(
    reference: np.ndarray,
    engine: np.ndarray,
    *,
    data: str,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    tolerance: float = DEFAULT_TOLERANCE,
) -> FidelityReport:
    """Score ``engine`` outputs against ``reference`` outputs (both ``(samples, classes)``)."""
    ref = np.asarray(reference, np.float64).reshape(len(reference), -1)
    got = np.asarray(engine, np.float64).reshape(len(engine), -1)
    if ref.shape != got.shape:
        raise ValueError(f"engine output shape {got.shape} differs from reference {ref.shape}")
    # The typical spread of one sample's outputs: a few outlier samples must not widen it.
    span = float(np.median(ref.max(axis=1) - ref.min(axis=1))) if ref.size else 0.0
    allowed = tolerance * span
    errors = np.abs(got - ref).max(axis=1)
    agree = ref.argmax(axis=1) == got.argmax(axis=1)
    ordered = np.sort(ref, axis=1)
    margin = ordered[:, -1] - ordered[:, -2] if ref.shape[1] > 1 else np.full(len(ref), np.inf)
    decided = margin > allowed
    decided_agreement = float(agree[decided].mean()) if decided.any() else 1.0
    beyond, max_beyond = int(np.sum(errors > allowed)), int(MAX_BEYOND_SHARE * len(ref))
    passed = bool(len(ref)) and decided_agreement >= min_agreement and beyond <= max_beyond
    return FidelityReport(
        samples=len(ref),
        agreement=float(agree.mean()) if len(ref) else 0.0,
        decided_samples=int(decided.sum()),
        decided_agreement=decided_agreement,
        proven_agreement=proven_agreement(int(agree[decided].sum()), int(decided.sum())),
        max_abs_error=float(errors.max()) if len(errors) else 0.0,
        p99_abs_error=float(np.percentile(errors, ERROR_PERCENTILE)) if len(errors) else 0.0,
        output_range=span,
        tolerance=allowed,
        min_agreement=min_agreement,
        beyond_tolerance=beyond,
        max_beyond=max_beyond,
        data=data,
        passed=passed,
    )


def ideal_integer_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The QDQ graph an ideal integer engine of ``model`` computes, to run as float math.

    The exact int8 rewrite of ``model`` (batch norms folded into the weight scales, no new
    requantization points; :func:`qatflow.onnx.ort_int8.rewrite_for_ort_int8`), with every
    integer-kernel bias rounded to the int32 unit the kernel adds it in
    (:func:`qatflow.onnx.integer_bias.round_biases_to_integer_units`).
    """
    from qatflow.onnx.integer_bias import round_biases_to_integer_units
    from qatflow.onnx.ort_int8 import rewrite_for_ort_int8

    rewritten = rewrite_for_ort_int8(model, relu="exact", requantize="none", fold_affine=True)
    return round_biases_to_integer_units(rewritten)[0]


def ideal_integer_check(
    model: onnx.ModelProto,
    reference: np.ndarray,
    outputs_of: Callable[[onnx.ModelProto], np.ndarray],
    *,
    data: str,
) -> dict[str, Any]:
    """:func:`ideal_integer_graph` of ``model`` run by ``outputs_of`` (on the inputs that gave
    ``reference``) and scored like an engine: what the engine metadata keeps, so that a refusal
    says whether a kernel or the network failed the gate."""
    ideal = compare_outputs(reference, outputs_of(ideal_integer_graph(model)), data=data)
    return {
        "agreement": ideal.agreement,
        "decided_agreement": ideal.decided_agreement,
        "p99_abs_error": ideal.p99_abs_error,
        "beyond_tolerance": ideal.beyond_tolerance,
        "samples": ideal.samples,
        "passed": ideal.passed,
    }


def ideal_integer_line(record: Mapping[str, Any]) -> str:
    """One clause on an :func:`ideal_integer_check` record, for logs and error messages (a
    record stored before the tail criterion has no count beyond the tolerance)."""
    verdict = "passes" if record["passed"] else "fails too: the network amplifies rounding"
    beyond = record.get("beyond_tolerance")
    tail = "" if beyond is None else f"{beyond} of {record['samples']} beyond the tolerance, "
    return (
        f"an ideal integer engine of this model (batch norms folded, int32 biases, run as float "
        f"math) agrees on {record['decided_agreement']:.2%} of the decided samples, {tail}"
        f"p99 |error| {record['p99_abs_error']:.4g}, so it {verdict}"
    )


def collect(
    batches: Iterable[np.ndarray], run: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """All inputs of ``batches`` and ``run``'s outputs on them, concatenated."""
    inputs, outputs = [], []
    for batch in batches:
        inputs.append(np.asarray(batch))
        outputs.append(np.asarray(run(inputs[-1])))
    if not inputs:
        raise ValueError("no batches to check fidelity on")
    return np.concatenate(inputs), np.concatenate(outputs)


def reference_outputs(model: onnx.ModelProto, input_name: str, batch: np.ndarray) -> np.ndarray:
    """The first output of ``model`` on ``batch``, run as float math."""
    return run_reference(model, {input_name: batch})[0]


def first_divergence(
    prepared: onnx.ModelProto, input_name: str, batch: np.ndarray, *, threshold: float = 0.001
) -> tuple[str, float] | None:
    """The first quantized tensor of ``prepared`` whose integer kernel departs from float math.

    Every QuantizeLinear output (the integer tensors ORT's kernels produce) is compared, in graph
    order, between ``prepared`` run with ORT's optimizations (integer kernels) and without (float
    math). One-step differences are rounding; a tensor diverges when more than ``threshold`` of
    its values differ by more than one step. Returns its name and that fraction, or None.
    """
    names = [n.output[0] for n in prepared.graph.node if n.op_type == "QuantizeLinear"]
    if not names:
        return None
    feeds = {input_name: batch}
    expected = run_reference(prepared, feeds, names)
    fused = run_optimized(prepared, feeds, names)
    for name, want, got in zip(names, expected, fused, strict=True):
        steps = np.abs(want.astype(np.int32) - got.astype(np.int32))
        differs = float(np.mean(steps > 1))
        if differs > threshold:
            return name, differs
    return None


DEFAULT_SAMPLES = ENGINE.fidelity_samples
GIVEN_DATA = "the given data"  # what the check's label calls data nobody named
FidelityData = np.ndarray | Iterable[Any]


def fidelity_batches(
    model: onnx.ModelProto,
    data: FidelityData | None,
    *,
    max_samples: int = DEFAULT_SAMPLES,
    batch_size: int = 32,
    source: str = GIVEN_DATA,
) -> tuple[list[np.ndarray], str]:
    """Input batches to check an engine on, and a label saying where they came from
    (``"N samples of <source>"``).

    ``data``: an array of inputs (first axis the samples), or an iterable of batches (arrays, or
    ``(inputs, labels)`` tuples as a dataset yields); at most ``max_samples`` are used. Without
    data, :func:`synthetic_batches` over the input's quantization range (see there).
    """
    if data is None:
        low, high = input_range(model)
        graph_input = model_input(model)
        dims = [d.dim_value or None for d in graph_input.type.tensor_type.shape.dim]
        synthetic = synthetic_batches(dims, low, high, samples=min(max_samples, 64))
        return synthetic, f"synthetic: uniform and two-level inputs in [{low:.4g}, {high:.4g}]"
    if isinstance(data, np.ndarray):
        chunks: Iterable[Any] = (data[i : i + batch_size] for i in range(0, len(data), batch_size))
    else:
        chunks = data
    batches: list[np.ndarray] = []
    taken = 0
    for item in chunks:
        batch = np.asarray(item[0] if isinstance(item, tuple | list) else item, np.float32)
        batch = batch[: max_samples - taken]
        if len(batch):
            batches.append(batch)
            taken += len(batch)
        if taken >= max_samples:
            break
    if not batches:
        raise ValueError("the fidelity data holds no samples")
    return batches, f"{taken} samples of {source}"


def check_sample_count(samples: object) -> int:
    """``samples`` (how many the check may use) if it is a positive integer, else
    RuntimeBackendError."""
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise RuntimeBackendError(f"fidelity_samples must be an integer, got {samples!r}")
    if samples < 1:
        raise RuntimeBackendError(f"fidelity_samples must be at least 1, got {samples}")
    return samples


@dataclass(frozen=True)
class FidelityCheck:
    """What ``build_engine`` checks an engine on: the data (see :func:`fidelity_batches`), at
    most ``samples`` of it, and what the recorded label calls it."""

    data: FidelityData | None = None
    samples: int = DEFAULT_SAMPLES
    source: str = GIVEN_DATA

    def batches(self, model: onnx.ModelProto, source: object) -> tuple[list[np.ndarray], str]:
        """:func:`fidelity_batches` for ``model``; bad data raises RuntimeBackendError."""
        try:
            return fidelity_batches(model, self.data, max_samples=self.samples, source=self.source)
        except (ValueError, TypeError) as exc:
            raise RuntimeBackendError(f"{source}: fidelity data: {exc}") from exc


def model_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The graph input that is not an initializer (the model's data input)."""
    initializers = {init.name for init in model.graph.initializer}
    return next(i for i in model.graph.input if i.name not in initializers)


def input_range(model: onnx.ModelProto) -> tuple[float, float]:
    """The range a QuantizeLinear right after the input can represent, else ``(0, 1)``."""
    from qatflow.onnx.graph import GraphIndex

    index = GraphIndex(model.graph)
    name = model_input(model).name
    for node in index.consumers.get(name, []):
        if node.op_type != "QuantizeLinear":
            continue
        scale = index.constant(node.input[1])
        zero = index.constant(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
        if scale is None or zero is None or scale.size != 1 or zero.size != 1:
            continue
        info = np.iinfo(zero.dtype)
        s, z = float(scale.reshape(())), int(zero.reshape(()))
        return (info.min - z) * s, (info.max - z) * s
    return 0.0, 1.0


def synthetic_batches(
    input_shape: Sequence[int | None], low: float, high: float, *, samples: int = 64, seed: int = 0
) -> list[np.ndarray]:
    """The fallback when no data is given: half uniform in ``[low, high]``, half two-level
    (each value ``low`` or ``high``, the worst case for integer saturation)."""
    rng = np.random.default_rng(seed)
    shape = [max(samples // 2, 1), *(int(d or 1) for d in input_shape[1:])]
    uniform = rng.uniform(low, high, shape).astype(np.float32)
    binary = np.where(rng.random(shape) < 0.5, low, high).astype(np.float32)
    return [uniform, binary]
