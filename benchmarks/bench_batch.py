"""Which batch size decodes fastest: clipcap's decoding (mapper + GPT-2, CLIP left out: its cost per
image hardly depends on the batch) at several batch sizes, greedy and beam 5, on GPT-2 124M and an
MLP mapper with random weights. The sizes alternate within each repeat; each keeps its best time.
``decoding.CPU_BATCH_SIZE`` holds what this printed on the development machine.

    python benchmarks/bench_batch.py --repeat 2
    python benchmarks/bench_batch.py --only beam --sizes 8 16 32 64 --precision bf16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from clipcap_cli.config import ModelConfig
from clipcap_cli.cpu import describe
from clipcap_cli.decoding.decode import DecodingOptions, generate
from clipcap_cli.decoding.precision import apply_precision
from clipcap_cli.model import ClipCaptionModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--images", type=int, help="images per run (default: the largest size)")
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--only", choices=["greedy", "beam"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = ModelConfig(mapping="mlp", prefix_length=10, prefix_size=512, clip_model="ViT-B-32", gpt2="gpt2")
    model = ClipCaptionModel(config, GPT2LMHeadModel(GPT2Config())).eval()
    apply_precision(model, args.precision)
    n = args.images or max(args.sizes)
    with torch.inference_mode():
        prefix = model.embed_prefix(torch.randn(n, 512, generator=torch.Generator().manual_seed(1)))
    runs = {
        "greedy": DecodingOptions(max_length=args.max_length),
        "beam 5": DecodingOptions(strategy="beam", max_length=args.max_length),
    }
    if args.only:
        runs = {k: v for k, v in runs.items() if k.startswith(args.only)}
    print(
        f"{n} images, {describe()}, {torch.get_num_threads()} threads, {args.precision}, max_length {args.max_length}, "
        f"load average {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
    )
    print("| decoding | " + " | ".join(f"batch {s}" for s in args.sizes) + " |")
    print("|---|" + "---:|" * len(args.sizes))
    for label, options in runs.items():
        generate(model, prefix[:2], options, 13)  # warm-up
        best = {s: float("inf") for s in args.sizes}
        for _ in range(args.repeat):
            for size in args.sizes:
                start = time.perf_counter()
                for i in range(0, n, size):
                    generate(model, prefix[i : i + size], options, 13)
                best[size] = min(best[size], time.perf_counter() - start)
                print(f"{label} batch {size}: {n / best[size]:.2f} images/s", file=sys.stderr)
        print(f"| {label} | " + " | ".join(f"{n / best[s]:.2f}" for s in args.sizes) + " |")
    print(f"\nimages/s, decoding only; {describe()}; load average {os.getloadavg()[0]:.2f} at the end.")


if __name__ == "__main__":
    main()
