"""`clipcap eval` without the terminal: the options, captioning the reference images with a model,
CLIPScore, and the JSON report. References, predictions and their matching are read by
``references.py``; the scores come from :func:`clipcap_cli.metrics.score`; nothing here prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcap_cli.captioner import BATCH_SIZE
from clipcap_cli.config import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from clipcap_cli.errors import UsageError
from clipcap_cli.fsutil import write_text_atomic
from clipcap_cli.inputs import WORKERS, check_loading, default_workers
from clipcap_cli.precision import DEFAULT_PRECISION
from clipcap_cli.references import (
    DEFAULT_SPLIT,
    REFS_FORMATS,
    Matching,
    Prediction,
    Predictions,
    References,
    RefImage,
    check_matching,
    coco_id_from_name,
    match,
    read_predictions,
    read_references,
)

if TYPE_CHECKING:
    from clipcap_cli.decoding import DecodingOptions

__all__ = [
    "REFS_FORMATS",
    "SCALE",
    "REPORT_KEYS",
    "EvalOptions",
    "RefImage",
    "References",
    "Prediction",
    "Predictions",
    "Matching",
    "read_references",
    "read_predictions",
    "coco_id_from_name",
    "match",
    "check_matching",
    "evaluate",
    "worst_images",
    "report_json",
    "caption_references",
    "write_predictions",
    "paper_comparison",
    "ClipOutcome",
    "clip_metrics",
    "check_scorers",
]

#: The ``scale`` entry of the JSON report: values are what pycocoevalcap returns.
SCALE = "0-1 (CIDEr: pycocoevalcap scale; CLIPScore, RefCLIPScore: 0-2.5, as jmhessel/clipscore)"
#: Top-level keys of the JSON report, always present (``per_image`` and ``paper`` only on request).
REPORT_KEYS: tuple[str, ...] = (
    "metrics",
    "scale",
    "counts",
    "tokenizer",
    "backends",
    "unavailable",
    "notes",
    "matched_by",
    "settings",
)
FAILED_NOTE = "predictions failed (records with an error)"
KARPATHY_TEST_IMAGES = 5000
PAPER_SOURCE = "ClipCap (Mokady et al., 2021), Table 1, COCO Karpathy test split"


@dataclass(frozen=True)
class EvalOptions:
    """Defaults of ``clipcap eval`` (the Typer options read them from here)."""

    refs_format: str = "auto"  # one of REFS_FORMATS
    split: str = DEFAULT_SPLIT  # Karpathy split scored: the paper's numbers are on the 5000 test images
    metrics: tuple[str, ...] | None = None  # None = every metric in metrics.METRIC_NAMES
    tokenizer: str = "auto"  # metrics.TOKENIZERS: Java PTBTokenizer when there, else the Python imitation
    backend: str = "auto"  # metrics.BACKENDS
    allow_missing: bool = False  # score the common images instead of failing on a key mismatch
    per_image: bool = False  # per-image scores in the report, for error analysis
    batch_size: int | None = (
        None  # --model: images per CLIP + decoding batch (None: as clipcap caption, for the device)
    )
    precision: str = DEFAULT_PRECISION  # --model: GPT-2's precision (auto = fp32, exact)
    device: str | None = None  # --model: None = the best available device
    workers: int | None = WORKERS  # --model: image-decoding worker processes (0 = in this process; None = as caption)
    worst: int = 10  # per-image rows shown on a terminal
    clip_model: str = (
        DEFAULT_CLIP_MODEL  # CLIPScore/RefCLIPScore: open_clip name or local-dir:PATH (the paper's ViT-B/32)
    )
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED  # its open_clip tag (None for local-dir: models)

    def __post_init__(self) -> None:
        # Messages name the `clipcap eval` flags: each field is the option of the same name.
        from clipcap_cli import metrics
        from clipcap_cli.precision import PRECISIONS

        for flag, value, choices in (
            ("--refs-format", self.refs_format, REFS_FORMATS),
            ("--precision", self.precision, PRECISIONS),
            ("--tokenizer", self.tokenizer, metrics.TOKENIZERS),
            ("--backend", self.backend, metrics.BACKENDS),
        ):
            if value not in choices:
                raise UsageError(f"{flag} {value}: choose one of {', '.join(choices)}")
        if self.metrics is not None:
            requested_metrics(self.metrics)  # the names are checked where they are read
        check_loading(self.batch_size, self.workers)
        if self.worst < 0:
            raise UsageError(f"worst must be 0 or more, got {self.worst}")


def check_scorers(options: EvalOptions) -> None:
    """Refuse a tokenizer or backend this machine cannot run, before any time goes into captioning."""
    from clipcap_cli import metrics

    metrics.check_backends(options.backend, options.tokenizer)


# --------------------------------------------------------------------------- scoring and the report


def evaluate(
    references: References,
    predictions: Predictions,
    options: EvalOptions = EvalOptions(),
    *,
    settings: Mapping[str, Any] | None = None,
    compare_paper: bool = False,
    clip_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Match, score and return the JSON report (schema in the README and ``clipcap eval --help``).

    ``settings`` is copied into the report's ``settings`` (how the predictions were made).
    ``clip_progress(done, total)`` follows the images CLIPScore encodes (see :func:`clip_metrics`).
    """
    from clipcap_cli import metrics

    matching = match(references, predictions.items)
    check_matching(matching, options.allow_missing)
    keys = matching.scored_keys
    result = metrics.score(
        {k: matching.references[k] for k in keys},
        {k: matching.predictions[k] for k in keys},
        metrics=coco_metric_names(options.metrics),
        backend=options.backend,
        tokenizer=options.tokenizer,
        per_image=options.per_image,
    )
    report: dict[str, Any] = {
        "metrics": dict(result.scores),
        "scale": SCALE,
        "counts": {
            "images": result.n_images,  # scored
            "reference_captions": result.n_references,  # over the scored images
            "reference_images": len(matching.references),
            "references_without_captions": references.without_captions,
            "predictions": len(predictions.items),
            "failed_predictions": len(matching.failed),
            "missing_predictions": len(matching.missing),
            "unmatched_predictions": len(matching.unmatched),
        },
        "tokenizer": result.tokenizer,
        "backends": dict(result.backends),
        "unavailable": dict(result.unavailable),
        "notes": [*result.notes, *_matching_notes(matching, options.allow_missing)],
        "matched_by": matching.by,
        "settings": _settings(references, predictions, options, settings),
    }
    if result.per_image is not None:
        report["per_image"] = [
            {
                "image": matching.info[key].image,
                "image_id": matching.info[key].image_id,
                "caption": matching.predictions[key],
                "references": matching.references[key],
                "scores": dict(result.per_image[key]),
            }
            for key in keys
        ]
    _add_clip_metrics(report, clip_metrics(references, predictions, matching, keys, options, clip_progress), keys)
    if compare_paper:
        report["paper"] = paper_comparison(result.scores, references, result.n_images)
    return report


