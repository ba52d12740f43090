"""Training speed: the original train.py's step against `clipcap train`'s, on full-size GPT-2.

GPT-2 124M with random (seeded) weights, so nothing is downloaded, and COCO-shaped captions: about
12 tokens on average with a long tail (2% have 40 tokens), batch size 8. Two settings:

* ``only-prefix``: transformer mapper (K=10, clip_length 10, 8 layers), GPT-2 frozen;
* ``full``: MLP mapper (K=10), GPT-2 fine-tuned.

The baseline follows the original loop: every batch padded to the dataset-wide max_seq_len
(min(mean + 10 std, max)), the attention mask passed to GPT-2 (first-epoch behaviour), logits for
all K+T positions sliced at [K-1:-1], cross-entropy with ignore_index=0, and in only-prefix mode
GPT-2 keeps requires_grad=True so its gradients are computed (and never zeroed) though only the
mapper is optimised. Ours is `clipcap train`'s own step (``train.train_step``): per-batch
padding, no attention mask, the LM head on the scored positions only, no GPT-2 gradients when
frozen. Both run the same batches in alternating blocks, so machine noise hits both alike;
AdamW and the schedule are the same. Model building, data loading setup and warm-up steps are not timed.

    .venv/bin/python benchmarks/bench_train.py                       # both settings, 12 timed steps each
    .venv/bin/python benchmarks/bench_train.py --modes only-prefix --steps 12 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from released import write_gpt2_tokenizer  # noqa: E402  (GPT-2's real vocabulary files)

WORDS = [" dog", " cat", " man", " woman", " street", " table", " red", " car", " bus", " pizza", " plate", " tree"]
K = 10


def caption_lengths(n: int, seed: int = 0) -> list[int]:
    """COCO-like GPT-2 token counts: normal(11.5, 2.5) clipped to [6, 25], and 2% of 40 tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.normal(11.5, 2.5, n)), 6, 25).astype(int)
    lengths[rng.random(n) < 0.02] = 40
    return lengths.tolist()


def make_run_inputs(root: Path, n: int) -> tuple[Path, Path]:
    """A local random GPT-2 124M (with the real tokenizer) and a features store of n captions."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from clipcap_cli.config import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
    from clipcap_cli.data.features import save_features

    gpt_dir = root / "gpt2-random"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(gpt_dir)
    write_gpt2_tokenizer(gpt_dir)  # GPT-2's vocab.json / merges.txt (test extra)

    # "A" + n-2 one-token words + "." = n tokens; one caption per image, like a shuffled COCO.
    records = []
    for i, length in enumerate(caption_lengths(n)):
        words = "".join(WORDS[(i + j) % len(WORDS)] for j in range(length - 2))
        records.append({"image": f"{i}.jpg", "image_id": i, "captions": [f"A{words}."]})
    g = torch.Generator().manual_seed(0)
    store = save_features(
        root / "feats",
        torch.randn(n, 512, generator=g).half(),
        records,
        {"clip_model": DEFAULT_CLIP_MODEL, "clip_pretrained": DEFAULT_CLIP_PRETRAINED, "preprocess": "bench"},
    )
    return gpt_dir, store


class OriginalStep:
    """The original train.py's per-batch work, on our ClipCaptionModel (same weights layout)."""

    def __init__(self, run, whole, only_prefix: bool):
        import torch

        from clipcap_cli.model import ClipCaptionModel

        torch.manual_seed(1)
        gpt = type(run.model.gpt)(run.model.gpt.config)
        gpt.load_state_dict(run.model.gpt.state_dict())
        self.model = ClipCaptionModel(run.data.config, gpt)
        if only_prefix:
            # ClipCaptionPrefix: GPT-2 keeps requires_grad=True, only the mapper is optimised/zeroed.
            self.model.gpt.requires_grad_(True)
            params = list(self.model.clip_project.parameters())
        else:
            params = list(self.model.parameters())
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=run.opts.lr, eps=1e-6, weight_decay=0.0)
        self.model.train()
        lengths = whole.offsets[1:] - whole.offsets[:-1]
        lengths = lengths.float()
        # ClipCocoDataset: max_seq_len = min(int(mean + 10 * std), int(max)), over all captions
        self.max_seq_len = min(int(lengths.mean() + 10 * lengths.std()), int(lengths.max()))
        self.dataset = whole

    def batch(self, ids: list[int]):
        """pad_tokens for each item: pad with -1 to max_seq_len, mask = [1]*K + (tokens >= 0), pads -> 0."""
        import torch

        ds = self.dataset
        rows, masks = [], []
        for c in ids:
            t = ds.tokens[ds.offsets[c] : ds.offsets[c + 1]].long()[: self.max_seq_len]
            t = torch.cat([t, torch.full((self.max_seq_len - len(t),), -1, dtype=torch.int64)])
            m = t.ge(0)
            t[~m] = 0
            rows.append(t)
            masks.append(torch.cat([torch.ones(K), m.float()]))
        prefix = ds.embeddings[ds.image_rows[torch.tensor(ids)]].float()
        return torch.stack(rows), torch.stack(masks), prefix

    def step(self, ids: list[int]) -> float:
        import torch
        import torch.nn.functional as F

        tokens, mask, prefix = self.batch(ids)
        self.optimizer.zero_grad()
        embeds = torch.cat((self.model.embed_prefix(prefix), self.model.embed_tokens(tokens)), dim=1)
        logits = self.model.gpt(inputs_embeds=embeds, attention_mask=mask).logits[:, K - 1 : -1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), ignore_index=0)
        loss.backward()
        self.optimizer.step()
        return loss.detach().item()


