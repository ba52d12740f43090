"""Sharded captioning (`clipcap caption SHARDS --output-dir DIR`) against plain captioning
(`clipcap caption FOLDER > out.jsonl`) on the same images, and the effect of --workers.

Both paths run the same loaded model (full-size architecture with random weights, built as in
bench_caption.py: open_clip ViT-B-32 + GPT-2 124M + MLP mapper), so model loading is not timed:
    plain    Captioner.stream over the image files + the JSON Lines writer, as `clipcap caption` does;
    sharded  sharded.run over webdataset tar shards holding the same JPEGs (headers indexed, members
             read by offset, records and stats written through .part files, a writer thread).
The two paths alternate; each keeps its best time: wall clock, CPU time of the main process, and the
time outside the model (wall minus CLIP encoding and decoding: the pipeline's own work, which is
where the two paths differ and is the least disturbed by other jobs on a shared machine). The
records are compared caption for caption.

    python benchmarks/bench_sharded.py                       # CPU, 32 images, workers 0 1 2, best of 2
    python benchmarks/bench_sharded.py --tiny --images 256 --repeat 5   # the pipelines' own costs
    python benchmarks/bench_sharded.py --device cuda --images 512 --workers 0 8 16
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CLIPCAP_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_caption import build, make_images  # noqa: E402  (the same model and images as the caption benchmark)

from clipcap_cli import records  # noqa: E402
from clipcap_cli.batch import sharded as runner  # noqa: E402
from clipcap_cli.batch import shards  # noqa: E402
from clipcap_cli.cli import output  # noqa: E402
from clipcap_cli.cpu import describe  # noqa: E402
from clipcap_cli.data.inputs import Source  # noqa: E402
from clipcap_cli.decoding.decode import DecodingOptions  # noqa: E402


def build_tiny(device: torch.device, tmp: Path):
    """The test suite's tiny random CLIP and GPT-2: the model costs little, so the pipelines' own
    costs (reading, decoding, writing) dominate the times."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import TINY_CLIP_CFG, write_tiny_clip, write_tiny_gpt2

    from clipcap_cli.captioner import Captioner
    from clipcap_cli.config import ModelConfig
    from clipcap_cli.model import ClipCaptionModel
    from clipcap_cli.weights import backbones, clip_tower

    clip_dir, gpt2_dir = write_tiny_clip(tmp / "tiny-clip"), write_tiny_gpt2(tmp / "tiny-gpt2")
    config = ModelConfig(
        mapping="mlp",
        prefix_length=4,
        prefix_size=TINY_CLIP_CFG["embed_dim"],
        clip_model=f"local-dir:{clip_dir}",
        clip_pretrained=None,
        gpt2=str(gpt2_dir),
    )
    model = ClipCaptionModel(config, backbones.load_gpt2(str(gpt2_dir))).eval().to(device)
    clip, preprocess = clip_tower.load_clip(config.clip_model, None, device)
    return Captioner(model, clip, preprocess, backbones.load_tokenizer(str(gpt2_dir)), device)


