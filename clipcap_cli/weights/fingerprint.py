"""Fingerprints of weights, so that resumed work is checked against contents, not names.

A sharded captioning folder, a features store and a training run record the sha256 of the weights
they were made with; a resume whose weights differ is refused, however the files are named. Hashing
a large file is remembered in ``cache/sha256.json`` under the data directory, keyed by the file's
path, size and modification time, so an unchanged checkpoint is hashed once (the cache is best
effort: when it cannot be read or written, files are hashed again).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from clipcap_cli.errors import ClipCapError
from clipcap_cli.fsutil import sha256_file

CACHE_FILE = "sha256.json"


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (remembered while its path, size and modification time stay)."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache = _cache_path()
    known = _read_cache(cache)
    if key in known:
        return known[key]
    digest = sha256_file(path)
    if cache is not None:
        known = {k: v for k, v in known.items() if not k.startswith(f"{path}|")}  # older versions of the file
        known[key] = digest
        try:
            from clipcap_cli.fsutil import write_text_atomic

            write_text_atomic(cache, json.dumps(known, indent=0) + "\n")
        except (OSError, ClipCapError):
            pass
    return digest


def weights_fingerprint(name_or_path: str) -> str | None:
    """The sha256 of a model's weights: a registry model's verified hash, or a file's content hash;
    None when there is nothing local to fingerprint (a name not downloaded yet, a hub name)."""
    from clipcap_cli.weights import registry as pretrained

    if name_or_path in pretrained.REGISTRY:
        model = pretrained.REGISTRY[name_or_path]
        return pretrained.recorded_sha256(model) if model.path.is_file() else None
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():  # a local language model or CLIP folder: its weights files
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth") and p.is_file())
        if files:
            return hashlib.sha256("".join(f"{p.name}:{file_sha256(p)}\n" for p in files).encode()).hexdigest()
    return None


def _cache_path() -> Path | None:
    from clipcap_cli import paths

    try:
        return paths.home() / "cache" / CACHE_FILE
    except (OSError, ClipCapError):
        return None


def _read_cache(cache: Path | None) -> dict[str, str]:
    if cache is None:
        return {}
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}
