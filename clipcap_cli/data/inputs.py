"""What `clipcap caption` reads: files, folders, globs, URLs and ``-`` (paths or URLs on stdin),
turned into an ordered list of sources; and the loader that decodes any captioning input to CLIP
pixels in DataLoader worker processes, in order, batch by batch (``load_batches``).

A bad input never stops the run: it becomes a source with an error, reported in its record.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from clipcap_cli import paths
from clipcap_cli.data.images import is_image_path, open_rgb
from clipcap_cli.errors import ClipCapError, check_number

if TYPE_CHECKING:
    import torch
    from PIL import Image

MAX_URL_BYTES = 50 * 1024 * 1024  # refuse bigger downloads: no photo needs more
URL_TIMEOUT = (10.0, 30.0)  # seconds: connect, read (between bytes)
URL_DEADLINE = 60.0  # seconds for a whole URL, however slowly its server sends (clipcap caption --url-timeout)
URL_SCHEMES = ("http://", "https://")
WORKERS: int | None = None  # image-decoding worker processes; None = default_workers(device)
CPU_WORKERS = 0  # default_workers off CUDA: the model already uses every core (measured: benchmarks/bench_sharded.py)
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
    url_deadline: float = URL_DEADLINE  # a URL: seconds its whole download may take

    def open_image(self) -> Image.Image:
        """The decoded image (fetched first for a URL); ``ClipCapError`` when it cannot be had."""
        if self.error is not None or self.location is None:
            raise InputError(self.error or "no location")
        if is_url(self.location):
            return open_rgb(fetch_url(self.location, deadline=self.url_deadline))
        return open_rgb(self.location)


def default_workers(device: Any) -> int:
    """The one rule for image-decoding worker processes when none are asked for (caption, extract,
    eval, inspect): on CUDA every CPU this process may use (shared among torchrun's processes on the
    machine); elsewhere ``CPU_WORKERS``, since the model's own threads already use every core."""
    if not str(device).startswith("cuda"):
        return CPU_WORKERS
    from clipcap_cli import distributed

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // distributed.env().local_world_size)


def check_loading(batch_size: int | None, workers: int | None) -> None:
    """The one check of an image pipeline's sizes (None: the default for the device)."""
    from clipcap_cli.errors import UsageError

    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise UsageError(f"workers must be 0 or more, got {workers}")


def worker_init(_: int) -> None:
    """A decoding worker: one torch thread (workers only decode and resize; the model owns the cores)."""
    import torch

    torch.set_num_threads(1)


def is_url(text: str) -> bool:
    return text.lower().startswith(URL_SCHEMES)


def collect(
    args: Sequence[str], recursive: bool = False, stdin: TextIO | None = None, url_deadline: float = URL_DEADLINE
) -> list[Source]:
    """Expand command-line inputs into sources, in order, each file once.

    ``-`` reads one path or URL per line from ``stdin``; folders give the images inside (all
    levels with ``recursive``); quoted globs are expanded here (``**`` included). A URL may take
    ``url_deadline`` seconds in all to download.
    """
    check_number("url deadline", url_deadline, low=0, low_open=True)
    found: list[Source] = []
    for arg in args:
        if arg == "-":
            lines = (stdin.read() if stdin is not None else "").splitlines()
            found.extend(s for line in lines if line.strip() for s in _expand(line.strip(), recursive, url_deadline))
        else:
            found.extend(_expand(arg, recursive, url_deadline))
    seen: set[str] = set()
    unique = []
    for src in found:
        key = src.name if src.location is None or is_url(src.location) else os.path.abspath(src.location)
        if key not in seen:
            seen.add(key)
            unique.append(src)
    return unique


