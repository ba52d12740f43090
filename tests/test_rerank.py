"""Reranking captions by CLIP-S: the chosen caption is the candidate open_clip's own encoders score
highest, a text tower made to prefer one candidate changes the choice, and the CLI/API surface."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clipcap_cli.cli.app import app
from clipcap_cli.decoding.decode import RERANK_SAMPLES, DecodingOptions, tokens_to_text
from clipcap_cli.errors import UsageError
from clipcap_cli.eval import clipscore
from clipcap_cli.loading import load_model

runner = CliRunner()
FAST = {"max_length": 8}


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path):
    return load_model(str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    from conftest import make_images

    return make_images(tmp_path_factory.mktemp("photos"))["rgb"]


def open_clip_scores(clip_model: str, image: Path, texts: list[str]) -> list[float]:
    """CLIP-S of each text for the image, straight from open_clip (no clipcap code)."""
    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(clip_model)
    model.eval()
    with torch.no_grad():
        img = model.encode_image(preprocess(Image.open(image).convert("RGB"))[None]).double()
        txt = model.encode_text(open_clip.tokenize(["A photo depicts " + t for t in texts])).double()
    cos = (img / img.norm(dim=-1, keepdim=True)) @ (txt / txt.norm(dim=-1, keepdim=True)).T
    return (2.5 * cos[0].clamp(min=0)).tolist()


def test_rerank_returns_the_candidate_clip_scores_highest(captioner, photo: Path):
    beams = captioner.caption(photo, strategy="beam", beam_size=5, num_captions=5, **FAST)[0]
    assert len(set(beams.texts)) == 5  # five different candidates to choose from
    want = open_clip_scores(captioner.config.clip_model, photo, list(beams.texts))
    order = sorted(range(5), key=lambda j: -want[j])

    best = captioner.caption(photo, rerank="clip", **FAST)[0]  # greedy + rerank = beam 5, as --rerank clip alone
    assert best.text == beams.texts[order[0]] and best.texts == (best.text,)
    assert best.clip_score == pytest.approx(want[order[0]], abs=1e-6)
    assert best.score == pytest.approx(beams.scores[order[0]], abs=1e-9)  # the decoder's score travels with it
    assert tokens_to_text(captioner.tokenizer, best.tokens) == best.text  # tokens of the chosen caption

    every = captioner.caption(photo, strategy="beam", beam_size=5, num_captions=5, rerank="clip", **FAST)[0]
    assert every.texts == tuple(beams.texts[j] for j in order)
    assert every.clip_scores == pytest.approx([want[j] for j in order], abs=1e-6)
    assert every.scores == pytest.approx([beams.scores[j] for j in order])
    assert list(every.clip_scores) == sorted(every.clip_scores, reverse=True)


def test_rerank_of_samples_reorders_the_same_samples(captioner, photo: Path):
    plain = captioner.caption(photo, strategy="sample", num_captions=4, seed=3, **FAST)[0]
    ranked = captioner.caption(photo, strategy="sample", num_captions=4, seed=3, rerank="clip", **FAST)[0]
    assert sorted(ranked.texts) == sorted(plain.texts)
    want = dict(zip(plain.texts, open_clip_scores(captioner.config.clip_model, photo, list(plain.texts))))
    assert list(ranked.clip_scores) == pytest.approx([want[t] for t in ranked.texts], abs=1e-6)
    assert list(ranked.clip_scores) == sorted(ranked.clip_scores, reverse=True)
    # one caption asked for: it is chosen among RERANK_SAMPLES samples
    five = captioner.caption(photo, strategy="sample", num_captions=RERANK_SAMPLES, seed=3, **FAST)[0]
    one = captioner.caption(photo, strategy="sample", seed=3, rerank="clip", **FAST)[0]
    scores = open_clip_scores(captioner.config.clip_model, photo, list(five.texts))
    assert one.text == five.texts[max(range(len(scores)), key=lambda j: scores[j])]


def prefer_candidate(src: Path, dst: Path, texts: list[str], target: int, image_embedding: torch.Tensor) -> Path:
    """A copy of the tiny CLIP whose text projection sends ``texts[target]`` onto the image's
    embedding and every other candidate onto its opposite (cosine 1 against -1)."""
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.create_model(f"local-dir:{src}")
    model.eval()
    width = model.text_projection.shape[0]
    model.text_projection = torch.nn.Parameter(torch.eye(width))
    with torch.no_grad():
        hidden = model.encode_text(open_clip.tokenize(["A photo depicts " + t for t in texts]))  # (N, width)
    wanted = -image_embedding.expand(len(texts), -1).clone()
    wanted[target] = image_embedding
    model.text_projection = torch.nn.Parameter(torch.linalg.lstsq(hidden, wanted).solution)  # (width, D)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "open_clip_config.json").write_text((src / "open_clip_config.json").read_text())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dst / "open_clip_model.safetensors"))
    return dst


def test_a_text_tower_that_prefers_one_candidate_changes_the_caption(
    tmp_path: Path, captioner, photo: Path, tiny_checkpoint: Path, tiny_clip_dir: Path
):
    beams = captioner.caption(photo, strategy="beam", beam_size=5, num_captions=5, **FAST)[0]
    target = 4  # the beam search's last choice
    clip_dir = prefer_candidate(tiny_clip_dir, tmp_path / "clip", list(beams.texts), target, captioner.encode(photo)[0])
    biased = load_model(str(tiny_checkpoint), device="cpu", clip_model=f"local-dir:{clip_dir}")
    assert torch.allclose(biased.encode(photo), captioner.encode(photo))  # the image side is untouched
    assert biased.caption(photo, **FAST)[0].text == beams.texts[0]  # without reranking: the beam search's pick
    chosen = biased.caption(photo, rerank="clip", **FAST)[0]
    assert chosen.text == beams.texts[target] != beams.texts[0]
    assert chosen.clip_score == pytest.approx(2.5, abs=1e-4)


def test_text_tower_is_built_on_first_use_and_kept(tiny_checkpoint: Path, photo: Path, monkeypatch):
    """Captioning builds CLIP's image tower alone; the first reranking builds the text side once
    (through clipscore.load_clip) and keeps it."""
    real = clipscore.load_clip
    calls = []
    monkeypatch.setattr(clipscore, "load_clip", lambda *a: calls.append(a) or real(*a))
    fresh = load_model(str(tiny_checkpoint), device="cpu")
    fresh.caption(photo, **FAST)
    assert fresh._clip_text is None and not clipscore.has_text_tower(fresh.clip_model)  # no text side
    fresh.caption(photo, rerank="clip", **FAST)
    text = fresh._clip_text
    assert text is not None and clipscore.has_text_tower(text.model) and len(calls) == 1
    fresh.caption(photo, rerank="clip", **FAST)
    assert fresh._clip_text is text and len(calls) == 1
    # A CLIP that already has its text tower is reused as it is.
    full, _ = real(fresh.config.clip_model, None, "cpu")
    assert clipscore.ClipText.load(fresh.config.clip_model, None, "cpu", reuse=full).model is full and len(calls) == 1


def test_rerank_options_are_checked():
    with pytest.raises(UsageError, match="unknown reranker"):
        DecodingOptions(rerank="blip")
    assert DecodingOptions(rerank="clip", num_captions=3).num_captions == 3  # greedy + rerank searches 5 beams
    with pytest.raises(UsageError, match="cannot exceed beam_size"):
        DecodingOptions(rerank="clip", num_captions=6)
    opts = DecodingOptions(rerank="clip", num_captions=2).candidates()
    assert (opts.strategy, opts.num_captions, opts.rerank) == ("beam", 5, None)
    opts = DecodingOptions(strategy="beam", beam_size=3, rerank="clip").candidates()
    assert (opts.strategy, opts.num_captions) == ("beam", 3)
    opts = DecodingOptions(strategy="sample", num_captions=7, rerank="clip").candidates()
    assert (opts.strategy, opts.num_captions) == ("sample", 7)


# --------------------------------------------------------------------------- CLI


def caption_cli(ckpt: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["caption", "--model", str(ckpt), "--max-length", "6", *args])
    return result.exit_code, result.stdout, result.output


def test_cli_rerank_records(tiny_checkpoint: Path, photo: Path):
    code, out, output = caption_cli(tiny_checkpoint, str(photo), "--rerank", "clip")
    assert code == 0, output
    record = json.loads(out)
    assert set(record) == {"path", "caption", "score", "error", "clip_score"}
    assert isinstance(record["clip_score"], float) and 0 <= record["clip_score"] <= 2.5
    code, out, output = caption_cli(tiny_checkpoint, str(photo), "--beam", "4", "-n", "3", "--rerank", "clip")
    assert code == 0, output
    record = json.loads(out)
    assert set(record) == {"path", "caption", "score", "error", "clip_score", "captions", "scores", "clip_scores"}
    assert len(record["captions"]) == len(record["clip_scores"]) == 3 and record["caption"] == record["captions"][0]
    assert record["clip_scores"] == sorted(record["clip_scores"], reverse=True)
    assert record["clip_score"] == record["clip_scores"][0]
    code, out, output = caption_cli(
        tiny_checkpoint, str(photo), "--sample", "-n", "2", "--seed", "1", "--rerank", "clip"
    )
    assert code == 0 and len(json.loads(out)["clip_scores"]) == 2, output


def test_cli_rerank_formats_and_errors(tiny_checkpoint: Path, photo: Path, tmp_path: Path):
    missing = str(tmp_path / "missing.jpg")
    code, out, output = caption_cli(tiny_checkpoint, missing, str(photo), "--rerank", "clip", "--format", "csv")
    assert code == 3, output  # the failed input comes first, and the columns are still all there
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["path", "caption", "score", "error", "clip_score"]
    assert rows[0]["clip_score"] == "" and float(rows[1]["clip_score"]) >= 0
    code, out, output = caption_cli(tiny_checkpoint, str(photo), "--rerank", "clip", "--format", "table")
    assert code == 0 and "CLIP-S" in out, output
    code, _, output = caption_cli(tiny_checkpoint, str(photo), "--rerank", "blip")
    assert code == 2 and "unknown reranker" in output
    code, _, output = caption_cli(tiny_checkpoint, str(photo), "--rerank", "clip", "--beam", "2", "-n", "3")
    assert code == 2 and "cannot exceed --beam" in output
