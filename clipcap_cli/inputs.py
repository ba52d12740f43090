"""What `clipcap caption` reads: files, folders, globs, URLs and ``-`` (paths or URLs on stdin),
turned into an ordered list of sources, then decoded to CLIP pixels in (optionally parallel) batches.

A bad input never stops the run: it becomes a source with an error, reported in its record.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from clipcap_cli import paths
from clipcap_cli.errors import ClipCapError
from clipcap_cli.images import is_image_path, open_rgb

if TYPE_CHECKING:
    import torch

MAX_URL_BYTES = 50 * 1024 * 1024  # refuse bigger downloads: no photo needs more
URL_TIMEOUT = (10.0, 30.0)  # seconds: connect, read (between bytes)
URL_SCHEMES = ("http://", "https://")
GLOB_CHARS = set("*?[")
ACCEPTED_NON_IMAGE_TYPES = {"application/octet-stream", "binary/octet-stream"}


class InputError(ClipCapError):
    """One input that cannot be captioned (missing, unreadable, failed download)."""


@dataclass(frozen=True)
class Source:
    """One input as records show it (``name``), where to read it from, or why it already failed."""

    name: str  # the path as found, or the URL
    location: str | None = None  # file path or URL; None when ``error`` is set
    error: str | None = None


def is_url(text: str) -> bool:
    return text.lower().startswith(URL_SCHEMES)


def collect(args: Sequence[str], recursive: bool = False, stdin: TextIO | None = None) -> list[Source]:
    """Expand command-line inputs into sources, in order, each file once.

    ``-`` reads one path or URL per line from ``stdin``; folders give the images inside (all
    levels with ``recursive``); quoted globs are expanded here (``**`` included).
    """
    found: list[Source] = []
    for arg in args:
        if arg == "-":
            lines = (stdin.read() if stdin is not None else "").splitlines()
            found.extend(s for line in lines if line.strip() for s in _expand(line.strip(), recursive))
        else:
            found.extend(_expand(arg, recursive))
    seen: set[str] = set()
    unique = []
    for src in found:
        key = src.name if src.location is None or is_url(src.location) else os.path.abspath(src.location)
        if key not in seen:
            seen.add(key)
            unique.append(src)
    return unique


def _expand(arg: str, recursive: bool) -> list[Source]:
    if is_url(arg):
        return [Source(arg, arg)]
    path = Path(arg).expanduser()
    if path.is_dir():
        files = _images_in(path, recursive)
        if not files:
            hint = "" if recursive else " (use --recursive for subfolders)"
            return [Source(arg, error=f"no images in this folder{hint}")]
        return [Source(str(f), str(f)) for f in files]
    if path.exists():
        return [Source(arg, str(path))]
    if GLOB_CHARS & set(arg):
        matches = sorted(glob.glob(os.path.expanduser(arg), recursive=True))
        out = []
        for m in matches:
            if os.path.isdir(m):
                out.extend(Source(str(f), str(f)) for f in _images_in(Path(m), recursive))
            elif is_image_path(Path(m)):
                out.append(Source(m, m))
        return out or [Source(arg, error="no image files match this pattern")]
    return [Source(arg, error="no such file or directory")]


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p for p in candidates
        if p.is_file() and is_image_path(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def fetch_url(url: str, max_bytes: int = MAX_URL_BYTES, timeout: tuple[float, float] = URL_TIMEOUT) -> bytes:
    """The body of an http(s) image URL; ``InputError`` for offline mode, HTTP errors, a
    non-image Content-Type or more than ``max_bytes``."""
    if paths.offline_requested():
        raise InputError("offline mode is on: URLs are not fetched")
    import requests

    from clipcap_cli.version import __version__

    try:
        with requests.get(url, stream=True, timeout=timeout, headers={"User-Agent": f"clipcap/{__version__}"}) as r:
            if r.status_code >= 400:
                raise InputError(f"HTTP {r.status_code} {r.reason}".strip())
            ctype = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype and not ctype.startswith("image/") and ctype not in ACCEPTED_NON_IMAGE_TYPES:
                raise InputError(f"not an image (Content-Type {ctype})")
            declared = r.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise InputError(f"larger than {max_bytes // (1024 * 1024)} MB")
            body = bytearray()
            for chunk in r.iter_content(1 << 16):
                body += chunk
                if len(body) > max_bytes:
                    raise InputError(f"larger than {max_bytes // (1024 * 1024)} MB")
            return bytes(body)
    except requests.RequestException as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"download failed: {reason}") from exc


def _reason(exc: Exception, name: str) -> str:
    """An error message without the "<name>: " that image errors start with (records carry the name)."""
    msg = str(exc).strip() or type(exc).__name__
    for prefix in (f"{name}: ", "<bytes>: "):
        msg = msg.removeprefix(prefix)
    return msg.splitlines()[0]


Loaded = tuple[int, "torch.Tensor | None", "str | None"]  # (index into sources, pixels (3, H, W), error)


class ImageLoader:
    """A map-style dataset over sources: item i -> (i, CLIP pixels, None) or (i, None, error).

    Holds only the sources and CLIP's preprocess, so it is cheap to send to worker processes.
    """

    def __init__(self, sources: Sequence[Source], transform: Callable[[Any], torch.Tensor] | None):
        self.sources = list(sources)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> Loaded:
        src = self.sources[i]
        if src.error is not None or src.location is None or self.transform is None:
            return i, None, src.error or "not loaded"
        try:
            data: str | bytes = fetch_url(src.location) if is_url(src.location) else src.location
            return i, self.transform(open_rgb(data)), None
        except ClipCapError as exc:
            return i, None, _reason(exc, src.location)
        except Exception as exc:  # a preprocessing failure on a strange image must not end the batch
            return i, None, f"{type(exc).__name__}: {_reason(exc, src.location)}"


def _keep(batch: list[Loaded]) -> list[Loaded]:
    return batch  # pixels are stacked later, after the failed items are set aside


def load_batches(
    sources: Sequence[Source], transform: Callable[[Any], torch.Tensor] | None, batch_size: int, workers: int = 0
) -> Iterable[list[Loaded]]:
    """Batches of loaded items in input order; ``workers`` > 0 decodes images in worker processes."""
    if workers <= 0:
        return _serial(ImageLoader(sources, transform), batch_size)
    from torch.utils.data import DataLoader

    return DataLoader(
        ImageLoader(sources, transform), batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_keep
    )


def _serial(loader: ImageLoader, batch_size: int) -> Iterator[list[Loaded]]:
    for start in range(0, len(loader), batch_size):
        yield [loader[i] for i in range(start, min(start + batch_size, len(loader)))]
