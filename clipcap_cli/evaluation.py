"""`clipcap eval` without the terminal: reading reference captions and predictions, matching their
keys, captioning the reference images with a model, and assembling the JSON report.

Matching rule (documented in ``clipcap eval --help``): by COCO image id when every reference and
every prediction has one (an ``image_id`` field, or a COCO file name such as
``COCO_val2014_000000123456.jpg`` / ``000000123456.jpg``); otherwise by path, compared on their
trailing components, so ``/data/coco/val2014/x.jpg`` matches the reference ``val2014/x.jpg`` and a
bare ``x.jpg`` matches it when no other reference image has that name.

The scores come from :func:`clipcap_cli.metrics.score`; nothing here prints.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from clipcap_cli.captioner import BATCH_SIZE
from clipcap_cli.config import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from clipcap_cli.datasets import CAPTION_COLUMNS, IMAGE_COLUMNS, iter_jsonl, normalize_id
from clipcap_cli.errors import UsageError
from clipcap_cli.fsutil import write_text_atomic
from clipcap_cli.inputs import WORKERS, check_loading, default_workers
from clipcap_cli.metrics import KeyMismatchError
from clipcap_cli.precision import DEFAULT_PRECISION

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

REFS_FORMATS: tuple[str, ...] = ("auto", "coco", "karpathy", "caption-list", "features", "jsonl")
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

# Fields a record may name its image by, and its caption by (datasets.py's manifest columns).
# COCO file names: COCO_val2014_000000123456.jpg (2014) and 000000123456.jpg (2017).
_COCO_STEM = re.compile(r"(?:COCO_[A-Za-z]+\d{4}_)?(\d{12})")


@dataclass(frozen=True)
class EvalOptions:
    """Defaults of ``clipcap eval`` (the Typer options read them from here)."""

    refs_format: str = "auto"  # one of REFS_FORMATS
    split: str = "test"  # Karpathy split scored: the paper's numbers are on the 5000 test images
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


# --------------------------------------------------------------------------- records


@dataclass
class RefImage:
    """One reference image: where it is (relative to the images root), its id, its captions."""

    image: str | None
    image_id: int | str | None
    captions: list[str]
    row: int | None = None  # features store: the embedding row of this image


@dataclass
class References:
    """Reference captions, one entry per image that has at least one caption."""

    images: list[RefImage]
    source: Path
    format: str  # coco, karpathy, caption-list, features or jsonl
    split: str | None  # the Karpathy split read (None for other formats)
    images_root: Path | None  # where the images are, when known (--images, or the features store's root)
    without_captions: int = 0  # images in the file with no caption (not scored)
    embeddings: Any = None  # features store: its CLIP embeddings, shape = (N_rows, D)
    features_meta: dict | None = None  # features store: its meta.json


@dataclass
class Prediction:
    """One predicted caption; ``error`` set when captioning that image failed."""

    image: str | None
    image_id: int | str | None
    caption: str | None
    error: str | None = None
    line: int | None = None  # 1-based record number in the predictions file, for messages

    def where(self) -> str:
        name = self.image if self.image is not None else f"image_id {self.image_id!r}"
        return f"{name} (record {self.line})" if self.line is not None else str(name)


@dataclass
class Predictions:
    items: list[Prediction]
    source: Path | None  # the predictions file (None for --model)
    format: str  # "jsonl" (clipcap caption --jsonl), "coco" (results list) or "model"
    images_root: Path | None = None  # --model: where the images were read from
    captioned_from: str | None = None  # --model: "images" or "features" (stored CLIP embeddings)


@dataclass
class Matching:
    """References and predictions keyed alike, ready for :func:`metrics.score`."""

    by: str  # "image_id" or "path"
    references: dict[Any, list[str]]  # every reference image with captions
    predictions: dict[Any, str]  # key -> caption, for the successful predictions that matched
    info: dict[Any, RefImage]  # key -> the reference image
    missing: list[Any]  # reference keys with no prediction at all
    failed: list[tuple[Any, Prediction]]  # matched predictions whose captioning failed
    unmatched: list[Prediction]  # predictions that fit no reference image

    @property
    def scored_keys(self) -> list[Any]:
        return [key for key in self.references if key in self.predictions]


def coco_id_from_name(path: str | None) -> int | None:
    """The COCO image id in a COCO-style file name (``COCO_val2014_000000123456.jpg`` -> 123456)."""
    if not path:
        return None
    found = _COCO_STEM.fullmatch(PurePosixPath(path.replace("\\", "/")).stem)
    return int(found.group(1)) if found else None


def _norm_path(path: str) -> tuple[str, ...]:
    """Path components for suffix matching: posix separators, no "." parts, no drive/root."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    return tuple(p for p in parts if p not in ("", ".", "/") and not p.endswith(":"))


