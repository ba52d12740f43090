"""What this CPU can do fast: torch's own report of its vector instructions, and whether it has native bf16.

bf16 on a CPU without native bf16 instructions is emulated and very slow (37x slower than fp32 on
an AVX2-only EPYC, issue 24), so ``precision.py`` only runs bf16 where ``capability().native_bf16``.
Native bf16 means the AVX512-BF16 or AMX-BF16 instructions (x86): read from torch's cpuinfo
helpers where this torch has them, else from /proc/cpuinfo's flags on Linux; anywhere else it is
False (the conservative answer: fp32 or int8 are never a trap, emulated bf16 is).

``CLIPCAP_CPU_CAPABILITY`` overrides the detection, for tests and for checking what another
machine would do: ``AVX2`` (no native bf16), ``AVX512``, ``AVX512+bf16``, ``AMX+bf16``: torch's
name, and ``+bf16`` when the CPU has native bf16.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ENV = "CLIPCAP_CPU_CAPABILITY"  # for tests: "AVX2", "AVX512+bf16", ... (see the module docstring)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of the native bf16 instructions
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuCapability:
    isa: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", "DEFAULT", "SVE256", ...
    native_bf16: bool  # AVX512-BF16 or AMX-BF16: bf16 matrix products at least as fast as fp32
    source: str  # how it was found: "torch", "/proc/cpuinfo", "unknown" or the override's name

    def __str__(self) -> str:
        return f"{self.isa}, {'native bf16' if self.native_bf16 else 'no native bf16'}"

    def as_dict(self) -> dict:
        return {"isa": self.isa, "native_bf16": self.native_bf16, "source": self.source}


def capability() -> CpuCapability:
    """This CPU's capability (detected once per process), or ``CLIPCAP_CPU_CAPABILITY``'s when set."""
    override = os.environ.get(ENV, "").strip()
    if override:
        return parse(override)
    return _detected()


def parse(text: str) -> CpuCapability:
    """``"AVX2"`` / ``"AVX512+bf16"`` (the override's form) -> a CpuCapability."""
    name, _, extra = text.partition("+")
    return CpuCapability(name.strip().upper() or "DEFAULT", extra.strip().lower() == "bf16", ENV)


@functools.cache
def _detected() -> CpuCapability:
    import torch

    isa = str(torch.backends.cpu.get_cpu_capability())
    helpers = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(h) for h in helpers):
        try:
            return CpuCapability(isa, any(bool(h()) for h in helpers), "torch")
        except RuntimeError:  # pragma: no cover - a torch build without cpuinfo
            pass
    flags = _linux_flags() if sys.platform.startswith("linux") else None
    if flags is None:
        return CpuCapability(isa, False, "unknown")
    return CpuCapability(isa, any(f in flags for f in BF16_FLAGS), str(CPUINFO))


def _linux_flags() -> set[str] | None:
    """The first CPU's flags in /proc/cpuinfo; None when unreadable."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_name() -> str:
    """The CPU's model name, for the lines that report a measured speed (Linux: /proc/cpuinfo)."""
    import platform

    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """The line every benchmark prints beside its numbers: the CPU's name and capability, e.g.
    ``AMD EPYC (torch: AVX2, no native bf16)``; a faked capability is marked as such."""
    cap = capability()
    faked = f", faked by {ENV}" if cap.source == ENV else ""
    return f"{cpu_name()} (torch: {cap}{faked})"


def report() -> dict:
    """``describe()`` for a JSON report: the CPU's name, torch's ISA, native bf16, and how it was found."""
    return {"name": cpu_name(), **capability().as_dict()}
