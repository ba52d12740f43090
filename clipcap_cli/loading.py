"""Loading a captioner: a registry name or a checkpoint file in, a ready ``Captioner`` out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcap_cli.captioner import Captioner
from clipcap_cli.errors import ModelNotAvailableError

if TYPE_CHECKING:
    import torch


def resolve(name_or_path: str, progress: Callable[[int, int | None], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """``--model NAME|PATH`` -> (checkpoint file, ModelConfig settings the registry implies)."""
    try:
        from clipcap_cli.pretrained import resolve_checkpoint
    except ModuleNotFoundError as exc:  # the registry is optional: plain files still work
        if exc.name != "clipcap_cli.pretrained":
            raise
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path, {}
        raise ModelNotAvailableError(f"no checkpoint file {name_or_path!r} (and no model registry)") from None
    return resolve_checkpoint(name_or_path, progress=progress) if progress else resolve_checkpoint(name_or_path)


def load_model(
    name_or_path: str = "coco",
    device: str | torch.device | None = None,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    gpt2: str | None = None,
    normalize_prefix: bool | None = None,
    *,
    download_progress: Callable[[int, int | None], None] | None = None,
) -> Captioner:
    """Load a registry model ("coco", "conceptual", "coco-transformer") or a checkpoint file.

    Args:
        name_or_path: registry name (downloaded on first use) or checkpoint path.
        device: "cpu", "cuda", "cuda:1", "mps"; None picks the best available.
        clip_model, clip_pretrained, gpt2, normalize_prefix: override what the checkpoint
            (or the registry entry) implies; None keeps it.
        download_progress: ``progress(done_bytes, total_bytes)`` while a registry model downloads.
    """
    from clipcap_cli import backbones, checkpoint
    from clipcap_cli.device import pick_device

    dev = pick_device(str(device) if device is not None else None)
    path, implied = resolve(name_or_path, download_progress)
    user = {"clip_model": clip_model, "clip_pretrained": clip_pretrained, "gpt2": gpt2, "normalize_prefix": normalize_prefix}
    overrides = {**implied, **{k: v for k, v in user.items() if v is not None}}
    model = checkpoint.load(path, dev, **overrides)
    config = model.config
    tokenizer = backbones.load_tokenizer(config.gpt2)
    clip, preprocess = backbones.load_clip(config.clip_model, config.clip_pretrained, dev)
    return Captioner(model, clip, preprocess, tokenizer, dev)
