"""The features store (save/load contract) and the encoding core."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipcap_cli.batch import shards
from clipcap_cli.data import extract_parts, features
from clipcap_cli.data.features import FeatureSet, load_features, save_features
from clipcap_cli.errors import ClipCapError, UsageError


def _records(n: int) -> list[dict]:
    return [
        {"image": f"img/{i}.jpg", "image_id": i, "captions": [f"caption {i} a", f"caption {i} b"]} for i in range(n)
    ]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_store_round_trip(tmp_path: Path, dtype: torch.dtype):
    emb = torch.randn(5, 8).to(dtype)
    records = _records(5)
    records[2]["captions"] = []  # caption-less images are allowed
    out = save_features(
        tmp_path / "feats", emb, records, {"clip_model": "ViT-B-32", "clip_pretrained": "openai", "preprocess": "x"}
    )
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.safetensors", "index.jsonl", "meta.json"]

    for where in (out, out / "meta.json", str(out)):
        fs = load_features(where)
        assert isinstance(fs, FeatureSet) and fs.path == out
        assert fs.embeddings.dtype == dtype and torch.equal(fs.embeddings, emb)
        assert fs.records == records
    meta = fs.meta
    assert meta["format"] == "clipcap-features" and meta["format_version"] == 1
    assert meta["count"] == 5 and meta["embed_dim"] == 8 and meta["num_captions"] == 8
    assert meta["dtype"] == str(dtype).removeprefix("torch.") and meta["normalized"] is False
    assert meta["clip_model"] == "ViT-B-32" and meta["clipcap_version"]
    # the meta travels inside the safetensors file too
    from safetensors import safe_open

    with safe_open(str(out / "embeddings.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["meta"]) == meta
    # index.jsonl: one record per row, in order
    lines = (out / "index.jsonl").read_text().splitlines()
    assert [json.loads(line)["image"] for line in lines] == [r["image"] for r in records]


def test_store_rewrite_changes_store_id(tmp_path: Path):
    a = save_features(tmp_path, torch.zeros(2, 4), _records(2), {})
    first = load_features(a).meta["store_id"]
    save_features(tmp_path, torch.ones(3, 4), _records(3), {})
    fs = load_features(tmp_path)
    assert fs.meta["store_id"] != first and len(fs) == 3 and torch.equal(fs.embeddings, torch.ones(3, 4))


def test_store_validation_and_incomplete(tmp_path: Path):
    with pytest.raises(ClipCapError, match="2 embedding rows but 3 records"):
        save_features(tmp_path / "a", torch.zeros(2, 4), _records(3), {})
    with pytest.raises(ClipCapError, match="needs 'image' and 'captions'"):
        save_features(tmp_path / "a", torch.zeros(1, 4), [{"image_id": 1}], {})
    with pytest.raises(UsageError, match="not found"):
        load_features(tmp_path / "missing")

    out = save_features(tmp_path / "b", torch.zeros(2, 4), _records(2), {})
    (out / "meta.json").unlink()
    (out / "parts").mkdir()
    with pytest.raises(ClipCapError, match="no meta.json.*rerun the same"):
        load_features(out)

    out = save_features(tmp_path / "c", torch.zeros(2, 4), _records(2), {})
    (out / "index.jsonl").write_text(
        json.dumps(_records(3)[2]) + "\n" + (out / "index.jsonl").read_text().splitlines()[0] + "\n"
    )
    with pytest.raises(ClipCapError, match="does not belong"):
        load_features(out)

    pkl = tmp_path / "old.pkl"
    pkl.write_bytes(b"x")
    with pytest.raises(UsageError, match="--import-pickle"):
        load_features(pkl)


# --------------------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir: Path):
    from clipcap_cli.weights import clip_tower

    return clip_tower.load_clip(f"local-dir:{tiny_clip_dir}", None, "cpu")


def _folder_records(folder: Path) -> tuple[list[dict], Path]:
    from clipcap_cli.data.datasets import read_dataset

    ds = read_dataset(folder)
    return list(ds.records()), ds.images_root


def _opts(tiny_clip_dir: Path, **kw) -> features.ExtractOptions:
    return features.ExtractOptions(clip_model=f"local-dir:{tiny_clip_dir}", clip_pretrained=None, **kw)


@pytest.mark.parametrize("workers,batch,chunk", [(0, 64, 1024), (2, 3, 2)])
def test_features_match_direct_encode_image(
    tmp_path: Path, images: dict, tiny_clip, tiny_clip_dir: Path, workers, batch, chunk
):
    from clipcap_cli.data.images import open_rgb

    records, root = _folder_records(images["rgb"].parent)
    # extract() loads the model itself from the options (the CLI path); the reference uses a second copy
    result = features.extract(
        records, root, tmp_path / "f", _opts(tiny_clip_dir, workers=workers, batch_size=batch, chunk_size=chunk)
    )
    assert result.complete and not result.skipped and result.encoded == len(records) == 7
    fs = load_features(tmp_path / "f")
    model, preprocess = tiny_clip
    with torch.inference_mode():
        direct = torch.cat(
            [model.encode_image(preprocess(open_rgb(root / r["image"])).unsqueeze(0)) for r in fs.records]
        )
    assert [r["image"] for r in fs.records] == [r["image"] for r in records]
    assert fs.embeddings.dtype == torch.float32
    assert (fs.embeddings - direct).abs().max().item() < 1e-5
    assert fs.meta["preprocess"].startswith("Resize(size=32") and "Normalize" in fs.meta["preprocess"]
    assert fs.meta["clip_model"] == f"local-dir:{tiny_clip_dir}" and fs.meta["normalized"] is False
    assert fs.meta["counts"] == {"records": 7, "images": 7, "captions": 0, "skipped": 0}
    assert not (tmp_path / "f" / "parts").exists()


def _bad_inputs(folder: Path) -> None:
    (folder / "text.jpg").write_text("this is not an image")
    good = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])


def test_unreadable_images_are_skipped_and_listed(tmp_path: Path, images: dict, tiny_clip, tiny_clip_dir: Path):
    folder = images["rgb"].parent
    _bad_inputs(folder)
    records, root = _folder_records(folder)
    records.append({"image": "missing.jpg", "image_id": None, "captions": ["gone"]})
    result = features.extract(
        records, root, tmp_path / "f", _opts(tiny_clip_dir, workers=0, chunk_size=4), clip=tiny_clip
    )
    assert result.complete
    reasons = {s["image"]: s["reason"] for s in result.skipped}
    assert set(reasons) == {"text.jpg", "truncated.jpg", "missing.jpg"}
    assert "not an image" in reasons["text.jpg"] and "No such file" in reasons["missing.jpg"]
    fs = load_features(tmp_path / "f")
    assert len(fs) == len(records) - 3 and not set(reasons) & {r["image"] for r in fs.records}
    assert (fs.embeddings.abs().sum(dim=1) > 0).all()  # never a zero row standing in for a failure
    assert {s["image"] for s in features.read_skipped(tmp_path / "f")} == set(reasons)
    assert fs.meta["counts"]["skipped"] == 3


def test_interrupted_run_resumes_without_reencoding(tmp_path: Path, images: dict, tiny_clip, tiny_clip_dir: Path):
    records, root = _folder_records(images["rgb"].parent)
    opts = _opts(tiny_clip_dir, workers=0, batch_size=1, chunk_size=2)
    parts = tmp_path / "f" / "parts"

    def crash_after_two_chunks(done: int, total: int) -> None:
        if len(list(parts.glob("chunk-*.safetensors"))) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        features.extract(records, root, tmp_path / "f", opts, clip=tiny_clip, on_progress=crash_after_two_chunks)
    assert not (tmp_path / "f" / "meta.json").exists()
    with pytest.raises(ClipCapError, match="unfinished extraction"):
        load_features(tmp_path / "f")
    seen = []
    result = features.extract(
        records, root, tmp_path / "f", opts, clip=tiny_clip, on_progress=lambda d, t: seen.append(d)
    )
    assert result.complete and result.reused == 4 and result.encoded == 3 and seen[0] == 4
    clean = features.extract(records, root, tmp_path / "clean", opts, clip=tiny_clip)
    a, b = load_features(tmp_path / "f"), load_features(tmp_path / "clean")
    assert torch.equal(a.embeddings, b.embeddings) and a.records == b.records
    assert sorted(a.meta["extraction"]["runs"].values()) == [3, 4]  # two runs: 4 images, then the other 3
    assert clean.encoded == 7


def test_rerun_is_noop_and_settings_mismatch_is_refused(tmp_path: Path, images: dict, tiny_clip, tiny_clip_dir: Path):
    records, root = _folder_records(images["rgb"].parent)
    opts = _opts(tiny_clip_dir, workers=0, chunk_size=2)
    features.extract(records, root, tmp_path / "f", opts, clip=tiny_clip)
    store_id = load_features(tmp_path / "f").meta["store_id"]
    again = features.extract(records, root, tmp_path / "f", opts, clip=tiny_clip)
    assert again.noop and again.encoded == 0 and load_features(tmp_path / "f").meta["store_id"] == store_id
    with pytest.raises(
        UsageError, match="already holds a features store made differently.*chunk_size 2 then, 3 now.*--overwrite"
    ):
        features.extract(records, root, tmp_path / "f", _opts(tiny_clip_dir, workers=0, chunk_size=3), clip=tiny_clip)
    with pytest.raises(UsageError, match="images or captions changed"):
        features.extract(
            records[:-1] + [dict(records[-1], captions=["new"])], root, tmp_path / "f", opts, clip=tiny_clip
        )

    # an unfinished run with other settings: the same clear refusal
    features.extract(
        records, root, tmp_path / "g", _opts(tiny_clip_dir, workers=0, chunk_size=2, shard=(0, 2)), clip=tiny_clip
    )
    with pytest.raises(UsageError, match="unfinished extraction with other settings.*--overwrite"):
        features.extract(records, root, tmp_path / "g", _opts(tiny_clip_dir, workers=0, chunk_size=4), clip=tiny_clip)
    features.clear_store(tmp_path / "g")
    assert features.extract(
        records, root, tmp_path / "g", _opts(tiny_clip_dir, workers=0, chunk_size=4), clip=tiny_clip
    ).complete


def test_shards_then_merge_equal_single_run(tmp_path: Path, images: dict, tiny_clip, tiny_clip_dir: Path):
    folder = images["rgb"].parent
    _bad_inputs(folder)
    records, root = _folder_records(folder)
    single = features.extract(
        records, root, tmp_path / "single", _opts(tiny_clip_dir, workers=0, chunk_size=2), clip=tiny_clip
    )
    out = tmp_path / "sharded"
    r0 = features.extract(
        records, root, out, _opts(tiny_clip_dir, workers=0, chunk_size=2, shard=(0, 2)), clip=tiny_clip
    )
    assert not r0.complete and r0.chunks_missing == 2 and r0.encoded + len(r0.skipped) == 5  # chunks 0, 2, 4 of 5
    with pytest.raises(ClipCapError, match="2 of 5 chunks are not done yet"):
        features.merge_parts(out)
    r1 = features.extract(
        records, root, out, _opts(tiny_clip_dir, workers=0, chunk_size=2, shard=(1, 2)), clip=tiny_clip
    )
    assert not r1.complete and r1.chunks_missing == 0
    merged = features.merge_parts(out)
    a, b = load_features(tmp_path / "single"), load_features(out)
    assert torch.equal(a.embeddings, b.embeddings) and a.records == b.records
    assert {s["image"] for s in merged.skipped} == {s["image"] for s in single.skipped} == {"text.jpg", "truncated.jpg"}
    assert features.read_skipped(out) == features.read_skipped(tmp_path / "single")
    assert len(b.meta["extraction"]["runs"]) == 2


def test_option_validation():
    with pytest.raises(UsageError):
        features.ExtractOptions(batch_size=0)
    with pytest.raises(UsageError):
        features.ExtractOptions(shard=(2, 2))
    assert shards.parse_shard("1/4") == (1, 4)
    for bad in ("1", "a/b", "4/4", "-1/2"):
        with pytest.raises(UsageError):
            shards.parse_shard(bad)


@pytest.mark.parametrize("when", ["before", "after"])
def test_concurrent_shard_with_other_settings_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str):
    """Two shards of one --out start together with different settings (another dataset and chunk
    size). Whatever the interleaving, one of them is refused, and the part files on disk are the
    other's alone: its settings with its records."""
    out = tmp_path / "f"
    ours = features.run_settings(
        _records(6), tmp_path, features.ExtractOptions(chunk_size=2, clip_pretrained=None), "float32", {}
    )
    theirs = features.run_settings(
        _records(5), tmp_path, features.ExtractOptions(chunk_size=3, clip_pretrained=None), "float32", {}
    )
    outcome: dict[str, str] = {}
    fired: list[Path] = []  # every part file written, by either shard

    def start(name: str, records: list[dict], settings: dict) -> None:
        try:
            extract_parts._prepare_parts(out, records, settings)
            outcome[name] = "ok"
        except UsageError as exc:
            outcome[name] = str(exc)

    def with_other_shard(write):
        """The other shard runs all its preparation just before (or after) our first file write."""

        def hooked(path, *args, **kwargs):
            first = not fired
            fired.append(path)
            if first and when == "before":
                start("other", _records(5), theirs)
            result = write(path, *args, **kwargs)
            if first and when == "after":
                start("other", _records(5), theirs)
            return result

        return hooked

    monkeypatch.setattr(extract_parts, "write_text_atomic", with_other_shard(extract_parts.write_text_atomic))
    monkeypatch.setattr(extract_parts, "create_exclusive", with_other_shard(extract_parts.create_exclusive))
    start("ours", _records(6), ours)

    results = [outcome["ours"], outcome["other"]]
    assert results.count("ok") == 1, results
    refused = next(r for r in results if r != "ok")
    assert "unfinished extraction with other settings" in refused
    winner = ours if outcome["ours"] == "ok" else theirs
    parts = out / features.PARTS_DIR
    assert json.loads((parts / features.SETTINGS_FILE).read_text()) == winner
    records = [json.loads(line) for line in (parts / features.RECORDS_FILE).read_text().splitlines()]
    assert extract_parts._sha256_json(records) == winner["records_sha256"]
