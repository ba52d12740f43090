"""Start-up: a command imports only its own code, and the start-up benchmark runs (its timing is
measured by benchmarks/bench_startup.py, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imported(*argv: str) -> set[str]:
    code = (
        "import sys; sys.argv = ['clipcap', *sys.argv[1:]]\n"
        "from clipcap_cli import entry\n"
        "try:\n    entry.main()\nexcept SystemExit:\n    pass\n"
        "print(' '.join(m for m in sys.modules if m.startswith('clipcap_cli')), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    return set(result.stderr.strip().splitlines()[-1].split())


def test_a_command_imports_only_its_own_code():
    modules = _imported("caption", "--help")
    assert "clipcap_cli.commands.caption" in modules
    assert not {"clipcap_cli.train", "clipcap_cli.evaluation", "clipcap_cli.commands.train",
                "clipcap_cli.commands.eval", "clipcap_cli.metrics"} & modules
    # Without a command on the line (help, a typo to suggest against), every command is there.
    assert {"clipcap_cli.commands.train", "clipcap_cli.commands.eval"} <= _imported("captoin")


@pytest.mark.slow
def test_startup_benchmark_quick_run(planted: Path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_startup.py"), "--quick", "--json", "--home", str(planted)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["caption_s"] > 0 and report["bare_imports_s"] > 0 and report["ratio"] > 0
    assert report["record"]["error"] is None and report["record"]["caption"]
    assert 0 < report["peak_rss_gb"]["ours"] < 8
