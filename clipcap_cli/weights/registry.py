"""The registry of named pretrained ClipCap models, and resolving ``--model NAME|PATH``.

One place for every released checkpoint: where to fetch it (Hugging Face mirrors first, the
original Google Drive file as a fallback), how big it is, and which CLIP, GPT-2 and settings it
needs. The Hugging Face mirrors publish each file's sha256 (their LFS metadata), and a download
from them is checked against it; Google Drive publishes none. Either way the hash is recorded
beside the file (``<file>.sha256``, with who vouched for it), later downloads are checked against
a verified record, and a verified record is never replaced by an unverified one.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from clipcap_cli import paths
from clipcap_cli.config import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from clipcap_cli.errors import ClipCapError, ModelNotAvailableError, UsageError
from clipcap_cli.fsutil import write_text_atomic

log = logging.getLogger(__name__)

MB = 1000 * 1000


def _drive(file_id: str) -> str:
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download"


@dataclass(frozen=True)
class PretrainedModel:
    name: str
    description: str
    filename: str
    urls: tuple[str, ...]
    approx_size: int | None  # bytes, for the free-space check and the listing (not verified exactly)
    sha256: str | None = None  # when published; otherwise recorded on first download
    settings: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields this model needs

    @property
    def path(self) -> Path:
        return paths.models_dir() / self.filename

    @property
    def clip(self) -> tuple[str, str | None]:
        return self.settings.get("clip_model", DEFAULT_CLIP_MODEL), self.settings.get(
            "clip_pretrained", DEFAULT_CLIP_PRETRAINED
        )

    @property
    def gpt2(self) -> str:
        return self.lm

    @property
    def lm(self) -> str:
        """The language model (and tokenizer) the registry entry names."""
        return self.settings.get("lm") or self.settings.get("gpt2", "gpt2")


REGISTRY: dict[str, PretrainedModel] = {
    m.name: m
    for m in (
        PretrainedModel(
            name="coco",
            description="COCO, MLP mapper + fine-tuned GPT-2 (CLIP ViT-B/32)",
            filename="coco_weights.pt",
            urls=(
                "https://huggingface.co/akhaliq/CLIP-prefix-captioning-COCO-weights/resolve/main/coco_weights.pt",
                _drive("1IdaBtMSvtyzF0ByVaBHtvM0JYSXRExRX"),
            ),
            approx_size=636 * MB,
            settings={
                "clip_model": DEFAULT_CLIP_MODEL,
                "clip_pretrained": DEFAULT_CLIP_PRETRAINED,
                "normalize_prefix": False,
            },
        ),
        PretrainedModel(
            name="conceptual",
            description="Conceptual Captions, MLP mapper + fine-tuned GPT-2 (CLIP ViT-B/32)",
            filename="conceptual_weights.pt",
            urls=(
                "https://huggingface.co/akhaliq/CLIP-prefix-captioning-conceptual-weights/resolve/main/conceptual_weights.pt",
                _drive("14pXWwB4Zm82rsDdvbGguLfx9F8aM7ovT"),
            ),
            approx_size=636 * MB,
            settings={
                "clip_model": DEFAULT_CLIP_MODEL,
                "clip_pretrained": DEFAULT_CLIP_PRETRAINED,
                "normalize_prefix": False,
            },
        ),
        PretrainedModel(
            name="coco-transformer",
            description="COCO, transformer mapper 40/40, frozen GPT-2 (CLIP RN50x4, normalised prefix)",
            filename="coco_transformer_weights.pt",
            urls=(_drive("1GYPToCqFREwi285wPLhuVExlz7DDUDfJ"),),
            approx_size=740 * MB,  # deduced (mapper + full GPT-2), not measured
            settings={
                "clip_model": "RN50x4",
                "clip_pretrained": "openai",
                "normalize_prefix": True,
                "only_prefix": True,
            },
        ),
    )
}


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> PretrainedModel:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"unknown model {name!r}{hint}; known models: {', '.join(REGISTRY)}, or a checkpoint file")
    return REGISTRY[name]


def _hash_file(model: PretrainedModel) -> Path:
    return model.path.with_name(model.path.name + ".sha256")


def record(model: PretrainedModel) -> dict[str, Any]:
    """What was recorded when the file was downloaded: ``sha256``, ``size`` and ``verified_by``
    (the host that published the hash, or None when nobody did); {} when nothing was."""
    try:
        data = json.loads(_hash_file(model).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("sha256"), str) else {}


def recorded_sha256(model: PretrainedModel) -> str | None:
    return model.sha256 or record(model).get("sha256")


def verified_sha256(model: PretrainedModel) -> str | None:
    """The hash a download must match: the registry's own, or a recorded one someone published."""
    rec = record(model)
    return model.sha256 or (rec["sha256"] if rec.get("verified_by") else None)


