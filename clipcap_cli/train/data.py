"""A run's captions: GPT-2 tokens cached beside the features, one sample per caption, and the
batches of each epoch (padded to their own longest caption, the same order on resume).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from clipcap_cli.config import ModelConfig
from clipcap_cli.distributed import Distributed
from clipcap_cli.errors import UsageError
from clipcap_cli.features import TOKENS_FILE, FeatureSet, load_features
from clipcap_cli.fsutil import atomic_write
from clipcap_cli.train.callbacks import TrainCallback
from clipcap_cli.train.options import TrainOptions, model_config
from clipcap_cli.version import __version__

TOKENS_FORMAT = "clipcap-tokens"
TOKENIZE_RULE = "encode, no special tokens"  # part of the cache key: change it and old caches are rebuilt


# --------------------------------------------------------------------------- tokens


@dataclass
class TokenizedCaptions:
    """All captions of a features store as GPT-2 tokens, back to back (``tokens.safetensors``)."""

    tokens: torch.Tensor  # (total_tokens,) int32
    offsets: torch.Tensor  # (N_captions + 1,) int64: caption c is tokens[offsets[c] : offsets[c + 1]]
    image_rows: torch.Tensor  # (N_captions,) int64: the embeddings row of caption c
    key: str  # hash of the tokenizer and the captions this was made from
    path: Path | None = None  # where it is cached

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the whole vocabulary, merges and normaliser: any change shows up
        body = backend.to_str()
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{TOKENIZE_RULE}\n{body}".encode()).hexdigest()


def captions_key(records: Sequence[dict], tokenizer: Any) -> str:
    """The cache key of a store's tokens: the tokenizer's identity and every caption, in order."""
    h = hashlib.sha256(_tokenizer_fingerprint(tokenizer).encode())
    for row, record in enumerate(records):
        h.update(f"\x1e{row}".encode())
        for caption in record["captions"]:
            h.update(b"\x1f" + str(caption).encode("utf-8"))
    return h.hexdigest()


def tokenize_captions(
    fs: FeatureSet, tokenizer: Any, callback: TrainCallback | None = None, chunk: int = 8192
) -> TokenizedCaptions:
    """Tokenise every caption of ``fs`` once, cached as ``tokens.safetensors`` next to the features.

    A cache whose key (tokenizer + captions) differs is rebuilt, never reused. Like the original:
    ``tokenizer.encode(caption)``, no BOS/EOS, no leading space. Where the store's folder is
    read-only the cache goes under clipcap's data directory instead.
    """
    key = captions_key(fs.records, tokenizer)
    for path in _token_cache_paths(fs.path, key):
        cached = _read_token_cache(path, key)
        if cached is not None:
            return cached

    captions = [str(c) for record in fs.records for c in record["captions"]]
    rows = [row for row, record in enumerate(fs.records) for _ in record["captions"]]
    flat: list[int] = []
    offsets = [0]
    for start in range(0, len(captions), chunk):
        for seq in tokenizer(captions[start : start + chunk], add_special_tokens=False)["input_ids"]:
            flat.extend(seq)
            offsets.append(len(flat))
        if callback is not None:
            callback.on_tokenize(min(start + chunk, len(captions)), len(captions))
    result = TokenizedCaptions(
        tokens=torch.tensor(flat, dtype=torch.int32),
        offsets=torch.tensor(offsets, dtype=torch.int64),
        image_rows=torch.tensor(rows, dtype=torch.int64),
        key=key,
    )
    for path in _token_cache_paths(fs.path, key):
        try:
            _write_token_cache(path, result)
            result.path = path
            break
        except OSError:
            continue  # read-only store: try the next place
    return result


def _token_cache_paths(store: Path, key: str) -> list[Path]:
    from clipcap_cli import paths

    return [store / TOKENS_FILE, paths.home() / "tokens" / f"{key[:32]}.safetensors"]


def _read_token_cache(path: Path, key: str) -> TokenizedCaptions | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != TOKENS_FORMAT or meta.get("key") != key:
            return None  # stale (other captions or tokenizer): rebuilt by the caller
        t = load_file(str(path))
        return TokenizedCaptions(t["tokens"], t["offsets"], t["image_rows"], key, path)
    except (OSError, SafetensorError, KeyError, ValueError):
        return None


def _write_token_cache(path: Path, tc: TokenizedCaptions) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": TOKENS_FORMAT, "key": tc.key, "clipcap_version": __version__}
    tensors = {"tokens": tc.tokens, "offsets": tc.offsets, "image_rows": tc.image_rows}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _tokenize_main_first(
    fs: FeatureSet, tokenizer: Any, dist: Distributed, callback: TrainCallback
) -> TokenizedCaptions:
    """Rank 0 tokenises and writes the cache while the others wait; then they read the cache."""
    with dist.fail_together():
        captions = tokenize_captions(fs, tokenizer, callback) if dist.main else None
    return captions if captions is not None else tokenize_captions(fs, tokenizer)  # the others: from the cache


# --------------------------------------------------------------------------- samples and batches


class Batch(NamedTuple):
    tokens: torch.Tensor  # (B, T) int64, right-padded with 0 to the batch's longest caption
    mask: torch.Tensor  # (B, T) bool, True on real tokens
    prefix: torch.Tensor  # (B, D) float32 CLIP embeddings
    index: torch.Tensor  # (B,) int64 caption ids (which samples these are)

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        return Batch(*(t.to(device, non_blocking=nb) for t in self))


class CaptionDataset:
    """One sample per caption (as the original); its prefix is the CLIP row of its image.

    Items are caption ids; ``collate`` builds the whole batch at once, padded to the longest
    caption *in the batch* (the original padded every batch to a dataset-wide maximum).
    """

    def __init__(self, embeddings: torch.Tensor, captions: TokenizedCaptions, ids: torch.Tensor, max_tokens: int):
        self.embeddings = embeddings  # (N_images, D)
        self.tokens = captions.tokens
        self.offsets = captions.offsets
        self.image_rows = captions.image_rows
        self.ids = ids  # (N,) caption ids in this split
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> int:
        return int(self.ids[i])

    def lengths(self) -> torch.Tensor:
        """(N,) tokens in each caption of this split, before truncation."""
        return self.offsets[self.ids + 1] - self.offsets[self.ids]

    def subset(self, ids: torch.Tensor) -> CaptionDataset:
        """The same captions and embeddings, restricted to caption ``ids``."""
        out = CaptionDataset.__new__(CaptionDataset)
        out.__dict__.update(self.__dict__, ids=ids)
        return out

    def collate(self, ids: Sequence[int]) -> Batch:
        caps = torch.as_tensor(ids, dtype=torch.int64)  # (B,)
        starts = self.offsets[caps]
        lengths = (self.offsets[caps + 1] - starts).clamp(max=self.max_tokens)  # truncation
        pos = torch.arange(int(lengths.max()))  # (T,)
        mask = pos < lengths[:, None]  # (B, T)
        where = (starts[:, None] + pos).clamp(max=max(len(self.tokens) - 1, 0))  # (B, T)
        tokens = self.tokens[where].long().masked_fill(~mask, 0)
        prefix = self.embeddings[self.image_rows[caps]].float()  # (B, D)
        return Batch(tokens, mask, prefix, caps)


def split_ids(
    captions: TokenizedCaptions, n_images: int, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) caption ids. Captions without tokens are dropped. The split is by image, so
    no image has captions on both sides."""
    keep = captions.lengths > 0
    val_image = torch.zeros(n_images, dtype=torch.bool)
    if val_fraction > 0:
        n_val = max(1, round(n_images * val_fraction))
        order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
        val_image[order[:n_val]] = True
    is_val = val_image[captions.image_rows]
    ids = torch.arange(len(captions.lengths))
    return ids[keep & ~is_val], ids[keep & is_val]


