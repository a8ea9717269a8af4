"""cpu_int8: CPU flags, the kernel probe that decides exactness, and the exact U8U8 re-encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from qatflow.errors import RuntimeBackendError
from qatflow.onnx.encoding import encode_weights
from qatflow.onnx.reference import run_reference
from qatflow.runtimes import cpu_int8
from qatflow.runtimes.cpu_int8 import CpuInt8, choose_encoding, detect, probe_model

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512bw avx512_vnni amx_int8\n\n"


def test_flags_come_from_cpuinfo_where_numpy_does_not_know_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    monkeypatch.setattr(cpu_int8, "_numpy_cpu_features", dict)
    assert cpu_int8.cpu_flags(tmp_path / "cpuinfo") == (
        "amx_int8",
        "avx512_vnni",
        "avx512bw",
        "avx2",
    )


def test_numpy_cpuid_features_override_cpuinfo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under an emulator /proc/cpuinfo shows the host; CPUID (numpy) shows what runs."""
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    monkeypatch.setattr(
        cpu_int8,
        "_numpy_cpu_features",
        lambda: {"AVX2": True, "AVX512BW": False, "AVX512VNNI": False},
    )
    assert cpu_int8.cpu_flags(tmp_path / "cpuinfo") == ("amx_int8", "avx2")
    assert cpu_int8.cpu_flags(tmp_path / "missing") == ("avx2",)


@pytest.mark.parametrize(
    ("flags", "isa"),
    [
        (("avx512_vnni", "avx512bw", "avx2"), "avx512_vnni"),
        (("avx_vnni", "avx2"), "avx_vnni"),
        (("amx_int8", "avx512_vnni"), "amx_int8"),
        (("avx512bw", "avx2"), "avx512bw (no VNNI)"),
        (("avx2",), "avx2 (no VNNI)"),
        ((), "unknown"),
    ],
)
def test_isa_names(flags: tuple[str, ...], isa: str) -> None:
    assert CpuInt8(flags, ("u8u8",)).isa == isa


def test_best_encoding_prefers_exact_u8s8() -> None:
    assert CpuInt8(("avx512_vnni",), ("u8s8", "u8u8")).best_encoding() == "u8s8"
    assert CpuInt8(("avx2",), ("u8u8",)).best_encoding() == "u8u8"
    with pytest.raises(RuntimeBackendError, match="no integer encoding"):
        CpuInt8(("avx2",), ()).best_encoding()


def test_choose_encoding() -> None:
    assert choose_encoding("u8u8") == "u8u8"
    assert choose_encoding("u8s8") == "u8s8"
    assert choose_encoding("auto") == detect().best_encoding()
    with pytest.raises(RuntimeBackendError, match="encoding must be one of"):
        choose_encoding("s8s8")


def test_probe_matches_this_cpus_instruction_set() -> None:
    """U8U8 is exact everywhere; U8S8 exactly where VNNI or AMX accumulate in int32."""
    cpu = detect()
    assert "u8u8" in cpu.exact
    accumulates_in_int32 = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu.flags))
    assert ("u8s8" in cpu.exact) == accumulates_in_int32


def test_u8u8_reencoding_dequantizes_to_identical_weights() -> None:
    original = probe_model("u8s8")
    encoded = onnx.ModelProto()
    encoded.CopyFrom(original)
    assert encode_weights(encoded, "u8u8") == 4
    assert encode_weights(onnx.ModelProto(), "u8s8") == 0
    onnx.checker.check_model(encoded)
    weights = [n.output[0] for n in original.graph.node if n.input[0].endswith("_wq")]
    inits = {i.name: i for i in encoded.graph.initializer}
    for node in encoded.graph.node:
        if node.output[0] in weights:
            assert onnx.numpy_helper.to_array(inits[node.input[0]]).dtype == np.uint8
            assert np.all(onnx.numpy_helper.to_array(inits[node.input[2]]) == 128)
    feeds = {
        i.name: np.ones([d.dim_value for d in i.type.tensor_type.shape.dim], np.float32)
        for i in original.graph.input
    }
    for before, after in zip(
        run_reference(original, feeds, weights), run_reference(encoded, feeds, weights), strict=True
    ):
        assert np.array_equal(before, after)
    with pytest.raises(RuntimeBackendError, match="encoding must be one of"):
        encode_weights(encoded, "auto")  # type: ignore[arg-type]
