"""CLIPScore and RefCLIPScore for `clipcap eval`'s report: the images (the references' stored embeddings, or the
image files), the CLIP that scores them, and the outcome (values, or why they could not be computed, like SPICE
without Java). The scores themselves come from ``clipscore``; nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcap_cli.captioner import BATCH_SIZE
from clipcap_cli.data.inputs import default_workers
from clipcap_cli.eval.captioning import locate_image
from clipcap_cli.eval.references import Matching, Predictions, References, RefImage

if TYPE_CHECKING:
    from clipcap_cli.eval.evaluation import EvalOptions


@dataclass
class ClipOutcome:
    """CLIPScore/RefCLIPScore for the report: values, or why they could not be computed."""

    scores: dict[str, float]  # requested CLIP metrics that ran -> corpus value (0-2.5)
    per_image: dict[Any, dict[str, float]]  # scored key -> its values
    unavailable: dict[str, str]  # requested CLIP metrics that could not run -> why
    clip: tuple[str, str | None] | None = None  # (model, pretrained) when requested
    note: str | None = None  # for the report's notes (e.g. stored embeddings were used)


def clip_metrics(
    references: References,
    predictions: Predictions,
    matching: Matching,
    keys: Sequence[Any],
    options: EvalOptions,
    wanted: Sequence[str],
    on_progress: Callable[[int, int], None] | None = None,
) -> ClipOutcome:
    """CLIPScore and RefCLIPScore (those among ``wanted``, the requested metric names) of the scored images.

    The images are the references' own stored embeddings when they are a features store made
    with ``options.clip_model``; else the image files under the --model run's folder, --images or
    the store's root. No images, a missing or unreadable one, or a CLIP that is not available
    make both unavailable (with the reason), like SPICE without Java.
    ``on_progress(done, total)`` follows the image files as they are encoded.
    """
    from clipcap_cli.eval import clipscore

    names = [name for name in clipscore.METRIC_NAMES if name in wanted]
    if not names:
        return ClipOutcome({}, {}, {})
    clip = (options.clip_model, options.clip_pretrained)
    try:
        features, text, stored = _clip_inputs(
            references, predictions, [matching.info[key] for key in keys], options, on_progress
        )
    except _ClipUnavailable as exc:
        return ClipOutcome({}, {}, {name: str(exc) for name in names}, clip)
    result = clipscore.score(
        features, [matching.predictions[key] for key in keys], text, [matching.references[key] for key in keys]
    )
    values = result.as_metrics()
    per_image = [{"CLIPScore": c, "RefCLIPScore": r} for c, r in zip(result.per_image_clip, result.per_image_ref or ())]
    note = f"{' and '.join(names)} from the CLIP embeddings stored in {references.source}" if stored else None
    return ClipOutcome(
        {name: values[name] for name in names},
        {key: {name: row[name] for name in names} for key, row in zip(keys, per_image)},
        {},
        clip,
        note,
    )


class _ClipUnavailable(Exception):
    """Why CLIPScore cannot be computed (reported as unavailable, like SPICE without Java)."""


def _clip_inputs(
    references: References,
    predictions: Predictions,
    infos: Sequence[RefImage],
    options: EvalOptions,
    on_progress: Callable[[int, int], None] | None,
) -> tuple[Any, Any, bool]:
    """(image features (N, D), the CLIP text side, whether the features came from the store)."""
    from clipcap_cli.device import pick_device
    from clipcap_cli.errors import ModelNotAvailableError
    from clipcap_cli.eval import clipscore

    meta = references.features_meta or {}
    stored = references.embeddings is not None and (meta.get("clip_model"), meta.get("clip_pretrained")) == (
        options.clip_model,
        options.clip_pretrained,
    )
    files = [] if stored else _clip_image_files(predictions.images_root or references.images_root, infos)
    device = pick_device(options.device)
    try:
        model, preprocess = clipscore.load_clip(options.clip_model, options.clip_pretrained, device)
        text = clipscore.ClipText(model, clipscore.get_tokenizer(options.clip_model), device)
    except ModelNotAvailableError as exc:
        raise _ClipUnavailable(str(exc)) from exc
    if stored:
        import torch

        return references.embeddings[torch.tensor([ref.row for ref in infos], dtype=torch.long)].float(), text, True
    features, failed = clipscore.encode_image_files(
        model,
        preprocess,
        [str(f) for f in files],
        device,
        options.batch_size or BATCH_SIZE,
        _workers(options.workers, device),
        on_progress,
    )
    if failed:
        raise _ClipUnavailable(f"{len(failed)} scored images cannot be read (e.g. {failed[0][0]}: {failed[0][1]})")
    return features, text, False


def _workers(requested: int | None, device: Any) -> int:
    return default_workers(device) if requested is None else requested


def _clip_image_files(root: Path | None, infos: Sequence[RefImage]) -> list[Path]:
    """Every scored image's file under ``root``, or :class:`_ClipUnavailable` saying what is missing."""
    if root is None:
        raise _ClipUnavailable("no images to score the captions against: pass --images DIR (the reference images)")
    located = [locate_image(ref, root) for ref in infos]
    absent = [ref for ref, path in zip(infos, located) if path is None]
    if absent:
        example = absent[0].image or f"image_id {absent[0].image_id}"
        raise _ClipUnavailable(f"{len(absent)} of {len(infos)} scored images are not under {root} (e.g. {example})")
    return [path for path in located if path is not None]


def add_clip_metrics(report: dict[str, Any], outcome: ClipOutcome, keys: Sequence[Any]) -> None:
    """Put a :class:`ClipOutcome` into a report made by :func:`evaluate`."""
    report["metrics"].update(outcome.scores)
    report["backends"].update({name: "open_clip" for name in outcome.scores})
    report["unavailable"].update(outcome.unavailable)
    if outcome.note:
        report["notes"].append(outcome.note)
    if outcome.clip is not None:
        report["settings"]["clip_model"], report["settings"]["clip_pretrained"] = outcome.clip
    for row, key in zip(report.get("per_image") or [], keys):
        row["scores"].update(outcome.per_image.get(key, {}))
