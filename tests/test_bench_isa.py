"""bench.isa_bench: the pure helpers and the TensorFlow-free ``--from`` mode (no training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from bench import isa_bench
from bench.isa_bench import (
    FP32,
    QATFLOW,
    STATIC,
    UNGATED,
    VARIANTS,
    LatencyRow,
    exact_baseline,
    latency_table,
)
from bench.ort_int8_bench import ort_quantize_static
from onnx import TensorProto, helper, numpy_helper
from tests.int8_models import saturating_cnn

from qatflow.errors import RuntimeBackendError
from qatflow.runtimes.cpu_int8 import CpuInt8, detect
from qatflow.runtimes.fidelity import FidelityReport

ROOT = Path(__file__).resolve().parents[1]
PASSED = {
    "passed": True,
    "agreement": 1.0,
    "decided_agreement": 1.0,
    "p99_abs_error": 0.001,
    "tolerance": 0.05,
}
CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni sha_ni

processor\t: 1
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni sha_ni
"""


# ------------------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    ("exact", "baseline"),
    [
        (("u8s8", "u8u8"), STATIC["u8s8"]),
        (("u8s8",), STATIC["u8s8"]),
        (("u8u8",), STATIC["u8u8"]),
        ((), STATIC["u8u8"]),
    ],
)
def test_exact_baseline_is_u8s8_only_where_it_is_exact(exact, baseline):
    assert exact_baseline(exact) == baseline


def test_cpu_model_name_and_flags_line_read_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    assert isa_bench.cpu_model_name(cpuinfo) == "AMD EPYC 9R14 96-Core Processor"
    assert isa_bench.flags_line(cpuinfo) == "avx2 avx512_vnni avx512bw"
    assert isa_bench.flags_line(tmp_path / "missing") == "(none)"
    assert isa_bench.cpu_model_name(tmp_path / "missing") == "unknown CPU"


def test_isa_label_names_cpu_isa_and_exact_encodings():
    vnni = CpuInt8(flags=("avx512_vnni", "avx512bw", "avx2"), exact=("u8s8", "u8u8"))
    avx2 = CpuInt8(flags=("avx2",), exact=("u8u8",))
    assert isa_bench.isa_label(vnni, "AMD EPYC") == "AMD EPYC, avx512_vnni (exact: u8s8, u8u8)"
    assert isa_bench.isa_label(avx2, "Haswell") == "Haswell, avx2 (no VNNI) (exact: u8u8)"
    masked = isa_bench.isa_label(avx2, "Xeon", mask="avx2")
    assert masked == "Xeon, avx2 (no VNNI) (exact: u8u8), CPUID masked to avx2"


def test_cpuid_mask_is_read_only_under_the_preloaded_library():
    preload = {"LD_PRELOAD": "/x/bench/cpuid_mask.so", "CPUID_MASK": "avx2"}
    assert isa_bench.cpuid_mask(preload) == "avx2"
    assert isa_bench.cpuid_mask({"CPUID_MASK": "avx2"}) is None


def _rows() -> list[LatencyRow]:
    return [
        LatencyRow(FP32, 10.0, fidelity=PASSED),
        LatencyRow(QATFLOW, 3.0, "u8s8", "53/53", PASSED),
        LatencyRow(STATIC["u8s8"], 3.2, "u8s8", "53/53", {**PASSED, "passed": False}),
        LatencyRow(STATIC["u8u8"], 4.0, "u8u8", "53/53", PASSED, note="as saved"),
    ]


def _cells(table: str) -> dict[str, list[str]]:
    lines = table.splitlines()
    return {
        cells[0]: cells[1:]
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }


def test_latency_table_ratios_against_fp32_and_the_exact_baseline():
    table = latency_table(_rows(), ("u8s8", "u8u8"))
    header = table.splitlines()[0]
    assert "vs quantize_static U8S8 (exact here)" in header
    cells = _cells(table)
    assert cells[FP32][:3] == ["10.00", "1.00x", "3.12x"]
    assert cells[QATFLOW][:5] == ["3.00", "3.33x", "0.94x", "u8s8", "53/53"]
    assert cells[QATFLOW][5].startswith("pass: 100.0% agree")
    assert cells[STATIC["u8s8"]][5].startswith("**FAIL**")
    assert cells[STATIC["u8u8"]][5].endswith("(as saved)")

    # Without VNNI the exact baseline is U8U8.
    cells = _cells(latency_table(_rows(), ("u8u8",)))
    assert cells[QATFLOW][2] == "0.75x"
    assert cells[STATIC["u8u8"]][2] == "1.00x"


