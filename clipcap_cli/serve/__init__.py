"""`clipcap serve`: captions over HTTP, with an OpenAI-compatible chat endpoint and dynamic batching.

``ServeOptions`` holds every server default (the CLI reads them from here). ``batcher.Batcher`` is the
one thread that owns the model: requests put their preprocessed image in its queue, and it captions
whatever arrived together as one batch. ``protocol`` turns request bodies into images and decoding
options (no web framework in it); ``app`` is the FastAPI application over both. FastAPI, uvicorn and
python-multipart come with the ``serve`` extra (``pip install 'clipcap-cli[serve]'``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from clipcap_cli.errors import ClipCapError

EXTRA_MODULES = ("fastapi", "uvicorn", "multipart")  # python-multipart installs the module ``multipart``
INSTALL_HINT = "pip install 'clipcap-cli[serve]'"


@dataclass(frozen=True)
class ServeOptions:
    """How the server batches, what it accepts, and where it listens: the single home of their defaults."""

    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8000
    api_key: str | None = None  # when set, every endpoint but /health needs "Authorization: Bearer KEY"
    max_batch: int = 16  # most images the worker captions at once
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for others to join it
    max_upload_mb: float = 20.0  # most bytes in one request body (an upload, base64 JSON) and one URL download
    max_pixels: int = 40_000_000  # most pixels (width x height) in one image, checked before it is decoded
    timeout: float = 60.0  # seconds one request may take in all (URL download, queue, captioning)
    max_length: int = 256  # most tokens a request may ask for per caption
    max_beams: int = 32  # most beams (beam_size) or captions (num_captions) a request may ask for
    urls: str = "public"  # image URLs: "public" addresses only, "any" (private and loopback too), or "off"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        """The most bytes a request body may have: base64 is 4/3 of the image, plus 64 KB for the form or JSON."""
        return self.max_upload_bytes * 4 // 3 + 65536

    def check(self) -> None:
        """Raise ``UsageError`` for values that cannot work."""
        from clipcap_cli.errors import UsageError, check_number

        if self.max_batch < 1:
            raise UsageError(f"max_batch must be at least 1, got {self.max_batch}")
        check_number("max_wait_ms", self.max_wait_ms, low=0)
        check_number("max_upload_mb", self.max_upload_mb, low=0, low_open=True)
        check_number("timeout", self.timeout, low=0, low_open=True)
        if self.max_pixels < 1:
            raise UsageError(f"max_pixels must be at least 1, got {self.max_pixels}")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port must be 0-65535, got {self.port}")
        from clipcap_cli.data.netguard import URL_POLICIES

        if self.urls not in URL_POLICIES:
            raise UsageError(f"urls must be one of {', '.join(URL_POLICIES)}, got {self.urls!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("api_key must not be empty")


class ExtraMissingError(ClipCapError):
    """The ``serve`` extra (FastAPI, uvicorn, python-multipart) is not installed."""


def require_extra() -> None:
    """Raise ``ExtraMissingError`` (one line, with the install command) unless the serve extra is importable."""
    missing = [m for m in EXTRA_MODULES if _find(m) is None]
    if missing:
        names = ", ".join("python-multipart" if m == "multipart" else m for m in missing)
        raise ExtraMissingError(f"clipcap serve needs {names}: install the serve extra with {INSTALL_HINT}")


def _find(module: str) -> object | None:
    import sys

    if module in sys.modules:
        return sys.modules[module]  # None when a test blocked it
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
