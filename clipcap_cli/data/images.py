"""Opening images the way users have them: any mode Pillow reads, EXIF-rotated, 16-bit, CMYK."""

from __future__ import annotations

import functools
import io
import os
import tarfile
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from clipcap_cli.errors import ClipCapError

MEMBER_SEP = "::"  # SHARD.tar::MEMBER, an image inside a webdataset shard (see tars.py)
TAR_SUFFIXES = (".tar",)
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
MAX_PIXELS = 200_000_000  # refuse decompression bombs rather than exhaust memory


class ImageError(ClipCapError):
    """An input that is not a readable image; batch jobs record it and go on."""


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) to an upright 8-bit RGB image.

    Like the original's skimage -> PIL -> ``convert("RGB")``, alpha is dropped and palette and
    grayscale images are expanded; unlike it, EXIF orientation is applied and 16-bit images are
    scaled to 8 bits instead of clipped.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and "::" in name and not Path(source).exists():
        source = _tar_member(name)  # SHARD.tar::MEMBER, an image inside a webdataset shard
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as exc:
        raise ImageError(f"{name}: {exc.strerror or exc}") from exc
    with fp:
        try:
            with Image.open(fp) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"{name}: image too large ({img.width}x{img.height})")
                img.load()
                return to_rgb(img)
        except UnidentifiedImageError as exc:
            raise ImageError(f"{name}: not an image Pillow can read") from exc
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageError(f"{name}: unreadable image ({exc})") from exc


def _tar_member(name: str) -> str | bytes:
    where = parse_location(name)
    if where is None:
        return name
    try:
        return read_member(*where)
    except (OSError, ValueError) as exc:
        raise ImageError(f"{name}: {getattr(exc, 'strerror', None) or exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """An already-open image -> upright 8-bit RGB (EXIF orientation, 16-bit scaling, alpha dropped)."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: scale to 0..255 rather than letting convert() clip them.
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max()), 1e-6)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def as_rgb(image: Image.Image | str | Path | bytes) -> Image.Image:
    """Any accepted image input (an open image, a path, a file's bytes) -> upright 8-bit RGB."""
    return to_rgb(image) if isinstance(image, Image.Image) else open_rgb(image)


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_tar_name(name: str) -> bool:
    low = name.lower()
    return low.endswith(TAR_SUFFIXES) or low.endswith(COMPRESSED_SUFFIXES)


# --------------------------------------------------------------------------- images inside a tar shard


def location(shard: Path, member: str) -> str:
    return f"{shard}{MEMBER_SEP}{member}"


def parse_location(value: str) -> tuple[str, str] | None:
    """(shard, member) when ``value`` names an image inside an existing tar, else None."""
    shard, sep, member = value.partition(MEMBER_SEP)
    if not sep or not member or not is_tar_name(shard) or not os.path.isfile(shard):
        return None
    return shard, member


def read_member(shard: str, member: str) -> bytes:
    """The bytes of ``member``, read at its offset (the shard's index is built once per process)."""
    st = os.stat(shard)
    where = _index(shard, st.st_size, st.st_mtime_ns).get(member)
    if where is None:
        raise FileNotFoundError(f"{member} is not in {shard}")
    offset, size = where
    with open(shard, "rb") as f:
        f.seek(offset)
        return f.read(size)


@functools.lru_cache(maxsize=64)
def _index(shard: str, size: int, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """member -> (data offset, size); keyed by the shard's size and mtime, so a rewritten shard is re-read."""
    with tarfile.open(shard, "r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


# --------------------------------------------------------------------------- finding image files


class ImageResolver:
    """Finds an image among candidate relative paths under ``root``, remembering which subfolder hit."""

    def __init__(self, root: Path):
        self.root = root
        self._last_subdir: str | None = None

    def relative(self, path: str | Path) -> str:
        """``path`` relative to the root when it lies below it, else as given (posix separators)."""
        p = Path(path)
        if p.is_absolute():
            try:
                return p.relative_to(self.root).as_posix()
            except ValueError:
                return p.as_posix()
        return p.as_posix()

    def find(self, name: str, subdirs: tuple[str, ...] = ()) -> str:
        """The first of ``name``, ``<subdir>/name`` that exists; ``name`` itself when none does."""
        candidates = [name]
        ordered = ([self._last_subdir] if self._last_subdir in subdirs else []) + [
            s for s in subdirs if s != self._last_subdir
        ]
        candidates += [f"{s}/{name}" for s in ordered]
        for cand in candidates:
            if (self.root / cand).is_file():
                head = cand.split("/", 1)[0]
                if head in subdirs and cand != name:
                    self._last_subdir = head
                return self.relative(cand)
        return self.relative(name)

    def existing(self, candidates: list[str]) -> str | None:
        """The first candidate that is a file under the root (relative), or None."""
        for cand in candidates:
            if (self.root / Path(cand).expanduser()).is_file():
                return self.relative(cand)
        return None

    def first_existing(self, candidates: list[str]) -> str:
        found = self.existing(candidates)
        return found if found is not None else self.relative(candidates[0])