def test_latency_table_keeps_the_failure_text():
    rows = [
        *_rows()[:1],
        LatencyRow(QATFLOW, error="RuntimeBackendError: no engine"),
        *_rows()[2:],
    ]
    cells = _cells(latency_table(rows, ("u8s8", "u8u8")))
    assert cells[QATFLOW][:3] == ["-", "-", "-"]
    assert cells[QATFLOW][-1] == "failed: RuntimeBackendError: no engine"
    # A missing baseline leaves the ratio empty instead of failing.
    cells = _cells(latency_table([_rows()[0]], ("u8s8",)))
    assert cells[FP32][2] == "-"


def test_fidelity_table_and_error_cells():
    rows = [
        isa_bench.FidelityRow("demo", 0.8, 0.79, 0.795, 0.99, 1.0, "u8s8", PASSED, 12.0),
        isa_bench.FidelityRow("EfficientNetB0", 0.7, error="build_engine: boom | bad"),
    ]
    table = isa_bench.fidelity_table(rows, 1000)
    assert table.startswith("top-1 on 1000 Fashion-MNIST test images")
    cells = _cells(table.split("\n\n", 1)[1])
    assert cells["demo"][:7] == ["80.00%", "79.00%", "79.50%", "99.00%", "100.00%", "-", "u8s8"]
    assert cells["EfficientNetB0"][1] == "-"
    assert cells["EfficientNetB0"][-2] == "failed: build_engine: boom / bad"


def test_heldout_cell():
    assert isa_bench.heldout_cell({}) == "-"
    report = {
        "decided_agreement": 1.0,
        "decided_samples": 882,
        "beyond_tolerance": 3,
        "p99_abs_error": 0.3812,
        "tolerance": 0.5104,
    }
    assert isa_bench.heldout_cell(report) == "100.00% of 882; 3 beyond; 0.38 / 0.51"


def test_verdict_cell():
    assert isa_bench.verdict({}) == "-"
    report = {**PASSED, "passed": False, "agreement": 0.5, "decided_samples": 10}
    assert isa_bench.verdict(report) == (
        "**FAIL**: 50.0% agree, 100.0% of 10 decided, p99 0.001 (tol 0.05)"
    )
    tail = {**report, "samples": 12, "beyond_tolerance": 2, "max_beyond": 0}
    assert isa_bench.verdict(tail) == (
        "**FAIL**: 50.0% agree, 100.0% of 10 decided, 2 of 12 beyond tol (at most 0), "
        "p99 0.001 (tol 0.05)"
    )


def test_short_error_and_build_failure_gist():
    assert isa_bench.short_error(ValueError("a\n  b")) == "ValueError: a b"
    assert len(isa_bench.short_error("x" * 500, limit=50)) == 50
    report = FidelityReport(
        samples=300,
        agreement=0.5467,
        decided_samples=280,
        decided_agreement=0.561,
        proven_agreement=0.51,
        max_abs_error=0.97,
        p99_abs_error=0.94,
        output_range=1.0,
        tolerance=0.05,
        min_agreement=0.999,
        beyond_tolerance=290,
        max_beyond=0,
        data="300 samples",
        passed=False,
    )
    message = (
        "m.onnx: the ONNX Runtime engine (encoding u8s8, CPU avx2 (no VNNI)) disagrees with its "
        f"reference: {report.summary()}; first diverging tensor 'stem_q' (42.0% of its values "
        "differ by more than one step). No engine was written."
    )
    assert isa_bench.build_failure(RuntimeError(message)) == (
        "FAILED, 54.67% agree over 300, 290 beyond tol 0.05 (at most 0), p99 0.94; first "
        "diverging tensor 'stem_q' (42.0% of its values differ by more than one step)"
    )
    assert isa_bench.build_failure(RuntimeError("other")) == "RuntimeError: other"


def test_engine_encoding_names_the_rewrite_the_build_kept():
    options = {"encoding": "u8u8", "rewrite": {"relu": "exact", "requantize": "none"}}
    assert isa_bench.engine_encoding(options) == "u8u8 (exact/none)"
    assert isa_bench.engine_encoding({"encoding": None, "rewrite": None}) is None
    assert isa_bench.engine_encoding({"encoding": "u8s8"}) == "u8s8"
    constant = {"relu": "exact", "requantize": "none", "float_weights": "constant"}
    assert isa_bench.engine_encoding({"encoding": "u8s8", "rewrite": constant}) == (
        "u8s8 (exact/none+constant weights)"
    )
    partial = {
        "encoding": "u8s8",
        "rewrite": {
            "relu": "exact",
            "requantize": "none",
            "fold_affine": True,
            "integer_last": 26,
            "integer_candidates": 53,
        },
        "refused_rewrites": [
            {
                "relu": "exact",
                "requantize": "calibrated",
                "fold_affine": True,
                "decided_agreement": 0.508,
            },
            {
                "relu": "exact",
                "requantize": "none",
                "integer_last": 40,
                "integer_candidates": 53,
                "decided_agreement": 1.0,
                "beyond_tolerance": 1,
                "p99_abs_error": 0.41,
                "p99_required": 0.39,
            },
        ],
    }
    assert isa_bench.engine_encoding(partial) == (
        "u8s8 (exact/none/integer 26 of 53); refused exact/calibrated (50.8% decided), "
        "exact/none/integer 40 of 53 (100.0% decided, 1 beyond tol, p99 over the margin)"
    )


