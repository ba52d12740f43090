"""`torchrun --nproc_per_node 2 -m clipcap_cli train` on the CPU (gloo): the ranks see disjoint data
and end with identical weights, and only rank 0 writes the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipcap_cli import checkpoint, train
from test_train import make_store


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [
        ["--mapping", "mlp"],  # full fine-tuning: GPT-2 gradients are all-reduced too
        ["--mapping", "transformer", "--only-prefix", "--num-layers", "1", "--clip-length", "2"],  # frozen LM
    ],
    ids=["full", "only-prefix"],
)
def test_two_cpu_processes_stay_in_sync_on_disjoint_data(tmp_path: Path, tiny_clip_dir, tiny_gpt2_dir, mode):
    store = make_store(tmp_path / "feats", tiny_clip_dir, n_images=12, per_image=2)  # 24 captions
    out, debug = tmp_path / "run", tmp_path / "debug"
    env = {**os.environ, train.DEBUG_DDP_ENV: str(debug), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",  # = torchrun; free port
        "-m", "clipcap_cli", "train", "--data", str(store), "--out", str(out), "--gpt2", str(tiny_gpt2_dir),
        "--prefix-length", "4", "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--warmup", "1",
        "--device", "cpu", "--log-every", "1", *mode,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 prints the result and writes the run.
    assert proc.stdout.strip().splitlines() == [str(out / "epoch-002.safetensors")]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "epoch-001.safetensors", "epoch-002.safetensors", "metrics.jsonl", "resume.pt"]
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
    model = checkpoint.load(out / "epoch-002.safetensors")
    assert train._weights_hash(model) == ranks[0]["weights_sha256"]
    assert model.config.only_prefix == ("--only-prefix" in mode)
