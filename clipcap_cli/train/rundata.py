"""A run's data: the training and validation captions as streams (``stream.py``), planned from
per-shard counts before the first step, and the keys a resume is checked against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from clipcap_cli.config import ModelConfig
from clipcap_cli.data.store import Store, open_store
from clipcap_cli.distributed import Distributed
from clipcap_cli.errors import UsageError
from clipcap_cli.train import stream
from clipcap_cli.train.callbacks import TrainCallback
from clipcap_cli.train.data import Batch, split_images
from clipcap_cli.train.options import TrainOptions, model_config
from clipcap_cli.train.stream import CaptionStream, ShardTokens
from clipcap_cli.weights.lm import max_positions


@dataclass
class TrainData:
    """Everything a run needs from its features store(s): the captions it streams (``stream.py``)
    and the counts that plan the epochs, never the whole store."""

    path: Path  # the training features store, resolved
    config: ModelConfig  # the model to train: the mapper from the options, the CLIP side from the store
    train: CaptionStream
    val: CaptionStream  # may be empty
    key: str  # cache key of the training captions: a resume must see the same ones
    max_tokens: int  # longer captions are cut
    truncated: int  # how many were
    steps_per_epoch: int  # optimizer steps
    embeddings_sha256: str | None = None  # the store's embeddings: a resume must see the same ones
    seed: int = 0  # the data order's
    rank: int = 0
    world_size: int = 1

    def batches(
        self, epoch: int, start: int, batch_size: int, grad_accum: int, num_workers: int = 0, device: Any = None
    ) -> Iterator[Batch]:
        """This process's micro-batches of ``epoch`` from micro-batch ``start`` on: a seeded order
        (seed + epoch), the same on any resume."""
        n = self.steps_per_epoch * grad_accum
        make = functools.partial(
            self.train.epoch_batches, self.seed, epoch, batch_size, n, start, self.rank, self.world_size
        )
        return stream.batches(make, num_workers, device or torch.device("cpu"))

    def val_batches(self, batch_size: int, num_workers: int = 0, device: Any = None) -> Iterator[Batch]:
        """This process's share of the validation captions, in batches."""
        make = functools.partial(self.val.eval_batches, batch_size, self.rank, self.world_size)
        return stream.batches(make, num_workers, device or torch.device("cpu"))

    def epoch_batches(self, epoch: int, batch_size: int, grad_accum: int) -> list[list[int]]:
        """The caption ids of this process's micro-batches of ``epoch`` (what ``batches`` yields)."""
        order = self.train.order(self.seed, epoch, self.rank, self.world_size).tolist()
        return [order[i * batch_size : (i + 1) * batch_size] for i in range(self.steps_per_epoch * grad_accum)]


def load_data(
    opts: TrainOptions, store: Path, tokenizer: Any, gpt_config: Any, dist: Distributed, callback: TrainCallback
) -> TrainData:
    """Open the store, tokenise its captions shard by shard (cached), split off validation by image
    and count each shard's captions: the epochs are planned without loading the embeddings."""
    fs = open_store(store)
    if not fs.num_images:
        raise UsageError(f"{fs.path} holds no images")
    tokens = _shard_tokens_main_first(fs, tokenizer, dist, callback)
    k = opts.model.prefix_length
    positions = max_positions(gpt_config) or 1024
    window = positions - k
    max_tokens = opts.max_tokens or window
    if max_tokens > window:
        raise UsageError(f"max-tokens {max_tokens} does not fit the LM's window ({positions} - K={k})")
    fraction = opts.held_out_fraction(fs.num_images)
    val_image = split_images(fs.num_images, fraction, opts.seed) if fraction > 0 else None
    train = CaptionStream(tokens, "train", val_image, max_tokens, opts.buffer_shards).count()
    val = CaptionStream(tokens, "val", val_image, max_tokens, opts.buffer_shards).count()
    if opts.val_data:
        val = _separate_validation(opts.val_data, fs, tokenizer, max_tokens, dist)
    if max(train.max_id, val.max_id) >= gpt_config.vocab_size:
        raise UsageError(
            f"the tokenizer of {opts.model.gpt2} makes ids beyond the LM's vocabulary ({gpt_config.vocab_size})"
        )
    truncated = train.truncated + val.truncated

    # Like the original's drop_last: an incomplete last batch (and, with --grad-accum, an
    # incomplete last group of micro-batches) is left out of the epoch; every process gets as many.
    steps_per_epoch = len(train) // dist.world_size // opts.batch_size // opts.grad_accum
    if steps_per_epoch < 1:
        raise UsageError(
            f"{len(train)} training captions are too few for one step of {opts.batch_size} x {opts.grad_accum}"
            f" x {dist.world_size} process(es): lower --batch-size or --grad-accum"
        )
    return TrainData(
        fs.path.resolve(),
        model_config(opts, fs.meta),
        train,
        val,
        tokens.key,
        max_tokens,
        truncated,
        steps_per_epoch,
        fs.embeddings_sha256(),
        opts.seed,
        dist.rank,
        dist.world_size,
    )


def _shard_tokens_main_first(store: Store, tokenizer: Any, dist: Distributed, callback: TrainCallback) -> ShardTokens:
    """Rank 0 tokenises the shards and writes their caches while the others wait; then they find them."""
    tokens = ShardTokens(store, tokenizer)
    with dist.fail_together():
        if dist.main:
            tokens.prepare(tokenizer, callback)
    if not dist.main:
        tokens.prepare(tokenizer)
    return tokens


def _separate_validation(path: str, fs: Store, tokenizer: Any, max_tokens: int, dist: Distributed) -> CaptionStream:
    """``--val-data``: every caption of another store (extracted with the same CLIP)."""
    vfs = open_store(path)
    from clipcap_cli.data.store_format import describe_tower, same_tower

    if vfs.embed_dim != fs.embed_dim or not same_tower(
        vfs.meta, fs.meta.get("clip_model") or "", fs.meta.get("clip_pretrained")
    ):
        raise UsageError(
            f"--val-data {vfs.path} was made with CLIP {describe_tower(vfs.clip_model, vfs.meta.get('clip_pretrained'))}, "
            f"{fs.path} with {describe_tower(fs.clip_model, fs.meta.get('clip_pretrained'))}: encode both with one CLIP"
        )
    tokens = _shard_tokens_main_first(vfs, tokenizer, dist, TrainCallback())
    return CaptionStream(tokens, "all", None, max_tokens).count()
