"""A data directory that cannot be used (a file in the way, a folder under a file): --help, --version
and completion still work, and every command that needs it says so in one line naming it (exit 1)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _clipcap(home: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("clipcap", path=str(Path(sys.executable).parent))
    assert exe
    env = {**os.environ, "CLIPCAP_HOME": str(home), **(env_extra or {})}
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(params=["a file", "under a file"])
def bad_home(request, tmp_path) -> Path:
    file = tmp_path / "taken"
    file.write_text("not a folder")
    return file if request.param == "a file" else file / "sub"


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--version"], ["caption", "--help"], ["train", "--help"]])
def test_help_and_version_never_depend_on_the_data_directory(bad_home, args):
    result = _clipcap(bad_home, *args)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.strip()


@pytest.mark.slow
def test_completion_never_depends_on_the_data_directory(bad_home):
    result = _clipcap(
        bad_home,
        env_extra={"_CLIPCAP_COMPLETE": "complete_bash", "COMP_WORDS": "clipcap caption --model c", "COMP_CWORD": "3"},
    )
    assert result.returncode == 0 and result.stdout.split() == ["coco", "conceptual", "coco-transformer"]


@pytest.mark.parametrize(
    "args", [["info"], ["download", "--list"], ["download", "coco"], ["train", "PHOTOS", "--out", "RUN"]]
)
def test_commands_that_need_it_say_so_in_one_line(bad_home, tmp_path, args, monkeypatch):
    from typer.testing import CliRunner

    from clipcap_cli.cli.app import app

    monkeypatch.setenv("CLIPCAP_HOME", str(bad_home))
    photos = tmp_path / "photos"  # captioned images: their features are cached under the data directory
    photos.mkdir()
    (photos / "a.png").write_bytes(b"not decoded before the cache is needed")
    (photos / "a.txt").write_text("a caption")
    args = [str(tmp_path / "run") if a == "RUN" else str(photos) if a == "PHOTOS" else a for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    [line] = result.stderr.strip().splitlines()
    assert f"data directory {bad_home} is not usable" in line and "CLIPCAP_HOME" in line
