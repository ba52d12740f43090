"""Hostile numbers for training and decoding: every float option finite and in range, a run that
diverges stops with one line and never saves non-finite weights, and resume keeps the last good state."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_train import make_store, tiny_opts
from typer.testing import CliRunner

from clipcap_cli import train
from clipcap_cli.cli.app import app
from clipcap_cli.decoding.decode import DecodingOptions
from clipcap_cli.errors import UsageError, check_number
from clipcap_cli.train import loop
from clipcap_cli.weights import checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_clip_dir) -> Path:
    return make_store(tmp_path_factory.mktemp("feats"), tiny_clip_dir)


def _train_args(store: Path, out: Path, gpt2: Path, *extra: str) -> list[str]:
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
        "1",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.parametrize(
    "flag, value, field",
    [
        ("--lr", "inf", "lr"),
        ("--lr", "nan", "lr"),
        ("--lr", "-1", "lr"),
        ("--lr", "0", "lr"),
        ("--weight-decay", "inf", "weight-decay"),
        ("--weight-decay", "-0.1", "weight-decay"),
        ("--val-fraction", "1.5", "val-fraction"),
        ("--val-fraction", "nan", "val-fraction"),
    ],
)
def test_train_float_options_must_be_finite_and_in_range(tmp_path, store, tiny_gpt2_dir, flag, value, field):
    result = runner.invoke(app, _train_args(store, tmp_path / "run", tiny_gpt2_dir, flag, value))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{field} must be a finite number" in lines[0] and value in lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "args, message",
    [
        (["--beam", "3", "--temperature", "inf"], "--temperature must be a finite number > 0, got inf"),
        (["--sample", "--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
        (["--sample", "--temperature", "0"], "--temperature must be a finite number > 0"),
        (["--sample", "--top-p", "2"], "--top-p must be a finite number > 0 and <= 1, got 2.0"),
        (["--sample", "--top-p", "inf"], "--top-p must be a finite number"),
    ],
)
def test_caption_float_options_must_be_finite(tmp_path, tiny_checkpoint, images, args, message):
    result = runner.invoke(app, ["caption", str(images["rgb"]), "--model", str(tiny_checkpoint), *args])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_check_number_rules():
    check_number("x", 0.5, low=0, high=1)
    for bad in (math.inf, -math.inf, math.nan, "abc"):
        with pytest.raises(UsageError):
            check_number("x", bad)
    with pytest.raises(UsageError, match="> 0"):
        check_number("x", 0.0, low=0, low_open=True)
    with pytest.raises(UsageError, match="< 1"):
        check_number("x", 1.0, high=1, high_open=True)
    with pytest.raises(UsageError):
        DecodingOptions(strategy="beam", temperature=float("inf"))


def test_a_diverging_run_stops_with_one_line_and_saves_nothing_broken(tmp_path, store, tiny_gpt2_dir):
    out = tmp_path / "run"
    result = runner.invoke(
        app, _train_args(store, out, tiny_gpt2_dir, "--lr", "1e30", "--warmup", "0", "--checkpoint-every", "1")
    )
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert "training stopped" in lines[-1] and "at step" in lines[-1] and "Traceback" not in result.output
    assert not list(out.glob("epoch-*.safetensors"))
    if (out / "resume.pt").exists():  # only a state saved before the weights broke may be there
        state = torch.load(out / "resume.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    metrics = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""
    for line in metrics.splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def test_the_last_good_state_stays_the_one_resume_uses(tmp_path, store, tiny_gpt2_dir, monkeypatch):
    """Weights that turn NaN mid-run (here poisoned at step 4) stop training before they are saved;
    --resume then continues from the state saved at step 2 and finishes with finite weights."""
    out = tmp_path / "run"
    opts = tiny_opts(tiny_gpt2_dir, epochs=1, checkpoint_every=2)

    class Poison(train.TrainCallback):
        params: list = []

        def on_step(self, info):
            if info.step == 4:
                for p in Poison.params:
                    p.data.fill_(float("nan"))

    real_prepare = loop.prepare

    def prepare(*a, **kw):
        t = real_prepare(*a, **kw)
        Poison.params = t.params[:1]
        return t

    monkeypatch.setattr(loop, "prepare", prepare)
    with pytest.raises(loop.NonFiniteError, match="at step 4 .*stays the one --resume continues from"):
        train.train(opts, store, out, callback=Poison())
    monkeypatch.setattr(loop, "prepare", real_prepare)
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 2
    result = train.train(opts, store, out, resume=True)
    assert result.step == 6
    state = checkpoint.read(out / "epoch-001.safetensors").state
    assert all(torch.isfinite(v).all() for v in state.values())
