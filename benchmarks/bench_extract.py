"""Extraction speed: the original parse_coco.py algorithm against `clipcap extract`'s core.

A COCO-shaped set (generated 640x480 JPEGs, 5 captions each) and a full-size ViT-B-32 with random
(seeded) weights, so nothing is downloaded. The baseline follows the original: one encode per
caption entry, batch size 1, the image opened and preprocessed each time (PIL instead of skimage).
Ours is ``features.extract`` as the command calls it: one encode per image, DataLoader workers,
batches. Both use the same model object; model loading is not timed.

    .venv/bin/python benchmarks/bench_extract.py            # 64 images x 5 captions
    .venv/bin/python benchmarks/bench_extract.py --images 16 --workers 0 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_coco(root: Path, n: int, captions: int, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "train2014").mkdir(parents=True)
    entries = []
    for i in range(n):
        # smooth random colour fields compress like photos (pure noise would make 1 MB JPEGs)
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
        img.save(root / "train2014" / f"COCO_train2014_{i + 1:012d}.jpg", quality=90)
        entries += [
            {"image_id": i + 1, "id": i * captions + k, "caption": f"a photo number {i}, caption {k}"}
            for k in range(captions)
        ]
    src = root / "train_caption.json"
    src.write_text(json.dumps(entries))
    return src


def baseline(entries: list[dict], root: Path, model, preprocess) -> tuple[float, dict]:
    """parse_coco.py's loop: per caption entry, open the image, preprocess, encode at batch size 1."""
    import torch
    from PIL import Image

    first: dict = {}
    start = time.perf_counter()
    for entry in entries:
        name = f"COCO_train2014_{int(entry['image_id']):012d}.jpg"
        path = root / "train2014" / name
        image = preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            emb = model.encode_image(image).cpu()
        first.setdefault(entry["image_id"], emb[0])
    return time.perf_counter() - start, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="default: the command's default, min(4, CPU count)")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both paths (default: torch's)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from clipcap_cli.cpu import describe
    from clipcap_cli.data.datasets import read_dataset
    from clipcap_cli.data.features import ExtractOptions, extract, load_features
    from clipcap_cli.data.inputs import default_workers
    from clipcap_cli.weights import clip_tower

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model, preprocess = clip_tower.load_clip(args.model, None, "cpu")
    workers = default_workers("cpu") if args.workers is None else args.workers
    print(
        f"{args.model} (random weights, seed 0), {args.images} images x {args.captions} captions, 640x480 JPEG; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, workers {workers}; "
        f"CPU: {describe()}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_coco(tmp / "coco", args.images, args.captions)
        entries = json.loads(src.read_text())

        base_s, base_emb = baseline(entries, tmp / "coco", model, preprocess)

        ds = read_dataset(src, images=tmp / "coco")
        records = list(ds.records())
        options = ExtractOptions(
            clip_model=args.model, clip_pretrained=None, batch_size=args.batch_size, workers=workers
        )
        start = time.perf_counter()
        result = extract(
            records, ds.images_root, tmp / "feats", options, source=ds.describe(), clip=(model, preprocess)
        )
        ours_s = time.perf_counter() - start
        assert result.complete and not result.skipped
        fs = load_features(tmp / "feats")

    diffs = torch.stack(
        [(fs.embeddings[i].float() - base_emb[r["image_id"]].float()).abs().max() for i, r in enumerate(fs.records)]
    )
    scale = fs.embeddings.abs().max().item()
    n = args.images
    print(
        f"baseline (original algorithm): {len(entries)} encodes at batch 1 in {base_s:.2f} s = {n / base_s:.2f} images/s"
    )
    print(
        f"clipcap extract core:          {n} encodes, batch {args.batch_size}, in {ours_s:.2f} s = {n / ours_s:.2f} images/s"
    )
    print(f"speed-up: {base_s / ours_s:.2f}x")
    print(
        f"embeddings agree: max abs diff per image max {diffs.max():.2e}, median {diffs.median():.2e} (values up to {scale:.2f})"
    )
    if diffs.max() > 1e-3 * max(scale, 1.0):
        sys.exit("embeddings differ more than float rounding allows")


if __name__ == "__main__":
    main()
