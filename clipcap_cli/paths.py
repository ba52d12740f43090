"""Where clipcap keeps its files, and whether it may use the network.

Everything lives under one data directory: ``$CLIPCAP_HOME`` when set, otherwise the
platform's user data directory (``~/.local/share/clipcap`` on Linux).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from clipcap_cli.errors import ClipCapError

APP_NAME = "clipcap"
TRUE_VALUES = {"1", "true", "yes", "on"}


class DataDirError(ClipCapError):
    """The data directory (or a folder in it) cannot be created or written."""


def home() -> Path:
    """The root data directory (created on first use); ``DataDirError`` when it cannot be."""
    env = os.environ.get("CLIPCAP_HOME")
    if env:
        root = Path(env).expanduser()
    else:
        import platformdirs

        root = Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    return _folder(root)


def _folder(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = (
            "a file is in the way"
            if isinstance(exc, (FileExistsError, NotADirectoryError))
            else (exc.strerror or str(exc))
        )
        raise DataDirError(
            f"data directory {path} is not usable ({why}): set CLIPCAP_HOME to a folder you can write"
        ) from None
    return path


def models_dir() -> Path:
    """ClipCap checkpoints downloaded by name (``clipcap download``)."""
    return _sub("models")


def hf_cache_dir() -> Path:
    """Hugging Face files: GPT-2 configs, tokenizers and weights."""
    return _sub("huggingface")


def clip_cache_dir() -> Path:
    """open_clip backbone weights."""
    return _sub("open_clip")


def _sub(name: str) -> Path:
    return _folder(home() / name)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUE_VALUES


@dataclass
class NetworkPolicy:
    """Whether this process may use the network. The one place that state lives: ``--offline`` sets
    ``offline`` here (``set_offline``); the environment (``CLIPCAP_OFFLINE``, ``HF_HUB_OFFLINE``) is read
    as well, so library users and child processes get the same answer."""

    offline: bool = False

    def offline_requested(self) -> bool:
        return self.offline or env_flag("CLIPCAP_OFFLINE") or env_flag("HF_HUB_OFFLINE")


NETWORK = NetworkPolicy()


def set_offline(offline: bool = True) -> None:
    """Forbid (or allow again) downloads for the rest of this process; what ``--offline`` calls."""
    NETWORK.offline = offline


def offline_requested() -> bool:
    """True when the user asked for offline mode (``--offline``, ``set_offline``, or the environment)."""
    return NETWORK.offline_requested()


@lru_cache(maxsize=8)
def network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """A quick TCP probe, so a machine without network fails in seconds, not minutes of retries."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def can_download(host: str = "huggingface.co") -> bool:
    return not offline_requested() and network_reachable(host)
