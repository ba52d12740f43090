"""Inputs of sharded captioning: webdataset tar shards read in place, and lists of images (files,
folders, globs, URLs, stdin) cut into shards of ``shard_size``. A shard is a named, ordered list
of samples; its name names its output files (``DIR/NAME.jsonl``, ...).

Tar shards are read with the standard ``tarfile`` module, not the ``webdataset`` package: the
runner needs every key to give exactly one record, in shard order, bad samples included, while
webdataset's pipelines drop or raise on them through handlers and stream a whole shard to each
worker. Here the main process reads only the tar headers (the members' offsets), and the
DataLoader workers read and decode their own members with ``os.pread``, in parallel, in order.
Keys and extensions follow webdataset's rule (``dir/abc.def.jpg`` -> key ``dir/abc``,
extension ``def.jpg``); a key's members need not be adjacent.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from clipcap_cli.errors import UsageError

if TYPE_CHECKING:
    from PIL import Image

    from clipcap_cli.data.inputs import Source

SHARD_SIZE = 10_000  # images per shard cut from a list: the most work a crash can cost
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the first present is the sample's image
LIST_PREFIX = "part"  # list shards are part-00000, part-00001, ...
TAR_SUFFIX = ".tar"
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
_BRACE_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass(frozen=True)
class Sample:
    """One sample of a shard: a tar sample's members, or one listed image. Cheap to pickle."""

    shard: str  # the shard's name
    key: str  # webdataset __key__, or the image's path/URL for list shards
    position: int = 0  # the sample's place in its shard (0-based)
    tar: str | None = None  # the tar file holding the members
    members: tuple[tuple[str, int, int], ...] = ()  # (extension, byte offset, size) in ``tar``
    source: Source | None = None  # list shards: where the image is
    error: str | None = None  # known before reading (no image member, missing file)
    embedding: Any = None  # a stored CLIP embedding (D,) to caption instead of an image (--embeddings)
    meta: tuple[tuple[str, Any], ...] = ()  # record fields a stored embedding's metadata gives (url, ...)

    @property
    def location(self) -> str | None:
        return self.source.location if self.source is not None else None

    def _member(self, *extensions: str) -> tuple[int, int] | None:
        found = {ext: (offset, size) for ext, offset, size in self.members}
        return next((found[e] for e in extensions if e in found), None)

    def open_image(self) -> Image.Image:
        """The sample's image, decoded to upright RGB; ``ClipCapError`` when it cannot be."""
        from clipcap_cli.data.images import open_rgb
        from clipcap_cli.data.inputs import InputError

        if self.error is not None:
            raise InputError(self.error)
        if self.source is not None:
            return self.source.open_image()
        member = self._member(*IMAGE_EXTENSIONS)
        assert self.tar is not None and member is not None  # else ``error`` is set
        return open_rgb(_read(self.tar, *member))

    def info(self) -> dict[str, Any]:
        """``url`` and ``source_caption`` when known: from a tar sample's ``json`` and ``txt`` members,
        or a listed URL."""
        import json

        from clipcap_cli.data.inputs import is_url

        if self.meta:
            return dict(self.meta)
        out: dict[str, Any] = {}
        if self.source is not None and self.source.location and is_url(self.source.location):
            out["url"] = self.source.location
        meta = self._member("json")
        if meta is not None:
            data = json.loads(_read(self.tar, *meta).decode("utf-8"))  # type: ignore[arg-type]
            if isinstance(data, dict):
                if isinstance(data.get("url"), str):
                    out["url"] = data["url"]
                if isinstance(data.get("caption"), str):
                    out["source_caption"] = data["caption"]
        text = self._member("txt")
        if text is not None:
            out["source_caption"] = _read(self.tar, *text).decode("utf-8", errors="replace").strip()  # type: ignore[arg-type]
        return out