# --------------------------------------------------------------------------- references


def read_references(
    source: str | Path,
    fmt: str = "auto",
    split: str | None = None,
    images: str | Path | None = None,
) -> References:
    """Read reference captions from a COCO captions file, a Karpathy split file, the original
    ClipCap caption list, a features store (directory) or a JSON Lines file.

    Args:
        source: the file (or features directory).
        fmt: one of :data:`REFS_FORMATS`.
        split: the Karpathy split to keep (``None``: :attr:`EvalOptions.split` for Karpathy files;
            giving one for another format is a usage error); ``"all"`` keeps every image.
        images: the images root, used to resolve image paths (and by ``--model`` to find them).
    """
    source = Path(source).expanduser()
    if fmt not in REFS_FORMATS:
        raise UsageError(f"unknown references format {fmt!r}: use one of {', '.join(REFS_FORMATS)}")
    if not source.exists():
        raise UsageError(f"references not found: {source}")
    root = Path(images).expanduser() if images is not None else None
    if root is not None and not root.is_dir():
        raise UsageError(f"--images {images}: not a folder")
    if fmt == "auto":
        if source.is_dir() or source.name == "meta.json":
            fmt = "features"
        elif source.suffix.lower() in (".jsonl", ".ndjson"):
            fmt = "jsonl"
    if split is not None and fmt in ("features", "jsonl"):
        raise UsageError(f"--split applies to Karpathy split files, and {source.name} is {fmt}")
    embeddings = features_meta = None
    if fmt == "features":
        from clipcap_cli.features import load_features

        store = load_features(source)
        records, embeddings, features_meta = store.records, store.embeddings, store.meta
        refs_root = root or (Path(store.meta["images_root"]) if store.meta.get("images_root") else None)
        out_format, out_split = "features", None
    elif fmt == "jsonl":
        records, refs_root, out_format, out_split = list(_jsonl_records(source)), root, "jsonl", None
    else:
        dataset = _read_dataset(source, fmt, split, root)
        records, out_format = list(dataset.records()), dataset.format
        out_split = dataset.split or ("all" if out_format == "karpathy" else None)
        refs_root = root
    images_out: list[RefImage] = []
    empty = 0
    for row, record in enumerate(records):
        captions = [c.strip() for c in record.get("captions") or [] if isinstance(c, str) and c.strip()]
        if not captions:
            empty += 1
            continue
        image = record.get("image")
        images_out.append(
            RefImage(
                None if image in (None, "") else str(image),
                normalize_id(record.get("image_id")),
                captions,
                row if embeddings is not None else None,
            )
        )
    if not images_out:
        detail = f" ({empty} images without captions)" if empty else ""
        raise UsageError(f"{source}: no reference captions to score{detail}")
    return References(images_out, source, out_format, out_split, refs_root, empty, embeddings, features_meta)


def _read_dataset(source: Path, fmt: str, split: str | None, root: Path | None) -> Any:
    """datasets.read_dataset with the eval default split (test) applied only to Karpathy files."""
    from clipcap_cli.datasets import read_dataset

    if source.is_dir():
        raise UsageError(f"{source} is a folder: give a references file, or a features store (--refs-format features)")
    if fmt == "karpathy" or split is not None:
        return read_dataset(source, root, fmt, split or EvalOptions.split)
    if fmt != "auto":
        return read_dataset(source, root, fmt, None)
    # Auto: only a Karpathy file takes a split, and which format this is is known once it is read.
    try:
        return read_dataset(source, root, "auto", EvalOptions.split)
    except UsageError as exc:
        if "--split" not in str(exc):
            raise
    return read_dataset(source, root, "auto", None)


def _first(row: Mapping[str, Any], keys: Sequence[str]) -> Any:
    lowered = {str(k).strip().lower(): k for k in row}
    for key in keys:
        if key in lowered:
            return row[lowered[key]]
    return None


