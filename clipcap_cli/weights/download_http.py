"""One URL's transfer into ``<dest>.part``: HTTP Range resume, bounded retries with backoff, and guards.

The guards: a read timeout, a minimum rate over a window (a trickling server is given up, the ``.part`` kept for
the next run), a ceiling on requests, the free disk space, and a body that must be the file (an HTML page is
followed when it confirms a Google Drive download, see ``download_hosts``). Verifying and publishing the finished
``.part`` is ``download``'s work.
"""

from __future__ import annotations

import collections
import errno
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import requests

from clipcap_cli.weights.download_errors import (
    BadContentError,
    ChecksumError,
    DownloadError,
    HTTPStatusError,
    NotEnoughSpaceError,
    TooSlowError,
    TransferError,
)
from clipcap_cli.weights.download_hosts import confirmation_target, host, int_or_none, looks_like_html, user_agent

ProgressCallback = Callable[[int, "int | None"], None]
"""``progress(done_bytes, total_bytes)``; ``done`` is the size of the partial file, so it
can go back to 0 when a server forces a restart. ``total`` is None when unknown."""

CHUNK = 1 << 20
MAX_BACKOFF = 30.0  # seconds; cap for backoff * 2**n and for Retry-After
MAX_CONFIRM_HOPS = 3  # consecutive HTML confirmation pages followed before giving up
SPACE_MARGIN = 16 << 20  # bytes kept free on top of what the download needs
# A transfer slower than MIN_RATE bytes/s over any RATE_WINDOW seconds is given up (a 636 MB
# checkpoint would take 11 hours at 16 KB/s): the .part is kept and the next run resumes it.
MIN_RATE = 16 << 10
RATE_WINDOW = 60.0


class Limits(NamedTuple):
    """How long a transfer may wait, and how slowly it may go."""

    connect: float  # seconds to connect
    read: float  # seconds without a byte
    min_rate: float = MIN_RATE  # bytes/s, measured over ``window``
    window: float = RATE_WINDOW  # seconds


class _Retry(Exception):
    """Internal: a transient failure; retry the same URL after a delay."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay  # None: use the exponential backoff


class _Follow(Exception):
    """Internal: a confirmation page pointed at the real download URL."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


def download_to_part(
    sess: requests.Session,
    url: str,
    part: Path,
    dest: Path,
    size: int | None,
    timeout: float | tuple[float, float],
    retries: int,
    backoff: float,
    progress: ProgressCallback | None,
) -> None:
    """Retry loop: return once ``part`` holds the complete body of ``url``."""
    timeouts = (
        timeout
        if isinstance(timeout, Limits)
        else Limits(*(timeout if isinstance(timeout, tuple) else (timeout, timeout)))
    )
    failures = 0  # consecutive attempts without progress
    hops = 0  # consecutive confirmation pages
    attempts = 0
    best = size_of(part)
    # Hard ceiling on requests to one URL, whatever the server does.
    max_attempts = (retries + 1) * 50 + MAX_CONFIRM_HOPS
    current = url
    while True:
        attempts += 1
        try:
            _request_once(sess, current, part, dest, size, timeouts, progress)
            return
        except _Follow as follow:
            hops += 1
            if hops > MAX_CONFIRM_HOPS:
                raise BadContentError(f"{host(url)}: too many confirmation pages, no file") from None
            current = follow.url
            continue
        except _Retry as exc:
            hops = 0
            now = size_of(part)
            if now > best:  # progress: a flaky link should not use up the retries
                best, failures = now, 0
            failures += 1
            if failures > retries or attempts >= max_attempts:
                raise TransferError(
                    f"{host(url)}: giving up on {dest.name} after {attempts} attempt(s): {exc}"
                ) from None
            delay = exc.delay
            if delay is None:
                delay = backoff * 2 ** (failures - 1)
            time.sleep(min(max(delay, 0.0), MAX_BACKOFF))


