"""Training is shown to learn: on coloured shapes, a tiny model trained with `train.train` captions
held-out images with the right colour and shape, and the same training on shuffled pairs does not.

The whole path is the real one: PNG files -> `features.extract` (tiny CLIP) -> features store ->
`train.train` (tokens cache, batches, loss, optimizer, checkpoint) -> `checkpoint.load` of the
last epoch file with no other flags -> `decoding.decode` (greedy).

Why these thresholds catch broken wiring (chance for "both right" is 1/9 = 11%):
- a prefix that does not reach GPT-2, or embedding rows paired with the wrong records/captions,
  makes the caption independent of the image: that is exactly the shuffled control, which lands
  near chance (6-17% over 5 seeds while developing), far below the 80% bar;
- a loss shifted by one position (predicting the current token instead of the next, or scoring
  prefix positions) does not teach next-token prediction, so greedy decoding cannot produce
  "a <colour> <shape>." sentences at all;
- a mask that drops real tokens (or keeps none) leaves colour/shape untrained.
The real wiring reached 94-100% on 5 seeds (0-4); the control must stay <= 40%, so a model that
ignores the image cannot pass by luck (it names one fixed class, 1/9 of the held-out set).
Padding that leaks into the loss is caught by the unit tests in test_train.py, not here.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from clipcap_cli import train
from clipcap_cli.data import features
from clipcap_cli.decoding import decode as decoding
from clipcap_cli.loading import load_network
from clipcap_cli.weights import backbones

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square", "triangle")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: two threads only fight each other on a 2-core machine
    yield
    torch.set_num_threads(n)


def draw(colour: str, shape: str, rng: np.random.Generator, size: int = 64):
    """A filled shape on white, with a little jitter in size and position."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.30, 0.36)
    cx, cy = size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def write_images(folder: Path, per_class: int, seed: int) -> list[dict]:
    """PNG files and records with two captions of different lengths each (so batches need padding)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for colour in COLOURS:
        for shape in SHAPES:
            for k in range(per_class):
                name = f"{colour}-{shape}-{k}.png"
                draw(colour, shape, rng).save(folder / name)
                captions = [f"a {colour} {shape}.", f"a {colour} {shape} on a white background."]
                records.append({"image": name, "image_id": len(records), "captions": captions})
    return records


def calibrated_clip(src: Path, dst: Path) -> Path:
    """The tiny random CLIP, with its output centred and scaled on separate calibration images.

    A random ViT's embeddings are dominated by one offset shared by every image (|mean| ~7 against
    a spread of ~0.7), which a trained CLIP does not have; training then needs far more steps to
    find the image in the prefix. Shifting ln_post's bias (the pooled token is ln_post(x) @ proj,
    so a bias shift d moves every embedding by d @ proj) and scaling proj fixes that, without
    changing which images the encoder can tell apart.
    """
    import open_clip
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "open_clip_config.json").write_text((src / "open_clip_config.json").read_text())
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{src}")
    model.eval()
    rng = np.random.default_rng(12345)
    pixels = torch.stack([preprocess(draw(c, s, rng)) for c in COLOURS for s in SHAPES for _ in range(3)])
    with torch.no_grad():
        emb = model.encode_image(pixels)  # (27, D)
        visual = model.visual
        visual.ln_post.bias -= emb.mean(0) @ torch.linalg.pinv(visual.proj)
        visual.proj *= emb.shape[1] ** 0.5 / (emb - emb.mean(0)).norm(dim=1).mean()  # ~unit variance per dim
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dst / "open_clip_model.safetensors"))
    return dst


def accuracy(captions: list[str], records: list[dict]) -> float:
    """Share of captions naming both the image's colour and its shape (and no other colour/shape)."""
    right = 0
    for caption, record in zip(captions, records):
        colour, shape = record["image"].split("-")[:2]
        named_colours = {c for c in COLOURS if re.search(rf"\b{c}\b", caption)}
        named_shapes = {s for s in SHAPES if re.search(rf"\b{s}\b", caption)}
        right += named_colours == {colour} and named_shapes == {shape}
    return right / len(captions)


def class_ids(records: list[dict]) -> torch.Tensor:
    names = [f"{c}-{s}" for c in COLOURS for s in SHAPES]
    return torch.tensor([names.index("-".join(r["image"].split("-")[:2])) for r in records])


