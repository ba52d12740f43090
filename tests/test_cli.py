import json
import subprocess
import sys
import time

from typer.testing import CliRunner

from clipcap_cli.cli import app
from clipcap_cli.version import __version__

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"clipcap {__version__}"


def test_help_lists_commands_and_exit_codes():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("download", "extract", "train", "caption", "eval"):
        assert name in result.stdout
    assert "3 some inputs failed" in result.stdout


def test_info_json():
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["clipcap"] == __version__ and info["device"] == "cpu"


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, clipcap_cli.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "clipcap_cli", "--help"], capture_output=True, check=True)
    assert time.monotonic() - start < 5  # generous bound for a loaded CI box; measured ~0.3 s