def _expand(arg: str, recursive: bool, url_deadline: float = URL_DEADLINE) -> list[Source]:
    if is_url(arg):
        return [Source(arg, arg, url_deadline=url_deadline)]
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
        p
        for p in candidates
        if p.is_file() and is_image_path(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def fetch_url(
    url: str,
    max_bytes: int = MAX_URL_BYTES,
    timeout: tuple[float, float] = URL_TIMEOUT,
    deadline: float = URL_DEADLINE,
    public_only: bool = False,
) -> bytes:
    """The body of an http(s) image URL; ``InputError`` for offline mode, HTTP errors, a
    non-image Content-Type, more than ``max_bytes``, or a download that takes over ``deadline``
    seconds in all (a server that trickles bytes is cut off, not waited for). ``public_only``:
    refuse hosts (redirects included) that are not public addresses (``netguard``), as the
    server does for URLs its clients name."""
    if paths.offline_requested():
        raise InputError("offline mode is on: URLs are not fetched")
    import requests

    from clipcap_cli.data.netguard import BlockedAddressError, public_session
    from clipcap_cli.version import __version__
    from clipcap_cli.weights.download_http import read_available

    end = time.monotonic() + deadline
    # No single wait past the deadline: the read timeout bounds each gap between bytes.
    waits = (min(timeout[0], deadline), min(timeout[1], deadline))
    get = public_session().get if public_only else requests.get
    try:
        with get(url, stream=True, timeout=waits, headers={"User-Agent": f"clipcap/{__version__}"}) as r:
            _check_response(r, max_bytes)
            body = bytearray()
            while chunk := read_available(r.raw, 1 << 16):
                body += chunk
                if len(body) > max_bytes:
                    raise InputError(f"larger than {max_bytes // (1024 * 1024)} MB")
                if time.monotonic() > end:
                    raise InputError(
                        f"download took longer than {deadline:g} s ({len(body)} bytes so far): "
                        "the server is too slow (--url-timeout sets the limit)"
                    )
            return bytes(body)
    except BlockedAddressError as exc:
        raise InputError(str(exc)) from None
    except requests.RequestException as exc:
        if time.monotonic() > end:
            raise InputError(
                f"download took longer than {deadline:g} s: the server is too slow (--url-timeout sets the limit)"
            ) from exc
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"download failed: {reason}") from exc


def _check_response(r: Any, max_bytes: int) -> None:
    if r.status_code >= 400:
        raise InputError(f"HTTP {r.status_code} {r.reason}".strip())
    ctype = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype and not ctype.startswith("image/") and ctype not in ACCEPTED_NON_IMAGE_TYPES:
        raise InputError(f"not an image (Content-Type {ctype})")
    declared = r.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise InputError(f"larger than {max_bytes // (1024 * 1024)} MB")


def _reason(exc: Exception, name: str) -> str:
    """An error message without the "<name>: " that image errors start with (records carry the name)."""
    msg = str(exc).strip() or type(exc).__name__
    for prefix in (f"{name}: ", "<bytes>: "):
        msg = msg.removeprefix(prefix)
    return msg.splitlines()[0]


# --------------------------------------------------------------------------- the loader


class LoadedBatch(NamedTuple):
    """One batch of inputs after decoding: pixels for images, rows for inputs given as embeddings.

    Positions index ``indices`` (0 .. len(batch) - 1); every position is in exactly one of
    ``pixel_positions``, ``embedding_positions`` or ``errors``.
    """

    indices: list[int]  # stream positions of the batch's inputs, in order
    ids: list[int]  # the id each input draws its sampling seed from
    pixels: torch.Tensor | None  # (P, 3, H, W): the inputs that decoded to CLIP pixels
    pixel_positions: list[int]
    embeddings: torch.Tensor | None  # (E, D): inputs given as CLIP embeddings
    embedding_positions: list[int]
    errors: dict[int, str]  # position -> why that input failed (one line, without its name)
    info: dict[int, dict]  # position -> record fields the input carries (a shard's url, caption, ...)


def open_input(item: Any) -> Image.Image:
    """Any captioning input -> upright 8-bit RGB: a path, bytes, a PIL image, or an object with
    ``open_image()`` (a ``Source``, a shard sample). Raises ``ClipCapError`` when unreadable."""
    opener = getattr(item, "open_image", None)
    if opener is not None:
        return opener()
    from clipcap_cli.data.images import as_rgb

    return as_rgb(item)


def _load_one(item: Any, transform: Callable[[Any], torch.Tensor]) -> tuple[Any, Any, str | None, dict | None]:
    """(pixels, embedding, error, info) for one input; exactly one of the first three is set."""
    import torch

    if isinstance(item, torch.Tensor):
        return None, item, None, None
    info = None
    if callable(getattr(item, "info", None)):  # a shard sample (a PIL image's .info is a dict)
        try:
            info = item.info()
        except Exception:  # extra fields are a courtesy: never a reason to fail the image
            info = None
    stored = getattr(item, "embedding", None)
    if stored is not None:  # a stored CLIP embedding (--embeddings): no image to read
        if isinstance(stored, torch.Tensor):
            return None, stored.float(), None, info
        import numpy as np

        return None, torch.from_numpy(np.array(stored, dtype=np.float32)), None, info
    name = str(item) if isinstance(item, (str, Path)) else str(getattr(item, "location", None) or "")
    try:
        return transform(open_input(item)), None, None, info
    except ClipCapError as exc:
        return None, None, _reason(exc, name), info
    except Exception as exc:  # a preprocessing failure on a strange image must not end the batch
        return None, None, f"{type(exc).__name__}: {_reason(exc, name)}", info


