"""`clipcap extract` end to end: formats, skip report, resume after SIGKILL / Ctrl-C, no-op, shards,
original pickle export/import, refusal of pickles that carry code."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clipcap_cli.cli.app import app
from clipcap_cli.data.features import load_features, read_skipped
from clipcap_cli.data.legacy import LegacyPickleError, load_original_pickle

runner = CliRunner()
MAIN = Path(__file__).resolve().parents[1]


def _coco_dataset(root: Path, n: int = 6, captions: int = 2) -> Path:
    """A COCO captions file with ``n`` generated JPEGs in root/train2014."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    (root / "train2014").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        name = f"COCO_train2014_{i + 1:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(root / "train2014" / name)
        images.append({"id": i + 1, "file_name": name})
        anns += [{"image_id": i + 1, "id": 100 * i + k, "caption": f"image {i} caption {k}"} for k in range(captions)]
    src = root / "annotations" / "captions_train2014.json"
    src.parent.mkdir(exist_ok=True)
    src.write_text(json.dumps({"images": images, "annotations": anns}))
    return src


def _invoke(args: list[str]):
    return runner.invoke(app, ["extract", *[str(a) for a in args]])


def _clip(tiny_clip_dir: Path) -> list[str]:
    return ["--clip", f"local-dir:{tiny_clip_dir}", "--workers", "0", "-q"]


def test_coco_end_to_end_json_summary_and_noop(tmp_path: Path, tiny_clip_dir: Path):
    src = _coco_dataset(tmp_path / "coco")
    out = tmp_path / "feats"
    res = _invoke([src, "--images", tmp_path / "coco", "--out", out, *_clip(tiny_clip_dir), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["complete"] and summary["encoded"] == 6 and summary["skipped"] == 0
    fs = load_features(out)
    assert fs.embeddings.shape == (6, 32) and fs.num_captions == 12
    assert fs.records[0] == {
        "image": "train2014/COCO_train2014_000000000001.jpg",
        "image_id": 1,
        "captions": ["image 0 caption 0", "image 0 caption 1"],
    }
    assert fs.meta["dataset_format"] == "coco" and fs.meta["source"] == str(src.resolve())

    again = _invoke([src, "--images", tmp_path / "coco", "--out", out, *_clip(tiny_clip_dir), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["noop"] and "nothing to do" in again.stderr
    assert load_features(out).meta["store_id"] == fs.meta["store_id"]

    redo = _invoke([src, "--images", tmp_path / "coco", "--out", out, *_clip(tiny_clip_dir), "--json", "--overwrite"])
    assert redo.exit_code == 0 and json.loads(redo.stdout)["encoded"] == 6
    assert load_features(out).meta["store_id"] != fs.meta["store_id"]

    other = _invoke([src, "--images", tmp_path / "coco", "--out", out, *_clip(tiny_clip_dir), "--chunk-size", "2"])
    assert other.exit_code == 2 and "--overwrite" in other.stderr


def test_skip_report_and_exit_3(tmp_path: Path, images: dict, tiny_clip_dir: Path):
    folder = images["rgb"].parent
    (folder / "text.jpg").write_text("not an image at all")
    good = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    res = _invoke([folder, "--out", tmp_path / "f", *_clip(tiny_clip_dir)])
    assert res.exit_code == 3, res.output
    assert "skipped 2 unreadable images" in res.stderr and "text.jpg" in res.stderr and "truncated.jpg" in res.stderr
    skipped = read_skipped(tmp_path / "f")
    assert {s["image"] for s in skipped} == {"text.jpg", "truncated.jpg"} and all(s["reason"] for s in skipped)
    assert len(load_features(tmp_path / "f")) == 7


def test_usage_errors(tmp_path: Path, tiny_clip_dir: Path):
    src = _coco_dataset(tmp_path / "coco", n=2)
    res = _invoke([src, "--images", tmp_path / "elsewhere", "--out", tmp_path / "f", *_clip(tiny_clip_dir)])
    assert res.exit_code == 2 and "not a folder" in res.stderr
    (tmp_path / "elsewhere").mkdir()
    res = _invoke([src, "--images", tmp_path / "elsewhere", "--out", tmp_path / "f", *_clip(tiny_clip_dir)])
    assert res.exit_code == 2 and "check --images" in res.stderr
    res = _invoke([src, "--out", tmp_path / "f", "--shard", "3/2", *_clip(tiny_clip_dir)])
    assert res.exit_code == 2 and "--shard" in res.stderr
    assert _invoke(["--out", tmp_path / "f"]).exit_code == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.jpg"}\n{oops\n')
    res = _invoke([bad, "--out", tmp_path / "f", *_clip(tiny_clip_dir)])
    assert res.exit_code == 2 and "bad.jsonl line 2: invalid JSON" in res.stderr


def test_shards_from_torchrun_env_then_merge(tmp_path: Path, tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch):
    src = _coco_dataset(tmp_path / "coco", n=5)
    base = [src, "--images", tmp_path / "coco", *_clip(tiny_clip_dir), "--chunk-size", "2"]
    assert _invoke([*base, "--out", tmp_path / "single"]).exit_code == 0
    out = tmp_path / "sharded"
    res = _invoke([*base, "--out", out, "--shard", "1/2"])
    assert res.exit_code == 0 and "--merge" in res.stderr and not (out / "meta.json").exists()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = _invoke([*base, "--out", out, "--json"])  # shard 0/2 from the environment
    assert res.exit_code == 0 and json.loads(res.stdout)["encoded"] == 3 and not (out / "meta.json").exists()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    res = _invoke(["--merge", out, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["complete"]
    a, b = load_features(tmp_path / "single"), load_features(out)
    assert torch.equal(a.embeddings, b.embeddings) and a.records == b.records
    assert _invoke(["--merge", out]).exit_code == 0  # merging a merged store is a no-op


def test_pickle_export_import_round_trip(tmp_path: Path, tiny_clip_dir: Path):
    src = tmp_path / "train_caption.json"
    coco = tmp_path / "coco"
    _coco_dataset(coco, n=3, captions=3)
    entries = [{"image_id": i, "caption": f"c{i}-{k}", "id": 10 * i + k} for k in range(3) for i in (1, 2, 3)]
    src.write_text(json.dumps(entries))
    pkl = tmp_path / "oscar_split_tiny_train.pkl"
    res = _invoke([src, "--images", coco, "--out", tmp_path / "f", *_clip(tiny_clip_dir), "--export-pickle", pkl])
    assert res.exit_code == 0, res.output
    fs = load_features(tmp_path / "f")

    with open(pkl, "rb") as f:  # what the original train.py does
        data = pickle.load(f)
    assert data["clip_embedding"].shape == (9, 32)
    assert len(data["captions"]) == 9
    for entry in data["captions"]:
        row = fs.records.index(next(r for r in fs.records if r["image_id"] == entry["image_id"]))
        assert torch.equal(data["clip_embedding"][entry["clip_embedding"]], fs.embeddings[row])
        assert entry["caption"] in fs.records[row]["captions"] and entry["id"] % 10 == int(entry["caption"][-1])

    res = _invoke(
        [
            "--import-pickle",
            pkl,
            "--out",
            tmp_path / "imported",
            "--images",
            coco,
            "--clip",
            f"local-dir:{tiny_clip_dir}",
            "--json",
        ]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"out": str(tmp_path / "imported"), "images": 3, "captions": 9, "pickle_rows": 9}
    back = load_features(tmp_path / "imported")
    assert torch.equal(back.embeddings, fs.embeddings) and back.records == fs.records
    assert back.meta["dataset_format"] == "original-pickle" and back.meta["clip_model"] == f"local-dir:{tiny_clip_dir}"

    # the original's own dump of a GPU run: fp16 rows, width 512 -> the CLIP is guessed (with a warning)
    half = {
        "clip_embedding": torch.randn(4, 512).half(),
        "captions": [{"image_id": 5, "caption": f"x{i}", "clip_embedding": i} for i in range(4)],
    }
    pkl2 = tmp_path / "gpu.pkl"
    pkl2.write_bytes(pickle.dumps(half))
    res = _invoke(["--import-pickle", pkl2, "--out", tmp_path / "gpu"])
    assert res.exit_code == 0 and "does not say which CLIP" in res.stderr
    gpu = load_features(tmp_path / "gpu")
    assert gpu.embeddings.dtype == torch.float16 and torch.equal(gpu.embeddings[0], half["clip_embedding"][0])
    assert gpu.records == [
        {"image": "COCO_train2014_000000000005.jpg", "image_id": 5, "captions": ["x0", "x1", "x2", "x3"]}
    ]
    assert gpu.meta["clip_model"] == "ViT-B-32"

    # a file someone re-saved with torch.save goes through torch's weights-only loader
    torch.save(half, tmp_path / "zip.pt")
    assert torch.equal(load_original_pickle(tmp_path / "zip.pt")["clip_embedding"], half["clip_embedding"])


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused_without_running_it(tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"clip_embedding": torch.zeros(1, 4), "captions": [_RunsCode(marker)]}))
    with pytest.raises(LegacyPickleError, match="refusing to load"):
        load_original_pickle(evil)
    res = _invoke(["--import-pickle", evil, "--out", tmp_path / "f"])
    assert res.exit_code == 1 and "refusing to load" in res.stderr
    assert not marker.exists()

    # code hidden one level down, in the bytes of a tensor storage (torch.storage._load_from_bytes)
    class HiddenInStorage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (pickle.dumps(_RunsCode(marker)),))

    inner = tmp_path / "inner.pkl"
    inner.write_bytes(pickle.dumps({"clip_embedding": HiddenInStorage(), "captions": []}))
    with pytest.raises(LegacyPickleError):
        load_original_pickle(inner)
    assert not marker.exists()
    assert not (tmp_path / "f" / "meta.json").exists()


# --------------------------------------------------------------------------- real interruptions


def _fifo_manifest(root: Path, n: int, fifo_at: int) -> tuple[Path, Path, Path]:
    """A JSONL manifest of ``n`` images where image ``fifo_at`` is a named pipe: reading it blocks,
    which holds the extraction at a known point (the chunks before it are written) without timing games."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if i != fifo_at:
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / f"{i}.png")
    fifo = root / f"{fifo_at}.png"
    os.mkfifo(fifo)
    manifest = root / "data.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"{i}.png", "caption": f"caption {i}"}) + "\n" for i in range(n)))
    return manifest, fifo, root / "0.png"


def _start(manifest: Path, out: Path, tiny_clip_dir: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "clipcap_cli",
        "extract",
        str(manifest),
        "--out",
        str(out),
        "--clip",
        f"local-dir:{tiny_clip_dir}",
        "--workers",
        "0",
        "--batch-size",
        "1",
        "--chunk-size",
        "2",
        "-q",
        "--json",
    ]
    env = dict(os.environ, PYTHONPATH=str(MAIN))
    # SIGINT at its default in the child even when the suite runs as a background job (which ignores it).
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=MAIN,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the extraction never wrote its part file"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_resume_after_a_real_interruption(tmp_path: Path, tiny_clip_dir: Path, how: str):
    manifest, fifo, sample = _fifo_manifest(tmp_path / "data", n=9, fifo_at=5)
    out = tmp_path / "f"
    proc = _start(manifest, out, tiny_clip_dir)
    try:
        _wait_for(out / "parts" / "chunk-000001.safetensors", proc)  # chunks 0 and 1 (images 0-3) are done
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    if how == "SIGINT":
        assert proc.returncode == 130 and "run the same command again" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "parts").glob("chunk-*")) == [
        "chunk-000000.safetensors",
        "chunk-000001.safetensors",
    ]
    assert not (out / "meta.json").exists()

    fifo.unlink()
    fifo.write_bytes(sample.read_bytes())  # the blocking image becomes a real one
    args = [
        manifest,
        "--clip",
        f"local-dir:{tiny_clip_dir}",
        "--workers",
        "0",
        "--batch-size",
        "1",
        "--chunk-size",
        "2",
        "-q",
        "--json",
    ]
    res = _invoke([*args, "--out", out])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["reused"] == 4 and summary["encoded"] == 5  # finished chunks were not encoded again
    assert "resuming: 4 of 9 images already done" in res.stderr
    clean = _invoke([*args, "--out", tmp_path / "clean"])
    assert clean.exit_code == 0 and json.loads(clean.stdout)["encoded"] == 9
    a, b = load_features(out), load_features(tmp_path / "clean")
    assert torch.equal(a.embeddings, b.embeddings) and a.records == b.records
    assert sorted(a.meta["extraction"]["runs"].values()) == [4, 5]


def test_shard_size_writes_a_sharded_store_equal_to_the_single_file(
    tmp_path: Path, tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    from clipcap_cli.data.store import open_store

    src = _coco_dataset(tmp_path / "coco", n=7)
    base = [src, "--images", tmp_path / "coco", *_clip(tiny_clip_dir)]
    assert _invoke([*base, "--out", tmp_path / "single", "--chunk-size", "3"]).exit_code == 0
    out = tmp_path / "sharded"
    res = _invoke([*base, "--out", out, "--shard-size", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert (
        json.loads(res.stdout)["complete"]
        and not (out / "parts").exists()
        and not (out / "embeddings.safetensors").exists()
    )
    store = open_store(out)
    assert store.sharded and [(s.name, s.images, s.captions) for s in store.shards] == [
        ("shard-000000", 3, 6),
        ("shard-000001", 3, 6),
        ("shard-000002", 1, 2),
    ]
    a, b = load_features(tmp_path / "single"), load_features(out)
    assert torch.equal(a.embeddings, b.embeddings) and a.records == b.records
    again = _invoke([*base, "--out", out, "--shard-size", "3", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["noop"]
    other = _invoke([*base, "--out", out])  # another layout is another store
    assert other.exit_code == 2 and "--overwrite" in other.stderr
    redo = _invoke([*base, "--out", out, "--overwrite"])
    assert redo.exit_code == 0 and not (out / "shards").exists() and not open_store(out).sharded

    # Across processes (--shard i/n), the merge step writes the shards.
    multi = tmp_path / "multi"
    for i in (0, 1):
        assert _invoke([*base, "--out", multi, "--shard-size", "3", "--shard", f"{i}/2"]).exit_code == 0
    assert not (multi / "meta.json").exists()
    assert _invoke(["--merge", multi]).exit_code == 0
    c = load_features(multi)
    assert open_store(multi).sharded and torch.equal(c.embeddings, a.embeddings) and c.records == a.records
