"""A features store read shard by shard: what training streams from.

Two layouts share the ``clipcap-features`` format (``features.py`` writes and loads them whole):

* single-file (``format_version`` 1): ``embeddings.safetensors`` + ``index.jsonl``. Read here as
  ONE shard (shard 0 is the whole file).
* sharded (``format_version`` 2)::

      meta.json                       ..., "shards": [{"name", "images", "captions", "index_sha256",
                                                       "embeddings_sha256"}]
      shards/shard-NNNNNN.safetensors "embeddings": [images, D], the shard's rows
      shards/shard-NNNNNN.jsonl       row i <-> line i: {"image", "image_id", "captions"}

  ``meta.json`` is written last (as for a single-file store), so the shard list, the counts and
  each index's sha256 are known without reading a shard, and a shard that is missing, torn or
  from another store is refused when it is read, in one line.

Images and captions are numbered globally in shard order: shard i's images start at
``image_starts[i]``, its captions at ``caption_starts[i]`` (a single-file store numbers them as
``load_features`` does).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from clipcap_cli.data.store_format import (
    EMBEDDINGS_FILE,
    EMBEDDINGS_KEY,
    FORMAT,
    INDEX_FILE,
    META_FILE,
    SHARDED_FORMAT_VERSION,
    FeaturesError,
    FeatureSet,
    _check_activation,
    _check_record,
    is_sharded,
    read_meta,
)
from clipcap_cli.fsutil import atomic_write, sha256_file, write_text_atomic
from clipcap_cli.version import __version__

if TYPE_CHECKING:
    import torch

SHARDS_DIR = "shards"
SHARD_PREFIX = "shard-"
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a file name stem, never a path
_CLIP_KEYS = ("clip_model", "clip_pretrained", "clip_activation")  # what every shard's features must share


def shard_name(i: int) -> str:
    return f"{SHARD_PREFIX}{i:06d}"


@dataclass(frozen=True)
class ShardInfo:
    """One shard as ``meta.json`` lists it: read without opening the shard."""

    name: str
    images: int
    captions: int
    index_sha256: str | None = None
    embeddings_sha256: str | None = None  # of the shard's safetensors file, checked when it is read


# --------------------------------------------------------------------------- reading


@dataclass
class Store:
    """An opened store: its meta and shard list; ``read_shard`` loads one shard at a time."""

    path: Path
    meta: dict
    shards: list[ShardInfo]

    @property
    def sharded(self) -> bool:
        return is_sharded(self.meta)

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def clip_model(self) -> str | None:
        return self.meta.get("clip_model")

    @property
    def num_images(self) -> int:
        return sum(s.images for s in self.shards)

    @property
    def num_captions(self) -> int:
        return sum(s.captions for s in self.shards)

    @cached_property
    def image_starts(self) -> list[int]:
        """Global index of each shard's first image (and, last, the number of images)."""
        return _starts(s.images for s in self.shards)

    @cached_property
    def caption_starts(self) -> list[int]:
        """Global id of each shard's first caption (and, last, the number of captions)."""
        return _starts(s.captions for s in self.shards)

    def shard_files(self, i: int) -> tuple[Path, Path]:
        """(embeddings file, index file) of shard ``i``."""
        if not self.sharded:
            return self.path / EMBEDDINGS_FILE, self.path / INDEX_FILE
        name = self.shards[i].name
        return self.path / SHARDS_DIR / f"{name}.safetensors", self.path / SHARDS_DIR / f"{name}.jsonl"

    def read_records(self, i: int) -> list[dict]:
        """Shard ``i``'s records alone (its index file, checked against ``meta.json``)."""
        info = self.shards[i]
        index_file = self.shard_files(i)[1]
        records = self._index(i)
        if len(records) != info.images or sum(len(r.get("captions", [])) for r in records) != info.captions:
            raise FeaturesError(f"{self._where(i)}: {index_file.name} does not hold the counts {META_FILE} lists")
        return [_check_record(j, r) for j, r in enumerate(records)]

    def _index(self, i: int) -> list[dict]:
        """Shard ``i``'s index lines, checked against the sha256 ``meta.json`` lists."""
        info = self.shards[i]
        index_file = self.shard_files(i)[1]
        try:
            data = index_file.read_bytes()
            records = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        except FileNotFoundError:
            raise FeaturesError(f"{self._where(i)}: {index_file.name} is missing: {self._damaged}") from None
        except (OSError, ValueError) as exc:
            raise FeaturesError(f"{self._where(i)}: {index_file.name} is unreadable ({exc}): {self._damaged}") from None
        if info.index_sha256 and hashlib.sha256(data).hexdigest() != info.index_sha256:
            raise FeaturesError(
                f"{self._where(i)}: {index_file.name} does not belong to this {META_FILE}: {self._damaged}"
            )
        return records

    def read_embeddings(self, i: int) -> torch.Tensor:
        """Shard ``i``'s embeddings [images, D], checked against ``meta.json`` (and nothing else)."""
        from safetensors import SafetensorError, safe_open

        file = self.shard_files(i)[0]
        info = self.shards[i]
        if not file.is_file():
            raise FeaturesError(f"{self._where(i)}: {file.name} is missing: {self._damaged}")
        try:
            if info.embeddings_sha256:  # read once: checked, then parsed from the same bytes
                data = file.read_bytes()
                header, embeddings = _parse_safetensors(data)
            else:
                data = None
                with safe_open(str(file), framework="pt") as f:
                    header = f.metadata() or {}
                    embeddings = f.get_tensor(EMBEDDINGS_KEY)
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            raise FeaturesError(f"{self._where(i)}: {file.name} is unreadable ({exc}): {self._damaged}") from None
        if self.sharded:
            mixed = [k for k in _CLIP_KEYS if k in header and header[k] != str(self.meta.get(k))]
            if mixed:
                k = mixed[0]
                raise FeaturesError(
                    f"{self._where(i)} was extracted with {k} {header[k]!r}, the store with {self.meta.get(k)!r}: "
                    "features of different CLIPs cannot be mixed"
                )
        if data is not None and hashlib.sha256(data).hexdigest() != info.embeddings_sha256:
            raise FeaturesError(f"{self._where(i)}: {file.name} does not belong to this {META_FILE}: {self._damaged}")
        if embeddings.ndim != 2 or embeddings.shape != (info.images, self.embed_dim):
            raise FeaturesError(
                f"{self._where(i)}: {file.name} holds {tuple(embeddings.shape)} embeddings, {META_FILE} lists "
                f"({info.images}, {self.embed_dim}): {self._damaged}"
            )
        return embeddings

    def read_shard(self, i: int) -> tuple[torch.Tensor, list[dict]]:
        """(embeddings [images, D], records) of shard ``i``, and nothing of the other shards."""
        return self.read_embeddings(i), self.read_records(i)

    def load_all(self) -> FeatureSet:
        """Every shard, concatenated (for eval and inspect on stores that fit in memory)."""
        import torch

        rows, records = [], []
        for i in range(len(self.shards)):
            emb, recs = self.read_shard(i)
            rows.append(emb)
            records.extend(recs)
        dtype = getattr(torch, str(self.meta.get("dtype", "float32")), torch.float32)
        embeddings = torch.cat(rows) if rows else torch.empty(0, self.embed_dim, dtype=dtype)
        return FeatureSet(embeddings=embeddings, records=records, meta=self.meta, path=self.path)

    def embeddings_sha256(self) -> str | None:
        """A fingerprint of the embeddings: the file's sha256 (single file), or a hash of every shard
        file's sha256 (remembered by ``fingerprint.file_sha256`` while the files stay unchanged)."""
        from clipcap_cli.weights.fingerprint import file_sha256

        if not self.sharded:
            file = self.path / EMBEDDINGS_FILE
            return file_sha256(file) if file.is_file() else None
        h = hashlib.sha256(b"clipcap-shards\n")
        if all(info.embeddings_sha256 for info in self.shards):  # recorded by write_shard, checked on every read
            for info in self.shards:
                h.update(f"{info.name}:{info.embeddings_sha256}\n".encode())
            return h.hexdigest()
        for i, info in enumerate(self.shards):
            file = self.shard_files(i)[0]
            if not file.is_file():
                raise FeaturesError(f"{self._where(i)}: {file.name} is missing: {self._damaged}")
            h.update(f"{info.name}:{file_sha256(file)}\n".encode())
        return h.hexdigest()

    def _where(self, i: int) -> str:
        return f"shard {self.shards[i].name} of {self.path}" if self.sharded else str(self.path)

    @property
    def _damaged(self) -> str:
        return "the store is damaged; extract it again (clipcap extract ... --overwrite)"


