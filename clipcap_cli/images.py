"""Opening images the way users have them: any mode Pillow reads, EXIF-rotated, 16-bit, CMYK."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from clipcap_cli.errors import ClipCapError

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
    from clipcap_cli import tars

    where = tars.parse_location(name)
    if where is None:
        return name
    try:
        return tars.read_member(*where)
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
