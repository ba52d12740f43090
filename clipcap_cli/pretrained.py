"""The registry of named pretrained ClipCap models, and resolving ``--model NAME|PATH``.

One place for every released checkpoint: where to fetch it (Hugging Face mirrors first, the
original Google Drive file as a fallback), how big it is, and which CLIP, GPT-2 and settings it
needs. The released files have no published sha256, so the hash is recorded on first download
(``<file>.sha256``) and later checks compare against it; the download itself is verified by a
strict load of the state dict's keys and shapes.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from clipcap_cli import paths
from clipcap_cli.config import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from clipcap_cli.errors import CheckpointError, ModelNotAvailableError, UsageError

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
        return self.settings.get("clip_model", DEFAULT_CLIP_MODEL), self.settings.get("clip_pretrained", DEFAULT_CLIP_PRETRAINED)

    @property
    def gpt2(self) -> str:
        return self.settings.get("gpt2", "gpt2")


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
            settings={"clip_model": DEFAULT_CLIP_MODEL, "clip_pretrained": DEFAULT_CLIP_PRETRAINED, "normalize_prefix": False},
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
            settings={"clip_model": DEFAULT_CLIP_MODEL, "clip_pretrained": DEFAULT_CLIP_PRETRAINED, "normalize_prefix": False},
        ),
        PretrainedModel(
            name="coco-transformer",
            description="COCO, transformer mapper 40/40, frozen GPT-2 (CLIP RN50x4, normalised prefix)",
            filename="coco_transformer_weights.pt",
            urls=(_drive("1GYPToCqFREwi285wPLhuVExlz7DDUDfJ"),),
            approx_size=740 * MB,  # deduced (mapper + full GPT-2), not measured
            settings={"clip_model": "RN50x4", "clip_pretrained": "openai", "normalize_prefix": True, "only_prefix": True},
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


def recorded_sha256(model: PretrainedModel) -> str | None:
    if model.sha256:
        return model.sha256
    try:
        return json.loads(_hash_file(model).read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return None


def is_cached(model: PretrainedModel) -> bool:
    """The file is there and complete (its size matches what was recorded when it was verified)."""
    if not model.path.is_file():
        return False
    try:
        recorded = json.loads(_hash_file(model).read_text())
    except (OSError, ValueError):
        return model.sha256 is not None  # a published hash is checked by `download`; trust the file here
    return recorded.get("size") == model.path.stat().st_size


def manual_hint(model: PretrainedModel) -> str:
    return f"download {model.urls[0]} and place it at {model.path}"


def fetch(
    model: PretrainedModel,
    *,
    force: bool = False,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download (or re-verify) a registry model's checkpoint and return its path."""
    from clipcap_cli import download

    offline = not paths.can_download()
    if offline and not model.path.is_file():
        why = "offline mode is on" if paths.offline_requested() else "the network is unreachable"
        raise ModelNotAvailableError(f"model '{model.name}' is not downloaded and {why}: {manual_hint(model)}")
    expected = recorded_sha256(model)
    if force and not model.sha256:
        expected = None  # a forced download starts from scratch, so its hash is recorded anew
    try:
        path = download.fetch(
            model.urls, model.path, sha256=expected, force=force, progress=progress, offline=offline
        )
    except download.OfflineError as exc:
        raise ModelNotAvailableError(f"model '{model.name}': {exc}") from exc
    if recorded_sha256(model) is None or force or not is_cached(model):
        verify_structure(model)
        digest = download.sha256_file(path)
        if model.sha256 and digest != model.sha256:
            path.unlink(missing_ok=True)
            raise CheckpointError(f"model '{model.name}': sha256 {digest} does not match {model.sha256}; file removed")
        _hash_file(model).write_text(json.dumps({"sha256": digest, "size": path.stat().st_size}))
    return path


def verify_structure(model: PretrainedModel) -> None:
    """A strict key-and-shape check of a downloaded file; a bad file is deleted, not kept."""
    from clipcap_cli import checkpoint

    try:
        raw = checkpoint.read(model.path)
        config = checkpoint.infer_config(raw.state)
        checkpoint.check_structure(raw, config)
    except CheckpointError as exc:
        model.path.unlink(missing_ok=True)
        raise CheckpointError(f"model '{model.name}': the downloaded file is not a valid checkpoint ({exc}); removed") from exc
    want = model.settings
    if want.get("clip_model") and config.prefix_size != _clip_dim(want["clip_model"]):
        model.path.unlink(missing_ok=True)
        raise CheckpointError(f"model '{model.name}': downloaded file expects {config.prefix_size}-d CLIP features; removed")


def _clip_dim(name: str) -> int | None:
    from clipcap_cli.backbones import clip_embed_dim

    return clip_embed_dim(name)


def check_model_argument(name_or_path: str) -> None:
    """Fail early (usage error, with a suggestion) when ``--model`` is neither a file nor a known name."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file() or name_or_path in REGISTRY:
        return
    if candidate.suffix in {".pt", ".pth", ".bin", ".safetensors"} or "/" in name_or_path:
        raise UsageError(f"checkpoint not found: {candidate}")
    get(name_or_path)


def resolve_checkpoint(
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
        path = model.path if is_cached(model) else fetch(model, progress=progress)
        return path, dict(model.settings)
    if candidate.suffix in {".pt", ".pth", ".bin", ".safetensors"} or "/" in name_or_path:
        raise CheckpointError(f"checkpoint not found: {candidate}")
    get(name_or_path)  # raises the unknown-name error with a suggestion
    raise AssertionError("unreachable")
