"""Any causal LM (``--lm``): GPT-2, OPT, Llama and Qwen2, tiny and random, with tokenizers built here.

Decoding on each family is compared with a plain re-statement of the algorithm over the HF model's
full forward of the whole sequence (``original_clipcap``'s oracles, and ``ref_sample`` below); the
checkpoint records the LM so loading needs no ``--lm``; wrong LMs are refused with one line.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lm_families import CJK_CAPTION, FAMILIES, build_lm, write_tiny_lm
from original_clipcap import last_logits, ref_beam, ref_greedy

from clipcap_cli.config import EOS_STOP, ModelConfig
from clipcap_cli.decoding.decode import beam_search, filter_logits, greedy, row_seed, sample, tokens_to_text
from clipcap_cli.errors import CheckpointError, ModelNotAvailableError, UsageError
from clipcap_cli.loading import load_network
from clipcap_cli.model import ClipCaptionModel
from clipcap_cli.weights import backbones, checkpoint, lm

CLIP_DIM = 16
MAX = 7


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _LmDirs(dict):
    """family -> a saved tiny LM + tokenizer folder (what ``--lm DIR`` takes), written on first use."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> Path:
        self[family] = write_tiny_lm(self.root / family, family)
        return self[family]


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _LmDirs(tmp_path_factory.mktemp("lms"))


def _config(lm_name: str, **changes) -> ModelConfig:
    return ModelConfig(
        prefix_length=4, prefix_size=CLIP_DIM, clip_model="tiny", clip_pretrained=None, lm=lm_name
    ).replace(**changes)


@pytest.fixture(scope="module")
def models():
    """ClipCaptionModel per family in float64 (exact comparisons), with its tokenizer and stop id."""
    out = {}
    for family in FAMILIES:
        gpt, tokenizer = build_lm(family)
        torch.manual_seed(1)
        model = ClipCaptionModel(_config(family), gpt).double().eval()
        out[family] = (model, tokenizer)
    return out


