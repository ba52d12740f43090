"""CLIP image features: the batched, resumable, shardable encoding (`clipcap extract`) that fills the
on-disk store `train` and `eval` read. The store is written and loaded by ``store_files.py``, the
run's resumable bookkeeping is ``extract_parts.py``; both are re-exported here.

A store is a directory::

    meta.json                 what made the features (CLIP model, preprocessing, counts, ...)
    embeddings.safetensors    "embeddings": [N_images, D], one row per image, raw CLIP output
    index.jsonl               row i <-> line i: {"image", "image_id", "captions"}
    skipped.jsonl             inputs that could not be read, with the reason (optional)
    parts/                    chunks of an unfinished run (removed once the store is complete)

``meta.json`` is written last, so a store without it is incomplete and is never loaded. With
``ExtractOptions.shard_size`` the store is sharded instead (``store.py``: ``shards/`` and a
``meta.json`` listing them); the format's names and ``meta.json`` checks are in ``store_format.py``.
"""

from __future__ import annotations

import types
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from clipcap_cli.batch.shards import check_shard
from clipcap_cli.config import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from clipcap_cli.data.extract_parts import (
    RECORDS_FILE as RECORDS_FILE,
)
from clipcap_cli.data.extract_parts import (
    SETTINGS_FILE as SETTINGS_FILE,
)
from clipcap_cli.data.extract_parts import (
    ExtractResult as ExtractResult,
)
from clipcap_cli.data.extract_parts import (
    _already_complete,
    _chunk_header,
    _chunk_path,
    _done_chunks,
    _prepare_parts,
    _settings_sha,
    _write_chunk,
)
from clipcap_cli.data.extract_parts import (
    clear_store as clear_store,
)
from clipcap_cli.data.extract_parts import (
    clip_weights_sha256 as clip_weights_sha256,
)
from clipcap_cli.data.extract_parts import (
    merge_parts as merge_parts,
)
from clipcap_cli.data.extract_parts import (
    run_settings as run_settings,
)
from clipcap_cli.data.extract_parts import (
    store_is_complete as store_is_complete,
)
from clipcap_cli.data.inputs import check_loading, default_workers

# The store's names and files, re-exported: features is where callers look (store_format, store_files).
from clipcap_cli.data.store_files import is_store as is_store
from clipcap_cli.data.store_files import load_features as load_features
from clipcap_cli.data.store_files import read_skipped as read_skipped
from clipcap_cli.data.store_files import save_features as save_features
from clipcap_cli.data.store_format import META_FILE as META_FILE
from clipcap_cli.data.store_format import PARTS_DIR as PARTS_DIR
from clipcap_cli.data.store_format import SKIPPED_FILE as SKIPPED_FILE
from clipcap_cli.data.store_format import TOKENS_FILE as TOKENS_FILE
from clipcap_cli.data.store_format import FeaturesError as FeaturesError
from clipcap_cli.data.store_format import FeatureSet as FeatureSet
from clipcap_cli.errors import UsageError
from clipcap_cli.fsutil import check_folder, remove_stale_temps

# --------------------------------------------------------------------------- extraction

ProgressFn = Callable[[int, int], None]  # (records done, records total) for this process's share


@dataclass(frozen=True)
class ExtractOptions:
    """How `clipcap extract` encodes a dataset. The CLI takes its defaults from here."""

    clip_model: str = DEFAULT_CLIP_MODEL  # open_clip name, or local-dir:PATH
    clip_pretrained: str | None = (
        DEFAULT_CLIP_PRETRAINED  # open_clip pretrained tag; None = random weights (tests, benchmarks)
    )
    batch_size: int = 64  # images per encode_image call
    workers: int | None = None  # DataLoader processes decoding images; None = inputs.default_workers(device)
    device: str | None = None  # None = CUDA, then MPS, then CPU
    chunk_size: int = 1024  # images per part file: the most work an interruption can lose
    shard: tuple[int, int] = (0, 1)  # (i, n): this process encodes chunks c with c % n == i
    shard_size: int | None = None  # images per shard of a sharded store (store.py); None = one file

    def __post_init__(self) -> None:
        check_loading(self.batch_size, self.workers)
        if self.chunk_size < 1:
            raise UsageError("--chunk-size must be at least 1")
        if self.shard_size is not None and self.shard_size < 1:
            raise UsageError("--shard-size must be at least 1")
        if self.shard_size is not None:  # each chunk becomes one shard
            object.__setattr__(self, "chunk_size", self.shard_size)
        check_shard(*self.shard)


