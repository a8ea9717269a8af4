"""The fidelity gate: scoring against the reference, data for it, and localizing a divergence."""

from __future__ import annotations

import numpy as np
import pytest
from tests.int8_models import near_binary, saturating_cnn

from qatflow.errors import RuntimeBackendError
from qatflow.onnx.ort_int8 import rewrite_for_ort_int8
from qatflow.runtimes.fidelity import (
    FidelityCheck,
    compare_outputs,
    fidelity_batches,
    first_divergence,
    ideal_integer_line,
    input_range,
)

RNG = np.random.default_rng(0)


def logits(samples: int = 2000) -> np.ndarray:
    out = RNG.normal(0, 1, (samples, 10))
    out[np.arange(samples), RNG.integers(0, 10, samples)] += 4.0
    return out


def test_identical_outputs_pass() -> None:
    ref = logits()
    report = compare_outputs(ref, ref.copy(), data="same")
    assert report.passed and report.agreement == 1.0 and report.max_abs_error == 0.0
    assert report.decided_samples <= report.samples == 2000
    assert "passed" in report.summary() and report.to_dict()["data"] == "same"


def test_a_flip_on_a_near_tie_is_not_a_disagreement_but_a_decided_one_is() -> None:
    ref = np.zeros((1000, 3))
    ref[:, 0] = 1.0
    ref[0] = [0.500, 0.499, 0.0]  # the reference itself is torn on sample 0
    got = ref.copy()
    got[0] = [0.499, 0.500, 0.0]
    report = compare_outputs(ref, got, data="tie")
    assert report.agreement == pytest.approx(0.999) and report.decided_agreement == 1.0
    assert report.passed
    got[1] = [0.0, 1.0, 0.0]  # a decided sample changes its mind
    got[2] = [0.0, 1.0, 0.0]
    failed = compare_outputs(ref, got, data="flip")
    assert not failed.passed and failed.decided_agreement < 0.999
    assert "FAILED" in failed.summary()


def test_large_errors_fail_even_when_top1_agrees() -> None:
    ref = logits(500)
    got = ref + RNG.normal(0, 0.2, ref.shape) * (ref.max() - ref.min())
    got[np.arange(500), ref.argmax(1)] += 100.0
    report = compare_outputs(ref, got, data="noisy")
    assert report.agreement == 1.0 and not report.passed
    assert report.p99_abs_error > report.tolerance


def test_a_few_samples_far_beyond_the_tolerance_fail_although_p99_and_top1_pass() -> None:
    """Integer kernels that diverge do so on a few inputs, by far (EfficientNetB0: 0.8 % of the
    images moved by up to ten tolerances): at most 0.1 % of the samples may lie beyond."""
    ref = logits(2000)
    got = ref.copy()
    lowest = ref.argmin(axis=1)
    got[:2, lowest[:2]] -= 10.0  # two of 2,000 far off, top-1 kept: 0.1 %, allowed
    allowed = compare_outputs(ref, got, data="two far")
    assert allowed.passed and (allowed.beyond_tolerance, allowed.max_beyond) == (2, 2)
    got[2:6, lowest[2:6]] -= 10.0  # six: p99 and the decided agreement would still pass
    refused = compare_outputs(ref, got, data="six far")
    assert refused.p99_abs_error <= refused.tolerance and refused.beyond_tolerance == 6
    assert not refused.passed
    assert "6 beyond the tolerance" in refused.summary()
    assert "(at most 2 allowed)" in refused.summary()
    few = compare_outputs(ref[:256], got[:256], data="256")
    assert few.max_beyond == 0 and not few.passed


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        compare_outputs(np.zeros((4, 10)), np.zeros((4, 5)), data="x")


def test_fidelity_batches_from_arrays_iterables_and_nothing() -> None:
    model = saturating_cnn()
    data = near_binary(100)
    batches, label = fidelity_batches(model, data, max_samples=70, batch_size=32)
    assert [len(b) for b in batches] == [32, 32, 6] and label == "70 samples of the given data"
    pairs = [(data[:40], np.zeros(40)), (data[40:], np.zeros(60))]
    batches, _ = fidelity_batches(model, iter(pairs), max_samples=50)
    assert [len(b) for b in batches] == [40, 10]
    batches, label = fidelity_batches(model, None)
    low, high = input_range(model)
    assert (low, high) == pytest.approx((-128 / 127, 1.0))
    assert label.startswith("synthetic") and len(batches) == 2
    assert all(b.shape[1:] == (8, 8, 8) and b.min() >= low and b.max() <= high for b in batches)
    assert set(np.unique(batches[1])) == {np.float32(low), np.float32(high)}
    with pytest.raises(RuntimeBackendError, match="fidelity data: the fidelity data holds no"):
        FidelityCheck(np.zeros((0, 8, 8, 8), np.float32)).batches(model, "m.onnx")


def test_first_divergence_is_none_for_exact_kernels() -> None:
    """U8U8 kernels are exact on every CPU: no quantized tensor diverges."""
    from qatflow.onnx.encoding import encode_weights

    prepared = rewrite_for_ort_int8(saturating_cnn())
    encode_weights(prepared, "u8u8")
    assert first_divergence(prepared, "x", near_binary(16)) is None


def test_an_outlier_sample_does_not_widen_the_tolerance() -> None:
    """A barely trained model with a few huge logits must not pass with errors of the typical
    spread's size (bench: an EfficientNetB0 at 53 % agreement passed under a global range)."""
    ref = logits(500)
    ref[0, 0] = 1e4  # one outlier would make a global max-min range 1,000 times wider
    got = ref + RNG.normal(0, 1.0, ref.shape)
    report = compare_outputs(ref, got, data="outlier")
    assert report.output_range < 20 and report.tolerance < 1
    assert not report.passed


def test_the_ideal_integer_line_reads_records_with_and_without_the_tail_count():
    record = {"decided_agreement": 1.0, "p99_abs_error": 0.0, "passed": True}
    older = ideal_integer_line(record)  # stored before the tail criterion
    assert "beyond the tolerance" not in older and older.endswith("so it passes")
    newer = ideal_integer_line({**record, "beyond_tolerance": 0, "samples": 1024})
    assert "0 of 1024 beyond the tolerance, p99 |error| 0, so it passes" in newer
