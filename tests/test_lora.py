"""LoRA (``clipcap train --lora RANK``): the merge against peft's own, what trains, exact resume, and a
checkpoint that loads merged into a plain LM (captions equal to the unmerged peft model's)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import make_images
from test_train import Recorder, make_store, tiny_opts
from typer.testing import CliRunner

from clipcap_cli import train
from clipcap_cli.cli.app import app
from clipcap_cli.config import ModelConfig
from clipcap_cli.decoding.inference import is_stock_gpt2
from clipcap_cli.errors import UsageError
from clipcap_cli.loading import load_model, load_network
from clipcap_cli.model import ClipCaptionModel
from clipcap_cli.train import TrainOptions, report
from clipcap_cli.weights import checkpoint, lora

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True, scope="module")
def _quick():
    """One thread; no loss chart in the runs' report.html (matplotlib's figure is most of a tiny run's time,
    and test_report.py tests it)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "loss_chart_svg", lambda train, val: None)
        yield
    torch.set_num_threads(saved)


# --------------------------------------------------------------------------- the merge, against peft


def _tiny_lm(family: str) -> torch.nn.Module:
    """A tiny random causal LM of each family the defaults name (no hub, a 64-token vocabulary)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=64))
    if family == "opt":
        cfg = tf.OPTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=32,
            vocab_size=64,
            word_embed_proj_dim=16,
        )
        return tf.OPTForCausalLM(cfg)
    cfg = tf.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    )
    cfg.vocab_size = 64
    return tf.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_the_merge_equals_peft_merge_and_unload(family):
    """W += (B @ A) * alpha / rank with plain tensors (transposed for GPT-2's Conv1D) gives the weights of
    peft's own merge, on every family's default targets (which key on config.model_type)."""
    lm = _tiny_lm(family)
    targets = lora.default_targets(lm)
    assert targets == {"gpt2": lora.GPT2_TARGETS, "opt": lora.OPT_TARGETS, "llama": lora.LLAMA_TARGETS}[family]
    base = {k: v.clone() for k, v in lm.state_dict().items()}
    settings = lora.LoraSettings(4, 12.0, 0.0, targets, fan_in_fan_out=family == "gpt2")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=list(targets),
        fan_in_fan_out=settings.fan_in_fan_out,
        init_lora_weights=False,
    )  # init_lora_weights=False: B random too, so the adapters change every weight they touch
    wrapped = peft.get_peft_model(lm, config)
    adapters = lora.adapter_state(wrapped.base_model.model)
    assert len(adapters) == 2 * 2 * (len(targets) + (family == "gpt2"))  # GPT-2's c_proj: attention and MLP
    ours = lora.merge_state({**base, **adapters}, {lora.METADATA_KEY: settings.to_json()})
    theirs = wrapped.merge_and_unload().state_dict()
    assert set(ours) == set(theirs)
    changed = [k for k in theirs if not torch.equal(theirs[k], base[k])]
    assert len(changed) == len(adapters) // 2
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)


def test_a_state_without_lora_metadata_is_left_as_it_is():
    state = {"gpt.transformer.wte.weight": torch.ones(2, 2)}
    assert lora.merge_state(state, {"format": "clipcap"}) is state


# --------------------------------------------------------------------------- options and refusals


def test_options_refuse_lora_with_only_prefix_and_bad_values():
    with pytest.raises(UsageError, match="--only-prefix freezes it"):
        TrainOptions.create(lora=4, only_prefix=True)
    with pytest.raises(UsageError, match="lora-dropout"):
        TrainOptions.create(lora=4, lora_dropout=1.0)
    with pytest.raises(UsageError, match="lora-alpha"):
        TrainOptions.create(lora=4, lora_alpha=0)
    # targets read back from JSON (a list) compare equal to the typed tuple: a resume is not refused for it
    opts = TrainOptions.create(lora=4, lora_targets=("c_attn", "c_fc"))
    assert TrainOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--lora", "4", "--only-prefix"], ("--lora", "--only-prefix")),
        (["--lora", "4", "--lora-alpha", "-1"], ("lora-alpha",)),
    ],
)
def test_the_cli_refuses_bad_lora_options_in_one_line(tmp_path, args, words):
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "run"), *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and all(w in lines[0] for w in words), result.stderr


def test_missing_peft_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(UsageError, match=r"pip install 'clipcap-cli\[lora\]'"):
        lora.wrap(ClipCaptionModel(ModelConfig(prefix_size=16), _tiny_lm("gpt2")), 4)


@pytest.mark.parametrize(
    ("targets", "message"),
    [(("q_proj",), "match no module"), (("lm_head",), "not its embeddings or output head"), (("wte",), "Embedding")],
)
def test_targets_the_merge_cannot_take_are_refused(targets, message):
    with pytest.raises(UsageError, match=message):
        lora.wrap(ClipCaptionModel(ModelConfig(prefix_size=16), _tiny_lm("gpt2")), 4, targets=targets)


def test_wrap_trains_the_mapper_and_adapters_only_and_starts_as_the_model_was():
    model = ClipCaptionModel(ModelConfig(prefix_size=16, prefix_length=4), _tiny_lm("gpt2")).eval()
    tokens, emb = torch.randint(0, 64, (2, 5)), torch.randn(2, 16)
    before = model(tokens, emb)[0]
    settings = lora.wrap(model, 2)
    assert settings == lora.LoraSettings(2, 2.0, 0.0, lora.GPT2_TARGETS, True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("clip_project.") or ".lora_" in n for n in trainable)
    assert any(n.startswith("clip_project.") for n in trainable) and any(".lora_B." in n for n in trainable)
    torch.testing.assert_close(model(tokens, emb)[0], before, rtol=0, atol=0)  # B starts at zero


# --------------------------------------------------------------------------- training, resume, loading


class _Keep(Recorder):
    def on_end(self, result, model):
        self.model = model


def _lora_opts(gpt2, **changes) -> TrainOptions:
    # lora_dropout > 0: the RNG stream matters for an exact resume; a LoRA-sized learning rate
    base = dict(lora=4, lora_alpha=8, lora_dropout=0.1, lr=5e-3, val_fraction=0.25, log_every=1, samples=0, epochs=1)
    return tiny_opts(gpt2, **{**base, **changes})


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_clip_dir):
    return make_store(tmp_path_factory.mktemp("feats"), tiny_clip_dir)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, store, tiny_gpt2_dir):
    """An uninterrupted LoRA run (1 epoch of 4 steps), its samples captioned through the adapters."""
    out = tmp_path_factory.mktemp("lora") / "run"
    rec = _Keep()
    train.train(_lora_opts(tiny_gpt2_dir, samples=1), store, out, callback=rec)
    assert len(rec.losses) == 4
    return rec, out


@pytest.mark.slow
def test_a_lora_checkpoint_holds_the_mapper_and_adapters_and_its_settings(lora_run):
    rec, out = lora_run
    raw = checkpoint.read(out / "epoch-001.safetensors")
    assert not raw.has_lm  # the base LM comes from its name, as for --only-prefix
    assert {k.split(".")[0] for k in raw.state} == {"clip_project", "lora"}
    settings = lora.LoraSettings.from_json(raw.metadata[lora.METADATA_KEY])
    assert settings == lora.LoraSettings(4, 8.0, 0.1, lora.GPT2_TARGETS, True)
    adapters = [k for k in raw.state if k.startswith("lora.")]
    assert len(adapters) == 2 * 4 * 2  # 2 layers x 4 modules x (A, B)
    assert rec.start.trainable_params == sum(v.numel() for v in raw.state.values())
    assert any(bool(raw.state[k].abs().sum() > 0) for k in adapters if ".lora_B." in k)  # the adapters trained
    assert (out / "samples.jsonl").is_file()


@pytest.mark.slow
def test_resume_continues_a_lora_run_exactly(tmp_path, store, tiny_gpt2_dir, lora_run):
    reference, ref_out = lora_run
    out = tmp_path / "run"
    opts = _lora_opts(tiny_gpt2_dir, checkpoint_every=2)

    def crash_at_step_3(info):
        if info.step == 3:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train.train(opts, store, out, callback=Recorder(crash_at_step_3))
    state = torch.load(out / "resume.pt", weights_only=True)  # the mapper and the adapters, not the base LM
    assert state["step"] == 2 and not any(k.startswith("gpt.") and ".lora_" not in k for k in state["model"])
    again = Recorder()  # mid-epoch: the data order and the adapters' dropout stream continue exactly
    train.train(opts, store, out, resume=True, callback=again)
    assert list(again.losses) == [3, 4]
    assert [again.losses[s] for s in again.losses] == pytest.approx(
        [reference.losses[s] for s in again.losses], abs=1e-6
    )
    ours = checkpoint.read(out / "epoch-001.safetensors").state
    theirs = checkpoint.read(ref_out / "epoch-001.safetensors").state
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # another rank, scale or set of targets would change the run: refused, as other options are
    assert train.resume_conflicts(opts, opts.replace(lora=2, lora_targets=("c_attn",))) == ["lora", "lora_targets"]


@pytest.mark.slow
def test_the_checkpoint_loads_merged_and_captions_as_the_unmerged_peft_model(lora_run, tmp_path, tiny_gpt2_dir):
    rec, out = lora_run
    path = out / "epoch-001.safetensors"
    merged = load_network(str(path))
    unmerged = rec.model.eval()
    assert is_stock_gpt2(merged.gpt) and not any("lora" in n for n, _ in merged.named_modules())  # a plain LM
    base = load_network(str(path))  # the same file without its adapters: what LoRA changed
    base.gpt.load_state_dict(type(base.gpt).from_pretrained(tiny_gpt2_dir).state_dict())
    tokens, emb = torch.randint(0, 50257, (3, 6)), torch.randn(3, merged.config.prefix_size)
    with torch.no_grad():
        got, want, without = merged(tokens, emb)[0], unmerged(tokens, emb)[0], base(tokens, emb)[0]
    assert (got - want).abs().max() < 1e-4 < (without - want).abs().max()

    images = make_images(tmp_path / "img")
    photos = [str(images[k]) for k in ("rgb", "gray", "exif")]
    captioner = load_model(str(path))
    captioner.model = unmerged  # the same CLIP, tokenizer and decoding; the adapters unmerged (peft layers)
    expected = [r.text for r in captioner.caption(photos, max_length=8)]
    result = CliRunner().invoke(app, ["caption", "--model", str(path), "--max-length", "8", *photos])
    assert result.exit_code == 0, result.stderr
    assert [json.loads(line)["caption"] for line in result.stdout.splitlines()] == expected
