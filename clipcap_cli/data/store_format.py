"""The features store's format, shared by both layouts: file names, ``meta.json`` (read and checked
here), records, errors, and the in-memory ``FeatureSet``. ``features.py`` writes and loads stores
and runs the extraction; ``store.py`` reads and writes the sharded layout shard by shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clipcap_cli.errors import ClipCapError, UsageError
from clipcap_cli.version import __version__

if TYPE_CHECKING:
    import torch

FORMAT = "clipcap-features"
FORMAT_VERSION = 1  # a single-file store
SHARDED_FORMAT_VERSION = 2  # a sharded store (store.py)
READ_FORMAT_VERSION = 2  # the newest layout this clipcap reads
META_FILE = "meta.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
INDEX_FILE = "index.jsonl"
SKIPPED_FILE = "skipped.jsonl"
TOKENS_FILE = "tokens.safetensors"  # the train command's cache, derived from this store
PARTS_DIR = "parts"
EMBEDDINGS_KEY = "embeddings"


class FeaturesError(ClipCapError):
    """A features store that is missing, incomplete or inconsistent."""


@dataclass
class FeatureSet:
    """A loaded features store: ``embeddings[i]`` is the CLIP embedding of ``records[i]``."""

    embeddings: torch.Tensor  # [N_images, D], fp16 or fp32 as stored
    records: list[dict]  # {"image": str, "image_id": int | str | None, "captions": list[str]}
    meta: dict
    path: Path

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_captions(self) -> int:
        return sum(len(r["captions"]) for r in self.records)


def _store_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.name in (META_FILE, EMBEDDINGS_FILE, INDEX_FILE) and not path.is_dir():
        return path.parent
    return path


def _check_record(i: int, record: dict) -> dict:
    if not isinstance(record, dict) or "image" not in record or "captions" not in record:
        raise FeaturesError(f"record {i} needs 'image' and 'captions' keys, got {record!r:.80}")
    if not isinstance(record["captions"], list):
        raise FeaturesError(f"record {i}: 'captions' must be a list of strings")
    out = dict(record)
    out["image"] = str(record["image"])
    out.setdefault("image_id", None)
    return out


def with_activation(settings: dict) -> dict:
    """``settings`` (a store's meta or run settings) with the CLIP activation its features were made
    with. clipcap 0.1 recorded none: it built the architecture's own activation, because open_clip
    ignores a pretrained tag's QuickGELU (OpenAI's ViTs got GELU)."""
    if settings.get("clip_activation") or not settings.get("clip_model"):
        return settings
    from clipcap_cli.weights.clip_tower import clip_activation

    try:
        then = clip_activation(str(settings["clip_model"]), None)
    except ClipCapError:
        return settings  # a CLIP this installation does not know: nothing to compare with
    return {**settings, "clip_activation": then}


def _check_activation(meta: dict, folder: Path) -> None:
    """Refuse a store whose image features came from the wrong activation (clipcap 0.1's ViTs)."""
    if meta.get("clip_activation") or not meta.get("clip_model"):
        return
    from clipcap_cli.weights.clip_tower import clip_spec

    try:
        spec = clip_spec(str(meta["clip_model"]), meta.get("clip_pretrained"))
    except ClipCapError:
        return
    if spec.activation != with_activation(meta)["clip_activation"] and spec.image_tower_has_gelu:
        raise FeaturesError(
            f"{folder} was extracted by clipcap 0.1, which ran {meta['clip_model']} ({meta.get('clip_pretrained')}) "
            "with GELU instead of its QuickGELU: re-extract it (the same `clipcap extract` command with --overwrite)"
        )


def describe_tower(clip_model: object, clip_pretrained: object) -> str:
    """``ViT-L-14 (openai)``: a CLIP tower as messages name it."""
    return f"{clip_model} ({clip_pretrained})" if clip_pretrained else str(clip_model)


def same_tower(meta: dict, clip_model: str, clip_pretrained: str | None) -> bool:
    """Whether ``meta``'s features (a store's) came from ``clip_model`` with ``clip_pretrained`` weights.
    A store that records no CLIP (an imported pickle) is taken at its word."""
    if not meta.get("clip_model"):
        return True
    return str(meta["clip_model"]) == clip_model and (meta.get("clip_pretrained") or None) == (clip_pretrained or None)


def check_store_tower(path: str | Path, clip_model: str, clip_pretrained: str | None, flag: str = "--clip") -> None:
    """Refuse the store at ``path`` when another CLIP tower than ``clip_model``/``clip_pretrained`` made its
    features (a model learns one tower's embedding space): one line naming both, before any work."""
    folder, meta = read_meta(path)
    if same_tower(meta, clip_model, clip_pretrained):
        return
    raise UsageError(
        f"features store {folder} was made with CLIP {describe_tower(meta['clip_model'], meta.get('clip_pretrained'))}, "
        f"not {flag} {describe_tower(clip_model, clip_pretrained)}: leave out {flag} to train on it, or encode "
        f"the images again with {flag} {clip_model}"
    )


def read_meta(path: str | Path) -> tuple[Path, dict]:
    """(the store's folder, its checked ``meta.json``) for either layout; one-line errors otherwise."""
    folder = _store_dir(path)
    if folder.is_file() and folder.suffix in (".pkl", ".pickle"):
        raise UsageError(
            f"{folder} is an original ClipCap pickle: convert it with `clipcap extract --import-pickle {folder} --out DIR`"
        )
    if not folder.is_dir():
        raise UsageError(f"features directory not found: {folder}")
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        hint = (
            " (an unfinished extraction: rerun the same `clipcap extract` command to finish it)"
            if (folder / PARTS_DIR).is_dir()
            else ""
        )
        raise FeaturesError(f"{folder} is not a complete features store: no {META_FILE}{hint}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FeaturesError(
            f"{meta_file}: unreadable ({exc}): the store is damaged; extract it again (clipcap extract ... --overwrite)"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FeaturesError(
            f"{meta_file} is not a clipcap features store (format {meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    if int(meta.get("format_version", 0)) > READ_FORMAT_VERSION:
        raise FeaturesError(
            f"{folder} uses features format {meta['format_version']}, this clipcap ({__version__}) reads up to {READ_FORMAT_VERSION}: upgrade clipcap"
        )
    return folder, meta


def is_sharded(meta: dict) -> bool:
    return int(meta.get("format_version", 0)) >= SHARDED_FORMAT_VERSION
