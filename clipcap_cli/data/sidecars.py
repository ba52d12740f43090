"""Reading a user's own layouts into dataset records: image folders with sidecar captions and webdataset
shards, and what in them cannot be paired (``Unpaired``: counted and listed, never fatal)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clipcap_cli.data.images import ImageResolver, is_image_path
from clipcap_cli.errors import UsageError

SIDECAR_SUFFIXES = (".txt", ".caption")


@dataclass
class Unpaired:
    """What a collection holds that is not an image with captions (names, in order)."""

    no_caption: list[str] = field(default_factory=list)  # images without captions
    no_image: list[str] = field(default_factory=list)  # caption files (or tar keys) without an image
    empty_caption: list[str] = field(default_factory=list)  # caption files with no caption in them

    def __bool__(self) -> bool:
        return bool(self.no_caption or self.no_image or self.empty_caption)

    def extend(self, other: Unpaired) -> None:
        self.no_caption += other.no_caption
        self.no_image += other.no_image
        self.empty_caption += other.empty_caption

    def counts(self) -> dict[str, int]:
        return {
            "images without captions": len(self.no_caption),
            "captions without images": len(self.no_image),
            "empty caption files": len(self.empty_caption),
        }

    def to_dict(self) -> dict[str, list[str]]:
        return {"no_caption": self.no_caption, "no_image": self.no_image, "empty_caption": self.empty_caption}


def read_sidecar(path: Path) -> list[str]:
    """The captions of a sidecar file: one per non-blank line; undecodable bytes replaced."""
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def folder_records(folder: Path, root: Path, recursive: bool) -> tuple[list[dict], Unpaired]:
    """One record per image in ``folder`` (sorted), with its sidecar captions, and what is unpaired."""
    entries = folder.rglob("*") if recursive else folder.iterdir()
    images: list[Path] = []
    sidecars: dict[Path, Path] = {}  # folder/stem -> caption file
    for p in entries:
        if any(part.startswith(".") for part in p.relative_to(folder).parts) or not p.is_file():
            continue
        if is_image_path(p):
            images.append(p)
        elif p.suffix.lower() in SIDECAR_SUFFIXES:
            sidecars.setdefault(p.with_suffix(""), p)
    images.sort()
    resolver = ImageResolver(root)
    records, unpaired, used = [], Unpaired(), set()
    for path in images:
        captions: list[str] = []
        sidecar = sidecars.get(path.with_suffix(""))
        if sidecar is not None:
            used.add(sidecar)
            captions = read_sidecar(sidecar)
            if not captions and sidecar.name not in unpaired.empty_caption:
                unpaired.empty_caption.append(_shown(sidecar, folder))
        else:
            unpaired.no_caption.append(_shown(path, folder))
        records.append({"image": resolver.relative(path.resolve()), "image_id": None, "captions": captions})
    unpaired.no_image = sorted(_shown(s, folder) for s in sidecars.values() if s not in used)
    return records, unpaired


def _shown(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def shard_records(patterns: list[str], root: Path) -> tuple[list[dict], Unpaired, list[Path]]:
    """One record per paired sample of the shards ``patterns`` name (paths, globs, brace ranges)."""
    from clipcap_cli.data import tars

    resolver = ImageResolver(root)
    records, unpaired, shards = [], Unpaired(), []
    for shard in tars.iter_shards(patterns):
        shards.append(shard)
        contents = tars.read_shard(shard)
        for s in contents.samples:
            where = tars.location(shard, s.image or "")
            records.append({"image": resolver.relative(where), "image_id": s.key, "captions": s.captions})
        unpaired.extend(
            Unpaired(
                no_caption=[f"{shard.name}::{k}" for k in contents.no_caption],
                no_image=[f"{shard.name}::{k}" for k in contents.no_image],
                empty_caption=[f"{shard.name}::{k}" for k in contents.empty_caption],
            )
        )
    return records, unpaired, shards