def bench(
    mode: str, gpt_dir: Path, store: Path, root: Path, steps: int, warm: int, block: int, batch_size: int
) -> dict:
    import torch

    from clipcap_cli import train
    from clipcap_cli.data.features import load_features
    from clipcap_cli.distributed import Distributed
    from clipcap_cli.train.data import CaptionDataset, tokenize_captions
    from clipcap_cli.weights import backbones

    only_prefix = mode == "only-prefix"
    opts = train.TrainOptions.create(
        mapping="transformer" if only_prefix else "mlp",
        only_prefix=only_prefix,
        prefix_length=K,
        clip_length=K,
        gpt2=str(gpt_dir),
        epochs=1,
        batch_size=batch_size,
        warmup=5000,
        seed=0,
        device="cpu",
    )
    cpu = torch.device("cpu")
    run = train.prepare(opts, store, root / f"run-{mode}", False, Distributed(cpu), train.TrainCallback())
    run.model.train()
    # The whole store in memory, for the baseline's dataset-wide padding (train streams it).
    fs = load_features(store)
    tc = tokenize_captions(fs, backbones.load_tokenizer(str(gpt_dir)))
    whole = CaptionDataset(fs.embeddings, tc, torch.arange(len(tc.lengths)), run.data.max_tokens)
    baseline = OriginalStep(run, whole, only_prefix)
    batches = run.data.epoch_batches(0, batch_size, 1)
    assert len(batches) >= warm + steps, "not enough captions for the requested steps"
    ours_iter = run.data.batches(0, 0, batch_size, 1)
    # Warm-up (allocator, first-call overheads) on both; then alternate blocks of `block` steps.
    for i in range(warm):
        train.train_step(run, ours_iter)
        baseline.step(batches[i])
    t_ours = t_base = 0.0
    done = warm
    widths_ours, widths_base = [], []
    while done < warm + steps:
        span = batches[done : min(done + block, warm + steps)]
        t = time.perf_counter()
        for ids in span:
            widths_ours.append(max(int(whole.offsets[c + 1] - whole.offsets[c]) for c in ids))
            train.train_step(run, ours_iter)
            run.pos.step += 1
        t_ours += time.perf_counter() - t
        t = time.perf_counter()
        for ids in span:
            baseline.step(ids)
            widths_base.append(baseline.max_seq_len)
        t_base += time.perf_counter() - t
        done += len(span)
    return {
        "mode": mode,
        "steps": steps,
        "baseline_steps_per_s": steps / t_base,
        "ours_steps_per_s": steps / t_ours,
        "speedup": t_base / t_ours,
        "mean_caption_width_baseline": sum(widths_base) / len(widths_base),
        "mean_caption_width_ours": sum(widths_ours) / len(widths_ours),
        "trainable_params": sum(p.numel() for p in run.params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="only-prefix,full", help="comma-separated: only-prefix, full")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per setting and path")
    parser.add_argument("--warm", type=int, default=2, help="untimed warm-up steps")
    parser.add_argument("--block", type=int, default=3, help="steps per alternating block")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()

    import os

    import torch

    from clipcap_cli.cpu import describe

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("CLIPCAP_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        os.environ.setdefault("CLIPCAP_HOME", str(root / "home"))
        gpt_dir, store = make_run_inputs(root, (args.warm + args.steps + 2) * args.batch_size)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
            f"{args.steps} timed steps per path (after {args.warm} warm-up), GPT-2 124M random weights; "
            f"CPU: {describe()}",
            flush=True,
        )
        for mode in args.modes.split(","):
            r = bench(mode.strip(), gpt_dir, store, root, args.steps, args.warm, args.block, args.batch_size)
            print(
                f"{r['mode']:>11}: original {r['baseline_steps_per_s']:.3f} steps/s (padded to {r['mean_caption_width_baseline']:.0f} tokens)"
                f" | clipcap {r['ours_steps_per_s']:.3f} steps/s (mean width {r['mean_caption_width_ours']:.1f})"
                f" | speedup {r['speedup']:.2f}x | {r['trainable_params'] / 1e6:.1f}M trainable",
                flush=True,
            )


if __name__ == "__main__":
    main()
