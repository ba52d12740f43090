"""`clipcap caption` end to end on the tiny checkpoint: inputs, formats, errors, exit codes, URLs."""

from __future__ import annotations

import csv
import functools
import http.server
import io
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import make_images
from typer.testing import CliRunner

from clipcap_cli.cli.app import app

runner = CliRunner()
FAST = ["--max-length", "6"]


def caption(ckpt: Path, *args: str, input: str | None = None):
    return runner.invoke(app, ["caption", "--model", str(ckpt), *FAST, *args], input=input)


def jsonl(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """Seven readable images in every mode, plus a nested folder with two more."""
    folder = tmp_path_factory.mktemp("photos")
    make_images(folder)
    nested = folder / "sub" / "deeper"
    nested.mkdir(parents=True)
    shutil.copy(folder / "rgb.jpg", nested / "copy.jpg")
    shutil.copy(folder / "gray.png", folder / "sub" / "copy.png")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    return folder


TOP = ["cmyk.jpg", "exif.jpg", "gray.png", "gray16.png", "palette.png", "rgb.jpg", "rgba.png"]


# --------------------------------------------------------------------------- formats


def test_jsonl_is_the_default_in_a_pipe(tiny_checkpoint, photo_dir):
    result = caption(tiny_checkpoint, str(photo_dir))
    assert result.exit_code == 0, result.output
    records = jsonl(result)
    assert [Path(r["path"]).name for r in records] == TOP  # sorted, notes.txt and subfolders left out
    for r in records:
        assert set(r) == {"path", "caption", "score", "error"}
        assert r["error"] is None and isinstance(r["caption"], str) and r["caption"] and isinstance(r["score"], float)
    assert "captioned 7 of 7" in result.stderr


@pytest.mark.parametrize("fmt", ["json", "csv", "text", "table"])
def test_other_formats_parse_and_hold_every_input(tiny_checkpoint, photo_dir, fmt):
    base = jsonl(caption(tiny_checkpoint, str(photo_dir)))
    expected = {r["path"]: r["caption"] for r in base}
    result = caption(tiny_checkpoint, str(photo_dir), "--format", fmt)
    assert result.exit_code == 0, result.output
    if fmt == "json":
        got = {r["path"]: r["caption"] for r in json.loads(result.stdout)}
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        assert list(rows[0]) == ["path", "caption", "score", "error"]
        got = {r["path"]: r["caption"] for r in rows}
    elif fmt == "text":
        got = dict(line.split("\t", 1) for line in result.stdout.splitlines())
    else:
        assert all(Path(p).name in result.stdout for p in expected)
        return
    assert got == expected


def test_json_shortcut_and_format_conflicts(tiny_checkpoint, photo_dir):
    result = caption(tiny_checkpoint, str(photo_dir / "rgb.jpg"), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["path"].endswith("rgb.jpg")
    conflict = caption(tiny_checkpoint, str(photo_dir / "rgb.jpg"), "--json", "--format", "csv")
    assert conflict.exit_code == 2 and "conflicting output formats" in conflict.stderr


def test_output_file_is_written(tiny_checkpoint, photo_dir, tmp_path):
    target = tmp_path / "out" / "captions.csv"
    result = caption(tiny_checkpoint, str(photo_dir), "--output", str(target))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    rows = list(csv.DictReader(target.open()))  # the format follows the suffix
    assert [Path(r["path"]).name for r in rows] == TOP
    assert not list(target.parent.glob(".*.tmp"))  # no temp file left behind
    table = caption(tiny_checkpoint, str(photo_dir), "--output", str(tmp_path / "x.txt"), "--format", "table")
    assert table.exit_code == 2


# --------------------------------------------------------------------------- inputs


def test_recursive_folder(tiny_checkpoint, photo_dir):
    records = jsonl(caption(tiny_checkpoint, str(photo_dir), "--recursive"))
    names = [str(Path(r["path"]).relative_to(photo_dir)) for r in records]
    assert names == sorted(TOP + ["sub/copy.png", "sub/deeper/copy.jpg"])
    by_name = {str(Path(r["path"]).relative_to(photo_dir)): r["caption"] for r in records}
    assert by_name["sub/deeper/copy.jpg"] == by_name["rgb.jpg"]  # same pixels, same caption


def test_stdin_paths(tiny_checkpoint, photo_dir):
    lines = f"{photo_dir / 'rgb.jpg'}\n\n{photo_dir / 'gray.png'}\n"
    result = caption(tiny_checkpoint, "-", input=lines)
    assert result.exit_code == 0, result.output
    assert [Path(r["path"]).name for r in jsonl(result)] == ["rgb.jpg", "gray.png"]


def test_quoted_glob_is_expanded(tiny_checkpoint, photo_dir):
    result = caption(tiny_checkpoint, f"{photo_dir}/*.png", f"{photo_dir}/**/copy.*")
    assert result.exit_code == 0, result.output
    names = [str(Path(r["path"]).relative_to(photo_dir)) for r in jsonl(result)]
    assert names == ["gray.png", "gray16.png", "palette.png", "rgba.png", "sub/copy.png", "sub/deeper/copy.jpg"]


def test_bad_inputs_become_error_records_exit_3(tiny_checkpoint, photo_dir, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not really a jpeg")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    args = [
        str(photo_dir / "rgb.jpg"),
        str(broken),
        str(tmp_path / "missing.png"),
        str(empty_dir),
        f"{tmp_path}/*.webp",
        str(photo_dir / "gray.png"),
    ]
    result = caption(tiny_checkpoint, *args, "--batch-size", "2")
    assert result.exit_code == 3, result.output
    records = jsonl(result)
    assert [r["path"] for r in records] == args  # order kept, one record per input
    errors = {Path(r["path"]).name: r["error"] for r in records}
    assert errors["rgb.jpg"] is None and errors["gray.png"] is None
    assert "not an image" in errors["broken.jpg"] or "unreadable" in errors["broken.jpg"]
    assert errors["missing.png"] == "no such file or directory"
    assert "no images in this folder" in errors["empty"]
    assert "no image files match" in errors["*.webp"]
    assert all(r["caption"] is None for r in records if r["error"])
    assert "missing.png: no such file or directory" in result.stderr and "4 failed" in result.stderr
    quiet = caption(tiny_checkpoint, *args, "--quiet")
    assert quiet.exit_code == 3 and quiet.stderr == "" and len(jsonl(quiet)) == len(args)


def test_no_inputs_is_a_usage_error(tiny_checkpoint):
    result = caption(tiny_checkpoint)
    assert result.exit_code == 2 and "no inputs" in result.stderr
    assert caption(tiny_checkpoint, "-", input="\n\n").exit_code == 2


def test_missing_registry_model_offline_is_fatal_one_line(photo_dir):
    result = runner.invoke(app, ["caption", "--model", "coco", str(photo_dir / "rgb.jpg")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "coco" in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--beam", "3", "--sample"], "alternatives"),
        (["--top-p", "0.5"], "for sampling only: add --sample"),
        (["--num-captions", "2"], "greedy decoding gives one caption"),
        (["--beam", "2", "--num-captions", "3"], "cannot exceed --beam"),
        (["--batch-size", "0"], "--batch-size"),
        (["--format", "yaml"], "unknown output format"),
    ],
)
def test_bad_options_exit_2(tiny_checkpoint, photo_dir, args, message):
    result = caption(tiny_checkpoint, str(photo_dir / "rgb.jpg"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- URLs


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def web(photo_dir, monkeypatch):
    """A local HTTP server over the photo folder (URL inputs need the network allowed)."""
    (photo_dir / "page.html").write_text("<html>not an image</html>")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(photo_dir))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.delenv("CLIPCAP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_inputs(tiny_checkpoint, photo_dir, web):
    urls = [f"{web}/rgb.jpg", f"{web}/nothing-here.jpg", f"{web}/page.html"]
    result = caption(tiny_checkpoint, *urls, str(photo_dir / "rgb.jpg"))
    assert result.exit_code == 3, result.output
    records = jsonl(result)
    assert [r["path"] for r in records[:3]] == urls
    assert records[0]["error"] is None and records[0]["caption"] == records[3]["caption"]
    assert records[1]["error"].startswith("HTTP 404")
    assert "Content-Type text/html" in records[2]["error"]


def test_urls_are_not_fetched_offline(tiny_checkpoint, web, monkeypatch):
    monkeypatch.setenv("CLIPCAP_OFFLINE", "1")
    result = caption(tiny_checkpoint, f"{web}/rgb.jpg")
    assert result.exit_code == 3 and "offline" in jsonl(result)[0]["error"]


# --------------------------------------------------------------------------- decoding through the CLI


def test_num_captions_with_beam(tiny_checkpoint, photo_dir):
    result = caption(
        tiny_checkpoint, str(photo_dir / "rgb.jpg"), str(photo_dir / "gray.png"), "--beam", "3", "--num-captions", "3"
    )
    assert result.exit_code == 0, result.output
    for r in jsonl(result):
        assert len(r["captions"]) == 3 and len(set(r["captions"])) == 3 and len(r["scores"]) == 3
        assert r["scores"] == sorted(r["scores"], reverse=True)
        assert r["caption"] == r["captions"][0] and r["score"] == r["scores"][0]


@pytest.mark.parametrize(
    "decoding", [[], ["--beam", "3"], ["--sample", "--seed", "4", "--top-k", "40"]], ids=["greedy", "beam", "sample"]
)
def test_batch_size_does_not_change_captions(tiny_checkpoint, photo_dir, decoding):
    one = jsonl(caption(tiny_checkpoint, str(photo_dir), "--recursive", "--batch-size", "1", *decoding))
    eight = jsonl(caption(tiny_checkpoint, str(photo_dir), "--recursive", "--batch-size", "8", *decoding))
    assert len(one) == 9
    assert [(r["path"], r["caption"]) for r in one] == [(r["path"], r["caption"]) for r in eight]
    # scores agree to float32 rounding (batched matrix products round differently)
    assert [r["score"] for r in one] == pytest.approx([r["score"] for r in eight], rel=1e-5)


def test_workers_give_the_same_results(tiny_checkpoint, photo_dir, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    args = [str(photo_dir), "--recursive", str(broken), "--batch-size", "4"]
    serial = caption(tiny_checkpoint, *args)
    parallel = caption(tiny_checkpoint, *args, "--workers", "2")
    assert serial.exit_code == parallel.exit_code == 3
    assert jsonl(serial) == jsonl(parallel) and len(jsonl(serial)) == 10  # same batches: bit-identical


@pytest.mark.slow
def test_real_subprocess_in_a_pipe(tiny_checkpoint, photo_dir):
    cmd = [sys.executable, "-m", "clipcap_cli", "caption", str(photo_dir), "--model", str(tiny_checkpoint), *FAST]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is a JSON record
    assert [Path(r["path"]).name for r in records] == TOP and all(r["caption"] for r in records)
    assert "captioned 7 of 7" in proc.stderr


def test_only_failed_inputs_need_no_model(tmp_path):
    # every input already failed: the records are written without loading (here: lacking) a model
    result = runner.invoke(app, ["caption", "--model", "coco", str(tmp_path / "missing.jpg")])
    assert result.exit_code == 3 and jsonl(result)[0]["error"] == "no such file or directory"


def test_precision_option(tiny_checkpoint, photo_dir):
    result = caption(tiny_checkpoint, str(photo_dir / "rgb.jpg"), "--precision", "bf16")
    assert result.exit_code == 0, result.output
    assert jsonl(result)[0]["caption"]
    result = caption(tiny_checkpoint, str(photo_dir / "rgb.jpg"), "--precision", "fp16", "--device", "cpu")
    assert result.exit_code == 2 and "fp16 needs a CUDA device" in result.stderr