def _request_once(
    sess: requests.Session,
    url: str,
    part: Path,
    dest: Path,
    size: int | None,
    timeouts: Limits,
    progress: ProgressCallback | None,
) -> None:
    """One GET, appended to ``part``. Raises _Retry, _Follow or a DownloadError."""
    offset = size_of(part)
    if size is not None and offset > size:  # cannot be our file: start over
        part.unlink()
        offset = 0
    headers = {
        "User-Agent": user_agent(),
        # Compressed transfer would make byte offsets (Range) and lengths meaningless.
        "Accept-Encoding": "identity",
    }
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = sess.get(url, headers=headers, stream=True, timeout=(timeouts.connect, timeouts.read))
    except requests.RequestException as exc:
        raise _Retry(_describe(exc, timeouts)) from None

    with resp:
        if _check_status(resp, url, part, offset, progress):
            return  # the .part was already whole
        chunks = _body_chunks(resp)
        first = _next_chunk(chunks, timeouts)
        if looks_like_html(resp, first if offset == 0 or resp.status_code == 200 else b""):
            raise _Follow(confirmation_target(sess, resp, url, first))  # or BadContentError
        offset, total = _body_range(resp, url, part, offset)
        if size is not None and total is not None and total != size:
            raise ChecksumError(f"{dest.name}: {host(url)} serves {total} bytes, expected {size}")
        if size is None and total is not None:
            check_space(dest, total - offset)
        done = _append_body(first, chunks, part, offset, total, url, dest, size, timeouts, progress)

    expected = total if total is not None else size
    if expected is not None and done < expected:
        raise _Retry(f"connection closed after {done} of {expected} bytes")


def _check_status(
    resp: requests.Response, url: str, part: Path, offset: int, progress: ProgressCallback | None
) -> bool:
    """True when a 416 says the .part is already complete; raises _Retry or HTTPStatusError for
    statuses that bring no body to append."""
    status = resp.status_code
    if status == 416 and offset:
        # Range not satisfiable: either the .part is already complete, or it is
        # longer than the file (stale); then start from zero right away.
        total = _parse_content_range(resp.headers.get("Content-Range", ""))[1]
        if total == offset:
            _report(progress, offset, total)
            return True
        part.unlink(missing_ok=True)
        raise _Retry("server rejected the resume offset; restarting", delay=0.0)
    if status in (408, 429) or status >= 500:
        raise _Retry(f"HTTP {status} {resp.reason or ''}".strip(), _retry_after(resp))
    if status not in (200, 206):
        raise HTTPStatusError(f"{host(url)}: HTTP {status} {resp.reason or ''}".strip(), status)
    return False


def _body_range(resp: requests.Response, url: str, part: Path, offset: int) -> tuple[int, int | None]:
    """(where the body starts in the file, the file's total size if the server says)."""
    if resp.status_code == 206:
        start, total = _parse_content_range(resp.headers.get("Content-Range", ""))
        if start != offset:  # not the bytes we asked for: start over cleanly
            part.unlink(missing_ok=True)
            raise _Retry(f"bad Content-Range from {host(url)}; restarting", delay=0.0)
        return offset, total
    # A 200 to a Range request is the whole file: restart from zero.
    return 0, int_or_none(resp.headers.get("Content-Length"))


