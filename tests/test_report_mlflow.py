"""The report names the MLflow runs: ``rewrite_report`` after publish, and its source file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.results import FP32, PTQ, QAT, make_result

from qatflow.comparison import compare
from qatflow.errors import DataError
from qatflow.evaluation import EvaluationResult
from qatflow.report import rewrite_report, write_report
from qatflow.report.provenance import (
    NOT_PUBLISHED,
    MlflowInfo,
    RunInfo,
    display_tracking_uri,
)

PARENT = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
CHILDREN = {"fp32": "a" * 32, "ptq_int8": "b" * 32, "qat_int8": "c" * 32}


@pytest.fixture
def results() -> dict[str, EvaluationResult]:
    return {"fp32": make_result(FP32), "ptq_int8": make_result(PTQ), "qat_int8": make_result(QAT)}


def _source(results: dict[str, EvaluationResult], folder: Path) -> Path:
    comparison = compare(results, accuracy_gate=1.0)
    info = RunInfo(dataset_uri="fashion-mnist", model_uri="demo", run_name="nightly", run_id="k1")
    write_report(
        comparison,
        results,
        folder,
        title="gate",
        run_info=info,
        extra_sections={"Q/DQ placement": "| a | b |\n|---|---|\n| 1 | 2 |"},
    )
    comparison.save_json(folder / "comparison.json")
    return folder


def _info(tracking_uri: str, **changes: object) -> MlflowInfo:
    values: dict[str, object] = {
        "tracking_uri": tracking_uri,
        "experiment": "qatflow",
        "parent_run_id": PARENT,
        "child_run_ids": CHILDREN,
        "experiment_id": "7",
        "registered_model": "qatflow-qat-int8",
        "version": "3",
        "promoted": False,
        "registry_reasons": ("qatflow-qat-int8 v3 -4.00 top-1 points vs champion v2",),
    }
    values.update(changes)
    return MlflowInfo(**values)  # type: ignore[arg-type]


def test_the_compare_report_says_mlflow_comes_later(
    results: dict[str, EvaluationResult], tmp_path: Path
) -> None:
    source = _source(results, tmp_path / "compare")
    assert f"| MLflow | {NOT_PUBLISHED} |" in (source / "report.md").read_text()
    stored = json.loads((source / "report.json").read_text())
    assert stored["title"] == "gate" and stored["run_info"]["run_name"] == "nightly"
    assert list(stored["extra_sections"]) == ["Q/DQ placement"]


def test_rewrite_names_every_run_and_links_an_http_server(
    results: dict[str, EvaluationResult], tmp_path: Path
) -> None:
    source = _source(results, tmp_path / "compare")
    before = (source / "report.md").read_text()
    out = tmp_path / "final"
    info = _info("https://user:secret@mlflow.example.com/")
    files = rewrite_report(source, results, out, mlflow=info)

    markdown, page = files.markdown.read_text(), files.html.read_text()
    base = "https://mlflow.example.com/#/experiments/7"
    for text in (markdown, page):
        assert PARENT in text and all(run_id in text for run_id in CHILDREN.values())
        assert f"{base}/runs/{PARENT}" in text
        assert f"{base}/runs/{CHILDREN['qat_int8']}" in text
        assert "secret" not in text and NOT_PUBLISHED not in text
    assert f"| MLflow parent run | [{PARENT}]({base}/runs/{PARENT}) |" in markdown
    assert f"qat_int8: [{CHILDREN['qat_int8']}]({base}/runs/{CHILDREN['qat_int8']})" in markdown
    assert f'<a href="{base}/runs/{PARENT}">{PARENT}</a>' in page
    assert "| Model registry | qatflow-qat-int8 v3: not promoted to champion |" in markdown
    # The registry's refusal is a banner too, under the variants' verdicts.
    head = markdown.split("## Provenance")[0]
    assert "> [!CAUTION]\n> **Registry: qatflow-qat-int8 v3 REFUSED" in head
    assert head.index("qat_int8: passed the accuracy gate") < head.index("Registry:")
    # Same title, provenance and extra sections as the compare step wrote; the source is kept.
    assert markdown.startswith("# gate\n") and "| Pipeline run | nightly / k1 |" in markdown
    assert "## Q/DQ placement" in markdown
    assert (out / "comparison.json").read_bytes() == (source / "comparison.json").read_bytes()
    assert sorted(p.name for p in files.plots.values()) == sorted(
        p.name for p in (source / "plots").iterdir()
    )
    assert (source / "report.md").read_text() == before
    assert json.loads((out / "report.json").read_text())["run_info"]["mlflow"]["parent_run_id"]


def test_a_local_store_is_named_not_linked_and_offline_is_said(
    results: dict[str, EvaluationResult], tmp_path: Path
) -> None:
    source = _source(results, tmp_path / "compare")
    store = f"sqlite:///{tmp_path}/deep/mlflow.db"
    markdown = rewrite_report(
        source, results, tmp_path / "a", mlflow=_info(store, promoted=True)
    ).markdown.read_text()
    assert "| MLflow experiment | qatflow (id 7) at sqlite: mlflow.db (local) |" in markdown
    assert (
        f"| MLflow parent run | {PARENT} |" in markdown
        and "](" not in markdown.split("## Comparison")[0].split("## Provenance")[1]
    )
    assert "> [!TIP]\n> **Registry: qatflow-qat-int8 v3 promoted to champion.**" in markdown
    assert str(tmp_path) not in markdown

    offline = _info(
        "http://10.0.0.1:5000",
        offline=True,
        experiment_id=None,
        parent_run_id="offline-1",
        child_run_ids={"fp32": "offline-2"},
        version=None,
        promoted=None,
    )
    text = rewrite_report(source, results, tmp_path / "b", mlflow=offline).markdown.read_text()
    assert "MLflow was unreachable when publishing" in text
    assert "| MLflow parent run | offline-1 |" in text and "fp32: offline-2" in text
    assert "| Model registry | qatflow-qat-int8: not registered (MLflow unreachable) |" in text


def test_display_tracking_uri() -> None:
    assert display_tracking_uri("http://u:p@host:5000") == "http://host:5000"
    assert display_tracking_uri("sqlite:////abs/path/mlflow.db") == "sqlite: mlflow.db (local)"
    assert display_tracking_uri("/tmp/mlruns") == "file: mlruns (local)"


def test_a_report_source_that_is_not_one_is_named(
    results: dict[str, EvaluationResult], tmp_path: Path
) -> None:
    source = _source(results, tmp_path / "compare")
    (source / "report.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="report.json is not a qatflow report source"):
        rewrite_report(source, results, tmp_path / "out", mlflow=_info("http://h"))
    # A folder without a source (an older qatflow) still renders, with the default title.
    (source / "report.json").unlink()
    files = rewrite_report(source, results, tmp_path / "out", mlflow=_info("http://h"))
    assert PARENT in files.markdown.read_text()