def _jsonl_records(source: Path) -> Iterator[dict]:
    """Reference lines ``{"image"|"path"|"image_id", "caption"}`` (or ``"captions": [...]``), grouped
    per image in first-seen order. Unlike datasets.py's manifest reader, lines may carry only an id."""
    groups: dict[Any, dict] = {}
    for n, row in iter_jsonl(source):
        path = _first(row, IMAGE_COLUMNS)
        image_id = normalize_id(row.get("image_id"))
        if path is None and image_id is None:
            raise UsageError(f"{source.name} line {n}: no 'image', 'path' or 'image_id'")
        value = row["captions"] if isinstance(row.get("captions"), list) else _first(row, CAPTION_COLUMNS)
        captions = value if isinstance(value, list) else ([] if value is None else [value])
        if not all(isinstance(c, str) for c in captions):
            raise UsageError(f"{source.name} line {n}: caption is not a string")
        key = ("id", image_id) if image_id is not None else ("path", _norm_path(str(path)))
        group = groups.setdefault(key, {"image": None, "image_id": image_id, "captions": []})
        if group["image"] is None and path is not None:
            group["image"] = str(path)
        group["captions"].extend(captions)
    yield from groups.values()


# --------------------------------------------------------------------------- predictions


def read_predictions(source: str | Path) -> Predictions:
    """Read predicted captions: ``clipcap caption --jsonl`` output (also what ``--save-predictions``
    writes), or the COCO results format ``[{"image_id": 123, "caption": "..."}]``.

    Records with a non-null ``error`` are kept as failed predictions (reported and not scored).
    """
    source = Path(source).expanduser()
    if not source.is_file():
        raise UsageError(f"predictions not found: {source}")
    fmt, rows = "jsonl", None
    if source.suffix.lower() == ".json":
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except ValueError:
            data = None  # perhaps JSON Lines under a .json name: read line by line below
        except OSError as exc:
            raise UsageError(f"{source}: cannot read ({exc.strerror or exc})") from exc
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            data = data["annotations"]  # a results list wrapped like a COCO annotations file
        if isinstance(data, list):
            fmt, rows = "coco", list(enumerate(data, start=1))
        elif data is not None and not isinstance(data, dict):
            raise UsageError(f"{source.name}: expected a list of {{image_id, caption}} (the COCO results format)")
    if rows is None:
        rows = list(iter_jsonl(source))
    items = [_prediction(source, n, row) for n, row in rows]
    if not items:
        raise UsageError(f"{source}: no predictions")
    return Predictions(items, source, fmt)


def _prediction(source: Path, n: int, row: Any) -> Prediction:
    if not isinstance(row, dict):
        raise UsageError(f"{source.name} record {n}: expected a JSON object")
    path = _first(row, IMAGE_COLUMNS)
    image_id = normalize_id(row.get("image_id"))
    if path is None and image_id is None:
        raise UsageError(f"{source.name} record {n}: no 'path', 'image' or 'image_id'")
    error = row.get("error")
    caption = _first(row, CAPTION_COLUMNS)
    if error in (None, "", False):
        error = None
        if caption is None:
            raise UsageError(f"{source.name} record {n}: no 'caption'")
        if not isinstance(caption, str):
            raise UsageError(f"{source.name} record {n}: caption is not a string")
    else:
        error = str(error)
    return Prediction(
        None if path is None else str(path), image_id, caption if isinstance(caption, str) else None, error, n
    )


# --------------------------------------------------------------------------- matching


def _image_id(image_id: int | str | None, path: str | None) -> int | str | None:
    return image_id if image_id is not None else coco_id_from_name(path)


def match(references: References, predictions: Sequence[Prediction]) -> Matching:
    """Key references and predictions alike (see the module docstring for the rule).

    A partial match is returned as it is (:func:`check_matching` decides whether it is an error);
    two predictions for one image, or a path that fits several reference images equally well, are
    usage errors here.
    """
    refs = references.images
    ref_ids = [_image_id(r.image_id, r.image) for r in refs]
    pred_ids = [_image_id(p.image_id, p.image) for p in predictions]
    by_id = all(i is not None for i in ref_ids) and all(i is not None for i in pred_ids)
    by_path = all(r.image for r in refs) and all(p.image for p in predictions)
    if by_id:
        result = _match_ids(refs, ref_ids, predictions, pred_ids)
        # Ids on both sides that share nothing (e.g. a Karpathy file's sequential imgid against file
        # names): paths may still line up.
        if by_path and not result.predictions and not result.failed:
            alternative = _match_paths(refs, predictions)
            if alternative.predictions or alternative.failed:
                return alternative
        return result
    if not by_path:
        side = "references" if not all(r.image for r in refs) else "predictions"
        raise UsageError(
            f"cannot match references and predictions: some {side} have neither a COCO image id nor a path "
            "(give image_id on both sides, or paths on both sides)"
        )
    return _match_paths(refs, predictions)


