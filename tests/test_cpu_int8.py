"""cpu_int8: CPU flags, the kernel probe that decides exactness, and the exact U8U8 re-encoding."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from qatflow.errors import RuntimeBackendError
from qatflow.onnx.encoding import encode_weights
from qatflow.onnx.reference import run_reference
from qatflow.runtimes import cpu_int8, cpuid
from qatflow.runtimes.cpu_int8 import CpuInt8, choose_encoding, detect, probe_model

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512bw avx512_vnni amx_int8\n\n"


def test_flags_come_from_cpuid_where_it_runs(tmp_path: Path) -> None:
    """CPUID, not the host's /proc/cpuinfo: the answer ONNX Runtime picks its kernels from."""
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    from_cpuid = cpuid.read_flags()
    assert from_cpuid is not None  # x86-64 Linux: the instruction runs
    assert "avx2" in from_cpuid  # every CPU this project supports
    assert cpu_int8.cpu_flags(tmp_path / "cpuinfo") == from_cpuid
    listed = Path("/proc/cpuinfo").read_text()
    assert ("avx512_vnni" in from_cpuid) == (" avx512_vnni" in listed)  # natively the same


def test_cpuinfo_is_the_fallback_where_cpuid_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    monkeypatch.setattr(cpuid, "read_flags", lambda: None)
    assert cpu_int8.cpu_flags(tmp_path / "cpuinfo") == (
        "amx_int8",
        "avx512_vnni",
        "avx512bw",
        "avx2",
    )
    assert cpu_int8.cpu_flags(tmp_path / "missing") == ()


def test_an_emulated_cpu_reports_its_own_flags_not_the_hosts() -> None:
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-user is needed: `make setup` installs it"
    code = "from qatflow.runtimes.cpu_int8 import cpu_flags; print(','.join(cpu_flags()))"
    done = subprocess.run(
        [qemu, "-cpu", "Haswell", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert done.stdout.split() == ["avx2"]


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
    """uint8 weights with zero-point 128 wherever activations reach 255; the probe's ops on
    7-bit activations (after a Clip to 127) keep int8 weights, as U8S8 cannot saturate there."""
    original = probe_model("u8s8")
    encoded = onnx.ModelProto()
    encoded.CopyFrom(original)
    assert encode_weights(encoded, "u8u8") == 4
    assert encode_weights(onnx.ModelProto(), "u8s8") == 0
    onnx.checker.check_model(encoded)
    weights = [n.output[0] for n in original.graph.node if n.input[0].endswith("_wq")]
    inits = {i.name: i for i in encoded.graph.initializer}
    kept = set()
    for node in encoded.graph.node:
        if node.output[0] in weights:
            values = onnx.numpy_helper.to_array(inits[node.input[0]])
            if values.dtype == np.int8:
                kept.add(node.input[0])
                continue
            assert values.dtype == np.uint8
            assert np.all(onnx.numpy_helper.to_array(inits[node.input[2]]) == 128)
    assert kept == {f"{op}_narrow_wq" for op in ("conv8", "conv3", "matmul", "gemm")}
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