class _Decoder:
    """A DataLoader "dataset" whose indices are the work itself: (stream index, seed id, input).

    The batch sampler hands each worker the inputs (paths, shard member offsets, bytes), so the
    inputs can be a lazy stream of any length; only CLIP's preprocess is sent to the workers.
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor]):
        self.transform = transform

    def __getitem__(self, entry: tuple[int, int, Any]) -> tuple[int, int, Any, Any, str | None, dict | None]:
        index, seed_id, item = entry
        return (index, seed_id, *_load_one(item, self.transform))


def _collate(loaded: list[tuple[int, int, Any, Any, str | None, dict | None]]) -> LoadedBatch:
    import torch

    pixels = [(p, x) for p, (_, _, x, _, _, _) in enumerate(loaded) if x is not None]
    given = [(p, e) for p, (_, _, _, e, _, _) in enumerate(loaded) if e is not None]
    return LoadedBatch(
        indices=[entry[0] for entry in loaded],
        ids=[entry[1] for entry in loaded],
        pixels=torch.stack([x for _, x in pixels]) if pixels else None,  # stacked in the worker: one transfer
        pixel_positions=[p for p, _ in pixels],
        embeddings=torch.stack([e for _, e in given]) if given else None,
        embedding_positions=[p for p, _ in given],
        errors={p: entry[4] for p, entry in enumerate(loaded) if entry[4] is not None},
        info={p: entry[5] for p, entry in enumerate(loaded) if entry[5]},
    )


class _Batches:
    """Lazily cut (index, id, input) entries into batches; a batch never mixes two groups."""

    def __init__(
        self, entries: Iterable[tuple[int, int, Any]], batch_size: int, group_of: Callable[[Any], Hashable] | None
    ):
        self.entries = entries
        self.batch_size = batch_size
        self.group_of = group_of

    def __iter__(self) -> Iterator[list[tuple[int, int, Any]]]:
        batch: list[tuple[int, int, Any]] = []
        group: Any = None
        for entry in self.entries:
            key = self.group_of(entry[2]) if self.group_of is not None else None
            if batch and (len(batch) == self.batch_size or key != group):
                yield batch
                batch = []
            group = key
            batch.append(entry)
        if batch:
            yield batch


def load_batches(
    items: Iterable[Any],
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    workers: int = 0,
    *,
    seed_id: Callable[[Any], int] | None = None,
    group_of: Callable[[Any], Hashable] | None = None,
    pin_memory: bool = False,
) -> Iterator[LoadedBatch]:
    """Decode ``items`` in batches, in input order, ``workers`` processes reading ahead (0: here).

    ``items`` may be lazy and unbounded: it is consumed as the workers need more work. Inputs are
    paths, bytes, PIL images, objects with ``open_image()``, or 1-D tensors (CLIP embeddings,
    passed through). ``seed_id(item)`` (default: the position) rides along for sampling seeds;
    ``group_of(item)`` keeps inputs of different groups (shards) out of the same batch, so a
    group is batched the same way whatever comes before it.
    """
    entries = ((i, seed_id(item) if seed_id is not None else i, item) for i, item in enumerate(items))
    batches = _Batches(entries, batch_size, group_of)
    if workers <= 0:
        decoder = _Decoder(transform)
        return (_collate([decoder[e] for e in batch]) for batch in batches)
    from torch.utils.data import DataLoader

    return iter(
        DataLoader(
            _Decoder(transform),  # type: ignore[arg-type]  (a "dataset" indexed by the work entries)
            batch_sampler=batches,  # type: ignore[arg-type]
            num_workers=workers,
            collate_fn=_collate,
            worker_init_fn=worker_init,
            pin_memory=pin_memory,
            prefetch_factor=4,  # batches read ahead per worker: the model never waits at a batch boundary
        )
    )
