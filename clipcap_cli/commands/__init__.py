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
    ("info", "info"),
]


def register(app: typer.Typer) -> None:
    for module, name in COMMANDS:
        mod = importlib.import_module(f"clipcap_cli.commands.{module}")
        app.command(name=name, help=mod.HELP, short_help=mod.HELP.split("\n")[0], no_args_is_help=getattr(mod, "NO_ARGS_IS_HELP", False))(mod.command)
