"""GPT-2 stepping (inference.py): the static cache against transformers' own forward, the loud
failure when a model ignores its cache, and the decoding helpers that make the fast path fast."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap_cli.decoding import decode as decoding
from clipcap_cli.decoding import inference
from clipcap_cli.decoding.decode import DecodingOptions, _topk, beam_search, default_batch_size, generate, greedy
from clipcap_cli.decoding.inference import CacheIgnoredError, ForwardStepper, StaticGPT2, is_stock_gpt2

STOP = 13


def _gpt(cls=GPT2LMHeadModel, dtype=torch.float64, **config):
    torch.manual_seed(0)
    settings = {"vocab_size": 300, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, **config}
    settings.setdefault("bos_token_id", settings["vocab_size"] - 1)
    settings.setdefault("eos_token_id", settings["vocab_size"] - 1)
    return cls(GPT2Config(**settings)).eval().to(dtype)


def _caption_model(gpt):
    from clipcap_cli.config import ModelConfig
    from clipcap_cli.model import ClipCaptionModel

    config = ModelConfig(mapping="mlp", prefix_length=4, prefix_size=16, clip_model="tiny", gpt2="tiny")
    return ClipCaptionModel(config, gpt).eval().to(next(gpt.parameters()).dtype)


# --------------------------------------------------------------------------- the static cache


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "fixed-shape"])
def test_static_cache_follows_the_forward_path_through_reorders(graphed):
    """Random reorders (forks, drops, moves below n) and steps, mirrored on transformers' DynamicCache:
    every step's logits must agree, so every row kept its own history."""
    gpt = _gpt()
    static = StaticGPT2(gpt, rows=12, positions=4 + 30, cuda_graphs=graphed)
    reference = ForwardStepper(gpt)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randn(5, 4, 32, generator=g, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(static.prefill(prefix), reference.prefill(prefix), rtol=1e-10, atol=1e-10)
        n, moved = 5, 0
        for step in range(30):  # past FIRST_POSITIONS: the eager cache grows once
            m = int(torch.randint(1, 13, (1,), generator=g))
            rows = torch.randint(0, n, (m,), generator=g)  # repeats fork, missing rows drop
            if step % 3 == 0:
                rows = torch.arange(n).flip(0)[: max(1, n - 1)]  # a pure reorder that strands the last rows
            static.select(rows)
            reference.select(rows)
            moved += static.slot is not None
            tokens = torch.randint(0, 300, (rows.numel(),), generator=g)
            embeds = gpt.transformer.wte(tokens)
            torch.testing.assert_close(static.step(embeds), reference.step(embeds), rtol=1e-10, atol=1e-10)
            n = rows.numel()
    assert moved > 5  # the rows really lived out of order


def test_select_copies_only_forks_and_stranded_rows(monkeypatch):
    gpt = _gpt()
    static = StaticGPT2(gpt, rows=8, positions=20)
    copies = []
    original = StaticGPT2._copy_rows
    monkeypatch.setattr(StaticGPT2, "_copy_rows", lambda self, s, t: (copies.append(len(s)), original(self, s, t)))
    with torch.inference_mode():
        static.prefill(torch.randn(6, 4, 32, dtype=torch.float64))
        static.select(torch.tensor([5, 4, 3, 2, 1, 0]))  # a permutation: nothing moves
        assert static.slot.tolist() == [5, 4, 3, 2, 1, 0]
        static.select(torch.tensor([5, 5, 5, 4]))  # physical rows 0, 0, 0, 1: two forks, 2-5 dropped
        assert static.slot.tolist() == [0, 2, 3, 1]
        static.select(torch.tensor([3, 2]))  # physical 1 stays; physical 3 is stranded above n=2 and moves
        assert static.slot.tolist() == [1, 0] and static.n == 2
    assert copies == [2, 1]


def test_subclass_overriding_forward_takes_the_generic_path():
    class Wrapped(GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    assert is_stock_gpt2(_gpt())
    assert not is_stock_gpt2(_gpt(Wrapped))
    assert not is_stock_gpt2(_gpt(add_cross_attention=True))
    assert isinstance(inference.open_inference(_gpt(Wrapped), 4, 20), ForwardStepper)


class RenamedCacheGPT2(GPT2LMHeadModel):
    """A future transformers whose cache argument is called ``kv_cache`` and which ignores unknown
    arguments: ``past_key_values=`` (the fallback name) is silently dropped, and the model builds
    its own empty cache on every call."""

    def forward(
        self, inputs_embeds=None, kv_cache=None, position_ids=None, use_cache=None, logits_to_keep=0, **ignored
    ):
        return super().forward(
            inputs_embeds=inputs_embeds,
            cache=kv_cache,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )


@pytest.mark.parametrize(
    "options", [DecodingOptions(max_length=6), DecodingOptions(strategy="beam", max_length=6)], ids=["greedy", "beam"]
)
def test_renamed_cache_argument_fails_loudly(options):
    model = _caption_model(_gpt(RenamedCacheGPT2))
    assert inference.forward_kwargs(RenamedCacheGPT2)[0] == "past_key_values"  # the name guess misses
    prefix = torch.randn(3, 4, 32, dtype=torch.float64)
    with pytest.raises(
        CacheIgnoredError, match=r"ignored the KV cache passed as past_key_values= \(it holds 0 positions, 4 expected\)"
    ):
        generate(model, prefix, options, STOP)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")  # Wrapped's signature hides `cache`
def test_generic_path_with_a_working_forward_matches_the_static_cache():
    class Wrapped(GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    stock, wrapped = _gpt(), _gpt(Wrapped)
    wrapped.load_state_dict(stock.state_dict())
    prefix = torch.randn(6, 4, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = beam_search(_caption_model(stock), prefix, 3, 12, STOP)
    b = beam_search(_caption_model(wrapped), prefix, 3, 12, STOP)
    assert [[t for t, _ in h] for h in a] == [[t for t, _ in h] for h in b]


# --------------------------------------------------------------------------- precision inside the step


def test_bf16_logits_are_float32_and_the_top_ones_exact():
    gpt = _gpt(dtype=torch.bfloat16, vocab_size=2000)
    static = StaticGPT2(gpt, rows=4, positions=10)
    h = torch.randn(4, 32, dtype=torch.bfloat16)
    logits = static._logits(h)
    assert logits.dtype == torch.float32
    exact = h.float() @ gpt.lm_head.weight.float().t()  # fp32 products of the same bf16 weights
    top = gpt.lm_head(h).topk(inference.REFINED_LOGITS, -1).indices
    torch.testing.assert_close(logits.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-5)
    rest = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top, False)
    assert not torch.allclose(logits[rest], exact[rest], rtol=1e-5, atol=1e-5)  # only the top rows were recomputed


def test_bf16_keeps_the_residual_stream_in_float32():
    """bf16 weights and matrix products, but the running sum of the blocks and the LayerNorms in fp32:
    over a prefill and 8 steps through 8 layers, the logits stay clearly closer to fp32 arithmetic on
    the same (bf16-rounded) weights than transformers' own all-bf16 forward does."""
    import copy

    gpt16 = _gpt(dtype=torch.bfloat16, vocab_size=2000, n_embd=64, n_layer=8, n_head=4)
    gpt32 = copy.deepcopy(gpt16).float()  # the same weights, fp32 arithmetic
    g = torch.Generator().manual_seed(0)
    prefix = torch.randn(6, 4, 64, generator=g)
    tokens = torch.randint(0, 2000, (8, 6), generator=g)

    def logits(stepper, gpt):
        with torch.inference_mode():
            out = [stepper.prefill(prefix).float()]
            out += [stepper.step(gpt.transformer.wte(t)).float() for t in tokens]
        return torch.stack(out)

    exact = logits(StaticGPT2(gpt32, rows=6, positions=12), gpt32)
    ours = logits(StaticGPT2(gpt16, rows=6, positions=12), gpt16)
    all_bf16 = logits(ForwardStepper(gpt16), gpt16)
    ours_err, bf16_err = (ours - exact).abs().mean(), (all_bf16 - exact).abs().mean()
    assert ours_err < 0.6 * bf16_err, (ours_err, bf16_err)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_bf16_model_decodes_with_float32_scores(strategy):
    from clipcap_cli.decoding.precision import apply_precision

    model = _caption_model(_gpt(dtype=torch.float32, vocab_size=2000))
    assert apply_precision(model, "bf16") == "bf16"
    assert model.gpt.lm_head.weight.dtype == torch.bfloat16
    assert next(model.clip_project.parameters()).dtype == torch.float32
    with torch.no_grad():
        prefix = model.embed_prefix(torch.randn(5, 16))
    assert prefix.dtype == torch.float32  # the step casts it to GPT-2's dtype
    options = DecodingOptions(strategy=strategy, max_length=8, **({"seed": 1} if strategy == "sample" else {}))
    found = generate(model, prefix, options, STOP)
    assert len(found) == 5
    for hyps in found:
        tokens, score = hyps[0]
        assert 1 <= len(tokens) <= 8 and all(0 <= t < 2000 for t in tokens)
        assert isinstance(score, float) and math.isfinite(score) and score <= 0  # a mean log-prob


# --------------------------------------------------------------------------- decoding helpers


@pytest.mark.parametrize("shape", [(7, 50257), (3, 4096 * 5 + 17), (2, 300)])
@pytest.mark.parametrize("k", [1, 5])
def test_chunked_topk_equals_topk(shape, k):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(k))
    x[0, -1] = 100.0  # the best value in the last, partial chunk
    values, indices = _topk(x, k)
    expected = x.topk(k, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


def test_greedy_picks_the_first_of_equal_maxima():
    gpt = _gpt()
    with torch.no_grad():
        gpt.lm_head.weight = torch.nn.Parameter(torch.zeros_like(gpt.lm_head.weight))  # every logit 0
    out = greedy(_caption_model(gpt), torch.randn(2, 4, 32, dtype=torch.float64), 3, STOP)
    assert [t for t, _ in out] == [[0, 0, 0], [0, 0, 0]]  # argmax's first index, as the original


def test_default_batch_size(monkeypatch):
    assert default_batch_size("cpu", DecodingOptions()) == decoding.CPU_BATCH_SIZE["greedy"]
    assert default_batch_size("cpu", DecodingOptions(strategy="beam")) == decoding.CPU_BATCH_SIZE["beam"]
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 141 * gib))
    sizes = {}
    for free in (2 * gib, 16 * gib, 130 * gib):
        sizes[free] = (
            default_batch_size("cuda", DecodingOptions()),
            default_batch_size("cuda", DecodingOptions(strategy="beam")),
        )
    greedy_sizes, beam_sizes = zip(*sizes.values())
    assert all(s & (s - 1) == 0 for s in greedy_sizes + beam_sizes)  # powers of two
    assert greedy_sizes[0] < greedy_sizes[1] <= greedy_sizes[2] == decoding.CUDA_MAX_BATCH_SIZE
    assert beam_sizes[0] < beam_sizes[1] and all(b <= g for b, g in zip(beam_sizes, greedy_sizes))
    # 2 GiB free: half of it holds the beam batch's cache (12 layers x 2 x 768 x 77 positions x 4 bytes x 5 beams)
    assert beam_sizes[0] * 5 * 12 * 2 * 768 * 77 * 4 < gib
