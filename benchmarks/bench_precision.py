"""Caption speed and agreement per precision: fp32, bf16, int8 and fast, on this CPU, in one run.

The full-size architecture with random weights (open_clip ViT-B-32 + GPT-2 124M + MLP mapper K=10,
built as ``device_check.build`` does; nothing is downloaded), the same 640x480 JPEGs for every
precision, so reading, preprocessing and CLIP are timed as a user sees them. Each precision goes
through the library's own steps (``precision.apply_precision`` and ``apply_clip_precision``, as
``load_model`` does), so bf16 on a CPU without native bf16 runs fp32, as the CLI would.

It prints the CPU's capability (``cpu.capability()``), images/s for each precision, greedy and beam
5, the ratio to fp32, and how many captions are identical to fp32's. ``fast`` resolves to one of
the others (bf16 on a CPU with native bf16, int8 elsewhere): its row is that precision's run.
Then the int8 routes on one linear layer (``int8_routes.py``): torch's ``quantize_dynamic`` (the
route clipcap takes), onnxruntime's int8 kernels and torchao's, each against fp32, so that the
choice can be revisited (onnxruntime and torchao are optional: their rows are skipped, with the
reason, where they are not installed; ``pip install -e .[bench]`` brings onnxruntime).

    python benchmarks/bench_precision.py                        # 32 images, batch 32, greedy and beam 5
    CLIPCAP_CPU_CAPABILITY=AVX2 python benchmarks/bench_precision.py   # the choices an AVX2-only CPU gets
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 CLIPCAP_CPU_CAPABILITY=AVX2 \
        python benchmarks/bench_precision.py                    # ... and, roughly, its kernels (see ISA_LIMITS)
    python benchmarks/bench_precision.py --routes-only          # the int8 routes alone (a minute)
    python benchmarks/bench_precision.py --dry-run --json       # tiny shapes, seconds (the test)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CLIPCAP_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_check import build  # noqa: E402  (full-size or tiny random models, the real tokenizer)
from int8_routes import measure as measure_routes  # noqa: E402
from int8_routes import print_routes  # noqa: E402

from clipcap_cli.captioner import Captioner  # noqa: E402
from clipcap_cli.cpu import capability, cpu_name  # noqa: E402
from clipcap_cli.decoding.decode import DecodingOptions  # noqa: E402
from clipcap_cli.decoding.precision import apply_clip_precision, apply_precision, resolve_precision  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8", "fast")
# Set to approximate an AVX2-only CPU on a newer one: torch's own kernels, oneDNN (bf16 then runs
# emulated) and MKL keep to AVX2; fbgemm's int8 kernels still pick the best the CPU has.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "CLIPCAP_CPU_CAPABILITY")


def with_precision(base: Captioner, precision: str) -> Captioner:
    """A copy of ``base`` (tokenizer shared) in ``precision``, as ``load_model`` would make it."""
    model, clip = copy.deepcopy(base.model), copy.deepcopy(base.clip_model)
    resolved = apply_precision(model, precision)
    apply_clip_precision(clip, resolved, base.device)
    return Captioner(model, clip, base.preprocess_image, base.tokenizer, base.device)


def caption_runs(args: argparse.Namespace, runs: dict, resolved: dict, images: int) -> dict:
    """{strategy: {precision: row}}: each distinct precision's captions of the same images, against fp32."""
    results: dict = {}
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        from bench_caption import make_images

        base = build(device, tmp, tiny=args.dry_run)
        paths = make_images(tmp, images)
        distinct = list(dict.fromkeys(resolved[p] for p in PRECISIONS))  # each configuration is run once
        captioners = {name: with_precision(base, name) for name in distinct}
        for label, options in runs.items():
            texts: dict[str, list[str]] = {}
            best = {name: float("inf") for name in distinct}
            for c in captioners.values():  # warm-up: first-call allocations, lazy imports
                c.caption(paths[:2], options, batch_size=2)
            for _ in range(args.repeat):
                for name, c in captioners.items():  # alternate the precisions; keep each one's best time
                    start = time.perf_counter()
                    texts[name] = [r.text for r in c.caption(paths, options, batch_size=args.batch_size)]
                    best[name] = min(best[name], time.perf_counter() - start)
                    print(f"{label} {name}: {images / best[name]:.2f} images/s", file=sys.stderr)
            rows = {}
            for p in PRECISIONS:
                name = resolved[p]
                rows[p] = {
                    "runs_as": name,
                    "images_per_s": round(images / best[name], 3),
                    "x_fp32": round(best["fp32"] / best[name], 3),
                    "identical_to_fp32": sum(a == b for a, b in zip(texts[name], texts["fp32"])),
                }
            results["greedy" if label == "greedy" else f"beam{args.beam}"] = rows
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, help="images per run (default 32; --dry-run 4)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, help="tokens per caption (default 20; --dry-run 5)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--only", choices=["greedy", "beam"], help="run one strategy only")
    parser.add_argument("--repeat", type=int, default=1, help="time each precision this many times, keep the best")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dry-run", action="store_true", help="tiny models and few images: checks the script runs")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    routes = parser.add_mutually_exclusive_group()
    routes.add_argument("--no-routes", action="store_true", help="skip the int8 routes on one linear layer")
    routes.add_argument("--routes-only", action="store_true", help="only the int8 routes on one linear layer")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = args.images or (4 if args.dry_run else 32)
    max_length = args.max_length or (5 if args.dry_run else 20)
    device = torch.device("cpu")
    cap = capability()
    resolved = {p: resolve_precision(p, device) for p in PRECISIONS}
    runs = {
        "greedy": DecodingOptions(max_length=max_length),
        "beam": DecodingOptions(strategy="beam", beam_size=args.beam, max_length=max_length),
    }
    if args.only:
        runs = {args.only: runs[args.only]}
    if args.routes_only:
        runs = {}
    load_start = os.getloadavg()[0]
    print(
        f"CPU: {cpu_name()}; torch reports {cap.isa}, native bf16: {cap.native_bf16} ({cap.source}); "
        f"fast = {resolved['fast']}, bf16 = {resolved['bf16']}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load_start:.2f}; "
        f"limits: {' '.join(f'{k}={os.environ[k]}' for k in ISA_LIMITS if k in os.environ) or 'none'}",
        file=sys.stderr,
    )
    report: dict = {
        "cpu": {"name": cpu_name(), **cap.as_dict()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "images": images,
        "batch_size": args.batch_size,
        "max_length": max_length,
        "dry_run": args.dry_run,
        "resolved": resolved,
        "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if k in os.environ},
        "results": {},
    }
    if runs:
        report["results"] = caption_runs(args, runs, resolved, images)
    if not args.no_routes:
        report["int8_routes"] = measure_routes(dry_run=args.dry_run)
    report["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)


def print_table(report: dict) -> None:
    cpu = report["cpu"]
    machine = (
        f"{cpu['name']} (torch: {cpu['isa']}, native bf16: {cpu['native_bf16']}), {report['threads']} threads, "
        f"torch {report['torch']}"
    )
    load = f"load average {report['load_average'][0]} at the start, {report['load_average'][1]} at the end"
    if report["results"]:
        print(
            f"\n{report['images']} images (640x480 JPEG), batch {report['batch_size']}, max_length "
            f"{report['max_length']}, {machine}; random weights "
            f"({'tiny models' if report['dry_run'] else 'ViT-B-32 + GPT-2 124M + MLP K=10'}); {load}. "
            "Times include reading, preprocessing and CLIP."
        )
    else:
        print(f"\n{machine}; {load}.")
    limits = " ".join(f"{k}={v}" for k, v in report["isa_limits"].items())
    print(f"Limits: {limits or 'none (the CPU as it is)'}\n")
    if report["results"]:
        print("| decoding | precision | runs as | images/s | x fp32 | identical captions vs fp32 |")
        print("|---|---|---|---:|---:|---:|")
    for label, rows in report["results"].items():
        for p, row in rows.items():
            print(
                f"| {label} | {p} | {row['runs_as']} | {row['images_per_s']:.2f} | {row['x_fp32']:.2f}x | "
                f"{row['identical_to_fp32']}/{report['images']} |"
            )
    if "int8_routes" in report:
        print_routes(report["int8_routes"])


if __name__ == "__main__":
    main()
