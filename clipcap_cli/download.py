"""Resumable, verified file downloads (the transfer layer behind ``clipcap download``).

``fetch`` tries a list of URLs in order, streams into ``<dest>.part`` with HTTP Range
resume and bounded retries, follows Google Drive's large-file confirmation page,
checks size and sha256 (the caller's, or the one a Hugging Face mirror publishes for its
LFS files), and renames atomically into place. A lock file keeps two
processes from downloading the same file at once. Nothing here prints: progress goes
to an optional callback and every failure is a ``DownloadError`` with a one-line message.
"""

from __future__ import annotations

import collections
import errno
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests

from clipcap_cli.errors import ClipCapError
from clipcap_cli.fsutil import sha256_file

try:  # flock is the clean way on POSIX; elsewhere fall back to an O_EXCL lock file.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ChecksumError",
    "DownloadError",
    "HTTPStatusError",
    "BadContentError",
    "LockTimeoutError",
    "NotEnoughSpaceError",
    "OfflineError",
    "TransferError",
    "TooSlowError",
    "Limits",
    "ProgressCallback",
    "Fetched",
    "fetch",
    "fetch_verified",
    "published_checksum",
    "sha256_file",
]

ProgressCallback = Callable[[int, "int | None"], None]
"""``progress(done_bytes, total_bytes)``; ``done`` is the size of the partial file, so it
can go back to 0 when a server forces a restart. ``total`` is None when unknown."""

CHUNK = 1 << 20
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_BACKOFF = 30.0  # seconds; cap for backoff * 2**n and for Retry-After
MAX_CONFIRM_HOPS = 3  # consecutive HTML confirmation pages followed before giving up
SPACE_MARGIN = 16 << 20  # bytes kept free on top of what the download needs
HTML_PEEK = 256 << 10  # how much of an HTML page is read to look for a confirmation
# A transfer slower than MIN_RATE bytes/s over any RATE_WINDOW seconds is given up (a 636 MB
# checkpoint would take 11 hours at 16 KB/s): the .part is kept and the next run resumes it.
MIN_RATE = 16 << 10
RATE_WINDOW = 60.0
# Hosts whose HTML answers may be a "file too large to scan" confirmation page.
DRIVE_HOSTS: frozenset[str] = frozenset({"drive.google.com", "docs.google.com", "drive.usercontent.google.com"})


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
    """The server sends, but too slowly to finish in any reasonable time (``MIN_RATE``)."""


class Limits(NamedTuple):
    """How long a transfer may wait, and how slowly it may go."""

    connect: float  # seconds to connect
    read: float  # seconds without a byte
    min_rate: float = MIN_RATE  # bytes/s, measured over ``window``
    window: float = RATE_WINDOW  # seconds


