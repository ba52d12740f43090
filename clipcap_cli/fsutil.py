"""Atomic file writes: readers see the old file or the new one, never half of one.

Every file clipcap writes for keeps (checkpoints, features stores, reports, predictions, caches)
goes through here: a temporary file next to the target, flushed to disk, renamed over it, and the
folder's entry flushed too, so that a crash or a power cut at any moment leaves a complete file.

What is already at a path is never destroyed by the rename: a symlink is followed (the new file
replaces its target, and the link stays), and a pipe, a device or anything else that is not a
regular file is written into as a stream, as the shell's ``>`` would. Files get the permissions
``open()`` would give them (the user's umask). Temporary names carry the host and process id, so
that a later run can remove those an interrupted one left (``remove_stale_temps``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

from clipcap_cli.errors import UsageError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def resolve_target(path: str | Path) -> Path:
    """Where writing ``path`` really lands: ``~`` expanded and symlinks followed (a dangling link's target too)."""
    path = Path(path).expanduser()
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def is_stream(path: Path) -> bool:
    """True when ``path`` exists and is not a regular file or a folder (a pipe, a device): written in place."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if stat.S_ISSOCK(mode):
        raise UsageError(f"{path} is a socket: clipcap cannot write to it")
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _temp_prefix(name: str) -> str:
    return f".{name}.{socket.gethostname()}-{os.getpid()}."


# .NAME.HOST-PID.RANDOM.tmp, as mkstemp makes them with _temp_prefix
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]*)-(?P<pid>\d+)\.[a-z0-9_]+\.tmp$")


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files an interrupted write of this host left in ``folder``; the removed.

    Only names of fsutil's own pattern whose process no longer runs are touched: a concurrent
    writer's temporary file (another process, or another host on a shared file system) is left alone.
    """
    removed = []
    host = socket.gethostname()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or m["host"] != host or _alive(int(m["pid"])) or not entry.is_file(follow_symlinks=False):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def check_folder(path: str | Path, what: str = "--out") -> Path:
    """``path`` can be (or become) a folder; a one-line ``UsageError`` when a file is in the way."""
    path = Path(path).expanduser()
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                where = "is a file" if place == path else f"cannot be made: {place} is a file"
                raise UsageError(
                    f"{what} {path} {where}, not a folder: give a folder (a new name, or the folder of an earlier run)"
                )
            break
    return path


def refuse_inputs(output: str | Path | None, inputs: Iterable[str | Path], what: str = "--output") -> None:
    """``UsageError`` (exit 2) when ``output`` is one of ``inputs`` (the same file, by any path or link)."""
    if output is None:
        return
    target = resolve_target(output)
    try:
        out = os.stat(target)
    except OSError:
        return  # nothing there yet: it cannot be an input
    if not stat.S_ISREG(out.st_mode):
        return  # a pipe or a device is written as a stream, never replaced
    for item in inputs:
        try:
            st = os.stat(item)
        except (OSError, ValueError):
            continue
        if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
            raise UsageError(
                f"{what} {output} is one of the inputs ({item}): it would be overwritten; write somewhere else"
            )


def publish(tmp: str | Path, path: str | Path, *, fsync: bool = True) -> Path:
    """Move the finished temporary file ``tmp`` to ``path`` (symlinks followed, permissions from the umask).

    When ``path`` is a pipe or a device, ``tmp``'s bytes are copied into it instead, and ``tmp`` removed.
    """
    path = Path(path).expanduser()
    if is_stream(path):  # checked through the link: /dev/stdout is a link to a pipe or a terminal
        with open(tmp, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.unlink(tmp)
        return path
    target = resolve_target(path)
    if fsync:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.chmod(tmp, _default_mode())  # mkstemp and some writers make 0600; give the permissions open() would
    os.replace(tmp, target)
    if fsync:
        fsync_dir(target.parent)
    return target


@contextlib.contextmanager
def _replacing(path: Path, fsync: bool) -> Iterator[str]:
    """Yield the name to write; when the block succeeds, that is ``path`` (a temporary file moved over it).

    A pipe or device at ``path`` (after symlinks) is yielded itself: it is written in place, as a stream.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{path} is a folder: give a file name")
    if is_stream(path):  # checked through the link: /dev/stdout is a link to a pipe or a terminal
        yield str(path)
        return
    path = resolve_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        publish(tmp, path, fsync=fsync)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
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
