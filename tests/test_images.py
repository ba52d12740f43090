from pathlib import Path

import pytest
from PIL import Image

from clipcap_cli.data.images import ImageError, open_rgb


def test_all_modes_become_rgb(images: dict[str, Path]):
    for name, path in images.items():
        img = open_rgb(path)
        assert img.mode == "RGB", name
    assert open_rgb(images["exif"]).size == (30, 60)  # EXIF orientation 6 applied (stored 60x30)
    g16 = open_rgb(images["gray16"])
    lo, hi = g16.convert("L").getextrema()
    assert hi > 200 and lo < 50  # scaled to 8 bits, not clipped to white
    assert open_rgb(images["rgb"].read_bytes()).size == (64, 48)


def test_unreadable_inputs_give_one_line_errors(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageError, match="not an image Pillow can read"):
        open_rgb(tmp_path / "notes.txt")
    good = tmp_path / "t.jpg"
    Image.new("RGB", (64, 64), "blue").save(good)
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageError, match="trunc.jpg"):
        open_rgb(tmp_path / "trunc.jpg")
    with pytest.raises(ImageError, match="No such file"):
        open_rgb(tmp_path / "missing.jpg")


PHOTOS = Path(__file__).parent / "data" / "photos"


def test_real_photos_decode_like_the_original(tiny_clip_dir: Path):
    """On ordinary RGB JPEGs (no EXIF rotation), our loader gives exactly the pixels the original's
    PIL path gave, so CLIP sees the same tensor."""
    import numpy as np
    import torch

    from clipcap_cli.weights import clip_tower

    _, preprocess = clip_tower.load_clip(f"local-dir:{tiny_clip_dir}", None)
    photos = sorted(PHOTOS.glob("*.jpg"))
    assert len(photos) == 4
    for photo in photos:
        ours = open_rgb(photo)
        plain = Image.open(photo).convert("RGB")
        assert np.array_equal(np.asarray(ours), np.asarray(plain)), photo.name
        assert torch.equal(preprocess(ours), preprocess(plain))
