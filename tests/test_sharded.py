"""`clipcap caption --output-dir`: tar and list shards, sidecar files, resume after SIGKILL,
--retry-failed, torchrun and --shard splits, settings checks, parquet and embeddings."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import make_images
from typer.testing import CliRunner

from clipcap_cli.batch import shards
from clipcap_cli.batch.sharded_output import load_embeddings
from clipcap_cli.cli.app import app

runner = CliRunner()
FAST = ["--max-length", "6"]
CORRUPT_KEY, NO_IMAGE_KEY = "00001/0002", "00001/0005"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(
    folder: Path, images: dict[str, Path], n_shards: int = 3, per_shard: int = 5, bad: bool = True
) -> list[Path]:
    """img2dataset-like shards NNNNN.tar of key.{jpg,png} + key.txt + key.json; with ``bad``, shard 1
    holds a corrupt image (CORRUPT_KEY) and a sample with no image member (NO_IMAGE_KEY)."""
    folder.mkdir(parents=True, exist_ok=True)
    pictures = list(images.values())
    paths = []
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(per_shard + (1 if bad and s == 1 else 0)):
                key = f"{s:05d}/{k:04d}"  # keys with a folder, as webdataset allows
                picture = pictures[(s * per_shard + k) % len(pictures)]
                _add(tar, f"{key}.json", json.dumps({"url": f"https://example.com/{key}.jpg", "key": key}).encode())
                if bad and key == CORRUPT_KEY:
                    _add(tar, f"{key}.jpg", b"\xff\xd8 not really a jpeg")
                elif not (bad and key == NO_IMAGE_KEY):
                    _add(tar, f"{key}{picture.suffix}", picture.read_bytes())
                _add(tar, f"{key}.txt", f"original caption {key}".encode())
        paths.append(path)
    return paths


def run(ckpt: Path, *args: str):
    return runner.invoke(app, ["caption", "--model", str(ckpt), *FAST, *args])


def records(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]


def all_records(out: Path) -> dict[str, dict]:
    found = {}
    for file in sorted(out.glob("*.jsonl")):
        for r in records(out, file.stem):
            assert r["key"] not in found, f"{r['key']} has two records"
            found[r["key"]] = r
    return found


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith((".part", ".tmp", ".new")))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    return make_images(tmp_path_factory.mktemp("pictures"))


@pytest.fixture(scope="module")
def tar_dir(tmp_path_factory, pictures) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder, pictures)
    return folder


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_checkpoint, tar_dir) -> Path:
    """One uninterrupted single-process run over the three tar shards."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    result = run(tiny_checkpoint, f"{tar_dir}/{{00000..00002}}.tar", "--output-dir", str(out), "--batch-size", "2")
    assert result.exit_code == 3, result.output
    return out


# --------------------------------------------------------------------------- reading shards


