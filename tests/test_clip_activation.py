"""Feature stores record the CLIP activation, and a store clipcap 0.1 made with the wrong one
(GELU for OpenAI's ViTs) is recognised and refused in one line, never mixed with new features."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipcap_cli.data.features import FeaturesError, load_features, save_features


def _store(folder: Path, clip_model: str, clip_pretrained: str | None) -> Path:
    records = [{"image": f"{i}.jpg", "captions": [f"caption {i}"]} for i in range(3)]
    meta = {"clip_model": clip_model, "clip_pretrained": clip_pretrained, "preprocess": "x"}
    return save_features(folder, torch.randn(3, 8), records, meta)


def _as_made_by_0_1(store: Path) -> None:
    """Remove what clipcap 0.1 did not write (the activation), leaving the store otherwise valid."""
    meta = json.loads((store / "meta.json").read_text())
    meta.pop("clip_activation")
    meta.get("run_settings", {}).pop("clip_activation", None)
    (store / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "clip, tag, activation",
    [
        ("ViT-B-32", "openai", "quick_gelu"),
        ("RN50x4", "openai", "quick_gelu"),
        ("ViT-B-32", "laion2b_s34b_b79k", "gelu"),
    ],
)
def test_new_stores_record_the_activation(tmp_path: Path, clip: str, tag: str, activation: str):
    store = _store(tmp_path / "s", clip, tag)
    assert load_features(store).meta["clip_activation"] == activation


def test_old_openai_vit_store_is_refused_with_the_fix(tmp_path: Path):
    store = _store(tmp_path / "s", "ViT-B-32", "openai")
    _as_made_by_0_1(store)
    with pytest.raises(
        FeaturesError,
        match=r"extracted by clipcap 0\.1, which ran ViT-B-32 \(openai\) with GELU "
        r"instead of its QuickGELU: re-extract it .*--overwrite",
    ):
        load_features(store)


@pytest.mark.parametrize("clip, tag", [("RN50x4", "openai"), ("ViT-B-32", "laion2b_s34b_b79k")])
def test_old_stores_whose_image_features_were_right_still_load(tmp_path: Path, clip: str, tag: str):
    """RN50x4's image tower has no GELU, and a GELU-trained tag was built right: nothing to redo."""
    store = _store(tmp_path / "s", clip, tag)
    _as_made_by_0_1(store)
    assert load_features(store).embeddings.shape == (3, 8)


@pytest.mark.slow
def test_rerunning_extract_on_an_old_store_of_an_unchanged_clip_is_a_no_op(tmp_path: Path, tiny_clip_dir: Path):
    """A local CLIP's activation did not change between versions: its 0.1 store stays usable and
    the same extract command still recognises it as done."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (40, 30), colour).save(photos / f"{i}.png")
    cmd = [
        sys.executable,
        "-m",
        "clipcap_cli",
        "extract",
        str(photos),
        "--out",
        str(tmp_path / "feats"),
        "--clip",
        f"local-dir:{tiny_clip_dir}",
        "--quiet",
    ]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    _as_made_by_0_1(tmp_path / "feats")
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert load_features(tmp_path / "feats").meta.get("clip_activation") is None  # left as it was: no redo
