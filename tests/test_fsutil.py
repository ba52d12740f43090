"""Atomic writes (fsutil): complete files or none, on disk (file and folder entry) before returning."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from clipcap_cli import fsutil
from clipcap_cli.cli import output
from clipcap_cli.errors import UsageError


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record what each os.fsync call flushed: "file" or "dir"."""
    calls: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_flushes_the_file_and_the_rename(tmp_path: Path, fsyncs: list[str]):
    target = tmp_path / "sub" / "a.txt"
    fsutil.write_text_atomic(target, "hello\n")
    assert target.read_text() == "hello\n"
    assert fsyncs == ["file", "dir"]  # the data, then the folder entry the rename changed
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def half(tmp: str) -> None:
        Path(tmp).write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fsutil.atomic_write(target, half)
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_atomic_file_streams_fsyncs_and_commits_only_on_success(tmp_path: Path, fsyncs: list[str]):
    target = tmp_path / "captions.csv"
    with output.AtomicFile(target) as f:
        f.write("a,b\r\n")  # newline="": CSV line endings pass through untouched
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_bytes() == b"a,b\r\n"
    assert fsyncs == ["file", "dir"]
    with pytest.raises(RuntimeError):
        with output.AtomicFile(target) as f:
            f.write("partial")
            raise RuntimeError("captioning crashed")
    assert target.read_bytes() == b"a,b\r\n" and _leftovers(tmp_path) == []


def test_a_folder_is_not_a_file_name(tmp_path: Path):
    with pytest.raises(UsageError, match="is a folder"):
        fsutil.write_text_atomic(tmp_path, "x")
    with pytest.raises(UsageError, match="is a folder"):
        with output.AtomicFile(tmp_path):
            pass


@pytest.mark.parametrize("hard_links", [True, False])
def test_create_exclusive_creates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool):
    if not hard_links:  # a file system without them (FAT, some network mounts): O_EXCL instead

        def no_link(src: str, dst: str) -> None:
            raise PermissionError("operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "settings.json"
    assert fsutil.create_exclusive(target, "first") is True
    assert fsutil.create_exclusive(target, "second") is False
    assert target.read_text() == "first" and _leftovers(tmp_path) == []
