"""Text-only training (CapDec): text stores (`extract --text`), noise injection, and a tiny model
trained on CLIP *text* embeddings that captions *images*.

The learning test builds a tiny open_clip model whose towers share a space by training it
contrastively (a few seconds) on coloured shapes and colour captions, saves it as a ``local-dir:``
CLIP, and then runs the real path: `text_features.extract_text` (text tower) -> text store ->
`train.train` (auto: normalised prefix + noise variance 0.016) -> the epoch checkpoint alone ->
`features.extract` of held-out PNGs (image tower) -> greedy decoding. Chance of naming the right
colour is 1/4; the control (the same captions given to the wrong text embeddings) must stay near it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OPENAI_MEAN, OPENAI_STD
from safetensors import safe_open
from test_learns import draw
from test_train import Recorder, make_store, tiny_opts
from typer.testing import CliRunner

from clipcap_cli import train
from clipcap_cli.cli.app import app
from clipcap_cli.data import features, text_features
from clipcap_cli.decoding import decode as decoding
from clipcap_cli.errors import UsageError
from clipcap_cli.loading import load_network
from clipcap_cli.train import noise
from clipcap_cli.train.options import model_config
from clipcap_cli.weights import backbones

runner = CliRunner()

COLOURS = ("red", "green", "blue", "yellow")
RGB = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("a {} image.", "a {} shape.", "something {} on white.")
SHARED_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: two threads only fight each other on a 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _colours(monkeypatch):
    """test_learns.draw looks its fill colour up in test_learns.COLOURS: add yellow."""
    import test_learns

    monkeypatch.setattr(test_learns, "COLOURS", {**test_learns.COLOURS, **RGB})


# --------------------------------------------------------------------------- noise


def test_noise_has_mean_zero_and_std_sqrt_variance_before_renormalisation():
    x = torch.nn.functional.normalize(torch.randn(2048, 256), dim=-1)
    variance = 0.016
    noisy = noise.add_noise(x, variance, torch.Generator().manual_seed(0))
    delta = noisy - x
    assert abs(float(delta.mean())) < 1e-3
    assert float(delta.std()) == pytest.approx(math.sqrt(variance), rel=0.01)
    # per coordinate too: every dimension gets the same spread
    per_dim = delta.std(dim=0)
    assert float(per_dim.min()) > 0.9 * math.sqrt(variance) and float(per_dim.max()) < 1.1 * math.sqrt(variance)


def test_inject_noise_normalises_before_and_after():
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(64, 32) * 7 + 2  # raw CLIP output: any scale
    out = noise.inject_noise(raw, 0.016, torch.Generator().manual_seed(3))
    expected = torch.nn.functional.normalize(
        noise.add_noise(torch.nn.functional.normalize(raw, dim=-1), 0.016, g), dim=-1
    )
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(64), atol=1e-5)
    # the input's scale does not matter (it is normalised first)
    assert torch.allclose(noise.inject_noise(raw * 40, 0.016, torch.Generator().manual_seed(3)), out, atol=1e-5)
    # variance 0: CapDec leaves the prefix as it is
    assert noise.inject_noise(raw, 0.0) is raw
    # the noise is real: the direction moves, by about sqrt(V * D) / sqrt(1 + V * D) on average
    moved = (out - torch.nn.functional.normalize(raw, dim=-1)).norm(dim=-1).mean()
    assert 0.3 < float(moved) < 1.0


def test_noise_variance_default_is_auto_and_resolved_from_the_store():
    assert train.TrainOptions().noise_variance is None
    meta_text = {"embed_dim": 32, "clip_model": "ViT-B-32", "modality": "text"}
    meta_image = {"embed_dim": 32, "clip_model": "ViT-B-32"}
    text_cfg, image_cfg = model_config(train.TrainOptions(), meta_text), model_config(train.TrainOptions(), meta_image)
    assert text_cfg.from_text and text_cfg.normalize_prefix  # forced: captioning normalises image embeddings
    assert not image_cfg.from_text and not image_cfg.normalize_prefix  # image stores: unchanged
    assert noise.resolve(train.TrainOptions(), text_cfg).noise_variance == 0.016
    assert noise.resolve(train.TrainOptions(), image_cfg).noise_variance == 0.0
    explicit = train.TrainOptions(noise_variance=0.004)
    assert noise.resolve(explicit, text_cfg).noise_variance == 0.004
    # noise on image features also needs the normalised prefix at inference
    assert model_config(explicit, meta_image).normalize_prefix
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(UsageError, match="noise-variance"):
            train.TrainOptions(noise_variance=bad)


# --------------------------------------------------------------------------- runs


def _text_store(folder: Path, clip_dir: Path) -> Path:
    """A store marked as text (random embeddings: these tests check the wiring, not the learning)."""
    path = make_store(folder, clip_dir, n_images=16, per_image=1)
    fs = features.load_features(path)
    return features.save_features(path, fs.embeddings, fs.records, {**fs.meta, "modality": "text"})


@pytest.fixture(scope="module")
def text_store(tmp_path_factory, tiny_clip_dir) -> Path:
    return _text_store(tmp_path_factory.mktemp("text"), tiny_clip_dir)


def test_text_run_records_noise_and_normalisation_in_the_checkpoint(tmp_path, text_store, tiny_gpt2_dir):
    from clipcap_cli.weights import checkpoint

    result = train.train(tiny_opts(tiny_gpt2_dir, epochs=1), text_store, tmp_path / "run")
    raw = checkpoint.read(result.checkpoints[-1])
    assert raw.config.from_text and raw.config.normalize_prefix
    assert json.loads(raw.metadata["from_text"]) is True
    assert json.loads(raw.metadata["noise_variance"]) == 0.016
    assert json.loads(raw.metadata["train_options"])["noise_variance"] == 0.016  # resolved, not "auto"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train_options"]["noise_variance"] == 0.016 and config["model_config"]["from_text"]
    assert load_network(result.checkpoints[-1]).config.normalize_prefix  # captioning normalises images


def test_image_run_is_unchanged_by_default(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    from clipcap_cli.weights import checkpoint

    store = make_store(tmp_path / "f", tiny_clip_dir, n_images=8, per_image=1)
    result = train.train(tiny_opts(tiny_gpt2_dir, epochs=1), store, tmp_path / "run")
    raw = checkpoint.read(result.checkpoints[-1])
    assert not raw.config.from_text and not raw.config.normalize_prefix
    assert json.loads(raw.metadata["noise_variance"]) == 0.0 and json.loads(raw.metadata["from_text"]) is False


def test_noise_is_drawn_and_reproduced_on_resume(tmp_path, text_store, tiny_gpt2_dir):
    opts = tiny_opts(tiny_gpt2_dir, epochs=2, checkpoint_every=2)
    reference = Recorder()
    train.train(opts, text_store, tmp_path / "full", callback=reference)
    quiet = Recorder()
    train.train(opts.replace(noise_variance=0.0), text_store, tmp_path / "clean", callback=quiet)
    assert reference.losses[2] != quiet.losses[2]  # the noise reaches the model (same seed otherwise)

    def crash_at_step_3(info):
        if info.step == 3:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train.train(opts, text_store, tmp_path / "run", callback=Recorder(crash_at_step_3))
    again = Recorder()
    train.train(opts, text_store, tmp_path / "run", resume=True, callback=again)  # from step 2
    assert list(again.losses) == list(range(3, 9))
    for step, loss in again.losses.items():
        assert loss == pytest.approx(reference.losses[step], abs=1e-6), step


def test_resume_refuses_another_noise_variance(tmp_path, text_store, tiny_gpt2_dir):
    opts = tiny_opts(tiny_gpt2_dir, epochs=1)
    train.train(opts, text_store, tmp_path / "run")
    with pytest.raises(UsageError, match="noise_variance"):
        train.train(opts.replace(noise_variance=0.001), text_store, tmp_path / "run", resume=True)


# --------------------------------------------------------------------------- extract --text


def _extract_text(args: list) -> object:
    return runner.invoke(app, ["extract", *[str(a) for a in args]])


def test_extract_text_from_a_txt_file_skips_empty_lines(tmp_path, tiny_clip_dir):
    src = tmp_path / "captions.txt"
    src.write_text("a red image.\n\n  a blue shape.  \nsomething green on white.\n   \n", encoding="utf-8")
    out = tmp_path / "store"
    res = _extract_text([src, "--text", "--out", out, "--clip", f"local-dir:{tiny_clip_dir}", "-q", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (summary["captions"], summary["empty_skipped"], summary["modality"]) == (3, 2, "text")
    fs = features.load_features(out)
    assert fs.meta["modality"] == "text" and fs.meta["normalized"] is False
    assert [r["captions"] for r in fs.records] == [["a red image."], ["a blue shape."], ["something green on white."]]
    assert all(r["image"] == "" for r in fs.records) and fs.embeddings.shape == (3, 32)
    assert "skipped 2 empty caption(s)" in res.stderr
    # the rows are the text tower's own output, in order
    model, tokenizer = text_features.load_text_clip(f"local-dir:{tiny_clip_dir}", None, "cpu")
    with torch.no_grad():
        direct = model.encode_text(tokenizer(["a blue shape."]))
    assert torch.allclose(fs.embeddings[1].float(), direct[0], atol=1e-5)
    # the same command again: nothing to do
    again = _extract_text([src, "--text", "--out", out, "--clip", f"local-dir:{tiny_clip_dir}", "-q", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["noop"]


def test_extract_text_from_a_csv_whose_images_do_not_exist(tmp_path, tiny_clip_dir):
    src = tmp_path / "data.csv"
    src.write_text("image,caption\nmissing/1.jpg,a red image.\nmissing/1.jpg,a red shape.\nmissing/2.jpg,\n")
    out = tmp_path / "store"
    res = _extract_text([src, "--text", "--out", out, "--clip", f"local-dir:{tiny_clip_dir}", "-q"])
    assert res.exit_code == 0, res.output
    assert "wrote text features for 2 captions" in res.stdout
    fs = features.load_features(out)
    assert [(r["image"], r["captions"]) for r in fs.records] == [
        ("missing/1.jpg", ["a red image."]),
        ("missing/1.jpg", ["a red shape."]),
    ]
    # the CSV reader already leaves out empty captions (missing/2.jpg has none, so no record)
    assert fs.meta["modality"] == "text" and fs.meta["counts"] == {"records": 2, "captions": 2, "empty_skipped": 0}


def test_extract_text_refuses_what_does_not_apply(tmp_path, tiny_clip_dir):
    src = tmp_path / "c.txt"
    src.write_text("\n\n")
    res = _extract_text([src, "--text", "--out", tmp_path / "s", "--clip", f"local-dir:{tiny_clip_dir}", "-q"])
    assert res.exit_code != 0 and "no captions" in res.output
    res = _extract_text(["--merge", tmp_path / "s", "--text"])
    assert res.exit_code != 0 and "--text" in res.output
    src.write_text("a red image.\n")
    res = _extract_text([src, "--text", "--out", tmp_path / "s", "--shard", "0/2"])
    assert res.exit_code != 0 and "--shard" in res.output


# --------------------------------------------------------------------------- it learns


def shared_space_clip(folder: Path, steps: int = 100, seed: int = 0) -> Path:
    """A tiny open_clip model trained contrastively on coloured shapes vs colour captions, saved
    as a local-dir: CLIP: its image and text towers then embed a colour near each other."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": SHARED_CLIP_CFG, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    rng = np.random.default_rng(seed)
    pixels = {c: torch.stack([preprocess(draw(c, SHAPES[k % 3], rng)) for k in range(12)]) for c in COLOURS}
    texts = {c: tokenizer([t.format(c) for t in TEMPLATES]) for c in COLOURS}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    target = torch.arange(len(COLOURS))
    for _ in range(steps):  # each step: one image and one caption per colour, CLIP's symmetric loss
        img = torch.stack([pixels[c][int(rng.integers(12))] for c in COLOURS])
        txt = torch.stack([texts[c][int(rng.integers(len(TEMPLATES)))] for c in COLOURS])
        fi = torch.nn.functional.normalize(model.encode_image(img), dim=-1)
        ft = torch.nn.functional.normalize(model.encode_text(txt), dim=-1)
        logits = model.logit_scale.exp() * fi @ ft.T
        loss = (
            torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
        ) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def colour_accuracy(captions: list[str], colours: list[str]) -> float:
    """Share of captions naming the image's colour and no other."""
    named = [{c for c in COLOURS if re.search(rf"\b{c}\b", caption)} for caption in captions]
    return sum(n == {c} for n, c in zip(named, colours)) / len(captions)