def test_brace_expansion():
    assert shards.expand_braces("s/{00008..00011}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert shards.expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert shards.expand_braces("x{1,{2..3}}") == ["x1", "x2", "x3"]
    assert shards.expand_braces("plain{}.tar") == ["plain{}.tar"]


def test_tar_samples_follow_webdataset_keys(tmp_path, pictures):
    path = tmp_path / "mixed.tar"
    jpg = pictures["rgb"].read_bytes()
    with tarfile.open(path, "w") as tar:
        _add(tar, "__meta__", b"skipped")
        _add(tar, "dir/a.seg.png", b"x")  # key dir/a, extension seg.png: not the image
        _add(tar, "dir/a.jpg", jpg)
        _add(tar, "b.txt", b"only text")
        _add(tar, "noextension", b"skipped")
        _add(tar, "dir/a.TXT", b"caption of a")  # extensions are compared lowercased; members need not be adjacent
        _add(tar, "dir/a.jpg", b"second copy: ignored")
    samples, problem = shards.Shard("mixed", 0, tar=str(path)).samples()
    assert problem is None
    assert [(s.key, s.position, s.error) for s in samples] == [
        ("dir/a", 0, None),
        ("b", 1, "no image in this sample (has: txt)"),
    ]
    assert samples[0].open_image().size == (64, 48)
    assert samples[0].info() == {"source_caption": "caption of a"}


def test_truncated_tar_keeps_the_samples_before(tmp_path, tar_dir):
    data = (tar_dir / "00000.tar").read_bytes()
    complete, problem = shards.Shard("whole", 0, tar=str(tar_dir / "00000.tar")).samples()
    assert len(complete) == 5 and problem is None
    with tarfile.open(tar_dir / "00000.tar") as tar:
        members = tar.getmembers()
    cut = tmp_path / "cut.tar"
    # cut inside a header, at a header boundary, and inside an image's bytes
    for size in (members[6].offset + 100, members[6].offset, members[4].offset_data + members[4].size // 2):
        cut.write_bytes(data[:size])
        samples, problem = shards.Shard("cut", 0, tar=str(cut)).samples()
        assert [s.key for s in samples] == [s.key for s in complete][: len(samples)] and 1 <= len(samples) < 5
        assert problem is not None and f"after {len(samples)} samples" in problem
    with pytest.raises(Exception, match="truncated tar"):
        samples[-1].open_image()  # the last cut: the image's bytes end early
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all" * 100)
    samples, problem = shards.Shard("garbage", 0, tar=str(garbage)).samples()
    assert samples == [] and "not a readable tar" in problem


def test_unreadable_and_missing_shards_are_reported(tmp_path, tiny_checkpoint, tar_dir):
    (tmp_path / "00009.tar").write_bytes(b"garbage" * 100)
    out = tmp_path / "out"
    result = run(
        tiny_checkpoint, str(tar_dir / "00000.tar"), f"{tmp_path}/{{00009..00010}}.tar", "--output-dir", str(out)
    )
    assert result.exit_code == 3, result.output
    assert json.loads((out / "00010.stats.json").read_text())["error"] == "no such file"
    assert "not a readable tar" in json.loads((out / "00009.stats.json").read_text())["error"]
    summary = json.loads((out / "_summary.json").read_text())
    assert [p["shard"] for p in summary["unreadable_shards"]] == ["00009", "00010"] and summary["failed"] == 0
    assert "2 unreadable shards" in result.stderr
    (tmp_path / "00010.tar").write_bytes((tar_dir / "00002.tar").read_bytes())  # the missing shard arrives
    retried = run(
        tiny_checkpoint,
        str(tar_dir / "00000.tar"),
        f"{tmp_path}/{{00009..00010}}.tar",
        "--output-dir",
        str(out),
        "--retry-failed",
    )
    assert retried.exit_code == 3  # 00009 is still garbage
    assert json.loads((out / "00010.stats.json").read_text())["samples"] == 5
    assert len(records(out, "00010")) == 5


def test_discover_orders_and_names_shards(tmp_path, tar_dir, pictures):
    found = shards.discover(
        [str(tar_dir / "0000[12].tar"), str(tar_dir / "00000.tar"), str(pictures["rgb"].parent)], shard_size=3
    )
    assert [(s.name, s.index) for s in found] == [
        ("00001", 0),
        ("00002", 1),
        ("00000", 2),
        ("part-00000", 3),
        ("part-00001", 4),
        ("part-00002", 5),
    ]
    assert [len(s.sources) for s in found[3:]] == [3, 3, 1]
    other = tmp_path / "other"
    other.mkdir()
    (other / "00000.tar").write_bytes((tar_dir / "00000.tar").read_bytes())
    listed = io.StringIO(f"{tar_dir / '00002.tar'}\n\n{pictures['gray']}\n")  # a list on stdin: tars and images
    found = shards.discover(["-", str(pictures["rgb"])], stdin=listed)
    assert [(s.name, s.tar, [x.name for x in s.sources]) for s in found] == [
        ("00002", str(tar_dir / "00002.tar"), []),
        ("part-00000", None, [str(pictures["gray"]), str(pictures["rgb"])]),
    ]
    with pytest.raises(Exception, match="two shards are named 00000"):
        shards.discover([str(tar_dir / "00000.tar"), str(other / "00000.tar")])
    with pytest.raises(Exception, match="compressed tar shards"):
        shards.discover([str(tmp_path / "x.tar.gz")])
    with pytest.raises(Exception, match="none of the 2 tar shards exists"):
        shards.discover([str(tmp_path / "{0..1}.tar")])


# --------------------------------------------------------------------------- one process


def test_every_key_gets_one_record_and_errors_exit_3(baseline, tar_dir):
    out = baseline
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"0000{s}.{ext}" for s in range(3) for ext in ("jsonl", "stats.json")]
        + ["_settings.json", "_summary.json", "00001.errors.log"]
    )
    got = all_records(out)
    expected = {
        s.key for path in sorted(tar_dir.glob("*.tar")) for s in shards.Shard(path.stem, 0, tar=str(path)).samples()[0]
    }
    assert set(got) == expected and len(got) == 16
    for key, r in got.items():
        assert r["shard"] == key.split("/")[0]
        assert r["url"] == f"https://example.com/{key}.jpg" and r["source_caption"] == f"original caption {key}"
        assert (r["error"] is None) == (key not in (CORRUPT_KEY, NO_IMAGE_KEY))
        assert (r["caption"] is None) == (r["error"] is not None)
    assert "not an image" in got[CORRUPT_KEY]["error"] or "unreadable" in got[CORRUPT_KEY]["error"]
    assert got[NO_IMAGE_KEY]["error"] == "no image in this sample (has: json, txt)"
    assert [r["key"] for r in records(out, "00001")] == [f"00001/{k:04d}" for k in range(6)]  # shard order
    stats = json.loads((out / "00001.stats.json").read_text())
    assert (stats["samples"], stats["ok"], stats["failed"], stats["error"]) == (6, 4, 2, None)
    assert stats["settings"]["decoding"]["max_length"] == 6 and stats["source"] == str(tar_dir / "00001.tar")
    log = (out / "00001.errors.log").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in log) == [CORRUPT_KEY, NO_IMAGE_KEY]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["complete"] and (summary["samples"], summary["ok"], summary["failed"]) == (16, 14, 2)
    assert summary["this_run"]["samples"] == 16 and summary["this_run"]["shards_done"] == 3


