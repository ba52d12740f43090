"""webdataset tar shards: ``KEY.jpg`` beside ``KEY.txt`` (or a caption field in ``KEY.json``).

A shard is a plain (uncompressed) tar. Files belong to one sample when they share a key: the member's
path up to the first dot of its file name (``dir/000123.jpg`` and ``dir/000123.txt`` -> ``dir/000123``).
A sample's image is read straight from the tar at its offset, so any loader worker can decode any
sample without unpacking the shard: its location is ``SHARD.tar::MEMBER`` (``images.location``; ``images.open_rgb``
reads it).
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from clipcap_cli.data.images import COMPRESSED_SUFFIXES, IMAGE_SUFFIXES, MEMBER_SEP, is_tar_name, location
from clipcap_cli.errors import UsageError

__all__ = ["MEMBER_SEP", "is_tar_name", "location", "expand", "read_shard", "iter_shards", "split_key"]

TEXT_EXTENSIONS = ("txt", "caption", "cap", "text")
JSON_CAPTION_FIELDS = ("caption", "captions", "text", "txt")


class TarError(UsageError):
    """A shard that cannot be read: the message names it."""


def expand(pattern: str) -> list[Path]:
    """The shards a user named: a path, a glob (``shards/*.tar``) or a brace range
    (``shards/train-{000..009}.tar``, also ``{a,b}``), sorted; one line when none exists."""
    names = _braces(pattern)
    found: list[Path] = []
    for name in names:
        path = Path(name).expanduser()
        if any(c in name for c in "*?["):
            found += sorted(Path(p) for p in glob.glob(str(path)))
        elif path.exists():
            found.append(path)
        elif len(names) > 1:
            raise TarError(f"{pattern}: shard {name} not found")
    if not found:
        raise TarError(f"no shard matches {pattern}")
    for path in found:
        if path.name.lower().endswith(COMPRESSED_SUFFIXES):
            raise TarError(
                f"{path}: a compressed tar cannot be read at random offsets; decompress it first (e.g. gunzip)"
            )
    return found


_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALTERNATIVES = re.compile(r"\{([^{}]*,[^{}]*)\}")


def _braces(pattern: str) -> list[str]:
    """Bash-style brace expansion of numeric ranges (zero padding kept) and comma lists."""
    m = _RANGE.search(pattern)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        values = [str(v).zfill(width) for v in range(int(lo), int(hi) + step, step)]
        return [out for v in values for out in _braces(pattern[: m.start()] + v + pattern[m.end() :])]
    m = _ALTERNATIVES.search(pattern)
    if m:
        return [out for v in m.group(1).split(",") for out in _braces(pattern[: m.start()] + v + pattern[m.end() :])]
    return [pattern]


def split_key(member: str) -> tuple[str, str]:
    """(key, extension) of a member path: ``a/b/0001.seg.jpg`` -> (``a/b/0001``, ``seg.jpg``)."""
    folder, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


@dataclass
class Sample:
    key: str
    image: str | None = None  # member name of the image
    captions: list[str] = field(default_factory=list)
    caption_source: str | None = None  # member the captions came from


@dataclass
class ShardContents:
    """The samples of one shard, and what could not be paired."""

    path: Path
    samples: list[Sample]  # those with an image (their captions may be empty)
    no_caption: list[str]  # keys with an image and no caption
    no_image: list[str]  # keys with a caption and no image
    empty_caption: list[str]  # keys whose caption file was empty


def read_shard(path: Path) -> ShardContents:
    """Scan the headers of one shard (no image is decoded) and pair images with captions."""
    samples: dict[str, Sample] = {}
    empty: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_key(info.name)
                last = ext.rsplit(".", 1)[-1]
                sample = samples.setdefault(key, Sample(key))
                if f".{last}" in IMAGE_SUFFIXES:
                    sample.image = sample.image or info.name
                elif last in TEXT_EXTENSIONS or last == "json":
                    if sample.captions and last == "json":
                        continue  # a .txt caption wins over a .json one
                    raw = tar.extractfile(info)
                    text = raw.read().decode("utf-8", errors="replace") if raw is not None else ""
                    captions = _json_captions(path, info.name, text) if last == "json" else _lines(text)
                    if captions:
                        sample.captions, sample.caption_source = captions, info.name
                    elif last != "json" and key not in empty:
                        empty.append(key)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise TarError(f"{path}: not a readable tar ({exc})") from None
    return ShardContents(
        path,
        [s for s in samples.values() if s.image],
        no_caption=[s.key for s in samples.values() if s.image and not s.captions and s.key not in empty],
        no_image=[s.key for s in samples.values() if s.captions and not s.image],
        empty_caption=[k for k in empty if not samples[k].captions],
    )


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _json_captions(path: Path, member: str, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except ValueError:
        raise TarError(f"{path}::{member}: invalid JSON") from None
    if not isinstance(data, dict):
        return []
    for name in JSON_CAPTION_FIELDS:
        value = data.get(name)
        if isinstance(value, str):
            return _lines(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return [v.strip() for v in value if v.strip()]
    return []


def iter_shards(patterns: list[str]) -> Iterator[Path]:
    seen: set[Path] = set()
    for pattern in patterns:
        for path in expand(pattern):
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                yield resolved
