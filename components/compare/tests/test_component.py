"""compare: comparison.json and the report folder, the HTML page and the summary metrics."""

import json
from pathlib import Path

import pytest
from kfp import dsl
from qatflow_components.compare.component import compare
from tests.chain import Chain, artifact

from qatflow.errors import DataError


def _compare(chain: Chain, tmp_path: Path, qat_result: Path) -> dict[str, dsl.Artifact]:
    outputs = {
        "report": artifact(dsl.Artifact, tmp_path / "report"),
        "report_html": artifact(dsl.HTML, tmp_path / "report_html"),
        "summary": artifact(dsl.Metrics, tmp_path / "summary"),
    }
    compare.python_func(
        fp32_result=artifact(dsl.Artifact, chain.results["fp32"]),
        ptq_result=artifact(dsl.Artifact, chain.results["ptq_int8"]),
        qat_result=artifact(dsl.Artifact, qat_result),
        placement=artifact(dsl.Markdown, chain.quantized / "model.placement.md"),
        dataset=artifact(dsl.Dataset, chain.dataset),
        accuracy_gate=2.5,
        model_uri="demo",
        run_name="qatflow-run",
        run_id="run-42",
        **outputs,
    )
    return outputs


def test_report(chain: Chain, tmp_path: Path) -> None:
    outputs = _compare(chain, tmp_path, chain.results["qat_int8"])
    folder = Path(outputs["report"].path)
    rows = json.loads((folder / "comparison.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == ["fp32", "ptq_int8", "qat_int8"]
    assert (folder / "report.md").is_file() and list((folder / "plots").glob("*.png"))
    html = Path(outputs["report_html"].path).read_text()
    assert "data:image/png;base64" in html and "Q/DQ placement" in html
    assert json.loads(Path(outputs["summary"].path).read_text())["rows"] == rows
    summary = outputs["summary"].metadata
    assert summary["fp32.accuracy_top1_delta_points"] == 0.0
    assert summary["qat_int8.accuracy_top1_pct"] == pytest.approx(100 * rows[2]["top1"])
    comparison = json.loads((folder / "comparison.json").read_text())
    assert comparison["gate_points"] == 2.5
    for variant in ("ptq_int8", "qat_int8"):
        passed = comparison["verdicts"][variant]["outcome"] == "passed"
        assert summary[f"{variant}.gate_passed"] == float(passed)
    markdown = (folder / "report.md").read_text()
    assert "| Model | demo |" in markdown and "| Pipeline run | qatflow-run / run-42 |" in markdown
    assert "| Dataset | data.npz (local) (npz);" in markdown
    assert str(chain.root) not in markdown and str(chain.root) not in html


def test_results_of_another_test_set_fail(chain: Chain, tmp_path: Path) -> None:
    other = json.loads(chain.results["qat_int8"].read_text())
    other["predictions"] = other["predictions"][:10]
    other["metrics"]["num_samples"] = 10
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(DataError, match="qat_int8"):
        _compare(chain, tmp_path, tmp_path / "other.json")
    assert not (tmp_path / "report" / "comparison.json").exists()