@pytest.mark.slow
def test_training_learns_image_conditioned_captions(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    seed = 0
    clip_dir = calibrated_clip(tiny_clip_dir, tmp_path / "clip")
    options = features.ExtractOptions(clip_model=f"local-dir:{clip_dir}", clip_pretrained=None, workers=0, device="cpu")
    train_records = write_images(tmp_path / "train", per_class=8, seed=seed)  # 72 images, 144 captions
    test_records = write_images(tmp_path / "test", per_class=4, seed=seed + 1000)  # 36 unseen images
    features.extract(train_records, tmp_path / "train", tmp_path / "f-train", options)
    features.extract(test_records, tmp_path / "test", tmp_path / "f-test", options)
    train_fs, test_fs = features.load_features(tmp_path / "f-train"), features.load_features(tmp_path / "f-test")

    # First: the frozen encoder separates the 9 classes at all (else nothing could be learned).
    y_train, y_test = class_ids(train_fs.records), class_ids(test_fs.records)
    centroids = torch.stack([train_fs.embeddings[y_train == k].float().mean(0) for k in range(9)])
    nearest = torch.cdist(test_fs.embeddings.float(), centroids).argmin(1)
    assert (nearest == y_test).float().mean() >= 0.7  # chance: 1/9

    # Shuffled control: the same captions, given to the wrong images.
    perm = np.random.default_rng(seed).permutation(len(train_fs.records))
    shuffled = [dict(r, captions=train_fs.records[j]["captions"]) for r, j in zip(train_fs.records, perm)]
    features.save_features(tmp_path / "f-shuffled", train_fs.embeddings, shuffled, train_fs.meta)

    # Full fine-tuning of the tiny GPT-2 (it starts random, so it must learn the language too):
    # 15 epochs x 18 steps of 8 captions. K=8 gives the image more room than K=4. All 72 images train
    # (val_fraction 0: no automatic held-out split; the test set is separate).
    opts = train.TrainOptions.create(
        prefix_length=8,
        gpt2=str(tiny_gpt2_dir),
        epochs=15,
        batch_size=8,
        lr=1e-2,
        warmup=10,
        seed=seed,
        val_fraction=0.0,
    )
    tokenizer = backbones.load_tokenizer(str(tiny_gpt2_dir))

    def caption_test_images(store: Path, out: Path) -> list[str]:
        result = train.train(opts, store, out)
        model = load_network(result.checkpoints[-1])  # the epoch file alone is enough
        decoded = decoding.decode(model, tokenizer, test_fs.embeddings.float(), max_length=12)
        return [d.text for d in decoded]

    learned = caption_test_images(tmp_path / "f-train", tmp_path / "run")
    control = caption_test_images(tmp_path / "f-shuffled", tmp_path / "run-shuffled")
    assert all(c.startswith("a ") and c.endswith(".") for c in learned), learned[:5]
    assert accuracy(learned, test_fs.records) >= 0.8, learned
    assert accuracy(control, test_fs.records) <= 0.4, control


def _to_shard(path: Path, folder: Path, records: list[dict]) -> None:
    """webdataset layout: KEY.png and KEY.txt (one caption per line), in the records' order."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        for i, r in enumerate(records):
            key = f"{i:05d}"
            tar.add(folder / r["image"], arcname=f"{key}.png")
            text = "\n".join(r["captions"]).encode()
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))


@pytest.mark.slow
def test_clipcap_train_on_a_sidecar_folder_and_tar_shards_learns(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    """The one-command path: `clipcap train FOLDER SHARDS --out RUN`, then `clipcap caption --model RUN/...`
    with no other flag. Red images come as a sidecar folder, green ones in shard 0 and blue ones in shard 1,
    so a reader that pairs images with the wrong captions fails its own colour (chance per colour: 1/3)."""
    from typer.testing import CliRunner

    from clipcap_cli.cli.app import app

    clip_dir = calibrated_clip(tiny_clip_dir, tmp_path / "clip")
    records = write_images(tmp_path / "all", per_class=8, seed=0)
    sidecars = tmp_path / "photos"
    sidecars.mkdir()
    by_colour: dict[str, list[dict]] = {c: [r for r in records if r["image"].startswith(c)] for c in COLOURS}
    for r in by_colour["red"]:
        (tmp_path / "all" / r["image"]).rename(sidecars / r["image"])
        (sidecars / r["image"]).with_suffix(".txt").write_text("\n".join(r["captions"]) + "\n")
    _to_shard(tmp_path / "shard-0.tar", tmp_path / "all", by_colour["green"])
    _to_shard(tmp_path / "shard-1.tar", tmp_path / "all", by_colour["blue"])
    test_records = write_images(tmp_path / "test", per_class=4, seed=1000)

    runner = CliRunner()
    args = ["train", str(sidecars), str(tmp_path / "shard-{0..1}.tar"), "--out", str(tmp_path / "run")]
    args += ["--clip", f"local-dir:{clip_dir}", "--gpt2", str(tiny_gpt2_dir), "--features", str(tmp_path / "stores")]
    args += ["--prefix-length", "8", "--epochs", "15", "--batch-size", "8", "--lr", "1e-2", "--warmup", "10"]
    args += ["--val-fraction", "0", "--workers", "0"]
    trained = runner.invoke(app, args)
    assert trained.exit_code == 0, trained.output
    assert "72 captioned images, 144 captions" in trained.stderr
    checkpoint = Path(trained.stdout.strip().splitlines()[-1])

    captioned = runner.invoke(app, ["caption", "--model", str(checkpoint), str(tmp_path / "test"), "--format", "jsonl"])
    assert captioned.exit_code == 0, captioned.output
    rows = {Path(r["path"]).name: r["caption"] for r in map(json.loads, captioned.stdout.splitlines())}
    for colour in COLOURS:
        group = [r for r in test_records if r["image"].startswith(colour)]
        assert accuracy([rows[r["image"]] for r in group], group) >= 0.75, (colour, rows)