def test_captions_equal_plain_caption(baseline, tiny_checkpoint, pictures, tar_dir):
    """The sidecar records hold what `clipcap caption` prints for the same pictures."""
    plain = runner.invoke(
        app, ["caption", "--model", str(tiny_checkpoint), *FAST, *map(str, pictures.values()), "--jsonl"]
    )
    by_bytes = {Path(r["path"]).read_bytes(): r["caption"] for r in map(json.loads, plain.stdout.splitlines())}
    got = all_records(baseline)
    for sample in shards.Shard("00000", 0, tar=str(tar_dir / "00000.tar")).samples()[0]:
        data = shards._read(sample.tar, *sample._member(*shards.IMAGE_EXTENSIONS))
        assert got[sample.key]["caption"] == by_bytes[data]


def test_rerun_skips_finished_shards_and_redoes_partial_ones(tmp_path, baseline, tiny_checkpoint, tar_dir):
    out = tmp_path / "out"
    pattern = f"{tar_dir}/{{00000..00002}}.tar"
    assert run(tiny_checkpoint, pattern, "--output-dir", str(out), "--batch-size", "2").exit_code == 3
    kept = (out / "00000.stats.json").stat().st_mtime_ns
    # Make shard 2 look interrupted: no stats, a torn .part file.
    (out / "00002.stats.json").unlink()
    (out / "00002.jsonl").unlink()
    (out / "00002.jsonl.part").write_text('{"key": "torn')
    again = run(tiny_checkpoint, pattern, "--output-dir", str(out), "--batch-size", "2")
    assert again.exit_code == 3, again.output  # shard 1's failures are still there
    assert (out / "00000.stats.json").stat().st_mtime_ns == kept
    assert "2 shards were already done" in again.stderr
    assert leftovers(out) == [] and all_records(out) == all_records(baseline)
    assert json.loads((out / "_summary.json").read_text())["this_run"]["shards_done"] == 1