def loader(
    dataset: CaptionDataset, batches: list[list[int]], num_workers: int, device: torch.device, seed: int
) -> torch.utils.data.DataLoader:
    """Batches of ``dataset``, in the order of ``batches`` (lists of item positions)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=dataset.collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # Its own generator, so creating a loader never draws from the global (dropout) RNG.
        generator=torch.Generator().manual_seed(seed),
    )


# --------------------------------------------------------------------------- a run's data


@dataclass
class TrainData:
    """Everything a run needs from its features store(s)."""

    path: Path  # the training features store, resolved
    config: ModelConfig  # the model to train: the mapper from the options, the CLIP side from the store
    train: CaptionDataset
    val: CaptionDataset  # may be empty
    key: str  # cache key of the training captions: a resume must see the same ones
    max_tokens: int  # longer captions are cut
    truncated: int  # how many were
    sampler: torch.utils.data.DistributedSampler  # this process's share of the shuffled training captions
    steps_per_epoch: int  # optimizer steps
    embeddings_sha256: str | None = None  # the store's embeddings: a resume must see the same ones

    def epoch_batches(self, epoch: int, batch_size: int, grad_accum: int) -> list[list[int]]:
        """This process's micro-batches of ``epoch``: a seeded order (seed + epoch), as on any resume."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        return [order[i * batch_size : (i + 1) * batch_size] for i in range(self.steps_per_epoch * grad_accum)]


