"""Regenerate the shell completion scripts in this folder from the Typer app.

    python completions/generate.py          # rewrite clipcap.bash, _clipcap (zsh), clipcap.fish
    python completions/generate.py --check  # exit 1 if a committed script is stale

The scripts are thin: they call `clipcap` itself to compute completions, so commands, options
and model names always come from the installed version.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = {"bash": "clipcap.bash", "zsh": "_clipcap", "fish": "clipcap.fish"}


def scripts() -> dict[str, str]:
    from typer._completion_shared import get_completion_script

    return {
        FILES[shell]: get_completion_script(prog_name="clipcap", complete_var="_CLIPCAP_COMPLETE", shell=shell).strip()
        + "\n"
        for shell in FILES
    }


def main(argv: list[str]) -> int:
    stale = []
    for name, text in scripts().items():
        path = HERE / name
        if "--check" in argv:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale completion scripts: {', '.join(stale)}; run: python completions/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