class HTTPStatusError(DownloadError):
    """A URL answered with a permanent HTTP error (4xx other than 408/429)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BadContentError(DownloadError):
    """A URL served something that is not the file (an HTML page we cannot follow)."""


class TransferError(DownloadError):
    """Network failures (timeouts, dropped connections, 5xx) outlasted the retries."""


# Failures that no other mirror can fix: stop at once instead of trying the next URL.
_FATAL = (NotEnoughSpaceError, OfflineError, LockTimeoutError)


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


# --------------------------------------------------------------------------- public API


class Fetched(NamedTuple):
    """A file ``fetch_verified`` delivered, and what vouches for its content."""

    path: Path
    sha256: str | None  # the hash it was checked against (None: nothing to check against)
    published_by: str | None  # host that published that hash (a Hugging Face mirror), else None
    url: str | None = None  # where it came from (None: it was already cached)


def fetch(urls: Sequence[str] | str, dest: Path | str, **kwargs: Any) -> Path:
    """``fetch_verified(urls, dest, ...).path``: the downloaded (or cached) file."""
    return fetch_verified(urls, dest, **kwargs).path


def fetch_verified(
    urls: Sequence[str] | str,
    dest: Path | str,
    *,
    sha256: str | None = None,
    size: int | None = None,
    timeout: float | tuple[float, float] = 30.0,
    retries: int = 5,
    backoff: float = 1.0,
    progress: ProgressCallback | None = None,
    session: requests.Session | None = None,
    force: bool = False,
    offline: bool = False,
    lock_timeout: float = 3600.0,
    min_rate: float = MIN_RATE,
    rate_window: float = RATE_WINDOW,
) -> Fetched:
    """Download the first working URL of ``urls`` to ``dest``.

    A cached ``dest`` that matches ``sha256``/``size`` is returned without any network
    access (with neither given, an existing ``dest`` is trusted); ``force`` downloads
    again anyway. A Hugging Face ``/resolve/`` URL is asked first for the sha256 it
    publishes (``published_checksum``), and the download is checked against it; when the
    caller's ``sha256`` is given too, a mirror publishing another one is refused. A hash
    published by one mirror also binds the fallbacks tried after it.
    ``timeout`` is seconds for connect and for each read, or a ``(connect, read)``
    pair; a transfer slower than ``min_rate`` bytes/s over ``rate_window`` seconds stops
    (``TooSlowError``, the partial file kept for the next run). Each URL gets ``retries`` retries after transient failures, waiting
    ``backoff * 2**n`` seconds (capped); a retry that made progress resets the count, so
    a flaky link still finishes a large file.

    Raises OfflineError, NotEnoughSpaceError, LockTimeoutError at once; otherwise the
    error of the single URL, or one summarising all of them (all DownloadError).
    """
    url_list = [urls] if isinstance(urls, str) else list(urls)
    if not url_list:
        raise ValueError("fetch() needs at least one URL")
    dest = Path(dest)
    want_sha = sha256.strip().lower() if sha256 else None

    if not force and _is_cached(dest, want_sha, size):
        return Fetched(dest, want_sha, None)
    if offline:
        raise OfflineError(f"offline: {dest.name} is not cached; download {url_list[0]} by hand and save it as {dest}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with _FileLock(dest.with_name(dest.name + ".lock"), lock_timeout) as waited:
        # Whoever held the lock may have just finished this very file: use it, even
        # with force (their download is as fresh as ours would be).
        if (not force or waited) and _is_cached(dest, want_sha, size):
            return Fetched(dest, want_sha, None)
        if size is not None:
            _check_space(dest, size - _size_of(part))

        sess = session or requests.Session()
        errors: list[tuple[str, DownloadError]] = []
        timeouts = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        limits = Limits(*timeouts[:2], min_rate, rate_window)
        vouched: str | None = None  # a mirror that published the hash: later sources must match it too
        try:
            for url in url_list:
                try:
                    url_sha, url_size, publisher = _expected_for(sess, url, dest, want_sha, size, timeouts)
                    if publisher is not None:
                        want_sha, vouched = url_sha, publisher
                    _fetch_one(sess, url, part, dest, url_sha, url_size, limits, retries, backoff, progress)
                    return Fetched(dest, url_sha, publisher or vouched, url)
                except _FATAL:
                    raise
                except DownloadError as exc:  # permanent for this URL: try the next one
                    errors.append((url, exc))
        finally:
            if session is None:
                sess.close()
    raise _combine(errors, dest)


def _expected_for(
    sess: requests.Session,
    url: str,
    dest: Path,
    sha256: str | None,
    size: int | None,
    timeouts: tuple[float, float],
) -> tuple[str | None, int | None, str | None]:
    """(sha256, size, publisher) to check ``url``'s download against: the caller's, or what a
    Hugging Face mirror publishes; a mirror that publishes another hash than the caller's is refused."""
    published_sha, published_size = published_checksum(sess, url, timeouts)
    if published_sha is None:
        return sha256, size, None
    if sha256 is not None and published_sha != sha256:
        raise ChecksumError(f"{_host(url)} publishes sha256 {published_sha} for {dest.name}, not the verified {sha256}")
    return published_sha, size if size is not None else published_size, _host(url)


def published_checksum(
    sess: requests.Session, url: str, timeouts: tuple[float, float] = (10.0, 10.0)
) -> tuple[str | None, int | None]:
    """The (sha256, size) a Hugging Face ``/resolve/`` URL publishes for an LFS file, or (None, None).

    The hub answers a HEAD on ``.../resolve/REV/FILE`` with a redirect whose ``X-Linked-Etag``
    header is the file's sha256 and ``X-Linked-Size`` its size. Any failure here only means no
    published hash: the download itself decides whether the URL works.
    """
    if "/resolve/" not in urlsplit(url).path:
        return None, None
    try:
        resp = sess.head(
            url,
            allow_redirects=False,
            timeout=timeouts,
            headers={"User-Agent": _user_agent(), "Accept-Encoding": "identity"},
        )
    except requests.RequestException:
        return None, None
    with resp:
        etag = resp.headers.get("X-Linked-Etag", "").strip().removeprefix("W/").strip('"').lower()
        linked_size = _int_or_none(resp.headers.get("X-Linked-Size"))
    return (etag, linked_size) if SHA256_HEX.match(etag) else (None, None)