def _read(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset``: one member of a tar, read without touching the rest."""
    from clipcap_cli.data.inputs import InputError

    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) < size:
        raise InputError(f"the shard ends inside this member ({len(data)} of {size} bytes): a truncated tar")
    return data


@dataclass(frozen=True)
class Shard:
    """A named unit of work and output: a tar file, or a slice of a list of images."""

    name: str  # output files are DIR/NAME.jsonl, DIR/NAME.stats.json, ...
    index: int  # position in the job's shard list: shard i goes to worker i mod n
    tar: str | None = None  # a tar shard's file
    sources: tuple[Source, ...] = ()  # a list shard's images
    embeddings: Any = None  # an ``embeddings_in.EmbeddingFile``: stored embeddings, captioned row by row

    @property
    def source(self) -> str | None:
        """The file the shard reads (a tar, an embeddings file); None for a list shard."""
        return self.tar or (self.embeddings.path if self.embeddings is not None else None)

    def samples(self) -> tuple[list[Sample], str | None]:
        """The shard's samples in order, and why the shard could not be read to its end (or None).

        A tar sample without an image member, or a list entry that is already known to be bad,
        is a sample with an ``error``: it still gets its record.
        """
        if self.embeddings is not None:
            return self.embeddings.samples(self.name)
        if self.tar is None:
            return [Sample(self.name, s.name, i, source=s, error=s.error) for i, s in enumerate(self.sources)], None
        return _tar_samples(self.name, self.tar)

    def list_keys_sha256(self) -> str | None:
        """A list shard's fingerprint (its images, in order); None for a tar shard."""
        if self.tar is not None or self.embeddings is not None:
            return None
        return keys_sha256(s.name for s in self.sources)


def keys_sha256(keys: Any) -> str:
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _tar_samples(shard: str, path: str) -> tuple[list[Sample], str | None]:
    import tarfile

    groups: dict[str, list[tuple[str, int, int]]] = {}
    problem = None
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": uncompressed, so members can be read by offset
            while True:
                try:
                    member = tar.next()
                except tarfile.ReadError as exc:
                    problem = f"unreadable after {len(groups)} samples ({exc or 'a damaged tar header'})"
                    break
                if member is None:
                    if not _ends_cleanly(path, tar.offset):
                        problem = f"the tar ends without its end-of-archive blocks after {len(groups)} samples (a truncated file?)"
                    break
                name = member.name
                if not member.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")):
                    continue  # folders, links, webdataset's __meta__ entries
                match = _KEY.match(name)
                if match is None:
                    continue  # no extension: not part of a sample (webdataset skips it too)
                key, ext = match.group(1), match.group(2).lower()
                members = groups.setdefault(key, [])
                if all(e != ext for e, _, _ in members):  # a repeated member: the first one counts
                    members.append((ext, member.offset_data, member.size))
    except (OSError, tarfile.TarError, EOFError) as exc:
        problem = (
            f"not a readable tar file ({exc})" if not groups else f"unreadable after {len(groups)} samples ({exc})"
        )
    samples = []
    for position, (key, members) in enumerate(groups.items()):
        has_image = any(ext in IMAGE_EXTENSIONS for ext, _, _ in members)
        error = None if has_image else f"no image in this sample (has: {', '.join(sorted(e for e, _, _ in members))})"
        samples.append(Sample(shard, key, position, tar=path, members=tuple(members), error=error))
    return samples, problem


def _ends_cleanly(path: str, offset: int) -> bool:
    """A tar ends with a zero block where the next header would be; a truncated one does not."""
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(512)
    return len(block) == 512 and block.count(0) == 512


# --------------------------------------------------------------------------- finding the shards


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as webdataset and the shell do it: ``a{0..2}`` -> a0 a1 a2 (zero-padded
    like the bounds: ``{00000..00002}``), ``{x,y}`` -> x y; several and nested braces work."""
    depth, start = 0, None
    for i, ch in enumerate(pattern):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0 and start is not None:
                head, body, tail = pattern[:start], pattern[start + 1 : i], pattern[i + 1 :]
                return [head + choice + rest for choice in _brace_choices(body) for rest in expand_braces(tail)]
    return [pattern]


def _brace_choices(body: str) -> list[str]:
    match = _BRACE_RANGE.match(body)
    if match:
        lo, hi = match.groups()
        width = len(lo) if lo.lstrip("-").startswith("0") and len(lo) > 1 else 0
        a, b = int(lo), int(hi)
        step = 1 if b >= a else -1
        return [str(n).zfill(width) for n in range(a, b + step, step)]
    parts, depth, current = [], 0, ""
    for ch in body:  # split on top-level commas only
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        current += ch
    parts.append(current)
    if len(parts) == 1:
        return ["{" + body + "}"]  # not a brace expression: keep it literally, as the shell does
    return [choice for part in parts for choice in expand_braces(part)]


def is_tar_pattern(arg: str) -> bool:
    return arg.lower().endswith(TAR_SUFFIX) or arg.lower().endswith(TAR_SUFFIX + "}")


def _tar_paths(arg: str) -> list[str]:
    """The tar files a path, brace pattern or glob names (missing ones included: they get an error)."""
    from clipcap_cli.data.inputs import GLOB_CHARS

    found: list[str] = []
    for candidate in expand_braces(arg):
        if GLOB_CHARS & set(candidate) and not os.path.exists(candidate):
            matches = sorted(glob.glob(os.path.expanduser(candidate), recursive=True))
            if not matches:
                raise UsageError(f"no tar shards match {candidate!r}")
            found.extend(matches)
        else:
            found.append(os.path.expanduser(candidate))
    return found


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard "1/4"`` -> (1, 4)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    check_shard(i, n)
    return i, n


def check_shard(i: int, n: int) -> None:
    """The one rule for a share of shards: this process takes shards s with s % n == i."""
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {i}/{n}: need 0 <= i < n")


def discover(
    args: Sequence[str],
    *,
    recursive: bool = False,
    stdin: TextIO | None = None,
    shard_size: int = SHARD_SIZE,
    url_deadline: float | None = None,
) -> list[Shard]:
    """The job's shards, in a fixed order every process computes alike: the tar shards named by
    ``args`` (paths, globs, brace patterns), then the other inputs (files, folders, globs, URLs,
    ``-``) cut into list shards of ``shard_size`` images named ``part-00000``, ..."""
    from clipcap_cli.data.inputs import collect

    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {shard_size}")
    if "-" in args:  # a list on stdin may name tar shards too: read it here, in its place
        lines = [line.strip() for line in (stdin.read() if stdin is not None else "").splitlines() if line.strip()]
        args = [a for arg in args for a in (lines if arg == "-" else [arg])]
    compressed = [arg for arg in args if arg.lower().endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst"))]
    if compressed:
        raise UsageError(
            f"{compressed[0]}: compressed tar shards cannot be read member by member: decompress them "
            "(webdataset and img2dataset write plain .tar)"
        )
    tars = [path for arg in args if is_tar_pattern(arg) for path in _tar_paths(arg)]
    others = [arg for arg in args if not is_tar_pattern(arg)]
    reading = {} if url_deadline is None else {"url_deadline": url_deadline}
    sources = collect(others, recursive=recursive, **reading) if others else []
    shards: list[Shard] = []
    seen: dict[str, str] = {}
    for path in dict.fromkeys(os.path.abspath(p) for p in tars):  # each file once, first mention wins
        name = Path(path).name[: -len(TAR_SUFFIX)]
        if name in seen:
            raise UsageError(
                f"two shards are named {name} ({seen[name]} and {path}): output files are named after "
                "the shard, so caption them into different --output-dir folders"
            )
        seen[name] = path
        shards.append(Shard(name, len(shards), tar=path))
    width = max(5, len(str(max(0, len(sources) - 1) // shard_size)))
    for n, start in enumerate(range(0, len(sources), shard_size)):
        name = f"{LIST_PREFIX}-{n:0{width}d}"
        if name in seen:
            raise UsageError(f"a tar shard is named {name}, like the shards cut from the image list: rename it")
        shards.append(Shard(name, len(shards), sources=tuple(sources[start : start + shard_size])))
    if not shards:
        raise UsageError("no inputs: give tar shards, image files, folders, globs, URLs, or - to read paths from stdin")
    if tars and not any(os.path.isfile(p) for p in tars) and not sources:
        raise UsageError(f"none of the {len(tars)} tar shards exists (e.g. {tars[0]})")
    return shards


def shard_samples(shard: Shard) -> tuple[list[Sample], str | None]:
    """``shard.samples()``, with a missing tar file as the shard's problem."""
    if shard.tar is not None and not os.path.isfile(shard.tar):
        return [], "no such file"
    return shard.samples()


def seed_id(sample: Sample) -> int:
    """The id a sample draws its sampling seed from: fixed by its shard's name and its place there,
    so that --sample --seed gives the same captions however the shards are spread or resumed."""
    import zlib

    return (zlib.crc32(sample.shard.encode("utf-8")) << 32) + sample.position


def mine(shards: Sequence[Shard], slot: int, slots: int) -> Iterator[Shard]:
    """This worker's shards: shard i belongs to worker i mod ``slots``."""
    return (s for s in shards if s.index % slots == slot)
