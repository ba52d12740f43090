"""Exceptions the CLI turns into one readable line and a defined exit code.

Exit codes (the contract documented in the README and ``--help``):
0 everything worked, 1 a fatal error (nothing could run), 2 a usage error,
3 some inputs failed (batch jobs go on and report them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


class ClipCapError(Exception):
    """Base class: the message is shown to the user as it is, on one line."""

    exit_code = EXIT_FATAL


class UsageError(ClipCapError):
    """The user asked for something that cannot work (bad option value, wrong file)."""

    exit_code = EXIT_USAGE


class CheckpointError(ClipCapError):
    """A checkpoint file is unreadable or does not fit the model it is loaded into."""


class MetricsInputError(UsageError, ValueError):
    """Bad input or arguments to the metrics API: a ValueError for library callers, a usage error
    (exit code 2, one line) for the CLI."""


class KeyMismatchError(MetricsInputError):
    """References and predictions do not cover the same keys (and ``allow_missing`` is off)."""

    def __init__(
        self, message: str, missing_predictions: Sequence[Any], unreferenced_predictions: Sequence[Any]
    ) -> None:
        super().__init__(message)
        #: Reference keys that have no prediction.
        self.missing_predictions = tuple(missing_predictions)
        #: Prediction keys that have no references.
        self.unreferenced_predictions = tuple(unreferenced_predictions)


class BackendUnavailableError(ClipCapError, RuntimeError):
    """An explicitly requested tokenizer or backend cannot run here (no Java, no pycocoevalcap)."""


class ModelNotAvailableError(ClipCapError):
    """A model (weights, tokenizer, CLIP) is not cached and cannot be downloaded now."""


def check_number(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``UsageError`` unless ``value`` is a finite number within the bounds.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``. The message names ``name``
    (the option's field) and the accepted range, e.g. "lr must be a finite number > 0, got inf".
    """
    import math

    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        where = f" {' and '.join(bounds)}" if bounds else ""
        raise UsageError(f"{name} must be a finite number{where}, got {value}")
