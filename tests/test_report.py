"""write_report(): Markdown + self-contained HTML with the table and plots, written atomically."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf2onnx
from matplotlib.image import imread
from tests.results import FP32, PTQ, QAT, fidelity_report, make_result

from qatflow.comparison import FIDELITY_EXPLANATION, NONE_MARK, compare
from qatflow.errors import DataError, PipelineError
from qatflow.evaluation import EvaluationResult, evaluate
from qatflow.report import plots, write_report
from qatflow.report.html import markdown_to_html
from qatflow.report.provenance import RunInfo
from qatflow.runtimes import build_engine

PLACEMENT = "| Layer | Case |\n|---|---|\n| conv2d | conv+relu |\n| add | residual <b>add</b> |\n"


@pytest.fixture
def results() -> dict[str, EvaluationResult]:
    rng = np.random.default_rng(0)
    return {
        "fp32": make_result(FP32, latency_ms=list(rng.gamma(20, 0.1, 50))),
        "ptq_int8": make_result(PTQ, latency_ms=list(rng.gamma(20, 0.05, 50))),
        "qat_int8": make_result(QAT, latency_ms=list(rng.gamma(20, 0.05, 50))),
    }


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    height, width = imread(io.BytesIO(data), format="png").shape[:2]
    return width, height


def test_markdown_and_html_hold_table_plots_and_extra_sections(
    results: dict[str, EvaluationResult], tmp_path: Path
) -> None:
    comparison = compare(results)
    files = write_report(
        comparison,
        results,
        tmp_path / "report",
        title="FP32 vs PTQ vs QAT",
        extra_sections={"Q/DQ placement": PLACEMENT},
    )
    assert files.markdown == tmp_path / "report" / "report.md"
    assert set(files.plots) == {"accuracy_vs_latency", "per_class_change", "latency_distribution"}
    for path in files.plots.values():
        width, height = _png_size(path.read_bytes())
        assert width >= 600 and height >= 200

    markdown = files.markdown.read_text()
    assert markdown.startswith("# FP32 vs PTQ vs QAT\n")
    for line in comparison.to_markdown().splitlines():
        assert line in markdown
    for name in files.plots:
        assert f"](plots/{name}.png)" in markdown
    assert "## Q/DQ placement\n\n| Layer | Case |" in markdown
    assert (
        "| qat_int8 | `onnxruntime-model` | onnxruntime 1.0 | cpu | 2 | 50 at batch 1" in markdown
    )
    assert f"*Fidelity*: {FIDELITY_EXPLANATION}" in markdown  # the column is always explained
    assert "## Build-time fidelity" not in markdown  # no engine recorded a check

    page = files.html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>FP32 vs PTQ vs QAT</title>" in page
    for row in comparison.rows:
        assert f"<tr><td>{row.variant}</td>" in page
    assert '<td style="text-align:right">-20.00</td>' in page  # PTQ delta, right-aligned
    assert "<td>residual &lt;b&gt;add&lt;/b&gt;</td>" in page  # extra section escaped
    assert "plots/" not in page  # self-contained
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(
        p.read_bytes() for p in files.plots.values()
    )


def test_fidelity_column_explanation_and_section(
    results: dict[str, EvaluationResult], tmp_path: Path
) -> None:
    results["qat_int8"] = make_result(
        QAT,
        fidelity=fidelity_report(0.999),
        engine={
            "encoding": "u8s8",
            "isa": "avx512_vnni",
            "integer_nodes": "87.5%",
            "integer_time": "96.7%",
        },
    )
    results["ptq_int8"] = make_result(
        PTQ,
        fidelity=fidelity_report(0.6125, passed=False),
        engine={"encoding": "u8s8", "isa": "avx2 (no VNNI)"},
    )
    comparison = compare(results)
    files = write_report(comparison, results, tmp_path, title="fidelity")
    markdown = files.markdown.read_text()
    table = comparison.to_markdown()
    assert "| Agree (%) | Fidelity |" in table and "| Encoding / ISA |" in table
    for line in table.splitlines():
        assert line in markdown
    assert "| 99.90% pass |" in markdown and "| 61.25% FAIL |" in markdown
    explanation = (
        "*Fidelity*: INT8 engine vs the same QDQ model run as float math, checked at build time"
    )
    assert explanation in markdown
    assert "- ptq_int8: the engine FAILED its build-time fidelity check" in markdown

    section = markdown.split("## Build-time fidelity\n\n", 1)[1].split("\n## ", 1)[0]
    assert section.startswith(FIDELITY_EXPLANATION + ". It passes when")
    assert (
        "| Variant | Fidelity | Decided agreement (%) | Beyond tolerance (allowed) | Tolerance "
        "| p99 / max abs error | Checked on | Encoding / ISA | Integer kernels (nodes / time) |"
    ) in section
    assert f"| fp32 | {NONE_MARK} | {NONE_MARK} | {NONE_MARK} | {NONE_MARK} | {NONE_MARK} |" in (
        section
    )
    assert (
        "| qat_int8 | 99.90% pass | 100.00 of 980 (need 99.90; proves 99.72) | 0 of 1000 (1) | 1 "
        "| 0.0125 / 0.02 | calibration images (64) | u8s8 / avx512_vnni | 87.5% / 96.7% |"
    ) in section
    assert (
        "| ptq_int8 | 61.25% FAIL | 61.25 of 980 (need 99.90; proves 60.25) | 40 of 1000 (1) | 1 "
        "| 2.25 / 3.5 |"
    ) in section

    page = files.html.read_text()
    assert "<th" in page and ">Fidelity</th>" in page and ">Encoding / ISA</th>" in page
    assert '<td style="text-align:right">61.25% FAIL</td>' in page
    assert "<h2>Build-time fidelity</h2>" in page
    assert "<td>u8s8 / avx2 (no VNNI)</td>" in page
    assert "<em>Fidelity</em>: INT8 engine vs the same QDQ model run as float math" in page


def test_only_baseline_and_one_variant_and_rewrite(
    results: dict[str, EvaluationResult], tmp_path: Path
) -> None:
    subset = {"fp32": results["fp32"], "qat_int8": results["qat_int8"]}
    files = write_report(compare(subset), subset, tmp_path, title="two")
    assert "| ptq_int8 |" not in files.markdown.read_text()
    alone = {"fp32": results["fp32"]}
    files = write_report(compare(alone), alone, tmp_path, title="baseline only")
    assert set(files.plots) == {"accuracy_vs_latency", "latency_distribution"}
    assert "per_class_change" not in files.markdown.read_text()
    assert files.html.read_text().count("data:image/png;base64,") == 2


def test_many_classes_show_only_the_largest_changes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 100, 2000)
    noisy = np.where(rng.random(2000) < 0.2, rng.integers(0, 100, 2000), labels)
    many = {
        "fp32": make_result(labels, labels, num_classes=100),
        "qat_int8": make_result(noisy, labels, num_classes=100),
    }
    files = write_report(compare(many), many, tmp_path, title="100 classes")
    width, _ = _png_size(files.plots["per_class_change"].read_bytes())
    assert width < 2000  # 40 bars, not 100


def test_errors_leave_nothing_behind(results: dict[str, EvaluationResult], tmp_path: Path) -> None:
    comparison = compare(results)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"results lacks \['qat_int8'\]"):
        write_report(
            comparison, {k: v for k, v in results.items() if k != "qat_int8"}, out, title="x"
        )
    with pytest.raises(PipelineError, match="title"):
        write_report(comparison, results, out, title=" ")
    assert not out.exists()


def test_end_to_end_from_real_evaluations(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(6)(hidden))
    spec = tf.TensorSpec((None, 8, 8, 1), tf.float32, name="input")
    onnx_path = tmp_path / "model.onnx"
    tf2onnx.convert.from_keras(model, input_signature=[spec], opset=17, output_path=str(onnx_path))
    engine = build_engine(onnx_path, tmp_path / "model.ort.onnx", "onnxruntime", threads=1)
    rng = np.random.default_rng(3)
    batches = [
        (rng.random((16, 8, 8, 1), dtype=np.float32), rng.integers(0, 6, 16)) for _ in range(3)
    ]
    options: dict[str, Any] = {"latency_iterations": 20, "warmup": 2, "throughput_batch": 8}
    fp32 = evaluate(model, batches, **options)
    results = {"fp32": fp32, "fp32_ort": evaluate(engine, batches, threads=1, **options)}
    comparison = compare(results, accuracy_gate=0.0)
    assert comparison.row("fp32_ort").agreement == 1.0
    assert comparison.verdict("fp32_ort").passed
    files = write_report(comparison, results, tmp_path / "report", title="Keras vs ORT")
    markdown = files.markdown.read_text()
    assert "| fp32_ort | " in markdown and "runtime differs" in markdown
    assert "`model.ort.onnx (local)`" in markdown  # the engine by name, not by path
    assert str(tmp_path) not in markdown and str(tmp_path) not in files.html.read_text()
    # The ORT engine's build-time check shows in the table and its own section.
    fidelity = results["fp32_ort"].fidelity
    assert fidelity is not None and fidelity["passed"] is True
    assert "| 100.00% pass |" in markdown
    assert "## Build-time fidelity" in markdown
    assert f"| {fidelity['data']} |" in markdown
    for path in files.plots.values():
        _png_size(path.read_bytes())


def test_markdown_subset_to_html() -> None:
    text = (
        "## Head *x*\n\nline one\nline two with `a*b*c` and **bold** and [link](https://x.org)\n\n"
        "- item <1>\n* item 2\n\n```\n<raw> | code\n```\n"
        "| a | b | c |\n|:---|:---:|---:|\n| 1 | x \\| y | 3 |\n"
    )
    html = markdown_to_html(text, images={})
    assert "<h2>Head <em>x</em></h2>" in html
    assert "<p>line one line two with <code>a*b*c</code> and <strong>bold</strong>" in html
    assert '<a href="https://x.org">link</a>' in html
    assert "<ul><li>item &lt;1&gt;</li><li>item 2</li></ul>" in html
    assert "<pre><code>&lt;raw&gt; | code</code></pre>" in html
    assert '<th style="text-align:left">a</th><th style="text-align:center">b</th>' in html
    assert '<td style="text-align:center">x | y</td><td style="text-align:right">3</td>' in html
    image = markdown_to_html("![plot](p.png) ![other](q.png)", images={"p.png": b"PNG"})
    assert 'src="data:image/png;base64,UE5H"' in image and 'src="q.png"' in image


def test_verdict_banners_gate_column_and_provenance(
    results: dict[str, EvaluationResult], tmp_path: Path
) -> None:
    results["qat_int8"] = make_result(QAT, engine={"encoding": "u8s8", "isa": "avx512_vnni"})
    comparison = compare(results, accuracy_gate=1.0)  # qat +10 points, ptq -20 points
    info = RunInfo(
        dataset_uri=str(tmp_path / "data" / "images.npz"),
        dataset_kind="npz",
        model_uri="s3://models/cnn.keras",
        run_name="nightly-7",
        run_id="run-123",
    )
    files = write_report(comparison, results, tmp_path, title="gate", run_info=info)
    markdown = files.markdown.read_text()
    head = markdown.split("## Provenance")[0]
    assert head.index("ptq_int8: REFUSED") < head.index("qat_int8: passed")  # table order
    assert (
        "> [!CAUTION]\n> **ptq_int8: REFUSED by the accuracy gate.** ptq_int8 -20.00 top-1 "
        "points vs fp32 (70.00% vs 90.00%): outside the 1-point gate, refused." in head
    )
    assert "> [!TIP]\n> **qat_int8: passed the accuracy gate.**" in head
    provenance = markdown.split("## Provenance\n\n", 1)[1].split("\n## ", 1)[0]
    assert "| Dataset | images.npz (local) (npz); 10 test images, 6 classes |" in provenance
    assert "| Model | s3://models/cnn.keras |" in provenance
    assert "| Pipeline run | nightly-7 / run-123 |" in provenance
    assert "| Device | cpu |" in provenance and "| Threads | 2 |" in provenance
    assert "| Encoding | fp32: n/a; ptq_int8: n/a; qat_int8: u8s8 |" in provenance
    for label in ("qatflow", "TensorFlow", "ONNX Runtime", "Runtime", "ISA"):
        assert f"| {label} | " in provenance
    assert str(tmp_path) not in markdown
    assert "| Gate |" in markdown and "| REFUSED |" in markdown

    page = files.html.read_text()
    assert '<blockquote class="caution"><p><strong>ptq_int8: REFUSED' in page
    assert '<blockquote class="tip"><p><strong>qat_int8: passed' in page


def test_gate_band_and_per_class_axes(results: dict[str, EvaluationResult]) -> None:
    comparison = compare(results, accuracy_gate=2.5)
    ax = plots.accuracy_vs_latency_figure(comparison).axes[0]
    (band,) = ax.patches  # a Rectangle spanning the gate below the baseline's top-1
    assert (band.get_y(), band.get_y() + band.get_height()) == (
        pytest.approx(87.5),
        pytest.approx(90.0),  # fp32 top-1 90 %
    )
    assert "accuracy gate: within 2.5 top-1 points" in [t.get_text() for t in ax.get_legend().texts]

    figure = plots.per_class_change_figure(comparison, results)
    assert figure is not None
    for panel in figure.axes:
        assert panel.get_xlabel() == "class"
        labels = panel.get_xticklabels()
        assert [t.get_text() for t in labels] == [f"c{i}" for i in range(6)]
        assert all(t.get_rotation() == 0 for t in labels)  # short names stay horizontal
    ptq_panel = figure.axes[0]  # ptq_int8 vs fp32 per class: c0..c5 = -50, 0, -50, 0, 0, 0
    (markers,) = ptq_panel.lines[1:]
    assert list(markers.get_xdata()) == [1, 3, 4, 5]  # unchanged classes get a dot at zero


def test_markdown_alerts_to_html() -> None:
    html = markdown_to_html("> [!CAUTION]\n> **no** good\n\n> plain quote\n", images={})
    assert '<blockquote class="caution"><p><strong>no</strong> good</p>\n</blockquote>' in html
    assert "<blockquote><p>plain quote</p>\n</blockquote>" in html
