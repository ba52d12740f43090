"""Atomic file writes: readers see the old file or the new one, never half of one.

Every file clipcap writes for keeps (checkpoints, features stores, reports, predictions, caches)
goes through here: a temporary file next to the target, flushed to disk, renamed over it, and the
folder's entry flushed too, so that a crash or a power cut at any moment leaves a complete file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

from clipcap_cli.errors import UsageError


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows: folders cannot be opened, and renames there need no such flush
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (network, FUSE) refuse fsync on a folder
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path: Path, fsync: bool) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; when the block succeeds, move it over ``path``."""
    if path.is_dir():
        raise UsageError(f"{path} is a folder: give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; give the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[str], None], *, fsync: bool = True) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into place.

    With ``fsync`` the file and the rename are on disk before this returns, so a crash right
    after leaves the complete file. ``~`` in ``path`` is expanded.
    """
    path = Path(path).expanduser()
    with _replacing(path, fsync) as tmp:
        write(tmp)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


@contextlib.contextmanager
def atomic_open(path: str | Path, *, newline: str | None = "") -> Iterator[IO[str]]:
    """``with atomic_open(path) as f: ...``: a UTF-8 text file that appears, complete, only if the
    block succeeds (for writers that stream, such as ``clipcap caption --output``)."""
    with _replacing(Path(path).expanduser(), fsync=True) as tmp:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            yield f


def create_exclusive(path: str | Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists; True when this call created it.

    Atomic against other processes doing the same (a hard link cannot replace a file), so of
    several concurrent callers exactly one wins, and a reader never sees a half-written file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (FAT, some network mounts): claim the name with O_EXCL
            try:
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _default_mode())
            except FileExistsError:
                return False
            with os.fdopen(out, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(path.parent)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)
