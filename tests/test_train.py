"""`clipcap train`: options, caption data, the loss wiring, checkpoints, exact resume, the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLIP_CFG, build_tiny_model
from typer.testing import CliRunner

from clipcap_cli import train
from clipcap_cli.cli.app import app
from clipcap_cli.config import ModelConfig
from clipcap_cli.data.features import load_features, save_features
from clipcap_cli.distributed import Distributed
from clipcap_cli.errors import UsageError
from clipcap_cli.loading import load_network
from clipcap_cli.model import caption_loss
from clipcap_cli.train import TrainOptions
from clipcap_cli.weights import checkpoint

WORDS = "a dog cat sits on the red blue green bench near tree small big house with grass".split()


def make_store(
    folder: Path, clip_dir: Path, n_images: int = 12, per_image: int = 2, seed: int = 0, captions=None
) -> Path:
    """A features store with random 32-d embeddings and varied-length captions."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n_images):
        caps = []
        for j in range(per_image):
            n = 3 + int(torch.randint(0, 8, (1,), generator=g))
            caps.append(" ".join(WORDS[int(k)] for k in torch.randint(0, len(WORDS), (n,), generator=g)) + ".")
        records.append({"image": f"img/{i}.jpg", "image_id": i, "captions": captions[i] if captions else caps})
    emb = torch.randn(n_images, TINY_CLIP_CFG["embed_dim"], generator=g).half()
    meta = {"clip_model": f"local-dir:{clip_dir}", "clip_pretrained": None, "preprocess": "test"}
    return save_features(folder, emb, records, meta)


def tiny_opts(gpt2: Path, **changes) -> TrainOptions:
    base = dict(prefix_length=4, gpt2=str(gpt2), epochs=2, batch_size=4, lr=1e-3, warmup=2, checkpoint_every=1000)
    base.update(changes)
    return TrainOptions.create(**base)


class Recorder(train.TrainCallback):
    def __init__(self, on_step=None):
        self.losses: dict[int, float] = {}
        self.warnings: list[str] = []
        self.checkpoints: list[tuple[Path, str]] = []
        self.validations: list[tuple[int, int, float]] = []
        self.start: train.StartInfo | None = None
        self._on_step = on_step

    def on_start(self, info):
        self.start = info

    def on_step(self, info):
        self.losses[info.step] = info.loss
        if self._on_step:
            self._on_step(info)

    def on_warning(self, message):
        self.warnings.append(message)

    def on_checkpoint(self, path, kind):
        self.checkpoints.append((path, kind))

    def on_validation(self, epoch, step, loss):
        self.validations.append((epoch, step, loss))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from two intra-op threads, and lose 10x on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_clip_dir) -> Path:
    return make_store(tmp_path_factory.mktemp("feats"), tiny_clip_dir)


# --------------------------------------------------------------------------- options and schedule


def test_defaults_are_the_original_recipe():
    o = TrainOptions()
    m = o.model
    assert (m.mapping, m.only_prefix, m.prefix_length, m.clip_length, m.num_layers, m.normalize_prefix) == (
        "mlp",
        False,
        10,
        10,
        8,
        False,
    )
    from clipcap_cli.train.options import auto_warmup

    assert auto_warmup(o.warmup, 10 * 10_000) == 5000  # on COCO-sized runs (below: a tenth of shorter ones)
    assert (o.epochs, o.batch_size, o.lr, auto_warmup(o.warmup, 100_000), o.weight_decay, o.save_every, m.gpt2) == (
        10,
        40,
        2e-5,
        5000,
        0.0,
        1,
        "gpt2",
    )
    assert m == ModelConfig()  # the mapper defaults live in config.py only
    assert train.ADAM_EPS == 1e-6 and train.ADAM_BETAS == (0.9, 0.999)


def test_options_round_trip_flat_and_nested():
    opts = TrainOptions.create(mapping="transformer", prefix_length=40, epochs=3, val_data="v")
    assert opts.model.mapping == "transformer" and opts.model.prefix_length == 40 and opts.epochs == 3
    assert TrainOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    # config.json of runs started before the options held a ModelConfig: the same fields, flat.
    assert TrainOptions.from_dict(opts.flat()) == opts
    assert opts.replace(prefix_length=8).model.prefix_length == 8 and opts.model.prefix_length == 40
    assert train.resume_conflicts(opts, opts.replace(num_layers=2, log_every=3)) == ["num_layers"]


