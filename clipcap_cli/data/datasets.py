"""Readers for captioned image datasets: each yields one record per unique image.

A record is ``{"image": str, "image_id": int | str | None, "captions": list[str]}`` (plus a few
format-specific keys: ``split`` for Karpathy files, ``caption_ids`` when the source numbers its
captions). ``image`` is relative to the images root when the file lies under it. Readers stat
files to find them but never open image pixels.

Formats: COCO caption annotations (``captions_train2014.json``), the Karpathy split file
(``dataset_coco.json``), the original ClipCap ``train_caption.json`` list, CSV/TSV and JSON Lines
manifests, a folder of images (with sidecar caption files: ``collection.py``), and webdataset tar
shards (``tars.py``).
"""

from __future__ import annotations

import csv
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from clipcap_cli.data.images import ImageResolver
from clipcap_cli.data.sidecars import Unpaired
from clipcap_cli.errors import UsageError

FORMATS: tuple[str, ...] = ("auto", "coco", "karpathy", "caption-list", "csv", "tsv", "jsonl", "folder", "webdataset")
KARPATHY_SPLITS: tuple[str, ...] = ("train", "val", "test", "restval", "train+restval")
# Where COCO-style datasets keep their images below the root (the original used DIR/train2014, DIR/val2014).
COCO_SUBDIRS: tuple[str, ...] = ("train2014", "val2014", "train2017", "val2017", "test2014", "test2015", "test2017")
IMAGE_COLUMNS: tuple[str, ...] = ("image", "path", "file_name", "filename", "image_path")
CAPTION_COLUMNS: tuple[str, ...] = ("caption", "captions", "text")


class DatasetError(UsageError):
    """A dataset file that cannot be read: the message names the file, the line and the key."""


@dataclass
class Dataset:
    """A dataset file (or folder) ready to iterate. ``records()`` can be called more than once."""

    source: Path
    format: str
    images_root: Path
    split: str | None = None
    _make: Callable[[], Iterator[dict]] = field(default=lambda: iter(()), repr=False)
    unpaired: Unpaired = field(default_factory=Unpaired)  # what a collection holds that is not paired

    def records(self) -> Iterator[dict]:
        return self._make()

    def describe(self) -> dict[str, Any]:
        return {
            "source": str(self.source.resolve()),
            "dataset_format": self.format,
            "images_root": str(self.images_root),
            "split": self.split,
        }


def read_dataset(
    source: str | Path,
    images: str | Path | None = None,
    fmt: str = "auto",
    split: str | None = None,
    recursive: bool = False,
) -> Dataset:
    """Open ``source`` (a dataset file or an image folder) and detect its format.

    Args:
        source: the annotations / manifest file, or a folder of images.
        images: the images root; defaults to the folder itself or the file's folder.
        fmt: one of ``FORMATS``; ``auto`` detects from the suffix and the JSON layout.
        split: Karpathy split filter (``train``, ``val``, ``test``, ``restval``, ``train+restval``).
        recursive: for folders, include subfolders.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown dataset format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "webdataset" or (fmt == "auto" and _names_shards(str(source))):
        return _webdataset(str(source), images)
    source = Path(source).expanduser()
    if not source.exists():
        raise UsageError(f"dataset not found: {source}")
    if split is not None and split not in KARPATHY_SPLITS and split != "all":
        raise UsageError(f"unknown split {split!r}: use one of {', '.join(KARPATHY_SPLITS)} or all")
    if source.is_dir():
        if fmt not in ("auto", "folder"):
            raise UsageError(f"{source} is a folder; --format {fmt} needs a file")
        from clipcap_cli.data.sidecars import folder_records

        root = (Path(images).expanduser() if images else source).resolve()
        records, unpaired = folder_records(source, root, recursive)
        return Dataset(source, "folder", root, None, lambda: iter(records), unpaired)

    root = (Path(images).expanduser() if images else source.parent).resolve()
    if images and not root.is_dir():
        raise UsageError(f"--images {images}: not a folder")
    resolver = ImageResolver(root)
    data: Any = None
    if fmt == "auto":
        fmt, data = _detect(source)
    if split not in (None, "all") and fmt != "karpathy":
        raise UsageError(f"--split applies to Karpathy split files, and {source.name} is {fmt}")
    split = None if split == "all" else split
    if fmt in ("coco", "karpathy", "caption-list"):
        if data is None:
            data = _load_json(source)
        grouped = {"coco": _coco, "karpathy": _karpathy, "caption-list": _caption_list}[fmt]
        # Validate the whole file once up front, so a malformed file fails before any encoding.
        records = list(grouped(source, data, resolver, split) if fmt == "karpathy" else grouped(source, data, resolver))
        return Dataset(source, fmt, root, split, lambda: iter(records))
    if fmt in ("csv", "tsv"):
        records = list(_table(source, resolver, "\t" if fmt == "tsv" else ","))
        return Dataset(source, fmt, root, None, lambda: iter(records))
    records = list(_jsonl(source, resolver))
    return Dataset(source, "jsonl", root, None, lambda: iter(records))


def _detect(source: Path) -> tuple[str, Any]:
    suffix = source.suffix.lower()
    if suffix == ".csv":
        return "csv", None
    if suffix == ".tsv":
        return "tsv", None
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl", None
    if suffix != ".json":
        raise UsageError(f"cannot tell the format of {source.name}: give the dataset format ({', '.join(FORMATS[1:])})")
    try:
        data = json.loads(read_text(source))
    except ValueError as exc:
        if _looks_like_jsonl(source):
            return "jsonl", None
        raise DatasetError(f"{source.name}: invalid JSON ({exc})") from exc
    if isinstance(data, list):
        return "caption-list", data
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        if "annotations" in data:
            return "coco", data
        first = data["images"][0] if data["images"] else {}
        if isinstance(first, dict) and "sentences" in first:
            return "karpathy", data
    raise DatasetError(
        f"{source.name}: not a known layout (expected COCO {{images, annotations}}, Karpathy {{images: [{{sentences}}]}} or a caption list)"
    )


def _looks_like_jsonl(source: Path) -> bool:
    first = read_text(source).split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def _load_json(source: Path) -> Any:
    try:
        return json.loads(read_text(source))
    except ValueError as exc:
        raise DatasetError(f"{source.name}: invalid JSON ({exc}): fix the file, or give the dataset format") from exc


def read_text(source: Path) -> str:
    """A UTF-8 text file's contents; ``DatasetError`` naming the file (and the line) when it cannot be read."""
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{source}: cannot read ({exc.strerror or exc})") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(not_utf8(source)) from None


