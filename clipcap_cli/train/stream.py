"""A run's captions streamed from a features store, a group of shards at a time.

Memory does not grow with the store: only one group of ``buffer_shards`` shards (their embeddings
and tokens) is loaded at once, beside per-shard counts and a bool per image (the validation split).

Tokens are cached per shard (``tokens/shard-NNNNNN.safetensors`` beside the store; a single-file
store keeps its one ``tokens.safetensors``), keyed by the tokenizer and the shard's captions.

The order of an epoch (seed ``s``, epoch ``e``):

1. the shards are permuted (``randperm(n_shards)``, generator seeded ``s + e``) and cut into groups
   of ``buffer_shards``;
2. group ``g``'s training captions, in ascending id order, are permuted together (``randperm``,
   generator seeded ``s + e + g * GOLDEN``: ``s + e`` for the first group);
3. the groups' permuted captions form one stream; it is cut to a multiple of the number of
   processes, and process ``r`` takes positions ``r, r + world, ...`` (disjoint, equal counts);
4. each process cuts its captions into batches, across group boundaries.

With one group holding every shard (a single-file store always) this is exactly
``DistributedSampler(shuffle=True, seed=s, drop_last=True)`` over the training captions. Every
group's size is known from the counts, so resuming at batch ``b`` skips the groups before it
without reading them, and continues with exactly the batches the uninterrupted run had.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from clipcap_cli.data.features import FeatureSet
from clipcap_cli.data.store import Store
from clipcap_cli.train.callbacks import TrainCallback
from clipcap_cli.train.data import (
    Batch,
    TokenizedCaptions,
    _read_token_cache,
    _token_cache_paths,
    _tokenizer_fingerprint,
    _write_token_cache,
    encode_captions,
    tokenize_captions,
)

DEFAULT_BUFFER_SHARDS = 4
TOKENS_DIR = "tokens"  # per-shard token caches of a sharded store
GOLDEN = 0x9E3779B97F4A7C15  # spreads the groups' seeds apart
_SEED_MOD = 1 << 63


# --------------------------------------------------------------------------- per-shard tokens


class ShardTokens:
    """Where each shard's tokens are cached: built once (``prepare``), read a shard at a time (``load``)."""

    def __init__(self, store: Store, tokenizer: Any):
        self.store = store
        self.fingerprint = _tokenizer_fingerprint(tokenizer)
        self.keys: list[str | None] = [None] * len(store.shards)
        self.paths: list[Path | None] = [None] * len(store.shards)
        self._memory: dict[int, TokenizedCaptions] = {}  # only when no cache could be written anywhere

    def prepare(self, tokenizer: Any, callback: TrainCallback | None = None) -> None:
        """Find or build every shard's cache, one shard at a time (progress: captions done / total)."""
        total, done = self.store.num_captions, 0
        for i, info in enumerate(self.store.shards):
            built = self._prepare(i, tokenizer, callback, done, total)
            done += info.captions
            if built and callback is not None:
                callback.on_tokenize(done, total)

    def _prepare(self, i: int, tokenizer: Any, callback: TrainCallback | None, done: int, total: int) -> bool:
        """Find shard ``i``'s cache, or tokenise it now (True)."""
        store = self.store
        if not store.sharded:  # the single-file store's own cache, keyed as before (resumes stay valid)
            records = store.read_records(0)
            progress = _Offset(callback, done, total)
            tc = tokenize_captions(FeatureSet(None, records, store.meta, store.path), tokenizer, progress)
            self.keys[i], self.paths[i] = tc.key, tc.path
            if tc.path is None:
                self._memory[i] = tc
            return False  # (tokenize_captions reports its own progress)
        info = store.shards[i]
        key = hashlib.sha256(f"{self.fingerprint}\nshard\n{info.index_sha256}".encode()).hexdigest()
        self.keys[i] = key
        places = self._places(i, key)
        for path in places:
            if _read_token_cache(path, key, header_only=True) is not None:
                self.paths[i] = path
                return False
        records = store.read_records(i)
        tc = encode_captions(records, tokenizer, key, _Offset(callback, done, total))
        for path in places:
            try:
                _write_token_cache(path, tc)
                self.paths[i] = path
                return True
            except OSError:
                continue  # read-only store: the next place
        self._memory[i] = tc
        return True

    def _places(self, i: int, key: str) -> list[Path]:
        own = self.store.path / TOKENS_DIR / f"{self.store.shards[i].name}.safetensors"
        return [own, _token_cache_paths(self.store.path, key)[1]]

    def load(self, i: int) -> TokenizedCaptions:
        if i in self._memory:
            return self._memory[i]
        path, key = self.paths[i], self.keys[i]
        tc = _read_token_cache(path, key) if path is not None and key is not None else None
        if tc is None:
            raise RuntimeError(f"the token cache of shard {i} ({path}) disappeared while training")
        return tc

    @property
    def key(self) -> str:
        """The captions' key for ``resume.pt``: the cache key (single file) or a hash of the shards' keys."""
        if not self.store.sharded:
            return str(self.keys[0])
        return hashlib.sha256("\n".join(str(k) for k in self.keys).encode()).hexdigest()