def test_schedule_is_linear_warmup_then_linear_decay():
    f = [train.lr_factor(s, warmup=4, total=12) for s in range(13)]
    assert f[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]  # step 0 runs at lr 0, as get_linear_schedule_with_warmup
    assert f[4:] == pytest.approx([1 - i / 8 for i in range(9)])
    assert f[12] == 0.0 and train.lr_factor(20, 4, 12) == 0.0
    assert train.lr_factor(0, 0, 10) == 1.0


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(mapping="lstm"), "unknown mapping"),
        (dict(batch_size=0), "batch-size"),
        (dict(val_fraction=1.0), "val-fraction"),
        (dict(val_fraction=0.1, val_data="x"), "either"),
        (dict(precision="fp8"), "precision"),
        (dict(lr=0.0), "lr"),
    ],
)
def test_options_are_validated(bad, match):
    with pytest.raises(UsageError, match=match):
        TrainOptions.create(**bad)


# --------------------------------------------------------------------------- data


def test_tokens_are_cached_keyed_and_rebuilt_when_stale(tmp_path, tiny_clip_dir, gpt2_tokenizer_dir):
    from clipcap_cli.weights import backbones

    tok = backbones.load_tokenizer(str(gpt2_tokenizer_dir))
    caps = [["A dog on a bench.", "Two cats."], [], ["A red house near a tree with grass."]]
    folder = make_store(tmp_path / "f", tiny_clip_dir, n_images=3, captions=caps)
    tc = train.tokenize_captions(load_features(folder), tok)
    assert tc.path == folder / "tokens.safetensors" and tc.path.is_file()
    # One entry per caption, exactly tokenizer.encode (no BOS/EOS), and the image row of each.
    flat = [c for cs in caps for c in cs]
    got = [tc.tokens[tc.offsets[i] : tc.offsets[i + 1]].tolist() for i in range(len(flat))]
    assert got == [tok.encode(c) for c in flat]
    assert tok.eos_token_id not in tc.tokens.tolist()
    assert tc.image_rows.tolist() == [0, 0, 2]
    assert tc.tokens.dtype == torch.int32

    # Reused as it is when nothing changed (the file is not rewritten) ...
    mtime = tc.path.stat().st_mtime_ns
    again = train.tokenize_captions(load_features(folder), tok)
    assert again.key == tc.key and tc.path.stat().st_mtime_ns == mtime and torch.equal(again.tokens, tc.tokens)
    # ... rebuilt when a caption changed ...
    caps[2] = ["A blue house."]
    make_store(folder, tiny_clip_dir, n_images=3, captions=caps)
    fresh = train.tokenize_captions(load_features(folder), tok)
    assert fresh.key != tc.key and fresh.tokens[fresh.offsets[2] :].tolist() == tok.encode("A blue house.")
    # ... and when the tokenizer differs (an added token changes its identity).
    tok.add_tokens(["<extra>"])
    other = train.tokenize_captions(load_features(folder), tok)
    assert other.key != fresh.key


def test_collate_pads_each_batch_to_its_own_longest_caption(tmp_path, tiny_clip_dir, gpt2_tokenizer_dir):
    from clipcap_cli.weights import backbones

    tok = backbones.load_tokenizer(str(gpt2_tokenizer_dir))
    caps = [["A dog."], ["A big red house near the small green tree."], ["Cats!"]]
    fs = load_features(make_store(tmp_path / "f", tiny_clip_dir, n_images=3, captions=caps))
    tc = train.tokenize_captions(fs, tok)
    ds = train.CaptionDataset(fs.embeddings, tc, torch.arange(3), max_tokens=64)
    lengths = [len(tok.encode(c[0])) for c in caps]

    b = ds.collate([0, 2])  # the long caption is not in this batch: it does not set the width
    assert b.tokens.shape == (2, max(lengths[0], lengths[2])) and b.tokens.dtype == torch.int64
    assert b.mask.sum(1).tolist() == [lengths[0], lengths[2]]
    assert b.tokens[0, : lengths[0]].tolist() == tok.encode("A dog.") and (b.tokens[~b.mask] == 0).all()
    assert b.prefix.dtype == torch.float32 and torch.equal(b.prefix, fs.embeddings[[0, 2]].float())
    assert b.index.tolist() == [0, 2]

    short = train.CaptionDataset(fs.embeddings, tc, torch.arange(3), max_tokens=4)
    b = short.collate([1])
    assert b.tokens.tolist() == [tok.encode(caps[1][0])[:4]] and b.mask.all()


