"""Exceptions the CLI turns into one readable line and a defined exit code.

Exit codes (the contract documented in the README and ``--help``):
0 everything worked, 1 a fatal error (nothing could run), 2 a usage error,
3 some inputs failed (batch jobs go on and report them).
"""

from __future__ import annotations

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


class ModelNotAvailableError(ClipCapError):
    """A model (weights, tokenizer, CLIP) is not cached and cannot be downloaded now."""
