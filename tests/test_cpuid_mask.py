"""bench/cpuid_mask.c: CPUID masked to an AVX2 (or AVX-512 without VNNI) CPU, or a refusal.

Where the kernel offers CPUID faulting (Intel CPUs with ``cpuid_fault``), a process under the
library sees the masked flags and ONNX Runtime picks its kernels from them: the probe then finds
U8S8 inexact, as on a real AVX2 CPU. Elsewhere (AMD hosts, most VMs, CI) the library refuses
to run anything, with status 3 and the reason, so that no benchmark is labelled with a mask
that did not apply.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "bench" / "cpuid_mask.c"
FLAGS = "from qatflow.runtimes.cpu_int8 import cpu_flags, detect; import json; " + (
    "print(json.dumps({'flags': cpu_flags(), 'exact': detect().exact}))"
)


def _has_cpuid_faulting() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    arch_prctl, get_cpuid, set_cpuid = 158, 0x1011, 0x1012
    # Setting the current state again succeeds exactly where faulting is supported, and
    # changes nothing (this process may itself run under the mask).
    current = libc.syscall(arch_prctl, get_cpuid, 0)
    return libc.syscall(arch_prctl, set_cpuid, current) == 0


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cpuid_mask") / "cpuid_mask.so"
    done = subprocess.run(
        ["cc", "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-o", out, SOURCE],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return out


def _run(library: Path, profile: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CPUID_MASK"}
    env["LD_PRELOAD"] = str(library)
    if profile is not None:
        env["CPUID_MASK"] = profile
    return subprocess.run(
        # faulthandler installs its own SIGSEGV handler, as pytest does: the library keeps its own.
        [sys.executable, "-X", "faulthandler", "-c", FLAGS],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("profile", [None, "avx9"])
def test_a_missing_or_unknown_profile_runs_nothing(library: Path, profile: str | None) -> None:
    done = _run(library, profile)
    assert done.returncode == 3 and done.stdout == ""
    assert "CPUID_MASK" in done.stderr and "nothing was run" in done.stderr


@pytest.mark.parametrize("profile", ["avx2", "avx512"])
def test_masked_cpuid_or_a_refusal_that_says_why(library: Path, profile: str) -> None:
    done = _run(library, profile)
    if not _has_cpuid_faulting():
        assert done.returncode == 3 and done.stdout == ""
        assert "no CPUID faulting" in done.stderr and "nothing was run" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(seen["flags"])
    assert ("avx512bw" in seen["flags"]) == (profile == "avx512")
    assert seen["exact"] == ["u8u8"]  # U8S8 saturates on the kernels ORT now picks
