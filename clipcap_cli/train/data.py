"""A run's captions: GPT-2 tokens cached beside the features, one sample per caption, batches
padded to their own longest caption, and the validation split by image. ``stream.py`` streams
them from the store; ``rundata.py`` plans a run's data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from clipcap_cli.data.features import TOKENS_FILE, FeatureSet
from clipcap_cli.fsutil import atomic_write
from clipcap_cli.train.callbacks import TrainCallback
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
    result = encode_captions(fs.records, tokenizer, key, callback, chunk)
    for path in _token_cache_paths(fs.path, key):
        try:
            _write_token_cache(path, result)
            result.path = path
            break
        except OSError:
            continue  # read-only store: try the next place
    return result


def encode_captions(
    records: Sequence[dict], tokenizer: Any, key: str, callback: TrainCallback | None = None, chunk: int = 8192
) -> TokenizedCaptions:
    """Every caption of ``records`` as tokens (``tokenizer.encode``: no BOS/EOS, no leading space)."""
    captions = [str(c) for record in records for c in record["captions"]]
    rows = [row for row, record in enumerate(records) for _ in record["captions"]]
    flat: list[int] = []
    offsets = [0]
    for start in range(0, len(captions), chunk):
        for seq in tokenizer(captions[start : start + chunk], add_special_tokens=False)["input_ids"]:
            flat.extend(seq)
            offsets.append(len(flat))
        if callback is not None:
            callback.on_tokenize(min(start + chunk, len(captions)), len(captions))
    return TokenizedCaptions(
        tokens=torch.tensor(flat, dtype=torch.int32),
        offsets=torch.tensor(offsets, dtype=torch.int64),
        image_rows=torch.tensor(rows, dtype=torch.int64),
        key=key,
    )


def _token_cache_paths(store: Path, key: str) -> list[Path]:
    from clipcap_cli import paths

    return [store / TOKENS_FILE, paths.home() / "tokens" / f"{key[:32]}.safetensors"]


def _read_token_cache(path: Path, key: str, header_only: bool = False) -> TokenizedCaptions | bool | None:
    """The cache at ``path`` if it holds ``key`` (``header_only``: True, without reading the tensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != TOKENS_FORMAT or meta.get("key") != key:
            return None  # stale (other captions or tokenizer): rebuilt by the caller
        if header_only:
            return True
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
    val_image = split_images(n_images, val_fraction, seed)
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


def split_images(n_images: int, val_fraction: float, seed: int) -> torch.Tensor:
    """(n_images,) bool: the images held out for validation (as ``split_ids``)."""
    val_image = torch.zeros(n_images, dtype=torch.bool)
    if val_fraction > 0:
        n_val = max(1, round(n_images * val_fraction))
        order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
        val_image[order[:n_val]] = True
    return val_image
