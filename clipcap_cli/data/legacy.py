"""The original ClipCap features pickle (``parse_coco.py``'s ``oscar_split_*_train.pkl``).

Layout: ``{"clip_embedding": Tensor [N_captions, D], "captions": [{..., "image_id", "caption",
"clip_embedding": row}]}``: one row per caption entry, so each image is stored about 5 times.

``export_original_pickle`` writes it for people who still run the original ``train.py``.
``load_original_pickle`` reads it without running code from the file: a plain ``pickle`` of
torch tensors is not something ``torch.load(weights_only=True)`` accepts (it fails on the
protocol-4 opcodes), so a restricted unpickler admits only tensor rebuilding and plain
containers, and decodes the tensor storages with torch's weights-only loader.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from clipcap_cli.config import DEFAULT_CLIP_PRETRAINED
from clipcap_cli.errors import ClipCapError, UsageError
from clipcap_cli.fsutil import atomic_write

if TYPE_CHECKING:
    import torch

    from clipcap_cli.data.features import FeatureSet

ORIGINAL_PREPROCESS = (
    "original ClipCap parse_coco.py: skimage.io.imread -> PIL -> OpenAI CLIP preprocess "
    "(Resize bicubic -> CenterCrop -> RGB -> ToTensor -> Normalize OpenAI mean/std)"
)


class LegacyPickleError(ClipCapError):
    """An original-format pickle that is malformed or carries anything but tensors and captions."""


def _load_storage_from_bytes(data: bytes) -> Any:
    """What ``torch.storage._load_from_bytes`` does, minus the code execution: weights-only."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch notes the pickle protocol; the storage loads fine
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    import collections

    import torch._utils

    return {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a pickled tensor needs; anything else raises."""

    def __init__(self, file: Any, name: str = "pickle"):
        super().__init__(file)
        self._name = name
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise LegacyPickleError(
                f"{self._name}: refusing to load {module}.{name}: this file holds more than tensors and captions (possibly code)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise LegacyPickleError(f"{self._name}: unexpected persistent id in a plain pickle")


def load_original_pickle(path: str | Path) -> dict:
    """Read an original ClipCap features pickle safely and check its layout.

    Returns:
        ``{"clip_embedding": Tensor [N, D], "captions": list[dict]}`` as stored.
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"pickle not found: {path}")
    try:
        if zipfile.is_zipfile(path):  # someone re-saved it with torch.save: torch's own safe loader handles that
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, "rb") as f:
                data = RestrictedUnpickler(f, path.name).load()
    except LegacyPickleError:
        raise
    except Exception as exc:  # truncated file, not a pickle, weights-only refusal
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LegacyPickleError(f"{path.name}: not a readable ClipCap features pickle ({first[:200]})") from exc
    if not isinstance(data, dict) or "clip_embedding" not in data or "captions" not in data:
        keys = sorted(data)[:5] if isinstance(data, dict) else type(data).__name__
        raise LegacyPickleError(f"{path.name}: expected {{'clip_embedding', 'captions'}}, found {keys}")
    emb = data["clip_embedding"]
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2:
        raise LegacyPickleError(f"{path.name}: 'clip_embedding' is not a [N, D] tensor")
    if not isinstance(data["captions"], list):
        raise LegacyPickleError(f"{path.name}: 'captions' is not a list")
    return data


def export_original_pickle(features: FeatureSet, path: str | Path) -> Path:
    """Write ``features`` in the original layout: one embedding row per caption entry.

    Images without captions are left out (the original train.py trains on captions).
    """
    import torch

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    repeats: list[int] = []
    for record in features.records:
        captions = record["captions"]
        ids = record.get("caption_ids") or [None] * len(captions)
        image_id = record.get("image_id")
        for text, caption_id in zip(captions, ids):
            entry: dict[str, Any] = {"image_id": image_id if image_id is not None else record["image"], "caption": text}
            if caption_id is not None:
                entry["id"] = caption_id
            entry["clip_embedding"] = len(entries)  # row index, as parse_coco.py sets it
            entries.append(entry)
        repeats.append(len(captions))
    rows = torch.repeat_interleave(features.embeddings, torch.tensor(repeats, dtype=torch.long), dim=0)
    payload = {"clip_embedding": rows.contiguous(), "captions": entries}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=4)

    return atomic_write(path, write)


def import_original_pickle(
    path: str | Path,
    out: str | Path,
    images: str | Path | None = None,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
) -> tuple[FeatureSet, list[str]]:
    """Convert an original pickle into a features store, one row per image (the first row of each image_id).

    Args:
        path: the ``.pkl`` file.
        out: the store directory to write.
        images: an images root; COCO ids are resolved to files there as the original did.
        clip_model, clip_pretrained: what made the embeddings; guessed from the width when None.

    Returns:
        The written store and a list of warnings about the file.
    """
    import torch

    from clipcap_cli.config import CLIP_FOR_DIM
    from clipcap_cli.data.datasets import group_caption_entries
    from clipcap_cli.data.features import load_features, save_features
    from clipcap_cli.data.images import ImageResolver

    path = Path(path).expanduser()
    data = load_original_pickle(path)
    emb: torch.Tensor = data["clip_embedding"]
    entries: list[dict] = data["captions"]
    warnings: list[str] = []
    if emb.shape[0] != len(entries):
        warnings.append(
            f"{emb.shape[0]} embedding rows for {len(entries)} caption entries (parse_conceptual.py's train file has this bug: rows may be offset)"
        )
    first_row: dict[Any, int] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "clip_embedding" not in entry:
            raise LegacyPickleError(f"{path.name}: caption entry {i} has no 'clip_embedding' row index")
        row = entry["clip_embedding"]
        if not isinstance(row, int) or not 0 <= row < emb.shape[0]:
            raise LegacyPickleError(
                f"{path.name}: caption entry {i} points at row {row!r}, the tensor has {emb.shape[0]}"
            )
        first_row.setdefault(entry.get("image_id"), row)
    resolver = ImageResolver(Path(images).expanduser().resolve()) if images else None
    records = list(group_caption_entries(path, entries, resolver, normalize_ids=False))
    rows = torch.tensor([first_row[r["image_id"]] for r in records], dtype=torch.long)
    dim = int(emb.shape[1])
    meta = {
        "clip_model": clip_model or CLIP_FOR_DIM.get(dim),
        "clip_pretrained": clip_pretrained if clip_model else (clip_pretrained or DEFAULT_CLIP_PRETRAINED),
        "clip_activation": "quick_gelu",  # the original encoded with OpenAI's own CLIP package
        "clip_model_guessed": clip_model is None,
        "normalized": False,
        "preprocess": ORIGINAL_PREPROCESS,
        "source": str(path.resolve()),
        "dataset_format": "original-pickle",
        "images_root": str(resolver.root) if resolver else None,
        "counts": {
            "records": len(records),
            "images": len(records),
            "captions": len(entries),
            "pickle_rows": int(emb.shape[0]),
            "skipped": 0,
        },
        "import_warnings": warnings,
    }
    out = save_features(out, emb.index_select(0, rows), records, meta)
    return load_features(out), warnings
