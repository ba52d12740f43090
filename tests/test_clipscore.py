"""CLIPScore and RefCLIPScore: the core against a plain re-statement of the reference script
(jmhessel/clipscore), and `clipcap eval` reporting them from image files, a features store or a
--model run, or saying why it cannot.

The re-statement below reads the images and captions with open_clip directly (its ``tokenize``
plays the part of ``clip.tokenize(truncate=True)``) and does the reference's arithmetic in
numpy; nothing of clipcap's is used on that side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clipcap_cli.cli.app import app
from clipcap_cli.eval import clipscore

runner = CliRunner()
N_IMAGES = 24
REF_POOL = [
    "a red square on a grey background",
    "two cars parked near a tree",
    "a dog running on the beach",
    "a plate of food on a wooden table",
    "a man riding a bicycle down the street",
    "an empty room with a window",
    "a green field under a blue sky",
    "a cat sleeping on a sofa",
]
LONG = "a very long caption " + "that goes on and on " * 30  # over CLIP's 77 tokens: truncated, end token kept


def draw_images(folder: Path, n: int = N_IMAGES, seed: int = 0) -> list[Path]:
    """Solid backgrounds with one coloured block each (distinct enough for a random CLIP)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        pixels = np.zeros((40, 48, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        pixels[rng.integers(0, 20) : rng.integers(20, 40), rng.integers(0, 24) : rng.integers(24, 48)] = rng.integers(
            0, 255, 3
        )
        files.append(folder / f"img{i:02d}.png")
        Image.fromarray(pixels).save(files[-1])
    return files


def captions_and_references(n: int = N_IMAGES, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rng = np.random.default_rng(seed)
    captions = [
        LONG if i == 3 else ("" if i == 5 else " ".join(rng.choice(REF_POOL[i % 8].split(), 4))) for i in range(n)
    ]
    references = [list(rng.choice(REF_POOL, int(rng.integers(2, 6)), replace=False)) for _ in range(n)]
    return captions, references


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_clip_dir: Path) -> dict:
    """A tiny CLIP with its image embeddings centred on the test images (so that some captions
    get a negative cosine, which CLIP-S clips to 0), the images, captions and references."""
    import open_clip
    from PIL import Image
    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp("clipscore")
    files = draw_images(base / "images")
    clip_dir = base / "clip"
    clip_dir.mkdir()
    (clip_dir / "open_clip_config.json").write_text((tiny_clip_dir / "open_clip_config.json").read_text())
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files])
        mean = model.encode_image(pixels).mean(0)
        model.visual.ln_post.bias -= mean @ torch.linalg.pinv(model.visual.proj)  # embeddings shift by -mean
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(clip_dir / "open_clip_model.safetensors"))
    captions, references = captions_and_references()
    clip = f"local-dir:{clip_dir}"
    want = reference_scores(clip, files, captions, references)
    return {"clip": clip, "files": files, "captions": captions, "references": references, "want": want}


def reference_scores(clip: str, files: list[Path], captions: list[str], references: list[list[str]]) -> dict:
    """The reference script's numbers: per-image CLIP-S and RefCLIP-S, and the raw cosines."""
    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(clip)
    model.eval()

    def text_features(texts: list[str]) -> np.ndarray:
        with torch.no_grad():
            return (
                model.encode_text(open_clip.tokenize(["A photo depicts " + t for t in texts]))
                .numpy()
                .astype(np.float64)
            )

    with torch.no_grad():
        images = model.encode_image(torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files]))
    images = images.numpy().astype(np.float64)
    cands = text_features(captions)
    images = images / np.sqrt(np.sum(images**2, axis=1, keepdims=True))
    cands = cands / np.sqrt(np.sum(cands**2, axis=1, keepdims=True))
    cos = np.sum(images * cands, axis=1)
    per_clip = 2.5 * np.clip(cos, 0, None)
    flat = text_features([r for refs in references for r in refs])  # the reference flattens them too
    flat = flat / np.sqrt(np.sum(flat**2, axis=1, keepdims=True))
    owner = np.array([i for i, refs in enumerate(references) for _ in refs])
    text_text = []
    for i, cand in enumerate(cands):
        text_text.append(np.max(cand @ flat[owner == i].T))
    text_text = np.array(text_text)
    per_ref = 2 * per_clip * text_text / (per_clip + text_text)
    return {"clip": per_clip, "ref": per_ref, "cos": cos, "text_text": text_text}


