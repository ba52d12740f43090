"""The failures of a download (``clipcap_cli.weights.download``): each a ``DownloadError`` with a one-line message."""

from __future__ import annotations

from clipcap_cli.errors import ClipCapError

__all__ = [
    "BadContentError",
    "ChecksumError",
    "DownloadError",
    "HTTPStatusError",
    "LockTimeoutError",
    "NotEnoughSpaceError",
    "OfflineError",
    "TooSlowError",
    "TransferError",
]


class DownloadError(ClipCapError):
    """Base class for download failures; the message is one readable line."""


class OfflineError(DownloadError):
    """Offline mode is on and the file is not cached."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the expected size or sha256."""


class NotEnoughSpaceError(DownloadError):
    """The destination filesystem cannot hold the file."""


class LockTimeoutError(DownloadError):
    """Another process kept downloading the same file for longer than we would wait."""


class TooSlowError(DownloadError):
    """The server sends, but too slowly to finish in any reasonable time (``download_http.MIN_RATE``)."""


class HTTPStatusError(DownloadError):
    """A URL answered with a permanent HTTP error (4xx other than 408/429)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BadContentError(DownloadError):
    """A URL served something that is not the file (an HTML page we cannot follow)."""


class TransferError(DownloadError):
    """Network failures (timeouts, dropped connections, 5xx) outlasted the retries."""
