"""CLIP *text* features for text-only training (CapDec): captions encoded with CLIP's text tower
into a features store that ``clipcap train`` reads as it reads image features.

The store has the format of ``features.py``, with one record per caption::

    {"image": <the source's image name, "" for a .txt file>, "image_id": <id or None>, "captions": [caption]}

so ``embeddings[i]`` is the text embedding of record i's single caption, and training pairs each
caption with its own embedding, unchanged. ``meta.json`` says ``"modality": "text"``; from it
``clipcap train`` turns on CapDec's recipe (normalised prefix, noise variance 0.016). Embeddings are
stored raw (``encode_text`` without normalisation), as CapDec's embeddings_generator.py stores them.

Encoding is not resumable (text is fast); the store is written atomically by ``save_features``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from clipcap_cli.config import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from clipcap_cli.errors import ClipCapError, ModelNotAvailableError, UsageError

if TYPE_CHECKING:
    import torch

MODALITY = "text"
TEXT_SUFFIXES = (".txt",)

ProgressFn = Callable[[int, int], None]  # (captions encoded, captions to encode)


@dataclass(frozen=True)
class TextExtractOptions:
    """How ``clipcap extract --text`` encodes captions. The CLI takes its defaults from here."""

    clip_model: str = DEFAULT_CLIP_MODEL  # open_clip name, or local-dir:PATH
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED  # None = random weights (tests)
    batch_size: int = 64  # captions per encode_text call (the CLI passes extract's --batch-size)
    device: str | None = None  # None = CUDA, then MPS, then CPU

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")


@dataclass
class TextExtractResult:
    """What one ``extract_text`` call did."""

    out: Path
    records: int = 0  # records (images, or lines) in the source
    captions: int = 0  # captions encoded (rows of the store)
    empty: int = 0  # empty captions skipped
    noop: bool = False  # the same store was already there
    skipped: list[dict] = field(default_factory=list)  # always empty: kept for the CLI's summary


def read_caption_lines(path: str | Path) -> list[dict]:
    """A plain text file, one caption per line, as records without images (blank lines kept as
    empty captions, so they are counted as skipped)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return [{"image": "", "image_id": i, "captions": [line.strip()]} for i, line in enumerate(text.splitlines())]


def read_caption_source(
    source: str | Path, images: str | Path | None = None, fmt: str = "auto", split: str | None = None
) -> tuple[list[dict], dict]:
    """(records, description) of a caption source: a ``.txt`` file of lines, or any dataset
    ``datasets.read_dataset`` reads (its images are not read, and need not exist)."""
    path = Path(source).expanduser()
    if path.suffix.lower() in TEXT_SUFFIXES and fmt == "auto":
        return read_caption_lines(path), {"source": str(path.resolve()), "dataset_format": "lines"}
    from clipcap_cli.data.datasets import read_dataset

    ds = read_dataset(source, images, fmt, split)
    return list(ds.records()), ds.describe()


def caption_records(records: Iterable[dict]) -> tuple[list[dict], int]:
    """(one record per non-empty caption, the number of empty captions left out)."""
    out, empty = [], 0
    for record in records:
        for caption in record.get("captions") or []:
            caption = str(caption).strip()
            if not caption:
                empty += 1
                continue
            out.append(
                {"image": str(record.get("image") or ""), "image_id": record.get("image_id"), "captions": [caption]}
            )
    return out, empty


def load_text_clip(model_name: str, pretrained: str | None, device: Any) -> tuple[Any, Any]:
    """(the whole open_clip model, in eval mode on ``device``, its tokenizer)."""

    from clipcap_cli.weights import clip_tower

    model, _ = clip_tower.load_clip(model_name, pretrained, device, text=True)
    try:
        import open_clip

        # open_clip reads a local-dir: folder's open_clip_config.json to pick the tokenizer
        tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(f"no CLIP tokenizer for {model_name}: {str(exc).splitlines()[0]}") from None
    return model, tokenizer


def encode_texts(
    model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int, on_progress: ProgressFn | None = None
) -> torch.Tensor:
    """(N, D) raw ``encode_text`` embeddings of ``texts``, in batches, without gradients, on CPU.

    Long captions are cut to the text tower's context length by the tokenizer (CapDec cut them to 100
    characters when CLIP's tokenizer refused them).
    """
    import torch

    device = next(model.parameters()).device
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(list(texts[start : start + batch_size])).to(device)
            rows.append(model.encode_text(tokens).cpu())
            if on_progress:
                on_progress(min(start + batch_size, len(texts)), len(texts))
    if not rows:
        return torch.empty(0, 0)
    return torch.cat(rows)