class _Offset(TrainCallback):
    """Per-shard tokenising progress, reported as progress over the whole store."""

    def __init__(self, callback: TrainCallback | None, done: int, total: int):
        self.callback, self.done, self.total = callback, done, total

    def on_tokenize(self, done: int, total: int) -> None:
        if self.callback is not None:
            self.callback.on_tokenize(self.done + done, self.total)


# --------------------------------------------------------------------------- groups of shards in memory


@dataclass
class _Group:
    """The selected captions of some shards, ready to batch: caption c's tokens are
    ``tokens[starts[c] : starts[c] + lengths[c]]``, its prefix ``embeddings[shard[c]][row[c]]``."""

    embeddings: list[torch.Tensor]  # per shard: [images, D]
    tokens: torch.Tensor  # (total,) int32
    starts: torch.Tensor  # (n,) int64
    lengths: torch.Tensor  # (n,) int64
    shard: torch.Tensor  # (n,) int64: index into embeddings
    row: torch.Tensor  # (n,) int64
    ids: torch.Tensor  # (n,) int64 global caption ids, ascending

    def __len__(self) -> int:
        return len(self.ids)

    def prefix(self, pos: torch.Tensor) -> torch.Tensor:
        """(len(pos), D) embeddings of captions ``pos``, in the stored dtype."""
        first = self.embeddings[0]
        out = torch.empty(len(pos), first.shape[1], dtype=first.dtype)
        shard, row = self.shard[pos], self.row[pos]
        for j, emb in enumerate(self.embeddings):
            hit = shard == j
            if bool(hit.any()):
                out[hit] = emb[row[hit]]
        return out

    def token_rows(self, pos: torch.Tensor, width: int) -> torch.Tensor:
        """(len(pos), width) tokens of captions ``pos``; positions past a caption's end hold junk."""
        where = (self.starts[pos][:, None] + torch.arange(width)).clamp(max=max(len(self.tokens) - 1, 0))
        return self.tokens[where]


def _compact(pieces: list[tuple[_Group, torch.Tensor]]) -> _Group:
    """The captions ``pieces`` select, copied out of their groups (a batch's carry across groups)."""
    prefix = torch.cat([g.prefix(p) for g, p in pieces])
    lengths = torch.cat([g.lengths[p] for g, p in pieces])
    width = int(lengths.max()) if len(lengths) else 0
    rows = torch.cat([g.token_rows(p, width) for g, p in pieces]) if width else torch.zeros(len(lengths), 0)
    keep = torch.arange(width) < lengths[:, None]
    n = len(lengths)
    return _Group(
        embeddings=[prefix],
        tokens=rows[keep].to(torch.int32),
        starts=torch.cumsum(lengths, 0) - lengths,
        lengths=lengths,
        shard=torch.zeros(n, dtype=torch.int64),
        row=torch.arange(n),
        ids=torch.cat([g.ids[p] for g, p in pieces]),
    )


def _collate(pieces: list[tuple[_Group, torch.Tensor]], max_tokens: int) -> Batch:
    """One batch from captions of one or two groups, padded to its own longest caption (as
    ``CaptionDataset.collate``: the same tensors for the same captions)."""
    lengths = torch.cat([g.lengths[p] for g, p in pieces]).clamp(max=max_tokens)
    width = int(lengths.max())
    mask = torch.arange(width) < lengths[:, None]  # (B, T)
    tokens = torch.cat([g.token_rows(p, width) for g, p in pieces]).long().masked_fill(~mask, 0)
    prefix = torch.cat([g.prefix(p) for g, p in pieces]).float()
    index = torch.cat([g.ids[p] for g, p in pieces])
    return Batch(tokens, mask, prefix, index)


