"""A user's own collection as dataset records: image folders with sidecar captions, webdataset shards.

Any source ``datasets.read_dataset`` reads (folders with sidecar captions and webdataset shards are read
by ``sidecars.py``), combined; what cannot be paired is counted and listed in ``Unpaired``, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from clipcap_cli.data.sidecars import Unpaired
from clipcap_cli.errors import UsageError

if TYPE_CHECKING:
    from clipcap_cli.data.features import ExtractOptions, ExtractResult
    from clipcap_cli.data.text_features import TextExtractOptions, TextExtractResult

# --------------------------------------------------------------------------- a collection, encoded once

STORES_DIR = "features"  # under clipcap's data directory: the stores `train DATA...` extracts
SHARD_IMAGES = 4096  # images per shard of those stores: training streams them a few shards at a time


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
    from clipcap_cli.data.datasets import read_dataset

    by_location: dict[str, dict] = {}
    unpaired, described = Unpaired(), []
    for source in sources:
        if fmt == "auto" and Path(source).suffix.lower() == ".txt" and Path(source).is_file():
            raise UsageError(
                f"{source} is a text file: to train on captions alone (no images) add --from-text; for images, "
                "give a folder of images with sidecar captions, a manifest, a COCO file or webdataset shards"
            )
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
    from clipcap_cli.data.features import clip_weights_sha256
    from clipcap_cli.weights.clip_tower import clip_activation

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
    from clipcap_cli.data.tars import MEMBER_SEP

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
    poll: float = 2.0,
) -> ExtractResult:
    """The features store of ``collection``: extracted into ``stores/KEY`` (clipcap's data directory
    by default) unless a complete one is there already. Interrupted, it resumes like ``extract``.

    With ``options.shard = (i, n)`` (the processes of a torchrun job) each process encodes its share of
    the chunks; process 0 then joins them into the store once every share is written, and the others
    wait for the store (checking every ``poll`` seconds). torchrun stops the whole job if one fails.
    """
    import dataclasses
    import time

    from clipcap_cli import paths
    from clipcap_cli.data import features

    # Sharded, so that training holds a few shards in memory, never the whole collection (train/stream.py).
    options = dataclasses.replace(options, shard_size=options.shard_size or SHARD_IMAGES)
    key = collection_key(collection.records, options)
    out = (stores if stores is not None else paths.home() / STORES_DIR) / key[:24]
    source = {"source": [s["source"] for s in collection.sources], "dataset_format": "collection"}
    first, n = options.shard[0] == 0, options.shard[1]
    while True:
        result = features.extract(
            collection.records, "/", out, options, source=source, on_progress=on_progress, merge=first
        )
        if result.complete or n == 1:
            return result
        on_progress = None  # this process's share is done: the rest is waiting for the others
        while not first and not features.store_is_complete(out):
            time.sleep(poll)
        if not first:
            return features.ExtractResult(out, complete=True, noop=True, records=len(collection.records))
        time.sleep(poll)


def encode_captions(
    sources: Sequence[str | Path],
    options: TextExtractOptions,
    *,
    reading: dict[str, Any] | None = None,
    stores: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    place: tuple[int, int] = (0, 1),
    poll: float = 2.0,
) -> TextExtractResult:
    """Text-only training's store (CapDec): every caption of ``sources`` (``.txt`` files of lines, or any
    dataset file; no image is read) encoded by CLIP's text tower into ``stores/text-KEY``, where KEY
    covers the captions and the CLIP. A complete store with the same key is reused.

    ``place = (rank, world)``: in a torchrun job the first process encodes (text is fast) while the
    others wait for its store, checking every ``poll`` seconds."""
    from clipcap_cli import paths
    from clipcap_cli.data import text_features
    from clipcap_cli.data.features import clip_weights_sha256
    from clipcap_cli.weights.clip_tower import clip_activation

    reading = reading or {}
    records, described = [], []
    for source in sources:
        rows, about = text_features.read_caption_source(
            source, reading.get("images"), reading.get("fmt", "auto"), reading.get("split")
        )
        records += rows
        described.append(about["source"])
    if not text_features.caption_records(records)[0]:
        raise UsageError(f"no captions in {', '.join(str(s) for s in sources)}: nothing to train on")
    h = hashlib.sha256()
    clip = [options.clip_model, options.clip_pretrained, clip_activation(options.clip_model, options.clip_pretrained)]
    h.update(json.dumps([*clip, clip_weights_sha256(options.clip_model, options.clip_pretrained)]).encode())
    for r in records:
        h.update(json.dumps(r["captions"], ensure_ascii=False).encode())
    out = (stores if stores is not None else paths.home() / STORES_DIR) / f"text-{h.hexdigest()[:24]}"
    source = {"source": described, "dataset_format": "captions"}
    if place[0] != 0:
        import time

        from clipcap_cli.data.features import store_is_complete

        while not store_is_complete(out):
            time.sleep(poll)
        on_progress = None
    return text_features.extract_text(records, out, options, source=source, on_progress=on_progress)
