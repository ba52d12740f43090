"""Terminal helpers shared by the commands: progress bars on stderr, output-format choice.

Only the CLI layer imports this module; the core reports progress through callbacks.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.progress import (
    ProgressColumn,
    Task,
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
    DownloadColumn,
)


class RateColumn(ProgressColumn):
    """Items per second (rich only has a byte-rate column)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Any:
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


def stderr_console() -> Any:
    from clipcap_cli.cli import stderr

    return stderr


def item_progress(unit: str = "images", quiet: bool = False, *extra_columns: Any) -> Progress:
    """A progress bar for counted work: ``done/total``, rate in ``unit``/s and ETA, on stderr."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=stderr_console(),
        disable=quiet,
        transient=False,
    )


def byte_progress(quiet: bool = False) -> Progress:
    """A progress bar for downloads: bytes, speed, ETA."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        disable=quiet,
    )


def default_format(requested: str | None, tty_default: str = "table") -> str:
    """The output format: what the user asked for, else a table on a terminal and JSON Lines in a pipe."""
    if requested:
        return requested
    return tty_default if sys.stdout.isatty() else "jsonl"