def test_compute_op_share_counts_integer_and_float_compute_nodes():
    ops = {"QLinearConv": 50, "Conv": 2, "QGemm": 1, "Transpose": 4, "QuantizeLinear": 1}
    assert isa_bench.compute_op_share(ops) == "51/53"
    assert isa_bench.compute_op_share({"Relu": 1}) == "-"


def test_interleaved_p50_takes_turns_in_blocks():
    calls: list[str] = []
    p50 = isa_bench.interleaved_p50(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=20, block=10
    )
    assert set(p50) == {"a", "b"} and all(v >= 0 for v in p50.values())
    # 2 rounds; each turn is one untimed call and a block of 10 timed ones.
    assert calls == (["a"] * 11 + ["b"] * 11) * 2


def test_to_model_range_maps_efficientnet_to_pixels():
    images = np.array([-1.0, 0.0, 1.0], np.float32)
    assert np.allclose(isa_bench.to_model_range("EfficientNetB0", images), [0, 127.5, 255])
    assert np.array_equal(isa_bench.to_model_range("ResNet50", images), images)


def test_resize_matches_fashion_images_layout():
    raw = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    out = isa_bench.resize(raw, 32, 3)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert np.array_equal(out[..., 0], out[..., 2])
    assert isa_bench.resize(raw, 28, 1).shape == (2, 28, 28, 1)


# ------------------------------------------------------------------------------ --from mode


