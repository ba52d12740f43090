"""Checkpoint compatibility: the released ClipCap files' exact layout, and our own format."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from released import released_mlp_state, released_transformer_state

from clipcap_cli.errors import CheckpointError
from clipcap_cli.loading import load_network
from clipcap_cli.weights import checkpoint


def _assert_loaded_exactly(model, sd):
    loaded = model.state_dict()
    for key in (
        "clip_project.model.2.bias",
        "clip_project.linear.weight",
        "clip_project.prefix_const",
        "gpt.transformer.h.11.mlp.c_proj.weight",
        "gpt.transformer.wte.weight",
        "gpt.lm_head.weight",
    ):
        if key in sd:
            assert torch.equal(loaded[key], sd[key]), key


@pytest.mark.slow
def test_released_mlp_checkpoint_loads_strictly(tmp_path: Path):
    sd = released_mlp_state(torch.Generator().manual_seed(0))
    path = tmp_path / "coco_weights.pt"
    torch.save(sd, path)
    raw = checkpoint.read(path)
    assert not any(checkpoint.STALE_GPT_BUFFER.match(k) for k in raw.state)
    assert sum(1 for k in sd if checkpoint.STALE_GPT_BUFFER.match(k)) == 24
    config = checkpoint.resolve_config(raw)
    assert (config.mapping, config.prefix_length, config.prefix_size, config.clip_model) == ("mlp", 10, 512, "ViT-B-32")
    assert not config.normalize_prefix
    model = checkpoint.build_model(raw, config)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808 + 31_468_800
    _assert_loaded_exactly(model, sd)
    assert model.gpt.lm_head.weight.data_ptr() == model.gpt.transformer.wte.weight.data_ptr()


@pytest.mark.slow
def test_released_transformer_checkpoint_loads_strictly(tmp_path: Path):
    sd = released_transformer_state(torch.Generator().manual_seed(1))
    path = tmp_path / "transformer_weights.pt"
    torch.save(sd, path)
    raw = checkpoint.read(path)
    config = checkpoint.resolve_config(raw)
    assert (config.mapping, config.prefix_length, config.clip_length, config.num_layers) == ("transformer", 40, 40, 8)
    assert (config.prefix_size, config.clip_model, config.normalize_prefix) == (640, "RN50x4", True)
    model = checkpoint.build_model(raw, config)
    _assert_loaded_exactly(model, sd)
    # A wrong CLIP is named in one line, with the fix.
    with pytest.raises(CheckpointError, match=r"expects 640-d CLIP features \(RN50x4\); you gave ViT-B-32 \(512-d\)"):
        checkpoint.check_clip(checkpoint.resolve_config(raw, clip_model="ViT-B-32"), 512)


def test_missing_or_extra_keys_are_named(tmp_path: Path, tiny_config):
    model = build_tiny_model(tiny_config)
    sd = {f"gpt.{k}": v for k, v in model.gpt.state_dict().items()}
    sd.update({f"clip_project.{k}": v for k, v in model.clip_project.state_dict().items()})
    del sd["gpt.transformer.ln_f.bias"]
    sd["gpt.transformer.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    raw = checkpoint.read(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. gpt\.transformer\.ln_f\.bias\); 1 unexpected"):
        checkpoint.build_model(raw, tiny_config)


def test_our_checkpoint_round_trips_bit_exactly(tmp_path: Path, tiny_config):
    model = build_tiny_model(tiny_config, seed=3)
    path = checkpoint.save(model, tmp_path / "run" / "epoch-001.safetensors")
    assert not list(path.parent.glob("*.tmp"))
    loaded = load_network(path)
    assert loaded.config == tiny_config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_only_prefix_checkpoint_stores_mapper_only(tmp_path: Path, tiny_config, tiny_gpt2_dir):
    config = tiny_config.replace(mapping="transformer", prefix_length=5, clip_length=3, num_layers=2, only_prefix=True)
    model = build_tiny_model(config, seed=4)
    path = checkpoint.save(model, tmp_path / "prefix.safetensors")
    raw = checkpoint.read(path)
    assert raw.state and all(k.startswith("clip_project.") for k in raw.state)
    assert raw.config == config and raw.metadata["format"] == "clipcap"
    loaded = load_network(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # mapper from the file, GPT-2 from tiny_gpt2_dir


def test_unsafe_pickle_is_refused(tmp_path: Path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"clip_project.model.0.weight": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        checkpoint.read(path)


def test_not_a_checkpoint(tmp_path: Path):
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read x.safetensors"):
        checkpoint.read(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.read(tmp_path / "nope.pt")
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no ClipCap mapper"):
        checkpoint.resolve_config(checkpoint.read(tmp_path / "other.pt"))