def extract_text(
    records: Sequence[dict],
    out: str | Path,
    options: TextExtractOptions = TextExtractOptions(),
    *,
    source: dict | None = None,
    clip: tuple[Any, Any] | None = None,
    on_progress: ProgressFn | None = None,
) -> TextExtractResult:
    """Encode every caption of ``records`` with CLIP's text tower and write the text store ``out``.

    Args:
        records: dataset records (``datasets.Dataset.records()`` or ``read_caption_lines``).
        out: the store directory. A complete store made with the same settings is left as it is
            (``noop``); one made differently is refused (clear it first: ``features.clear_store``).
        options: model, batch size, device.
        source: description of the dataset (file, format), kept in the metadata.
        clip: an already loaded ``(model, tokenizer)`` (the whole open_clip model); loaded when None.
        on_progress: called with (captions done, captions total).
    """
    from clipcap_cli.data import features
    from clipcap_cli.fsutil import check_folder, remove_stale_temps

    out = check_folder(out)
    remove_stale_temps(out)
    rows, empty = caption_records(records)
    settings = _settings(rows, options, clip)
    result = TextExtractResult(out, records=len(records), captions=len(rows), empty=empty)
    if features.store_is_complete(out):
        old = _read_meta(out)
        if old.get("modality") == MODALITY and old.get("run_settings", {}).get("sha256") == settings["sha256"]:
            result.noop = True
            return result
        raise UsageError(f"{out} already holds a features store made differently: use --overwrite or another --out")
    if not rows:
        raise UsageError("the dataset has no captions to encode" + (f" ({empty} empty ones)" if empty else ""))

    device = _device(options, clip)
    model, tokenizer = clip if clip is not None else load_text_clip(options.clip_model, options.clip_pretrained, device)
    embeddings = encode_texts(model, tokenizer, [r["captions"][0] for r in rows], options.batch_size, on_progress)
    if not bool(embeddings.float().isfinite().all()):
        raise ClipCapError(f"CLIP {options.clip_model} made non-finite text embeddings: nothing was written")
    meta = _meta(options, settings, source or {}, result, device, tokenizer)
    features.save_features(out, embeddings, rows, meta)
    return result


def _device(options: TextExtractOptions, clip: tuple[Any, Any] | None) -> Any:
    if clip is not None:
        return next(clip[0].parameters()).device
    from clipcap_cli.device import pick_device

    return pick_device(options.device)


def _settings(rows: list[dict], options: TextExtractOptions, clip: tuple[Any, Any] | None) -> dict:
    """What makes a text store: the CLIP and its weights, and the captions in order."""
    from clipcap_cli.data.features import clip_weights_sha256
    from clipcap_cli.weights.clip_tower import clip_activation

    captions = json.dumps([[r["image"], r["image_id"], r["captions"][0]] for r in rows], ensure_ascii=False)
    settings = {
        "modality": MODALITY,
        "clip_model": options.clip_model,
        "clip_pretrained": options.clip_pretrained,
        "clip_activation": clip_activation(options.clip_model, options.clip_pretrained),
        "clip_weights_sha256": clip_weights_sha256(options.clip_model, options.clip_pretrained),
        "captions": len(rows),
        "captions_sha256": hashlib.sha256(captions.encode("utf-8")).hexdigest(),
        "given_model": clip is not None,
    }
    settings["sha256"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return settings


def _read_meta(out: Path) -> dict:
    from clipcap_cli.data.features import META_FILE

    try:
        return json.loads((out / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _meta(
    options: TextExtractOptions, settings: dict, source: dict, result: TextExtractResult, device: Any, tokenizer: Any
) -> dict:
    from clipcap_cli.data.extract_parts import _versions

    return {
        "modality": MODALITY,
        "clip_model": options.clip_model,
        "clip_pretrained": options.clip_pretrained,
        "clip_activation": settings["clip_activation"],
        "normalized": False,  # raw encode_text output, as CapDec's embeddings_generator.py stored it
        "tokenizer": type(tokenizer).__name__,
        "context_length": getattr(tokenizer, "context_length", None),
        "device": str(device),
        "source": source.get("source"),
        "dataset_format": source.get("dataset_format"),
        "images_root": None,
        "counts": {"records": result.records, "captions": result.captions, "empty_skipped": result.empty},
        "versions": _versions(),
        "run_settings": settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
