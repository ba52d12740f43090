"""One GPU check for clipcap, printed as one JSON object on stdout (progress goes to stderr).

Made to finish in under 6 minutes on one H200-class GPU, with the full-size architectures and random
weights (ViT-B-32 + GPT-2 124M + MLP K=10, built as benchmarks/bench_caption.py builds them; nothing
is downloaded). It measures:

- caption images/s at batch 64 and 256, greedy and beam 5, fp32 and bf16, JPEG decoding included,
  against transformers' ``generate`` on the same GPU in the same precision;
- CLIP extraction images/s in fp16 (JPEG decoding included);
- only-prefix training steps/s with AMP (bf16 autocast);
- how many of 32 images get the same fp32 caption on the GPU as on the CPU (same CLIP embeddings);
- one DDP training step in a one-process NCCL group.

Each part records its error instead of stopping the others, and parts still to run after
--budget seconds are skipped (and listed). ``--dry-run`` runs everything with tiny shapes on the
CPU in seconds (gloo instead of NCCL): the test suite runs it.

    python benchmarks/device_check.py > device_check.json
    python benchmarks/device_check.py --dry-run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CLIPCAP_OFFLINE", "1")

import torch

from clipcap_cli.captioner import Captioner
from clipcap_cli.config import ModelConfig
from clipcap_cli.cpu import describe
from clipcap_cli.data import inputs
from clipcap_cli.decoding.decode import DecodingOptions, generate, stop_token_id
from clipcap_cli.decoding.precision import apply_precision
from clipcap_cli.model import ClipCaptionModel
from clipcap_cli.weights import backbones, clip_tower

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_caption import make_images  # noqa: E402  (the same 640x480 JPEGs)
from released import write_gpt2_tokenizer  # noqa: E402  (bench_caption put tests/ on the path)

FULL = {
    "batches": (64, 256),
    "images": 512,
    "max_length": 20,
    "train_batch": 64,
    "train_steps": 30,
    "agreement_images": 32,
    "workers": max(1, min(12, (os.cpu_count() or 1) - 2)),
}
DRY = {
    "batches": (4, 8),
    "images": 8,
    "max_length": 6,
    "train_batch": 4,
    "train_steps": 2,
    "agreement_images": 4,
    "workers": 0,
}
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def log(message: str) -> None:
    print(f"[device_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- setup


def build(device: torch.device, tmp: Path, tiny: bool) -> Captioner:
    """Full-size (or, for --dry-run, tiny) random models and the real GPT-2 tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok_dir = write_gpt2_tokenizer(tmp / "gpt2-tokenizer")
    if tiny:
        clip_dir = tmp / "tiny-clip"
        clip_dir.mkdir()
        cfg = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}}
        (clip_dir / "open_clip_config.json").write_text(json.dumps(cfg))
        clip_name, prefix_size, gpt_config = f"local-dir:{clip_dir}", 32, GPT2Config(n_embd=32, n_layer=2, n_head=2)
    else:
        clip_name, prefix_size, gpt_config = "ViT-B-32", 512, GPT2Config()
    config = ModelConfig(
        mapping="mlp",
        prefix_length=10,
        prefix_size=prefix_size,
        clip_model=clip_name,
        clip_pretrained=None,
        gpt2=str(tok_dir),
    )
    model = ClipCaptionModel(config, GPT2LMHeadModel(gpt_config)).eval().to(device)
    clip, preprocess = clip_tower.load_clip(clip_name, None, device)  # fp16 on CUDA
    return Captioner(model, clip, preprocess, backbones.load_tokenizer(str(tok_dir)), device)


def with_precision(captioner: Captioner, precision: str) -> Captioner:
    model = copy.deepcopy(captioner.model)
    apply_precision(model, precision)
    return Captioner(model, captioner.clip_model, captioner.preprocess_image, captioner.tokenizer, captioner.device)


def pixel_batches(captioner: Captioner, paths: list[Path], batch: int, workers: int):
    """JPEG decoding and CLIP preprocessing as `clipcap caption` does them, pixels moved through pinned memory."""
    for loaded in inputs.load_batches([str(p) for p in paths], captioner.preprocess_image, batch, workers):
        yield loaded.pixels.to(captioner.device, non_blocking=True)  # pinned by the loader on CUDA


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- the parts


def caption_speed(captioner: Captioner, bf16: Captioner, paths: list[Path], s: dict) -> dict:
    """images/s of clipcap and of transformers' generate, per strategy, batch and precision."""
    out: dict[str, Any] = {}
    for name, options in (
        ("greedy", DecodingOptions(max_length=s["max_length"])),
        ("beam5", DecodingOptions(strategy="beam", max_length=s["max_length"])),
    ):
        for batch in s["batches"]:
            row: dict[str, float] = {}
            for precision, cap in (("fp32", captioner), ("bf16", bf16)):
                ours = functools.partial(stream_all, cap, paths, batch, s["workers"], options)
                theirs = functools.partial(
                    run_batches, cap, paths, batch, s["workers"], functools.partial(hf_generate, cap), options
                )
                ours()  # warm-up: CUDA graph capture, cuBLAS autotuning
                theirs()
                row[precision] = round(len(paths) / seconds(ours, cap.device), 1)
                row[f"generate_{precision}"] = round(len(paths) / seconds(theirs, cap.device), 1)
                row[f"x_generate_{precision}"] = round(row[precision] / row[f"generate_{precision}"], 2)
                log(f"caption {name} batch {batch} {precision}: {row}")
            out.setdefault(name, {})[str(batch)] = row
    return out


def stream_all(captioner: Captioner, paths: list[Path], batch: int, workers: int, options: DecodingOptions) -> None:
    """clipcap's own pipeline, as `clipcap caption` runs it (JPEG decoding in workers, pinned copies)."""
    for out in captioner.stream(paths, options, batch_size=batch, workers=workers):
        assert out.error is None, out.error