def test_settings_mismatch_is_refused(tmp_path, tiny_checkpoint, tar_dir, pictures):
    out = tmp_path / "out"
    assert run(tiny_checkpoint, str(tar_dir / "00000.tar"), "--output-dir", str(out)).exit_code == 0
    again = run(tiny_checkpoint, str(tar_dir / "00000.tar"), "--output-dir", str(out))
    assert again.exit_code == 0 and again.stderr.startswith("nothing to do; 1 shards were already done")
    other = run(tiny_checkpoint, str(tar_dir / "00000.tar"), "--output-dir", str(out), "--beam", "2")
    assert other.exit_code == 2
    lines = other.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "other settings" in lines[0] and "decoding.strategy 'greedy' then, 'beam' now" in lines[0]
    )
    faster = run(tiny_checkpoint, str(tar_dir / "00000.tar"), "--output-dir", str(out), "--precision", "bf16")
    assert faster.exit_code == 2 and "model.precision 'auto' then, 'bf16' now" in faster.stderr  # bf16 changes captions
    # List shards: the same shard name holding other images is refused too.
    folder = pictures["rgb"].parent
    listed = tmp_path / "listed"
    assert run(tiny_checkpoint, str(pictures["rgb"]), str(pictures["gray"]), "--output-dir", str(listed)).exit_code == 0
    changed = run(tiny_checkpoint, str(pictures["rgb"]), str(pictures["cmyk"]), "--output-dir", str(listed))
    assert changed.exit_code == 2 and "the inputs changed" in changed.stderr
    assert run(tiny_checkpoint, str(folder), "--output-dir", str(listed), "--shard-size", "2").exit_code == 2


def test_retry_failed_touches_only_the_failed_keys(tmp_path, tiny_checkpoint, pictures):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("rgb.jpg", "gray.png", "cmyk.jpg", "palette.png"):
        (folder / name).write_bytes(pictures[Path(name).stem].read_bytes())
    (folder / "broken.jpg").write_bytes(b"not yet an image")
    out = tmp_path / "out"
    args = [str(folder), "--output-dir", str(out), "--shard-size", "2", "--save-embeddings"]
    first = run(tiny_checkpoint, *args)
    assert first.exit_code == 3, first.output  # part-00000: broken, cmyk; part-00001: gray, palette; part-00002: rgb
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken_key = str(folder / "broken.jpg")
    assert all_records(out)[broken_key]["error"] is not None
    assert run(tiny_checkpoint, *args).exit_code == 3  # a plain rerun leaves failures alone
    (folder / "broken.jpg").write_bytes(pictures["exif"].read_bytes())  # the image is repaired
    retried = run(tiny_checkpoint, *args, "--retry-failed")
    assert retried.exit_code == 0, retried.output
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    for name in ("part-00001.jsonl", "part-00001.stats.json", "part-00001.emb.safetensors", "part-00002.jsonl"):
        assert after[name] == before[name]  # shards without failures are not rewritten
    old_lines = before["part-00000.jsonl"].decode().splitlines()
    new_lines = after["part-00000.jsonl"].decode().splitlines()
    assert [json.loads(line)["key"] for line in new_lines] == [broken_key, str(folder / "cmyk.jpg")]
    assert new_lines[1] == old_lines[1]  # the good record keeps its exact bytes
    fixed = json.loads(new_lines[0])
    assert fixed["error"] is None and fixed["caption"]
    stats = json.loads(after["part-00000.stats.json"])
    assert (stats["ok"], stats["failed"], stats["retried"]) == (2, 0, 1)
    emb = load_embeddings(out / "part-00000.emb.safetensors")
    assert emb.shape == (2, 32) and not torch.isnan(emb).any()
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["failed"] == 0 and summary["this_run"]["retried"] == 1 and summary["this_run"]["samples"] == 1
    assert leftovers(out) == []