def describe_preprocess(preprocess: Any) -> str:
    """A one-line description of an open_clip/torchvision preprocess transform."""
    steps = getattr(preprocess, "transforms", [preprocess])
    names = [t.__name__ if isinstance(t, types.FunctionType) else " ".join(repr(t).split()) for t in steps]
    return " -> ".join(names)


def extract(
    records: Sequence[dict],
    images_root: str | Path,
    out: str | Path,
    options: ExtractOptions = ExtractOptions(),
    *,
    source: dict | None = None,
    clip: tuple[Any, Any] | None = None,
    on_progress: ProgressFn | None = None,
    merge: bool | None = None,
) -> ExtractResult:
    """Encode every record's image once and write the features store ``out``.

    Work is written to ``out/parts`` in chunks of ``options.chunk_size`` records, each file
    atomically with the record indices it covers, so an interrupted run loses at most one chunk
    and the same call continues where it stopped. With ``options.shard = (i, n)`` this process
    encodes only chunks ``c % n == i``; ``merge`` (default: when n == 1) joins all chunks into the
    final store once they exist.

    Args:
        records: dataset records (``datasets.Dataset.records()``), in a fixed order.
        images_root: what relative ``record["image"]`` paths are relative to.
        out: the store directory.
        options: model, batching and chunking.
        source: description of the dataset (file, format, split), kept in the metadata.
        clip: an already loaded ``(model, preprocess)``; loaded from ``options`` when None.
        on_progress: called with (records done, records total) for this process's share.
        merge: write the final store when all chunks are done (default: unsharded runs).
    """
    out = check_folder(out)
    for folder in (out, out / PARTS_DIR):  # what an interrupted write of this host left
        remove_stale_temps(folder)
    images_root = Path(images_root).expanduser().resolve()
    records = list(records)
    shard_i, shard_n = options.shard
    merge = shard_n == 1 if merge is None else merge
    device, dtype = _device_and_dtype(options, clip)
    settings = run_settings(records, images_root, options, dtype, source or {})
    settings_sha = _settings_sha(settings)
    if store_is_complete(out):
        return _already_complete(out, settings, settings_sha, len(records))
    if not records:
        raise UsageError("the dataset has no images")

    parts = _prepare_parts(out, records, settings)
    chunks = _Chunks(len(records), options.chunk_size)
    mine = [c for c in range(chunks.count) if c % shard_n == shard_i]
    done = _done_chunks(parts, settings_sha, mine)
    pending = [c for c in mine if c not in done]
    total = sum(len(chunks.span(c)) for c in mine)
    reused = sum(len(chunks.span(c)) for c in done)
    result = ExtractResult(
        out, complete=False, records=len(records), shard_records=total, reused=reused, chunks_total=chunks.count
    )
    if on_progress:
        on_progress(reused, total)

    if pending:
        from clipcap_cli.weights.clip_tower import clip_embed_dim  # timm towers (SigLIP's) have no output_dim

        model, preprocess = clip if clip is not None else _load_clip(options, device)
        header = {
            "settings_sha256": settings_sha,
            "run_id": uuid.uuid4().hex[:12],
            "preprocess": describe_preprocess(preprocess),
            "device": str(device),
            "dtype": dtype,
            "embed_dim": int(getattr(model.visual, "output_dim", 0) or clip_embed_dim(options.clip_model) or 0),
        }
        progress = reused

        def step(n: int) -> None:
            nonlocal progress
            progress += n
            if on_progress:
                on_progress(progress, total)

        items = [(i, str(images_root / records[i]["image"])) for c in pending for i in chunks.span(c)]
        loader = _loader(items, preprocess, chunks, pending, options, device)
        result.encoded = _encode_chunks(loader, model, records, chunks, pending, parts, header, step)

    result.skipped = [s for c in mine for s in (_chunk_header(_chunk_path(parts, c)) or {}).get("skipped", [])]
    missing = [c for c in range(chunks.count) if c not in set(mine) and not _chunk_path(parts, c).is_file()]
    result.chunks_missing = len(missing)
    if merge and not missing:
        merged = merge_parts(out)
        result.complete = True
        result.skipped = merged.skipped
    return result


