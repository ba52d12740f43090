"""Stored CLIP embeddings as captioning input (`clipcap caption --embeddings PATH`): no image is read.

Three layouts are read, each file one shard of the sharded runner (``shards.Shard.embeddings``):

- clip-retrieval / embedding-reader output: ``img_emb/img_emb_N.npy`` (N, D) with
  ``metadata/metadata_N.parquet`` row for row (key, url, caption, image_path columns, as present);
- clipcap features stores (``features.load_features``), cut into slices of ``shard_size`` rows;
- ``NAME.emb.safetensors`` from `caption --output-dir --save-embeddings`, keyed by the
  ``NAME.jsonl``/``NAME.parquet`` beside it (NaN rows, samples that failed then, fail again).

``check`` compares the embeddings with the model before any work: width, the CLIP that made them
(where the metadata says), and whether they are L2-normalised while the model expects raw CLIP output.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcap_cli.batch.shards import SHARD_SIZE, Sample, Shard
from clipcap_cli.errors import ClipCapError, UsageError

if TYPE_CHECKING:
    from clipcap_cli.config import ModelConfig

EMB_SUFFIX = ".emb.safetensors"
NPY_PATTERN = re.compile(r"^img_emb_(\d+)\.npy$")
NORM_SAMPLE = 64  # rows whose norms tell whether a file is L2-normalised
NORM_TOLERANCE = 1e-2  # |norm - 1| below this for every sampled row: normalised (fp16 storage included)
KEY_COLUMNS = ("key", "image_path", "url")  # clip-retrieval metadata: what names a row, in order of preference


class EmbeddingsError(ClipCapError):
    """Stored embeddings that cannot be read."""


@dataclass(frozen=True)
class EmbeddingFile:
    """One file of stored embeddings (a shard's worth), and what its metadata says about it."""

    kind: str  # "npy" (clip-retrieval), "safetensors" (--save-embeddings) or "store" (clipcap features)
    path: str  # the embeddings file (for a store: the store folder)
    metadata: str | None = None  # the row metadata: a parquet (npy), the records file (safetensors)
    rows: tuple[int, int] | None = None  # a store's slice [start, stop)
    width: int = 0  # D
    clip_model: str | None = None  # the CLIP that made the embeddings, where the metadata says
    clip_pretrained: str | None = None
    normalized: bool | None = None  # what the metadata claims (None: not said; measured instead)

    def matrix(self) -> Any:
        """The (N, D) embeddings: a read-only memory map (npy) or a tensor."""
        if self.kind == "npy":
            import numpy as np

            return np.load(self.path, mmap_mode="r")
        if self.kind == "safetensors":
            from clipcap_cli.batch.sharded_output import load_embeddings

            return load_embeddings(self.path)
        start, stop = self.rows or (0, None)
        return _store(self.path).embeddings[start:stop]

    def samples(self, shard: str) -> tuple[list[Sample], str | None]:
        """The shard's samples (one per row, keyed by the metadata), and why it could not be read whole."""
        try:
            matrix = self.matrix()
            infos = self._infos(len(matrix))
        except (OSError, ValueError, ClipCapError) as exc:
            return [], f"unreadable ({' '.join(str(exc).split())})"
        if len(matrix) != len(infos):
            return [], f"{len(matrix)} embeddings but {len(infos)} metadata rows ({self.metadata})"
        samples = []
        for i, (key, meta) in enumerate(infos):
            row = matrix[i]
            if _has_nan(row):
                samples.append(
                    Sample(shard, key, i, error="no embedding: this sample failed when it was encoded", meta=meta)
                )
            else:
                samples.append(Sample(shard, key, i, embedding=row, meta=meta))
        return samples, None

    def _infos(self, n: int) -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
        """(key, record fields) for each row."""
        if self.kind == "store":
            start, stop = self.rows or (0, None)
            out = []
            for r in _store(self.path).records[start:stop]:
                caps = r.get("captions") or []
                out.append((str(r["image"]), (("source_caption", caps[0]),) if caps else ()))
            return out
        if self.metadata is None:
            return [(str(i), ()) for i in range(n)]
        rows = _read_rows(self.metadata)
        if self.kind == "safetensors":
            keep = ("url", "source_caption")
            return [
                (str(r.get("key", i)), tuple((k, r[k]) for k in keep if r.get(k) is not None))
                for i, r in enumerate(rows)
            ]
        out = []
        for i, r in enumerate(rows):
            key = next((str(r[c]) for c in KEY_COLUMNS if r.get(c) is not None), str(i))
            meta = []
            if r.get("url") is not None:
                meta.append(("url", str(r["url"])))
            if r.get("caption") is not None:
                meta.append(("source_caption", str(r["caption"])))
            out.append((key, tuple(meta)))
        return out

    def looks_normalized(self) -> bool:
        """Whether the first rows all have unit L2 norm (the metadata's claim wins when it makes one)."""
        if self.normalized is not None:
            return self.normalized
        import numpy as np

        head = self.matrix()[:NORM_SAMPLE]
        rows = np.asarray(head.float().numpy() if hasattr(head, "numpy") else head, dtype=np.float64)
        rows = rows[~np.isnan(rows).any(axis=1)]
        if len(rows) == 0:
            return False
        return bool(np.all(np.abs(np.linalg.norm(rows, axis=1) - 1.0) < NORM_TOLERANCE))


@functools.lru_cache(maxsize=1)
def _store(path: str) -> Any:
    """A features store, loaded once for all its slices."""
    from clipcap_cli.data.features import load_features

    return load_features(path)


def _has_nan(row: Any) -> bool:
    import numpy as np
    import torch

    if isinstance(row, torch.Tensor):
        return bool(torch.isnan(row).any())
    return bool(np.isnan(np.asarray(row, dtype=np.float32)).any())


def _read_rows(path: str) -> list[dict]:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{path}: reading parquet metadata needs pyarrow: pip install pyarrow") from None
    return pq.read_table(path).to_pylist()


# --------------------------------------------------------------------------- finding the files


def discover(paths: Sequence[str], shard_size: int = SHARD_SIZE) -> list[Shard]:
    """The job's shards, one per embeddings file (a store: one per ``shard_size`` rows), in a fixed order."""
    files: list[tuple[str, EmbeddingFile]] = []
    for arg in paths:
        files.extend(_files(Path(arg).expanduser(), arg, shard_size))
    if not files:
        raise UsageError("--embeddings: no embeddings found")
    shards: list[Shard] = []
    seen: dict[str, str] = {}
    for name, f in files:
        if name in seen:
            raise UsageError(
                f"--embeddings: two files give shard {name} ({seen[name]} and {f.path}): caption them into "
                "different --output-dir folders"
            )
        seen[name] = f.path
        shards.append(Shard(name, len(shards), embeddings=f))
    return shards


def _files(path: Path, arg: str, shard_size: int) -> list[tuple[str, EmbeddingFile]]:
    from clipcap_cli.data import features

    if features.is_store(path):
        return _store_files(path, shard_size)
    if path.is_file() and path.name.endswith(EMB_SUFFIX):
        return [_safetensors_file(path)]
    if path.is_file() and path.suffix == ".npy":
        return [_npy_file(path)]
    if path.is_dir():
        emb_dir = path / "img_emb" if (path / "img_emb").is_dir() else path
        npys = sorted(
            (p for p in emb_dir.iterdir() if NPY_PATTERN.match(p.name)),
            key=lambda p: int(NPY_PATTERN.match(p.name).group(1)),  # type: ignore[union-attr]
        )
        if npys:
            return [_npy_file(p) for p in npys]
        saved = sorted(path.glob("*" + EMB_SUFFIX))
        if saved:
            return [_safetensors_file(p) for p in saved]
        raise UsageError(
            f"--embeddings {arg}: no embeddings here (img_emb/img_emb_N.npy, *{EMB_SUFFIX}, or a features store)"
        )
    if not path.exists():
        raise UsageError(f"--embeddings {arg}: no such file or directory")
    raise UsageError(
        f"--embeddings {arg}: not an embeddings file (img_emb_N.npy, NAME{EMB_SUFFIX}, or a features store folder)"
    )


def _npy_file(path: Path) -> tuple[str, EmbeddingFile]:
    import numpy as np

    try:
        matrix = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise UsageError(f"--embeddings {path}: unreadable .npy ({exc})") from None
    if matrix.ndim != 2:
        raise UsageError(f"--embeddings {path}: expected (N, D) embeddings, got shape {matrix.shape}")
    match = NPY_PATTERN.match(path.name)
    meta = None
    if match is not None:
        candidate = path.parent.parent / "metadata" / f"metadata_{match.group(1)}.parquet"
        meta = str(candidate) if candidate.is_file() else None
    return path.stem, EmbeddingFile("npy", str(path), meta, width=int(matrix.shape[1]))


def _safetensors_file(path: Path) -> tuple[str, EmbeddingFile]:
    from safetensors import safe_open

    from clipcap_cli.batch.sharded_output import EMBEDDINGS_KEY

    try:
        with safe_open(str(path), framework="pt") as f:
            shape = f.get_slice(EMBEDDINGS_KEY).get_shape()
    except Exception as exc:  # safetensors raises its own error types
        raise UsageError(f"--embeddings {path}: not a --save-embeddings file ({' '.join(str(exc).split())})") from None
    name = path.name[: -len(EMB_SUFFIX)]
    meta = next(
        (str(p) for p in (path.with_name(name + ".jsonl"), path.with_name(name + ".parquet")) if p.is_file()), None
    )
    return name, EmbeddingFile("safetensors", str(path), meta, width=int(shape[1]))


def _store_files(path: Path, shard_size: int) -> list[tuple[str, EmbeddingFile]]:
    store = _store(str(path))
    n, width = len(store), int(store.embeddings.shape[1])
    meta = store.meta
    normalized = meta.get("normalized")
    base = store.path.name
    parts = max(1, math.ceil(n / shard_size))
    return [
        (
            f"{base}-{k:05d}" if parts > 1 else base,
            EmbeddingFile(
                "store",
                str(store.path),
                rows=(k * shard_size, min(n, (k + 1) * shard_size)),
                width=width,
                clip_model=meta.get("clip_model"),
                clip_pretrained=meta.get("clip_pretrained"),
                normalized=bool(normalized) if normalized is not None else None,
            ),
        )
        for k in range(parts)
    ]


# --------------------------------------------------------------------------- the check


def check(shards: Sequence[Shard], config: ModelConfig) -> None:
    """Refuse, in one line, embeddings this model cannot caption: another width, another CLIP, or
    L2-normalised embeddings for a model trained on raw CLIP output."""
    for shard in shards:
        f: EmbeddingFile = shard.embeddings
        if f.width != config.prefix_size:
            raise UsageError(
                f"--embeddings {f.path}: {f.width}-wide embeddings, but the model takes {config.prefix_size} "
                f"(CLIP {config.clip_model}): they were made by another CLIP"
            )
        if f.clip_model and f.clip_model != config.clip_model:
            raise UsageError(
                f"--embeddings {f.path}: made by CLIP {f.clip_model}, but the model was trained on {config.clip_model}"
            )
        if (
            f.clip_model
            and f.clip_pretrained
            and config.clip_pretrained
            and f.clip_pretrained != config.clip_pretrained
        ):
            raise UsageError(
                f"--embeddings {f.path}: made by CLIP {f.clip_model} ({f.clip_pretrained} weights), but the model "
                f"was trained on its {config.clip_pretrained} weights"
            )
    if config.normalize_prefix:
        return  # the model normalises whatever it gets
    for shard in shards:
        f = shard.embeddings
        if f.looks_normalized():
            raise UsageError(
                f"--embeddings {f.path}: the embeddings are L2-normalised (clip-retrieval writes them so), but "
                "the model was trained on raw CLIP output (normalize_prefix off): use a model trained with "
                "--normalize-prefix, or embeddings of raw CLIP output"
            )


def refuse_output(shards: Sequence[Shard], output_dir: Path) -> None:
    """--output-dir must not be the folder of --save-embeddings files: their records would be overwritten."""
    out = output_dir.expanduser().resolve()
    for shard in shards:
        f: EmbeddingFile = shard.embeddings
        if f.kind == "safetensors" and Path(f.path).parent.resolve() == out:
            raise UsageError(
                f"--output-dir {output_dir} holds the embeddings being captioned ({Path(f.path).name}): "
                "its records would be overwritten; write to another folder"
            )
