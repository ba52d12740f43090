"""The ``clipcap`` command line: a Typer app over the model core.

Results go to stdout, everything else (progress, warnings, errors) to stderr. Heavy imports
(torch, transformers, open_clip) happen inside commands, so ``clipcap --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from clipcap_cli.ui import State, show_core_warnings, stdout
from clipcap_cli.version import __version__

app = typer.Typer(
    name="clipcap",
    help=(
        "Caption images with ClipCap (CLIP prefix + GPT-2): download, extract, train, caption, eval, inspect.\n\n"
        "Exit codes: 0 success, 1 fatal error, 2 usage error, 3 some inputs failed.\n\n"
        "Example: [bold]clipcap caption photos/*.jpg --beam 5 | jq .caption[/]"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=True,
)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"clipcap {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def root(
    version: Optional[bool] = typer.Option(
        None, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Diagnostics (device, files) and tracebacks on stderr."),
    offline: bool = typer.Option(
        False, "--offline", envvar="CLIPCAP_OFFLINE", help="Never use the network; fail at once if a model is missing."
    ),
) -> None:
    """Global options (before the command name)."""
    State.verbose = verbose
    show_core_warnings()
    if offline:
        os.environ["CLIPCAP_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"


from clipcap_cli.commands import register  # noqa: E402  (commands need `app` above)

register(app)


def main() -> None:
    app(prog_name="clipcap")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