# --------------------------------------------------------------------------- the stream


class CaptionStream:
    """The captions of a store that one side of a run uses (training, validation, or all of them).

    ``counts[i]`` is how many of shard i's captions are selected: those with tokens, and, for
    "train" / "val", whose image is (not) held out by ``val_image``.
    """

    def __init__(
        self,
        tokens: ShardTokens,
        select: str,
        val_image: torch.Tensor | None,
        max_tokens: int,
        buffer_shards: int = DEFAULT_BUFFER_SHARDS,
    ):
        self.store = tokens.store
        self.tokens = tokens
        self.select = select  # "train", "val" or "all"
        self.val_image = val_image  # (n_images,) bool, or None: no image held out
        self.max_tokens = max_tokens
        self.buffer_shards = buffer_shards
        self.counts: list[int] = []  # per shard: the selected captions
        self.truncated = 0  # selected captions longer than max_tokens
        self.max_id = -1  # the largest token id of the selected captions

    def count(self) -> CaptionStream:
        """Read every shard's tokens once (one at a time) to count the selected captions; returns self."""
        self.counts, self.truncated, self.max_id = [], 0, -1
        if self.select == "val" and self.val_image is None:  # nothing held out: nothing to read
            self.counts = [0] * len(self.store.shards)
            return self
        for i in range(len(self.store.shards)):
            tc = self.tokens.load(i)
            sel = self._selected(i, tc)
            self.counts.append(int(sel.sum()))
            self.truncated += int((tc.lengths[sel] > self.max_tokens).sum())
            if len(tc.tokens) and bool(sel.any()):
                self.max_id = max(self.max_id, int(tc.tokens.max()))
        return self

    def __len__(self) -> int:
        return sum(self.counts)

    def _selected(self, i: int, tc: TokenizedCaptions) -> torch.Tensor:
        keep = tc.lengths > 0
        if self.select == "all" or self.val_image is None:
            return keep if self.select != "val" else torch.zeros_like(keep)
        held = self.val_image[self.store.image_starts[i] + tc.image_rows]
        return keep & (held if self.select == "val" else ~held)

    def _load_group(self, shards: list[int]) -> _Group:
        """The selected captions of ``shards`` (ascending), with their embeddings."""
        embeddings, tokens, starts, lengths, shard, row, ids = [], [], [], [], [], [], []
        base = 0
        for j, i in enumerate(sorted(shards)):
            tc = self.tokens.load(i)
            sel = torch.nonzero(self._selected(i, tc)).flatten()
            embeddings.append(self.store.read_embeddings(i))
            tokens.append(tc.tokens)
            starts.append(tc.offsets[sel] + base)
            lengths.append(tc.lengths[sel])
            shard.append(torch.full((len(sel),), j, dtype=torch.int64))
            row.append(tc.image_rows[sel])
            ids.append(sel + self.store.caption_starts[i])
            base += len(tc.tokens)
        return _Group(embeddings, torch.cat(tokens), *(torch.cat(x) for x in (starts, lengths, shard, row, ids)))

    # ---------------------------------------------------------------- training order

    def groups(self, seed: int, epoch: int) -> list[list[int]]:
        """Epoch ``epoch``'s groups of shard indices, in order."""
        n = len(self.store.shards)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        return [order[k : k + self.buffer_shards] for k in range(0, n, self.buffer_shards)]

    def _group_perm(self, seed: int, epoch: int, g: int, n: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((seed + epoch + g * GOLDEN) % _SEED_MOD)
        return torch.randperm(n, generator=gen)

    def _plan(
        self, seed: int, epoch: int, rank: int, world: int, first: int, end: int
    ) -> Iterator[tuple[list[int], int, int, int]]:
        """(group's shards, its index, first and end position in its permutation) for this rank's
        captions ``first .. end - 1`` of the epoch; groups with none of them are left out unread."""
        base = 0
        for g, shards in enumerate(self.groups(seed, epoch)):
            n = sum(self.counts[i] for i in shards)
            lo, hi = max(base, first * world + rank), min(base + n, end * world)
            q0 = lo + (rank - lo) % world  # the first of this rank's global positions >= lo
            if q0 < hi:
                yield shards, g, q0 - base, hi - base
            base += n

    def order(self, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This rank's caption ids of ``epoch``, in training order (tokens only: no embeddings read)."""
        per_rank = len(self) // world
        out = []
        for shards, g, a, b in self._plan(seed, epoch, rank, world, 0, per_rank):
            ids = torch.cat(
                [
                    self.store.caption_starts[i] + torch.nonzero(self._selected(i, self.tokens.load(i))).flatten()
                    for i in sorted(shards)
                ]
            )
            out.append(ids[self._group_perm(seed, epoch, g, len(ids))[a:b:world]])
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)

    def epoch_batches(
        self, seed: int, epoch: int, batch_size: int, n_batches: int, start: int = 0, rank: int = 0, world: int = 1
    ) -> Iterator[Batch]:
        """This rank's micro-batches ``start .. n_batches - 1`` of ``epoch`` (see the module's docstring)."""
        pending: list[tuple[_Group, torch.Tensor]] = []
        have = 0
        for shards, g, a, b in self._plan(seed, epoch, rank, world, start * batch_size, n_batches * batch_size):
            group = self._load_group(shards)
            pos = self._group_perm(seed, epoch, g, len(group))[a:b:world]
            while len(pos):
                take, pos = pos[: batch_size - have], pos[batch_size - have :]
                pending.append((group, take))
                have += len(take)
                if have == batch_size:
                    yield _collate(pending, self.max_tokens)
                    pending, have = [], 0
            if pending:  # a batch across groups: copy its first part out, so this group can go
                pending = [(_compact(pending), torch.arange(have))]
            del group

    # ---------------------------------------------------------------- validation order

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        """Every selected caption once, in id order, this rank's share (``rank::world``), one shard
        at a time; the last batch may be short."""
        pending: list[tuple[_Group, torch.Tensor]] = []
        have, base = 0, 0
        for i in range(len(self.store.shards)):
            n = self.counts[i]
            first = (rank - base) % world  # this rank's: global positions rank, rank + world, ...
            pos = torch.arange(first, max(first, n), world)
            base += n
            if not len(pos):
                continue  # not read
            group = self._load_group([i])
            while len(pos):
                take, pos = pos[: batch_size - have], pos[batch_size - have :]
                pending.append((group, take))
                have += len(take)
                if have == batch_size:
                    yield _collate(pending, self.max_tokens)
                    pending, have = [], 0
            if pending:
                pending = [(_compact(pending), torch.arange(have))]
            del group
        if pending:
            yield _collate(pending, self.max_tokens)

    # ---------------------------------------------------------------- a few images

    def pick_images(self, n: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
        """(embeddings [k, D] float32, records) of ``n`` images with a selected caption, drawn with
        ``seed`` (randperm over them, sorted by index), reading only the shards that hold them: the
        same images as drawing from the in-memory split did (``train.monitor``'s samples)."""
        rows = []
        for i in range(len(self.store.shards)):
            if self.counts and not self.counts[i]:
                continue
            tc = self.tokens.load(i)
            rows.append(torch.unique(tc.image_rows[self._selected(i, tc)]) + self.store.image_starts[i])
        rows_t = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        g = torch.Generator().manual_seed(seed)
        picked = rows_t[torch.randperm(len(rows_t), generator=g)[:n]].sort().values
        shard_of = torch.bucketize(picked, torch.tensor(self.store.image_starts[1:]), right=True)
        embeddings, records = [], []
        for i in torch.unique(shard_of).tolist():
            local = picked[shard_of == i] - self.store.image_starts[i]
            emb, recs = self.store.read_shard(i)
            embeddings.append(emb[local].float())
            records += [recs[int(r)] for r in local]
        d = self.store.embed_dim
        return (torch.cat(embeddings) if embeddings else torch.zeros(0, d)), records


class BatchStream(torch.utils.data.IterableDataset):
    """A stream's batches as a DataLoader dataset: ``num_workers=1`` reads the shards in a worker
    process, ahead of the training step."""

    def __init__(self, make: Any):
        super().__init__()
        self.make = make

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.make())


def batches(make: Any, num_workers: int, device: torch.device) -> Iterator[Batch]:
    """Iterate ``make()``'s batches: here (``num_workers`` 0), or in one worker process (any more:
    a stream has one order, so one worker reads it; the step overlaps with its reads)."""
    if num_workers <= 0:
        return iter(make())
    loader = torch.utils.data.DataLoader(
        BatchStream(make), batch_size=None, num_workers=1, pin_memory=device.type == "cuda"
    )
    return iter(loader)