def _matching_notes(matching: Matching, allow_missing: bool) -> list[str]:
    notes = []
    if matching.failed:
        first = matching.failed[0][1]
        notes.append(
            f"{FAILED_NOTE}: {len(matching.failed)} images are not scored (e.g. {first.where()}: {first.error})"
        )
    if matching.missing and allow_missing:
        notes.append(f"{len(matching.missing)} reference images without a prediction are not scored (--allow-missing)")
    if matching.unmatched and allow_missing:
        notes.append(f"{len(matching.unmatched)} predictions without references are ignored (--allow-missing)")
    return notes


def _settings(
    references: References, predictions: Predictions, options: EvalOptions, given: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The report's ``settings``: its fixed keys, with ``given`` (how --model captioned) filled in."""
    settings = {
        "refs": str(references.source),
        "refs_format": references.format,
        "split": references.split,
        "images": _str_or_none(predictions.images_root or references.images_root),
        "predictions": None if predictions.source is None else str(predictions.source),
        "predictions_format": predictions.format,
        "model": None,  # --model: the name or path given
        "decoding": None,  # --model: DecodingOptions as a dict
        "batch_size": None,  # --model
        "device": None,  # --model: as requested (None = best available)
        "precision": None,  # --model: GPT-2's precision
        "save_predictions": None,  # --model --save-predictions FILE
        "captioned_from": predictions.captioned_from,  # --model: "images" or "features"
        "metrics": requested_metrics(options.metrics),
        "tokenizer": options.tokenizer,
        "backend": options.backend,
        "allow_missing": options.allow_missing,
        "clip_model": None,  # CLIPScore/RefCLIPScore requested: the CLIP that scored them
        "clip_pretrained": None,
    }
    unknown = set(given or {}) - set(settings)
    if unknown:
        raise ValueError(f"unknown settings keys {sorted(unknown)}: the report schema is fixed")
    settings.update(given or {})
    return settings


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def requested_metrics(names: Iterable[str] | None) -> list[str]:
    """The one reading of metric names (``--metrics``; any case, "BLEU" = all four, None = all): the
    COCO metrics in metrics.METRIC_NAMES order, then clipscore.METRIC_NAMES. ``UsageError`` names an
    unknown one and the choices."""
    from clipcap_cli import metrics
    from clipcap_cli.clipscore import METRIC_NAMES as CLIP_NAMES

    if names is None:
        return [*metrics.METRIC_NAMES, *CLIP_NAMES]
    names = list(names)
    clip = {n.lower(): n for n in CLIP_NAMES}
    try:
        coco = metrics.resolve_metrics([n for n in names if n.lower() not in clip])
    except metrics.MetricsInputError:
        coco = []
    known = {n.lower() for n in (*metrics.METRIC_NAMES, *CLIP_NAMES, "BLEU")}
    unknown = [n for n in names if n.lower() not in known]
    if unknown or not names:
        raise UsageError(
            f"metrics: unknown metric {', '.join(unknown) or '(none given)'}; "
            f"choose from BLEU, {', '.join((*metrics.METRIC_NAMES, *CLIP_NAMES))}"
        )
    return [*coco, *(n for n in CLIP_NAMES if n.lower() in {x.lower() for x in names})]


def paper_comparison(
    scores: Mapping[str, float], references: References | None = None, n_images: int | None = None
) -> dict[str, Any]:
    """Our scores and the paper's Table 1 rows, both x100 (the paper's scale); ``note`` says why
    they may not be comparable (other references, another number of images)."""
    from clipcap_cli import metrics

    ours = {name: value * metrics.PAPER_SCALE for name, value in scores.items()}
    out: dict[str, Any] = {
        "source": PAPER_SOURCE,
        "scale": "x100",
        "ours": ours,
        "rows": {row: dict(values) for row, values in metrics.PAPER_TABLE1_COCO.items()},
        "note": None,
    }
    if references is not None and (references.format != "karpathy" or references.split != "test"):
        what = references.format + (f" split {references.split}" if references.split else "")
        out["note"] = (
            f"the paper scores the Karpathy test split ({KARPATHY_TEST_IMAGES} images); these references are {what}"
        )
    elif n_images is not None and n_images != KARPATHY_TEST_IMAGES:
        out["note"] = f"the paper scores all {KARPATHY_TEST_IMAGES} Karpathy test images; {n_images} were scored here"
    return out


def worst_images(report: Mapping[str, Any], n: int) -> tuple[str | None, list[dict]]:
    """The ``n`` lowest-scoring images of a report with ``per_image``, by CIDEr (else BLEU-4, ...)."""
    from clipcap_cli import metrics

    rows = report.get("per_image") or []
    if not rows:
        return None, []
    available = rows[0]["scores"]
    metric = next((m for m in ("CIDEr", "BLEU-4", *metrics.METRIC_NAMES) if m in available), None)
    if metric is None:
        return None, []
    return metric, sorted(rows, key=lambda r: r["scores"][metric])[:n]


# --------------------------------------------------------------------------- CLIPScore


def coco_metric_names(names: Iterable[str] | None) -> list[str] | None:
    """``--metrics`` without the CLIP metrics (what :func:`metrics.score` computes); None = all."""
    from clipcap_cli import metrics

    return None if names is None else [n for n in requested_metrics(names) if n in metrics.METRIC_NAMES]


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
    on_progress: Callable[[int, int], None] | None = None,
) -> ClipOutcome:
    """CLIPScore and RefCLIPScore (as requested by ``options.metrics``) of the scored images.

    The images are the references' own stored embeddings when they are a features store made
    with ``options.clip_model``; else the image files under the --model run's folder, --images or
    the store's root. No images, a missing or unreadable one, or a CLIP that is not available
    make both unavailable (with the reason), like SPICE without Java.
    ``on_progress(done, total)`` follows the image files as they are encoded.
    """
    from clipcap_cli import clipscore

    names = [name for name in clipscore.METRIC_NAMES if name in requested_metrics(options.metrics)]
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
    from clipcap_cli import clipscore
    from clipcap_cli.device import pick_device
    from clipcap_cli.errors import ModelNotAvailableError

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
    located = [_locate(ref, root) for ref in infos]
    absent = [ref for ref, path in zip(infos, located) if path is None]
    if absent:
        example = absent[0].image or f"image_id {absent[0].image_id}"
        raise _ClipUnavailable(f"{len(absent)} of {len(infos)} scored images are not under {root} (e.g. {example})")
    return [path for path in located if path is not None]