def write_shards(paths: list[Path], folder: Path, per_shard: int) -> list[Path]:
    """img2dataset-style shards: key.jpg + key.txt + key.json per sample."""
    tars = []
    for s, start in enumerate(range(0, len(paths), per_shard)):
        tars.append(folder / f"{s:05d}.tar")
        with tarfile.open(tars[-1], "w") as tar:
            for k, path in enumerate(paths[start : start + per_shard]):
                key = f"{s:05d}{k:04d}"
                for name, data in (
                    (f"{key}.jpg", path.read_bytes()),
                    (f"{key}.txt", b"a caption"),
                    (f"{key}.json", json.dumps({"url": f"https://example.com/{key}.jpg"}).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return tars


def plain(
    captioner, paths: list[Path], options: DecodingOptions, workers: int, batch_size: int, out: Path
) -> list[str]:
    sources = [Source(str(p), str(p)) for p in paths]
    captions = []
    with open(out, "w", encoding="utf-8") as stream:
        writer = output.get_writer("jsonl", stream)
        for c in captioner.stream(sources, options, batch_size=batch_size, workers=workers):
            writer.write([records.make_record(sources[c.index].name, c.result, c.error)])
            captions.append(c.result.text)
        writer.close()
    return captions


def sharded(
    captioner, tars: list[Path], options: DecodingOptions, workers: int, batch_size: int, out: Path
) -> list[str]:
    job = shards.discover([str(t) for t in tars])
    opts = runner.ShardedOptions(output_dir=out, batch_size=batch_size, workers=workers)
    runner.run(job, lambda: captioner, options, {"benchmark": True}, opts)
    return [json.loads(line)["caption"] for t in tars for line in (out / f"{t.stem}.jsonl").read_text().splitlines()]


class ModelClock:
    """Time spent inside the model (CLIP encoding and decoding): what is left of a run's time is the
    pipeline's own work (reading, JPEG decoding, preprocessing, writing), the part the paths differ in."""

    def __init__(self, captioner):
        self.seconds = 0.0
        for name in ("encode_pixels", "decode"):
            setattr(captioner, name, self._wrap(getattr(captioner, name)))

    def _wrap(self, fn):
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed_call

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def timed(fn, *args):
    """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU time of the
    main process is the steadier measure of the work a path does (it leaves out worker processes)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=16, help="images per tar shard")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="--workers values to time")
    parser.add_argument("--repeat", type=int, default=2, help="time each path this many times, keep the best")
    parser.add_argument(
        "--tiny", action="store_true", help="the tests' tiny random models instead of the full-size ones"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    options = DecodingOptions(max_length=args.max_length)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        captioner = build_tiny(device, tmp) if args.tiny else build(device, tmp)
        (tmp / "images").mkdir()
        paths = make_images(tmp / "images", args.images)
        tars = write_shards(paths, tmp, args.per_shard)
        print(
            f"device {device}, torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
            f"{describe()}, load average {os.getloadavg()[0]:.2f}",
            file=sys.stderr,
        )
        # Warm-up, not timed: one full batch through each path (allocator, kernels, page cache).
        plain(captioner, paths[: args.batch_size], options, 0, args.batch_size, tmp / "warm.jsonl")
        sharded(captioner, tars[:1], options, 0, args.batch_size, tmp / "warm")
        clock = ModelClock(captioner)
        clock.take()
        rows = []
        for workers in args.workers:
            wall: dict[str, list[float]] = {"plain": [], "sharded": []}
            cpu: dict[str, list[float]] = {"plain": [], "sharded": []}
            outside: dict[str, list[float]] = {"plain": [], "sharded": []}  # seconds outside the model
            for r in range(args.repeat):  # alternate the two paths
                texts_plain, seconds, cpu_s = timed(
                    plain, captioner, paths, options, workers, args.batch_size, tmp / "plain.jsonl"
                )
                wall["plain"].append(seconds)
                cpu["plain"].append(cpu_s)
                outside["plain"].append(seconds - clock.take())
                out = tmp / f"out-{workers}-{r}"
                texts_sharded, seconds, cpu_s = timed(sharded, captioner, tars, options, workers, args.batch_size, out)
                wall["sharded"].append(seconds)
                cpu["sharded"].append(cpu_s)
                outside["sharded"].append(seconds - clock.take())
            same = sum(a == b for a, b in zip(texts_plain, texts_sharded))
            rows.append(
                (
                    workers,
                    min(wall["plain"]),
                    min(wall["sharded"]),
                    min(cpu["plain"]),
                    min(cpu["sharded"]),
                    min(outside["plain"]),
                    min(outside["sharded"]),
                    same,
                )
            )
            print(
                f"workers {workers}: plain {fmt(wall['plain'])} s (CPU {fmt(cpu['plain'])}, outside the model "
                f"{fmt(outside['plain'])}), sharded {fmt(wall['sharded'])} s (CPU {fmt(cpu['sharded'])}, outside the "
                f"model {fmt(outside['sharded'])}), identical captions {same}/{len(paths)}",
                file=sys.stderr,
            )

    n = args.images
    print(
        f"\n{n} images (640x480 JPEG) in {len(tars)} tar shards, {device}, {torch.get_num_threads()} threads, "
        f"batch size {args.batch_size}, greedy, max_length {args.max_length}, best of {args.repeat}; random weights "
        f"({'the tests tiny CLIP and GPT-2' if args.tiny else 'ViT-B-32 + GPT-2 124M + MLP K=10'}); load average {os.getloadavg()[0]:.2f} at the end.\n"
    )
    print(
        "| --workers | plain (images/s) | sharded (images/s) | sharded / plain, wall | sharded / plain, main-process CPU "
        "| outside the model: plain, sharded (s) | identical captions |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for workers, p, s, pc, sc, po, so, same in rows:
        print(
            f"| {workers} | {n / p:.2f} | {n / s:.2f} | {p / s:.2f} | {pc / sc:.2f} | {po:.2f}, {so:.2f} | {same}/{n} |"
        )


def fmt(times: list[float]) -> str:
    return "/".join(f"{t:.2f}" for t in times)


if __name__ == "__main__":
    main()
