"""Decoding: batched, KV-cached greedy and beam search against a plain re-statement of the
original ClipCap algorithms (no cache, one image at a time), sampling, options and text.

The exactness tests run the tiny model in float64: the algorithms are compared, not float32
rounding (a KV cache and a full re-forward agree only to ~1e-6 in float32, which can flip a
near-tie in a random model's flat distribution). They run on each GPT-2 stepper: the static
cache (the default), its fixed-shape step (what CUDA graphs replay), and the generic path
through the model's own forward; the reference results are computed once and shared.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import build_tiny_model
from original_clipcap import last_logits as _last_logits
from original_clipcap import ref_beam, ref_greedy

from clipcap_cli.decoding import decode as decoding
from clipcap_cli.decoding import inference
from clipcap_cli.decoding.decode import (
    DecodingOptions,
    DecodingResult,
    beam_search,
    clean_up_tokenization,
    decode,
    filter_logits,
    generate,
    greedy,
    sample,
    tokens_to_text,
)
from clipcap_cli.decoding.inference import forward_kwargs as _forward_kwargs
from clipcap_cli.errors import UsageError
from clipcap_cli.weights import backbones

STOP = 13  # GPT-2's "."
MAX = 20


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer(tiny_config):
    return backbones.load_tokenizer(tiny_config.gpt2)


def _with_stop_row(model):
    """Untie the LM head and give '.' a row whose logit swings with the context, so captions
    stop after 1..MAX tokens and beams stop at different steps."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head = model.gpt.transformer.wte.weight.detach().clone()
        head[STOP] = torch.randn(head.shape[1], generator=g) * 3
        model.gpt.lm_head.weight = torch.nn.Parameter(head)
    return model