def load_data(
    opts: TrainOptions, store: Path, tokenizer: Any, gpt_config: Any, dist: Distributed, callback: TrainCallback
) -> TrainData:
    """Read the store, tokenise its captions (cached), split off validation and plan the epochs."""
    fs = load_features(store)
    if not fs.records:
        raise UsageError(f"{fs.path} holds no images")
    caps = _tokenize_main_first(fs, tokenizer, dist, callback)
    k = opts.model.prefix_length
    window = int(gpt_config.n_positions) - k
    max_tokens = opts.max_tokens or window
    if max_tokens > window:
        raise UsageError(f"max-tokens {max_tokens} does not fit GPT-2's window ({gpt_config.n_positions} - K={k})")
    if len(caps.tokens) and int(caps.tokens.max()) >= gpt_config.vocab_size:
        raise UsageError(
            f"the tokenizer of {opts.model.gpt2} makes ids beyond the LM's vocabulary ({gpt_config.vocab_size})"
        )
    train_ids, val_ids = split_ids(caps, len(fs.records), opts.held_out_fraction(len(fs.records)), opts.seed)
    train = CaptionDataset(fs.embeddings, caps, train_ids, max_tokens)
    val = CaptionDataset(fs.embeddings, caps, val_ids, max_tokens)
    if opts.val_data:
        val = _separate_validation(opts.val_data, fs, tokenizer, max_tokens, dist)
    truncated = int((train.lengths() > max_tokens).sum() + (val.lengths() > max_tokens).sum())

    # DistributedSampler for one process too: the same seeded order (seed + epoch) either way.
    sampler = torch.utils.data.DistributedSampler(
        train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=opts.seed, drop_last=True
    )
    # Like the original's drop_last: an incomplete last batch (and, with --grad-accum, an
    # incomplete last group of micro-batches) is left out of the epoch.
    steps_per_epoch = len(sampler) // opts.batch_size // opts.grad_accum
    if steps_per_epoch < 1:
        raise UsageError(
            f"{len(train_ids)} training captions are too few for one step of {opts.batch_size} x {opts.grad_accum}"
            f" x {dist.world_size} process(es): lower --batch-size or --grad-accum"
        )
    from clipcap_cli.features import EMBEDDINGS_FILE
    from clipcap_cli.fingerprint import file_sha256

    emb_file = fs.path / EMBEDDINGS_FILE
    return TrainData(
        fs.path.resolve(),
        model_config(opts, fs.meta),
        train,
        val,
        caps.key,
        max_tokens,
        truncated,
        sampler,
        steps_per_epoch,
        file_sha256(emb_file) if emb_file.is_file() else None,
    )


def _separate_validation(
    path: str, fs: FeatureSet, tokenizer: Any, max_tokens: int, dist: Distributed
) -> CaptionDataset:
    """``--val-data``: every caption of another store (extracted with the same CLIP)."""
    vfs = load_features(path)
    if int(vfs.meta["embed_dim"]) != int(fs.meta["embed_dim"]) or vfs.meta.get("clip_model") != fs.meta.get(
        "clip_model"
    ):
        raise UsageError(f"--val-data {vfs.path} was extracted with another CLIP than {fs.path}")
    caps = _tokenize_main_first(vfs, tokenizer, dist, TrainCallback())
    return CaptionDataset(vfs.embeddings, caps, torch.nonzero(caps.lengths > 0).flatten(), max_tokens)