def test_validation_split_is_by_image_and_drops_empty_captions(tmp_path, tiny_clip_dir, gpt2_tokenizer_dir):
    from clipcap_cli.weights import backbones

    fs = load_features(make_store(tmp_path / "f", tiny_clip_dir, n_images=20, per_image=3))
    fs.records[5]["captions"][1] = ""
    tc = train.tokenize_captions(fs, backbones.load_tokenizer(str(gpt2_tokenizer_dir)))
    tr, va = train.split_ids(tc, 20, 0.25, seed=3)
    assert len(tr) + len(va) == 59 and 5 * 3 + 1 not in tr.tolist() + va.tolist()
    assert not set(tc.image_rows[tr].tolist()) & set(tc.image_rows[va].tolist())
    assert len(set(tc.image_rows[va].tolist())) == 5
    tr2, va2 = train.split_ids(tc, 20, 0.25, seed=3)
    assert torch.equal(va, va2)


def test_forward_with_targets_is_caption_loss_on_full_logits(tiny_config):
    """The LM-head-trimmed loss of forward(targets=) is caption_loss of the full logits, prefix slice
    and mask included, and its logits are the full logits from position K-1 on."""
    model = build_tiny_model(tiny_config).eval()
    k = tiny_config.prefix_length
    torch.manual_seed(0)
    tokens = torch.randint(1, 50000, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 2:] = False
    tokens = tokens.masked_fill(~mask, 0)
    prefix = torch.randn(3, tiny_config.prefix_size)
    full, no_loss = model(tokens, prefix)
    assert full.shape == (3, k + 7, 50257) and no_loss is None
    logits, loss = model(tokens, prefix, mask, targets=tokens)
    torch.testing.assert_close(logits, full[:, k - 1 :], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, caption_loss(full, tokens, mask, k), atol=1e-5, rtol=1e-5)
    # Padding really is out of it: changing what sits under the mask changes nothing ...
    noisy = tokens.masked_fill(~mask, 777)
    torch.testing.assert_close(model(noisy, prefix, mask, targets=noisy)[1], loss, atol=1e-5, rtol=1e-5)
    # ... while without a mask every position counts.
    assert not torch.allclose(model(tokens, prefix, targets=tokens)[1], loss)