def _small_vocab_model(config, vocab: int = 2000):
    """The tiny GPT-2 with a 2000-token vocabulary: the algorithms are the same, the per-step
    (rows x vocab) work is 25x smaller, so the no-cache reference stays quick."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from clipcap_cli.model import ClipCaptionModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
        )
    )
    return ClipCaptionModel(config, gpt).eval()


@pytest.fixture(scope="module")
def plain_model(tiny_config):
    """Random weights, flat distributions: '.' is never chosen and every caption runs to the end."""
    return _small_vocab_model(tiny_config).double()


@pytest.fixture(scope="module")
def stop_model(tiny_config):
    return _with_stop_row(_small_vocab_model(tiny_config)).double()


@pytest.fixture(scope="module")
def real_vocab_model(tiny_config):
    """The conftest tiny model (the real 50257-token GPT-2 vocabulary), '.' made likely."""
    return _with_stop_row(build_tiny_model(tiny_config)).double()


@pytest.fixture(scope="module")
def clips():
    return torch.randn(24, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _prefix(model, clips):
    with torch.no_grad():
        return model.embed_prefix(clips)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tiny float64 models gain nothing from a second thread, and on a busy 2-core machine
    every parallel region can stall on it (a 10x slower module was measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def refs():
    """The reference decoders, memoised: ``refs(name, model, prefix, i, "beam", beam, max, stop[, T])``."""
    memo = {}

    def get(name, model, prefix, i, kind, *args):
        key = (name, prefix[i].numpy().tobytes(), kind, args)
        if key not in memo:
            with torch.no_grad():
                fn = ref_beam if kind == "beam" else ref_greedy
                memo[key] = fn(model, prefix[i : i + 1], *args)
        return memo[key]

    return get


STEPPERS = {
    "static": None,  # the default: StaticGPT2 for transformers' GPT-2
    "fixed-shape": lambda gpt, rows, positions: inference.open_inference(gpt, rows, positions, cuda_graphs=True),
    "forward": lambda gpt, rows, positions: inference.ForwardStepper(gpt),
}


@pytest.fixture(params=list(STEPPERS))
def stepper(request, monkeypatch):
    """Run decoding on one of the GPT-2 steppers (see the module docstring)."""
    if STEPPERS[request.param] is not None:
        monkeypatch.setattr(decoding, "open_inference", STEPPERS[request.param])
    return request.param


def test_stock_gpt2_takes_the_static_cache(plain_model):
    assert isinstance(inference.open_inference(plain_model.gpt, 4, 30), inference.StaticGPT2)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "beam_size, which, path",
    [
        (5, "stop_model", "static"),
        (5, "stop_model", "fixed-shape"),
        (5, "stop_model", "forward"),
        (3, "stop_model", "static"),
        (5, "plain_model", "static"),
        (3, "plain_model", "static"),
        (3, "plain_model", "forward"),
    ],
)
def test_beam_matches_original_algorithm(request, monkeypatch, refs, clips, beam_size, which, path):
    model = request.getfixturevalue(which)
    if STEPPERS[path] is not None:
        monkeypatch.setattr(decoding, "open_inference", STEPPERS[path])
    prefix = _prefix(model, clips)
    ours = beam_search(model, prefix, beam_size, MAX, STOP)  # all 24 images in one batch
    lengths = []
    for i in range(len(clips)):
        ref = refs(which, model, prefix, i, "beam", beam_size, MAX, STOP)
        assert [t for t, _ in ours[i]] == [t for t, _ in ref], f"image {i}"
        assert [s for _, s in ours[i]] == pytest.approx([s for _, s in ref], rel=1e-9, abs=1e-12)
        lengths += [len(t) for t, _ in ref]
    if which == "stop_model":
        # The stopping rules are really exercised: beams stopped early, at several lengths,
        # a first-token '.', and others ran to the end.
        assert min(lengths) == 1 and max(lengths) == MAX and len(set(lengths)) >= 5
        assert any(t[-1] == STOP for t, _ in ours[0] + ours[1] + ours[2])
    else:
        assert set(lengths) == {MAX}


def test_real_vocab_beam_and_greedy_match(real_vocab_model, refs, clips, stepper):
    prefix = _prefix(real_vocab_model, clips[:6])
    beams = beam_search(real_vocab_model, prefix, 5, MAX, STOP)
    greedies = greedy(real_vocab_model, prefix, MAX, STOP)
    for i in range(6):
        ref = refs("real", real_vocab_model, prefix, i, "beam", 5, MAX, STOP)
        assert greedies[i][0] == refs("real", real_vocab_model, prefix, i, "greedy", MAX, STOP)
        assert [t for t, _ in beams[i]] == [t for t, _ in ref]
    assert len({len(t) for h in beams for t, _ in h}) >= 2


def test_beam_with_temperature_matches(stop_model, refs, clips):
    prefix = _prefix(stop_model, clips[:8])
    ours = beam_search(stop_model, prefix, 4, MAX, STOP, temperature=0.5)
    for i in range(8):
        ref = refs("stop_model/8", stop_model, prefix, i, "beam", 4, MAX, STOP, 0.5)
        assert [t for t, _ in ours[i]] == [t for t, _ in ref]


@pytest.mark.parametrize("which", ["stop_model", "plain_model"])
def test_greedy_matches_original_algorithm(request, refs, clips, which, stepper):
    model = request.getfixturevalue(which)
    prefix = _prefix(model, clips)
    ours = greedy(model, prefix, MAX, STOP)
    expected = [refs(which, model, prefix, i, "greedy", MAX, STOP) for i in range(len(clips))]
    assert [t for t, _ in ours] == expected
    lengths = {len(t) for t in expected}
    assert lengths == {MAX} if which == "plain_model" else (1 in lengths and len(lengths) >= 4)


def test_default_max_length_67(plain_model, refs, clips, stepper):
    # 67 tokens also makes the static cache grow past its first FIRST_POSITIONS positions.
    prefix = _prefix(plain_model, clips[:2])
    ours = greedy(plain_model, prefix, DecodingOptions.max_length, STOP)
    assert [t for t, _ in ours] == [refs("plain_model", plain_model, prefix, i, "greedy", 67, STOP) for i in range(2)]
    assert all(len(t) == 67 for t, _ in ours)


def test_beam_one_is_greedy(stop_model, clips):
    prefix = _prefix(stop_model, clips)
    assert [h[0][0] for h in beam_search(stop_model, prefix, 1, MAX, STOP)] == [
        t for t, _ in greedy(stop_model, prefix, MAX, STOP)
    ]


@pytest.mark.parametrize(
    "options",
    [
        DecodingOptions(max_length=MAX),
        DecodingOptions(strategy="beam", beam_size=4, num_captions=2, max_length=MAX),
        DecodingOptions(strategy="sample", top_p=0.9, num_captions=2, seed=3, max_length=MAX),
    ],
    ids=["greedy", "beam", "sample"],
)
def test_batch_equals_one_at_a_time(stop_model, clips, options):
    prefix = _prefix(stop_model, clips[:10])
    batched = generate(stop_model, prefix, options, STOP)
    for i in range(10):
        single = generate(stop_model, prefix[i : i + 1], options, STOP, image_ids=[i])[0]
        assert [t for t, _ in single] == [t for t, _ in batched[i]]
        assert [s for _, s in single] == pytest.approx([s for _, s in batched[i]], rel=1e-12)
    # the batch mixed images that finished at different steps
    assert len({len(h[0][0]) for h in batched}) >= 3


def test_float32_batch_runs_and_uses_cache_kwarg(tiny_config, clips):
    model = build_tiny_model(tiny_config)
    import transformers

    name, keep = _forward_kwargs(type(model.gpt))
    assert keep
    assert name == ("cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values")
    out = beam_search(model, _prefix(model, clips[:3].float()), 3, 5, STOP)
    assert len(out) == 3 and all(len(h) == 3 and all(len(t) == 5 for t, _ in h) for h in out)


def test_custom_stop_token(plain_model, clips, tokenizer):
    prefix = _prefix(plain_model, clips[:1])
    free = ref_greedy(plain_model, prefix, MAX, -1)
    stop_at = next(i for i, t in enumerate(free) if len(tokenizer.encode(tokenizer.decode([t]))) == 1)
    stop_text = tokenizer.decode([free[stop_at]])
    result = decode(plain_model, tokenizer, clips[:1], DecodingOptions(max_length=MAX, stop_token=stop_text))[0]
    assert list(result.tokens) == free[: free.index(free[stop_at]) + 1]


# --------------------------------------------------------------------------- sampling


def test_sampling_seeded_and_sensitive(plain_model, clips):
    prefix = _prefix(plain_model, clips[:4])

    def run(**kw):
        return [[t for t, _ in hyps] for hyps in sample(plain_model, prefix, 1, 8, STOP, **kw)]

    base = run(seed=0)
    assert run(seed=0) == base
    assert run(seed=1) != base
    assert run(seed=0, top_p=0.5) != base
    assert run(seed=0, temperature=0.3) != base
    assert run(seed=0, top_k=50) != base


def test_top_k_one_equals_greedy(stop_model, clips):
    prefix = _prefix(stop_model, clips)
    sampled = [hyps[0][0] for hyps in sample(stop_model, prefix, 1, MAX, STOP, top_k=1, seed=123)]
    assert sampled == [t for t, _ in greedy(stop_model, prefix, MAX, STOP)]


def test_sampling_seed_none_follows_torch_seed(plain_model, clips):
    prefix = _prefix(plain_model, clips[:2])
    torch.manual_seed(7)
    a = sample(plain_model, prefix, 1, 6, STOP)
    torch.manual_seed(7)
    assert sample(plain_model, prefix, 1, 6, STOP) == a


def test_filter_logits():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=float(probs[0] + 0.01))).tolist() == [
        [True, True, False, False, False]
    ]
    shuffled = logits[:, [3, 0, 4, 2, 1]]  # the cut follows values, not positions
    assert torch.isfinite(filter_logits(shuffled, top_p=0.8)).tolist() == [[False, True, False, False, True]]


# --------------------------------------------------------------------------- results, num_captions, text


def test_num_captions_beam(stop_model, refs, tokenizer, clips):
    res = decode(stop_model, tokenizer, clips[:6], strategy="beam", beam_size=5, num_captions=3, max_length=MAX)
    prefix = _prefix(stop_model, clips[:6])
    for i, r in enumerate(res):
        ref = refs("stop_model", stop_model, prefix, i, "beam", 5, MAX, STOP)[:3]
        assert isinstance(r, DecodingResult)
        assert len(r.texts) == len(r.scores) == 3 and len(set(r.texts)) == 3
        assert list(r.scores) == sorted(r.scores, reverse=True)
        assert list(r.texts) == [tokens_to_text(tokenizer, t) for t, _ in ref]
        assert r.text == r.texts[0] and r.score == r.scores[0] and list(r.tokens) == ref[0][0]


def test_num_captions_sample(plain_model, tokenizer, clips):
    res = decode(plain_model, tokenizer, clips[:2], strategy="sample", num_captions=4, seed=1, max_length=6)
    for r in res:
        assert len(r.texts) == 4 and len(set(r.texts)) == 4
        assert list(r.scores) == sorted(r.scores, reverse=True)


def test_greedy_result_score_is_mean_logprob(stop_model, tokenizer, clips):
    r = decode(stop_model, tokenizer, clips[3:4], max_length=MAX)[0]
    prefix = _prefix(stop_model, clips[3:4])
    generated, logps = prefix, []
    for t in r.tokens:
        with torch.no_grad():
            logps.append(float(torch.log_softmax(_last_logits(stop_model, generated), -1)[0, t]))
            generated = torch.cat((generated, stop_model.gpt.transformer.wte(torch.tensor([[t]]))), 1)
    assert r.score == pytest.approx(sum(logps) / len(logps), rel=1e-6)
    assert r.text == tokens_to_text(tokenizer, r.tokens) and r.texts == (r.text,)


def test_text_is_the_originals_decode(tokenizer):
    ids = tokenizer.encode("A man riding a horse on a beach.")
    assert tokens_to_text(tokenizer, ids) == "A man riding a horse on a beach."
    # transformers 4.x cleaned spaces before punctuation by default; 5.x does not for BPE
    spaced = tokenizer.encode("a dog 's ball , on a table .")
    assert tokens_to_text(tokenizer, spaced) == "a dog's ball, on a table."
    assert clean_up_tokenization("is n't it ? yes !") == "isn't it? yes!"
    assert tokens_to_text(tokenizer, [0, 13]) == "!."  # nothing stripped


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strategy": "topk"}, "unknown decoding strategy"),
        ({"strategy": "beam", "beam_size": 0}, "beam_size"),
        ({"num_captions": 0}, "num_captions"),
        ({"num_captions": 2}, "greedy decoding gives one caption"),
        ({"strategy": "beam", "beam_size": 3, "num_captions": 4}, "cannot exceed beam_size"),
        ({"top_p": 0.9}, "for sampling only: set strategy to 'sample'"),
        ({"strategy": "beam", "seed": 1}, "for sampling only: set strategy to 'sample'"),
        ({"strategy": "sample", "top_p": 0.0}, "top_p"),
        ({"strategy": "sample", "top_p": 1.5}, "top_p"),
        ({"strategy": "sample", "top_k": -1}, "top_k"),
        ({"strategy": "sample", "temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": 0.7}, "no effect on greedy"),
        ({"max_length": 0}, "max_length"),
        ({"stop_token": ""}, "stop_token"),
    ],
)
def test_options_validation(kwargs, message):
    with pytest.raises(UsageError, match=message) as info:
        DecodingOptions(**kwargs)
    assert "\n" not in str(info.value)


def test_options_defaults_and_replace():
    o = DecodingOptions()
    assert (o.strategy, o.beam_size, o.max_length, o.num_captions, o.stop_token) == ("greedy", 5, 67, 1, None)
    assert o.replace(strategy="beam").strategy == "beam"
    with pytest.raises(UsageError):
        o.replace(num_captions=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.strategy = "beam"  # type: ignore[misc]


def test_max_length_must_fit_positions(plain_model, clips):
    prefix = _prefix(plain_model, clips[:1])
    n = plain_model.gpt.config.n_positions
    with pytest.raises(UsageError, match="does not fit"):
        generate(plain_model, prefix, DecodingOptions(max_length=n), STOP)
