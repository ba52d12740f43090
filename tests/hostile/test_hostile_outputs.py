"""Hostile output paths: what is at a path the user names is never destroyed (pipes and devices are
written as streams, symlinks are followed), an output that is one of the inputs is refused before any
work, files get the umask's mode, and no JSON output ever holds NaN or Infinity."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, make_images
from test_sharded import make_shards
from typer.testing import CliRunner

from clipcap_cli import fsutil
from clipcap_cli.cli.app import app
from clipcap_cli.weights import checkpoint

runner = CliRunner()
FAST = ["--max-length", "6"]


def caption(ckpt: Path, *args: str):
    return runner.invoke(app, ["caption", "--model", str(ckpt), *FAST, *args])


@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> dict[str, Path]:
    return make_images(tmp_path_factory.mktemp("pics"))


def _one_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    return lines[0]


# --------------------------------------------------------------------------- -o and what is there


def test_output_into_a_named_pipe_streams_to_its_reader(tmp_path, tiny_checkpoint, pics):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    result = caption(tiny_checkpoint, str(pics["rgb"]), "-o", str(fifo), "-q")
    reader.join(timeout=60)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still a pipe, not a regular file
    [record] = [json.loads(line) for line in got[0].splitlines()]
    assert record["path"] == str(pics["rgb"]) and record["error"] is None


def test_output_to_a_device_stays_a_device(tiny_checkpoint, pics):
    result = caption(tiny_checkpoint, str(pics["rgb"]), "-o", "/dev/null", "-q")
    assert result.exit_code == 0, result.output
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_full_device_is_one_line_and_stays_a_device(tiny_checkpoint, pics):
    result = caption(tiny_checkpoint, str(pics["rgb"]), "-o", "/dev/full", "-q")
    assert result.exit_code == 1 and "No space left on device" in result.stderr
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_output_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path, tiny_checkpoint, pics):
    target = tmp_path / "real" / "captions.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    result = caption(tiny_checkpoint, str(pics["rgb"]), "-o", str(link), "-q")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["path"] == str(pics["rgb"])
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "made.txt")
    fsutil.write_text_atomic(link, "x")
    assert link.is_symlink() and (tmp_path / "made.txt").read_text() == "x"


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_output_naming_an_input_image_is_refused_before_any_work(tmp_path, tiny_checkpoint, pics, how):
    image = tmp_path / "photo.jpg"
    image.write_bytes(pics["rgb"].read_bytes())
    before = image.read_bytes()
    out = {"same path": image, "symlink": tmp_path / "l.jpg", "hard link": tmp_path / "h.jpg"}[how]
    if how == "symlink":
        out.symlink_to(image)
    elif how == "hard link":
        os.link(image, out)
    line = _one_line(
        caption(tiny_checkpoint, str(tmp_path / "*.jpg") if how == "same path" else str(image), "-o", str(out)), 2
    )
    assert "is one of the inputs" in line
    assert image.read_bytes() == before


def test_output_naming_an_input_read_from_stdin_is_refused(tmp_path, tiny_checkpoint, pics):
    image = tmp_path / "p.png"
    image.write_bytes(pics["rgba"].read_bytes())
    result = runner.invoke(app, ["caption", "--model", str(tiny_checkpoint), "-", "-o", str(image)], input=f"{image}\n")
    assert "is one of the inputs" in _one_line(result, 2)
    assert image.read_bytes() == pics["rgba"].read_bytes()


def test_eval_outputs_naming_its_inputs_are_refused(tmp_path):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"image": "a.jpg", "captions": ["a dog."]}) + "\n")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"path": "a.jpg", "caption": "a dog."}) + "\n")
    for flag, victim in (("--output", preds), ("--output", refs)):
        result = runner.invoke(
            app, ["eval", "--refs", str(refs), "--predictions", str(preds), "--metrics", "BLEU", flag, str(victim)]
        )
        assert "is one of the inputs" in _one_line(result, 2)
    assert json.loads(preds.read_text())["caption"] == "a dog."


def test_extract_export_pickle_naming_the_dataset_is_refused(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,caption\na.jpg,x\n")
    result = runner.invoke(
        app, ["extract", str(manifest), "--out", str(tmp_path / "f"), "--export-pickle", str(manifest)]
    )
    assert "is one of the inputs" in _one_line(result, 2)
    assert manifest.read_text() == "image,caption\na.jpg,x\n"


@pytest.mark.parametrize("command", ["extract", "train"])
def test_out_naming_a_file_is_one_line(tmp_path, command):
    file = tmp_path / "taken"
    file.write_text("keep me")
    args = {
        "extract": ["extract", str(tmp_path), "--out", str(file)],
        "train": ["train", "--data", str(tmp_path), "--out", str(file)],
    }[command]
    line = _one_line(runner.invoke(app, args), 2)
    assert str(file) in line and "is a file" in line
    assert file.read_text() == "keep me"


# --------------------------------------------------------------------------- modes and leftovers


def test_sharded_files_get_the_umask_mode(tmp_path, tiny_checkpoint, pics):
    shards = tmp_path / "shards"
    shards.mkdir()
    make_shards(shards, pics)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        result = caption(
            tiny_checkpoint, str(shards / "00001.tar"), "--output-dir", str(out), "--save-embeddings", "-q"
        )
    finally:
        os.umask(old)
    assert result.exit_code in (0, 3), result.output
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert modes["00001.emb.safetensors"] == 0o644 and modes["00001.jsonl"] == 0o644, modes


def test_stale_temporary_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    host = socket.gethostname()
    stale = tmp_path / f".resume.pt.{host}-{dead}.abc123_x.tmp"
    live = tmp_path / f".resume.pt.{host}-{os.getpid()}.zzz999_y.tmp"
    other_host = tmp_path / f".resume.pt.elsewhere-{dead}.abc123_x.tmp"
    user_file = tmp_path / ".notes.tmp"
    for p in (stale, live, other_host, user_file):
        p.write_text("x")
    assert fsutil.remove_stale_temps(tmp_path) == [stale]
    assert live.exists() and other_host.exists() and user_file.exists()


@pytest.mark.slow
def test_an_interrupted_checkpoint_save_is_cleaned_at_the_next_start(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    import subprocess
    import sys

    from test_train import make_store

    store = make_store(tmp_path / "feats", tiny_clip_dir)
    out = tmp_path / "run"
    out.mkdir()
    code = (
        f"import os, torch; from clipcap_cli import fsutil\n"
        f"def write(tmp):\n    open(tmp, 'wb').write(b'half'); os._exit(9)\n"
        f"fsutil.atomic_write({str(out / 'resume.pt')!r}, write)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9  # killed mid-save
    [left] = [p.name for p in out.iterdir()]
    assert left.startswith(".resume.pt.") and left.endswith(".tmp")
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(store),
            "--out",
            str(out),
            "--gpt2",
            str(tiny_gpt2_dir),
            "--prefix-length",
            "4",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- JSON is JSON


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory, tiny_config) -> Path:
    model = build_tiny_model(tiny_config)
    with torch.no_grad():
        model.clip_project.model[0].weight.fill_(float("nan"))
    return checkpoint.save(model, tmp_path_factory.mktemp("nan") / "nan.safetensors")


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_a_nan_model_gives_error_records_never_nan(nan_checkpoint, pics, fmt):
    result = caption(nan_checkpoint, str(pics["rgb"]), "--format", fmt, "--beam", "2")
    assert result.exit_code == 3, result.output
    if fmt == "csv":
        import csv
        import io

        [row] = list(csv.DictReader(io.StringIO(result.stdout)))
        assert row["score"] == "" and row["caption"] == "" and "non-finite score" in row["error"]
        return
    records = [_strict(line) for line in result.stdout.splitlines()] if fmt == "jsonl" else _strict(result.stdout)
    assert records[0]["score"] is None and records[0]["caption"] is None and "non-finite score" in records[0]["error"]


def test_a_nan_model_in_a_sharded_run_writes_strict_json(tmp_path, nan_checkpoint, pics):
    shards = tmp_path / "shards"
    shards.mkdir()
    make_shards(shards, pics)
    out = tmp_path / "out"
    result = caption(nan_checkpoint, str(shards / "00001.tar"), "--output-dir", str(out), "-q")
    assert result.exit_code == 3, result.output
    for line in (out / "00001.jsonl").read_text().splitlines():
        record = _strict(line)
        assert record["score"] is None and record["error"]
    _strict((out / "00001.stats.json").read_text())


def test_every_output_has_the_same_record_fields(tmp_path, tiny_checkpoint, pics):
    """Plain JSON Lines, --output-dir JSON Lines and Parquet carry the same caption fields, clip_score included."""
    pq = pytest.importorskip("pyarrow.parquet")
    shards = tmp_path / "shards"
    shards.mkdir()
    make_shards(shards, pics)
    decoding = ["--beam", "2", "-n", "2", "--rerank", "clip"]
    plain = caption(tiny_checkpoint, str(pics["rgb"]), *decoding, "--format", "jsonl")
    assert plain.exit_code == 0, plain.output
    fields = set(json.loads(plain.stdout)) - {"path"}
    assert {"clip_score", "clip_scores", "captions", "scores"} <= fields
    for fmt in ("jsonl", "parquet"):
        out = tmp_path / fmt
        result = caption(
            tiny_checkpoint, str(shards / "00001.tar"), *decoding, "--output-dir", str(out), "--output-format", fmt
        )
        assert result.exit_code in (0, 3), result.output
        if fmt == "jsonl":
            rows = [json.loads(line) for line in (out / "00001.jsonl").read_text().splitlines()]
        else:
            rows = pq.read_table(out / "00001.parquet").to_pylist()
        ok = [r for r in rows if r["error"] is None]
        assert ok and all(fields <= set(r) for r in ok), (fmt, fields, set(ok[0]))
        assert all(isinstance(r["clip_score"], float) for r in ok)


def test_output_dir_naming_a_file_is_one_line(tmp_path, tiny_checkpoint, pics):
    file = tmp_path / "taken"
    file.write_text("keep me")
    line = _one_line(caption(tiny_checkpoint, str(pics["rgb"]), "--output-dir", str(file)), 2)
    assert str(file) in line and "is a file" in line and "--output-dir" in line
    assert file.read_text() == "keep me"


def test_inspect_on_a_nan_model_writes_strict_json(nan_checkpoint, pics):
    result = runner.invoke(app, ["inspect", str(pics["rgb"]), "--model", str(nan_checkpoint), "--jsonl"])
    assert result.exit_code == 3, result.output
    [record] = [_strict(line) for line in result.stdout.splitlines()]
    assert record["prefix"] is None and "non-finite prefix" in record["error"]
