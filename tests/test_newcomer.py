"""A newcomer's first session, through the installed `clipcap` console script: the README's offline
commands (extract -> train -> caption -> eval) on generated data with the tiny models."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.slow

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


def _clipcap() -> str:
    exe = shutil.which("clipcap", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("the `clipcap` console script is not installed: run pip install -e .")
    return exe


def run(args: list[str], cwd: Path, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [_clipcap(), *args], cwd=cwd, env=env, capture_output=True, text=True, input=stdin, timeout=600
    )
    return result


def test_extract_train_caption_eval(tmp_path: Path, tiny_clip_dir: Path, tiny_gpt2_dir: Path):
    env = {**os.environ, "CLIPCAP_HOME": str(tmp_path / "home"), "CLIPCAP_OFFLINE": "1", "NO_COLOR": "1"}
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(8):
        name = list(COLOURS)[i % 2]
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse((8 + i, 8, 48 + i, 48), fill=COLOURS[name])
        img.save(images / f"{name}-{i}.png")
        rows.append({"image": f"images/{name}-{i}.png", "caption": f"a {name} circle on a white background."})
    with open(tmp_path / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)

    # 1. extract
    r = run(
        [
            "extract",
            "data.csv",
            "--out",
            "feats",
            "--clip",
            f"local-dir:{tiny_clip_dir}",
            "--clip-pretrained",
            "none",
            "--workers",
            "0",
            "--quiet",
        ],
        tmp_path,
        env,
    )
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "feats" / "meta.json").read_text())
    assert meta["count"] == 8 and meta["embed_dim"] == 32

    # 2. train
    r = run(
        [
            "train",
            "--data",
            "feats",
            "--out",
            "run",
            "--gpt2",
            str(tiny_gpt2_dir),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--prefix-length",
            "2",
            "--warmup",
            "1",
            "--lr",
            "1e-3",
            "--quiet",
        ],
        tmp_path,
        env,
    )
    assert r.returncode == 0, r.stderr
    checkpoints = sorted((tmp_path / "run").glob("epoch-*.safetensors"))
    assert [p.name for p in checkpoints] == ["epoch-001.safetensors", "epoch-002.safetensors"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged and all("loss" in rec or "val_loss" in rec for rec in logged)

    # 3. caption: the checkpoint alone says which CLIP and GPT-2 to use; JSON Lines when piped.
    r = run(["caption", "--model", "run/epoch-002.safetensors", "images/", "--max-length", "8"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 8
    assert all(rec["error"] is None and isinstance(rec["caption"], str) and rec["caption"] for rec in records)
    (tmp_path / "captions.jsonl").write_text(r.stdout)

    # The contact sheet.
    r = run(
        [
            "caption",
            "--model",
            "run/epoch-002.safetensors",
            "images/",
            "--max-length",
            "8",
            "--format",
            "html",
            "--output",
            "sheet.html",
            "--quiet",
        ],
        tmp_path,
        env,
    )
    assert r.returncode == 0, r.stderr
    sheet = (tmp_path / "sheet.html").read_text()
    assert sheet.count("data:image/jpeg;base64,") == 8

    # 4. eval against the references kept in the features store.
    r = run(
        [
            "eval",
            "--refs",
            "feats",
            "--predictions",
            "captions.jsonl",
            "--metrics",
            "BLEU,ROUGE-L,CIDEr",
            "--tokenizer",
            "ptb-python",
            "--json",
        ],
        tmp_path,
        env,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["counts"]["images"] == 8
    assert set(report["metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}

    # Everything stayed under CLIPCAP_HOME or the working folder; nothing was downloaded.
    assert not list((tmp_path / "home").rglob("*.pt"))

    # A mistake gets one readable line and exit code 2.
    r = run(["caption", "--model", "run/epoch-002.safetensors", "--bem", "5", "images/"], tmp_path, env)
    assert r.returncode == 2 and "--beam" in r.stderr and "Traceback" not in r.stderr
