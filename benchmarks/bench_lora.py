"""The three ways to train the LM side, on tiny models: only the prefix (LM frozen), LoRA, the whole LM.

One table: trainable parameters, checkpoint size and held-out loss after the same optimizer steps, with
the same seed, data order, mapper initialisation and learning rate. Each run is `clipcap train`'s own
(``train.train``); nothing is downloaded.

The data are synthetic CLIP features of the coloured shapes of tests/test_learns.py: each of the 9
(colour, shape) classes has its own random direction in the embedding space, every image is its class's
direction plus noise, and its captions are "a red circle." and "a red circle on a white background.". The
LM is a tiny GPT-2 (GPT-2's real tokenizer) first trained on the captions' text alone, as a pretrained LM
knows its language: which colour and shape an image shows has to come through the prefix. The held-out
images are a seeded 20 % of the images.

    .venv/bin/python benchmarks/bench_lora.py                    # 64-wide 2-layer GPT-2, 6 epochs
    .venv/bin/python benchmarks/bench_lora.py --rank 4 --lr 2e-3 --json
    .venv/bin/python benchmarks/bench_lora.py --lora-lr 5e-3     # and a fourth row: LoRA at its own lr
    .venv/bin/python benchmarks/bench_lora.py --quick            # a few steps: that it runs (the test)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from released import write_gpt2_tokenizer  # noqa: E402  (GPT-2's real vocabulary files)

COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square", "triangle")
EMBED_DIM = 512  # ViT-B/32's width, as the store says
MODES = ("only-prefix", "lora", "full")


def captions(colour: str, shape: str) -> list[str]:
    return [f"a {colour} {shape}.", f"a {colour} {shape} on a white background."]


def pretrain(lm, tokenizer_dir: Path, steps: int) -> None:
    """Teach the random LM the captions' language, without images (a pretrained LM knows its language):
    every caption of every class, one batch, ``steps`` AdamW steps. What it cannot know is which colour and
    shape an image shows: that has to come through the prefix."""
    import torch
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(tokenizer_dir)
    texts = [c for colour in COLOURS for shape in SHAPES for c in captions(colour, shape)]
    ids = [tok.encode(t) for t in texts]
    n = max(len(x) for x in ids)
    batch = torch.tensor([x + [tok.eos_token_id] * (n - len(x)) for x in ids])
    labels = batch.masked_fill(torch.arange(n) >= torch.tensor([len(x) for x in ids])[:, None], -100)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    lm.train()
    for _ in range(steps):
        loss = lm(input_ids=batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lm.eval()


def make_inputs(
    root: Path, per_class: int, width: int, layers: int, pretrain_steps: int, seed: int = 0
) -> tuple[Path, Path]:
    """A tiny GPT-2 folder (real tokenizer), pretrained on the captions' text, and a features store of the
    shapes' synthetic features."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from clipcap_cli.config import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
    from clipcap_cli.data.features import save_features

    gpt_dir = root / "gpt2-tiny"
    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=layers, n_head=2, n_positions=64))
    write_gpt2_tokenizer(gpt_dir)
    pretrain(lm, gpt_dir, pretrain_steps)
    lm.save_pretrained(gpt_dir)
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(len(COLOURS) * len(SHAPES), EMBED_DIM, generator=g), dim=-1)
    rows, records = [], []
    for c, colour in enumerate(COLOURS):
        for s, shape in enumerate(SHAPES):
            for _ in range(per_class):
                rows.append(centres[c * len(SHAPES) + s] + 0.3 * torch.randn(EMBED_DIM, generator=g) / EMBED_DIM**0.5)
                caps = captions(colour, shape)
                records.append(
                    {"image": f"{colour}-{shape}-{len(records)}.png", "image_id": len(records), "captions": caps}
                )
    meta = {"clip_model": DEFAULT_CLIP_MODEL, "clip_pretrained": DEFAULT_CLIP_PRETRAINED, "preprocess": "synthetic"}
    store = save_features(root / "feats", torch.stack(rows).half(), records, meta)
    return gpt_dir, store


