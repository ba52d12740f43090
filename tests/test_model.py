import pytest
import torch
from conftest import build_tiny_model

from clipcap_cli.config import ModelConfig
from clipcap_cli.errors import UsageError
from clipcap_cli.model import MLP, TransformerMapper, caption_loss


def test_mlp_mapper_shapes_and_names():
    mlp = MLP((512, 3840, 7680))
    names = {k: tuple(v.shape) for k, v in mlp.state_dict().items()}
    assert names == {
        "model.0.weight": (3840, 512),
        "model.0.bias": (3840,),
        "model.2.weight": (7680, 3840),
        "model.2.bias": (7680,),
    }
    assert sum(p.numel() for p in mlp.parameters()) == 31_468_800  # reference 1.3


def test_transformer_mapper_parameter_count_matches_release():
    mapper = TransformerMapper(640, 768, prefix_length=40, clip_length=40, num_layers=8)
    assert sum(p.numel() for p in mapper.parameters()) == 57_520_128  # reference 1.4
    sd = mapper.state_dict()
    assert tuple(sd["transformer.layers.0.attn.to_keys_values.weight"].shape) == (1536, 768)
    assert "transformer.layers.0.attn.to_queries.bias" not in sd
    assert tuple(sd["transformer.layers.7.mlp.fc1.weight"].shape) == (1536, 768)
    assert tuple(sd["linear.weight"].shape) == (30720, 640)
    assert TransformerMapper(640, 768, 10, 10, 8).state_dict()["prefix_const"].shape == (10, 768)
    assert sum(p.numel() for p in TransformerMapper(640, 768, 10, 10, 8).parameters()) == 42_728_448


def _reference_attention(mha, x):
    """The original's einsum formulation, written out, to check our SDPA version against."""
    b, n, c = x.shape
    h = mha.num_heads
    q = mha.to_queries(x).reshape(b, n, h, c // h)
    kv = mha.to_keys_values(x).reshape(b, n, 2, h, c // h)
    k, v = kv[:, :, 0], kv[:, :, 1]
    att = torch.einsum("bnhd,bmhd->bnmh", q, k) * (c // h) ** -0.5
    att = att.softmax(dim=2)
    out = torch.einsum("bnmh,bmhd->bnhd", att, v).reshape(b, n, c)
    return mha.project(out)


def test_mapper_attention_matches_original_formulation():
    torch.manual_seed(0)
    mapper = TransformerMapper(16, 64, prefix_length=3, clip_length=2, num_layers=1)
    x = torch.randn(2, 5, 64)
    attn = mapper.transformer.layers[0].attn
    torch.testing.assert_close(attn(x), _reference_attention(attn, x), atol=1e-5, rtol=1e-5)
    out = mapper(torch.randn(2, 16))
    assert out.shape == (2, 3, 64)


def test_forward_puts_prefix_before_tokens(tiny_config):
    model = build_tiny_model(tiny_config)
    tokens = torch.tensor([[464, 3290, 13], [64, 3797, 13]])
    clip = torch.randn(2, tiny_config.prefix_size)
    logits, loss = model(tokens, clip)
    assert loss is None and logits.shape == (2, tiny_config.prefix_length + 3, 50257)
    # The same result by hand: [mapper(clip) ; wte(tokens)] through GPT-2.
    embeds = torch.cat(
        [model.clip_project(clip).view(2, tiny_config.prefix_length, -1), model.gpt.transformer.wte(tokens)], 1
    )
    torch.testing.assert_close(logits, model.gpt(inputs_embeds=embeds).logits)


def test_normalize_prefix_makes_scale_irrelevant(tiny_config):
    model = build_tiny_model(tiny_config.replace(normalize_prefix=True))
    clip = torch.randn(2, tiny_config.prefix_size)
    torch.testing.assert_close(model.embed_prefix(clip), model.embed_prefix(clip * 7.5))
    plain = build_tiny_model(tiny_config)
    assert not torch.allclose(plain.embed_prefix(clip), plain.embed_prefix(clip * 7.5))


def test_loss_slices_prefix_and_ignores_padding_by_mask():
    k = 3
    vocab = 10
    tokens = torch.tensor([[0, 5, 7, 0]])  # token 0 ("!") is real here; the last 0 is padding
    mask = torch.tensor([[1, 1, 1, 0]])
    logits = torch.full((1, k + 4, vocab), -30.0)
    # Position k-1+i predicts tokens[i]: make every real target certain.
    for i, t in enumerate([0, 5, 7]):
        logits[0, k - 1 + i, t] = 30.0
    logits[0, k - 1 + 3, 4] = 30.0  # predicts the pad position: must be ignored
    assert caption_loss(logits, tokens, mask, k).item() < 1e-6
    # The original's ignore_index=0 would have skipped the real "!"; ours learns it:
    wrong = logits.clone()
    wrong[0, k - 1, 0] = -30.0
    wrong[0, k - 1, 9] = 30.0
    assert caption_loss(wrong, tokens, mask, k).item() > 10


def test_only_prefix_freezes_gpt_and_keeps_it_in_eval(tiny_config):
    model = build_tiny_model(tiny_config.replace(only_prefix=True))
    model.train()
    assert not model.gpt.training
    assert model.clip_project.training
    assert not any(p.requires_grad for p in model.gpt.parameters())
    tokens = torch.tensor([[464, 3290, 13]])
    _, loss = model(tokens, torch.randn(1, tiny_config.prefix_size), targets=tokens)
    loss.backward()
    assert all(p.grad is None for p in model.gpt.parameters())
    assert all(p.grad is not None for p in model.clip_project.parameters())


def test_config_validation():
    with pytest.raises(UsageError, match="unknown mapping"):
        ModelConfig(mapping="lstm")
    with pytest.raises(UsageError, match="prefix_length"):
        ModelConfig(prefix_length=0)
    cfg = ModelConfig(mapping="transformer", prefix_length=40)
    assert ModelConfig.from_dict({**cfg.to_dict(), "from_the_future": 1}) == cfg