def _device_and_dtype(options: ExtractOptions, clip: tuple[Any, Any] | None) -> tuple[Any, str]:
    """The device CLIP runs on and its dtype's name: the given model's, or what ``options`` will load."""
    if clip is not None:
        param = next(clip[0].parameters())
        return param.device, str(param.dtype).removeprefix("torch.")
    from clipcap_cli.device import pick_device
    from clipcap_cli.weights.clip_tower import clip_dtype

    device = pick_device(options.device)
    return device, str(clip_dtype(device)).removeprefix("torch.")


@dataclass(frozen=True)
class _Chunks:
    """Records cut into chunks of ``size``: chunk c covers records ``span(c)``."""

    records: int
    size: int

    @property
    def count(self) -> int:
        return -(-self.records // self.size)

    def span(self, c: int) -> range:
        return range(c * self.size, min((c + 1) * self.size, self.records))


def _loader(
    items: list[tuple[int, str]],
    preprocess: Any,
    chunks: _Chunks,
    pending: list[int],
    options: ExtractOptions,
    device: Any,
) -> Iterator[tuple[list[int], Any, list[tuple[int, str]]]]:
    """(record indices, pixels, [(record index, error)]) per batch of ``items`` (the pending chunks'
    records, in order), decoded by the one image loader (``inputs.load_batches``).

    Batches never straddle chunks: a chunk is then encoded in the same batches whether the run is
    sharded, resumed or neither, so the stores come out bit-identical.
    """
    from clipcap_cli.data.inputs import load_batches

    workers = default_workers(device) if options.workers is None else options.workers
    records = [_Record(index, path) for index, path in items]
    for batch in load_batches(
        records,
        preprocess,
        options.batch_size,
        min(workers, len(records)),
        group_of=lambda r: r.index // chunks.size,
        pin_memory=device.type == "cuda",
    ):
        ok = [records[batch.indices[p]].index for p in batch.pixel_positions]
        failed = [(records[batch.indices[p]].index, error) for p, error in batch.errors.items()]
        yield ok, batch.pixels, failed


@dataclass(frozen=True)
class _Record:
    """A dataset record's image for the loader: its index in the records, and where the file is."""

    index: int
    location: str

    def open_image(self) -> Any:
        from clipcap_cli.data.images import open_rgb

        return open_rgb(self.location)


def _encode_chunks(
    loader: Any,
    model: Any,
    records: list[dict],
    chunks: _Chunks,
    pending: list[int],
    parts: Path,
    header: dict,
    step: Callable[[int], None],
) -> int:
    """Encode what ``loader`` yields and write each pending chunk as soon as all its records are in
    (the loader keeps order, so chunks complete one after another). Returns the images read."""
    from clipcap_cli.data import clip_image

    remaining = {c: len(chunks.span(c)) for c in pending}
    rows: dict[int, list] = {c: [] for c in pending}
    ok_idx: dict[int, list[int]] = {c: [] for c in pending}
    bad: dict[int, list[dict]] = {c: [] for c in pending}
    embed_dim, encoded = header["embed_dim"], 0
    for indices, pixels, failed in loader:
        finished: list[int] = []
        if pixels is not None:
            emb = clip_image.encode_pixels(model, pixels).cpu()  # CLIP's dtype: fp16 on CUDA, as the original stored
            embed_dim = emb.shape[1]
            for i, row in zip(indices, emb):
                c = i // chunks.size
                rows[c].append(row.clone())
                ok_idx[c].append(i)
                remaining[c] -= 1
                finished.append(c)
        for i, reason in failed:
            c = i // chunks.size
            bad[c].append({"index": i, "image": records[i]["image"], "reason": reason})
            remaining[c] -= 1
            finished.append(c)
        for c in sorted(set(finished)):
            if remaining[c] == 0:
                _write_chunk(parts, c, rows.pop(c), ok_idx.pop(c), bad.pop(c), header, embed_dim)
                remaining[c] = -1
        encoded += len(indices)
        step(len(indices) + len(failed))
    return encoded


def _load_clip(options: ExtractOptions, device: Any) -> tuple[Any, Any]:

    from clipcap_cli.weights import clip_tower

    return clip_tower.load_clip(options.clip_model, options.clip_pretrained, device)
