"""The terminal side of the CLI: the two consoles, the error-to-exit-code mapping, progress bars on
stderr, and the choices shared by several commands (output format, --model completion).

Only the CLI layer imports this module; the core reports progress through callbacks and never prints.
Commands import from here, never from ``cli`` or from each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from clipcap_cli import errors

stdout = Console(soft_wrap=True)  # results
stderr = Console(stderr=True, soft_wrap=True)  # progress, warnings, errors


@dataclass(frozen=True)
class RunSettings:
    """The global options of one ``clipcap`` invocation, kept in its click context (``ctx.obj``)."""

    verbose: bool = False  # --verbose: diagnostics and tracebacks on stderr
    offline: bool = False  # --offline


def run_settings() -> RunSettings:
    """This invocation's global options (defaults outside a command, e.g. in library use)."""
    try:  # typer 0.2x carries its own copy of click; older releases use click itself
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover
        from click import get_current_context
    ctx = get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return obj if isinstance(obj, RunSettings) else RunSettings()


def debug_enabled() -> bool:
    return run_settings().verbose or os.environ.get("CLIPCAP_DEBUG", "").lower() in {"1", "true", "yes"}


def say(message: str) -> None:
    """A diagnostic line on stderr (shown only with --verbose)."""
    if debug_enabled():
        stderr.print(message, style="dim", highlight=False)


# The core's errors name fields; on the command line they read as the flags that set them.
FLAG_WORDING = (
    ("set strategy to 'sample'", "add --sample"),
    ("needs strategy 'beam' or 'sample'", "needs --beam N or --sample"),
    ("use strategy 'sample' or 'beam'", "use --sample or --beam"),
    ("num_captions", "--num-captions"),
    ("beam_size", "--beam"),
    ("top_p", "--top-p"),
    ("top_k", "--top-k"),
    ("max_length", "--max-length"),
    ("temperature", "--temperature"),
    ("stop_token", "--stop-token"),
    ("url deadline", "--url-timeout"),
    ("batch_size must", "--batch-size must"),
    ("beam_size must", "--beam must"),
    ("lr must", "--lr must"),
    ("weight-decay must", "--weight-decay must"),
    ("val-fraction must", "--val-fraction must"),
    ("metrics: unknown", "--metrics: unknown"),
    ("workers must", "--workers must"),
)


def as_flags(exc: errors.UsageError) -> errors.UsageError:
    """``exc`` with the core's field names replaced by the command line's flags."""
    import re

    text = str(exc)
    for field, flag in FLAG_WORDING:
        text = re.sub(rf"(?<![\w-]){re.escape(field)}(?![\w-])", flag, text)
    return errors.UsageError(text)


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn errors into one readable line and the documented exit code (tracebacks with --verbose)."""
    import typer

    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except errors.ClipCapError as exc:
        if debug_enabled():
            traceback.print_exc()
        message = str(as_flags(exc)) if isinstance(exc, errors.UsageError) else str(exc)
        stderr.print(f"[red]error:[/] {escape(message)}", highlight=False, markup=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("[red]interrupted[/]")
        raise typer.Exit(130) from None
    except Exception as exc:  # an unexpected failure: still one line, unless asked for details
        if debug_enabled():
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        stderr.print(
            f"[red]error:[/] {type(exc).__name__}: {escape(first)} (run with --verbose or CLIPCAP_DEBUG=1 for the traceback)",
            highlight=False,
            markup=True,
        )
        raise typer.Exit(errors.EXIT_FATAL) from None


class WarningsToStderr(logging.Handler):
    """The core reports what the user should know (an unverified download, ...) as log warnings;
    the CLI shows them as ``warning:`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        warn(record.getMessage())


def show_core_warnings() -> None:
    """Route the core's log warnings to stderr. The logger's own level is set, so that a library that
    raises the root logger's level (or disables existing loggers) cannot hide them."""
    logger = logging.getLogger("clipcap_cli")
    if not any(isinstance(h, WarningsToStderr) for h in logger.handlers):
        handler = WarningsToStderr(level=logging.WARNING)
        logger.addHandler(handler)
        logger.propagate = False
    if logger.level == logging.NOTSET or logger.level > logging.WARNING:
        logger.setLevel(logging.WARNING)
    for name, child in logging.Logger.manager.loggerDict.items():
        if name.startswith("clipcap_cli") and isinstance(child, logging.Logger):
            child.disabled = False


def complete_model(incomplete: str) -> list[str]:
    """Shell completion for --model: the registry names (files are completed by the shell)."""
    from clipcap_cli.weights.registry import names

    return [n for n in names() if n.startswith(incomplete)]


def run_rate(task: Task) -> float | None:
    """Items per second in this run: the items done since the task's clock started, beyond its
    ``base`` field (items already done then: a resumed job's), over the time since. None before
    the first item. Unlike rich's own speed, which spans only the updates it sampled, it is right
    when items arrive in bursts (a batch of captions at once)."""
    done = task.completed - task.fields.get("base", 0)
    elapsed = task.elapsed
    return done / elapsed if elapsed and done > 0 else None


class RateColumn(ProgressColumn):
    """Items per second in this run (rich only has a byte-rate column)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Any:
        from rich.text import Text

        rate = run_rate(task)
        return Text(f"{rate:.2f} {self.unit}/s" if rate else f"- {self.unit}/s", style="progress.data.speed")


class EtaColumn(ProgressColumn):
    """Time left at this run's rate (``run_rate``)."""

    def render(self, task: Task) -> Any:
        from datetime import timedelta

        from rich.text import Text

        rate = run_rate(task)
        if task.finished:
            left: float | None = 0.0
        elif rate and task.total is not None:
            left = max(task.total - task.completed, 0) / rate
        else:
            left = None
        return Text("-:--:--" if left is None else str(timedelta(seconds=int(left))), style="progress.remaining")


def item_progress(unit: str = "images", quiet: bool = False, *extra_columns: Any) -> Progress:
    """A progress bar for counted work: ``done/total``, rate in ``unit``/s and ETA, on stderr.

    The rate and ETA count from the task's start (``progress.reset`` restarts it, e.g. once a model
    has loaded) and leave out its ``base`` field, the items a resumed job had already done.
    """
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
        EtaColumn(),
        console=stderr,
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
        console=stderr,
        disable=quiet,
    )


def default_format(requested: str | None, tty_default: str = "table") -> str:
    """The output format: what the user asked for, else a table on a terminal and JSON Lines in a pipe."""
    if requested:
        return requested
    return tty_default if sys.stdout.isatty() else "jsonl"