def test_parquet_and_embeddings_round_trip(tmp_path, tiny_checkpoint, tar_dir, pictures):
    pq = pytest.importorskip("pyarrow.parquet")
    common = [str(tar_dir / "00001.tar"), "--beam", "2", "-n", "2", "--save-embeddings"]
    as_jsonl, as_parquet = tmp_path / "jsonl", tmp_path / "parquet"
    assert run(tiny_checkpoint, *common, "--output-dir", str(as_jsonl)).exit_code == 3
    result = run(tiny_checkpoint, *common, "--output-dir", str(as_parquet), "--output-format", "parquet")
    assert result.exit_code == 3, result.output
    assert not list(as_parquet.glob("*.jsonl"))
    table = pq.read_table(as_parquet / "00001.parquet")
    assert table.column_names == [
        "key",
        "shard",
        "caption",
        "score",
        "error",
        "captions",
        "scores",
        "url",
        "source_caption",
    ]
    assert table.to_pylist() == records(as_jsonl, "00001")
    emb = load_embeddings(as_parquet / "00001.emb.safetensors")
    rows = table.to_pylist()
    assert emb.shape == (6, 32) and emb.dtype == torch.float32  # fp32 on the CPU, as CLIP ran
    assert [bool(torch.isnan(e).all()) for e in emb] == [r["error"] is not None for r in rows]
    torch.testing.assert_close(emb, load_embeddings(as_jsonl / "00001.emb.safetensors"), equal_nan=True)
    # The rows are the CLIP embeddings of the images, as the Python API computes them.
    import clipcap_cli

    captioner = clipcap_cli.load_model(str(tiny_checkpoint), device="cpu")
    samples = shards.Shard("00001", 0, tar=str(tar_dir / "00001.tar")).samples()[0]
    good = [i for i, r in enumerate(rows) if r["error"] is None]
    images = [shards._read(samples[i].tar, *samples[i]._member(*shards.IMAGE_EXTENSIONS)) for i in good]
    torch.testing.assert_close(emb[good], captioner.encode(images), rtol=1e-4, atol=1e-5)


def test_shard_i_of_n_split_equals_one_process(tmp_path, tiny_checkpoint, tar_dir, baseline):
    out = tmp_path / "out"
    pattern = f"{tar_dir}/{{00000..00002}}.tar"
    first = run(tiny_checkpoint, pattern, "--output-dir", str(out), "--batch-size", "2", "--shard", "0/2")
    assert first.exit_code == 0, first.output  # shards 0 and 2: no failures among them
    assert sorted(p.name for p in out.glob("*.stats.json")) == ["00000.stats.json", "00002.stats.json"]
    summary = json.loads((out / "_summary.json").read_text())
    assert not summary["complete"] and summary["shards_missing"] == ["00001"]
    second = run(tiny_checkpoint, pattern, "--output-dir", str(out), "--batch-size", "2", "--shard", "1/2")
    assert second.exit_code == 3
    assert json.loads((out / "00001.stats.json").read_text())["process"] == {"slot": 1, "shard": "1/2"}
    assert json.loads((out / "_summary.json").read_text())["complete"]
    assert all_records(out) == all_records(baseline)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard", "0/2"], "only with --output-dir"),
        (["--save-embeddings", "--retry-failed"], "--retry-failed, --save-embeddings: only with --output-dir"),
        (["--output-dir", "X", "--format", "csv"], "not with --output-dir"),
        (["--output-dir", "X", "--shard", "2/2"], "need 0 <= i < n"),
        (["--output-dir", "X", "--output-format", "xml"], "unknown --output-format"),
    ],
)
def test_sharded_option_errors(tiny_checkpoint, tar_dir, args, message):
    result = run(tiny_checkpoint, str(tar_dir / "00000.tar"), *args)
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_tar_without_output_dir_is_a_usage_error(tiny_checkpoint, tar_dir):
    result = run(tiny_checkpoint, str(tar_dir / "00000.tar"))
    assert result.exit_code == 2 and "add --output-dir" in result.stderr


