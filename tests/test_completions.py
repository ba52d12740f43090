"""Shell completions: the committed scripts are current, and real shells complete with them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_tool

ROOT = Path(__file__).resolve().parents[1]
COMPLETIONS = ROOT / "completions"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The scripts call `clipcap`: the console script installed next to this Python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module", autouse=True)
def _console_script():
    if shutil.which("clipcap", path=_env()["PATH"]) is None:
        pytest.fail("the `clipcap` console script is not installed: run pip install -e .")


def test_committed_scripts_are_current():
    result = subprocess.run(
        [sys.executable, str(COMPLETIONS / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def _bash_complete(words: str) -> list[str]:
    parts = words.split(" ")
    script = (
        f"source {COMPLETIONS / 'clipcap.bash'}\n"
        f"COMP_WORDS=({' '.join(repr(p) for p in parts)})\n"
        f"COMP_CWORD={len(parts) - 1}\n"
        "_clipcap_completion clipcap\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line]


@pytest.mark.slow
def test_bash_completes_commands_and_model_names():
    assert _bash_complete("clipcap ca") == ["caption"]
    assert set(_bash_complete("clipcap download c")) == {"coco", "conceptual", "coco-transformer"}
    assert set(_bash_complete("clipcap caption --model c")) == {"coco", "conceptual", "coco-transformer"}
    assert "--beam" in _bash_complete("clipcap caption --be")


@pytest.mark.slow
def test_fish_completes_commands_and_model_names():
    fish = need_tool("fish", why="Debian package `fish`; .ci/run installs it")
    script = f"source {COMPLETIONS / 'clipcap.fish'}; complete -C 'clipcap ca'; echo ---; complete -C 'clipcap caption --model c'"
    out = subprocess.run([fish, "-c", script], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split("---")
    assert [line.split("\t")[0] for line in first.split("\n") if line] == ["caption"]
    assert {line.split("\t")[0] for line in second.split("\n") if line} == {"coco", "conceptual", "coco-transformer"}


@pytest.mark.slow
def test_zsh_completes_commands_and_model_names():
    zsh = need_tool("zsh", why="Debian package `zsh`; .ci/run installs it")
    # compinit loads the completion system; _arguments is replaced by a printer so the candidates
    # the script hands to zsh can be read back.
    script = (
        "autoload -U compinit && compinit -u -D\n"
        f"source {COMPLETIONS / '_clipcap'}\n"
        '_arguments() { print -rl -- "$@" }\n'
        "words=(clipcap ca); CURRENT=2; _clipcap_completion\n"
        "print -- ---\n"
        "words=(clipcap caption --model c); CURRENT=4; _clipcap_completion\n"
    )
    out = subprocess.run([zsh, "-f", "-c", script], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split("---")
    assert '"caption"' in first and '"download"' not in first
    for name in ("coco", "conceptual", "coco-transformer"):
        assert f'"{name}"' in second
