"""Any open_clip image tower (issue 22): tiny random towers of each kind (a ViT at another image size, an
OpenAI ModifiedResNet, a SigLIP-style timm ViT with MAP pooling, 0.5 mean/std and squash resizing) as
``local-dir:`` folders; widths read from the tower, each tower's own preprocessing end to end (extract,
caption), the tower recorded by training, and stores/checkpoints of another tower refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipcap_cli.cli.app import app
from clipcap_cli.weights import backbones, clip_tower

runner = CliRunner()
OPENAI = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TOWERS = {
    # A ViT at another image size than the tiny default (48 px, patch 16), centre-cropped as OpenAI's.
    "vit": (
        {
            "embed_dim": 24,
            "vision_cfg": {"image_size": 48, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        },
        OPENAI,
    ),
    # OpenAI's ModifiedResNet (layers per stage, attention pooling), as RN50x4/x16/x64.
    "resnet": ({"embed_dim": 40, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8}}, OPENAI),
    # SigLIP's layout: a timm ViT (timm's tiny test_vit, 160 px) with MAP pooling and no projection,
    # 0.5 mean/std, squashed (not cropped) to the square.
    "siglip": (
        {
            "embed_dim": 64,
            "init_logit_bias": -10,
            "vision_cfg": {
                "image_size": 160,
                "timm_model_name": "test_vit",
                "timm_model_pretrained": False,
                "timm_pool": "map",
                "timm_proj": "none",
            },
        },
        {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"},
    ),
}


def write_tiny_tower(folder: Path, kind: str, seed: int = 0) -> Path:
    """A tiny random open_clip model of ``kind`` as a ``local-dir:`` folder (config + safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg, preprocess_cfg = TOWERS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": {**model_cfg, "text_cfg": TEXT}, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("towers")
    return {kind: f"local-dir:{write_tiny_tower(root / kind, kind)}" for kind in TOWERS}


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three captioned images of different shapes (a crop and a squash give different pixels)."""
    import numpy as np

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(90, 40), (40, 70), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo number {i}\n")
    return folder


def _reference(clip: str, images: list[Path]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """open_clip's own model and transform for ``clip`` (its weights from the folder): the embeddings of
    ``images`` and the shape its preprocessing gives."""
    import open_clip

    from clipcap_cli.data.images import open_rgb

    model, _, preprocess = open_clip.create_model_and_transforms(clip)
    pixels = torch.stack([preprocess(open_rgb(p)) for p in images])
    with torch.no_grad():
        return model.eval().encode_image(pixels), tuple(pixels.shape[1:])


# --------------------------------------------------------------------------- widths and preprocessing


@pytest.mark.parametrize("kind", list(TOWERS))
def test_width_and_preprocessing_come_from_the_tower(towers: dict[str, str], kind: str):
    model_cfg, preprocess_cfg = TOWERS[kind]
    size = model_cfg["vision_cfg"]["image_size"]
    assert clip_tower.clip_embed_dim(towers[kind]) == model_cfg["embed_dim"]
    assert clip_tower.clip_image_size(towers[kind]) == (size, size)
    encoder, preprocess = clip_tower.load_clip(towers[kind], None)
    pixels = preprocess(Image.new("RGB", (size * 2, size), "white")).unsqueeze(0)
    assert pixels.shape == (1, 3, size, size)
    assert pixels[0, :, 0, 0].tolist() == pytest.approx(
        [(1 - m) / s for m, s in zip(preprocess_cfg["mean"], preprocess_cfg["std"])]
    )
    with torch.no_grad():
        assert encoder.encode_image(pixels).shape == (1, model_cfg["embed_dim"])


@pytest.mark.parametrize(
    ("name", "tag", "width", "size", "mean", "crop"),
    [
        pytest.param("ViT-B-16", "openai", 512, 224, 0.48145466, True, marks=pytest.mark.slow),
        ("ViT-L-14-336", "openai", 768, 336, 0.48145466, True),
        pytest.param("RN50x16", "openai", 768, 384, 0.48145466, True, marks=pytest.mark.slow),
        ("ViT-B-16-SigLIP-384", "webli", 768, 384, 0.5, False),  # SigLIP: its own mean/std, squashed
    ],
)
def test_real_towers_have_their_own_width_size_and_preprocessing(name, tag, width, size, mean, crop):
    """The real configs, built on the meta device (no weights, no memory): width, image size, mean and
    the resize mode of the transform every pipeline gets."""
    spec = clip_tower.clip_spec(name, tag)
    assert clip_tower.clip_embed_dim(name) == spec.embed_dim == width
    assert clip_tower.default_clip_tag(name) == tag
    _, preprocess = clip_tower.build_clip(spec)
    steps = {type(t).__name__: t for t in preprocess.transforms}
    assert steps["Normalize"].mean[0] == pytest.approx(mean)
    assert ("CenterCrop" in steps) == crop
    pixels = preprocess(Image.new("RGB", (size * 2, size // 2)))
    assert tuple(pixels.shape) == (3, size, size)


def test_clip_without_a_tag_takes_the_towers_own_weights_in_extract_and_train():
    """`--clip NAME` alone: openai where NAME has it, else its only tag (SigLIP: webli), never random
    weights; several tags and no openai: one line listing them."""
    from clipcap_cli.cli.commands.extract import _default_tag
    from clipcap_cli.cli.commands.train import _clip_tag
    from clipcap_cli.errors import UsageError

    for choose in (_default_tag, lambda clip: _clip_tag(clip, None)):
        assert choose(None) == "openai"  # the default ViT-B-32
        assert choose("ViT-L-14") == "openai"
        assert choose("ViT-B-16-SigLIP") == "webli"
        with pytest.raises(
            UsageError, match=r"several pretrained weights: choose one with --clip-pretrained \(.*laion2b"
        ):
            choose("ViT-H-14")
    assert _clip_tag("ViT-L-14", "none") is None


def test_a_store_of_another_tower_or_other_weights_is_refused_naming_both(tmp_path: Path):
    from clipcap_cli.data.store_format import FORMAT, check_store_tower
    from clipcap_cli.errors import UsageError

    (tmp_path / "meta.json").write_text(
        json.dumps({"format": FORMAT, "format_version": 1, "clip_model": "ViT-L-14", "clip_pretrained": "openai"})
    )
    check_store_tower(tmp_path, "ViT-L-14", "openai")
    with pytest.raises(UsageError, match=r"made with CLIP ViT-L-14 \(openai\), not --clip ViT-B-16-SigLIP \(webli\)"):
        check_store_tower(tmp_path, "ViT-B-16-SigLIP", "webli")
    with pytest.raises(UsageError, match=r"made with CLIP ViT-L-14 \(openai\), not --clip ViT-L-14 \(laion2b"):
        check_store_tower(tmp_path, "ViT-L-14", "laion2b_s32b_b82k")


@pytest.mark.slow
def test_caption_clip_alone_takes_that_towers_weights(tmp_path: Path, tiny_gpt2_dir: Path):
    """`caption --clip OTHER` on a checkpoint trained on ViT-L-14 (openai) uses OTHER's own weights (SigLIP's
    webli), not the checkpoint's tag; the checkpoint's own tower keeps its tag."""
    from clipcap_cli.config import ModelConfig
    from clipcap_cli.loading import load_network
    from clipcap_cli.model import ClipCaptionModel
    from clipcap_cli.weights import checkpoint

    config = ModelConfig(prefix_length=1, prefix_size=768, clip_model="ViT-L-14", gpt2=str(tiny_gpt2_dir))
    ckpt = checkpoint.save(ClipCaptionModel(config, backbones.load_gpt2(config.gpt2)), tmp_path / "m.safetensors")
    assert load_network(str(ckpt), clip_model="ViT-B-16-SigLIP").config.clip_pretrained == "webli"
    assert load_network(str(ckpt), clip_model="ViT-L-14").config.clip_pretrained == "openai"
    assert load_network(str(ckpt), clip_model="RN50x16", clip_pretrained="openai").config.clip_model == "RN50x16"


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(TOWERS))
def test_extract_and_caption_use_the_towers_own_preprocessing(
    towers: dict[str, str], photos: Path, tmp_path: Path, tiny_gpt2_dir: Path, kind: str
):
    """extract: the store holds exactly open_clip's embeddings with the tower's own transform (size,
    mean/std, crop or squash); caption, with a checkpoint for that tower: the same embeddings."""
    from clipcap_cli.config import ModelConfig
    from clipcap_cli.data.features import load_features
    from clipcap_cli.loading import load_model
    from clipcap_cli.model import ClipCaptionModel
    from clipcap_cli.weights import checkpoint

    clip = towers[kind]
    res = runner.invoke(
        app, ["extract", str(photos), "--out", str(tmp_path / "feats"), "--clip", clip, "--workers", "0", "-q"]
    )
    assert res.exit_code == 0, res.output
    store = load_features(tmp_path / "feats")
    assert store.meta["clip_model"] == clip and store.meta["embed_dim"] == TOWERS[kind][0]["embed_dim"]
    images = [photos / r["image"] for r in store.records]
    want, shape = _reference(clip, images)
    size = TOWERS[kind][0]["vision_cfg"]["image_size"]
    assert shape == (3, size, size)
    assert (store.embeddings.float() - want).abs().max() < 1e-5

    config = ModelConfig(
        prefix_length=2,
        prefix_size=TOWERS[kind][0]["embed_dim"],
        clip_model=clip,
        clip_pretrained=None,
        gpt2=str(tiny_gpt2_dir),
    )
    torch.manual_seed(0)
    ckpt = checkpoint.save(ClipCaptionModel(config, backbones.load_gpt2(config.gpt2)), tmp_path / "m.safetensors")
    captioner = load_model(str(ckpt), device="cpu")  # caption's pipeline: the checkpoint's tower and transform
    assert (captioner.encode(images) - want).abs().max() < 1e-5


@pytest.mark.slow
def test_training_records_the_tower_and_other_towers_are_refused(
    towers: dict[str, str], photos: Path, tmp_path: Path, tiny_gpt2_dir: Path
):
    """`train DATA --clip TOWER` encodes with that tower, the checkpoint records it and `caption` needs no
    --clip; a store of one tower given with another --clip, and the checkpoint given another tower, are
    refused in one line naming both."""
    resnet, vit = towers["resnet"], towers["vit"]
    args = ["--gpt2", str(tiny_gpt2_dir), "--features", str(tmp_path / "stores"), "--epochs", "1", "--batch-size", "3",
            "--prefix-length", "2", "--warmup", "1", "--val-fraction", "0", "-q"]  # fmt: skip
    res = runner.invoke(app, ["train", str(photos), "--clip", resnet, "--out", str(tmp_path / "run"), *args])
    assert res.exit_code == 0, res.output
    ckpt = Path(res.stdout.strip().splitlines()[-1])
    from clipcap_cli.weights import checkpoint

    config = checkpoint.read(ckpt).config
    assert (config.clip_model, config.clip_pretrained, config.prefix_size) == (resnet, None, 40)
    [store] = list((tmp_path / "stores").iterdir())
    res = runner.invoke(app, ["caption", str(photos / "0.png"), "--model", str(ckpt), "--device", "cpu", "--format", "jsonl"])  # fmt: skip
    assert res.exit_code == 0, res.output
    [record] = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert record["error"] is None and isinstance(record["caption"], str)

    res = runner.invoke(app, ["train", str(store), "--clip", vit, "--out", str(tmp_path / "run2"), *args])
    assert res.exit_code == 2
    [line] = res.stderr.strip().splitlines()
    assert f"made with CLIP {resnet}, not --clip {vit}" in line
    assert not (tmp_path / "run2" / "config.json").exists()

    res = runner.invoke(app, ["caption", str(photos / "0.png"), "--model", str(ckpt), "--clip", vit, "--device", "cpu"])
    assert res.exit_code != 0
    [line] = res.stderr.strip().splitlines()
    assert f"expects 40-d CLIP features (trained on {resnet}); you gave {vit} (24-d): use --clip {resnet}" in line


# --------------------------------------------------------------------------- the real layouts, rehearsed


@pytest.mark.slow
@pytest.mark.system  # full-size towers, a minute of CPU: the system lane (pytest --system)
def test_rehearsal_vit_l14_and_siglip_from_the_planted_hub_cache(tmp_path: Path, tiny_gpt2_dir: Path):
    """The README's tower commands through the installed script, offline (no --offline flag: the network is
    blocked and a test fails if anything reaches for it), on open_clip's hub cache planted with OpenAI's
    ViT-L/14 and SigLIP ViT-B/16 (random weights): the default tags (openai, webli), QuickGELU for OpenAI's
    weights, each tower's width and transform; a checkpoint trained on ViT-L/14 captions with no --clip."""
    import open_clip
    from released import plant_other_towers
    from safetensors.torch import load_file
    from test_rehearsal import PHOTO, SITECUSTOMIZE

    from clipcap_cli.config import ModelConfig
    from clipcap_cli.data.features import load_features
    from clipcap_cli.data.images import open_rgb
    from clipcap_cli.model import ClipCaptionModel
    from clipcap_cli.weights import checkpoint

    home = tmp_path / "home"
    planted = plant_other_towers(home)
    exe = shutil.which("clipcap", path=str(Path(sys.executable).parent))
    assert exe, "the clipcap console script is not installed next to this Python"
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if k not in ("CLIPCAP_OFFLINE", "HF_HUB_OFFLINE", "CLIPCAP_DEBUG")}
    path = os.pathsep.join([str(tmp_path / "hooks"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(CLIPCAP_HOME=str(home), PYTHONPATH=path, CLIPCAP_TEST_NET_LOG=str(net_log))
    (tmp_path / "photos").mkdir()
    shutil.copyfile(PHOTO, tmp_path / "photos" / "photo.jpg")

    def clipcap(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([exe, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert not net_log.exists(), f"clipcap {' '.join(args)} reached for the network:\n{net_log.read_text()}"
        assert result.returncode == 0, f"clipcap {' '.join(args)}: exit {result.returncode}\n{result.stderr}"
        return result

    for name, tag, quick, size in (("ViT-L-14", "openai", True, 224), ("ViT-B-16-SigLIP", "webli", False, 224)):
        clipcap("extract", "photos", "--clip", name, "--out", f"feats-{name}", "-q")
        store = load_features(tmp_path / f"feats-{name}")
        assert (store.meta["clip_model"], store.meta["clip_pretrained"]) == (name, tag)
        assert store.meta["clip_activation"] == ("quick_gelu" if quick else "gelu")
        assert store.embeddings.shape == (1, 768)
        # The same embedding from open_clip itself: the tag's activation, the tower's own transform.
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick)
        tag_cfg = open_clip.get_pretrained_cfg(name, tag)  # the weights' mean, std and resize mode
        keys = ("mean", "std", "resize_mode", "interpolation")
        preprocess = open_clip.image_transform(size, is_train=False, **{k: tag_cfg[k] for k in keys})
        weights = {k.removeprefix("visual."): v.float() for k, v in load_file(str(planted[name])).items()}
        model.visual.load_state_dict(weights)
        pixels = preprocess(open_rgb(tmp_path / "photos" / "photo.jpg")).unsqueeze(0)
        assert pixels.shape[-1] == size
        with torch.no_grad():
            want = model.visual.eval()(pixels)[0]
        assert (store.embeddings[0].float() - want).abs().max() < 1e-4, name
        del model

    config = ModelConfig(prefix_length=2, prefix_size=768, clip_model="ViT-L-14", gpt2=str(tiny_gpt2_dir))
    ckpt = checkpoint.save(ClipCaptionModel(config, backbones.load_gpt2(config.gpt2)), tmp_path / "vitl.safetensors")
    [record] = [
        json.loads(line) for line in clipcap("caption", "photos/photo.jpg", "--model", str(ckpt)).stdout.splitlines()
    ]
    assert record["error"] is None and isinstance(record["caption"], str)
