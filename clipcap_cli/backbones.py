"""Loading the two pretrained parts ClipCap stands on: a CLIP image encoder (open_clip) and
GPT-2 (transformers), with every cache under clipcap's data directory.

A missing model never means minutes of hub retries or a silently empty tokenizer: the cache is
tried first with the network off, and a miss on a machine that cannot download fails at once
with one line that says what to fetch.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from clipcap_cli import paths
from clipcap_cli.config import CLIP_EMBED_DIMS
from clipcap_cli.errors import ModelNotAvailableError, UsageError

if TYPE_CHECKING:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

LOCAL_DIR = "local-dir:"
# huggingface_hub and transformers read these at import time; setting them before the first import
# keeps telemetry and implicit update checks off in a CLI that must work offline.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Make huggingface_hub answer from its cache only, for the duration of the block."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _cached_or_download(load: Callable[[bool], Any], what: str, hint: str) -> Any:
    """Call ``load(local_only)`` from the cache first, then (if allowed) with the network."""
    try:
        with hub_offline():
            return load(True)
    except (OSError, RuntimeError, ValueError) as cache_miss:
        miss = cache_miss
    if not paths.can_download():
        why = "offline mode is on" if paths.offline_requested() else "the network is unreachable"
        raise ModelNotAvailableError(f"{what} is not cached and {why}: {hint}") from miss
    return load(False)


# --------------------------------------------------------------------------- GPT-2

def is_local(name: str) -> bool:
    return Path(name).expanduser().is_dir()


def _quiet_transformers() -> None:
    """transformers' own progress bars and advisory logs would mix into our stderr output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The GPT-2 tokenizer from a hub name (cached under CLIPCAP_HOME) or a local folder."""
    from transformers import GPT2TokenizerFast

    _quiet_transformers()
    hint = "run `clipcap download` with the network on, or pass --gpt2 DIR with vocab.json and merges.txt"
    if is_local(name):
        tok = GPT2TokenizerFast.from_pretrained(str(Path(name).expanduser()))
    else:

        def load(local: bool) -> PreTrainedTokenizerBase:
            found = GPT2TokenizerFast.from_pretrained(name, cache_dir=paths.hf_cache_dir(), local_files_only=local)
            if len(found) <= 1:  # transformers 5: missing files give an empty tokenizer, not an error
                raise OSError(f"tokenizer '{name}' not found")
            return found

        tok = _cached_or_download(load, f"GPT-2 tokenizer '{name}'", hint)
    if len(tok) <= 1:
        raise ModelNotAvailableError(f"GPT-2 tokenizer '{name}' has an empty vocabulary (files missing): {hint}")
    return tok


def load_gpt2_config(name: str) -> GPT2Config:
    from transformers import GPT2Config

    if is_local(name):
        return GPT2Config.from_pretrained(str(Path(name).expanduser()))
    return _cached_or_download(
        lambda local: GPT2Config.from_pretrained(name, cache_dir=paths.hf_cache_dir(), local_files_only=local),
        f"GPT-2 config '{name}'",
        "run `clipcap download` with the network on, or pass --gpt2 DIR",
    )


def build_gpt2(config: GPT2Config) -> GPT2LMHeadModel:
    """GPT-2 with random weights (the caller loads a checkpoint into it)."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(config)


def load_gpt2(name: str) -> GPT2LMHeadModel:
    """GPT-2 with its pretrained weights (needed for frozen-LM checkpoints and for training)."""
    from transformers import GPT2LMHeadModel

    _quiet_transformers()
    if is_local(name):
        return GPT2LMHeadModel.from_pretrained(str(Path(name).expanduser()))
    return _cached_or_download(
        lambda local: GPT2LMHeadModel.from_pretrained(name, cache_dir=paths.hf_cache_dir(), local_files_only=local),
        f"GPT-2 weights '{name}'",
        "run `clipcap download` with the network on, or pass --gpt2 DIR",
    )


# --------------------------------------------------------------------------- CLIP

def clip_embed_dim(model_name: str) -> int | None:
    """The image-embedding width of an open_clip model, from its config (no weights needed)."""
    if model_name.startswith(LOCAL_DIR):
        import json

        cfg_file = Path(model_name[len(LOCAL_DIR) :]).expanduser() / "open_clip_config.json"
        try:
            return int(json.loads(cfg_file.read_text())["model_cfg"]["embed_dim"])
        except (OSError, KeyError, ValueError):
            return None
    if model_name in CLIP_EMBED_DIMS:
        return CLIP_EMBED_DIMS[model_name]
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    return int(cfg["embed_dim"]) if cfg else None


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """open_clip logs advisories ("No pretrained weights loaded", ...) on the root logger, which
    would land on the user's stderr as bare ``WARNING:root:`` lines."""
    import logging

    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(saved)


def load_clip(model_name: str, pretrained: str | None, device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """(model, preprocess) from open_clip, in eval mode on ``device``; fp16 on CUDA, as the original."""
    with _quiet_root_logger():
        return _load_clip(model_name, pretrained, device)


def _load_clip(model_name: str, pretrained: str | None, device: torch.device | str) -> tuple[Any, Any]:
    import open_clip

    if model_name.startswith(LOCAL_DIR):
        folder = Path(model_name[len(LOCAL_DIR) :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise UsageError(f"CLIP folder {folder} has no open_clip_config.json")
        model, _, preprocess = open_clip.create_model_and_transforms(f"{LOCAL_DIR}{folder}", device=device)
    else:
        if model_name not in open_clip.list_models():
            import difflib

            close = difflib.get_close_matches(model_name, open_clip.list_models(), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"unknown CLIP model {model_name!r}{hint}")
        if pretrained and not open_clip.get_pretrained_cfg(model_name, pretrained):
            raise UsageError(f"CLIP {model_name} has no pretrained weights tagged {pretrained!r}")
        cache = str(paths.clip_cache_dir())
        model, _, preprocess = _cached_or_download(
            lambda local: open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, cache_dir=cache, device=device
            ),
            f"CLIP {model_name} ({pretrained}) weights",
            f"run `clipcap download` with the network on to fill {cache}",
        )
    model.eval()
    return model.to(clip_dtype(device)), preprocess


def clip_dtype(device: torch.device | str) -> torch.dtype:
    """CLIP runs in fp16 on CUDA, as the original's ``clip.load`` did, and in fp32 elsewhere."""
    import torch

    return torch.float16 if str(device).startswith("cuda") else torch.float32