def run_batches(
    captioner: Captioner,
    paths: list[Path],
    batch: int,
    workers: int,
    caption: Callable[[torch.Tensor, DecodingOptions], Any],
    options: DecodingOptions,
) -> None:
    for pixels in pixel_batches(captioner, paths, batch, workers):
        caption(pixels, options)


def hf_generate(captioner: Captioner, pixels: torch.Tensor, options: DecodingOptions) -> torch.Tensor:
    model = captioner.model
    with torch.inference_mode():
        prefix = model.embed_prefix(captioner.encode_pixels(pixels)).to(model.gpt.dtype)
        beams = {"num_beams": options.beam_size} if options.strategy == "beam" else {}
        return model.gpt.generate(
            inputs_embeds=prefix,
            max_new_tokens=options.max_length,
            do_sample=False,
            eos_token_id=stop_token_id(captioner.tokenizer, "."),
            pad_token_id=captioner.tokenizer.eos_token_id,
            **beams,
        )


def clip_speed(captioner: Captioner, paths: list[Path], s: dict) -> float:
    batch = s["batches"][-1]

    def run() -> None:
        for pixels in pixel_batches(captioner, paths, batch, s["workers"]):
            captioner.encode_pixels(pixels)

    run()
    return round(len(paths) / seconds(run, captioner.device), 1)


def train_speed(captioner: Captioner, s: dict) -> dict:
    """Only-prefix training (GPT-2 frozen, the mapper learns) with bf16 autocast on CUDA."""
    device = captioner.device
    config = dataclasses.replace(captioner.model.config, only_prefix=True)
    model = ClipCaptionModel(config, copy.deepcopy(captioner.model.gpt)).to(device).train()
    optimizer = torch.optim.AdamW(model.clip_project.parameters(), lr=2e-5)
    b, length = s["train_batch"], 20
    tokens = torch.randint(0, 50257, (b, length), device=device)
    mask = torch.ones(b, length, dtype=torch.bool, device=device)
    clip = torch.randn(b, config.prefix_size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with amp:
            _, loss = model(tokens, clip, mask, targets=tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    steps = s["train_steps"]
    took = seconds(lambda: [step() for _ in range(steps)], device)
    return {
        "batch": b,
        "tokens": length,
        "amp": "bf16" if device.type == "cuda" else "off",
        "steps_per_s": round(steps / took, 2),
    }


def gpu_cpu_agreement(captioner: Captioner, paths: list[Path], s: dict) -> dict:
    """The same CLIP embeddings decoded in fp32 on the device and on the CPU: identical captions."""
    n = s["agreement_images"]
    embeddings = torch.cat([captioner.encode_pixels(p) for p in pixel_batches(captioner, paths[:n], n, 0)])
    cpu_model = copy.deepcopy(captioner.model).cpu()
    stop = stop_token_id(captioner.tokenizer, ".")
    out: dict[str, Any] = {"images": n}
    for name, options in (
        ("greedy", DecodingOptions(max_length=s["max_length"])),
        ("beam5", DecodingOptions(strategy="beam", max_length=s["max_length"])),
    ):
        with torch.inference_mode():
            here = generate(captioner.model, captioner.model.embed_prefix(embeddings), options, stop)
            there = generate(cpu_model, cpu_model.embed_prefix(embeddings.cpu()), options, stop)
        out[name] = sum(a[0][0] == b[0][0] for a, b in zip(here, there))
    return out


def ddp_step(captioner: Captioner) -> dict:
    """One DDP training step of the mapper in a process group of one (NCCL on CUDA, gloo on the CPU)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    device = captioner.device
    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as sock:  # a free local port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        mapper = copy.deepcopy(captioner.model.clip_project).train()
        ddp = DistributedDataParallel(mapper, device_ids=[device.index or 0] if device.type == "cuda" else None)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
        x = torch.randn(8, captioner.model.config.prefix_size, device=device)
        took = seconds(lambda: (ddp(x).square().mean().backward(), optimizer.step()), device)
        total = torch.ones(1, device=device)
        dist.all_reduce(total)
        return {"backend": backend, "ok": bool(total.item() == 1.0), "seconds": round(took, 3)}
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the device to check (--dry-run: cpu)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, in seconds")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds after which remaining parts are skipped")
    args = parser.parse_args()
    s = DRY if args.dry_run else FULL
    device = torch.device("cpu" if args.dry_run else args.device)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny ops: a second thread only adds waits (and stalls on a busy machine)
    start = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu": describe(),
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "max_length": s["max_length"],
        "images": s["images"],
        "errors": {},
        "skipped": [],
    }
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        log(f"building models on {device}")
        captioner = build(device, tmp, args.dry_run)
        bf16 = with_precision(captioner, "bf16")
        paths = make_images(tmp, s["images"])
        parts: dict[str, Callable[[], Any]] = {
            "caption": lambda: caption_speed(captioner, bf16, paths, s),
            "clip_fp16_images_per_s" if device.type == "cuda" else "clip_images_per_s": lambda: clip_speed(
                captioner, paths, s
            ),
            "train_only_prefix": lambda: train_speed(captioner, s),
            "gpu_cpu_identical": lambda: gpu_cpu_agreement(captioner, paths, s),
            "ddp_step": lambda: ddp_step(captioner),
        }
        for name, part in parts.items():
            if time.perf_counter() - start > args.budget:
                report["skipped"].append(name)
                continue
            log(f"{name} ...")
            try:
                report[name] = part()
            except Exception as exc:  # one broken part must not lose the others' numbers
                report["errors"][name] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc(file=sys.stderr)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
