"""Dataset readers: every format on tiny generated files, grouping per image, path resolution, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clipcap_cli.data.datasets import DatasetError, normalize_id, read_dataset
from clipcap_cli.errors import UsageError


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (10, 20, 30)).save(path)
    return path


def _records(ds) -> list[dict]:
    return list(ds.records())


def test_coco_annotations_grouped_per_image_and_resolved_in_subfolders(tmp_path: Path):
    _img(tmp_path / "train2014" / "a.jpg")
    _img(tmp_path / "b.jpg")  # directly under the root
    ann = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"}, {"id": 9, "file_name": "c.jpg"}],
        "annotations": [
            {"image_id": 3, "caption": " b one "},
            {"image_id": 7, "caption": "a one"},
            {"image_id": 3, "caption": "b two"},
            {"image_id": 7, "caption": "a two"},
        ],
    }
    src = tmp_path / "annotations" / "captions_train2014.json"
    src.parent.mkdir()
    src.write_text(json.dumps(ann))
    ds = read_dataset(src, images=tmp_path)
    assert ds.format == "coco" and ds.images_root == tmp_path.resolve()
    assert _records(ds) == [
        {"image": "train2014/a.jpg", "image_id": 7, "captions": ["a one", "a two"]},
        {"image": "b.jpg", "image_id": 3, "captions": ["b one", "b two"]},
        {"image": "c.jpg", "image_id": 9, "captions": []},  # missing file: kept, skipped later at encoding
    ]


def test_karpathy_splits(tmp_path: Path):
    _img(tmp_path / "val2014" / "v.jpg")
    data = {
        "images": [
            {
                "filepath": "train2014",
                "filename": "t.jpg",
                "split": "train",
                "cocoid": 1,
                "sentences": [{"raw": "T1 ", "sentid": 10}, {"raw": "T2", "sentid": 11}],
            },
            {"filepath": "val2014", "filename": "v.jpg", "split": "restval", "cocoid": 2, "sentences": [{"raw": "R1"}]},
            {"filepath": "val2014", "filename": "w.jpg", "split": "val", "cocoid": 3, "sentences": [{"raw": "V1"}]},
            {"filepath": "val2014", "filename": "x.jpg", "split": "test", "cocoid": 4, "sentences": [{"raw": "X1"}]},
        ]
    }
    src = tmp_path / "dataset_coco.json"
    src.write_text(json.dumps(data))
    every = _records(read_dataset(src))
    assert [r["image_id"] for r in every] == [1, 2, 3, 4]
    assert every[0] == {
        "image": "train2014/t.jpg",
        "image_id": 1,
        "captions": ["T1", "T2"],
        "split": "train",
        "caption_ids": [10, 11],
    }
    assert every[1]["image"] == "val2014/v.jpg"
    assert [r["image_id"] for r in _records(read_dataset(src, split="train"))] == [1]
    assert [r["image_id"] for r in _records(read_dataset(src, split="train+restval"))] == [1, 2]
    assert [r["image_id"] for r in _records(read_dataset(src, split="test"))] == [4]
    with pytest.raises(UsageError, match="unknown split"):
        read_dataset(src, split="training")


def test_original_train_caption_list(tmp_path: Path):
    root = tmp_path / "coco"
    _img(root / "train2014" / "COCO_train2014_000000000042.jpg")
    _img(root / "val2014" / "COCO_val2014_000000000005.jpg")  # the original's val2014 fallback
    _img(root / "COCO_train2014_000000000077.jpg")  # flat layout
    entries = [
        {"image_id": 42, "caption": "first", "id": 1},
        {"image_id": "5", "caption": "val image", "id": 2},  # numeric string: int(), as the original
        {"image_id": 42, "caption": "second", "id": 3},
        {"image_id": 77, "caption": "flat", "id": 4},
    ]
    src = tmp_path / "train_caption.json"
    src.write_text(json.dumps(entries))
    ds = read_dataset(src, images=root)
    assert ds.format == "caption-list"
    assert _records(ds) == [
        {
            "image": "train2014/COCO_train2014_000000000042.jpg",
            "image_id": 42,
            "captions": ["first", "second"],
            "caption_ids": [1, 3],
        },
        {
            "image": "val2014/COCO_val2014_000000000005.jpg",
            "image_id": 5,
            "captions": ["val image"],
            "caption_ids": [2],
        },
        {"image": "COCO_train2014_000000000077.jpg", "image_id": 77, "captions": ["flat"], "caption_ids": [4]},
    ]


@pytest.mark.parametrize("fmt,sep,suffix", [("csv", ",", ".csv"), ("tsv", "\t", ".tsv")])
def test_csv_tsv_manifests(tmp_path: Path, fmt: str, sep: str, suffix: str):
    _img(tmp_path / "imgs" / "a.png")
    src = tmp_path / f"manifest{suffix}"
    rows = [["path", "caption"], ["imgs/a.png", "a cat"], ["imgs/b.png", "a dog"], ["imgs/a.png", "a cat, sitting"]]
    src.write_text("\n".join(sep.join(f'"{c}"' if sep in c else c for c in row) for row in rows) + "\n")
    ds = read_dataset(src)
    assert ds.format == fmt and ds.images_root == tmp_path.resolve()
    assert _records(ds) == [
        {"image": "imgs/a.png", "image_id": None, "captions": ["a cat", "a cat, sitting"]},
        {"image": "imgs/b.png", "image_id": None, "captions": ["a dog"]},
    ]


def test_csv_errors_name_the_column_and_line(tmp_path: Path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,text\nx.jpg,hi\n")
    with pytest.raises(DatasetError, match=r"bad.csv: no 'image' or 'path' column"):
        read_dataset(bad)
    bad.write_text("image,caption\nx.jpg,hi\ny.jpg,hi,extra\n")
    with pytest.raises(DatasetError, match=r"bad.csv line 3: more fields"):
        read_dataset(bad)
    bad.write_text("image,caption\n,hi\n")
    with pytest.raises(DatasetError, match=r"line 2: empty 'image'"):
        read_dataset(bad)


def test_jsonl_manifest(tmp_path: Path):
    src = tmp_path / "data.jsonl"
    lines = [
        {"image": "x.jpg", "caption": "one", "image_id": 5},
        {"image": "y.jpg", "captions": ["two", "three"]},
        {"path": str(tmp_path / "x.jpg"), "caption": "four"},  # absolute path under the root: same image
    ]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert _records(read_dataset(src)) == [
        {"image": "x.jpg", "image_id": 5, "captions": ["one", "four"]},
        {"image": "y.jpg", "image_id": None, "captions": ["two", "three"]},
    ]
    # JSON Lines saved with a .json suffix is detected too
    other = tmp_path / "data.json"
    other.write_text(src.read_text())
    assert read_dataset(other).format == "jsonl"

    src.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"data.jsonl line 2: invalid JSON"):
        read_dataset(src)
    src.write_text(json.dumps({"caption": "no image"}) + "\n")
    with pytest.raises(DatasetError, match=r"line 1: no 'image' or 'path' key"):
        read_dataset(src)


def test_folder_of_images(tmp_path: Path):
    _img(tmp_path / "b.jpg")
    _img(tmp_path / "a.png")
    _img(tmp_path / "sub" / "c.jpg")
    _img(tmp_path / ".hidden" / "d.jpg")
    (tmp_path / "notes.txt").write_text("x")
    flat = _records(read_dataset(tmp_path))
    assert [r["image"] for r in flat] == ["a.png", "b.jpg"]
    assert all(r["captions"] == [] and r["image_id"] is None for r in flat)
    deep = _records(read_dataset(tmp_path, recursive=True))
    assert [r["image"] for r in deep] == ["a.png", "b.jpg", "sub/c.jpg"]


def test_malformed_files_fail_with_one_clear_line(tmp_path: Path):
    src = tmp_path / "captions.json"
    src.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "text": "x"}]})
    )
    with pytest.raises(DatasetError, match=r"captions.json: annotation 0 has no 'caption' key"):
        read_dataset(src)
    src.write_text(json.dumps([{"image_id": 1, "caption": "x"}, {"caption": "y"}]))
    with pytest.raises(DatasetError, match=r"entry 1 has no 'image_id' key"):
        read_dataset(src)
    src.write_text(json.dumps({"foo": 1}))
    with pytest.raises(DatasetError, match="not a known layout"):
        read_dataset(src)
    src.write_text("{broken")
    with pytest.raises(DatasetError, match="invalid JSON"):
        read_dataset(src)
    other = tmp_path / "data.xml"
    other.write_text("<x/>")
    with pytest.raises(UsageError, match="give the dataset format"):
        read_dataset(other)
    with pytest.raises(UsageError, match="not found"):
        read_dataset(tmp_path / "nope.json")
    with pytest.raises(UsageError, match="--split applies to Karpathy"):
        read_dataset(tmp_path / "captions.json", split="train", fmt="caption-list")


def test_readers_never_open_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _img(tmp_path / "a.jpg")
    src = tmp_path / "m.csv"
    src.write_text("image,caption\na.jpg,x\n")

    def refuse(*args, **kwargs):
        raise AssertionError("a reader opened an image")

    monkeypatch.setattr(Image, "open", refuse)
    assert len(_records(read_dataset(src))) == 1
    assert len(_records(read_dataset(tmp_path))) == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (123, 123),
        (123.0, 123),
        ("123", 123),
        (" 0123 ", 123),  # whole numbers, however written
        ("1.0", "1.0"),
        (1.5, "1.5"),
        ("-1", "-1"),
        ("abc", "abc"),
        ("\u00b2", "\u00b2"),  # other text stays text
        (None, None),
        ("", None),
        ("  ", None),
        (True, None),  # no id
    ],
)
def test_image_ids_are_normalised_one_way(value, expected):
    got = normalize_id(value)
    assert got == expected and type(got) is type(expected)


def test_caption_list_ids_written_as_floats_are_integers(tmp_path: Path):
    """pandas writes an integer id column that has a gap as floats: 42.0 is image 42, as "42" is."""
    path = tmp_path / "train_caption.json"
    path.write_text(json.dumps([{"image_id": 42.0, "caption": "a"}, {"image_id": "42", "caption": "b"}]))
    records = _records(read_dataset(path))
    assert [(r["image_id"], r["captions"]) for r in records] == [(42, ["a", "b"])]
    path.write_text(json.dumps([{"image_id": "", "caption": "a"}]))
    with pytest.raises(DatasetError, match="entry 0 has an empty image_id"):
        _records(read_dataset(path))