@pytest.mark.slow
def test_a_mapper_trained_on_text_captions_images(tmp_path, tiny_gpt2_dir):
    clip_dir = shared_space_clip(tmp_path / "clip")
    clip = f"local-dir:{clip_dir}"

    # Training data: captions only, no image anywhere (4 colours x 3 templates x 8 copies).
    records = [{"image": "", "image_id": None, "captions": [t.format(c)]} for c in COLOURS for t in TEMPLATES] * 8
    text_features.extract_text(records, tmp_path / "f-text", text_features.TextExtractOptions(clip, None, device="cpu"))
    text_fs = features.load_features(tmp_path / "f-text")
    assert text_fs.meta["modality"] == "text" and len(text_fs) == 96
    # Control: the same captions, paired with the wrong text embeddings.
    perm = np.random.default_rng(0).permutation(len(text_fs.records))
    shuffled = [dict(r, captions=text_fs.records[j]["captions"]) for r, j in zip(text_fs.records, perm)]
    features.save_features(tmp_path / "f-shuffled", text_fs.embeddings, shuffled, text_fs.meta)

    # Held-out images: shapes of each colour, never seen by the captioner's training.
    rng = np.random.default_rng(1000)
    (tmp_path / "test").mkdir()
    test_records = []
    for c in COLOURS:
        for k in range(6):
            draw(c, SHAPES[k % 3], rng).save(tmp_path / "test" / f"{c}-{k}.png")
            test_records.append({"image": f"{c}-{k}.png", "image_id": None, "captions": []})
    options = features.ExtractOptions(clip_model=clip, clip_pretrained=None, workers=0, device="cpu")
    features.extract(test_records, tmp_path / "test", tmp_path / "f-images", options)
    images = features.load_features(tmp_path / "f-images")
    truth = [r["image"].split("-")[0] for r in images.records]

    opts = train.TrainOptions.create(
        prefix_length=8, gpt2=str(tiny_gpt2_dir), epochs=12, batch_size=8, lr=1e-2, warmup=10, seed=0
    )  # noise_variance: auto (0.016 on a text store)
    tokenizer = backbones.load_tokenizer(str(tiny_gpt2_dir))

    def caption_images(store: Path, out: Path) -> list[str]:
        result = train.train(opts, store, out)
        model = load_network(result.checkpoints[-1])  # the epoch file alone: it normalises the image embeddings
        assert model.config.normalize_prefix and model.config.from_text
        decoded = decoding.decode(model, tokenizer, images.embeddings.float(), max_length=8)
        return [d.text for d in decoded]

    learned = caption_images(tmp_path / "f-text", tmp_path / "run")
    control = caption_images(tmp_path / "f-shuffled", tmp_path / "run-shuffled")
    with safe_open(str(tmp_path / "run" / "epoch-012.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["noise_variance"]) == 0.016
    # Chance: 1/4 (a model that ignores the image names one colour for every image). While developing
    # (seeds 0-4 for CLIP, data and training): 0.875, 0.75, 1.0, 0.75, 1.0 with the automatic noise
    # (0.016); the control named one colour for everything (0.25 each time); noise 0 gave 1.0, 0.625,
    # 1.0, 0.71, 1.0 (in 32 dimensions, variance 0.016 is already a large noise: sqrt(0.016 * 32) = 0.72).
    assert colour_accuracy(learned, truth) >= 0.6, learned
    assert colour_accuracy(control, truth) <= 0.5, control


def test_runs_saved_before_noise_existed_resume_as_noiseless():
    from clipcap_cli.train import resume_conflicts

    old = train.TrainOptions()  # a resume state of clipcap < this feature: noise_variance missing (None)
    assert resume_conflicts(old, train.TrainOptions(noise_variance=0.0)) == []
    assert resume_conflicts(old, train.TrainOptions(noise_variance=0.016)) == ["noise_variance"]
    assert resume_conflicts(train.TrainOptions(noise_variance=0.016), train.TrainOptions(noise_variance=0.0)) == [
        "noise_variance"
    ]


def test_clipcap_train_from_text_encodes_captions_once_and_records_capdec(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    from typer.testing import CliRunner

    from clipcap_cli.cli.app import app

    lines = tmp_path / "captions.txt"
    lines.write_text("".join(f"a {c} square.\n" for c in COLOURS * 3) + "\n")
    args = ["train", str(lines), "--from-text", "--clip", f"local-dir:{tiny_clip_dir}", "--gpt2", str(tiny_gpt2_dir)]
    args += ["--features", str(tmp_path / "stores"), "--epochs", "1", "--batch-size", "4", "--prefix-length", "2"]
    args += ["--warmup", "1", "--val-fraction", "0"]
    runner = CliRunner()
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert first.exit_code == 0, first.output
    assert f"training captions: {len(COLOURS) * 3} (encoded" in first.stderr
    store = next((tmp_path / "stores").iterdir())
    assert store.name.startswith("text-") and features.load_features(store).meta["modality"] == "text"
    with safe_open(first.stdout.strip().splitlines()[-1], framework="pt") as f:
        assert json.loads(f.metadata()["noise_variance"]) == 0.016
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "run2")])
    assert second.exit_code == 0 and "(reusing" in second.stderr, second.output
    assert len(list((tmp_path / "stores").iterdir())) == 1
