"""The bookkeeping of a resumable, shardable extraction (``features.extract``): the run's settings and
their fingerprints, the chunk files under ``parts/`` that survive an interruption, checking that a
resumed or parallel run matches them, and merging the finished chunks into the store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from clipcap_cli.data.store_files import read_skipped, save_features, write_skipped
from clipcap_cli.data.store_format import (
    EMBEDDINGS_FILE,
    EMBEDDINGS_KEY,
    INDEX_FILE,
    META_FILE,
    PARTS_DIR,
    SKIPPED_FILE,
    TOKENS_FILE,
    FeaturesError,
    with_activation,
)
from clipcap_cli.errors import UsageError
from clipcap_cli.fsutil import atomic_write as _atomic_write
from clipcap_cli.fsutil import create_exclusive, write_text_atomic

if TYPE_CHECKING:
    from clipcap_cli.data.features import ExtractOptions

CHUNK_PREFIX = "chunk-"
SETTINGS_FILE = "settings.json"
RECORDS_FILE = "records.jsonl"


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