def _parse_safetensors(data: bytes) -> tuple[dict, torch.Tensor]:
    """(header metadata, the embeddings) of a safetensors file's bytes."""
    from safetensors.torch import load

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    return header, load(data)[EMBEDDINGS_KEY]


def _starts(counts: Iterable[int]) -> list[int]:
    out = [0]
    for n in counts:
        out.append(out[-1] + n)
    return out


def open_store(path: str | Path) -> Store:
    """Open the store at ``path`` (either layout) without reading any embeddings."""
    folder, meta = read_meta(path)
    _check_activation(meta, folder)
    if not is_sharded(meta):
        count, captions = meta.get("count"), meta.get("num_captions")
        if count is None or captions is None:  # older stores: count from the index
            records = Store(folder, meta, [ShardInfo("embeddings", -1, -1, meta.get("index_sha256"))])._index(0)
            count, captions = len(records), sum(len(r.get("captions", [])) for r in records)
        return Store(folder, meta, [ShardInfo("embeddings", int(count), int(captions), meta.get("index_sha256"))])
    listed = meta.get("shards")
    if not isinstance(listed, list) or "embed_dim" not in meta:
        raise FeaturesError(f"{folder / META_FILE}: a sharded store needs 'shards' and 'embed_dim'")
    shards = []
    for j, entry in enumerate(listed):
        try:
            info = ShardInfo(
                str(entry["name"]),
                int(entry["images"]),
                int(entry["captions"]),
                entry.get("index_sha256"),
                entry.get("embeddings_sha256"),
            )
        except (KeyError, TypeError, ValueError):
            raise FeaturesError(f"{folder / META_FILE}: shard entry {j} is malformed ({entry!r:.80})") from None
        if not _SHARD_NAME.match(info.name) or info.images < 0 or info.captions < 0:
            raise FeaturesError(f"{folder / META_FILE}: shard entry {j} is malformed ({entry!r:.80})")
        shards.append(info)
    store = Store(folder, meta, shards)
    if meta.get("count") is not None and int(meta["count"]) != store.num_images:
        raise FeaturesError(
            f"{folder / META_FILE}: count {meta['count']} but the shards hold {store.num_images} images"
        )
    return store


