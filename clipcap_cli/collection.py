"""A user's own collection as dataset records: image folders with sidecar captions, webdataset shards.

- A folder of images: ``photo.jpg`` takes its captions from ``photo.txt`` or ``photo.caption`` beside it,
  one caption per line (the convention of diffusion-training tools). A folder without any caption file
  is a folder of images to caption (records with no captions).
- webdataset shards (``tars.py``): ``KEY.jpg`` with ``KEY.txt`` or a caption field in ``KEY.json``.

What cannot be paired is counted and listed in ``Unpaired``, never fatal: images without captions,
captions without images, and empty caption files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from clipcap_cli.errors import UsageError
from clipcap_cli.images import is_image_path

if TYPE_CHECKING:
    from clipcap_cli.features import ExtractOptions, ExtractResult

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
    from clipcap_cli.datasets import ImageResolver

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
    from clipcap_cli import tars
    from clipcap_cli.datasets import ImageResolver

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


# --------------------------------------------------------------------------- a collection, encoded once

STORES_DIR = "features"  # under clipcap's data directory: the stores `train DATA...` extracts


@dataclass
class Collection:
    """Captioned images from one or more sources, each image once (its location absolute)."""

    records: list[dict]
    unpaired: Unpaired
    sources: list[dict]  # each source's description (file, format, images root)

    @property
    def captions(self) -> int:
        return sum(len(r["captions"]) for r in self.records)


def read_collection(
    sources: Sequence[str | Path],
    *,
    images: str | Path | None = None,
    fmt: str = "auto",
    split: str | None = None,
    recursive: bool = False,
) -> Collection:
    """Every captioned image of ``sources`` (folders with sidecars, manifests, COCO/Karpathy files,
    webdataset shards). Images without captions are listed in ``unpaired``, not kept; an image named
    by several sources is kept once, with all its captions."""
    from clipcap_cli.datasets import read_dataset

    by_location: dict[str, dict] = {}
    unpaired, described = Unpaired(), []
    for source in sources:
        ds = read_dataset(source, images, fmt, split, recursive)
        described.append(ds.describe())
        unpaired.extend(ds.unpaired)
        listed = set(ds.unpaired.no_caption)
        for r in ds.records():
            where = str(ds.images_root / r["image"])
            if not r["captions"]:
                if ds.format not in ("folder", "webdataset") and r["image"] not in listed:
                    unpaired.no_caption.append(r["image"])
                continue
            if where in by_location:
                by_location[where]["captions"] += [c for c in r["captions"] if c not in by_location[where]["captions"]]
            else:
                by_location[where] = {"image": where, "image_id": r.get("image_id"), "captions": list(r["captions"])}
    if not by_location:
        named = ", ".join(str(s) for s in sources)
        raise UsageError(
            f"no captioned images in {named}: put each image's captions beside it (photo.jpg + photo.txt, "
            "one caption per line), or give a CSV/JSON Lines manifest, a COCO file or webdataset shards"
        )
    return Collection(list(by_location.values()), unpaired, described)


def collection_key(records: Sequence[dict], options: ExtractOptions) -> str:
    """What a collection's features depend on: the CLIP (name, tag, activation, weights), every image's
    location, size and mtime, and the captions. Data changed under the same names gets another key."""
    from clipcap_cli.backbones import clip_activation
    from clipcap_cli.features import clip_weights_sha256

    h = hashlib.sha256()
    clip = [
        options.clip_model,
        options.clip_pretrained,
        clip_activation(options.clip_model, options.clip_pretrained),
        clip_weights_sha256(options.clip_model, options.clip_pretrained),
    ]
    h.update(json.dumps(clip).encode())
    stats: dict[str, Any] = {}
    for r in records:
        h.update(json.dumps([r["image"], r["captions"], _file_stat(r["image"], stats)], ensure_ascii=False).encode())
    return h.hexdigest()


def _file_stat(location: str, cache: dict[str, Any]) -> Any:
    from clipcap_cli.tars import MEMBER_SEP

    path = location.partition(MEMBER_SEP)[0] if MEMBER_SEP in location and not os.path.exists(location) else location
    if path not in cache:
        try:
            st = os.stat(path)
            cache[path] = [st.st_size, st.st_mtime_ns]
        except OSError:
            cache[path] = None
    return cache[path]


def encode_collection(
    collection: Collection,
    options: ExtractOptions,
    *,
    stores: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ExtractResult:
    """The features store of ``collection``: extracted into ``stores/KEY`` (clipcap's data directory
    by default) unless a complete one is there already. Interrupted, it resumes like ``extract``."""
    from clipcap_cli import features, paths

    if options.shard[1] > 1:
        raise UsageError(
            "training straight from images runs in one process: under torchrun, extract the features first "
            "(torchrun ... -m clipcap_cli extract DATA --out STORE), then train on STORE"
        )
    key = collection_key(collection.records, options)
    out = (stores if stores is not None else paths.home() / STORES_DIR) / key[:24]
    source = {"source": [s["source"] for s in collection.sources], "dataset_format": "collection"}
    return features.extract(collection.records, "/", out, options, source=source, on_progress=on_progress)
