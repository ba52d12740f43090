"""Resumable, verified file downloads (the transfer layer behind ``clipcap download``).

``fetch`` tries a list of URLs in order, streams into ``<dest>.part`` with HTTP Range
resume and bounded retries (``download_http``), follows Google Drive's large-file confirmation page,
checks size and sha256 (the caller's, or the one a Hugging Face mirror publishes for its
LFS files: ``download_hosts``), and renames atomically into place. A lock file keeps two
processes from downloading the same file at once. Nothing here prints: progress goes
to an optional callback and every failure is a ``DownloadError`` (``download_errors``) with a one-line message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import requests

from clipcap_cli.fsutil import publish, sha256_file
from clipcap_cli.weights.download_errors import (
    ChecksumError,
    DownloadError,
    LockTimeoutError,
    NotEnoughSpaceError,
    OfflineError,
)
from clipcap_cli.weights.download_hosts import host, published_checksum
from clipcap_cli.weights.download_http import (
    MIN_RATE,
    RATE_WINDOW,
    Limits,
    ProgressCallback,
    check_space,
    download_to_part,
    size_of,
)

try:  # flock is the clean way on POSIX; elsewhere fall back to an O_EXCL lock file.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Fetched", "fetch", "fetch_verified"]

# Failures that no other mirror can fix: stop at once instead of trying the next URL.
_FATAL = (NotEnoughSpaceError, OfflineError, LockTimeoutError)


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
            check_space(dest, size - size_of(part))

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
        raise ChecksumError(f"{host(url)} publishes sha256 {published_sha} for {dest.name}, not the verified {sha256}")
    return published_sha, size if size is not None else published_size, host(url)


# --------------------------------------------------------------------------- one URL, verified


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
    may_restart = size_of(part) > 0
    while True:
        download_to_part(sess, url, part, dest, size, timeout, retries, backoff, progress)
        try:
            _finalize(part, dest, sha256, size)
            return
        except ChecksumError:
            if not may_restart:
                raise
            may_restart = False  # _finalize already deleted the bad .part


def _finalize(part: Path, dest: Path, sha256: str | None, size: int | None) -> None:
    """Verify ``part`` and atomically move it to ``dest``; delete it when bad."""
    got_size = size_of(part)
    if size is not None and got_size != size:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{dest.name}: size mismatch: expected {size} bytes, got {got_size}")
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{dest.name}: sha256 mismatch: expected {sha256}, got {got}")
    publish(part, dest)  # fsynced before the rename: a crash never leaves a renamed-but-empty model file


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


def _combine(errors: list[tuple[str, DownloadError]], dest: Path) -> DownloadError:
    """One exception for all failed URLs; keeps the class when they all agree."""
    if len(errors) == 1:
        return errors[0][1]
    kinds = {type(e) for _, e in errors}
    cls = kinds.pop() if len(kinds) == 1 else DownloadError
    detail = "; ".join(str(e) for _, e in errors)
    return cls(f"all {len(errors)} sources failed for {dest.name}: {detail}")
