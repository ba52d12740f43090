"""store.py: the sharded features layout, and either layout read shard by shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLIP_CFG
from test_train import make_store

from clipcap_cli.data.features import FeaturesError, load_features
from clipcap_cli.data.store import SHARDS_DIR, open_store, save_sharded

D = TINY_CLIP_CFG["embed_dim"]


def make_sharded(folder: Path, clip_dir: Path, sizes=(3, 2, 4), per_image: int = 2, seed: int = 0) -> Path:
    """A sharded store: shard i holds sizes[i] images of per_image captions each."""
    g = torch.Generator().manual_seed(seed)
    meta = {"clip_model": f"local-dir:{clip_dir}", "clip_pretrained": None, "preprocess": "test"}
    shards, n = [], 0
    for size in sizes:
        records = [
            {
                "image": f"img/{n + i}.jpg",
                "image_id": n + i,
                "captions": [f"a dog {n + i} {j}." for j in range(per_image)],
            }
            for i in range(size)
        ]
        shards.append((torch.randn(size, D, generator=g).half(), records))
        n += size
    return save_sharded(folder, shards, meta)


def test_sharded_layout_and_reader(tmp_path, tiny_clip_dir):
    folder = make_sharded(tmp_path / "s", tiny_clip_dir)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format"] == "clipcap-features" and meta["format_version"] == 2
    assert [(s["name"], s["images"], s["captions"]) for s in meta["shards"]] == [
        ("shard-000000", 3, 6),
        ("shard-000001", 2, 4),
        ("shard-000002", 4, 8),
    ]
    assert sorted(p.name for p in (folder / SHARDS_DIR).iterdir())[:2] == [
        "shard-000000.jsonl",
        "shard-000000.safetensors",
    ]
    assert meta["count"] == 9 and meta["num_captions"] == 18 and meta["embed_dim"] == D
    store = open_store(folder)
    assert store.sharded and store.embed_dim == D and store.clip_model == f"local-dir:{tiny_clip_dir}"
    assert store.image_starts == [0, 3, 5, 9] and store.caption_starts == [0, 6, 10, 18]
    emb, records = store.read_shard(1)
    assert emb.shape == (2, D) and emb.dtype == torch.float16
    assert [r["image"] for r in records] == ["img/3.jpg", "img/4.jpg"]
    # load_features concatenates every shard, in order.
    fs = load_features(folder)
    assert len(fs) == 9 and torch.equal(fs.embeddings[3:5], emb) and fs.records[3:5] == records


def test_single_file_store_is_one_shard(tmp_path, tiny_clip_dir):
    folder = make_store(tmp_path / "f", tiny_clip_dir, n_images=5, per_image=2)
    store = open_store(folder)
    assert not store.sharded and len(store.shards) == 1
    assert (store.shards[0].images, store.shards[0].captions) == (5, 10)
    emb, records = store.read_shard(0)
    fs = load_features(folder)
    assert torch.equal(emb, fs.embeddings) and records == fs.records
    assert store.embeddings_sha256() and store.embeddings_sha256() == store.embeddings_sha256()


def test_the_embeddings_fingerprint_comes_from_meta_and_is_checked_on_read(tmp_path, tiny_clip_dir):
    from clipcap_cli.weights.fingerprint import file_sha256

    folder = make_sharded(tmp_path / "s", tiny_clip_dir)
    store = open_store(folder)
    assert all(s.embeddings_sha256 == file_sha256(store.shard_files(i)[0]) for i, s in enumerate(store.shards))
    before = store.embeddings_sha256()
    entries = json.loads((folder / "meta.json").read_text())["shards"]
    for e in entries:
        e.pop("embeddings_sha256")
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "shards": entries}))
    old = open_store(folder)  # a store without recorded hashes: the files are hashed, to the same fingerprint
    assert old.embeddings_sha256() == before and old.read_shard(1)[0].shape == (2, D)


@pytest.mark.parametrize("damage", ["missing-emb", "missing-index", "torn-emb", "edited-index", "wrong-rows"])
def test_a_damaged_shard_is_one_line_error(tmp_path, tiny_clip_dir, damage):
    folder = make_sharded(tmp_path / "s", tiny_clip_dir)
    shards = folder / SHARDS_DIR
    if damage == "missing-emb":
        (shards / "shard-000001.safetensors").unlink()
    elif damage == "missing-index":
        (shards / "shard-000001.jsonl").unlink()
    elif damage == "torn-emb":
        data = (shards / "shard-000001.safetensors").read_bytes()
        (shards / "shard-000001.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "edited-index":
        text = (shards / "shard-000001.jsonl").read_text().replace("dog", "cat")
        (shards / "shard-000001.jsonl").write_text(text)
    else:
        make_sharded(tmp_path / "other", tiny_clip_dir, sizes=(3, 3, 4))
        (tmp_path / "other" / SHARDS_DIR / "shard-000001.safetensors").replace(shards / "shard-000001.safetensors")
    store = open_store(folder)
    store.read_shard(0)  # the others are fine
    with pytest.raises(FeaturesError) as exc:
        store.read_shard(1)
    message = str(exc.value)
    assert "shard-000001" in message and "\n" not in message
    with pytest.raises(FeaturesError):
        load_features(folder)


def test_shards_of_another_clip_are_refused(tmp_path, tiny_clip_dir):
    folder = make_sharded(tmp_path / "s", tiny_clip_dir)
    other = save_sharded(
        tmp_path / "o",
        [(torch.randn(2, D).half(), [{"image": "x.jpg", "captions": ["a."]}, {"image": "y.jpg", "captions": ["b."]}])],
        {"clip_model": "ViT-B-32", "clip_pretrained": "openai", "clip_activation": "quickgelu", "preprocess": "test"},
    )
    (other / SHARDS_DIR / "shard-000000.safetensors").replace(folder / SHARDS_DIR / "shard-000001.safetensors")
    with pytest.raises(FeaturesError, match="different CLIPs cannot be mixed"):
        open_store(folder).read_shard(1)
    # ... and shards of different widths are never written as one store.
    meta = {"clip_model": f"local-dir:{tiny_clip_dir}", "clip_pretrained": None}
    with pytest.raises(FeaturesError, match="disagree"):
        save_sharded(
            tmp_path / "w",
            [
                (torch.randn(1, D), [{"image": "a", "captions": []}]),
                (torch.randn(1, D + 1), [{"image": "b", "captions": []}]),
            ],
            meta,
        )


def test_a_newer_format_and_a_bad_shard_list_are_refused(tmp_path, tiny_clip_dir):
    folder = make_sharded(tmp_path / "s", tiny_clip_dir)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(FeaturesError, match="reads up to 2"):
        open_store(folder)
    (folder / "meta.json").write_text(json.dumps({**meta, "shards": [{"name": "../x", "images": 1, "captions": 1}]}))
    with pytest.raises(FeaturesError, match="malformed"):
        open_store(folder)
