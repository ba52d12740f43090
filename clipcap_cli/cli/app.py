"""The ``clipcap`` command line: a Typer app over the model core.

Results go to stdout, everything else (progress, warnings, errors) to stderr. Heavy imports
(torch, transformers, open_clip) happen inside commands, so ``clipcap --help`` stays fast.
``make_app(only=NAME)`` registers one command (the console entry point passes the one on the
command line, so a caption run imports no training or evaluation code); ``app`` has them all.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import typer

from clipcap_cli.cli.ui import RunSettings, show_core_warnings, stdout
from clipcap_cli.version import __version__

HELP = (
    "Caption images with ClipCap (CLIP prefix + a language model, GPT-2 by default): download, extract, train, caption, eval, inspect.\n\n"
    "Exit codes: 0 success, 1 fatal error, 2 usage error, 3 some inputs failed.\n\n"
    "Example: [bold]clipcap caption photos/*.jpg --beam 5 | jq .caption[/]"
)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"clipcap {__version__}", highlight=False)
        raise typer.Exit()


def root(
    ctx: typer.Context,
    version: Optional[bool] = typer.Option(
        None, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Diagnostics (device, files) and tracebacks on stderr."
    ),
    offline: bool = typer.Option(
        False, "--offline", envvar="CLIPCAP_OFFLINE", help="Never use the network; fail at once if a model is missing."
    ),
) -> None:
    """Global options (before the command name)."""
    ctx.obj = RunSettings(verbose=verbose, offline=offline)
    show_core_warnings()
    if offline:
        from clipcap_cli import paths

        # Every download asks the cache first and goes to the network only when paths.can_download().
        paths.set_offline(True)


def make_app(only: str | None = None) -> typer.Typer:
    """The Typer app with every command, or only the command ``only``."""
    from clipcap_cli.cli.commands import register

    app = typer.Typer(
        name="clipcap",
        help=HELP,
        no_args_is_help=True,
        rich_markup_mode="rich",
        pretty_exceptions_show_locals=False,
        context_settings={"help_option_names": ["-h", "--help"]},
        add_completion=True,
    )
    app.callback()(root)
    register(app, only=only)
    return app


def __getattr__(name: str) -> Any:
    if name == "app":  # the whole app, built on first use (tests, completions, python -m)
        globals()["app"] = built = make_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(only: str | None = None) -> None:
    make_app(only)(prog_name="clipcap")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