def test_training_fits_a_few_captions_far_below_chance(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    """Real learning, not noise: at initialisation the loss is about ln(50257) = 10.8 (chance)."""
    caps = [["a red circle."], ["a blue square."], ["a green triangle."], ["a red square."]]
    folder = make_store(tmp_path / "f", tiny_clip_dir, n_images=4, captions=caps)
    rec = Recorder()
    train.train(tiny_opts(tiny_gpt2_dir, epochs=25, lr=3e-2, warmup=0), folder, tmp_path / "run", callback=rec)
    assert rec.losses[1] > 10.0
    assert rec.losses[25] < 2.5


# --------------------------------------------------------------------------- the run


def test_train_writes_a_run_whose_checkpoints_need_no_flags(tmp_path, store, tiny_gpt2_dir, tiny_clip_dir):
    rec = Recorder()
    out = tmp_path / "run"
    result = train.train(
        tiny_opts(tiny_gpt2_dir, epochs=3, save_every=2, val_fraction=0.25, lr=3e-3), store, out, callback=rec
    )

    # 12 images, 3 for validation -> 18 training captions -> 4 steps of 4 (drop_last), 3 epochs.
    assert rec.start.steps_per_epoch == 4 and rec.start.total_steps == 12 and result.step == 12
    assert rec.start.train_samples == 18 and rec.start.val_samples == 6
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "best.safetensors",
        "config.json",
        "epoch-002.safetensors",
        "epoch-003.safetensors",
        "metrics.jsonl",
        "report.html",
        "resume.pt",
        "samples.jsonl",
    ]
    assert [p.name for p in result.checkpoints] == ["epoch-002.safetensors", "epoch-003.safetensors"]
    assert [v[:2] for v in rec.validations] == [(1, 4), (2, 8), (3, 12)]
    # Even on random pairs it learns the words: the held-out loss falls every epoch.
    val = [v[2] for v in rec.validations]
    assert val[0] > val[1] > val[2] and result.val_loss == val[2]

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train_options"]["lr"] == 3e-3 and cfg["model_config"]["prefix_size"] == 32
    assert cfg["data"] == str(Path(store).resolve())

    # The last checkpoint loads with no other information and holds the trained weights.
    model = load_network(out / "epoch-003.safetensors")
    assert model.config.clip_model == f"local-dir:{tiny_clip_dir}" and model.config.prefix_length == 4
    state = torch.load(out / "resume.pt", weights_only=True)
    for k, v in state["model"].items():
        assert torch.equal(model.state_dict()[k], v), k
    init = build_tiny_model(model.config)
    assert not torch.equal(init.gpt.transformer.h[0].mlp.c_fc.weight, model.gpt.transformer.h[0].mlp.c_fc.weight)

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["type"] == "train"]
    assert [x["step"] for x in steps] == [4, 8, 10, 12]  # every 10 steps, and at each epoch end
    assert set(steps[0]) >= {"step", "epoch", "loss", "lr", "samples_per_s", "time"}
    assert steps[0]["loss"] == pytest.approx(sum(rec.losses[s] for s in range(1, 5)) / 4)
    assert [x["epoch"] for x in lines if x["type"] == "val"] == [1, 2, 3]


def test_only_prefix_trains_the_mapper_alone(tmp_path, store, tiny_gpt2_dir):
    opts = tiny_opts(tiny_gpt2_dir, only_prefix=True, mapping="transformer", num_layers=1, clip_length=2, epochs=1)
    run = train.prepare(opts, store, tmp_path / "run", False, Distributed(torch.device("cpu")), train.TrainCallback())
    mapper = {id(p) for p in run.model.clip_project.parameters()}
    assert {id(p) for g in run.optimizer.param_groups for p in g["params"]} == mapper
    batches = run.data.batches(0, 0, 4, 1)
    before = {k: v.clone() for k, v in run.model.gpt.state_dict().items()}
    run.pos.step = 3  # past the warm-up: a real update
    train.train_step(run, batches)
    assert all(p.grad is None for p in run.model.gpt.parameters())  # never computed
    assert all(torch.equal(before[k], v) for k, v in run.model.gpt.state_dict().items())
    assert not run.model.gpt.training and run.model.clip_project.training

    result = train.train(opts, store, tmp_path / "run2")
    saved = checkpoint.read(result.checkpoints[-1])
    assert saved.state and all(k.startswith("clip_project.") for k in saved.state)
    assert load_network(result.checkpoints[-1]).config.only_prefix


