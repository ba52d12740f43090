"""Resumes check contents, not names: other weights at the same path, a re-extracted features store or
other CLIP weights are refused in one line; an interrupted run leaves the same error logs as one that
was not; damaged metadata is named with what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import build_tiny_model, make_images
from test_sharded import make_shards
from test_train import make_store, tiny_opts
from typer.testing import CliRunner

from clipcap_cli import train
from clipcap_cli.cli.app import app
from clipcap_cli.errors import UsageError
from clipcap_cli.weights import checkpoint

runner = CliRunner()
FAST = ["--max-length", "5", "--batch-size", "2"]


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder, make_images(tmp_path_factory.mktemp("pics")))
    return folder


def _caption(ckpt: Path, shards: Path, out: Path, *extra: str):
    return runner.invoke(
        app,
        ["caption", f"{shards}/{{00000..00002}}.tar", "--model", str(ckpt), "--output-dir", str(out), *FAST, *extra],
    )


def test_other_weights_at_the_same_path_are_refused(tmp_path, tiny_config, shards_dir):
    ckpt = checkpoint.save(build_tiny_model(tiny_config, seed=0), tmp_path / "model.safetensors")
    out = tmp_path / "out"
    assert _caption(ckpt, shards_dir, out).exit_code == 3
    (out / "00002.stats.json").unlink()  # as if the run had stopped before its last shard
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    checkpoint.save(build_tiny_model(tiny_config, seed=1), ckpt)  # other weights, same file name
    result = _caption(ckpt, shards_dir, out)
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "the weights changed since" in line and "checkpoint" in line and "sha256" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing mixed in


def test_the_same_weights_touched_or_copied_resume(tmp_path, tiny_config, shards_dir):
    import os

    ckpt = checkpoint.save(build_tiny_model(tiny_config, seed=0), tmp_path / "model.safetensors")
    out = tmp_path / "out"
    assert _caption(ckpt, shards_dir, out).exit_code == 3
    (out / "00002.stats.json").unlink()
    os.utime(ckpt, ns=(10**18, 10**18))  # touched: the bytes are the same
    result = _caption(ckpt, shards_dir, out)
    assert result.exit_code == 3, result.output  # resumed (the failed samples of shard 1 still fail)
    assert (out / "00002.stats.json").is_file()


def test_an_interrupted_run_leaves_the_same_error_logs(tmp_path, tiny_checkpoint, shards_dir):
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert _caption(tiny_checkpoint, shards_dir, reference).exit_code == 3
    assert _caption(tiny_checkpoint, shards_dir, out).exit_code == 3
    # The worst moment to stop: shard 1 (the one with failures) written, its stats not yet.
    (out / "00001.stats.json").unlink()
    assert _caption(tiny_checkpoint, shards_dir, out).exit_code == 3
    logs = sorted(p.name for p in out.glob("*.errors.log"))
    assert logs == sorted(p.name for p in reference.glob("*.errors.log")) == ["00001.errors.log"]
    assert (out / "00001.errors.log").read_bytes() == (reference / "00001.errors.log").read_bytes()
    assert len((out / "00001.errors.log").read_text().splitlines()) == 2


def test_a_features_store_with_other_clip_weights_is_refused(tmp_path, tiny_clip_dir):
    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    photos = tmp_path / "photos"
    make_images(photos)
    out = tmp_path / "feats"
    args = [
        "extract",
        str(photos),
        "--out",
        str(out),
        "--clip",
        f"local-dir:{clip}",
        "--workers",
        "0",
        "-q",
        "--chunk-size",
        "2",
    ]
    assert runner.invoke(app, args).exit_code == 0
    from safetensors.torch import load_file, save_file

    weights = load_file(str(clip / "open_clip_model.safetensors"))
    name = next(k for k in weights if k.startswith("visual.") and weights[k].is_floating_point())
    weights[name] = weights[name] + 1  # the same folder and file name, other weights
    save_file(weights, str(clip / "open_clip_model.safetensors"))
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "the CLIP weights changed" in result.stderr and "sha256" in result.stderr


def test_train_resume_refuses_a_reextracted_store(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    store = make_store(tmp_path / "feats", tiny_clip_dir, seed=0)
    out = tmp_path / "run"
    opts = tiny_opts(tiny_gpt2_dir, epochs=2)

    class Stop(train.TrainCallback):
        def on_step(self, info):
            if info.step == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train(opts.replace(checkpoint_every=1), store, out, callback=Stop())
    captions = [
        r["captions"] for r in json.loads("[" + ",".join((store / "index.jsonl").read_text().splitlines()) + "]")
    ]
    shutil.rmtree(store)
    make_store(tmp_path / "feats", tiny_clip_dir, seed=1, captions=captions)  # same captions, other embeddings
    with pytest.raises(UsageError, match="CLIP embeddings of .* changed since this run started"):
        train.train(opts.replace(checkpoint_every=1), store, out, resume=True)


@pytest.mark.parametrize("damage", ["meta.json", "parts/settings.json"])
def test_damaged_store_metadata_is_named(tmp_path, tiny_clip_dir, damage):
    photos = tmp_path / "photos"
    make_images(photos)
    out = tmp_path / "feats"
    args = ["extract", str(photos), "--out", str(out), "--clip", f"local-dir:{tiny_clip_dir}", "--workers", "0", "-q"]
    if damage == "meta.json":
        assert runner.invoke(app, args).exit_code == 0
    else:
        (out / "parts").mkdir(parents=True)
    (out / damage).write_text('{"format": "clipcap-feat')
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert str(out / damage) in line and "--overwrite" in line


def test_a_torn_settings_file_of_an_output_dir_is_named(tmp_path, tiny_checkpoint, shards_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_settings.json").write_text('{"settings": {"mod')
    result = _caption(tiny_checkpoint, shards_dir, out)
    assert result.exit_code == 2
    assert str(out / "_settings.json") in result.stderr and "unreadable" in result.stderr


def test_weights_fingerprints_are_remembered_by_size_and_time(tmp_path, monkeypatch):
    from clipcap_cli.weights import fingerprint

    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    calls = []
    real_open = open

    def counting_open(path, *a, **k):
        if str(path) == str(f.resolve()):
            calls.append(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", counting_open)
    first = fingerprint.file_sha256(f)
    assert fingerprint.file_sha256(f) == first and len(calls) == 1
    f.write_bytes(b"y" * 1000)
    assert fingerprint.file_sha256(f) != first and len(calls) == 2
