"""CLIP image features: the on-disk store that `extract` writes and `train`/`eval` read, and the
batched, resumable, shardable encoding that fills it.

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

import hashlib
import json
import time
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from clipcap_cli.batch.shards import check_shard
from clipcap_cli.config import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from clipcap_cli.data.inputs import check_loading, default_workers
from clipcap_cli.data.store_format import (  # the format's names, re-exported: features is where callers look
    EMBEDDINGS_FILE,
    EMBEDDINGS_KEY,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    META_FILE,
    PARTS_DIR,
    SKIPPED_FILE,
    TOKENS_FILE,
    FeaturesError,
    FeatureSet,
    _check_activation,
    _check_record,
    _store_dir,
    is_sharded,
    read_meta,
    with_activation,
)
from clipcap_cli.errors import UsageError
from clipcap_cli.fsutil import atomic_write as _atomic_write
from clipcap_cli.fsutil import check_folder, create_exclusive, remove_stale_temps, write_text_atomic
from clipcap_cli.version import __version__

if TYPE_CHECKING:
    import torch


def is_store(path: Path) -> bool:
    """Whether ``path`` names a features store (complete, or being extracted) rather than images.
    An original ClipCap pickle counts: loading it says how to convert it."""
    folder = _store_dir(path)
    if folder.suffix in (".pkl", ".pickle"):
        return True
    return folder.is_dir() and ((folder / META_FILE).is_file() or (folder / PARTS_DIR / "settings.json").is_file())


def save_features(path: str | Path, embeddings: torch.Tensor, records: list[dict], meta: dict) -> Path:
    """Write a complete store to the directory ``path`` and return it.

    Each file is written to a temp file and renamed; ``meta.json`` goes first out and last in, so
    a crash leaves either the old store, or no ``meta.json`` (incomplete, refused by
    ``load_features``), never a mix. ``meta`` is completed with the format keys and the counts.
    """
    from safetensors.torch import save_file

    out = _store_dir(path)
    out.mkdir(parents=True, exist_ok=True)
    if embeddings.ndim != 2:
        raise FeaturesError(f"embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] != len(records):
        raise FeaturesError(f"{embeddings.shape[0]} embedding rows but {len(records)} records")
    records = [_check_record(i, r) for i, r in enumerate(records)]
    index_text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    full_meta = dict(meta)
    if full_meta.get("clip_model") and not full_meta.get("clip_activation"):
        from clipcap_cli.weights.clip_tower import clip_activation

        # Features written now come from clipcap's CLIP loader, which builds the activation the tag needs.
        full_meta["clip_activation"] = clip_activation(str(full_meta["clip_model"]), full_meta.get("clip_pretrained"))
    full_meta.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        count=len(records),
        embed_dim=int(embeddings.shape[1]),
        dtype=str(embeddings.dtype).removeprefix("torch."),
        normalized=bool(meta.get("normalized", False)),
        num_captions=sum(len(r["captions"]) for r in records),
        index_sha256=hashlib.sha256(index_text.encode("utf-8")).hexdigest(),
        store_id=uuid.uuid4().hex,  # changes on every write: lets caches (tokens) detect a new store
    )
    full_meta.setdefault("clipcap_version", __version__)
    full_meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    meta_text = json.dumps(full_meta, indent=2, ensure_ascii=False) + "\n"

    tensor = embeddings.detach().to("cpu").contiguous()
    (out / META_FILE).unlink(missing_ok=True)
    _atomic_write(
        out / EMBEDDINGS_FILE,
        lambda tmp: save_file({EMBEDDINGS_KEY: tensor}, tmp, metadata={"format": FORMAT, "meta": meta_text}),
    )
    write_text_atomic(out / INDEX_FILE, index_text)
    write_text_atomic(out / META_FILE, meta_text)
    return out


def load_features(path: str | Path) -> FeatureSet:
    """Load the whole store at ``path`` (the directory, or its ``meta.json``), either layout
    (``store.py`` reads a sharded one shard by shard)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from clipcap_cli.data.store import open_store

    folder, meta = read_meta(path)
    if is_sharded(meta):  # format 2: every shard, concatenated
        return open_store(folder).load_all()
    try:
        embeddings = load_file(str(folder / EMBEDDINGS_FILE))[EMBEDDINGS_KEY]
    except (OSError, SafetensorError, KeyError) as exc:
        raise FeaturesError(f"{folder / EMBEDDINGS_FILE}: unreadable ({exc})") from exc
    try:
        index_bytes = (folder / INDEX_FILE).read_bytes()
        records = [json.loads(line) for line in index_bytes.decode("utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise FeaturesError(f"{folder / INDEX_FILE}: unreadable ({exc})") from exc
    count = meta.get("count")
    if embeddings.ndim != 2 or embeddings.shape[0] != len(records) or (count is not None and count != len(records)):
        raise FeaturesError(
            f"{folder}: inconsistent store ({tuple(embeddings.shape)} embeddings, {len(records)} index lines, count {count})"
        )
    _check_activation(meta, folder)
    expected_sha = meta.get("index_sha256")
    if expected_sha and hashlib.sha256(index_bytes).hexdigest() != expected_sha:
        raise FeaturesError(f"{folder}: {INDEX_FILE} does not belong to this {META_FILE} (files from different runs)")
    return FeatureSet(embeddings=embeddings, records=records, meta=meta, path=folder)


def read_skipped(path: str | Path) -> list[dict]:
    """The ``skipped.jsonl`` entries of a store (empty when nothing was skipped)."""
    file = _store_dir(path) / SKIPPED_FILE
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- extraction

ProgressFn = Callable[[int, int], None]  # (records done, records total) for this process's share
CHUNK_PREFIX = "chunk-"
SETTINGS_FILE = "settings.json"
RECORDS_FILE = "records.jsonl"


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


@dataclass
class ExtractResult:
    """What one `extract` call did."""

    out: Path
    complete: bool  # the final store exists (written now, or already there)
    noop: bool = False  # the store was already complete; nothing was done
    records: int = 0  # records in the dataset
    shard_records: int = 0  # records assigned to this process
    encoded: int = 0  # images this call read and encoded
    reused: int = 0  # records covered by part files from earlier runs (resume)
    chunks_total: int = 0
    chunks_missing: int = 0  # chunks other shards still have to write
    skipped: list[dict] = field(default_factory=list)  # {"image", "reason"} (all shards once merged)


def describe_preprocess(preprocess: Any) -> str:
    """A one-line description of an open_clip/torchvision preprocess transform."""
    steps = getattr(preprocess, "transforms", [preprocess])
    names = [t.__name__ if isinstance(t, types.FunctionType) else " ".join(repr(t).split()) for t in steps]
    return " -> ".join(names)


def _settings_sha(settings: dict) -> str:
    # The dataset's location is informative only: a moved annotations file with the same records resumes fine.
    return _sha256_json({k: v for k, v in settings.items() if k != "source"})


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _read_json(path: Path) -> Any:
    """A JSON file of a store or of its parts; one line naming it when it is damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise UsageError(
            f"{path} is unreadable ({reason}): the store is damaged; run the same command with "
            "--overwrite to extract it again"
        ) from None


def store_is_complete(out: Path) -> bool:
    return (out / META_FILE).is_file() and not (out / PARTS_DIR).is_dir()


def clear_store(out: Path) -> None:
    """Remove what an earlier extraction wrote in ``out`` (for --overwrite); other files stay."""
    import shutil

    for name in (META_FILE, EMBEDDINGS_FILE, INDEX_FILE, SKIPPED_FILE, TOKENS_FILE):
        (out / name).unlink(missing_ok=True)
    for folder in (PARTS_DIR, "shards", "tokens"):  # a sharded store's (store.py) and its token caches
        shutil.rmtree(out / folder, ignore_errors=True)


def run_settings(records: Sequence[dict], images_root: Path, options: ExtractOptions, dtype: str, source: dict) -> dict:
    """What must match for part files to be combined: same model, same records, same chunking."""
    from clipcap_cli.weights.clip_tower import clip_activation

    return {
        "clip_model": options.clip_model,
        "clip_pretrained": options.clip_pretrained,
        "clip_activation": clip_activation(options.clip_model, options.clip_pretrained),
        "clip_weights_sha256": clip_weights_sha256(options.clip_model, options.clip_pretrained),
        "dtype": dtype,
        "chunk_size": options.chunk_size,
        **({"layout": "sharded"} if options.shard_size else {}),
        "records": len(records),
        "records_sha256": _sha256_json(list(records)),
        "images_root": str(images_root),
        "source": source,
    }


def clip_weights_sha256(model: str, pretrained: str | None) -> str | None:
    """The fingerprint of the CLIP weights a run encodes with (None: random weights, as in tests)."""
    from clipcap_cli.weights.clip_tower import clip_spec, clip_weights_file
    from clipcap_cli.weights.fingerprint import file_sha256

    path = clip_weights_file(clip_spec(model, pretrained))
    return file_sha256(path) if path is not None else None


def _comparable(old: dict, new: dict) -> dict:
    """``new`` as a store made before CLIP weights were fingerprinted would have recorded it."""
    return new if "clip_weights_sha256" in old else {k: v for k, v in new.items() if k != "clip_weights_sha256"}


def _settings_mismatch(old: dict, new: dict) -> str:
    diffs = []
    old = with_activation(old)
    if "clip_weights_sha256" in old and old["clip_weights_sha256"] != new.get("clip_weights_sha256"):
        diffs.append(
            f"the CLIP weights changed (sha256 {str(old['clip_weights_sha256'])[:12]}... then, "
            f"{str(new.get('clip_weights_sha256'))[:12]}... now): features from the two cannot be mixed"
        )
    if old.get("clip_activation") != new.get("clip_activation"):
        diffs.append(
            f"CLIP activation {old.get('clip_activation')} then, {new.get('clip_activation')} now: "
            "features from the two cannot be mixed"
        )
    for key in ("clip_model", "clip_pretrained", "dtype", "chunk_size", "images_root", "records"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key} {old.get(key)!r} then, {new.get(key)!r} now")
    if not diffs and old.get("records_sha256") != new.get("records_sha256"):
        diffs.append("the dataset's images or captions changed")
    return "; ".join(diffs)


def _prepare_parts(out: Path, records: Sequence[dict], settings: dict) -> Path:
    """Create ``out/parts`` with the run's settings and records, or check an existing one matches.

    The settings file comes first, and is created only if absent (atomically: of several shards
    starting at once exactly one creates it), so every later shard is checked against it before
    it writes anything: one with other settings is refused instead of overwriting the records.
    """
    parts = out / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    settings_file = parts / SETTINGS_FILE
    if not create_exclusive(settings_file, json.dumps(settings, indent=2, ensure_ascii=False) + "\n"):
        diff = _settings_mismatch(_read_json(settings_file), settings)
        if diff:
            raise UsageError(
                f"{out} holds an unfinished extraction with other settings ({diff}): rerun with --overwrite to start over, or use another --out"
            )
        if (parts / RECORDS_FILE).is_file():
            return parts
    # The settings pin the records (count and sha256): concurrent shards write identical content.
    write_text_atomic(parts / RECORDS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return parts


def _chunk_path(parts: Path, chunk: int) -> Path:
    return parts / f"{CHUNK_PREFIX}{chunk:06d}.safetensors"


def _chunk_header(path: Path) -> dict | None:
    """A part file's metadata, or None when it is unreadable (then it is redone)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return {k: json.loads(v) for k, v in meta.items()}
    except Exception:  # a torn or foreign file: not trusted, the chunk is encoded again
        return None


def _done_chunks(parts: Path, settings_sha: str, chunks: Iterable[int]) -> dict[int, dict]:
    done = {}
    for c in chunks:
        path = _chunk_path(parts, c)
        if path.is_file():
            header = _chunk_header(path)
            if header and header.get("settings_sha256") == settings_sha and header.get("chunk") == c:
                done[c] = header
    return done


def _write_chunk(
    parts: Path, chunk: int, rows: list[Any], indices: list[int], skipped: list[dict], header: dict, embed_dim: int
) -> None:
    import torch
    from safetensors.torch import save_file

    emb = torch.stack(rows) if rows else torch.empty(0, embed_dim)
    meta = dict(header, chunk=chunk, indices=indices, skipped=skipped)
    _atomic_write(
        _chunk_path(parts, chunk),
        lambda tmp: save_file(
            {EMBEDDINGS_KEY: emb.contiguous()}, tmp, metadata={k: json.dumps(v) for k, v in meta.items()}
        ),
    )


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


def _already_complete(out: Path, settings: dict, settings_sha: str, n_records: int) -> ExtractResult:
    """The no-op result for a finished store made with these settings; a clear error for other settings."""
    meta = _read_json(out / META_FILE)
    old = meta.get("run_settings", {})
    if _settings_sha(with_activation(old)) != _settings_sha(_comparable(old, settings)):
        why = _settings_mismatch(meta.get("run_settings", {}), settings) or "it was not made by this command"
        raise UsageError(
            f"{out} already holds a features store made differently ({why}): use --overwrite or another --out"
        )
    return ExtractResult(
        out,
        complete=True,
        noop=True,
        records=n_records,
        skipped=read_skipped(out),
        chunks_total=meta.get("extraction", {}).get("chunks", 0),
    )


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


def merge_parts(out: str | Path) -> ExtractResult:
    """Join the part files in ``out/parts`` (from one or several shards) into the final store
    (with ``--shard-size``: turn each into one shard of a sharded store)."""
    import torch
    from safetensors.torch import load_file

    out = Path(out).expanduser()
    parts = out / PARTS_DIR
    if store_is_complete(out):
        return ExtractResult(out, complete=True, noop=True, skipped=read_skipped(out))
    if not (parts / SETTINGS_FILE).is_file() or not (parts / RECORDS_FILE).is_file():
        raise UsageError(f"{out} has no unfinished extraction to merge (no {PARTS_DIR}/{SETTINGS_FILE})")
    settings = _read_json(parts / SETTINGS_FILE)
    settings_sha = _settings_sha(settings)
    records = [
        json.loads(line) for line in (parts / RECORDS_FILE).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if len(records) != settings["records"] or _sha256_json(records) != settings["records_sha256"]:
        raise FeaturesError(f"{parts / RECORDS_FILE} does not match {parts / SETTINGS_FILE}: rerun with --overwrite")
    n_chunks = -(-len(records) // settings["chunk_size"])
    done = _done_chunks(parts, settings_sha, range(n_chunks))
    missing = [c for c in range(n_chunks) if c not in done]
    if missing:
        shown = ", ".join(str(c) for c in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise FeaturesError(
            f"cannot merge {out}: {len(missing)} of {n_chunks} chunks are not done yet (chunks {shown}); finish every shard first"
        )
    if settings.get("layout") == "sharded":  # each chunk becomes a shard, none is joined
        return _shards_from_parts(out, settings, records, done)
    tensors, kept, skipped, runs = [], [], [], {}
    for c in range(n_chunks):
        header = done[c]
        tensors.append(load_file(str(_chunk_path(parts, c)))[EMBEDDINGS_KEY])
        kept.extend(records[i] for i in header["indices"])
        skipped.extend(header["skipped"])
        runs[header["run_id"]] = runs.get(header["run_id"], 0) + len(header["indices"]) + len(header["skipped"])
    first = done[0]
    dims = {t.shape[1] for t in tensors if t.shape[0]}
    dtypes = {t.dtype for t in tensors if t.shape[0]}
    if len(dims) > 1 or len(dtypes) > 1:
        raise FeaturesError(f"part files in {parts} disagree on the embedding width or dtype: rerun with --overwrite")
    embed_dim = dims.pop() if dims else first["embed_dim"]
    dtype = dtypes.pop() if dtypes else getattr(torch, settings["dtype"])
    embeddings = (
        torch.cat([t.reshape(-1, embed_dim).to(dtype) for t in tensors])
        if tensors
        else torch.empty(0, embed_dim, dtype=dtype)
    )
    meta = _store_meta(settings, first, records, kept, skipped, n_chunks, runs)
    meta["settings_sha256"] = settings_sha
    write_skipped(out, skipped)
    save_features(out, embeddings, kept, meta)
    import shutil

    shutil.rmtree(parts, ignore_errors=True)
    return ExtractResult(out, complete=True, records=len(records), skipped=skipped, chunks_total=n_chunks)


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    found = {}
    for dist in ("torch", "open_clip_torch"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def _store_meta(
    settings: dict, header: dict, records: list[dict], kept: list[dict], skipped: list[dict], n_chunks: int, runs: dict
) -> dict:
    source = settings.get("source") or {}
    return {
        "clip_model": settings["clip_model"],
        "clip_pretrained": settings["clip_pretrained"],
        "clip_activation": settings["clip_activation"],
        "normalized": False,  # raw encode_image output, as the original parse_coco.py stored it
        "preprocess": header["preprocess"],
        "device": header["device"],
        "source": source.get("source"),
        "dataset_format": source.get("dataset_format"),
        "split": source.get("split"),
        "images_root": settings["images_root"],
        "counts": {
            "records": len(records),
            "images": len(kept),
            "captions": sum(len(r["captions"]) for r in kept),
            "skipped": len(skipped),
        },
        "extraction": {"chunk_size": settings["chunk_size"], "chunks": n_chunks, "runs": runs},
        "versions": _versions(),
        "run_settings": settings,
    }


def write_skipped(out: Path, skipped: list[dict]) -> None:
    """``skipped.jsonl``: one {"image", "reason"} line per input that could not be encoded."""
    file = out / SKIPPED_FILE
    if not skipped:
        file.unlink(missing_ok=True)
        return
    lines = "".join(
        json.dumps({"image": s["image"], "reason": s["reason"]}, ensure_ascii=False) + "\n" for s in skipped
    )
    write_text_atomic(file, lines)


def _shards_from_parts(out: Path, settings: dict, records: list[dict], done: dict[int, dict]) -> ExtractResult:
    """Finish an extraction with ``--shard-size``: chunk c of ``out/parts`` becomes shard c, one at a
    time (the chunks are complete: ``done`` holds every chunk's header); ``meta.json`` goes in last."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from clipcap_cli.data.store import finish_sharded, write_shard

    parts = out / PARTS_DIR
    (out / META_FILE).unlink(missing_ok=True)
    entries, kept, skipped, runs = [], [], [], {}
    dtype = getattr(torch, settings["dtype"])
    for c in range(len(done)):
        header = done[c]
        emb = load_file(str(_chunk_path(parts, c)))[EMBEDDINGS_KEY]
        if not emb.shape[0]:  # a chunk whose images were all skipped: an empty shard of the store's width
            emb = torch.empty(0, int(header.get("embed_dim") or 0), dtype=dtype)
        shard_records = [records[i] for i in header["indices"]]
        entries.append(write_shard(out, c, emb.to(dtype), shard_records, settings))
        kept.extend(shard_records)
        skipped.extend(header["skipped"])
        runs[header["run_id"]] = runs.get(header["run_id"], 0) + len(header["indices"]) + len(header["skipped"])
    meta = _store_meta(settings, done[0], records, kept, skipped, len(done), runs)
    meta["settings_sha256"] = _settings_sha(settings)
    write_skipped(out, skipped)
    finish_sharded(out, entries, meta)
    shutil.rmtree(parts, ignore_errors=True)
    return ExtractResult(out, complete=True, records=len(records), skipped=skipped, chunks_total=len(done))