def is_cached(model: PretrainedModel) -> bool:
    """The file is there and complete (its size matches what was recorded when it was verified)."""
    if not model.path.is_file():
        return False
    rec = record(model)
    if not rec:
        return model.sha256 is not None  # a registry hash is checked by `download`; trust the file here
    return rec.get("size") == model.path.stat().st_size


def manual_hint(model: PretrainedModel) -> str:
    return f"download {model.urls[0]} and place it at {model.path}"


def fetch(
    model: PretrainedModel,
    *,
    force: bool = False,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download (or re-verify) a registry model's checkpoint and return its path.

    A download from a Hugging Face mirror is checked against the sha256 the mirror publishes;
    one from Google Drive cannot be, which is logged as a warning. With ``force``, a verified
    record stays the reference: the new file must match it, or it is refused.
    """
    from clipcap_cli.fsutil import sha256_file
    from clipcap_cli.weights.download import fetch_verified
    from clipcap_cli.weights.download_errors import OfflineError

    offline = not paths.can_download()
    if offline and not model.path.is_file():
        why = "offline mode is on" if paths.offline_requested() else "the network is unreachable"
        raise ModelNotAvailableError(f"model '{model.name}' is not downloaded and {why}: {manual_hint(model)}")
    old = record(model)
    expected = verified_sha256(model) if force else recorded_sha256(model)
    try:
        got = fetch_verified(model.urls, model.path, sha256=expected, force=force, progress=progress, offline=offline)
    except OfflineError as exc:
        raise ModelNotAvailableError(f"model '{model.name}': {exc}") from exc
    digest = got.sha256 or sha256_file(got.path)
    verified_by = got.published_by or ("registry" if model.sha256 else None)
    if verified_by is None and old.get("verified_by") and old.get("sha256") == digest:
        verified_by = old["verified_by"]  # the same bytes a mirror vouched for before
    if verified_by is None and old.get("sha256") != digest:
        source = urlsplit(got.url).hostname if got.url else "the file in place"
        log.warning(
            "model '%s': %s publishes no checksum, so the download could not be verified; recorded its sha256 %s",
            model.name,
            source,
            digest,
        )
    _write_record(model, digest, verified_by)
    return got.path


def _write_record(model: PretrainedModel, digest: str, verified_by: str | None) -> None:
    st = model.path.stat()
    write_text_atomic(
        _hash_file(model),
        json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "verified_by": verified_by})
        + "\n",
    )


def check_cached(model: PretrainedModel) -> None:
    """Refuse a cached checkpoint whose bytes no longer match the hash recorded when it was downloaded.

    Cheap when nothing changed (size and modification time as recorded); otherwise the file is
    hashed again, and a match renews the record (best effort: a read-only folder only costs time).
    """
    rec = record(model)
    if not rec:
        return
    st = model.path.stat()
    if rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
        return
    from clipcap_cli.fsutil import sha256_file  # not download's module: a cached run imports no network code

    if rec.get("size") != st.st_size or sha256_file(model.path) != rec["sha256"]:
        raise ModelNotAvailableError(
            f"model '{model.name}': {model.path} no longer matches the sha256 recorded when it was downloaded "
            f"({rec['sha256'][:12]}...): run `clipcap download --force {model.name}`"
        )
    try:
        _write_record(model, rec["sha256"], rec.get("verified_by"))
    except (OSError, ClipCapError):
        pass


def check_model_argument(name_or_path: str) -> None:
    """Fail early (usage error, with a suggestion) when ``--model`` is neither a file nor a known name."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file() or name_or_path in REGISTRY:
        return
    if candidate.suffix in {".pt", ".pth", ".bin", ".safetensors"} or "/" in name_or_path:
        raise UsageError(f"checkpoint not found: {candidate}")
    get(name_or_path)


def resolve(
    name_or_path: str, *, progress: Callable[[int, int | None], None] | None = None
) -> tuple[Path, dict[str, Any]]:
    """``--model`` to (checkpoint file, ModelConfig settings the registry implies).

    A registry name is downloaded on first use; an existing file is used as it is.
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate, {}
    if name_or_path in REGISTRY:
        model = REGISTRY[name_or_path]
        if model.path.is_file() and record(model):
            check_cached(model)  # the bytes the record vouches for, or one line saying what to do
            return model.path, dict(model.settings)
        path = model.path if is_cached(model) else fetch(model, progress=progress)
        return path, dict(model.settings)
    check_model_argument(name_or_path)  # raises: a missing file, or an unknown name with a suggestion
    raise AssertionError("unreachable")
