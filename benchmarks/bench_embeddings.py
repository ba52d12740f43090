"""Captions from stored embeddings (`clipcap caption --embeddings`) against captions from the JPEGs
(`clipcap caption FOLDER`), on the same loaded model: images/s for each, and whether the captions agree.

The embeddings are the model's own CLIP output for the same images, stored in clip-retrieval's layout
(``img_emb/img_emb_0.npy`` + ``metadata/metadata_0.parquet``) and read through ``embeddings_in``, as
`--embeddings` reads them. Model loading is not timed; both paths write JSON Lines records.
    jpeg        Captioner.stream over the image files: JPEG decoding, CLIP preprocessing and encoding, decoding
    embeddings  Captioner.stream over the stored rows: decoding only (no image is read)

    python benchmarks/bench_embeddings.py                    # CPU, full-size random weights, 32 images, best of 2
    python benchmarks/bench_embeddings.py --tiny --images 256  # the tests' tiny models: the pipelines' own costs
    python benchmarks/bench_embeddings.py --dry-run --json     # a few seconds: checks the script works
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CLIPCAP_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_caption import build, make_images  # noqa: E402  (the caption benchmark's model and images)
from bench_sharded import build_tiny, timed  # noqa: E402

from clipcap_cli import records  # noqa: E402
from clipcap_cli.batch.sharded_output import make_record  # noqa: E402
from clipcap_cli.batch.shards import seed_id  # noqa: E402
from clipcap_cli.cli import output  # noqa: E402
from clipcap_cli.cpu import describe  # noqa: E402
from clipcap_cli.data import embeddings_in  # noqa: E402
from clipcap_cli.data.inputs import Source  # noqa: E402
from clipcap_cli.decoding.decode import DecodingOptions  # noqa: E402


def store(captioner, paths: list[Path], root: Path) -> Path:
    """The images' CLIP embeddings in clip-retrieval's layout; returns the folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    with torch.no_grad():
        emb = captioner.encode([str(p) for p in paths]).cpu().numpy()
    np.save(root / "img_emb" / "img_emb_0.npy", emb.astype(np.float32))
    pq.write_table(pa.table({"image_path": [str(p) for p in paths]}), root / "metadata" / "metadata_0.parquet")
    return root


def from_jpegs(captioner, paths: list[Path], options: DecodingOptions, batch_size: int, out: Path) -> list[str]:
    sources = [Source(str(p), str(p)) for p in paths]
    texts = []
    with open(out, "w", encoding="utf-8") as stream:
        writer = output.get_writer("jsonl", stream)
        for c in captioner.stream(sources, options, batch_size=batch_size, workers=0):
            writer.write([records.make_record(sources[c.index].name, c.result, c.error)])
            texts.append(c.result.text)
        writer.close()
    return texts


def from_embeddings(captioner, folder: Path, options: DecodingOptions, batch_size: int, out: Path) -> list[str]:
    shards = embeddings_in.discover([str(folder)])
    embeddings_in.check(shards, captioner.config)
    samples = [s for shard in shards for s in shard.samples()[0]]
    texts = []
    with open(out, "w", encoding="utf-8") as stream:
        writer = output.get_writer("jsonl", stream)
        for sample, c in zip(
            samples,
            captioner.stream(
                samples, options, batch_size=batch_size, workers=0, seed_id=seed_id, group_of=lambda s: s.shard
            ),
        ):
            writer.write([make_record(sample, c, False, False)])
            texts.append(c.result.text)
        writer.close()
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=20, help="tokens per caption (random weights never stop)")
    parser.add_argument("--repeat", type=int, default=2, help="time each path this many times, keep the best")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny random models instead of full-size ones")
    parser.add_argument("--dry-run", action="store_true", help="tiny models, 8 images, once: checks the script")
    parser.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    args = parser.parse_args()
    if args.dry_run:
        args.tiny, args.images, args.repeat, args.batch_size, args.max_length = True, 8, 1, 4, 6

    device = torch.device(args.device)
    options = DecodingOptions(max_length=args.max_length)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        captioner = build_tiny(device, tmp) if args.tiny else build(device, tmp)
        (tmp / "images").mkdir()
        paths = make_images(tmp / "images", args.images)
        folder = store(captioner, paths, tmp / "clip-retrieval")
        # Warm-up, not timed: one batch through each path.
        from_jpegs(captioner, paths[: args.batch_size], options, args.batch_size, tmp / "warm.jsonl")
        from_embeddings(captioner, folder, options.replace(max_length=2), args.batch_size, tmp / "warm2.jsonl")
        best: dict[str, float] = {"jpeg": float("inf"), "embeddings": float("inf")}
        texts: dict[str, list[str]] = {}
        for _ in range(args.repeat):  # alternate the two paths
            texts["jpeg"], seconds, _cpu = timed(
                from_jpegs, captioner, paths, options, args.batch_size, tmp / "jpeg.jsonl"
            )
            best["jpeg"] = min(best["jpeg"], seconds)
            texts["embeddings"], seconds, _cpu = timed(
                from_embeddings, captioner, folder, options, args.batch_size, tmp / "emb.jsonl"
            )
            best["embeddings"] = min(best["embeddings"], seconds)
    n = args.images
    report = {
        "dry_run": args.dry_run,
        "cpu": describe(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "model": "tests' tiny CLIP + GPT-2" if args.tiny else "ViT-B-32 + GPT-2 124M + MLP K=10, random weights",
        "images": n,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "repeat": args.repeat,
        "images_per_s": {k: n / v for k, v in best.items()},
        "speedup": best["jpeg"] / best["embeddings"],
        "identical_captions": sum(a == b for a, b in zip(texts["jpeg"], texts["embeddings"])),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    rate = report["images_per_s"]
    print(
        f"{n} images (640x480 JPEG), {device} ({report['cpu']}, {report['threads']} threads), batch {args.batch_size}, "
        f"greedy, max_length {args.max_length}, best of {args.repeat}; {report['model']}\n\n"
        "| from | images/s |\n|---|---:|\n"
        f"| JPEGs | {rate['jpeg']:.2f} |\n| stored embeddings | {rate['embeddings']:.2f} |\n\n"
        f"embeddings / JPEGs: {report['speedup']:.2f}x; identical captions {report['identical_captions']}/{n}"
    )


if __name__ == "__main__":
    main()