def run_mode(mode: str, gpt_dir: Path, store: Path, out: Path, args: argparse.Namespace) -> dict:
    """One `clipcap train` run; its trainable parameters, checkpoint size, held-out loss and time."""
    from clipcap_cli import train

    class Start(train.TrainCallback):
        info = None

        def on_start(self, info):
            Start.info = info

    extra = {"only-prefix": {"only_prefix": True}, "full": {}}.get(mode, {"lora": args.rank})
    lr = args.lora_lr if mode == "lora-lr" else args.lr
    opts = train.TrainOptions.create(
        gpt2=str(gpt_dir),
        prefix_length=4,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=lr,
        warmup=args.warmup,
        val_fraction=0.2,
        samples=0,
        seed=args.seed,
        device="cpu",
        **extra,
    )
    t0 = time.perf_counter()
    result = train.train(opts, store, out, callback=Start())
    seconds = time.perf_counter() - t0
    last = result.checkpoints[-1]
    return {
        "mode": f"lora, lr {lr:g}" if mode == "lora-lr" else mode,
        "lr": lr,
        "trainable_params": Start.info.trainable_params,
        "checkpoint_mb": round(last.stat().st_size / 1e6, 3),
        "held_out_loss": round(result.val_loss, 4),
        "train_loss": round(result.train_loss, 4),
        "steps": result.step,
        "seconds": round(seconds, 1),
    }


def table(rows: list[dict], lm_params: int) -> str:
    """Markdown. "LM side": what trains beside the mapper (the adapters, or the LM's own weights)."""
    mapper = next(r["trainable_params"] for r in rows if r["mode"] == "only-prefix")
    lines = [
        "| mode | trainable parameters | of them on the LM side | checkpoint | held-out loss | steps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        side = r["trainable_params"] - mapper
        lines.append(
            f"| {r['mode']} | {r['trainable_params']:,} | {side:,} ({100 * side / lm_params:.1f} % of the LM's) "
            f"| {r['checkpoint_mb']:.2f} MB | {r['held_out_loss']:.3f} | {r['steps']} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--lr", type=float, default=1e-3, help="the same peak learning rate for every mode")
    p.add_argument("--lora-lr", type=float, default=None, help="add a LoRA row at this learning rate")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--per-class", type=int, default=20, help="images per (colour, shape): 9 classes")
    p.add_argument("--width", type=int, default=64, help="GPT-2 width (n_embd)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pretrain-steps", type=int, default=150, help="the LM's steps on the captions' text alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a few steps on the smallest sizes: that it runs")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.per_class, args.width, args.warmup, args.batch_size = 1, 4, 16, 1, 8
        args.pretrain_steps = 2

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gpt_dir, store = make_inputs(root, args.per_class, args.width, args.layers, args.pretrain_steps, args.seed)
        from transformers import GPT2LMHeadModel

        lm_params = sum(p.numel() for p in GPT2LMHeadModel.from_pretrained(gpt_dir).parameters())
        modes = MODES + (("lora-lr",) if args.lora_lr else ())
        rows = [run_mode(mode, gpt_dir, store, root / mode, args) for mode in modes]
    from clipcap_cli import cpu

    names = ("rank", "lr", "epochs", "batch_size", "per_class", "width", "layers", "pretrain_steps")
    settings = {k: getattr(args, k) for k in names}
    if args.json:
        print(json.dumps({"settings": settings, "lm_params": lm_params, "rows": rows, "cpu": cpu.report()}))
        return
    print(f"tiny GPT-2 {args.width}x{args.layers} ({lm_params:,} parameters), LoRA rank {args.rank}, lr {args.lr:g}")
    print(f"CPU: {cpu.describe()} (losses are deterministic; the CPU matters only for the time taken)")
    print(table(rows, lm_params))


if __name__ == "__main__":
    main()
