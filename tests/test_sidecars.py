"""`clipcap caption --sidecar`: caption files beside images or in a mirrored tree, the four modes for
existing files, exclusive creation, resume by skipping, and the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipcap_cli.cli.app import app

runner = CliRunner()
FAST = ["--max-length", "6"]


def caption(ckpt: Path, *args: str):
    return runner.invoke(app, ["caption", "--model", str(ckpt), *FAST, *args])


def records(result) -> dict[str, str]:
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return {Path(r["path"]).name: r["caption"] for r in rows}


def make_tree(root: Path) -> Path:
    """photos/a.jpg, photos/b.png, photos/sub/c.jpg (three different images)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    (root / "photos" / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.png", "sub/c.jpg"):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8), "RGB").save(root / "photos" / name)
    return root / "photos"


@pytest.fixture
def photos(tmp_path) -> Path:
    return make_tree(tmp_path)


def test_caption_files_beside_each_image_with_prefix_and_suffix(tiny_checkpoint, photos):
    result = caption(tiny_checkpoint, str(photos), "-r", "--sidecar", ".txt", "--prefix", "sks, ", "--suffix", " END")
    assert result.exit_code == 0, result.output
    caps = records(result)
    assert set(caps) == {"a.jpg", "b.png", "c.jpg"}  # stdout keeps the records
    for image in ("a.jpg", "b.png", "sub/c.jpg"):
        text = (photos / image).with_suffix(".txt").read_text(encoding="utf-8")
        assert text == f"sks, {caps[Path(image).name]} END"
    assert "caption files: 3 written, 0 skipped, 0 failed" in result.stderr


def test_skip_is_the_default_and_a_rerun_resumes(tiny_checkpoint, photos):
    (photos / "a.txt").write_text("hand-written", encoding="utf-8")
    first = caption(tiny_checkpoint, str(photos), "-r", "--sidecar", ".txt")
    assert first.exit_code == 0, first.output
    assert (photos / "a.txt").read_text(encoding="utf-8") == "hand-written"  # untouched
    assert set(records(first)) == {"b.png", "c.jpg"}  # a.jpg was not even captioned
    assert "2 written, 1 skipped" in first.stderr
    again = caption(tiny_checkpoint, str(photos), "-r", "--sidecar", ".txt")
    assert again.exit_code == 0, again.output
    assert records(again) == {}  # everything is written: nothing to caption
    assert "0 written, 3 skipped" in again.stderr


@pytest.mark.parametrize("mode", ["overwrite", "append", "prepend"])
def test_modes_for_an_existing_file(tiny_checkpoint, photos, mode):
    (photos / "a.txt").write_text("old words\n", encoding="utf-8")
    result = caption(tiny_checkpoint, str(photos / "a.jpg"), "--sidecar", ".txt", "--sidecar-exists", mode)
    assert result.exit_code == 0, result.output
    new = records(result)["a.jpg"]
    expected = {"overwrite": new, "append": f"old words {new}", "prepend": f"{new} old words"}[mode]
    assert (photos / "a.txt").read_text(encoding="utf-8") == expected
    assert "1 written, 0 skipped" in result.stderr


def test_sidecar_dir_mirrors_the_tree(tiny_checkpoint, photos, tmp_path):
    out = tmp_path / "captions"
    result = caption(tiny_checkpoint, str(photos), "-r", "--sidecar-dir", str(out), "--sidecar", ".caption")
    assert result.exit_code == 0, result.output
    caps = records(result)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "a.caption",
        "b.caption",
        "sub/c.caption",
    ]
    assert (out / "sub" / "c.caption").read_text(encoding="utf-8") == caps["c.jpg"]
    assert not list(photos.rglob("*.caption"))  # nothing beside the images


def test_a_file_created_after_the_check_is_not_clobbered(photos):
    from clipcap_cli.cli.sidecar_out import SidecarOptions, Sidecars
    from clipcap_cli.data import inputs

    sources = inputs.collect([str(photos)], recursive=True)
    files = Sidecars.plan(SidecarOptions(), sources, [str(photos)])
    todo = files.pending(sources)
    assert len(todo) == 3
    (photos / "a.txt").write_text("another run wrote this", encoding="utf-8")  # between check and write
    a = next(s for s in todo if s.name.endswith("a.jpg"))
    assert files.write(a, "my caption") is None
    assert (photos / "a.txt").read_text(encoding="utf-8") == "another run wrote this"
    assert (files.counts.written, files.counts.skipped) == (0, 1)
    b = next(s for s in todo if s.name.endswith("b.png"))
    files.write(b, "my caption")
    assert (photos / "b.txt").read_text(encoding="utf-8") == "my caption"
    assert not [p for p in photos.iterdir() if p.name.endswith(".tmp")]  # no temporary files left


def test_failed_images_are_counted_and_exit_3(tiny_checkpoint, photos):
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    result = caption(tiny_checkpoint, str(photos), "--sidecar", ".txt")
    assert result.exit_code == 3, result.output
    assert "2 written, 0 skipped, 1 failed" in result.stderr
    assert not (photos / "broken.txt").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prefix", "x"], "only with --sidecar"),
        (["--sidecar", ".png"], "image extension"),
        (["--sidecar", "txt"], "starts with a dot"),
        (["--sidecar", ".txt", "--sidecar-exists", "merge"], "choose one of skip"),
        (["--sidecar", ".txt", "--output-dir", "out"], "not with --output-dir"),
    ],
)
def test_bad_sidecar_options_are_usage_errors(tiny_checkpoint, photos, args, message):
    result = caption(tiny_checkpoint, str(photos), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not list(photos.glob("*.txt"))


def test_urls_are_refused(tiny_checkpoint):
    result = caption(tiny_checkpoint, "http://127.0.0.1:9/x.jpg", "--sidecar", ".txt")
    assert result.exit_code == 2, result.output
    assert "not for URLs" in result.stderr
