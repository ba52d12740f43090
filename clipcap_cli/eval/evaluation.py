"""`clipcap eval` without the terminal: the options and the JSON report. References, predictions and their
matching are read by ``references.py``; the scores come from :func:`clipcap_cli.eval.metrics.score` and, for
CLIPScore, ``eval_clip``; captioning the reference images with a model is ``eval_captioning``; nothing here prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from clipcap_cli.config import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from clipcap_cli.data.inputs import WORKERS, check_loading
from clipcap_cli.decoding.precision import DEFAULT_PRECISION
from clipcap_cli.errors import UsageError
from clipcap_cli.eval.clip_scores import add_clip_metrics, clip_metrics
from clipcap_cli.eval.references import (
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
    from clipcap_cli.decoding.decode import DecodingOptions

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
    "paper_comparison",
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
        from clipcap_cli.decoding.precision import PRECISIONS
        from clipcap_cli.eval import metrics

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
    from clipcap_cli.eval import metrics

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
    from clipcap_cli.eval import metrics

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
    clip = clip_metrics(
        references, predictions, matching, keys, options, requested_metrics(options.metrics), clip_progress
    )
    add_clip_metrics(report, clip, keys)
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
    from clipcap_cli.eval import metrics
    from clipcap_cli.eval.clipscore import METRIC_NAMES as CLIP_NAMES

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
    from clipcap_cli.eval import metrics

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
    from clipcap_cli.eval import metrics

    rows = report.get("per_image") or []
    if not rows:
        return None, []
    available = rows[0]["scores"]
    metric = next((m for m in ("CIDEr", "BLEU-4", *metrics.METRIC_NAMES) if m in available), None)
    if metric is None:
        return None, []
    return metric, sorted(rows, key=lambda r: r["scores"][metric])[:n]


# --------------------------------------------------------------------------- metric names, settings, JSON


def coco_metric_names(names: Iterable[str] | None) -> list[str] | None:
    """``--metrics`` without the CLIP metrics (what :func:`metrics.score` computes); None = all."""
    from clipcap_cli.eval import metrics

    return None if names is None else [n for n in requested_metrics(names) if n in metrics.METRIC_NAMES]


def decoding_settings(options: DecodingOptions) -> dict[str, Any]:
    return asdict(options)


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
