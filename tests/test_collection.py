"""A user's own collection: sidecar caption folders, webdataset shards, and the cached store `train DATA` makes."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from clipcap_cli.data import collection, tars
from clipcap_cli.data.datasets import read_dataset
from clipcap_cli.data.features import ExtractOptions
from clipcap_cli.data.images import open_rgb
from clipcap_cli.errors import UsageError


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, members: dict[str, bytes | str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            raw = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_sidecar_folder_pairs_images_with_their_caption_files(tmp_path: Path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255)), ("d", (9, 9, 9))):
        (folder / f"{name}.png").write_bytes(_png(colour))
    (folder / "a.txt").write_text("a red square\n\n  a red thing  \n")  # two captions, blank line dropped
    (folder / "b.caption").write_text("a green square")
    (folder / "c.txt").write_text("\n \n")  # empty: counted, not fatal
    (folder / "orphan.txt").write_text("a caption with no image")
    (folder / ".hidden.png").write_bytes(_png((1, 1, 1)))  # hidden files are not part of the collection

    ds = read_dataset(folder)
    records = {Path(r["image"]).name: r["captions"] for r in ds.records()}
    assert records == {"a.png": ["a red square", "a red thing"], "b.png": ["a green square"], "c.png": [], "d.png": []}
    assert ds.unpaired.no_caption == ["d.png"]
    assert ds.unpaired.no_image == ["orphan.txt"]
    assert ds.unpaired.empty_caption == ["c.txt"]

    coll = collection.read_collection([folder])
    assert sorted(Path(r["image"]).name for r in coll.records) == ["a.png", "b.png"]
    assert all(Path(r["image"]).is_absolute() for r in coll.records)
    assert coll.captions == 3
    assert coll.unpaired.counts() == {
        "images without captions": 1,
        "captions without images": 1,
        "empty caption files": 1,
    }


def test_webdataset_shard_pairs_by_key_and_reads_images_at_their_offsets(tmp_path: Path):
    shard = _tar(
        tmp_path / "train-000.tar",
        {
            "x/0001.jpg": _png((255, 0, 0)),  # (PNG bytes under .jpg: Pillow reads by content)
            "x/0001.txt": "a red square",
            "x/0002.png": _png((0, 255, 0)),
            "x/0002.json": json.dumps({"caption": "a green square", "width": 8}),
            "x/0003.png": _png((0, 0, 255)),  # no caption: skipped and reported
            "x/0004.txt": "a caption without an image",
            "x/0005.png": _png((5, 5, 5)),
            "x/0005.txt": "",  # empty caption
            "x/0006.seg.png": _png((7, 7, 7)),  # the key stops at the first dot of the file name
            "x/0006.txt": "first caption\nsecond caption",
        },
    )
    ds = read_dataset(shard)
    assert ds.format == "webdataset"
    by_key = {r["image_id"]: r for r in ds.records()}
    assert {k: r["captions"] for k, r in by_key.items()} == {
        "x/0001": ["a red square"],
        "x/0002": ["a green square"],
        "x/0003": [],
        "x/0005": [],
        "x/0006": ["first caption", "second caption"],
    }
    assert ds.unpaired.no_caption == ["train-000.tar::x/0003"]
    assert ds.unpaired.no_image == ["train-000.tar::x/0004"]
    assert ds.unpaired.empty_caption == ["train-000.tar::x/0005"]

    green = open_rgb(str(ds.images_root / by_key["x/0002"]["image"]))  # the real image pipeline's opener
    assert green.getpixel((3, 3)) == (0, 255, 0)
    assert open_rgb(tars.location(shard, "x/0006.seg.png")).getpixel((0, 0)) == (7, 7, 7)

    coll = collection.read_collection([shard])
    assert sorted(r["image_id"] for r in coll.records) == ["x/0001", "x/0002", "x/0006"]


def test_shards_by_brace_range_and_glob(tmp_path: Path):
    for i in range(3):
        _tar(tmp_path / f"s-{i:03d}.tar", {f"{i}.png": _png((i, i, i)), f"{i}.txt": f"caption {i}"})
    by_range = collection.read_collection([str(tmp_path / "s-{000..002}.tar")])
    by_glob = collection.read_collection([str(tmp_path / "s-*.tar")])
    assert [r["captions"] for r in by_range.records] == [["caption 0"], ["caption 1"], ["caption 2"]]
    assert [r["image"] for r in by_glob.records] == [r["image"] for r in by_range.records]
    assert tars.expand(str(tmp_path / "s-{000,002}.tar")) == [tmp_path / "s-000.tar", tmp_path / "s-002.tar"]

    with pytest.raises(UsageError, match=r"shard .*s-003.tar not found"):
        tars.expand(str(tmp_path / "s-{000..003}.tar"))
    (tmp_path / "z.tar.gz").write_bytes(b"")
    with pytest.raises(UsageError, match="decompress it first"):
        read_dataset(tmp_path / "z.tar.gz")
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar" * 100)
    with pytest.raises(UsageError, match="bad.tar: not a readable tar"):
        read_dataset(tmp_path / "bad.tar")


def test_a_member_missing_from_its_shard_is_an_image_error(tmp_path: Path):
    from clipcap_cli.data.images import ImageError

    shard = _tar(tmp_path / "s.tar", {"1.png": _png((1, 2, 3))})
    with pytest.raises(ImageError, match="2.png is not in"):
        open_rgb(tars.location(shard, "2.png"))


def test_collection_merges_sources_and_refuses_one_without_captions(tmp_path: Path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png((1, 1, 1)))
    (folder / "a.txt").write_text("one")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"image": "f/a.png", "caption": "two"}) + "\n" + json.dumps({"image": "f/b.png"}) + "\n"
    )
    coll = collection.read_collection([folder, manifest])
    assert [r["captions"] for r in coll.records] == [["one", "two"]]  # the same image once, all its captions
    assert coll.unpaired.no_caption == ["f/b.png"]

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "x.png").write_bytes(_png((2, 2, 2)))
    with pytest.raises(UsageError, match="no captioned images in .*bare: put each image's captions beside it"):
        collection.read_collection([bare])


def test_the_cache_key_follows_the_data_and_the_clip(tmp_path: Path, tiny_clip_dir: Path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png((1, 1, 1)))
    (folder / "a.txt").write_text("one")
    opts = ExtractOptions(clip_model=f"local-dir:{tiny_clip_dir}", clip_pretrained=None)
    key = collection.collection_key(collection.read_collection([folder]).records, opts)
    assert collection.collection_key(collection.read_collection([folder]).records, opts) == key

    (folder / "a.png").write_bytes(_png((200, 1, 1)))  # the same name, other pixels
    st = (folder / "a.png").stat()
    os.utime(folder / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = collection.collection_key(collection.read_collection([folder]).records, opts)
    assert changed != key
    (folder / "a.txt").write_text("two")
    assert collection.collection_key(collection.read_collection([folder]).records, opts) != changed
    other_clip = ExtractOptions(clip_model="RN50", clip_pretrained=None)
    assert collection.collection_key(collection.read_collection([folder]).records, other_clip) != changed


def _captioned_folder(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i}.png").write_bytes(_png((40 * i, 0, 0)))
        (folder / f"{i}.txt").write_text(f"a photo number {i}\n")
    return folder


def _train_args(tmp_path: Path, tiny_clip_dir: Path, tiny_gpt2_dir: Path, out: str) -> list[str]:
    return [
        "--out", str(tmp_path / out), "--clip", f"local-dir:{tiny_clip_dir}", "--gpt2", str(tiny_gpt2_dir),
        "--features", str(tmp_path / "stores"), "--epochs", "1", "--batch-size", "2", "--prefix-length", "2",
        "--warmup", "1", "--val-fraction", "0",
    ]  # fmt: skip


def test_train_from_images_reports_caches_and_refuses_changed_data_on_resume(
    tmp_path: Path, tiny_clip_dir: Path, tiny_gpt2_dir: Path
):
    from typer.testing import CliRunner

    from clipcap_cli.cli.app import app

    runner = CliRunner()
    photos = _captioned_folder(tmp_path / "photos")
    (photos / "extra.png").write_bytes(_png((1, 2, 3)))  # no caption
    (photos / "lost.txt").write_text("no image for me")

    first = runner.invoke(app, ["train", str(photos), *_train_args(tmp_path, tiny_clip_dir, tiny_gpt2_dir, "run")])
    assert first.exit_code == 0, first.output
    assert "6 captioned images, 6 captions" in first.stderr
    assert "skipped 1 images without captions, 1 captions without images" in " ".join(first.stderr.split())
    listed = json.loads((tmp_path / "run" / "unpaired-training.json").read_text())
    assert listed["no_caption"] == ["extra.png"] and listed["no_image"] == ["lost.txt"]
    stores = list((tmp_path / "stores").iterdir())
    assert len(stores) == 1 and (stores[0] / "meta.json").is_file()
    from clipcap_cli.data.store import open_store

    assert open_store(stores[0]).sharded  # streamed a few shards at a time, however large the collection
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert Path(config["data"]) == stores[0].resolve()

    # A second run on the same data encodes nothing: the store is reused.
    second = runner.invoke(app, ["train", str(photos), *_train_args(tmp_path, tiny_clip_dir, tiny_gpt2_dir, "run2")])
    assert second.exit_code == 0, second.output
    assert "reusing" in second.stderr and "encoding" not in second.stderr
    assert len(list((tmp_path / "stores").iterdir())) == 1

    # The same names with other pixels: another store, and the run refuses to resume on it.
    (photos / "0.png").write_bytes(_png((0, 0, 250)))
    st = (photos / "0.png").stat()
    os.utime(photos / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    resumed = runner.invoke(
        app, ["train", str(photos), "--out", str(tmp_path / "run"), "--resume",
              "--clip", f"local-dir:{tiny_clip_dir}", "--features", str(tmp_path / "stores")],
    )  # fmt: skip
    assert resumed.exit_code == 2, resumed.output
    assert len(list((tmp_path / "stores").iterdir())) == 2
    assert "changed since this run started" in resumed.stderr.strip().splitlines()[-1]


def test_train_data_mistakes_are_one_line_errors(tmp_path: Path, tiny_clip_dir: Path, tiny_gpt2_dir: Path, monkeypatch):
    from typer.testing import CliRunner

    from clipcap_cli.cli.app import app

    runner = CliRunner()
    photos = _captioned_folder(tmp_path / "photos", n=3)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "x.png").write_bytes(_png((1, 1, 1)))
    store = tmp_path / "store"
    store.mkdir()
    (store / "meta.json").write_text("{}")
    args = _train_args(tmp_path, tiny_clip_dir, tiny_gpt2_dir, "run")

    cases = {
        "no captioned images in": [str(bare)],
        "give one features store": [str(store), str(photos)],
        "no shard matches": [str(tmp_path / "none-*.tar")],
    }
    for message, data in cases.items():
        result = runner.invoke(app, ["train", *data, *args])
        assert result.exit_code == 2 and message in result.stderr, (message, result.output)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_extract_reads_webdataset_shards(tmp_path: Path, tiny_clip_dir: Path):
    from typer.testing import CliRunner

    from clipcap_cli.cli.app import app
    from clipcap_cli.data.features import load_features

    for i in range(2):
        _tar(
            tmp_path / f"s-{i}.tar",
            {f"{i}a.png": _png((i, 0, 0)), f"{i}a.txt": f"caption {i}a", f"{i}b.png": _png((0, i, 0))},
        )
    result = CliRunner().invoke(
        app,
        ["extract", str(tmp_path / "s-{0..1}.tar"), "--out", str(tmp_path / "store"),
         "--clip", f"local-dir:{tiny_clip_dir}", "--workers", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 images without captions" in result.stderr
    fs = load_features(tmp_path / "store")
    assert [(r["image_id"], r["captions"]) for r in fs.records] == [
        ("0a", ["caption 0a"]),
        ("0b", []),
        ("1a", ["caption 1a"]),
        ("1b", []),
    ]
    assert fs.embeddings.shape[0] == 4 and fs.meta["dataset_format"] == "webdataset"


def test_a_caption_file_without_from_text_and_a_source_without_captions_with_it(tmp_path: Path):
    from clipcap_cli.data.text_features import TextExtractOptions

    lines = tmp_path / "captions.txt"
    lines.write_text("a cat.\n")
    with pytest.raises(UsageError, match="captions.txt is a text file: to train on captions alone .* add --from-text"):
        collection.read_collection([lines])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "x.png").write_bytes(_png((1, 1, 1)))
    with pytest.raises(UsageError, match="no captions in .*bare: nothing to train on"):  # before any CLIP is loaded
        collection.encode_captions([bare], TextExtractOptions(clip_model="ViT-B-32", clip_pretrained="openai"))


def test_processes_of_a_job_encode_their_shares_and_the_first_joins_them(tmp_path: Path, tiny_clip_dir: Path):
    """What `train DATA` does under torchrun: process i encodes chunks c % n == i; process 0 writes the
    store once every share is there; the others wait for it. The store equals one process's."""
    import threading

    import torch

    from clipcap_cli.data.features import load_features

    coll = collection.read_collection([_captioned_folder(tmp_path / "photos", n=7)])
    opts = ExtractOptions(clip_model=f"local-dir:{tiny_clip_dir}", clip_pretrained=None, workers=0, device="cpu")
    alone = collection.encode_collection(coll, replace(opts, shard_size=2), stores=tmp_path / "one")
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def process(i: int) -> None:
        try:
            part = replace(opts, shard_size=2, shard=(i, 2))
            results[i] = collection.encode_collection(coll, part, stores=tmp_path / "two", poll=0.05)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=process, args=(i,)) for i in (1, 0)]  # the waiting one starts first
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and all(r.complete for r in results.values()), (errors, results)
    together, single = load_features(results[0].out), load_features(alone.out)
    assert results[0].out.name == alone.out.name  # the same key: the same data and CLIP
    assert torch.equal(together.embeddings, single.embeddings) and together.records == single.records


