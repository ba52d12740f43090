import time
from pathlib import Path

import pytest
import torch

from clipcap_cli import backbones, paths
from clipcap_cli.device import pick_device
from clipcap_cli.errors import ModelNotAvailableError, UsageError


def test_real_gpt2_tokenizer_from_local_folder(gpt2_tokenizer_dir: Path):
    tok = backbones.load_tokenizer(str(gpt2_tokenizer_dir))
    assert len(tok) == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(".") == [13]  # the original's stop token id


def test_missing_models_fail_fast_offline(tmp_path: Path):
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError, match="GPT-2 tokenizer 'gpt2' is not cached and offline mode is on"):
        backbones.load_tokenizer("gpt2")
    with pytest.raises(ModelNotAvailableError, match="GPT-2 weights 'gpt2'"):
        backbones.load_gpt2("gpt2")
    with pytest.raises(ModelNotAvailableError, match=r"CLIP ViT-B-32 \(openai\) weights is not cached"):
        backbones.load_clip("ViT-B-32", "openai")
    assert time.monotonic() - start < 10


def test_empty_tokenizer_folder_is_refused(tmp_path: Path):
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ModelNotAvailableError, match="empty vocabulary"):
        backbones.load_tokenizer(str(tmp_path))


def test_tiny_clip_from_local_dir(tiny_clip_dir: Path):
    model, preprocess = backbones.load_clip(f"local-dir:{tiny_clip_dir}", None)
    assert backbones.clip_embed_dim(f"local-dir:{tiny_clip_dir}") == 32
    from PIL import Image

    x = preprocess(Image.new("RGB", (50, 40), "red")).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert model.encode_image(x).shape == (1, 32)


def test_clip_names_are_checked():
    with pytest.raises(UsageError, match="did you mean ViT-B-32"):
        backbones.load_clip("ViT-B-23", "openai")
    assert backbones.clip_embed_dim("RN50x4") == 640
    assert backbones.clip_embed_dim("ViT-B-32") == 512


def test_home_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CLIPCAP_HOME", str(tmp_path / "h"))
    assert paths.home() == tmp_path / "h"
    assert paths.models_dir().is_dir() and paths.models_dir().parent == tmp_path / "h"
    monkeypatch.delenv("CLIPCAP_HOME")
    assert "clipcap" in str(paths.home())


def test_device_choice():
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device(None).type in {"cpu", "mps"}
        with pytest.raises(UsageError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(UsageError, match="unknown device"):
        pick_device("tpu9")