def _add_clip_metrics(report: dict[str, Any], outcome: ClipOutcome, keys: Sequence[Any]) -> None:
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


# --------------------------------------------------------------------------- --model


def caption_references(
    references: References,
    model: str,
    *,
    images_root: Path | None,
    decoding: DecodingOptions,
    batch_size: int | None = EvalOptions.batch_size,
    device: str | None = None,
    precision: str = EvalOptions.precision,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    allow_missing: bool = False,
    workers: int | None = EvalOptions.workers,
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
            path = _locate(ref, root)
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


def _locate(ref: RefImage, root: Path) -> Path | None:
    """The reference image's file: its path under ``root``, or where its COCO id says (the dataset
    readers' rule: ``datasets.coco_id_candidates`` through an ``ImageResolver``)."""
    from clipcap_cli.datasets import coco_id_candidates
    from clipcap_cli.images import ImageResolver

    if ref.image:
        candidates = [ref.image]
    elif isinstance(ref.image_id, int):
        candidates = coco_id_candidates(ref.image_id)
    else:
        return None
    found = ImageResolver(root).existing(candidates)
    return None if found is None else root / Path(found).expanduser()


def decoding_settings(options: DecodingOptions) -> dict[str, Any]:
    return asdict(options)


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


def report_json(report: Mapping[str, Any]) -> str:
    """The report as JSON text (non-finite floats, which JSON lacks, become null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(report), indent=2, ensure_ascii=False)
