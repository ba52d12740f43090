"""`clipcap eval --model`: caption the reference images (their files, or the features store's stored CLIP
embeddings) with a model, and save those predictions; also where a reference image's file is. Nothing here prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcap_cli.data.inputs import WORKERS
from clipcap_cli.decoding.precision import DEFAULT_PRECISION
from clipcap_cli.errors import UsageError
from clipcap_cli.eval.references import Prediction, Predictions, References, RefImage
from clipcap_cli.fsutil import write_text_atomic

if TYPE_CHECKING:
    from clipcap_cli.decoding.decode import DecodingOptions


def caption_references(
    references: References,
    model: str,
    *,
    images_root: Path | None,
    decoding: DecodingOptions,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str = DEFAULT_PRECISION,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    allow_missing: bool = False,
    workers: int | None = WORKERS,
) -> Predictions:
    """Caption every reference image with ``model`` (a registry name or a checkpoint path).

    With a features store as references and no ``images_root``, the stored CLIP embeddings are
    captioned (no image files needed; they must come from the model's CLIP). Otherwise the images
    are read under ``images_root`` (else the store's root, else the references file's folder):
    missing files fail before the model is loaded, unless ``allow_missing`` (then they count as
    missing predictions); files that cannot be decoded become failed predictions.
    ``on_start(total)`` and ``on_progress(done)`` drive a progress bar.
    """
    use_features = references.embeddings is not None and images_root is None
    root = images_root or references.images_root or references.source.parent
    todo: list[tuple[RefImage, Any]] = []
    if use_features:
        todo = [(ref, ref.row) for ref in references.images]
    else:
        absent: list[RefImage] = []
        for ref in references.images:
            path = locate_image(ref, root)
            if path is None:
                absent.append(ref)
            else:
                todo.append((ref, path))
        if absent and (not allow_missing or not todo):
            example = absent[0].image or f"image_id {absent[0].image_id}"
            raise UsageError(
                f"{len(absent)} of {len(references.images)} reference images are not under {root} "
                f"(e.g. {example}): point --images at the folder that holds them"
                + ("" if not todo else ", or pass --allow-missing to score the others")
            )

    from clipcap_cli.loading import load_model

    captioner = load_model(model, device=device, precision=precision)
    if use_features:
        _check_features_clip(references, captioner.config, model)
    if on_start is not None:
        on_start(len(todo))
    outcomes = (
        _caption_embeddings(captioner, references, todo, decoding, batch_size)
        if use_features
        else _caption_files(captioner, todo, decoding, batch_size, workers)
    )
    items: list[Prediction] = []
    for done, ((ref, _), (text, error)) in enumerate(zip(todo, outcomes, strict=True), start=1):
        items.append(Prediction(ref.image, ref.image_id, text, error))
        if on_progress is not None:
            on_progress(done)
    return Predictions(
        items, None, "model", None if use_features else root, captioned_from="features" if use_features else "images"
    )


def _check_features_clip(references: References, config: Any, model: str) -> None:
    meta = references.features_meta or {}
    stored = (meta.get("clip_model"), meta.get("clip_pretrained"))
    wanted = (config.clip_model, config.clip_pretrained)
    if stored != wanted:
        raise UsageError(
            f"the features in {references.source} come from CLIP {stored[0]} ({stored[1]}) but {model} uses "
            f"{wanted[0]} ({wanted[1]}): pass --images DIR to caption the image files instead"
        )


Todo = list[tuple[RefImage, Any]]  # (reference image, its features row or its file)
Outcome = tuple[str | None, str | None]  # (caption, error)


def _caption_embeddings(
    captioner: Any, references: References, todo: Todo, decoding: DecodingOptions, batch_size: int | None
) -> Iterator[Outcome]:
    """Decode stored CLIP embeddings (rows of the features store) through the captioning stream."""
    rows = (references.embeddings[row] for _, row in todo)  # (D,) each; fp16 when extracted on a GPU
    for out in captioner.stream(rows, decoding, batch_size=batch_size, workers=0):
        yield out.result.text, None


def _caption_files(
    captioner: Any, todo: Todo, decoding: DecodingOptions, batch_size: int | None, workers: int | None
) -> Iterator[Outcome]:
    """Caption image files through the captioning stream (``workers`` decoding processes). An
    unreadable image fails alone: the rest of its batch is captioned."""
    paths = [str(path) for _, path in todo]
    for out in captioner.stream(paths, decoding, batch_size=batch_size, workers=workers):
        yield (out.result.text, None) if out.error is None else (None, f"{paths[out.index]}: {out.error}")


def locate_image(ref: RefImage, root: Path) -> Path | None:
    """The reference image's file: its path under ``root``, or where its COCO id says (the dataset
    readers' rule: ``datasets.coco_id_candidates`` through an ``ImageResolver``)."""
    from clipcap_cli.data.datasets import coco_id_candidates
    from clipcap_cli.data.images import ImageResolver

    if ref.image:
        candidates = [ref.image]
    elif isinstance(ref.image_id, int):
        candidates = coco_id_candidates(ref.image_id)
    else:
        return None
    found = ImageResolver(root).existing(candidates)
    return None if found is None else root / Path(found).expanduser()


def write_predictions(path: str | Path, predictions: Predictions) -> Path:
    """Write predictions as JSON Lines (``{"path", "image_id", "caption", "error"}``, the shape of
    ``clipcap caption --jsonl``), atomically; ``clipcap eval --predictions`` reads them back."""
    path = Path(path).expanduser()
    lines = [
        json.dumps(
            {"path": p.image, "image_id": p.image_id, "caption": p.caption, "error": p.error}, ensure_ascii=False
        )
        for p in predictions.items
    ]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return path