# --------------------------------------------------------------------------- writing


def write_shard(folder: str | Path, index: int, embeddings: torch.Tensor, records: list[dict], meta: dict) -> dict:
    """Write shard ``index`` of the sharded store ``folder`` (atomically); return its ``meta.json`` entry.

    ``meta`` is the store's: its CLIP keys go into the shard's header, so a shard from another
    store's CLIP is refused when read.
    """
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    if embeddings.ndim != 2 or embeddings.shape[0] != len(records):
        raise FeaturesError(f"shard {index}: {tuple(embeddings.shape)} embeddings for {len(records)} records")
    records = [_check_record(j, r) for j, r in enumerate(records)]
    name = shard_name(index)
    (folder / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    index_text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    meta = with_clip_activation(meta)
    header = {"format": FORMAT, "shard": name, **{k: str(meta.get(k)) for k in _CLIP_KEYS}}
    tensor = embeddings.detach().to("cpu").contiguous()
    atomic_write(
        folder / SHARDS_DIR / f"{name}.safetensors",
        lambda tmp: save_file({EMBEDDINGS_KEY: tensor}, tmp, metadata=header),
    )
    write_text_atomic(folder / SHARDS_DIR / f"{name}.jsonl", index_text)
    return {
        "name": name,
        "images": len(records),
        "captions": sum(len(r["captions"]) for r in records),
        "index_sha256": hashlib.sha256(index_text.encode("utf-8")).hexdigest(),
        "embeddings_sha256": sha256_file(folder / SHARDS_DIR / f"{name}.safetensors"),
        "embed_dim": int(tensor.shape[1]),
        "dtype": str(tensor.dtype).removeprefix("torch."),
    }


def finish_sharded(folder: str | Path, entries: list[dict], meta: dict) -> Path:
    """Write ``meta.json`` of a sharded store whose shards ``entries`` (``write_shard``'s) are on disk."""
    folder = Path(folder).expanduser()
    dims = {e["embed_dim"] for e in entries if e["images"]}
    dtypes = {e["dtype"] for e in entries if e["images"]}
    if len(dims) > 1 or len(dtypes) > 1:
        raise FeaturesError(f"the shards of {folder} disagree on the embedding width or dtype: {sorted(dims)}")
    full = with_clip_activation(meta)
    embed_dim = dims.pop() if dims else int(meta.get("embed_dim", 0))
    full.update(
        format=FORMAT,
        format_version=SHARDED_FORMAT_VERSION,
        count=sum(e["images"] for e in entries),
        embed_dim=embed_dim,
        dtype=dtypes.pop() if dtypes else str(meta.get("dtype", "float16")),
        normalized=bool(meta.get("normalized", False)),
        num_captions=sum(e["captions"] for e in entries),
        shards=[
            {k: e[k] for k in ("name", "images", "captions", "index_sha256", "embeddings_sha256")} for e in entries
        ],
        store_id=uuid.uuid4().hex,
    )
    full.setdefault("clipcap_version", __version__)
    full.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_text_atomic(folder / META_FILE, json.dumps(full, indent=2, ensure_ascii=False) + "\n")
    return folder


def with_clip_activation(meta: dict) -> dict:
    """``meta`` with the activation of its CLIP (features written now come from clipcap's loader)."""
    full = dict(meta)
    if full.get("clip_model") and not full.get("clip_activation"):
        from clipcap_cli.weights.clip_tower import clip_activation

        full["clip_activation"] = clip_activation(str(full["clip_model"]), full.get("clip_pretrained"))
    return full


def save_sharded(path: str | Path, shards: Iterable[tuple[Any, list[dict]]], meta: dict) -> Path:
    """Write a whole sharded store from (embeddings, records) pairs, one shard each, in order."""
    meta = with_clip_activation(meta)
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).unlink(missing_ok=True)  # out first, in last: a half-written store is never read
    entries = [write_shard(folder, i, emb, records, meta) for i, (emb, records) in enumerate(shards)]
    if len({e["embed_dim"] for e in entries if e["images"]}) > 1:
        raise FeaturesError(f"the shards of {folder} disagree on the embedding width (mixed CLIPs?)")
    return finish_sharded(folder, entries, meta)