def not_utf8(source: Path) -> str:
    """The message for a file that is not UTF-8: its first bad line and byte, and what to do."""
    with open(source, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (
                    f"{source.name} line {n} is not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}): "
                    "save the file as UTF-8"
                )
    return f"{source.name} is not UTF-8: save the file as UTF-8"


def _need(source: Path, where: str, entry: Any, key: str) -> Any:
    if not isinstance(entry, dict):
        raise DatasetError(f"{source.name}: {where} is not an object")
    if key not in entry:
        raise DatasetError(f"{source.name}: {where} has no {key!r} key")
    return entry[key]


def normalize_id(value: Any) -> int | str | None:
    """An image id as clipcap compares them: an int when the value is a whole number, else a string.

    ``123``, ``123.0`` (a float, as pandas writes an integer column that has a gap) and the text
    ``"123"`` or ``" 0123 "`` (as the original's ``int(image_id)``) are all the int 123; other text
    stays as written (``"1.0"``, ``"abc"``, ``"-1"``); ``None``, empty text and booleans are no id.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    if not text:
        return None
    return int(text) if text.isascii() and text.isdigit() else text


def _caption_text(source: Path, where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{source.name}: {where} caption is not a string")
    return value.strip()


# --------------------------------------------------------------------------- COCO family


def _coco(source: Path, data: Any, resolver: ImageResolver) -> Iterator[dict]:
    if not isinstance(data, dict):
        raise DatasetError(f"{source.name}: expected a COCO object with 'images' and 'annotations'")
    images = _need(source, "the file", data, "images")
    annotations = _need(source, "the file", data, "annotations")
    captions: dict[Any, list[str]] = {}
    for i, ann in enumerate(annotations):
        image_id = _need(source, f"annotation {i}", ann, "image_id")
        text = _caption_text(source, f"annotation {i}", _need(source, f"annotation {i}", ann, "caption"))
        captions.setdefault(image_id, []).append(text)
    # One record per image file. An id naming two files is an error (whose captions would they be?);
    # an image listed twice, under one id or several, is one record with every caption of its ids.
    file_of: dict[Any, str] = {}
    records: OrderedDict[str, dict] = OrderedDict()
    for i, img in enumerate(images):
        image_id = _need(source, f"image {i}", img, "id")
        name = str(_need(source, f"image {i}", img, "file_name"))
        if image_id in file_of:
            if file_of[image_id] != name:
                raise DatasetError(
                    f"{source.name}: image id {image_id!r} names two files, {file_of[image_id]} and {name}: "
                    "give each image its own id"
                )
            continue
        file_of[image_id] = name
        if name in records:
            records[name]["captions"] += captions.get(image_id, [])
        else:
            records[name] = {
                "image": resolver.find(name, COCO_SUBDIRS),
                "image_id": image_id,
                "captions": list(captions.get(image_id, [])),
            }
    yield from records.values()


def _karpathy(source: Path, data: Any, resolver: ImageResolver, split: str | None) -> Iterator[dict]:
    if not isinstance(data, dict):
        raise DatasetError(f"{source.name}: expected a Karpathy object with 'images'")
    wanted = {"train", "restval"} if split == "train+restval" else ({split} if split else None)
    for i, img in enumerate(_need(source, "the file", data, "images")):
        name = str(_need(source, f"image {i}", img, "filename"))
        img_split = img.get("split")
        if wanted is not None and img_split not in wanted:
            continue
        sentences = _need(source, f"image {i}", img, "sentences")
        texts = [
            _caption_text(source, f"image {i}", _need(source, f"image {i} sentence {j}", s, "raw"))
            for j, s in enumerate(sentences)
        ]
        folder = img.get("filepath")
        candidates = (
            ([f"{folder}/{name}"] if folder else []) + [name] + [f"{s}/{name}" for s in COCO_SUBDIRS if s != folder]
        )
        image_id = img.get("cocoid", img.get("imgid"))
        record = {
            "image": resolver.first_existing(candidates),
            "image_id": image_id,
            "captions": texts,
            "split": img_split,
        }
        ids = [s.get("sentid") for s in sentences]
        if any(x is not None for x in ids):
            record["caption_ids"] = ids
        yield record


def coco_id_candidates(image_id: int | str) -> list[str]:
    """Where an image id's file may be: first where the original ClipCap looked, in its order, then
    COCO 2017's zero-padded names (``000000397133.jpg``) at the root and in the COCO subfolders."""
    text = str(image_id).strip()
    if text.isdigit():
        n = int(text)
        train, val = f"COCO_train2014_{n:012d}.jpg", f"COCO_val2014_{n:012d}.jpg"
        padded = f"{n:012d}.jpg"
        return [
            train,
            f"train2014/{train}",
            val,
            f"val2014/{val}",
            f"{text}.jpg",
            padded,
            *(f"{s}/{padded}" for s in COCO_SUBDIRS),
        ]
    return [text, f"{text}.jpg"] if Path(text).suffix else [f"{text}.jpg", text]


def group_caption_entries(
    source: Path, entries: Any, resolver: ImageResolver | None, normalize_ids: bool = True
) -> Iterator[dict]:
    """Group a list of ``{image_id, caption, (id)}`` entries into one record per image, first-seen order.

    ``normalize_ids`` applies :func:`normalize_id` (numeric text becomes an int, as the original's ``int(image_id)``).
    """
    if not isinstance(entries, list):
        raise DatasetError(f"{source.name}: expected a JSON list of caption entries")
    groups: OrderedDict[Any, dict] = OrderedDict()
    for i, entry in enumerate(entries):
        image_id = _need(source, f"entry {i}", entry, "image_id")
        if normalize_ids:
            image_id = normalize_id(image_id)
            if image_id is None:
                raise DatasetError(f"{source.name}: entry {i} has an empty image_id")
        text = _caption_text(source, f"entry {i}", _need(source, f"entry {i}", entry, "caption"))
        explicit = next((entry[k] for k in ("image", "file_name", "filename") if k in entry), None)
        group = groups.get(image_id)
        if group is None:
            group = groups[image_id] = {"image_id": image_id, "captions": [], "caption_ids": [], "_explicit": explicit}
        elif explicit is not None and group["_explicit"] is not None and str(explicit) != str(group["_explicit"]):
            raise DatasetError(
                f"{source.name}: entry {i}: image id {image_id!r} names two files, {group['_explicit']} and "
                f"{explicit}: give each image its own id"
            )
        elif group["_explicit"] is None:
            group["_explicit"] = explicit
        group["captions"].append(text)
        group["caption_ids"].append(entry.get("id"))
    for image_id, group in groups.items():
        explicit = group.pop("_explicit")
        if explicit is not None:
            image = resolver.relative(explicit) if resolver else str(explicit)
        elif resolver is not None:
            image = resolver.first_existing(coco_id_candidates(image_id))
        else:
            image = coco_id_candidates(image_id)[0]
        record = {"image": image, "image_id": image_id, "captions": group["captions"]}
        if any(x is not None for x in group["caption_ids"]):
            record["caption_ids"] = group["caption_ids"]
        yield record


def _caption_list(source: Path, data: Any, resolver: ImageResolver) -> Iterator[dict]:
    return group_caption_entries(source, data, resolver)


# --------------------------------------------------------------------------- manifests


class _Grouper:
    """Collects manifest rows into one record per image, in first-seen order."""

    def __init__(self, resolver: ImageResolver, source: Path):
        self.resolver = resolver
        self.source = source
        self.groups: OrderedDict[str, dict] = OrderedDict()
        self.image_of: dict[Any, str] = {}  # image id -> the image it names

    def add(self, image: str, captions: list[str], image_id: Any, where: str) -> None:
        key = self.resolver.relative(image)
        if image_id is not None:
            other = self.image_of.setdefault(normalize_id(image_id), key)
            if other != key:
                raise DatasetError(
                    f"{self.source.name} {where}: image id {image_id!r} names two files, {other} and {key}: "
                    "give each image its own id"
                )
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = {"image": key, "image_id": image_id, "captions": []}
        elif group["image_id"] is None:
            group["image_id"] = image_id
        group["captions"].extend(c for c in captions if c)


def _pick(keys: Any, choices: tuple[str, ...]) -> str | None:
    lowered = {str(k).strip().lower(): k for k in keys if k is not None}
    return next((lowered[c] for c in choices if c in lowered), None)


def _table(source: Path, resolver: ImageResolver, delimiter: str) -> Iterator[dict]:
    grouper = _Grouper(resolver, source)
    try:
        with open(source, newline="", encoding="utf-8-sig") as f:
            _table_rows(source, csv.DictReader(f, delimiter=delimiter), grouper)
    except UnicodeDecodeError:
        raise DatasetError(not_utf8(source)) from None
    yield from grouper.groups.values()


def _table_rows(source: Path, reader: csv.DictReader, grouper: _Grouper) -> None:
    if not reader.fieldnames:
        raise DatasetError(f"{source.name}: empty file (expected a header with an 'image' or 'path' column)")
    image_col = _pick(reader.fieldnames, IMAGE_COLUMNS)
    if image_col is None:
        raise DatasetError(f"{source.name}: no 'image' or 'path' column in the header ({', '.join(reader.fieldnames)})")
    caption_col = _pick(reader.fieldnames, CAPTION_COLUMNS)
    id_col = _pick(reader.fieldnames, ("image_id", "id"))
    try:
        for row in reader:
            if None in row:
                raise DatasetError(f"{source.name} line {reader.line_num}: more fields than the header has")
            image = (row.get(image_col) or "").strip()
            if not image:
                raise DatasetError(f"{source.name} line {reader.line_num}: empty '{image_col}'")
            caption = (row.get(caption_col) or "").strip() if caption_col else ""
            image_id = normalize_id(row[id_col]) if id_col else None
            grouper.add(image, [caption], image_id, f"line {reader.line_num}")
    except csv.Error as exc:
        raise DatasetError(f"{source.name} line {reader.line_num}: {exc}") from exc


def iter_jsonl(source: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file; one-line errors."""
    try:
        handle = open(source, encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"{source}: cannot read ({exc.strerror or exc})") from exc
    with handle:
        try:
            lines = list(enumerate(handle, start=1))
        except UnicodeDecodeError:
            raise DatasetError(not_utf8(source)) from None
        for n, line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DatasetError(f"{source.name} line {n}: invalid JSON ({getattr(exc, 'msg', exc)})") from exc
            if not isinstance(row, dict):
                raise DatasetError(f"{source.name} line {n}: expected a JSON object")
            yield n, row


def _jsonl(source: Path, resolver: ImageResolver) -> Iterator[dict]:
    grouper = _Grouper(resolver, source)
    for n, row in iter_jsonl(source):
        image_key = _pick(row.keys(), IMAGE_COLUMNS)
        if image_key is None:
            raise DatasetError(f"{source.name} line {n}: no 'image' or 'path' key")
        caption_key = _pick(row.keys(), CAPTION_COLUMNS)
        value = row.get(caption_key) if caption_key else None
        captions = value if isinstance(value, list) else ([value] if value is not None else [])
        if not all(isinstance(c, str) for c in captions):
            raise DatasetError(f"{source.name} line {n}: caption is not a string")
        id_key = _pick(row.keys(), ("image_id", "id"))
        grouper.add(
            str(row[image_key]), [c.strip() for c in captions], row.get(id_key) if id_key else None, f"line {n}"
        )
    yield from grouper.groups.values()


def _names_shards(source: str) -> bool:
    """A tar, or a glob / brace range of tars (``shards/{000..009}.tar``)."""
    from clipcap_cli.data.images import is_tar_name

    return is_tar_name(source.rstrip("}")) and not Path(source).expanduser().is_dir()


def _webdataset(pattern: str, images: str | Path | None) -> Dataset:
    from clipcap_cli.data.sidecars import shard_records
    from clipcap_cli.data.tars import expand

    first = expand(pattern)[0]
    root = (Path(images).expanduser() if images else first.parent).resolve()
    records, unpaired, _ = shard_records([pattern], root)
    return Dataset(Path(pattern), "webdataset", root, None, lambda: iter(records), unpaired)
