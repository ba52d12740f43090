"""Start-up: a command imports only its own code (the start-up benchmark itself is run by the
benchmark job, benchmarks/tests/test_scripts.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imported(*argv: str) -> set[str]:
    code = (
        "import sys; sys.argv = ['clipcap', *sys.argv[1:]]\n"
        "from clipcap_cli.cli import entry\n"
        "try:\n    entry.main()\nexcept SystemExit:\n    pass\n"
        "print(' '.join(m for m in sys.modules if m.startswith('clipcap_cli')), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    return set(result.stderr.strip().splitlines()[-1].split())


def test_a_command_imports_only_its_own_code():
    modules = _imported("caption", "--help")
    assert "clipcap_cli.cli.commands.caption" in modules
    assert (
        not {
            "clipcap_cli.train",
            "clipcap_cli.eval.evaluation",
            "clipcap_cli.cli.commands.train",
            "clipcap_cli.cli.commands.eval",
            "clipcap_cli.eval.metrics",
        }
        & modules
    )
    # Without a command on the line (help, a typo to suggest against), every command is there.
    assert {"clipcap_cli.cli.commands.train", "clipcap_cli.cli.commands.eval"} <= _imported("captoin")
