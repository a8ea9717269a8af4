"""compare(): rows, deltas, agreement, speedup, gate, Markdown/text/JSON views, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.results import FP32, LABELS, PTQ, QAT, fidelity_report, make_result

from qatflow.comparison import FIDELITY_EXPLANATION, NONE_MARK, Comparison, compare
from qatflow.errors import DataError, PipelineError
from qatflow.evaluation import EvaluationResult


@pytest.fixture
def results() -> dict[str, EvaluationResult]:
    return {
        "qat_int8": make_result(QAT, latency_ms=[1.0, 1.0, 1.0, 3.0], size_bytes=1_000_000),
        "fp32": make_result(FP32, images_per_second=50.0),
        "ptq_int8": make_result(PTQ, latency_ms=[0.5, 0.5, 0.5, 0.5]),
    }


def test_rows_deltas_agreement_and_speedup(results: dict[str, EvaluationResult]) -> None:
    comparison = compare(results)
    assert comparison.variants == ["fp32", "qat_int8", "ptq_int8"]  # baseline first
    fp32, qat, ptq = comparison.rows
    assert (fp32.delta_top1_points, fp32.agreement, fp32.speedup) == (0.0, 1.0, 1.0)
    assert ptq.top1 == pytest.approx(0.7)
    assert ptq.delta_top1_points == pytest.approx(-20.0)
    assert ptq.agreement == pytest.approx(0.8)
    assert ptq.speedup == pytest.approx(4.0)  # p50 2.0 / 0.5
    assert qat.delta_top1_points == pytest.approx(10.0)
    assert qat.agreement == pytest.approx(0.9)
    assert qat.speedup == pytest.approx(2.0)
    assert qat.latency_ms_p99 == pytest.approx(np.percentile([1, 1, 1, 3], 99))
    assert qat.size_mb == pytest.approx(1.0)
    assert fp32.throughput == pytest.approx(50.0)
    assert (fp32.top5, qat.top5, ptq.top5) == (pytest.approx(0.9), 1.0, pytest.approx(0.8))
    assert comparison.notes == ()


def test_tracking_metrics_use_the_tracker_keys(results: dict[str, EvaluationResult]) -> None:
    from qatflow.tracking import METRIC_KEYS

    qat = compare(results).row("qat_int8").tracking_metrics()
    assert list(qat) == list(METRIC_KEYS)
    assert qat["accuracy_top1_pct"] == pytest.approx(100.0)  # percent, like the delta's points
    assert qat["accuracy_top1_delta_points"] == pytest.approx(10.0)
    assert qat["speedup_vs_fp32"] == pytest.approx(2.0)
    assert qat["size_mb"] == pytest.approx(1.0)


def test_accuracy_gate(results: dict[str, EvaluationResult]) -> None:
    assert compare(results, accuracy_gate=0.0).verdict("qat_int8").passed  # +10 points
    assert not compare(results, accuracy_gate=19.9).verdict("ptq_int8").passed  # -20 points
    at_edge = compare(results, accuracy_gate=20.0)
    assert at_edge.verdict("ptq_int8").passed
    assert list(at_edge.verdicts()) == ["qat_int8", "ptq_int8"]  # every variant but fp32
    with pytest.raises(DataError, match="'int4'"):
        at_edge.verdict("int4")
    with pytest.raises(PipelineError, match="accuracy_gate"):
        compare(results, accuracy_gate=-1.0)


def test_gate_column_and_saved_verdicts(
    results: dict[str, EvaluationResult], tmp_path: Path
) -> None:
    comparison = compare(results, accuracy_gate=5.0)
    headers, rows = comparison.table()
    gate_column = [row[headers.index("Gate")] for row in rows]
    assert gate_column == ["baseline", "pass", "REFUSED"]
    saved = json.loads(comparison.save_json(tmp_path / "c.json").read_text())
    assert saved["gate_points"] == 5.0
    assert saved["verdicts"]["ptq_int8"]["outcome"] == "refused"
    assert "-20.00 top-1 points vs fp32" in saved["verdicts"]["ptq_int8"]["reason"]
    assert Comparison.load_json(tmp_path / "c.json") == comparison


def test_missing_variants_are_fine_but_baseline_is_required(
    results: dict[str, EvaluationResult],
) -> None:
    comparison = compare({"fp32": results["fp32"], "qat_int8": results["qat_int8"]})
    assert comparison.variants == ["fp32", "qat_int8"]
    with pytest.raises(DataError, match=r"baseline 'fp32' is not among.*ptq_int8"):
        compare({"ptq_int8": results["ptq_int8"]})
    other = compare(results, baseline="ptq_int8")
    assert other.row("fp32").delta_top1_points == pytest.approx(20.0)


def test_results_from_different_test_sets_are_rejected(
    results: dict[str, EvaluationResult],
) -> None:
    short = make_result(FP32[:8], LABELS[:8])
    with pytest.raises(DataError, match=r"results\['short'\] covers 8 images.*'fp32' covers 10"):
        compare({"fp32": results["fp32"], "short": short})
    other_classes = make_result(FP32, num_classes=7)
    with pytest.raises(DataError, match="classes"):
        compare({"fp32": results["fp32"], "seven": other_classes})


def test_notes_flag_speed_numbers_that_are_not_like_for_like(
    results: dict[str, EvaluationResult],
) -> None:
    results["fp32"] = make_result(FP32, runtime="tensorflow", threads=None)
    notes = compare(results).notes
    assert any("runtime differs" in n and "fp32: tensorflow 1.0" in n for n in notes)
    assert any("threads differs" in n and "fp32: None" in n for n in notes)


def test_markdown_and_text_views(results: dict[str, EvaluationResult]) -> None:
    results["ptq_int8"] = make_result(PTQ, size_bytes=None, runtime="tensorrt")
    comparison = compare(results)
    markdown = comparison.to_markdown()
    lines = markdown.splitlines()
    assert lines[0] == (
        "| Variant | Top-1 (%) | Top-5 (%) | Delta top-1 (pts) | Gate | Agree (%) | Fidelity "
        "| p50 (ms) | p99 (ms) | Speedup | Img/s | Size (MB) | Encoding / ISA |"
    )
    assert lines[1].startswith("|---|---:|")
    assert lines[2] == (
        f"| fp32 | 90.00 | 90.00 | baseline | baseline | baseline | {NONE_MARK} | 2.000 | 3.940 "
        f"| baseline | 50.0 | 4.000 | {NONE_MARK} |"
    )
    assert lines[3].startswith(
        f"| qat_int8 | 100.00 | 100.00 | +10.00 | pass | 90.00 | {NONE_MARK} |"
    )
    assert lines[4].startswith(
        f"| ptq_int8 | 70.00 | 80.00 | -20.00 | REFUSED | 80.00 | {NONE_MARK} |"
    )
    assert lines[4].endswith(f"| 1.00x | 100.0 | n/a | {NONE_MARK} |")
    assert "- Speed numbers are not like for like: runtime differs" in markdown

    text = comparison.to_text().splitlines()
    assert text[0].split()[0] == "Variant"
    assert set(text[1]) <= {"-", " "}
    assert text[2].split() == [
        "fp32", "90.00", "90.00", "baseline", "baseline", "baseline", NONE_MARK, "2.000", "3.940",
        "baseline", "50.0", "4.000", NONE_MARK,
    ]  # fmt: skip
    assert len({len(line) for line in text[:2]}) == 1  # header and rule aligned
    assert text[-1].startswith("note: Speed numbers are not like for like")


def test_fidelity_and_engine_columns(results: dict[str, EvaluationResult]) -> None:
    results["qat_int8"] = make_result(
        QAT,
        fidelity=fidelity_report(0.999),
        engine={"encoding": "u8s8", "isa": "avx512_vnni"},
    )
    results["ptq_int8"] = make_result(
        PTQ,
        fidelity=fidelity_report(0.6125, passed=False),
        engine={"encoding": "u8s8", "isa": "avx2 (no VNNI)"},
    )
    results["fp32"] = make_result(FP32, engine={"isa": "avx512_vnni"})  # float: no encoding
    comparison = compare(results)
    fp32, qat, ptq = comparison.rows
    assert fp32.fidelity is None and fp32.fidelity_passed is None
    assert fp32.engine == {"isa": "avx512_vnni"}
    assert qat.fidelity == fidelity_report(0.999) and qat.fidelity_passed is True
    assert ptq.fidelity_passed is False
    assert ptq.engine == {"encoding": "u8s8", "isa": "avx2 (no VNNI)"}

    headers, cells = comparison.table()
    fidelity = headers.index("Fidelity")
    engine = headers.index("Encoding / ISA")
    assert [row[fidelity] for row in cells] == [NONE_MARK, "99.90% pass", "61.25% FAIL"]
    assert [row[engine] for row in cells] == [
        "avx512_vnni",
        "u8s8 / avx512_vnni",
        "u8s8 / avx2 (no VNNI)",
    ]
    markdown = comparison.to_markdown()
    assert "| 90.00 | 99.90% pass | 2.000 |" in markdown
    assert markdown.splitlines()[3].endswith("| u8s8 / avx512_vnni |")
    assert "99.90% pass" in comparison.to_text()

    # A failed check is called out: that variant's accuracy measures the kernels.
    (note,) = comparison.notes
    assert note.startswith("ptq_int8: the engine FAILED its build-time fidelity check")
    assert "61.25% top-1 agreement" in note and "calibration images (64)" in note
    assert f"- {note}" in markdown
    assert "QDQ model run as float math" in FIDELITY_EXPLANATION


def test_fidelity_without_agreement_still_shows_the_verdict(
    results: dict[str, EvaluationResult],
) -> None:
    results["qat_int8"] = make_result(QAT, fidelity={"passed": False})
    comparison = compare(results)
    headers, cells = comparison.table()
    assert cells[1][headers.index("Fidelity")] == "FAIL"
    assert "(no top-1 agreement" in comparison.notes[0]


def test_top5_not_applicable_is_shown_as_na() -> None:
    labels = np.array([0, 1, 2, 3])
    fp32 = make_result([0, 1, 2, 2], labels, num_classes=4)
    comparison = compare({"fp32": fp32})
    assert fp32.top5 is None
    assert "| fp32 | 75.00 | n/a |" in comparison.to_markdown()


def test_json_round_trip(results: dict[str, EvaluationResult], tmp_path: Path) -> None:
    comparison = compare(results)
    path = comparison.save_json(tmp_path / "comparison.json")
    data = json.loads(path.read_text())
    assert data["baseline"] == "fp32"
    assert [row["variant"] for row in data["rows"]] == ["fp32", "qat_int8", "ptq_int8"]
    assert Comparison.load_json(path) == comparison
    assert Comparison.from_dict(comparison.to_dict()) == comparison
    assert data["rows"][0]["fidelity"] is None and data["rows"][0]["engine"] is None
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match=r"bad\.json"):
        Comparison.load_json(tmp_path / "bad.json")


def test_json_round_trip_with_fidelity_and_old_rows(
    results: dict[str, EvaluationResult], tmp_path: Path
) -> None:
    results["qat_int8"] = make_result(
        QAT, fidelity=fidelity_report(), engine={"encoding": "u8u8", "isa": "avx2 (no VNNI)"}
    )
    comparison = compare(results)
    path = comparison.save_json(tmp_path / "comparison.json")
    data = json.loads(path.read_text())
    assert data["rows"][1]["fidelity"]["passed"] is True
    assert data["rows"][1]["engine"] == {"encoding": "u8u8", "isa": "avx2 (no VNNI)"}
    loaded = Comparison.load_json(path)
    assert loaded == comparison
    assert loaded.row("qat_int8").fidelity == fidelity_report()
    # A comparison.json written before these fields existed still loads.
    for row in data["rows"]:
        del row["fidelity"], row["engine"]
    old = Comparison.from_dict(data)
    assert old.row("qat_int8").fidelity is None and old.row("qat_int8").engine is None
    assert NONE_MARK in old.table()[1][1]
