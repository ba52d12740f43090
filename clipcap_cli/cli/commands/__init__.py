"""One module per command; each defines ``command(...)`` and is registered here."""

from __future__ import annotations

import importlib

import typer

# (module, command name); order is the order in `clipcap --help`.
COMMANDS: list[tuple[str, str]] = [
    ("download", "download"),
    ("extract", "extract"),
    ("train", "train"),
    ("caption", "caption"),
    ("eval", "eval"),
    ("inspect", "inspect"),
    ("serve", "serve"),
    ("info", "info"),
]


def invoked(argv: list[str]) -> str | None:
    """The command ``argv`` (without the program name) runs, when it names one; global options
    (--verbose, --offline) may come first. None for help, completion or anything unusual."""
    for arg in argv:
        if arg in ("-v", "--verbose", "--offline"):
            continue
        return arg if arg in {name for _, name in COMMANDS} else None
    return None


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add the commands to ``app``; with ``only``, just that one (its module alone is imported)."""
    for module, name in COMMANDS:
        if only is not None and name != only:
            continue
        mod = importlib.import_module(f"clipcap_cli.cli.commands.{module}")
        app.command(
            name=name,
            help=mod.HELP,
            short_help=mod.HELP.split("\n")[0],
            no_args_is_help=getattr(mod, "NO_ARGS_IS_HELP", False),
        )(mod.command)