@pytest.fixture(scope="module")
def clips():
    return torch.randn(2, CLIP_DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _stop_for(model, prefix) -> int:
    """A stop id that some captions reach early (the third greedy token of image 0), so rows and
    beams stop at different steps."""
    return ref_greedy(model, prefix[:1], 3, -1)[2]


@torch.no_grad()
def ref_sample(model, prefix, max_length, stop_id, seed, image, index, temperature=1.0, top_k=0, top_p=1.0):
    """One sample restated: full forward each step, the exponential race over filtered probabilities
    with the row's own generator (decoding.sample's documented draw)."""
    g = torch.Generator().manual_seed(row_seed(seed, image, index))
    generated, tokens = prefix, []
    for _ in range(max_length):
        logits = last_logits(model, generated).to(torch.float64) / temperature
        probs = filter_logits(logits, top_k, top_p).softmax(-1)[0]
        race = torch.empty(probs.shape[-1]).exponential_(generator=g)
        token = int((probs / race).argmax(-1))
        tokens.append(token)
        embed = model.gpt.get_input_embeddings()(torch.tensor([[token]]))
        generated = torch.cat((generated, embed.to(generated.dtype)), dim=1)
        if token == stop_id:
            break
    return tokens


# --------------------------------------------------------------------------- decoding is exact on every family


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_beam_and_sampling_match_the_restated_algorithms(models, clips, family):
    model, _ = models[family]
    with torch.no_grad():
        prefix = model.embed_prefix(clips)
    stop = _stop_for(model, prefix)
    got_greedy = [t for t, _ in greedy(model, prefix, MAX, stop)]
    assert got_greedy == [ref_greedy(model, prefix[i : i + 1], MAX, stop) for i in range(len(clips))]
    assert any(len(t) < MAX for t in got_greedy)  # the stop token was met: stopping is exercised
    got_beam = beam_search(model, prefix, 3, MAX, stop)
    for i, hyps in enumerate(got_beam):
        want = ref_beam(model, prefix[i : i + 1], 3, MAX, stop)
        assert [t for t, _ in hyps] == [t for t, _ in want]
        assert [s for _, s in hyps] == pytest.approx([s for _, s in want], abs=1e-9)
    got_sample = sample(model, prefix, 2, MAX, stop, temperature=0.9, top_p=0.9, seed=5)
    for i, hyps in enumerate(got_sample):
        want = [ref_sample(model, prefix[i : i + 1], MAX, stop, 5, i, j, 0.9, 0, 0.9) for j in range(2)]
        assert sorted(t for t, _ in hyps) == sorted(want)


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # byte-level BPE; SentencePiece-style with byte fallback
def test_cjk_caption_round_trips_and_is_never_cut_mid_character(family):
    _, tokenizer = build_lm(family)
    lm.check_tokenizer(tokenizer, family)
    ids = tokenizer.encode(CJK_CAPTION, add_special_tokens=False)
    assert tokens_to_text(tokenizer, ids) == CJK_CAPTION
    multi_token_char = False
    for cut in range(1, len(ids)):
        text = tokens_to_text(tokenizer, ids[:cut])
        assert "\ufffd" not in text, (cut, text)
        assert CJK_CAPTION.startswith(text)  # whole characters only, none half-decoded
        multi_token_char |= tokenizer.decode(ids[:cut]).endswith("\ufffd")
    assert multi_token_char  # some cut really fell inside a character


def test_stop_token_from_the_tokenizer():
    _, llama = build_lm("llama")
    dot = lm.stop_id(llama, ".")
    assert llama.convert_ids_to_tokens(dot) == "."  # not "▁" (SentencePiece spells a lone "." as "▁.")
    assert llama.encode("a dog.", add_special_tokens=False)[-1] == dot
    assert lm.stop_id(llama, EOS_STOP) == llama.eos_token_id
    appended = lm.training_tokenizer(llama, EOS_STOP)
    assert appended(["a dog."], add_special_tokens=False)["input_ids"][0][-1] == llama.eos_token_id
    assert lm.training_tokenizer(llama, ".") is llama


def test_the_end_of_text_stop_is_kept_in_tokens_but_not_in_text(models, clips, monkeypatch):
    from clipcap_cli.decoding import decode as decoding

    model, llama = models["llama"]
    words = llama.encode("a dog", add_special_tokens=False)
    monkeypatch.setattr(decoding, "generate", lambda *a, **k: [[([*words, llama.eos_token_id], -1.0)]])
    [eos] = decoding.decode_prefix(model, llama, clips[:1], decoding.DecodingOptions(stop_token=EOS_STOP))
    assert eos.text == "a dog" and eos.tokens[-1] == llama.eos_token_id
    [dot] = decoding.decode_prefix(model, llama, clips[:1], decoding.DecodingOptions(stop_token="."))
    assert dot.text == "a dog</s>"  # any other stop: the text is every token's, as the original


# --------------------------------------------------------------------------- checkpoints record the LM


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_checkpoint_records_the_lm_and_loads_without_lm(tmp_path, lm_dirs, clips, family):
    folder = lm_dirs[family]
    torch.manual_seed(0)
    model = ClipCaptionModel(_config(str(folder)), backbones.load_lm(str(folder))).eval()
    assert model.gpt_embedding_size == lm.hidden_size(model.gpt.config)  # OPT: its 16-wide projected embeddings
    path = checkpoint.save(model, tmp_path / "m.safetensors")
    raw = checkpoint.read(path)
    assert raw.lm_config["model_type"] == family and raw.gpt2_config is None and raw.config.lm == str(folder)
    loaded = load_network(str(path))  # no --lm: the recorded config builds it, the name finds the tokenizer
    tokens = torch.tensor([[5, 6, 7]]).expand(len(clips), -1)
    with torch.no_grad():
        want = model(tokens, clips.float())[0]
        got = loaded(tokens, clips.float())[0]
    assert torch.equal(want, got)

    frozen = ClipCaptionModel(_config(str(folder), only_prefix=True), model.gpt).eval()
    frozen.clip_project.load_state_dict(model.clip_project.state_dict())
    small = checkpoint.save(frozen, tmp_path / "frozen.safetensors")
    assert not checkpoint.read(small).has_lm  # the mapper alone; the LM comes from the recorded name
    with torch.no_grad():
        assert torch.equal(load_network(str(small))(tokens, clips.float())[0], want)


def test_a_checkpoint_refuses_another_lm(tmp_path, lm_dirs, models):
    llama = lm_dirs["llama"]
    saved = {}
    for family in ("llama", "gpt2"):
        model = copy.deepcopy(models[family][0]).float()  # the shared fixture stays as it is
        model.config = _config(str(llama) if family == "llama" else "gpt2")
        saved[family] = checkpoint.save(model, tmp_path / f"{family}.safetensors")
    with pytest.raises(CheckpointError, match=r"trained on the LM 'recorded' \(llama.*--lm '.*opt' \(opt"):
        load_network(str(saved["llama"]), lm=str(lm_dirs["opt"]))
    with pytest.raises(CheckpointError, match=r"trained on GPT-2 \(hidden 32, vocab 361\); --lm '.*llama' \(llama"):
        load_network(str(saved["gpt2"]), lm=str(llama))


def test_bad_lms_are_refused_before_any_work(tmp_path, lm_dirs):
    from transformers import BertConfig, T5Config

    bert = tmp_path / "bert"
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, architectures=["BertForMaskedLM"]
    ).save_pretrained(bert)
    with pytest.raises(UsageError, match=r"--lm '.*bert' is a bert model saved as BertForMaskedLM, not a causal"):
        backbones.load_lm(str(bert))
    with pytest.raises(UsageError, match="is a t5 model, not a causal language model"):
        lm.check_causal(T5Config(), "t5-small")

    _, llama = build_lm("llama")
    small = lm.config_from_dict({"model_type": "llama", "vocab_size": 300, "hidden_size": 32})
    with pytest.raises(
        UsageError, match=r"tokenizer of 'x' has 407 tokens, the LM 'x' \(llama, hidden 32, vocab 300\)"
    ):
        lm.check_vocab(llama, small, "x")

    no_tokenizer = tmp_path / "no-tokenizer"
    build_lm("llama")[0].save_pretrained(no_tokenizer)
    with pytest.raises(ModelNotAvailableError, match="tokenizer of LM '.*no-tokenizer'"):
        backbones.load_tokenizer(str(no_tokenizer))