# --------------------------------------------------------------------------- real processes


def _command(ckpt: Path, pattern: str, out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "clipcap_cli",
        "caption",
        pattern,
        "--model",
        str(ckpt),
        "--output-dir",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, tiny_checkpoint, pictures):
    folder = tmp_path / "shards"
    make_shards(folder, pictures, n_shards=6, per_shard=6, bad=False)
    pattern = f"{folder}/{{00000..00005}}.tar"
    # Long captions keep the run busy for a few seconds after the first shard is done.
    decoding = ["--max-length", "40", "--batch-size", "2", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, *_command(tiny_checkpoint, pattern, out, *decoding, "-q")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not list(out.glob("*.stats.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.glob("*.stats.json"))
    assert proc.returncode == -signal.SIGKILL and 1 <= len(finished) < 6, proc.stderr.read().decode()[-2000:]
    kept = {name: (out / name).stat().st_mtime_ns for name in finished}

    resumed = subprocess.run(
        [sys.executable, *_command(tiny_checkpoint, pattern, out, *decoding)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(finished)} shards were already done" in resumed.stderr
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == kept  # finished shards untouched
    assert leftovers(out) == []

    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same float rounding
    try:
        clean = runner.invoke(
            app, ["caption", pattern, "--model", str(tiny_checkpoint), "--output-dir", str(reference), *decoding]
        )
    finally:
        torch.set_num_threads(threads)
    assert clean.exit_code == 0, clean.output
    for shard in range(6):
        name = f"{shard:05d}.jsonl"
        assert (out / name).read_bytes() == (reference / name).read_bytes()  # nothing lost, nothing twice
    assert len(all_records(out)) == 36


@pytest.mark.slow
@pytest.mark.system
def test_torchrun_two_processes_equal_one(tmp_path, tiny_checkpoint, tar_dir, baseline):
    out = tmp_path / "out"
    pattern = f"{tar_dir}/{{00000..00002}}.tar"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *_command(tiny_checkpoint, pattern, out, *FAST, "--batch-size", "2"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]  # failures are in the records; torchrun would call 3 a crash
    got, expected = all_records(out), all_records(baseline)
    assert list(got) == list(expected)
    for key, record in got.items():  # other torch threads: scores may differ in the last bits
        assert {**record, "score": None} == {**expected[key], "score": None}
        assert record["score"] == (None if record["error"] else pytest.approx(expected[key]["score"], rel=1e-5))
    for shard in range(3):  # shard i was written by rank i mod 2, once
        stats = json.loads((out / f"0000{shard}.stats.json").read_text())
        assert stats["process"]["slot"] == shard % 2
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["complete"] and summary["this_run"]["samples"] == 16 and summary["this_run"]["shards_done"] == 3
    assert summary["this_run"]["processes"] == 2
    assert sorted(p.name for p in out.glob("*.errors.log")) == ["00001.errors.log"]  # shards 0 and 2 have no failures
    assert sorted(line.split("\t")[0] for line in (out / "00001.errors.log").read_text().splitlines()) == [
        CORRUPT_KEY,
        NO_IMAGE_KEY,
    ]
    assert proc.stderr.count("captioned 14 of 16 samples") == 1  # one summary: rank 0's, with global counts
