"""A features store in its single-file layout, written and loaded whole (``embeddings.safetensors``,
``index.jsonl``, ``meta.json`` last in), and its ``skipped.jsonl``. ``load_features`` reads either
layout (a sharded one through ``store.py``). ``features.py`` re-exports these: it is where callers look.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from clipcap_cli.data.store_format import (
    EMBEDDINGS_FILE,
    EMBEDDINGS_KEY,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    META_FILE,
    PARTS_DIR,
    SKIPPED_FILE,
    FeaturesError,
    FeatureSet,
    _check_activation,
    _check_record,
    _store_dir,
    is_sharded,
    read_meta,
)
from clipcap_cli.fsutil import atomic_write as _atomic_write
from clipcap_cli.fsutil import write_text_atomic
from clipcap_cli.version import __version__

if TYPE_CHECKING:
    import torch


def is_store(path: Path) -> bool:
    """Whether ``path`` names a features store (complete, or being extracted) rather than images.
    An original ClipCap pickle counts: loading it says how to convert it."""
    folder = _store_dir(path)
    if folder.suffix in (".pkl", ".pickle"):
        return True
    return folder.is_dir() and ((folder / META_FILE).is_file() or (folder / PARTS_DIR / "settings.json").is_file())


def save_features(path: str | Path, embeddings: torch.Tensor, records: list[dict], meta: dict) -> Path:
    """Write a complete store to the directory ``path`` and return it.

    Each file is written to a temp file and renamed; ``meta.json`` goes first out and last in, so
    a crash leaves either the old store, or no ``meta.json`` (incomplete, refused by
    ``load_features``), never a mix. ``meta`` is completed with the format keys and the counts.
    """
    from safetensors.torch import save_file

    out = _store_dir(path)
    out.mkdir(parents=True, exist_ok=True)
    if embeddings.ndim != 2:
        raise FeaturesError(f"embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] != len(records):
        raise FeaturesError(f"{embeddings.shape[0]} embedding rows but {len(records)} records")
    records = [_check_record(i, r) for i, r in enumerate(records)]
    index_text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    full_meta = dict(meta)
    if full_meta.get("clip_model") and not full_meta.get("clip_activation"):
        from clipcap_cli.weights.clip_tower import clip_activation

        # Features written now come from clipcap's CLIP loader, which builds the activation the tag needs.
        full_meta["clip_activation"] = clip_activation(str(full_meta["clip_model"]), full_meta.get("clip_pretrained"))
    full_meta.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        count=len(records),
        embed_dim=int(embeddings.shape[1]),
        dtype=str(embeddings.dtype).removeprefix("torch."),
        normalized=bool(meta.get("normalized", False)),
        num_captions=sum(len(r["captions"]) for r in records),
        index_sha256=hashlib.sha256(index_text.encode("utf-8")).hexdigest(),
        store_id=uuid.uuid4().hex,  # changes on every write: lets caches (tokens) detect a new store
    )
    full_meta.setdefault("clipcap_version", __version__)
    full_meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    meta_text = json.dumps(full_meta, indent=2, ensure_ascii=False) + "\n"

    tensor = embeddings.detach().to("cpu").contiguous()
    (out / META_FILE).unlink(missing_ok=True)
    _atomic_write(
        out / EMBEDDINGS_FILE,
        lambda tmp: save_file({EMBEDDINGS_KEY: tensor}, tmp, metadata={"format": FORMAT, "meta": meta_text}),
    )
    write_text_atomic(out / INDEX_FILE, index_text)
    write_text_atomic(out / META_FILE, meta_text)
    return out


def load_features(path: str | Path) -> FeatureSet:
    """Load the whole store at ``path`` (the directory, or its ``meta.json``), either layout
    (``store.py`` reads a sharded one shard by shard)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from clipcap_cli.data.store import open_store

    folder, meta = read_meta(path)
    if is_sharded(meta):  # format 2: every shard, concatenated
        return open_store(folder).load_all()
    try:
        embeddings = load_file(str(folder / EMBEDDINGS_FILE))[EMBEDDINGS_KEY]
    except (OSError, SafetensorError, KeyError) as exc:
        raise FeaturesError(f"{folder / EMBEDDINGS_FILE}: unreadable ({exc})") from exc
    try:
        index_bytes = (folder / INDEX_FILE).read_bytes()
        records = [json.loads(line) for line in index_bytes.decode("utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise FeaturesError(f"{folder / INDEX_FILE}: unreadable ({exc})") from exc
    count = meta.get("count")
    if embeddings.ndim != 2 or embeddings.shape[0] != len(records) or (count is not None and count != len(records)):
        raise FeaturesError(
            f"{folder}: inconsistent store ({tuple(embeddings.shape)} embeddings, {len(records)} index lines, count {count})"
        )
    _check_activation(meta, folder)
    expected_sha = meta.get("index_sha256")
    if expected_sha and hashlib.sha256(index_bytes).hexdigest() != expected_sha:
        raise FeaturesError(f"{folder}: {INDEX_FILE} does not belong to this {META_FILE} (files from different runs)")
    return FeatureSet(embeddings=embeddings, records=records, meta=meta, path=folder)


def read_skipped(path: str | Path) -> list[dict]:
    """The ``skipped.jsonl`` entries of a store (empty when nothing was skipped)."""
    file = _store_dir(path) / SKIPPED_FILE
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_skipped(out: Path, skipped: list[dict]) -> None:
    """``skipped.jsonl``: one {"image", "reason"} line per input that could not be encoded."""
    file = out / SKIPPED_FILE
    if not skipped:
        file.unlink(missing_ok=True)
        return
    lines = "".join(
        json.dumps({"image": s["image"], "reason": s["reason"]}, ensure_ascii=False) + "\n" for s in skipped
    )
    write_text_atomic(file, lines)
