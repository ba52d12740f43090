"""The console entry point, with a fast path for ``clipcap --help``.

Typer's rich help needs typer, rich and rich.markdown (about 0.4 s of imports on a small machine)
for a text that only changes when clipcap does. The first ``clipcap --help`` renders it normally
and keeps a copy under the data directory, keyed by everything the rendering depends on (version,
the command modules' timestamps, terminal or pipe, width, colour settings); later calls print that
copy without importing typer at all.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

HELP_ARGS = (["--help"], ["-h"])
# Environment that changes how rich and typer render (width, colour, terminal detection).
RENDER_ENV = (
    "COLUMNS",
    "LINES",
    "TERMINAL_WIDTH",
    "NO_COLOR",
    "FORCE_COLOR",
    "TERM",
    "COLORTERM",
    "TTY_COMPATIBLE",
    "TTY_INTERACTIVE",
    "_TYPER_FORCE_DISABLE_TERMINAL",
    "TYPER_USE_RICH",
)


def help_cache_file() -> Path | None:
    """Where the rendered help is kept; None when it cannot be (the cache is best effort)."""
    from clipcap_cli import paths
    from clipcap_cli.errors import ClipCapError
    from clipcap_cli.version import __version__

    package = Path(__file__).resolve().parent
    try:
        stamp = max(p.stat().st_mtime_ns for p in [package / "app.py", *(package / "commands").glob("*.py")])
        tty = sys.stdout.isatty()
        width = os.get_terminal_size(sys.stdout.fileno()).columns if tty else 0
    except (OSError, ValueError, AttributeError):
        return None
    env = "|".join(os.environ.get(k, "") for k in RENDER_ENV)
    key = hashlib.sha256(f"{__version__}|{stamp}|{tty}|{width}|{env}".encode()).hexdigest()[:20]
    try:
        return paths.home() / "cache" / f"help-{key}.txt"
    except (ClipCapError, OSError):
        return None


class _Tee:
    """Passes writes to the real stdout and keeps a copy; everything else (isatty, fileno) is the real one's."""

    def __init__(self, real: Any):
        self.real = real
        self.parts: list[str] = []

    def write(self, text: str | bytes) -> int:
        self.parts.append(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)
        return self.real.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def main() -> None:
    cache = help_cache_file() if sys.argv[1:] in HELP_ARGS else None
    if cache is not None and cache.is_file():
        try:
            text = cache.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = None  # unreadable: render the help again
        if text is not None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
    from clipcap_cli.cli import lean
    from clipcap_cli.cli.commands import invoked

    lean.enable(sys.argv[1:])  # this process is the clipcap command: triton stays out of a CPU run (lean.py)

    # Only the command on the line is registered (shell completion needs every command).
    only = None if "_CLIPCAP_COMPLETE" in os.environ else invoked(sys.argv[1:])
    from clipcap_cli.cli.app import main as cli_main

    def run() -> None:
        cli_main(only)

    if cache is None:
        run()
        return
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        run()
    except SystemExit as exc:
        if exc.code in (0, None) and tee.parts:
            from clipcap_cli.errors import ClipCapError
            from clipcap_cli.fsutil import write_text_atomic

            try:
                write_text_atomic(cache, "".join(tee.parts))
            except (OSError, ClipCapError):
                pass  # a read-only data directory only costs speed
        raise
    finally:
        sys.stdout = tee.real