# --------------------------------------------------------------------------- one URL


def _fetch_one(
    sess: requests.Session,
    url: str,
    part: Path,
    dest: Path,
    sha256: str | None,
    size: int | None,
    timeout: float | tuple[float, float],
    retries: int,
    backoff: float,
    progress: ProgressCallback | None,
) -> None:
    """Download ``url`` into ``part``, verify it and move it to ``dest``."""
    # A .part left by an earlier run (or another mirror) may belong to a different
    # version of the file; if the resumed result fails verification, start over once.
    may_restart = _size_of(part) > 0
    while True:
        _download_to_part(sess, url, part, dest, size, timeout, retries, backoff, progress)
        try:
            _finalize(part, dest, sha256, size)
            return
        except ChecksumError:
            if not may_restart:
                raise
            may_restart = False  # _finalize already deleted the bad .part


def _download_to_part(
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
    best = _size_of(part)
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
                raise BadContentError(f"{_host(url)}: too many confirmation pages, no file") from None
            current = follow.url
            continue
        except _Retry as exc:
            hops = 0
            now = _size_of(part)
            if now > best:  # progress: a flaky link should not use up the retries
                best, failures = now, 0
            failures += 1
            if failures > retries or attempts >= max_attempts:
                raise TransferError(
                    f"{_host(url)}: giving up on {dest.name} after {attempts} attempt(s): {exc}"
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
    offset = _size_of(part)
    if size is not None and offset > size:  # cannot be our file: start over
        part.unlink()
        offset = 0
    headers = {
        "User-Agent": _user_agent(),
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
        if _looks_like_html(resp, first if offset == 0 or resp.status_code == 200 else b""):
            _handle_html(sess, resp, url, first)  # raises _Follow or BadContentError
        offset, total = _body_range(resp, url, part, offset)
        if size is not None and total is not None and total != size:
            raise ChecksumError(f"{dest.name}: {_host(url)} serves {total} bytes, expected {size}")
        if size is None and total is not None:
            _check_space(dest, total - offset)
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
        raise HTTPStatusError(f"{_host(url)}: HTTP {status} {resp.reason or ''}".strip(), status)
    return False


def _body_range(resp: requests.Response, url: str, part: Path, offset: int) -> tuple[int, int | None]:
    """(where the body starts in the file, the file's total size if the server says)."""
    if resp.status_code == 206:
        start, total = _parse_content_range(resp.headers.get("Content-Range", ""))
        if start != offset:  # not the bytes we asked for: start over cleanly
            part.unlink(missing_ok=True)
            raise _Retry(f"bad Content-Range from {_host(url)}; restarting", delay=0.0)
        return offset, total
    # A 200 to a Range request is the whole file: restart from zero.
    return 0, _int_or_none(resp.headers.get("Content-Length"))


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
                    raise ChecksumError(f"{dest.name}: {_host(url)} sent more than the expected {size} bytes")
                _report(progress, done, total)
                rate = pace.too_slow(done)
                if rate is not None:
                    raise TooSlowError(
                        f"{_host(url)}: transfer too slow ({rate / 1024:.1f} KB/s over the last {pace.window:g} s, "
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


def _finalize(part: Path, dest: Path, sha256: str | None, size: int | None) -> None:
    """Verify ``part`` and atomically move it to ``dest``; delete it when bad."""
    got_size = _size_of(part)
    if size is not None and got_size != size:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{dest.name}: size mismatch: expected {size} bytes, got {got_size}")
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{dest.name}: sha256 mismatch: expected {sha256}, got {got}")
    # fsync before rename so a crash never leaves a renamed-but-empty model file.
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    _fsync_dir(dest.parent)


# --------------------------------------------------------------------------- HTML pages


class _PageParser(HTMLParser):
    """Collects forms (action + inputs), links and the title of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self.title = ""
        self._in_form = False
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), {}))
            self._in_form = True
        elif tag == "input" and self._in_form and a.get("name"):
            self.forms[-1][1][a["name"]] = a.get("value", "")
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def _looks_like_html(resp: requests.Response, first: bytes) -> bool:
    ctype = resp.headers.get("Content-Type", "").lower()
    if ctype.startswith(("text/html", "application/xhtml")):
        return True
    # Some servers label error pages application/octet-stream; sniff the start too.
    head = first[:64].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def _handle_html(sess: requests.Session, resp: requests.Response, url: str, first: bytes) -> None:
    """Follow a Drive confirmation page (raise _Follow) or refuse the page."""
    text = first[:HTML_PEEK].decode(resp.encoding or "utf-8", errors="replace")
    if _host(resp.url) in DRIVE_HOSTS or _host(url) in DRIVE_HOSTS:
        target = _drive_confirm_url(text, resp.url or url, url, sess)
        if target:
            raise _Follow(target)
    parser = _PageParser()
    parser.feed(text)
    title = " ".join(parser.title.split())[:80]
    hint = f" ({title!r})" if title else ""
    raise BadContentError(
        f"{_host(url)} returned an HTML page instead of the file{hint}; the link may be dead or over its download quota"
    )


def _drive_confirm_url(text: str, page_url: str, orig_url: str, sess: requests.Session) -> str | None:
    """The URL that confirms a Google Drive "can't scan for viruses" page, if any."""
    parser = _PageParser()
    parser.feed(text)
    # drive.usercontent.google.com: <form action=...> with hidden id/confirm/uuid.
    # Its method is GET; a POST form accepts the same fields as a query string.
    for action, fields in parser.forms:
        if "confirm" in fields or "id" in fields:
            return _with_query(urljoin(page_url, action or page_url), fields, replace=True)
    # Older pages: a link carrying confirm=TOKEN (HTMLParser already unescaped &amp;).
    for href in parser.links:
        if "confirm=" in href:
            return urljoin(page_url, href)
    if m := re.search(r"confirm=([0-9A-Za-z_-]+)", text):
        return _with_query(orig_url, {"confirm": m.group(1)})
    # Oldest scheme: the token only in a download_warning cookie.
    for cookie in sess.cookies:
        if cookie.name.startswith("download_warning"):
            return _with_query(orig_url, {"confirm": cookie.value or ""})
    return None


def _with_query(url: str, params: dict[str, str], replace: bool = False) -> str:
    parts = urlsplit(url)
    query = {} if replace else dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


# --------------------------------------------------------------------------- helpers


class _FileLock:
    """Exclusive lock on ``path``, polled until ``timeout``; ``__enter__`` returns
    whether we had to wait (i.e. someone else was downloading)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.fd: int | None = None

    def __enter__(self) -> bool:
        deadline = time.monotonic() + self.timeout
        waited = False
        while True:
            if self._try_acquire():
                return waited
            waited = True
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"another process{self._holder()} is still downloading to "
                    f"{self.path.with_suffix('')} after {self.timeout:g}s; "
                    f"if it is gone, delete {self.path}"
                )
            time.sleep(0.05)

    def _try_acquire(self) -> bool:
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
        else:  # pragma: no cover - no flock: the file's existence is the lock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def __exit__(self, *exc: object) -> None:
        if self.fd is None:
            return
        if fcntl is None:  # pragma: no cover
            self.path.unlink(missing_ok=True)
        else:
            # The lock file stays: unlinking a flock'ed file races with waiters.
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _is_cached(dest: Path, sha256: str | None, size: int | None) -> bool:
    if not dest.is_file():
        return False
    if size is not None and dest.stat().st_size != size:
        return False
    return sha256 is None or sha256_file(dest) == sha256


def _check_space(dest: Path, needed: int) -> None:
    if needed <= 0:
        return
    free = shutil.disk_usage(dest.parent).free
    if free < needed + SPACE_MARGIN:
        raise NotEnoughSpaceError(
            f"not enough disk space for {dest.name} in {dest.parent}: need "
            f"{_mib(needed)} (+{_mib(SPACE_MARGIN)} margin), {_mib(free)} free"
        )


def _combine(errors: list[tuple[str, DownloadError]], dest: Path) -> DownloadError:
    """One exception for all failed URLs; keeps the class when they all agree."""
    if len(errors) == 1:
        return errors[0][1]
    kinds = {type(e) for _, e in errors}
    cls = kinds.pop() if len(kinds) == 1 else DownloadError
    detail = "; ".join(str(e) for _, e in errors)
    return cls(f"all {len(errors)} sources failed for {dest.name}: {detail}")


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


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _report(progress: ProgressCallback | None, done: int, total: int | None) -> None:
    if progress is not None:
        progress(done, total)


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _host(url: str) -> str:
    return urlsplit(url).hostname or url


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _fsync_dir(path: Path) -> None:
    """Persist the rename itself (POSIX); harmless to skip where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _user_agent() -> str:
    try:
        from clipcap_cli.version import __version__ as version
    except Exception:  # version module missing or broken: still download
        version = "dev"
    return f"clipcap-cli/{version}"