def test_pretrained_weights_get_the_families_keys():
    t = torch.zeros(1)
    # Old OPT hub files keep the decoder bare; GPT-2's keep its blocks bare; save_pretrained's are whole.
    assert set(checkpoint.lm_state({"decoder.layers.0.w": t, "lm_head.weight": t}, "model")) == {
        "gpt.model.decoder.layers.0.w",
        "gpt.lm_head.weight",
    }
    assert set(checkpoint.lm_state({"model.layers.0.w": t}, "model")) == {"gpt.model.layers.0.w"}
    assert set(checkpoint.lm_state({"h.0.attn.bias": t, "wte.weight": t})) == {"gpt.transformer.wte.weight"}


def test_lm_option_and_its_gpt2_alias():
    from clipcap_cli.cli.commands.options import lm_choice

    assert lm_choice("a", None) == "a" and lm_choice(None, "b") == "b" and lm_choice("gpt2", "b", "gpt2") == "b"
    with pytest.raises(UsageError, match="--lm a and --gpt2 b disagree"):
        lm_choice("a", "b")
    assert ModelConfig.from_dict({"gpt2": "old"}).lm == "old"  # checkpoints written before --lm
    assert ModelConfig(gpt2="x").lm == "x" == ModelConfig(lm="x").gpt2


# --------------------------------------------------------------------------- train and caption end to end


@pytest.mark.slow
def test_cli_trains_opt_and_llama_and_captions_without_lm(tmp_path, lm_dirs, tiny_clip_dir, images):
    """`clipcap train --lm DIR` for OPT and a Llama-style LM (the latter with --stop-token eos), then
    `clipcap caption` on the result with no --lm: the checkpoint names its LM and tokenizer."""
    import json

    from test_train import make_store
    from typer.testing import CliRunner

    from clipcap_cli.cli.app import app

    runner = CliRunner()
    store = make_store(tmp_path / "store", tiny_clip_dir, n_images=6)
    for family, stop in (("opt", "."), ("llama", EOS_STOP)):
        out = tmp_path / f"run-{family}"
        args = ["train", "--data", str(store), "--out", str(out), "--lm", str(lm_dirs[family]), "--stop-token", stop]
        args += ["--prefix-length", "2", "--epochs", "1", "--batch-size", "4", "--warmup", "1", "--device", "cpu"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        ckpt = result.stdout.strip()
        raw = checkpoint.read(ckpt)
        assert raw.lm_config["model_type"] == family and raw.config.stop_token == stop
        shown = runner.invoke(app, ["caption", "--model", ckpt, str(images["rgb"]), "--json", "--max-length", "5"])
        assert shown.exit_code == 0, shown.output
        [record] = json.loads(shown.stdout)
        assert isinstance(record["caption"], str) and record["caption"]


@pytest.mark.parametrize("kind", ["missing", "file", "device"])
def test_an_lm_written_as_a_path_that_is_no_folder_is_one_line(tmp_path: Path, kind: str):
    """A path is never sent to the hub (which could only say "not cached"): one line saying what it is."""
    from clipcap_cli.errors import UsageError
    from clipcap_cli.weights import backbones

    name = {"missing": str(tmp_path / "gone"), "file": str(tmp_path / "weights.bin"), "device": "/dev/null"}[kind]
    if kind == "file":
        Path(name).write_bytes(b"x")
    want = "does not exist" if kind == "missing" else "is not a folder"
    with pytest.raises(UsageError, match=f"language model {name}: {want}"):
        backbones.load_tokenizer(name)
    assert backbones.local_folder(str(tmp_path)) == tmp_path and backbones.local_folder("org/model") is None