def test_grad_accum_matches_one_big_batch(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    # Equal-length captions: the mean of micro-batch means is then the mean over the big batch.
    caps = [[f"a dog {w}.", f"a cat {w}."] for w in WORDS[:12]]
    folder = make_store(tmp_path / "f", tiny_clip_dir, n_images=12, captions=caps)
    common = dict(only_prefix=True, epochs=2, warmup=0, lr=1e-2)  # frozen LM: no dropout anywhere
    big, small = Recorder(), Recorder()
    train.train(tiny_opts(tiny_gpt2_dir, batch_size=8, **common), folder, tmp_path / "a", callback=big)
    train.train(tiny_opts(tiny_gpt2_dir, batch_size=4, grad_accum=2, **common), folder, tmp_path / "b", callback=small)
    assert list(big.losses) == list(small.losses) == [1, 2, 3, 4, 5, 6]
    for s in big.losses:
        assert small.losses[s] == pytest.approx(big.losses[s], abs=1e-5)


def test_long_captions_are_truncated_with_one_warning(tmp_path, tiny_clip_dir, tiny_gpt2_dir):
    long = " ".join(["word"] * 200) + "."
    caps = [[long if i % 3 == 0 else "a short one."] for i in range(8)]
    folder = make_store(tmp_path / "f", tiny_clip_dir, n_images=8, captions=caps)
    rec = Recorder()
    train.train(tiny_opts(tiny_gpt2_dir, epochs=1), folder, tmp_path / "run", callback=rec)
    # tiny GPT-2 has a 128-position window; K=4 leaves 124 tokens for a caption
    assert [w for w in rec.warnings if "truncated" in w] == ["3 caption(s) longer than 124 tokens were truncated"]
    assert len(rec.losses) == 2 and all(math.isfinite(x) for x in rec.losses.values())


# --------------------------------------------------------------------------- resume


def _losses(rec: Recorder) -> list[float]:
    return [rec.losses[s] for s in sorted(rec.losses)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, store, tiny_gpt2_dir):
    """A full fine-tuning run (GPT-2 dropout on: the RNG state matters) to compare resumes against."""
    out = tmp_path_factory.mktemp("full") / "run"
    rec = Recorder()
    train.train(tiny_opts(tiny_gpt2_dir, epochs=2, val_fraction=0.25, log_every=2), store, out, callback=rec)
    assert len(rec.losses) == 8
    return rec, out


@pytest.fixture
def default_signals():
    """SIGINT and SIGTERM at Python's defaults, as in a foreground terminal, even when the suite runs
    as a background job (which starts with SIGINT ignored); the inherited handlers come back after."""
    saved = {
        s: signal.signal(s, h)
        for s, h in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))
    }
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_resume_reproduces_the_loss_curve(
    tmp_path, store, tiny_gpt2_dir, uninterrupted, signum, default_signals
):
    reference, ref_out = uninterrupted
    out = tmp_path / "run"
    opts = tiny_opts(tiny_gpt2_dir, epochs=2, val_fraction=0.25, log_every=2)

    def kill_during_step_2(info):
        if info.step == 2:
            os.kill(os.getpid(), signum)

    # The signal is seen at the end of the step that follows it: step 3, mid-epoch (4 steps per epoch).
    first = Recorder(kill_during_step_2)
    with pytest.raises(train.TrainingInterrupted) as exc:
        train.train(opts, store, out, callback=first)
    assert exc.value.exit_code == 130 and exc.value.step == 3 and "resume" in str(exc.value)
    assert list(first.losses) == [1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    second = Recorder()
    train.train(opts, store, out, resume=True, callback=second)
    assert list(second.losses) == [4, 5, 6, 7, 8]
    for s, loss in {**first.losses, **second.losses}.items():
        assert abs(loss - reference.losses[s]) <= 1e-6, s
    ours = checkpoint.read(out / "epoch-002.safetensors").state
    theirs = checkpoint.read(ref_out / "epoch-002.safetensors").state
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert _metrics(out) == _metrics(ref_out)  # the same lines, loss means included (log windows span the stop)


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: (round(v, 9) if isinstance(v, float) else v) for k, v in x.items() if k not in ("time", "samples_per_s")}
        for x in lines
    ]


