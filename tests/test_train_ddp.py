"""`clipcap train` under torchrun with 2 CPU processes (gloo): the ranks see disjoint data and end
with identical weights, only rank 0 writes the run, and a failure on rank 0 stops rank 1 at once
with rank 0's message. The runs go through tests/ddp_train.py, which adds a probe callback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ddp_train import weights_hash
from test_train import make_store

from clipcap_cli.loading import load_network

ENTRY = Path(__file__).with_name("ddp_train.py")


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    # --monitor-interval: when a process fails, torchrun waits this long before stopping the
    # others, so that their own error line reaches stderr (its default, 0.1 s, can cut it off).
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",  # = torchrun; free port
        "--monitor-interval",
        "5",
        *args,
    ]
    return subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout
    )


def train_args(store: Path, out: Path, gpt2: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(store),
        "--out",
        str(out),
        "--gpt2",
        str(gpt2),
        "--prefix-length",
        "4",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--log-every",
        "1",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.system
@pytest.mark.parametrize(
    "mode",
    [["--mapping", "mlp"]],  # full fine-tuning: GPT-2 gradients are all-reduced too (frozen LM: the test below)
    ids=["full"],
)
def test_two_cpu_processes_stay_in_sync_on_disjoint_data(tmp_path: Path, tiny_clip_dir, tiny_gpt2_dir, mode):
    store = make_store(tmp_path / "feats", tiny_clip_dir, n_images=12, per_image=2)  # 24 captions
    out, debug = tmp_path / "run", tmp_path / "debug"
    proc = torchrun(str(ENTRY), str(debug), *train_args(store, out, tiny_gpt2_dir, *mode))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 prints the result and writes the run.
    assert proc.stdout.strip().splitlines() == [str(out / "epoch-002.safetensors")]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "epoch-001.safetensors",
        "epoch-002.safetensors",
        "metrics.jsonl",
        "report.html",
        "resume.pt",
        "samples.jsonl",
    ]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # 24 captions / 2 processes / batch 4 = 3 steps per epoch, once each
    assert json.loads((out / "config.json").read_text())["world_size"] == 2

    ranks = [json.loads((debug / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [6, 6]
    # Each rank trained on 12 captions per epoch; within an epoch the ranks' samples are disjoint
    # and together cover all 24; the order changes between epochs (set_epoch).
    for epoch in (0, 1):
        seen = [r["indices"][epoch * 12 : (epoch + 1) * 12] for r in ranks]
        assert len(set(seen[0])) == 12 and not set(seen[0]) & set(seen[1])
        assert set(seen[0]) | set(seen[1]) == set(range(24))
    assert ranks[0]["indices"][:12] != ranks[0]["indices"][12:]
    # Different data, same weights: the gradients were averaged across the processes ...
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # ... and the checkpoint rank 0 wrote holds exactly those weights.
    model = load_network(out / "epoch-002.safetensors")
    assert weights_hash(model) == ranks[0]["weights_sha256"]
    assert model.config.only_prefix == ("--only-prefix" in mode)


@pytest.mark.slow
@pytest.mark.system
def test_a_failure_on_rank_0_stops_rank_1_at_once_with_its_message(tmp_path: Path, tiny_clip_dir, tiny_gpt2_dir):
    """Rank-0-only work fails (a callback raises mid-run): rank 1 must not wait in its next collective
    for the backend's timeout (30 min for gloo), nor die of a lost connection, but stop with rank 0's
    message. The rest of rank 0's own work (config.json, metrics.jsonl, checkpoints, samples) runs in
    the same ``Distributed.fail_together`` blocks, so one launch checks the mechanism for all of it."""
    store = make_store(tmp_path / "feats", tiny_clip_dir, n_images=12, per_image=2)
    out = tmp_path / "run"
    args = [str(ENTRY), str(tmp_path / "probe"), "step:2", *train_args(store, out, tiny_gpt2_dir)]
    message = "process 0 of 2 failed: RuntimeError: probe: rank 0 gives up at step 2"
    start = time.monotonic()
    proc = torchrun(*args, timeout=180)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert message in " ".join(proc.stderr.split()), proc.stderr[-3000:]  # printed by rank 1
    assert elapsed < 120, elapsed
    assert not (tmp_path / "probe").exists()  # no rank got to the end


@pytest.mark.slow
@pytest.mark.system
def test_two_processes_stream_a_sharded_store_disjointly(
    tmp_path: Path, tiny_clip_dir, tiny_gpt2_dir, gpt2_tokenizer_dir
):
    """A sharded store read in groups of 2 of its 7 shards: each rank trains on exactly its share of
    the stream (``CaptionStream.order``), the shares are disjoint, and the weights stay identical; with the
    frozen-LM transformer mapper, so that DDP over a mapper alone is covered too."""
    from test_stream import sharded_store, stream

    from clipcap_cli.weights import backbones

    store = sharded_store(tmp_path / "feats", tiny_clip_dir)  # 35 captions with tokens
    out, debug = tmp_path / "run", tmp_path / "debug"
    frozen_lm = ["--mapping", "transformer", "--only-prefix", "--num-layers", "1", "--clip-length", "2"]
    args = train_args(store, out, tiny_gpt2_dir, "--buffer-shards", "2", *frozen_lm, "--seed", "3")
    proc = torchrun(str(ENTRY), str(debug), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((debug / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in ranks] == [8, 8]  # 35 // 2 = 17 captions per rank: 4 batches of 4 per epoch
    s = stream(store, backbones.load_tokenizer(str(gpt2_tokenizer_dir)), buffer_shards=2)
    for epoch in (0, 1):
        seen = [r["indices"][epoch * 16 : (epoch + 1) * 16] for r in ranks]
        assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == len(set(seen[1])) == 16
        for rank in (0, 1):
            assert seen[rank] == s.order(3, epoch, rank, 2).tolist()[:16]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    # The frozen-LM transformer mapper, averaged across the processes, is what rank 0's checkpoint holds.
    model = load_network(out / "epoch-002.safetensors")
    assert weights_hash(model) == ranks[0]["weights_sha256"] and model.config.only_prefix
    assert model.config.mapping == "transformer"