def test_text_stores_are_encoded_by_the_first_process_while_the_others_wait(tmp_path: Path, tiny_clip_dir: Path):
    import threading

    from clipcap_cli.data.text_features import TextExtractOptions

    lines = tmp_path / "captions.txt"
    lines.write_text("a red square.\na blue circle.\n")
    opts = TextExtractOptions(clip_model=f"local-dir:{tiny_clip_dir}", clip_pretrained=None, device="cpu")
    results: dict[int, object] = {}

    def process(rank: int) -> None:
        results[rank] = collection.encode_captions([lines], opts, stores=tmp_path / "s", place=(rank, 2), poll=0.05)

    waiting = threading.Thread(target=process, args=(1,))
    waiting.start()
    process(0)
    waiting.join(timeout=60)
    assert not results[0].noop and results[1].noop and results[0].out == results[1].out  # encoded once
    assert results[1].captions == 2


def test_the_dataset_format_option_names_every_format_the_readers_take():
    """Declared once for extract and train (commands/options.py); its help must not drift from datasets.FORMATS."""
    from typing import get_args

    from clipcap_cli.cli.commands.options import DatasetFormatOption
    from clipcap_cli.data.datasets import FORMATS

    help_text = get_args(DatasetFormatOption)[1].help
    assert [f for f in FORMATS if f not in help_text] == []