def fp32_cnn(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """The float model behind ``saturating_cnn``: weights dequantized, activation Q/DQ dropped."""
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    w = inits["w_q"].astype(np.float32) * inits["w_scale"][:, None, None, None]
    d = inits["d_q"].astype(np.float32) * inits["d_scale"]
    nodes = [
        helper.make_node("Conv", ["x", "w", "bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "d"], ["m"]),
        helper.make_node("Add", ["m", "d_bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fp32_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(inits["bias"], "bias"),
            numpy_helper.from_array(d, "d"),
            numpy_helper.from_array(inits["d_bias"], "d_bias"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A folder as ``--save`` writes it: FP32, qatflow QDQ and a U8U8 quantize_static file of
    a tiny CNN; the U8S8 one recorded as failed."""
    root = tmp_path_factory.mktemp("saved")
    qdq = saturating_cnn()
    fp32 = fp32_cnn(qdq)
    images = np.random.default_rng(0).random((32, 8, 8, 8), dtype=np.float32)
    feeds = [{"x": images[i : i + 8]} for i in (0, 8)]
    u8u8 = ort_quantize_static(fp32, feeds, uint8_weights=True)
    u8u8.metadata_props.add(key="qatflow.source_model", value="not json")
    isa_bench.save_model_folder(
        root / "tiny",
        {FP32: fp32, QATFLOW: qdq, STATIC["u8u8"]: u8u8},
        images,
        errors={STATIC["u8s8"]: "quantize_static: boom"},
    )
    isa_bench.write_root_manifest(root, ["tiny"], size=8)
    return root


def test_saved_folder_layout(saved):
    manifest = json.loads((saved / isa_bench.MANIFEST).read_text())
    assert manifest["models"] == ["tiny"]
    assert manifest["prepared_on"] == detect().to_dict()
    info = json.loads((saved / "tiny" / isa_bench.MANIFEST).read_text())
    assert info["input_shape"] == [None, 8, 8, 8]
    assert info["errors"] == {STATIC["u8s8"]: "quantize_static: boom"}
    assert np.load(saved / "tiny" / isa_bench.CALIBRATION_FILE).shape == (32, 8, 8, 8)
    # quantize_static files are plain models: copied qatflow.* metadata is dropped.
    u8u8 = onnx.load(str(saved / "tiny" / isa_bench.VARIANT_FILES[STATIC["u8u8"]]))
    assert not [p for p in u8u8.metadata_props if p.key.startswith("qatflow.")]


def test_time_folder_builds_checks_and_times_every_saved_variant(saved, tmp_path):
    rows, _ = isa_bench.time_folder(saved / "tiny", threads=1, runs=4, work=tmp_path)
    by_name = {row.variant: row for row in rows}
    assert [row.variant for row in rows] == list(VARIANTS)
    assert by_name[STATIC["u8s8"]].error == "quantize_static: boom"
    assert by_name[STATIC["u8s8"]].p50_ms is None
    for variant in (FP32, QATFLOW, STATIC["u8u8"]):
        row = by_name[variant]
        assert row.error is None, row.error
        assert row.p50_ms is not None and row.p50_ms > 0
        assert row.fidelity["passed"], row.fidelity
    assert by_name[QATFLOW].encoding == f"{detect().best_encoding()} (exact/calibrated)"
    assert by_name[QATFLOW].integer_ops == "2/2"
    assert by_name[STATIC["u8u8"]].encoding == "u8u8"
    assert by_name[FP32].encoding is None and by_name[FP32].integer_ops == "0/2"


def test_time_folder_times_the_ungated_graph_when_no_qatflow_engine_builds(
    saved, tmp_path, monkeypatch
):
    real = isa_bench.build_with_fallback

    def fail_for_qdq(source, work, images, threads):
        if source.name == isa_bench.VARIANT_FILES[QATFLOW]:
            raise RuntimeBackendError("m.onnx: fidelity FAILED, no engine was written")
        return real(source, work, images, threads)

    monkeypatch.setattr(isa_bench, "build_with_fallback", fail_for_qdq)
    rows, _ = isa_bench.time_folder(saved / "tiny", threads=1, runs=2, work=tmp_path)
    assert [row.variant for row in rows] == [FP32, QATFLOW, UNGATED, *VARIANTS[2:]]
    qatflow, ungated = rows[1], rows[2]
    assert qatflow.p50_ms is None and "no engine was written" in qatflow.error
    assert ungated.error is None and ungated.p50_ms is not None
    assert ungated.encoding == detect().best_encoding() and ungated.integer_ops == "2/2"
    assert ungated.fidelity["passed"] and "unchecked" in ungated.note
    cells = _cells(latency_table(rows, detect().exact))
    assert cells[UNGATED][0] != "-" and cells[QATFLOW][-1].startswith("failed: ")


def test_time_folder_also_times_the_fast_rewrite_when_the_engine_is_a_fallback(
    saved, tmp_path, monkeypatch
):
    """An engine whose build refused the fast rewrite: its row is what a user gets, and the
    refused rewrite is timed beside it, labelled unchecked."""
    real = isa_bench.build_with_fallback

    def as_fallback(source, work, images, threads):
        built, note = real(source, work, images, threads)
        if source.name == isa_bench.VARIANT_FILES[QATFLOW]:
            model = onnx.load(str(built))
            entry = next(p for p in model.metadata_props if p.key == "qatflow.build_options")
            refused = [
                {
                    "relu": "exact",
                    "requantize": "calibrated",
                    "fold_affine": True,
                    "decided_agreement": 0.5,
                }
            ]
            entry.value = json.dumps({**json.loads(entry.value), "refused_rewrites": refused})
            onnx.save(model, str(built))
        return built, note

    monkeypatch.setattr(isa_bench, "build_with_fallback", as_fallback)
    rows, _ = isa_bench.time_folder(saved / "tiny", threads=1, runs=2, work=tmp_path)
    assert [row.variant for row in rows] == [FP32, QATFLOW, UNGATED, *VARIANTS[2:]]
    qatflow, ungated = rows[1], rows[2]
    assert qatflow.p50_ms is not None
    assert "refused exact/calibrated (50.0% decided)" in qatflow.encoding
    assert ungated.p50_ms is not None and ungated.note == isa_bench.REFUSED_NOTE


def test_from_mode_runs_without_tensorflow(saved):
    script = (
        "import sys\n"
        "from bench import isa_bench\n"
        f"rc = isa_bench.main(['--from', {str(saved)!r}, '--runs', '2', '--threads', '1'])\n"
        "heavy = {m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'tf2onnx'}\n"
        "print('HEAVY', sorted(heavy), 'RC', rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "HEAVY [] RC 0" in out
    assert "detect():" in out and "grep -ow" in out
    assert "tiny 8x8x8, batch 1, 1 thread, p50 of 2 calls each" in out
    assert isa_bench.isa_label(detect()) in out
    assert "| qatflow INT8 |" in out and "failed: quantize_static: boom" in out