def test_scores_equal_the_reference_formulas(scored: dict):
    files, captions, references = scored["files"], scored["captions"], scored["references"]
    want = scored["want"]
    # the data exercises what matters: clipping at 0, truncation, an empty caption, several references
    assert (want["cos"] < 0).sum() >= 3 and (want["cos"] > 0).sum() >= 3
    assert min(len(r) for r in references) >= 2 and len(files) >= 20
    assert (want["text_text"] > 0).all()  # where the reference script and the paper's Eq. 2 agree

    model, preprocess = clipscore.load_clip(scored["clip"], None, "cpu")
    features, failed = clipscore.encode_image_files(model, preprocess, [str(f) for f in files], "cpu", batch_size=5)
    assert failed == []
    text = clipscore.ClipText.load(scored["clip"], None, "cpu")
    got = clipscore.score(features, captions, text, references)
    np.testing.assert_allclose(got.per_image_clip, want["clip"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.per_image_ref, want["ref"], rtol=0, atol=1e-6)
    assert got.clip_score == pytest.approx(want["clip"].mean(), abs=1e-6)
    assert got.ref_clip_score == pytest.approx(want["ref"].mean(), abs=1e-6)
    assert all(v == 0.0 for v, c in zip(got.per_image_clip, want["cos"]) if c < 0)  # clipped, as the reference
    assert all(v == 0.0 for v, c in zip(got.per_image_ref, want["cos"]) if c < 0)  # harmonic mean with 0
    # without references only CLIP-S is computed, with the same values
    alone = clipscore.score(features, captions, text)
    assert alone.per_image_clip == got.per_image_clip and alone.ref_clip_score is None
    assert alone.as_metrics() == {"CLIPScore": got.clip_score}


def test_the_reference_side_is_clipped_and_zero_over_zero_is_zero():
    """The paper's Eq. 2 clips max_r cos(c, r) at 0; the reference script never meets that case."""
    a = torch.tensor([0.0, 1.5, 2.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 0.0, 0.5, 0.7], dtype=torch.float64)
    assert clipscore.harmonic_mean(a, b).tolist() == pytest.approx([0.0, 0.0, 2 * 2.0 * 0.5 / 2.5, 0.0])
    cand = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    refs = [torch.tensor([[-1.0, 0.1], [-1.0, -0.2]]), torch.tensor([[0.6, 0.8], [1.0, 0.0]])]
    assert clipscore.reference_similarity(cand, refs).tolist() == pytest.approx([0.0, 0.8])


def test_score_refuses_misaligned_input(scored: dict):
    text = clipscore.ClipText.load(scored["clip"], None, "cpu")
    with pytest.raises(ValueError):
        clipscore.score(torch.zeros(2, 32), ["one caption"], text)
    with pytest.raises(ValueError):
        clipscore.score(torch.zeros(1, 32), ["one caption"], text, [[]])


# --------------------------------------------------------------------------- clipcap eval


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def eval_files(folder: Path, scored: dict) -> tuple[Path, Path]:
    """References and predictions named by the images' file names (images under images/)."""
    refs = write_jsonl(
        folder / "refs.jsonl",
        [{"image": f.name, "caption": c} for f, caps in zip(scored["files"], scored["references"]) for c in caps],
    )
    preds = write_jsonl(
        folder / "preds.jsonl",
        [{"path": f"images/{f.name}", "caption": c} for f, c in zip(scored["files"], scored["captions"])],
    )
    return refs, preds


def run_eval(*args: str | Path) -> tuple[int, dict | None, str]:
    result = runner.invoke(app, ["eval", *map(str, args)])
    try:
        return result.exit_code, json.loads(result.stdout), result.output
    except ValueError:
        return result.exit_code, None, result.output


def test_eval_reports_clipscore_per_image_on_the_reference_scale(tmp_path: Path, scored: dict):
    refs, preds = eval_files(tmp_path, scored)
    root = scored["files"][0].parent
    code, report, output = run_eval(
        "--refs",
        refs,
        "-p",
        preds,
        "--images",
        root,
        "--clip",
        scored["clip"],
        "--metrics",
        "BLEU-1,CLIPScore,RefCLIPScore",
        "--tokenizer",
        "ptb-python",
        "--per-image",
    )
    assert code == 0, output
    want = scored["want"]
    assert list(report["metrics"]) == ["BLEU-1", "CLIPScore", "RefCLIPScore"]
    assert report["metrics"]["CLIPScore"] == pytest.approx(want["clip"].mean(), abs=1e-6)
    assert report["metrics"]["RefCLIPScore"] == pytest.approx(want["ref"].mean(), abs=1e-6)
    rows = {Path(row["image"]).name: row["scores"] for row in report["per_image"]}
    for f, clip_s, ref_s in zip(scored["files"], want["clip"], want["ref"]):
        assert rows[f.name]["CLIPScore"] == pytest.approx(clip_s, abs=1e-6)
        assert rows[f.name]["RefCLIPScore"] == pytest.approx(ref_s, abs=1e-6)
        assert "BLEU-1" in rows[f.name]
    assert report["settings"]["clip_model"] == scored["clip"] and report["settings"]["clip_pretrained"] is None
    assert report["settings"]["metrics"] == ["BLEU-1", "CLIPScore", "RefCLIPScore"]
    assert report["backends"]["CLIPScore"] == "open_clip" and report["unavailable"] == {}
    assert "0-2.5" in report["scale"]


def test_eval_without_images_reports_them_unavailable(tmp_path: Path, scored: dict):
    refs, preds = eval_files(tmp_path, scored)
    code, report, output = run_eval(
        "--refs",
        refs,
        "-p",
        preds,
        "--clip",
        scored["clip"],
        "--tokenizer",
        "ptb-python",
        "--metrics",
        "CIDEr,CLIPScore,RefCLIPScore",
    )
    assert code == 0, output
    assert list(report["metrics"]) == ["CIDEr"]
    assert set(report["unavailable"]) == {"CLIPScore", "RefCLIPScore"}
    assert "--images" in report["unavailable"]["CLIPScore"] and "CLIPScore unavailable" in output
    # images given, but one of them is not there: unavailable, with the file named
    root = tmp_path / "partial"
    root.mkdir()
    for f in scored["files"][1:]:
        (root / f.name).write_bytes(f.read_bytes())
    code, report, output = run_eval(
        "--refs",
        refs,
        "-p",
        preds,
        "--images",
        root,
        "--clip",
        scored["clip"],
        "--tokenizer",
        "ptb-python",
        "--metrics",
        "CLIPScore",
    )
    assert code == 0, output
    assert report["metrics"] == {} and set(report["unavailable"]) == {"CLIPScore"}
    assert "1 of 24 scored images are not under" in report["unavailable"]["CLIPScore"]
    assert scored["files"][0].name in report["unavailable"]["CLIPScore"]


def test_eval_default_clip_not_cached_is_unavailable_not_fatal(tmp_path: Path, scored: dict):
    refs, preds = eval_files(tmp_path, scored)
    code, report, output = run_eval(
        "--refs",
        refs,
        "-p",
        preds,
        "--images",
        scored["files"][0].parent,
        "--tokenizer",
        "ptb-python",
        "--metrics",
        "BLEU-4,CLIPScore",
    )
    assert code == 0, output
    assert set(report["metrics"]) == {"BLEU-4"}
    assert "not cached" in report["unavailable"]["CLIPScore"]
    assert report["settings"]["clip_model"] == "ViT-B-32" and report["settings"]["clip_pretrained"] == "openai"


def test_eval_clip_typos_are_usage_errors(tmp_path: Path, scored: dict):
    refs, preds = eval_files(tmp_path, scored)
    code, _, output = run_eval("--refs", refs, "-p", preds, "--clip", "ViT-B-33", "--metrics", "CLIPScore")
    assert code == 2 and "unknown CLIP model" in output
    code, _, output = run_eval("--refs", refs, "-p", preds, "--metrics", "CLIPScore,Foo")
    assert code == 2 and "RefCLIPScore" in output  # the choices list the CLIP metrics


def test_eval_uses_a_features_store_made_with_the_same_clip(tmp_path: Path, scored: dict, tiny_clip_dir: Path):
    """Stored embeddings give the same values as the image files, without the files."""
    from clipcap_cli.data.features import save_features

    model, preprocess = clipscore.load_clip(scored["clip"], None, "cpu")
    features, _ = clipscore.encode_image_files(model, preprocess, [str(f) for f in scored["files"]], "cpu")
    records = [{"image": f.name, "captions": refs} for f, refs in zip(scored["files"], scored["references"])]
    store = save_features(
        tmp_path / "feats",
        features.half(),
        records,  # fp16, as a GPU extraction stores them
        {"clip_model": scored["clip"], "clip_pretrained": None, "preprocess": "test"},
    )
    _, preds = eval_files(tmp_path, scored)
    common = ["--clip", scored["clip"], "--metrics", "CLIPScore,RefCLIPScore", "--per-image"]
    code, report, output = run_eval("--refs", store, "-p", preds, *common)
    assert code == 0, output
    assert any("CLIP embeddings stored in" in note for note in report["notes"])
    want = scored["want"]
    # fp16 storage rounds the embeddings: agreement to fp16 precision
    assert report["metrics"]["CLIPScore"] == pytest.approx(want["clip"].mean(), abs=2e-3)
    assert report["metrics"]["RefCLIPScore"] == pytest.approx(want["ref"].mean(), abs=2e-3)
    # another CLIP than the store's: the store's embeddings are not used, and it has no image folder
    code, report, output = run_eval(
        "--refs", store, "-p", preds, "--clip", f"local-dir:{tiny_clip_dir}", "--metrics", "CLIPScore"
    )
    assert code == 0, output
    assert "--images" in report["unavailable"]["CLIPScore"]


def test_eval_model_run_scores_its_captions(tmp_path: Path, scored: dict, tiny_checkpoint: Path):
    refs, _ = eval_files(tmp_path, scored)
    saved = tmp_path / "saved.jsonl"
    code, report, output = run_eval(
        "--refs",
        refs,
        "--images",
        scored["files"][0].parent,
        "--model",
        tiny_checkpoint,
        "--max-length",
        "5",
        "--clip",
        scored["clip"],
        "--metrics",
        "CLIPScore,RefCLIPScore",
        "--save-predictions",
        saved,
        "--per-image",
    )
    assert code == 0, output
    captions = {
        Path(json.loads(line)["path"]).name: json.loads(line)["caption"] for line in saved.read_text().splitlines()
    }
    want = reference_scores(
        scored["clip"], scored["files"], [captions[f.name] for f in scored["files"]], scored["references"]
    )
    assert report["metrics"]["CLIPScore"] == pytest.approx(want["clip"].mean(), abs=1e-6)
    assert report["metrics"]["RefCLIPScore"] == pytest.approx(want["ref"].mean(), abs=1e-6)
