"""Training memory stays flat as the features store grows: `clipcap train` on a synthetic sharded
store of 10 k captions and on one of 1 M, the same steps on each, peak RSS and steps/s compared.

Each store holds random fp16 CLIP-sized embeddings (D = 512) and short random captions (5 per
image, 3 to 7 words), in shards of ``--shard-images`` images (1 M captions = 200 k images = 400
shards by default). Stores, the tiny GPT-2 (tests/conftest.py's: real vocabulary, width 32) and
the token caches are kept under ``--work``, so a rerun goes straight to training. Each store is
trained in a fresh subprocess through the real ``train.train`` (``--buffer-shards`` shards shuffled
together), stopped after ``--steps`` optimizer steps; it reports its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``: the whole process, tokenisation included when the cache
was built in that run), the RSS peak already reached when training starts (after tokenising and
counting), and steps/s over the steps after the first ``--warm``. One JSON line per store, then
one with the ratios (1 M / 10 k; the target is a peak RSS ratio within 1.10).

    python benchmarks/streaming.py --work /tmp/clipcap-stream             # 10 k vs 1 M, 300 steps
    python benchmarks/streaming.py --work /tmp/s --captions 2000,4000 --steps 5    # a quick check
    python benchmarks/streaming.py --work /tmp/clipcap-stream --compare-whole  # + load_features' RSS per store
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CLIPCAP_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from clipcap_cli.cpu import capability, describe  # noqa: E402

D = 512
WORDS = "a an the dog cat man woman child bus car tree red blue green small big on near with under sits runs".split()


def build_store(folder: Path, captions: int, per_image: int, shard_images: int) -> Path:
    """A sharded store of ``captions`` captions (cached: rebuilt only when its recipe differs)."""
    import torch

    from clipcap_cli.data.store import finish_sharded, write_shard

    recipe = {"captions": captions, "per_image": per_image, "shard_images": shard_images, "d": D, "version": 2}
    meta_file = folder / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()).get("bench_recipe") == recipe:
        return folder
    meta = {
        "clip_model": "ViT-B-32",
        "clip_pretrained": "openai",
        "preprocess": "synthetic (benchmarks/streaming.py)",
        "bench_recipe": recipe,
    }
    folder.mkdir(parents=True, exist_ok=True)
    meta_file.unlink(missing_ok=True)
    n_images = -(-captions // per_image)
    g = torch.Generator().manual_seed(0)
    entries = []
    for s, first in enumerate(range(0, n_images, shard_images)):
        ids = range(first, min(first + shard_images, n_images))
        lengths = torch.randint(3, 8, (len(ids) * per_image,), generator=g).tolist()
        words = torch.randint(0, len(WORDS), (sum(lengths),), generator=g).tolist()
        records, w = [], 0
        for k, i in enumerate(ids):
            caps = []
            for j in range(per_image):
                if i * per_image + j >= captions:
                    break
                n = lengths[k * per_image + j]
                caps.append(" ".join(WORDS[x] for x in words[w : w + n]) + ".")
                w += n
            records.append({"image": f"{i:07d}.jpg", "image_id": i, "captions": caps})
        emb = torch.randn(len(ids), D, generator=g).half()
        entries.append(write_shard(folder, s, emb, records, meta))
    return finish_sharded(folder, entries, meta)


def whole(args: argparse.Namespace) -> None:
    """For comparison, in a fresh process: the peak RSS of loading the store whole (``load_features``:
    all embeddings and records, as training did before it streamed; its tokens not included)."""
    import open_clip  # noqa: F401  (imports are not the store's: measured before it is read)
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    from clipcap_cli.data.features import load_features
    from clipcap_cli.weights import backbones  # noqa: F401

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    fs = load_features(args.store)
    print(
        json.dumps(
            {
                "whole_store_images": len(fs),
                "whole_load_s": round(time.perf_counter() - t, 2),
                "whole_load_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "whole_load_rss_added_mb": round(
                    (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, 1
                ),
            }
        ),
        flush=True,
    )


def child(args: argparse.Namespace) -> None:
    """One training run in this (fresh) process: print one JSON line."""
    import torch

    from clipcap_cli import train

    torch.set_num_threads(args.threads)
    tokens_dir = Path(args.store) / "tokens"
    cached = tokens_dir.is_dir() and any(tokens_dir.iterdir())
    marks: dict[str, float] = {}

    class Stop(Exception):
        pass

    class Probe(train.TrainCallback):
        def on_start(self, info: train.StartInfo) -> None:
            marks["prepared"] = time.perf_counter()
            marks["rss_at_start_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            marks["train_captions"] = info.train_samples
            marks["steps_per_epoch"] = info.steps_per_epoch

        def on_step(self, info: train.StepInfo) -> None:
            if info.step == args.warm:
                marks["warm"] = time.perf_counter()
            if info.step == args.steps:
                marks["end"] = time.perf_counter()
                raise Stop

    opts = train.TrainOptions.create(
        gpt2=args.gpt2,
        prefix_length=4,
        epochs=1,
        batch_size=args.batch_size,
        lr=1e-3,
        warmup=10,
        buffer_shards=args.buffer_shards,
        checkpoint_every=10**9,
        device="cpu",
    )
    start = time.perf_counter()
    try:
        train.train(opts, args.store, Path(args.out), callback=Probe())
    except Stop:
        pass
    else:
        raise SystemExit(f"the run ended before step {args.steps}: use more captions or fewer steps")
    timed = args.steps - args.warm
    print(
        json.dumps(
            {
                "store": args.store,
                "captions": int(json.loads((Path(args.store) / "meta.json").read_text())["num_captions"]),
                "shards": len(json.loads((Path(args.store) / "meta.json").read_text())["shards"]),
                "train_captions": marks["train_captions"],
                "tokens_cached_before": cached,
                "prepare_s": round(marks["prepared"] - start, 2),
                "rss_at_start_mb": round(marks["rss_at_start_kb"] / 1024, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "steps": args.steps,
                "steps_per_s": round(timed / (marks["end"] - marks["warm"]), 2),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipcap-streaming-bench"), help="cache folder")
    parser.add_argument("--captions", default="10000,1000000", help="comma-separated store sizes, in captions")
    parser.add_argument("--per-image", type=int, default=5)
    parser.add_argument("--shard-images", type=int, default=500, help="images per shard")
    parser.add_argument("--buffer-shards", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warm", type=int, default=None, help="untimed first steps (default: steps // 10)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--compare-whole", action="store_true", help="also measure loading each store whole (the pre-streaming way)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--gpt2", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.warm = max(1, args.steps // 10) if args.warm is None else args.warm
    if args.warm >= args.steps:
        parser.error("--warm must be below --steps")
    if args.whole:
        whole(args)
        return
    if args.child:
        child(args)
        return

    import shutil

    import torch
    from conftest import write_tiny_gpt2

    args.work.mkdir(parents=True, exist_ok=True)
    gpt2 = args.work / "tiny-gpt2"
    if not (gpt2 / "config.json").is_file():
        write_tiny_gpt2(gpt2)
    sizes = [int(x) for x in args.captions.split(",")]
    print(
        json.dumps(
            {
                "cpu": describe(),
                "cpu_capability": str(capability()),
                "cores": os.cpu_count(),
                "threads": args.threads,
                "torch": torch.__version__,
                "batch_size": args.batch_size,
                "buffer_shards": args.buffer_shards,
                "shard_images": args.shard_images,
            }
        ),
        flush=True,
    )
    results = []
    for n in sizes:
        t = time.perf_counter()
        store = build_store(args.work / f"store-{n}", n, args.per_image, args.shard_images)
        built_s = time.perf_counter() - t
        out = args.work / f"run-{n}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, __file__, "--child", "--store", str(store), "--gpt2", str(gpt2), "--out", str(out)]
        cmd += ["--steps", str(args.steps), "--warm", str(args.warm), "--batch-size", str(args.batch_size)]
        cmd += ["--buffer-shards", str(args.buffer_shards), "--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env["CLIPCAP_HOME"] = str(args.work / "home")  # the sha256 cache and any fallback token cache
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the run on {store} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["store_build_s"] = round(built_s, 2)
        if args.compare_whole:
            cmd = [sys.executable, __file__, "--whole", "--store", str(store)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise SystemExit(f"loading {store} whole failed:\n{done.stderr[-3000:]}")
            result.update(json.loads(done.stdout.strip().splitlines()[-1]))
        results.append(result)
        print(json.dumps(result), flush=True)
    if len(results) >= 2:
        small, big = results[0], results[-1]
        print(
            json.dumps(
                {
                    "captions_ratio": round(big["captions"] / small["captions"], 1),
                    "peak_rss_ratio": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3),
                    "rss_at_start_ratio": round(big["rss_at_start_mb"] / small["rss_at_start_mb"], 3),
                    "steps_per_s_ratio": round(big["steps_per_s"] / small["steps_per_s"], 3),
                    "within_10_percent": big["peak_rss_mb"] <= 1.10 * small["peak_rss_mb"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