def _assign(
    by: str,
    keys: list[Any],
    refs: Sequence[RefImage],
    predictions: Sequence[Prediction],
    targets: Sequence[Any],
) -> Matching:
    """Build a Matching from reference keys and, per prediction, the key it matched (or None)."""
    references: dict[Any, list[str]] = {}
    info: dict[Any, RefImage] = {}
    for key, ref in zip(keys, refs):
        if key in references:  # the same image listed twice: pool its captions
            references[key].extend(ref.captions)
        else:
            references[key], info[key] = list(ref.captions), ref
    seen: dict[Any, Prediction] = {}
    ok: dict[Any, str] = {}
    failed: list[tuple[Any, Prediction]] = []
    unmatched: list[Prediction] = []
    for pred, key in zip(predictions, targets):
        if key is None:
            unmatched.append(pred)
            continue
        if key in seen:
            raise UsageError(
                f"two predictions for the same image {info[key].image or key!r}: {seen[key].where()} and {pred.where()}"
            )
        seen[key] = pred
        if pred.error is not None:
            failed.append((key, pred))
        else:
            ok[key] = pred.caption or ""
    missing = [key for key in references if key not in seen]
    return Matching(by, references, ok, info, missing, failed, unmatched)


def _match_ids(
    refs: Sequence[RefImage], ref_ids: list[Any], predictions: Sequence[Prediction], pred_ids: list[Any]
) -> Matching:
    known = set(ref_ids)
    return _assign("image_id", ref_ids, refs, predictions, [i if i in known else None for i in pred_ids])


def _match_paths(refs: Sequence[RefImage], predictions: Sequence[Prediction]) -> Matching:
    ref_parts = [_norm_path(r.image or "") for r in refs]
    keys = ["/".join(parts) for parts in ref_parts]
    by_name: dict[str, list[int]] = {}
    for i, parts in enumerate(ref_parts):
        if parts:
            by_name.setdefault(parts[-1], []).append(i)
    targets: list[Any] = []
    for pred in predictions:
        parts = _norm_path(pred.image or "")
        candidates = by_name.get(parts[-1], []) if parts else []
        if len({keys[i] for i in candidates}) <= 1:
            targets.append(keys[candidates[0]] if candidates else None)
            continue
        # Several reference images share this file name: the longest common trailing path wins.
        shared = {i: _common_suffix(ref_parts[i], parts) for i in candidates}
        best = max(shared.values())
        winners = {keys[i] for i in candidates if shared[i] == best}
        if len(winners) > 1:
            raise UsageError(
                f"prediction {pred.where()} fits several reference images "
                f"({', '.join(sorted(winners)[:3])}): give paths relative to the images root"
            )
        targets.append(winners.pop())
    return _assign("path", keys, refs, predictions, targets)


def _common_suffix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


def _examples(items: Iterable[Any], limit: int = 3) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (", ..." if len(items) > limit else "")


def check_matching(matching: Matching, allow_missing: bool) -> None:
    """Refuse a partial match unless ``allow_missing``; refuse an empty one always."""
    if not matching.predictions:
        reason = (
            f"all {len(matching.failed)} matched predictions failed"
            if matching.failed
            else f"no prediction matches a reference image (matched by {matching.by.replace('_', ' ')})"
        )
        hint = ""
        if matching.unmatched:
            hint = f"; e.g. predictions {_examples(p.where() for p in matching.unmatched)}"
            hint += f" vs references {_examples(_ref_name(matching, k) for k in list(matching.references)[:3])}"
        raise KeyMismatchError(
            f"nothing to score: {reason}{hint}", list(matching.missing), [p.where() for p in matching.unmatched]
        )
    if allow_missing or not (matching.missing or matching.unmatched):
        return
    parts = []
    if matching.missing:
        parts.append(
            f"{len(matching.missing)} of {len(matching.references)} reference images have no prediction "
            f"(e.g. {_examples(_ref_name(matching, k) for k in matching.missing)})"
        )
    if matching.unmatched:
        parts.append(
            f"{len(matching.unmatched)} predictions match no reference image "
            f"(e.g. {_examples(p.where() for p in matching.unmatched)})"
        )
    raise KeyMismatchError(
        f"references and predictions do not match (by {matching.by.replace('_', ' ')}): "
        + "; ".join(parts)
        + f"; pass --allow-missing to score the {len(matching.predictions)} images they share",
        list(matching.missing),
        [p.where() for p in matching.unmatched],
    )


def _ref_name(matching: Matching, key: Any) -> str:
    ref = matching.info[key]
    return ref.image or f"image_id {ref.image_id}"


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
    from clipcap_cli.datasets import ImageResolver, coco_id_candidates

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
