"""train/stream.py: captions streamed from a store a group of shards at a time: the order (the same
as DistributedSampler's for one group), every caption once per epoch, disjoint ranks, exact
resume, and no more than ``buffer_shards`` shards in memory."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLIP_CFG
from test_train import WORDS, Recorder, make_store, tiny_opts

from clipcap_cli import train
from clipcap_cli.data.features import load_features
from clipcap_cli.data.store import Store, open_store, save_sharded
from clipcap_cli.train.data import CaptionDataset, split_ids, split_images, tokenize_captions
from clipcap_cli.train.stream import CaptionStream, ShardTokens
from clipcap_cli.weights import backbones, checkpoint

D = TINY_CLIP_CFG["embed_dim"]


def sharded_store(folder: Path, clip_dir: Path, sizes=(3, 2, 4, 3, 1, 3, 2), per_image: int = 2, seed: int = 0) -> Path:
    """Shards of sizes[i] images with varied captions; image 4's second caption is empty (no tokens)."""
    g = torch.Generator().manual_seed(seed)
    shards, n = [], 0
    for size in sizes:
        records = []
        for i in range(n, n + size):
            caps = []
            for j in range(per_image):
                k = 2 + int(torch.randint(0, 6, (1,), generator=g))
                caps.append(" ".join(WORDS[int(w)] for w in torch.randint(0, len(WORDS), (k,), generator=g)) + ".")
            if i == 4:
                caps[1] = ""
            records.append({"image": f"img/{i}.jpg", "image_id": i, "captions": caps})
        shards.append((torch.randn(size, D, generator=g).half(), records))
        n += size
    meta = {"clip_model": f"local-dir:{clip_dir}", "clip_pretrained": None, "preprocess": "test"}
    return save_sharded(folder, shards, meta)


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir):
    return backbones.load_tokenizer(str(gpt2_tokenizer_dir))


def stream(store: Store | Path, tok, select="train", val_fraction=0.0, buffer_shards=2, seed=0) -> CaptionStream:
    store = open_store(store) if isinstance(store, Path) else store
    tokens = ShardTokens(store, tok)
    tokens.prepare(tok)
    val = split_images(store.num_images, val_fraction, seed) if val_fraction else None
    return CaptionStream(tokens, select, val, max_tokens=64, buffer_shards=buffer_shards).count()