def test_an_ignored_sigint_stays_ignored(tmp_path, store, tiny_gpt2_dir, default_signals):
    """A background job (``clipcap train ... &`` in a script) starts with SIGINT ignored: training must
    not take it over, so a SIGINT sent to the job leaves the run going, and the handler is left as it was."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def interrupt_during_step_2(info):
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    rec = Recorder(interrupt_during_step_2)
    train.train(tiny_opts(tiny_gpt2_dir, epochs=1, val_fraction=0.25), store, tmp_path / "run", callback=rec)
    assert list(rec.losses) == [1, 2, 3, 4]  # the whole epoch ran
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_resume_after_a_crash_continues_from_the_last_periodic_save(tmp_path, store, tiny_gpt2_dir, uninterrupted):
    """A crash (here in the middle of a metrics.jsonl write, which leaves half a line) loses only
    the steps since the last save, and --resume continues the same curve and the same log."""
    reference, ref_out = uninterrupted
    out = tmp_path / "run"
    opts = tiny_opts(tiny_gpt2_dir, epochs=2, val_fraction=0.25, checkpoint_every=3, log_every=2)

    def crash_at_step_7(info):
        if info.step == 7:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train.train(opts, store, out, callback=Recorder(crash_at_step_7))
    assert torch.load(out / "resume.pt", weights_only=True)["step"] == 6  # saved at 3, at the epoch end (4), at 6
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"type": "train", "step": 7, "epoch": 1.75, "lo')  # the torn last line

    again = Recorder()
    train.train(opts, store, out, resume=True, callback=again)
    assert list(again.losses) == [7, 8]
    assert _losses(again) == pytest.approx([reference.losses[7], reference.losses[8]], abs=1e-6)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (ref_out / "metrics.jsonl").read_text().splitlines()]
    assert [(x["type"], x["step"]) for x in lines] == [(x["type"], x["step"]) for x in expected]
    assert _metrics(out) == _metrics(ref_out)


def test_resume_refuses_what_would_change_the_run(tmp_path, store, tiny_gpt2_dir):
    out = tmp_path / "run"
    opts = tiny_opts(tiny_gpt2_dir, epochs=1)
    with pytest.raises(UsageError, match="no resume.pt"):
        train.train(opts, store, out, resume=True)
    train.train(opts, store, out)
    with pytest.raises(UsageError, match="already holds a training run"):
        train.train(opts, store, out)
    with pytest.raises(UsageError, match="different lr: the run used lr=0.001"):
        train.train(opts.replace(lr=0.5), store, out, resume=True)
    with pytest.raises(UsageError, match="different prefix_length: the run used prefix_length=4"):
        train.train(opts.replace(prefix_length=5), store, out, resume=True)
    # Harmless changes are fine; a finished run has nothing left to do.
    result = train.train(opts.replace(log_every=3, num_workers=0), store, out, resume=True)
    assert result.step == 6 and result.checkpoints == []  # 24 captions / 4


# --------------------------------------------------------------------------- the command


def test_cli_trains_resumes_and_reports(tmp_path, store, tiny_gpt2_dir):
    runner = CliRunner()
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(store),
        "--out",
        str(out),
        "--gpt2",
        str(tiny_gpt2_dir),
        "--prefix-length",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out / "epoch-001.safetensors")
    assert "training: 24 captions" in result.stderr and "saved" in result.stderr
    assert load_network(result.stdout.strip()).config.prefix_length == 4

    # --resume needs only --out (options and data come from the run); a changed schedule is refused.
    bad = runner.invoke(app, ["train", "--out", str(out), "--resume", "--lr", "0.1"])
    assert bad.exit_code == 2 and "different lr: the run used lr=0.001" in bad.stderr
    again = runner.invoke(app, ["train", "--out", str(out), "--resume", "--epochs", "1"])
    assert again.exit_code == 0 and again.stdout == "" and "nothing left to train" in again.stderr

    missing = runner.invoke(app, ["train", "--out", str(tmp_path / "other")])
    assert missing.exit_code == 2 and "give DATA" in missing.stderr
    bad_mapping = runner.invoke(app, ["train", "--data", str(store), "--out", str(tmp_path / "x"), "--mapping", "lstm"])
    assert bad_mapping.exit_code == 2 and "unknown mapping" in bad_mapping.stderr


def test_default_warmup_is_the_originals_but_never_most_of_a_short_run():
    from clipcap_cli.train.options import auto_warmup

    assert auto_warmup(None, 100_000) == 5000  # COCO-sized runs keep the original's schedule exactly
    assert auto_warmup(None, 300) == 30  # a small collection reaches its peak learning rate
    assert auto_warmup(None, 5) == 1
    assert auto_warmup(0, 300) == 0 and auto_warmup(7000, 300) == 7000  # given: as given


def test_a_run_of_few_steps_says_so_once(store, tmp_path, tiny_gpt2_dir):
    rec = Recorder()
    train.train(tiny_opts(tiny_gpt2_dir, epochs=1), store, tmp_path / "run", callback=rec)
    [few] = [w for w in rec.warnings if "optimizer step" in w]
    assert few.startswith(f"this run has only {rec.start.total_steps} optimizer step(s)") and "--batch-size" in few
    resumed = Recorder()
    train.train(tiny_opts(tiny_gpt2_dir, epochs=1), store, tmp_path / "run", resume=True, callback=resumed)
    assert not [w for w in resumed.warnings if "optimizer step" in w]  # said at the start only
