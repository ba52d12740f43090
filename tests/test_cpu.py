"""Knowing the CPU (cpu.py): torch's report, native bf16 from the flags, the test override, and `clipcap info`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from clipcap_cli import cpu
from clipcap_cli.cli.app import app


@pytest.fixture
def detect_fresh(monkeypatch):
    """No override, and a detection run afresh (it is cached per process)."""
    monkeypatch.delenv(cpu.ENV, raising=False)
    cpu._detected.cache_clear()
    yield
    cpu._detected.cache_clear()


@pytest.mark.parametrize(
    "text, isa, bf16",
    [
        ("AVX2", "AVX2", False),
        ("avx512", "AVX512", False),
        ("AVX512+bf16", "AVX512", True),
        ("AMX + BF16", "AMX", True),
    ],
)
def test_override_parses(monkeypatch, text, isa, bf16):
    monkeypatch.setenv(cpu.ENV, text)
    assert cpu.capability() == cpu.CpuCapability(isa, bf16, cpu.ENV)


def test_detection_reports_torchs_isa(detect_fresh):
    found = cpu.capability()
    assert found.isa == str(torch.backends.cpu.get_cpu_capability())
    assert found.source in ("torch", "/proc/cpuinfo", "unknown")


@pytest.mark.parametrize(
    "flags, bf16", [("fpu avx2 fma", False), ("avx2 avx512f avx512_vnni", False), ("avx512f avx512_bf16", True)]
)
def test_linux_flags_decide_without_torchs_helpers(detect_fresh, monkeypatch, tmp_path, flags, bf16):
    """A torch without the cpuinfo helpers: /proc/cpuinfo's flags decide (AVX512 alone is not bf16)."""
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(cpu, "CPUINFO", info)
    monkeypatch.setattr(cpu.sys, "platform", "linux")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert cpu.capability().native_bf16 is bf16 and cpu.capability().source == str(info)


def test_other_systems_without_helpers_are_conservative(detect_fresh, monkeypatch):
    monkeypatch.setattr(cpu.sys, "platform", "win32")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert cpu.capability().native_bf16 is False and cpu.capability().source == "unknown"


def test_info_shows_the_capability(monkeypatch):
    runner = CliRunner()
    monkeypatch.setenv(cpu.ENV, "AVX2")
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["cpu"] == {"isa": "AVX2", "native_bf16": False, "source": cpu.ENV}
    monkeypatch.setenv(cpu.ENV, "AVX512+bf16")
    assert json.loads(runner.invoke(app, ["info", "--json"]).stdout)["cpu"]["native_bf16"] is True


def test_describe_names_the_cpu_and_a_faked_capability(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "AVX2")
    line = cpu.describe()
    assert line.startswith(cpu.cpu_name()) and "AVX2, no native bf16" in line and cpu.ENV in line
    assert cpu.report() == {"name": cpu.cpu_name(), "isa": "AVX2", "native_bf16": False, "source": cpu.ENV}


def test_every_benchmark_prints_the_cpu_capability():
    """Each speed benchmark reports the CPU's capability beside its numbers (issue 24)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    scripts = [*folder.glob("bench_*.py"), folder / "streaming.py", folder / "device_check.py"]
    assert len(scripts) >= 10
    silent = [p.name for p in scripts if not any(s in p.read_text() for s in ("describe()", "capability()"))]
    assert not silent, f"benchmarks that do not print the CPU's capability: {silent}"