def sampler_order(n_train_ids: torch.Tensor, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """What train.py did before streaming: DistributedSampler over the training caption ids."""
    s = torch.utils.data.DistributedSampler(
        range(len(n_train_ids)), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    s.set_epoch(epoch)
    return [int(n_train_ids[i]) for i in s]


@pytest.mark.parametrize("layout", ["single-file", "sharded-one-group"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_one_group_is_distributed_samplers_order(tmp_path, tiny_clip_dir, tok, layout, world):
    if layout == "single-file":
        folder = make_store(tmp_path / "f", tiny_clip_dir, n_images=13, per_image=3)
    else:
        folder = sharded_store(tmp_path / "s", tiny_clip_dir)
    fs = load_features(folder)
    train_ids, _ = split_ids(tokenize_captions(fs, tok), len(fs), 0.25, seed=5)
    s = stream(folder, tok, val_fraction=0.25, buffer_shards=100, seed=5)
    assert len(s) == len(train_ids)
    for epoch in (0, 1):
        for rank in range(world):
            assert s.order(5, epoch, rank, world).tolist() == sampler_order(train_ids, 5, epoch, rank, world)


def test_every_training_caption_once_per_epoch_across_shards(tmp_path, tiny_clip_dir, tok):
    folder = sharded_store(tmp_path / "s", tiny_clip_dir)
    fs = load_features(folder)
    train_ids, val_ids = split_ids(tokenize_captions(fs, tok), len(fs), 0.25, seed=1)
    s = stream(folder, tok, val_fraction=0.25, buffer_shards=2, seed=1)
    assert s.counts and len(s.counts) == 7 and len(s) == len(train_ids)
    orders = [s.order(1, epoch).tolist() for epoch in (0, 1, 2)]
    for order in orders:
        assert sorted(order) == train_ids.tolist()  # each once; none held out, none without tokens
    assert orders[0] != orders[1] != orders[2]
    assert 4 * 2 + 1 not in orders[0]  # the empty caption
    # Shuffled across shards: the first group's captions come from more than one shard.
    shard_of = torch.bucketize(
        torch.tensor(orders[0][:8]), torch.tensor(open_store(folder).caption_starts[1:]), right=True
    )
    assert len(set(shard_of.tolist())) > 1
    # Deterministic per seed and epoch, another seed gives another order.
    assert stream(folder, tok, val_fraction=0.25, seed=1).order(1, 0).tolist() == orders[0]
    assert s.order(2, 0).tolist() != orders[0]
    # Validation: every held-out caption once, in id order, split between the ranks.
    v = stream(folder, tok, select="val", val_fraction=0.25, seed=1)
    got = [torch.cat([b.index for b in v.eval_batches(3, r, 2)]).tolist() for r in (0, 1)]
    assert sorted(got[0] + got[1]) == val_ids.tolist() and got[0] == val_ids.tolist()[0::2]


def test_ranks_get_disjoint_equal_shares(tmp_path, tiny_clip_dir, tok):
    folder = sharded_store(tmp_path / "s", tiny_clip_dir)
    s = stream(folder, tok, buffer_shards=3)
    n = len(s)  # 35 captions with tokens: 2 processes take 17 each, one is left out
    assert n == 35
    shares = [s.order(0, 0, rank, 2).tolist() for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 17 and not set(shares[0]) & set(shares[1])
    batches = [[b.index.tolist() for b in s.epoch_batches(0, 0, 4, 4, 0, rank, 2)] for rank in (0, 1)]
    assert [x for b in batches[0] for x in b] == shares[0][:16]
    assert [x for b in batches[1] for x in b] == shares[1][:16]


def test_batches_hold_the_captions_and_embeddings_and_resume_at_any_batch(tmp_path, tiny_clip_dir, tok):
    folder = sharded_store(tmp_path / "s", tiny_clip_dir)
    fs = load_features(folder)
    whole = CaptionDataset(fs.embeddings, tokenize_captions(fs, tok), torch.arange(fs.num_captions), max_tokens=64)
    s = stream(folder, tok, buffer_shards=2)
    full = list(s.epoch_batches(3, 1, 4, 8))
    assert [len(b.index) for b in full] == [4] * 8
    for b in full:  # the same tensors as the in-memory collate of the same captions
        ref = whole.collate(b.index.tolist())
        assert all(torch.equal(x, y) for x, y in zip(b, ref))
    ids = [b.index.tolist() for b in full]
    assert ids == [s.order(3, 1).tolist()[i * 4 : (i + 1) * 4] for i in range(8)]
    for start in (1, 3, 5, 7):
        later = list(s.epoch_batches(3, 1, 4, 8, start))
        assert len(later) == 8 - start
        assert all(all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(later, full[start:]))


class ReadSpy:
    """Counts shard reads and how many shards' embeddings are alive at once."""

    def __init__(self, store: Store):
        self.reads: list[int] = []
        self.live = 0
        self.most = 0
        read = store.read_embeddings

        def spy(i: int) -> torch.Tensor:
            emb = read(i)
            self.reads.append(i)
            self.live += 1
            self.most = max(self.most, self.live)
            weakref.finalize(emb, self._gone)
            return emb

        store.read_embeddings = spy

    def _gone(self) -> None:
        self.live -= 1


def test_at_most_buffer_shards_in_memory_and_resume_skips_groups_unread(tmp_path, tiny_clip_dir, tok):
    folder = sharded_store(tmp_path / "s", tiny_clip_dir, sizes=(2,) * 12)
    store = open_store(folder)
    spy = ReadSpy(store)
    s = stream(store, tok, buffer_shards=3)
    n = len(s) // 4
    assert sum(1 for _ in s.epoch_batches(0, 0, 4, n)) == n
    assert sorted(spy.reads) == list(range(12)) and spy.most == 3 and spy.live == 0
    # Resuming in the last group reads that group's shards alone.
    groups = s.groups(0, 0)
    spy.reads.clear()
    assert len(list(s.epoch_batches(0, 0, 4, n, start=n - 1))) == 1
    assert sorted(spy.reads) == sorted(groups[-1])
    # Validation reads one shard at a time.
    spy.reads.clear()
    spy.most = 0
    v = stream(store, tok, select="all")
    assert sum(len(b.index) for b in v.eval_batches(5)) == len(v) and spy.most == 1 and len(spy.reads) == 12


def test_resume_mid_epoch_on_a_sharded_store_is_bit_for_bit(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    """A crash after step 5 (resume state saved at step 3), then --resume: the same weights as an
    uninterrupted run, with a buffer smaller than the store (groups of 2 of 7 shards)."""
    folder = sharded_store(tmp_path / "s", tiny_clip_dir)
    opts = tiny_opts(tiny_gpt2_dir, epochs=2, val_fraction=0.25, buffer_shards=2, checkpoint_every=3)
    ref = Recorder()
    train.train(opts, folder, tmp_path / "ref", callback=ref)
    per_epoch = ref.start.steps_per_epoch
    assert per_epoch > 5

    def crash(info):
        if info.step == 5:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        train.train(opts, folder, tmp_path / "run", callback=Recorder(crash))
    again = Recorder()
    train.train(opts, folder, tmp_path / "run", resume=True, callback=again)
    assert min(again.losses) == 4 and max(again.losses) == 2 * per_epoch
    for step, loss in again.losses.items():
        assert loss == ref.losses[step], step
    ours = checkpoint.read(tmp_path / "run" / "epoch-002.safetensors").state
    theirs = checkpoint.read(tmp_path / "ref" / "epoch-002.safetensors").state
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_resume_refuses_a_changed_shard(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    from clipcap_cli.errors import UsageError

    folder = sharded_store(tmp_path / "s", tiny_clip_dir)
    opts = tiny_opts(tiny_gpt2_dir, epochs=1, buffer_shards=2)
    train.train(opts, folder, tmp_path / "run")
    # Same captions, other embeddings in one shard (re-extracted): refused by the shards' fingerprint.
    from clipcap_cli.data.store import finish_sharded, write_shard

    store = open_store(folder)
    entries = []
    for i in range(len(store.shards)):
        emb, records = store.read_shard(i)
        entries.append(write_shard(folder, i, emb + (i == 2), records, store.meta))
    finish_sharded(folder, entries, store.meta)
    with pytest.raises(UsageError, match="embeddings .* changed"):
        train.train(opts, folder, tmp_path / "run", resume=True)
    # Another buffer changes the order: refused as a changed option.
    with pytest.raises(UsageError, match="buffer_shards"):
        train.train(opts.replace(buffer_shards=3), folder, tmp_path / "run", resume=True)


def test_a_reader_process_yields_the_same_batches(tmp_path, tiny_clip_dir, tok):
    import functools

    from clipcap_cli.train.stream import batches

    folder = sharded_store(tmp_path / "s", tiny_clip_dir)
    s = stream(folder, tok, buffer_shards=2)
    make = functools.partial(s.epoch_batches, 0, 0, 4, 8, 2)
    here, there = list(batches(make, 0, torch.device("cpu"))), list(batches(make, 2, torch.device("cpu")))
    assert len(here) == len(there) == 6
    assert all(type(b) is type(a) and all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(here, there))


def test_pick_images_draws_as_the_in_memory_split_did(tmp_path, tiny_clip_dir, tok):
    """The monitor's samples: n images with a caption in the split, randperm(seed) over their sorted
    rows, as ``torch.unique(ds.image_rows[ds.ids])`` drew them from an in-memory CaptionDataset."""
    folder = sharded_store(tmp_path / "s", tiny_clip_dir)
    fs = load_features(folder)
    tc = tokenize_captions(fs, tok)
    _, val_ids = split_ids(tc, len(fs), 0.3, seed=2)
    rows = torch.unique(tc.image_rows[val_ids])
    want = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(7))[:3]].sort().values
    v = stream(folder, tok, select="val", val_fraction=0.3, seed=2)
    embeddings, records = v.pick_images(3, seed=7)
    assert [r["image"] for r in records] == [fs.records[int(i)]["image"] for i in want]
    assert torch.equal(embeddings, fs.embeddings[want].float())
