"""int8 (quantize.py and --precision int8): GPT-2's Conv1D becomes the equal Linear, the int8 model's
logits and captions stay close to fp32's, and CLIP, the mapper and GPT-2 are all quantised at load."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_model

from clipcap_cli import loading
from clipcap_cli.decoding.decode import DecodingOptions, decode
from clipcap_cli.decoding.precision import apply_precision
from clipcap_cli.decoding.quantize import conv1d_to_linear, is_quantized, quantize_int8
from clipcap_cli.weights import backbones


def test_conv1d_becomes_the_same_linear(tiny_config):
    from transformers.pytorch_utils import Conv1D

    gpt = backbones.load_gpt2(tiny_config.gpt2).eval()
    converted = conv1d_to_linear(copy.deepcopy(gpt))
    assert not any(isinstance(m, Conv1D) for m in converted.modules())
    block, new = gpt.transformer.h[0], converted.transformer.h[0]
    assert type(new.attn.c_attn) is torch.nn.Linear and new.attn.c_attn.weight.shape == (96, 32)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    for old, lin in ((block.attn.c_attn, new.attn.c_attn), (block.mlp.c_fc, new.mlp.c_fc)):
        old64, lin64 = copy.deepcopy(old).double(), copy.deepcopy(lin).double()
        torch.testing.assert_close(lin64(x), old64(x), rtol=1e-12, atol=1e-12)  # the same function
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, gpt(ids).logits, rtol=1e-5, atol=1e-5)


def test_int8_model_is_close_to_fp32(tiny_config, gpt2_tokenizer_dir):
    fp32 = build_tiny_model(tiny_config)
    int8 = copy.deepcopy(fp32)
    assert apply_precision(int8, "int8") == "int8"
    assert is_quantized(int8.gpt) and is_quantized(int8.clip_project) and not is_quantized(fp32)
    assert int8.gpt.transformer.wte.weight.dtype == torch.float32  # the embedding lookup stays fp32
    torch.manual_seed(1)
    emb = torch.randn(16, tiny_config.prefix_size)
    with torch.no_grad():
        a = fp32.gpt(inputs_embeds=fp32.embed_prefix(emb)).logits
        b = int8.gpt(inputs_embeds=int8.embed_prefix(emb)).logits
    assert not torch.equal(a, b)  # it did change the arithmetic
    assert (a - b).abs().max() <= 0.08 * a.abs().max()  # within 8% of the logits' range (measured: 3%)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9  # the same next token almost everywhere
    tok = backbones.load_tokenizer(str(gpt2_tokenizer_dir))
    for options in (DecodingOptions(max_length=8), DecodingOptions(strategy="beam", beam_size=3, max_length=8)):
        same = sum(x.text == y.text for x, y in zip(decode(fp32, tok, emb, options), decode(int8, tok, emb, options)))
        assert same >= 12, (options.strategy, same)  # most of the 16 (measured: 15 greedy)


def test_load_model_int8_quantises_clip_mapper_and_gpt2_once(tiny_checkpoint, images):
    exact = loading.load_model(str(tiny_checkpoint), device="cpu", precision="fp32")
    fast = loading.load_model(str(tiny_checkpoint), device="cpu", precision="int8")
    assert is_quantized(fast.clip_model) and is_quantized(fast.model.gpt) and is_quantized(fast.model.clip_project)
    assert not is_quantized(exact.clip_model) and not is_quantized(exact.model)
    paths = [images["rgb"], images["gray"], images["palette"]]
    a, b = exact.encode(paths), fast.encode(paths)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    assert all(r.text for r in fast.caption(paths, workers=0))


def test_quantize_refuses_a_gpu_module(monkeypatch):
    layer = torch.nn.Linear(4, 4)
    monkeypatch.setattr(torch.nn.Linear, "parameters", lambda self: iter([torch.empty(0, device="meta")]))
    with pytest.raises(ValueError, match="CPU only"):
        quantize_int8(layer)


def test_only_the_apis_deprecation_is_silenced_and_only_around_the_call(monkeypatch):
    """quantize_int8 hides torch's deprecation notices of torch.ao.quantization, nothing else: an other warning
    raised inside still reaches the user, the filters are as before afterwards, a bare call still warns."""
    import warnings

    import torch.ao.quantization as tq

    real = tq.quantize_dynamic

    def noisy(*args, **kwargs):
        warnings.warn("something else went wrong", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quantize_int8(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        assert not seen  # the API's own deprecation notices: silenced
        monkeypatch.setattr(tq, "quantize_dynamic", noisy)
        quantize_int8(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        assert [str(w.message) for w in seen] == ["something else went wrong"]
        monkeypatch.setattr(tq, "quantize_dynamic", real)
        seen.clear()
        real(torch.nn.Sequential(torch.nn.Linear(4, 4)), {torch.nn.Linear}, dtype=torch.qint8)
        assert any(issubclass(w.category, DeprecationWarning) and "deprecated" in str(w.message) for w in seen)
    assert warnings.filters == before
