"""What `clipcap eval` scores: reference captions and predictions read from their files, and the rule
that matches them.

Matching rule (documented in ``clipcap eval --help``): by COCO image id when every reference and
every prediction has one (an ``image_id`` field, or a COCO file name such as
``COCO_val2014_000000123456.jpg`` / ``000000123456.jpg``); otherwise by path, compared on their
trailing components, so ``/data/coco/val2014/x.jpg`` matches the reference ``val2014/x.jpg`` and a
bare ``x.jpg`` matches it when no other reference image has that name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from clipcap_cli.data.datasets import CAPTION_COLUMNS, IMAGE_COLUMNS, iter_jsonl, normalize_id
from clipcap_cli.errors import UsageError
from clipcap_cli.eval.metrics import KeyMismatchError

if TYPE_CHECKING:
    pass

REFS_FORMATS: tuple[str, ...] = ("auto", "coco", "karpathy", "caption-list", "features", "jsonl")
DEFAULT_SPLIT = "test"  # Karpathy split scored: the paper's numbers are on the 5000 test images
# COCO file names: COCO_val2014_000000123456.jpg (2014) and 000000123456.jpg (2017).
_COCO_STEM = re.compile(r"(?:COCO_[A-Za-z]+\d{4}_)?(\d{12})")


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
        split: the Karpathy split to keep (``None``: :attr:`DEFAULT_SPLIT` for Karpathy files;
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
        from clipcap_cli.data.features import load_features

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
    from clipcap_cli.data.datasets import read_dataset

    if source.is_dir():
        raise UsageError(f"{source} is a folder: give a references file, or a features store (--refs-format features)")
    if fmt == "karpathy" or split is not None:
        return read_dataset(source, root, fmt, split or DEFAULT_SPLIT)
    if fmt != "auto":
        return read_dataset(source, root, fmt, None)
    # Auto: only a Karpathy file takes a split, and which format this is is known once it is read.
    try:
        return read_dataset(source, root, "auto", DEFAULT_SPLIT)
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
