"""The training monitor: samples each epoch, collapse and plateau warnings, best.safetensors,
--early-stop (across --resume), and what `clipcap train` shows of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train import Recorder, make_store, tiny_opts
from typer.testing import CliRunner

from clipcap_cli import train
from clipcap_cli.cli.app import app
from clipcap_cli.data.features import load_features, save_features
from clipcap_cli.errors import UsageError
from clipcap_cli.loading import load_network
from clipcap_cli.train import Sample, loop, monitor
from clipcap_cli.train.state import Position
from clipcap_cli.weights import backbones, checkpoint

COLOURS = [(220, 30, 30), (30, 170, 40), (30, 60, 220), (240, 200, 20)]


class Watcher(Recorder):
    """Recorder + the samples of each epoch."""

    def __init__(self, on_step=None):
        super().__init__(on_step)
        self.samples: list[tuple[int, int, list[Sample]]] = []

    def on_samples(self, epoch, step, samples):
        self.samples.append((epoch, step, list(samples)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def store_with_images(folder: Path, clip_dir: Path, n_images: int = 20, missing: tuple[int, ...] = ()) -> Path:
    """make_store's store, with its images written under the store's images_root (except ``missing``)."""
    store = make_store(folder / "feats", clip_dir, n_images=n_images)
    fs = load_features(store)
    root = folder / "images"
    for i, record in enumerate(fs.records):
        if i not in missing:
            (root / record["image"]).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (48, 32), COLOURS[i % len(COLOURS)]).save(root / record["image"])
    return save_features(store, fs.embeddings, fs.records, {**fs.meta, "images_root": str(root)})


def strict_jsonl(path: Path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def image_store(tmp_path_factory, tiny_clip_dir) -> Path:
    return store_with_images(tmp_path_factory.mktemp("istore"), tiny_clip_dir, missing=(3,))


# --------------------------------------------------------------------------- samples


def test_held_out_samples_each_epoch_are_the_same_images_and_land_in_samples_jsonl(
    tmp_path, image_store, tiny_gpt2_dir
):
    out = tmp_path / "run"
    rec = Watcher()
    opts = tiny_opts(tiny_gpt2_dir, epochs=2, val_fraction=0.3, samples=4, lr=3e-3)
    result = train.train(opts, image_store, out, callback=rec)

    assert rec.start.steps_per_epoch == 7  # 20 images, 6 held out -> 28 training captions -> 7 steps of 4
    assert [(e, s) for e, s, _ in rec.samples] == [(1, 7), (2, 14)]
    first, second = rec.samples[0][2], rec.samples[1][2]
    assert len(first) == 4 and [s.image for s in first] == [s.image for s in second]  # the same images
    assert all(s.split == "val" for s in first)
    # They are held-out images (of the run's split), with their own reference captions.
    fs = load_features(image_store)
    tc = train.tokenize_captions(fs, backbones.load_tokenizer(str(tiny_gpt2_dir)))
    _, val_ids = train.split_ids(tc, len(fs.records), 0.3, seed=opts.seed)
    held_out = {fs.records[int(tc.image_rows[c])]["image"] for c in val_ids}
    assert {s.image for s in first} <= held_out
    records = {r["image"]: r for r in fs.records}
    for s in first:
        assert s.references == tuple(records[s.image]["captions"]) and isinstance(s.caption, str)

    lines = strict_jsonl(out / "samples.jsonl")
    assert [x["epoch"] for x in lines] == [1, 2] and [x["step"] for x in lines] == [7, 14]
    assert [x["samples"] for x in lines] == [[s.to_dict() for s in first], [s.to_dict() for s in second]]
    assert lines[1]["val_loss"] == pytest.approx(result.val_loss)
    # --samples 0: none taken, no samples.jsonl.
    silent = Watcher()
    train.train(opts.replace(samples=0, epochs=1), image_store, tmp_path / "silent", callback=silent)
    assert silent.samples == [] and not (tmp_path / "silent" / "samples.jsonl").exists()


def test_without_a_held_out_split_training_images_are_sampled_and_marked(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    store = make_store(tmp_path / "f", tiny_clip_dir, n_images=12)  # < 20 images: no automatic split
    rec = Watcher()
    train.train(tiny_opts(tiny_gpt2_dir, epochs=1, samples=3), store, tmp_path / "run", callback=rec)
    assert rec.start.val_samples == 0
    ((_, _, samples),) = rec.samples
    assert len(samples) == 3 and {s.split for s in samples} == {"train"}
    assert strict_jsonl(tmp_path / "run" / "samples.jsonl")[0]["split"] == "train"


def test_automatic_held_out_split_takes_5_percent_of_20_or_more_images():
    opts = train.TrainOptions()
    assert opts.val_fraction is None
    assert opts.held_out_fraction(19) == 0.0 and opts.held_out_fraction(20) == 0.05
    assert opts.replace(val_fraction=0.0).held_out_fraction(1000) == 0.0
    assert opts.replace(val_data="v").held_out_fraction(1000) == 0.0  # --val-data replaces it
    assert opts.replace(val_fraction=0.2).held_out_fraction(5) == 0.2


# --------------------------------------------------------------------------- warnings


def test_collapse_warning_only_when_every_caption_is_the_same():
    same = [Sample(f"{i}.jpg", ("r",), "a a a.") for i in range(3)]
    message = monitor.collapse_warning(4, same)
    assert message and "epoch 4" in message and '"a a a."' in message and "--lr" in message and "\n" not in message
    assert monitor.collapse_warning(4, [*same[:2], Sample("x.jpg", ("r",), "a dog.")]) is None
    assert monitor.collapse_warning(4, same[:1]) is None  # one sample proves nothing


def test_collapse_warning_fires_on_a_model_that_ignores_the_image(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    """Every image with one embedding: the model cannot tell them apart, so it says one thing."""
    fs = load_features(make_store(tmp_path / "f", tiny_clip_dir, n_images=20))
    store = save_features(tmp_path / "same", fs.embeddings[:1].expand(20, -1).clone(), fs.records, fs.meta)
    rec = Watcher()
    train.train(tiny_opts(tiny_gpt2_dir, epochs=1, val_fraction=0.25, samples=4), store, tmp_path / "run", callback=rec)
    collapse = [w for w in rec.warnings if "same caption" in w]
    assert len(collapse) == 1 and "all 4 sample images" in collapse[0]
    assert strict_jsonl(tmp_path / "run" / "samples.jsonl")[0]["warnings"] == collapse


def test_distinct_captions_raise_no_collapse_warning(tmp_path, store_12, tiny_gpt2_dir):
    """The same untrained model on distinct embeddings: distinct (if meaningless) captions, no warning."""
    rec = Watcher()
    opts = tiny_opts(tiny_gpt2_dir, epochs=1, lr=1e-12, warmup=0, samples=6)
    train.train(opts, store_12, tmp_path / "run", callback=rec)
    captions = [s.caption for s in rec.samples[0][2]]
    assert len(captions) == 6 and len(set(captions)) > 1, captions
    assert not [w for w in rec.warnings if "same caption" in w]


def test_plateau_warning_once_when_the_training_loss_stops_moving():
    assert monitor.plateau_warning(2, [5.0, 5.0]) is None  # needs 2 epochs of no change
    message = monitor.plateau_warning(3, [5.0, 4.99, 4.985])
    assert message and "epoch 3" in message and "5.0000 -> 4.9900 -> 4.9850" in message and "--lr" in message
    assert monitor.plateau_warning(3, [5.0, 4.0, 3.99]) is None  # one epoch flat is not a plateau
    assert monitor.plateau_warning(3, [5.0, 4.9, 4.89]) is None  # 2% then 0.2%
    assert monitor.plateau_warning(4, [5.0, 5.0, 5.0, 5.0]) is None  # said at epoch 3, not again


def test_plateau_warning_on_a_run_that_does_not_learn(tmp_path, store_12, tiny_gpt2_dir):
    rec = Watcher()
    opts = tiny_opts(tiny_gpt2_dir, epochs=3, lr=1e-12, warmup=0, samples=0, only_prefix=True)
    train.train(opts, store_12, tmp_path / "run", callback=rec)
    assert [w.split(":")[0] for w in rec.warnings if "has not moved" in w] == ["epoch 3"]


@pytest.fixture(scope="module")
def store_12(tmp_path_factory, tiny_clip_dir) -> Path:
    return make_store(tmp_path_factory.mktemp("f12"), tiny_clip_dir, n_images=12)


# --------------------------------------------------------------------------- best checkpoint and early stop


def scripted_validation(monkeypatch, losses: list[float]) -> None:
    """Held-out losses by epoch, as if measured: what best.safetensors and --early-stop act on."""
    monkeypatch.setattr(loop, "validate", lambda t: losses[t.pos.epoch - 1])


def test_best_checkpoint_is_the_lowest_held_out_loss(tmp_path, monkeypatch, image_store, tiny_gpt2_dir):
    scripted_validation(monkeypatch, [5.0, 4.0, 4.5, 4.2])
    rec = Watcher()
    out = tmp_path / "run"
    result = train.train(
        tiny_opts(tiny_gpt2_dir, epochs=4, val_fraction=0.3, samples=0), image_store, out, callback=rec
    )
    assert [p.name for p, kind in rec.checkpoints if kind == "best"] == ["best.safetensors"] * 2  # epochs 1, 2
    assert result.best == out / "best.safetensors" and result.best_epoch == 2 and result.best_val_loss == 4.0
    best = checkpoint.read(out / "best.safetensors")
    assert best.metadata["epoch"] == "2" and float(best.metadata["val_loss"]) == 4.0
    epoch2, epoch4 = (
        checkpoint.read(out / "epoch-002.safetensors").state,
        checkpoint.read(out / "epoch-004.safetensors"),
    )
    assert all(torch.equal(best.state[k], v) for k, v in epoch2.items())
    assert not all(torch.equal(best.state[k], v) for k, v in epoch4.state.items())
    assert load_network(out / "best.safetensors").config.prefix_length == 4  # usable with no other flag
    assert not result.stopped_early


def test_early_stop_stops_after_n_epochs_without_improvement(tmp_path, monkeypatch, image_store, tiny_gpt2_dir):
    scripted_validation(monkeypatch, [5.0, 4.0, 4.5, 4.1, 3.0, 2.0])
    out = tmp_path / "run"
    opts = tiny_opts(tiny_gpt2_dir, epochs=6, val_fraction=0.3, samples=0, early_stop=2, save_every=3)
    result = train.train(opts, image_store, out, callback=Watcher())
    assert result.stopped_early and result.step == 4 * 7 and result.best_epoch == 2  # 7 steps per epoch
    assert [p.name for p in result.checkpoints] == ["epoch-003.safetensors", "epoch-004.safetensors"]  # + the last
    # A stopped run stays stopped on --resume; a larger --early-stop lets it go on.
    again = Watcher()
    assert train.train(opts, image_store, out, resume=True, callback=again).step == 28 and again.losses == {}
    assert again.start.stopped_early
    more = train.train(opts.replace(early_stop=3), image_store, out, resume=True)
    assert more.step == 6 * 7 and more.best_epoch == 6 and not more.stopped_early


def test_early_stop_counts_across_resume(tmp_path, monkeypatch, image_store, tiny_gpt2_dir):
    """Stopped in epoch 4 with epoch 3 not improving on epoch 2: the resumed run remembers both."""
    scripted_validation(monkeypatch, [5.0, 4.0, 4.5, 4.6, 1.0, 1.0])
    out = tmp_path / "run"
    opts = tiny_opts(tiny_gpt2_dir, epochs=6, val_fraction=0.3, samples=2, early_stop=2)

    def crash_in_epoch_4(info):
        if info.step == 3 * 7 + 2:  # 7 steps per epoch
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train.train(opts, image_store, out, callback=Watcher(crash_in_epoch_4))
    saved = torch.load(out / "resume.pt", weights_only=True)
    assert (saved["epoch"], saved["best_val_loss"], saved["best_epoch"], saved["stale_epochs"]) == (3, 4.0, 2, 1)
    rec = Watcher()
    result = train.train(opts, image_store, out, resume=True, callback=rec)
    assert result.stopped_early and result.step == 28 and result.best_epoch == 2
    assert checkpoint.read(out / "best.safetensors").metadata["epoch"] == "2"
    assert [x["epoch"] for x in strict_jsonl(out / "samples.jsonl")] == [1, 2, 3, 4]  # one line per epoch


def test_old_resume_states_without_the_monitor_fields_still_load(tmp_path, store_12, tiny_gpt2_dir):
    out = tmp_path / "run"
    opts = tiny_opts(tiny_gpt2_dir, epochs=2, samples=2)

    def crash_in_epoch_2(info):
        if info.step == 8:  # 6 steps per epoch
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train.train(opts, store_12, out, callback=Recorder(crash_in_epoch_2))
    state = torch.load(out / "resume.pt", weights_only=True)
    fields = ("best_val_loss", "best_epoch", "stale_epochs", "epoch_losses", "epoch_loss_sum", "epoch_loss_steps")
    assert state["step"] == 6 and set(fields) <= set(state)
    torch.save({k: v for k, v in state.items() if k not in fields}, out / "resume.pt")  # as saved before the monitor
    rec = Watcher()
    result = train.train(opts, store_12, out, resume=True, callback=rec)
    assert result.step == 12 and result.best is None and [e for e, _, _ in rec.samples] == [2]
    assert Position().best_val_loss is None and Position().stale_epochs == 0


def test_early_stop_needs_a_validation_split(tmp_path, store_12, tiny_gpt2_dir):
    with pytest.raises(UsageError, match="--early-stop needs a validation split.*--val-fraction or --val-data"):
        train.train(tiny_opts(tiny_gpt2_dir, early_stop=2), store_12, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(UsageError, match="cannot be negative"):
        tiny_opts(tiny_gpt2_dir, samples=-1)


# --------------------------------------------------------------------------- the command


def test_cli_shows_samples_best_and_report(tmp_path, image_store, tiny_gpt2_dir):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["train", "--data", str(image_store), "--out", str(out), "--gpt2", str(tiny_gpt2_dir)]
    args += ["--prefix-length", "4", "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--warmup", "1"]
    result = runner.invoke(app, [*args, "--val-fraction", "0.3", "--samples", "3", "--early-stop", "5"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out / "epoch-002.safetensors")
    err = result.stderr
    assert "epoch 1 samples (held-out images)" in err and "epoch 2 samples" in err and "generated" in err
    line = strict_jsonl(out / "samples.jsonl")[-1]
    assert line["samples"][0]["references"][0][:12] in err  # the reference column
    assert f"report: {out / 'report.html'}" in err and f"best: {out / 'best.safetensors'}" in err
    cfg = json.loads((out / "config.json").read_text())["train_options"]
    assert (cfg["samples"], cfg["early_stop"]) == (3, 5)

    refused = runner.invoke(
        app, [*args[:4], str(tmp_path / "r2"), *args[5:], "--val-fraction", "0", "--early-stop", "1"]
    )
    assert refused.exit_code == 2 and "--early-stop needs a validation split" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_the_samples_table_shows_captions_as_text_not_markup(capsys):
    from clipcap_cli.cli.commands.train_display import Display

    with Display(quiet=False) as display:
        display.on_samples(3, 9, [Sample("img/[x].jpg", ("[red]ref[/red]",), "[/oops] [bold]x", "train")])
    err = capsys.readouterr().err
    assert "epoch 3 samples (training images: the run has no held-out split)" in err
    assert "[/oops] [bold]x" in err and "[red]ref[/red]" in err and "img/[x].jpg" in err
