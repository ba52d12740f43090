"""Hostile datasets: duplicate ids and images are resolved or refused by name, never silently
dropped; a file that is not UTF-8 or not JSON is named, with its line, in one line (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_extract_cli import _clip, _coco_dataset
from typer.testing import CliRunner

from clipcap_cli.cli.app import app
from clipcap_cli.data.datasets import DatasetError, read_dataset
from clipcap_cli.data.features import load_features

runner = CliRunner()


def _coco(tmp_path: Path, images: list[dict], anns: list[dict]) -> Path:
    src = _coco_dataset(tmp_path / "coco", n=3)
    src.write_text(json.dumps({"images": images, "annotations": anns}))
    return src


def _name(i: int) -> str:
    return f"COCO_train2014_{i:012d}.jpg"


def test_coco_id_naming_two_files_is_refused_with_both_names(tmp_path):
    src = _coco(
        tmp_path,
        [{"id": 1, "file_name": _name(1)}, {"id": 1, "file_name": _name(2)}, {"id": 3, "file_name": _name(3)}],
        [{"image_id": 1, "caption": "one"}, {"image_id": 3, "caption": "three"}],
    )
    result = runner.invoke(
        app, ["extract", str(src), "--images", str(tmp_path / "coco"), "--out", str(tmp_path / "f"), "-q"]
    )
    assert result.exit_code == 2
    assert "image id 1 names two files" in result.stderr and _name(1) in result.stderr and _name(2) in result.stderr
    assert not (tmp_path / "f").exists()


def test_coco_image_listed_twice_is_one_record_with_all_captions(tmp_path, tiny_clip_dir):
    src = _coco(
        tmp_path,
        [
            {"id": 1, "file_name": _name(1)},
            {"id": 1, "file_name": _name(1)},
            {"id": 7, "file_name": _name(1)},
            {"id": 2, "file_name": _name(2)},
        ],
        [{"image_id": 1, "caption": "a"}, {"image_id": 7, "caption": "b"}, {"image_id": 2, "caption": "c"}],
    )
    records = list(read_dataset(src, tmp_path / "coco").records())
    assert [(r["image"], r["captions"]) for r in records] == [
        (f"train2014/{_name(1)}", ["a", "b"]),
        (f"train2014/{_name(2)}", ["c"]),
    ]
    out = tmp_path / "feats"
    result = runner.invoke(
        app, ["extract", str(src), "--images", str(tmp_path / "coco"), "--out", str(out), *_clip(tiny_clip_dir)]
    )
    assert result.exit_code == 0, result.output
    store = load_features(out)
    assert sorted(c for r in store.records for c in r["captions"]) == ["a", "b", "c"]


@pytest.mark.parametrize("kind", ["csv", "jsonl", "caption-list"])
def test_one_id_for_two_images_in_manifests_is_refused(tmp_path, kind):
    if kind == "csv":
        src = tmp_path / "m.csv"
        src.write_text("image,caption,image_id\na.jpg,x,5\nb.jpg,y,5\n")
        where = "line 3"
    elif kind == "jsonl":
        src = tmp_path / "m.jsonl"
        src.write_text(
            '{"image": "a.jpg", "caption": "x", "image_id": 5}\n{"image": "b.jpg", "caption": "y", "image_id": 5}\n'
        )
        where = "line 2"
    else:
        src = tmp_path / "list.json"
        src.write_text(
            json.dumps(
                [{"image_id": 5, "caption": "x", "image": "a.jpg"}, {"image_id": 5, "caption": "y", "image": "b.jpg"}]
            )
        )
        where = "entry 1"
    with pytest.raises(DatasetError, match=f"{where}.*image id 5 names two files, a.jpg and b.jpg"):
        list(read_dataset(src, tmp_path, fmt=kind).records())


def test_the_same_manifest_image_twice_keeps_every_caption(tmp_path):
    src = tmp_path / "m.csv"
    src.write_text("image,caption,image_id\na.jpg,x,5\nb.jpg,z,6\na.jpg,y,5\n")
    records = list(read_dataset(src, tmp_path).records())
    assert [(r["image"], r["captions"]) for r in records] == [("a.jpg", ["x", "y"]), ("b.jpg", ["z"])]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, suffix):
    src = tmp_path / f"data{suffix}"
    body = {
        ".csv": b"image,caption\na.jpg,ok\nb.jpg,caf\xe9\n",
        ".jsonl": b'{"image": "a.jpg", "caption": "ok"}\n{"image": "b.jpg", "caption": "caf\xe9"}\n',
        ".json": b'[{"image_id": 1,\n "caption": "caf\xe9"}]',
    }[suffix]
    src.write_bytes(body)
    result = runner.invoke(app, ["extract", str(src), "--out", str(tmp_path / "f"), "-q"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    bad_line = 3 if suffix == ".csv" else 2  # the CSV's header is line 1
    assert f"data{suffix} line {bad_line} is not UTF-8 (byte 0xe9" in line and "save the file as UTF-8" in line


def test_malformed_json_names_the_file_and_what_to_do(tmp_path):
    src = tmp_path / "data.json"
    src.write_text('{"images": [1, 2,]')
    result = runner.invoke(app, ["extract", str(src), "--out", str(tmp_path / "f"), "-q"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "data.json" in line and "invalid JSON" in line and "line 1" in line
