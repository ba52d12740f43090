"""`clipcap caption --embeddings PATH`: stored CLIP embeddings captioned without reading an image, from
--save-embeddings files, clip-retrieval output and features stores; sharded and resumable with
--output-dir; the checks against the model; and captions equal to those from the images themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipcap_cli.cli.app import app

runner = CliRunner()
FAST = ["--max-length", "6"]


def caption(ckpt: Path, *args: str):
    return runner.invoke(app, ["caption", "--model", str(ckpt), *FAST, *args])


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def saved(tiny_checkpoint, tmp_path_factory) -> dict:
    """Five images captioned into an --output-dir with --save-embeddings: the reference captions."""
    from PIL import Image

    root = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(3)
    (root / "imgs").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8), "RGB").save(root / "imgs" / f"{i}.jpg")
    result = caption(tiny_checkpoint, str(root / "imgs"), "--output-dir", str(root / "out"), "--save-embeddings")
    assert result.exit_code == 0, result.output
    from clipcap_cli.batch.sharded_output import load_embeddings

    records = jsonl((root / "out" / "part-00000.jsonl").read_text(encoding="utf-8"))
    return {
        "root": root,
        "file": root / "out" / "part-00000.emb.safetensors",
        "records": records,
        "captions": {r["key"]: r["caption"] for r in records},
        "scores": {r["key"]: r["score"] for r in records},
        "emb": load_embeddings(root / "out" / "part-00000.emb.safetensors").float().numpy(),
    }


def test_captions_from_saved_embeddings_equal_captions_from_the_images(tiny_checkpoint, saved):
    direct = jsonl(caption(tiny_checkpoint, str(saved["root"] / "imgs")).stdout)
    assert {r["path"]: r["caption"] for r in direct} == saved["captions"]  # the reference is the plain CLI's
    assert len(set(saved["scores"].values())) == 5  # the random tiny model's scores tell the images apart
    result = caption(tiny_checkpoint, "--embeddings", str(saved["file"]))
    assert result.exit_code == 0, result.output
    got = jsonl(result.stdout)
    assert [r["key"] for r in got] == [r["key"] for r in saved["records"]]  # keyed by the records beside the file
    assert {r["key"]: r["caption"] for r in got} == saved["captions"]
    assert {r["key"]: r["score"] for r in got} == pytest.approx(saved["scores"], rel=1e-6)  # the same inputs
    assert "captioned 5 of 5 embeddings" in result.stderr


def test_clip_retrieval_output_is_keyed_by_its_metadata(tiny_checkpoint, saved, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(saved["captions"])
    (tmp_path / "img_emb").mkdir()
    (tmp_path / "metadata").mkdir()
    for n, rows in enumerate((slice(0, 3), slice(3, 5))):
        np.save(tmp_path / "img_emb" / f"img_emb_{n}.npy", saved["emb"][rows])
        table = {
            "image_path": keys[rows],
            "url": [f"http://x/{k}" for k in keys[rows]],
            "caption": [f"alt {k}" for k in keys[rows]],
        }
        pq.write_table(pa.table(table), tmp_path / "metadata" / f"metadata_{n}.parquet")
    result = caption(tiny_checkpoint, "--embeddings", str(tmp_path), "--format", "jsonl")
    assert result.exit_code == 0, result.output
    got = jsonl(result.stdout)
    assert [(r["key"], r["shard"]) for r in got] == [(k, f"img_emb_{0 if i < 3 else 1}") for i, k in enumerate(keys)]
    assert all(r["url"] == f"http://x/{r['key']}" and r["source_caption"] == f"alt {r['key']}" for r in got)
    assert {r["key"]: r["caption"] for r in got} == saved["captions"]
    assert {r["key"]: r["score"] for r in got} == pytest.approx(saved["scores"], rel=1e-6)
    text = caption(tiny_checkpoint, "--embeddings", str(tmp_path), "--format", "text")
    assert text.stdout.splitlines()[0] == f"{keys[0]}\t{saved['captions'][keys[0]]}"


def test_a_features_store_is_keyed_by_image_path(tiny_checkpoint, tiny_config, saved, tmp_path):
    import torch

    from clipcap_cli.data.features import save_features

    keys = list(saved["captions"])
    records = [{"image": k, "captions": [f"ref {k}"]} for k in keys]
    meta = {"clip_model": tiny_config.clip_model, "clip_pretrained": tiny_config.clip_pretrained}
    save_features(tmp_path / "store", torch.from_numpy(saved["emb"]), records, meta)
    result = caption(tiny_checkpoint, "--embeddings", str(tmp_path / "store"))
    assert result.exit_code == 0, result.output
    got = jsonl(result.stdout)
    assert {r["key"]: r["caption"] for r in got} == saved["captions"]
    assert got[0]["source_caption"] == f"ref {keys[0]}"


def test_output_dir_is_sharded_by_file_resumable_and_split(tiny_checkpoint, saved, tmp_path):
    emb = tmp_path / "img_emb"
    emb.mkdir()
    for n in range(3):  # three files: three shards
        np.save(emb / f"img_emb_{n}.npy", saved["emb"][n : n + 1])
    out = tmp_path / "out"
    first = caption(tiny_checkpoint, "--embeddings", str(tmp_path), "--output-dir", str(out), "--shard", "0/2")
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in out.glob("*.stats.json")) == ["img_emb_0.stats.json", "img_emb_2.stats.json"]
    rest = caption(tiny_checkpoint, "--embeddings", str(tmp_path), "--output-dir", str(out))
    assert rest.exit_code == 0, rest.output
    assert "2 shards were already done" in rest.stderr
    captions = [jsonl((out / f"img_emb_{n}.jsonl").read_text(encoding="utf-8"))[0]["caption"] for n in range(3)]
    assert captions == list(saved["captions"].values())[:3]
    stats = json.loads((out / "img_emb_1.stats.json").read_text(encoding="utf-8"))
    assert stats["source"] == str(emb / "img_emb_1.npy")
    again = caption(tiny_checkpoint, "--embeddings", str(tmp_path), "--output-dir", str(out))
    assert "nothing to do" in again.stderr


def test_mismatches_are_one_line_usage_errors(tiny_checkpoint, tiny_config, saved, tmp_path):
    import torch

    from clipcap_cli.data.features import save_features

    wide = tmp_path / "wide.npy"
    np.save(wide, np.ones((2, saved["emb"].shape[1] + 1), dtype=np.float16))
    unit = tmp_path / "unit.npy"
    np.save(unit, saved["emb"] / np.linalg.norm(saved["emb"], axis=1, keepdims=True))
    records = [{"image": "a.jpg", "captions": []}]
    save_features(tmp_path / "other", torch.from_numpy(saved["emb"][:1]), records, {"clip_model": "RN50"})
    for path, message in (
        (wide, "-wide embeddings, but the model takes"),
        (unit, "L2-normalised"),
        (tmp_path / "other", "made by CLIP RN50"),
        (tmp_path / "missing", "no such file"),
    ):
        result = caption(tiny_checkpoint, "--embeddings", str(path))
        assert result.exit_code == 2, (path, result.output)
        assert message in result.stderr and result.stdout == ""
    refused = caption(tiny_checkpoint, "--embeddings", str(saved["file"]), str(saved["root"] / "imgs"))
    assert refused.exit_code == 2 and "give no image inputs" in refused.stderr
    same = caption(tiny_checkpoint, "--embeddings", str(saved["file"]), "--output-dir", str(saved["file"].parent))
    assert same.exit_code == 2 and "would be overwritten" in same.stderr


def test_a_row_that_failed_when_saved_fails_again(tiny_checkpoint, saved, tmp_path):
    rows = saved["emb"].copy()
    rows[1] = np.nan
    np.save(tmp_path / "img_emb_0.npy", rows)
    result = caption(tiny_checkpoint, "--embeddings", str(tmp_path / "img_emb_0.npy"))
    assert result.exit_code == 3, result.output
    got = jsonl(result.stdout)
    assert [r["error"] is not None for r in got] == [False, True, False, False, False]
    assert got[0]["key"] == "0" and got[0]["caption"] == list(saved["captions"].values())[0]
