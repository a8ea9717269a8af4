"""The INT8-relevant x86 features this process can execute, read with the CPUID instruction.

``/proc/cpuinfo`` describes the host. Under an emulator (qemu-user ``-cpu Haswell``) or with
CPUID masked (``bench/cpuid_mask.c``), libraries such as ONNX Runtime's MLAS pick their kernels
from what CPUID answers, so that answer is the one to record. numpy's CPUID detection covers
AVX2 and AVX-512 but not AVX-VNNI or AMX, and py-cpuinfo prefers ``/proc/cpuinfo`` on Linux,
so the two instructions are run here directly: a few bytes of machine code in an executable
anonymous mapping, called through ctypes. Where that is impossible (not x86-64, or a system
that refuses executable mappings) ``read_flags`` returns None and the caller falls back.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform

# cpuid(leaf: edi, subleaf: esi, out: rdx -> uint32[4] eax, ebx, ecx, edx); rbx is saved.
_CPUID = bytes.fromhex("53 89f8 89f1 4989d0 0fa2 418900 41895804 41894808 4189500c 5b c3")
# xgetbv(index: edi) -> rax = edx:eax
_XGETBV = bytes.fromhex("89f9 0f01d0 48c1e220 4809d0 c3")

# (flag in /proc/cpuinfo spelling, leaf-7 subleaf, register index, bit, XCR0 state it needs)
_YMM, _ZMM, _TILE = 0b110, 0b1110_0110, 0b11 << 17
_FEATURES = (
    ("amx_int8", 0, 3, 25, _TILE),
    ("avx512_vnni", 0, 2, 11, _ZMM),
    ("avx_vnni", 1, 0, 4, _YMM),
    ("avx512bw", 0, 1, 30, _ZMM),
    ("avx2", 0, 1, 5, _YMM),
)
_OSXSAVE = 1 << 27


class _Cpu:
    """The two instructions, callable; the mapping stays alive as long as the object."""

    def __init__(self) -> None:
        self._code = mmap.mmap(
            -1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
        )
        self._code.write(_CPUID + _XGETBV)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._code))
        regs = ctypes.POINTER(ctypes.c_uint32)
        cpuid_type = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, regs)
        self._cpuid = cpuid_type(base)
        self._xgetbv = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(base + len(_CPUID))

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        self._cpuid(leaf, subleaf, out)
        return out[0], out[1], out[2], out[3]

    def xcr0(self) -> int:
        return int(self._xgetbv(0))


@functools.cache
def read_flags() -> tuple[str, ...] | None:
    """The flags of ``_FEATURES`` that CPUID reports and the OS enables, or None if unreadable."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        cpu = _Cpu()
    except (OSError, ValueError):  # PermissionError is an OSError
        return None
    max_leaf = cpu.cpuid(0)[0]
    if max_leaf < 7:
        return ()
    xcr0 = cpu.xcr0() if cpu.cpuid(1)[2] & _OSXSAVE else 0
    leaves = {0: cpu.cpuid(7, 0)}
    if leaves[0][0] >= 1:
        leaves[1] = cpu.cpuid(7, 1)
    return tuple(
        flag
        for flag, sub, reg, bit, state in _FEATURES
        if sub in leaves and leaves[sub][reg] >> bit & 1 and xcr0 & state == state
    )