def _append_body(
    first: bytes,
    chunks: Any,
    part: Path,
    offset: int,
    total: int | None,
    url: str,
    dest: Path,
    size: int | None,
    timeouts: Limits,
    progress: ProgressCallback | None,
) -> int:
    """Write the body (``first``, then the rest of ``chunks``) to ``part`` from ``offset``; the bytes the file then holds."""
    done = offset
    _report(progress, done, total)
    pace = _Pace(timeouts.min_rate, timeouts.window, offset)
    try:
        with open(part, "ab" if offset else "wb") as f:
            chunk = first
            while chunk:
                f.write(chunk)
                done += len(chunk)
                if size is not None and done > size:
                    f.close()
                    part.unlink(missing_ok=True)
                    raise ChecksumError(f"{dest.name}: {host(url)} sent more than the expected {size} bytes")
                _report(progress, done, total)
                rate = pace.too_slow(done)
                if rate is not None:
                    raise TooSlowError(
                        f"{host(url)}: transfer too slow ({rate / 1024:.1f} KB/s over the last {pace.window:g} s, "
                        f"at least {pace.min_rate / 1024:g} KB/s needed); {done / 1e6:.1f} MB of {dest.name} kept in "
                        f"{part.name}: run the same command again to resume"
                    )
                chunk = _next_chunk(chunks, timeouts)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise NotEnoughSpaceError(f"disk full while writing {part} ({done} bytes written)") from None
        raise DownloadError(f"cannot write {part}: {exc.strerror or exc}") from None
    return done


class _Pace:
    """Bytes over time: whether the last ``window`` seconds brought ``min_rate`` bytes/s."""

    def __init__(self, min_rate: float, window: float, done: int):
        self.min_rate, self.window = min_rate, window
        self.start = time.monotonic()
        self.samples: collections.deque[tuple[float, int]] = collections.deque([(self.start, done)])

    def too_slow(self, done: int) -> float | None:
        """The rate (bytes/s) when it is below the minimum over a whole window, else None."""
        now = time.monotonic()
        self.samples.append((now, done))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()  # keep one sample at or before the window's start
        t0, d0 = self.samples[0]
        if now - t0 < self.window:
            return None
        rate = (done - d0) / (now - t0)
        return rate if rate < self.min_rate else None


def read_available(raw: Any, n: int) -> bytes:
    """What has arrived on ``raw`` (a urllib3 response), up to ``n`` bytes, without waiting for all
    ``n`` (b"" at the end): a slow server is measured as it sends. urllib3 errors become requests'."""
    import urllib3.exceptions

    try:
        read1 = getattr(raw, "read1", None)  # urllib3 >= 2
        return read1(n, decode_content=True) if read1 else raw.read(min(n, 1 << 14), decode_content=True)
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.exceptions.ReadTimeout(str(exc)) from exc
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError, OSError) as exc:
        raise requests.exceptions.ConnectionError(str(exc)) from exc


def _body_chunks(resp: requests.Response) -> Any:
    while chunk := read_available(resp.raw, CHUNK):
        yield chunk


def _next_chunk(chunks, timeouts: tuple[float, float]) -> bytes:
    """Next body chunk (b"" at the end); network errors become _Retry."""
    try:
        return next(chunks, b"")
    except requests.RequestException as exc:
        raise _Retry(_describe(exc, timeouts)) from None


def check_space(dest: Path, needed: int) -> None:
    if needed <= 0:
        return
    free = shutil.disk_usage(dest.parent).free
    if free < needed + SPACE_MARGIN:
        raise NotEnoughSpaceError(
            f"not enough disk space for {dest.name} in {dest.parent}: need "
            f"{_mib(needed)} (+{_mib(SPACE_MARGIN)} margin), {_mib(free)} free"
        )


def _describe(exc: requests.RequestException, timeouts: tuple[float, float]) -> str:
    """A short reason for a network error (requests' own messages are long)."""
    text = str(exc)
    if isinstance(exc, requests.ConnectTimeout):
        return f"connection timed out after {timeouts[0]:g}s"
    if isinstance(exc, requests.Timeout) or "timed out" in text.lower():
        return f"no data for {timeouts[1]:g}s (read timed out)"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection dropped mid-transfer"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed: " + _short(text)
    return _short(text)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_content_range(value: str) -> tuple[int | None, int | None]:
    """(start, total) from ``bytes START-END/TOTAL`` or ``bytes */TOTAL``."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def _report(progress: ProgressCallback | None, done: int, total: int | None) -> None:
    if progress is not None:
        progress(done, total)


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
