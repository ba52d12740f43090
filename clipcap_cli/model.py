"""The ClipCap network: a mapper from a CLIP image embedding to K input embeddings of a causal LM
(GPT-2 as in the original, or any transformers causal LM: see ``lm.py``).

Parameter names and shapes follow the original release exactly, so its checkpoints load
unchanged (``clip_project.model.0.weight``, ``clip_project.transformer.layers.3.attn.to_keys_values.weight``,
...). The network only: loading and saving live in ``checkpoint.py``, decoding in ``decoding.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from clipcap_cli.config import ModelConfig
from clipcap_cli.weights.lm import BASE_THEN_HEAD

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MAPPER_HEADS = 8  # hard-coded in the original
MAPPER_MLP_RATIO = 2.0  # Transformer passes 2.0 to its layers (their own default of 4.0 is unused)


class MLP(nn.Module):
    """Linear -> Tanh -> Linear, as an ``nn.Sequential`` named ``model`` (keys model.0.*, model.2.*)."""

    def __init__(self, sizes: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=True))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MultiHeadAttention(nn.Module):
    """Self-attention with the original's layout: queries and keys/values without bias,
    the first ``dim`` key/value channels are keys, the next ``dim`` values."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, dim * 2, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.to_queries(x).view(b, n, h, c // h).transpose(1, 2)  # (b, h, n, dh)
        kv = self.to_keys_values(x).view(b, n, 2, h, c // h)
        k = kv[:, :, 0].transpose(1, 2)  # (b, h, n, dh)
        v = kv[:, :, 1].transpose(1, 2)
        # Scale dh**-0.5 and softmax over keys, as the original's einsum; no mask, no dropout.
        out = F.scaled_dot_product_attention(q, k, v)  # (b, h, n, dh)
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class MlpTransformer(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-LN residual block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MlpTransformer(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_layers: int, mlp_ratio: float = MAPPER_MLP_RATIO):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, num_heads, mlp_ratio) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    """CLIP embedding -> clip_length tokens, joined by prefix_length learned constants; the
    transformer's outputs at the constants' positions are the prefix. No positional encoding."""

    def __init__(self, dim_clip: int, dim_embedding: int, prefix_length: int, clip_length: int, num_layers: int):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = Transformer(dim_embedding, MAPPER_HEADS, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)  # (B, clip_length, E)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        out = self.transformer(torch.cat((x, prefix), dim=1))  # (B, clip_length + K, E)
        return out[:, self.clip_length :]  # (B, K, E)


class ClipCaptionModel(nn.Module):
    """A causal LM (``self.gpt``: GPT-2 or another family) fed [mapper(CLIP embedding) ; caption token embeddings].

    The attribute keeps the name ``gpt`` whatever the family, so GPT-2 checkpoints keep their keys
    (``gpt.transformer.*``); other families' keys are their causal-LM class's (``gpt.model.*``).
    """

    def __init__(self, config: ModelConfig, gpt: PreTrainedModel):
        super().__init__()
        self.config = config
        self.prefix_length = config.prefix_length
        self.gpt = gpt
        self.gpt_embedding_size = gpt.get_input_embeddings().weight.shape[1]
        e, k = self.gpt_embedding_size, config.prefix_length
        if config.mapping == "mlp":
            self.clip_project: nn.Module = MLP((config.prefix_size, e * k // 2, e * k))
        else:
            self.clip_project = TransformerMapper(config.prefix_size, e, k, config.clip_length, config.num_layers)
        if config.only_prefix:
            # Frozen LM: no gradients are computed for it at all (the original computed and discarded them).
            self.gpt.requires_grad_(False)

    def train(self, mode: bool = True) -> ClipCaptionModel:
        super().train(mode)
        if self.config.only_prefix:
            self.gpt.eval()  # dropout stays off in the frozen LM, as in the original
        return self

    def embed_prefix(self, clip_embedding: torch.Tensor) -> torch.Tensor:
        """(B, prefix_size) CLIP embeddings -> (B, K, E) LM input embeddings."""
        weight = next(self.clip_project.parameters(), None)  # None: an int8 mapper (quantize.py) holds no parameters
        x = clip_embedding.to(dtype=weight.dtype if weight is not None else torch.float32)
        if self.config.normalize_prefix:
            x = x / x.norm(p=2, dim=-1, keepdim=True)
        return self.clip_project(x).view(-1, self.prefix_length, self.gpt_embedding_size)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt.get_input_embeddings()(tokens)

    def forward(
        self,
        tokens: torch.Tensor,
        clip_embedding: torch.Tensor,
        mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM run on [prefix ; caption tokens], as nanoGPT's ``forward(idx, targets)``.

        Args:
            tokens: caption token ids, right-padded, shape = (B, T).
            clip_embedding: CLIP image embeddings, shape = (B, prefix_size).
            mask: True on the real tokens of ``targets``, shape = (B, T); None = all real. Only the
                loss reads it: GPT-2 gets no attention mask, since the padding is on the right and
                GPT-2 is causal, so no real token sees it (and SDPA keeps its fast causal kernel).
            targets: the tokens to predict, normally ``tokens`` itself, shape = (B, T).

        Returns:
            Without ``targets``: (logits of every position, shape = (B, K + T, V), None).
            With ``targets``: (logits from position K-1 on, shape = (B, T + 1, V), where position i
            predicts targets[:, i], mean caption loss). The LM head (E x V, the biggest matmul) then
            runs only on these T + 1 positions, not on the K-1 prefix positions nobody scores.
        """
        embeds = torch.cat((self.embed_prefix(clip_embedding), self.embed_tokens(tokens)), dim=1)  # (B, K+T, E)
        if targets is None:
            return self.gpt(inputs_embeds=embeds).logits, None
        if getattr(self.gpt.config, "model_type", "gpt2") in BASE_THEN_HEAD:
            hidden = self.gpt.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state  # (B, K+T, H)
            logits = self.gpt.get_output_embeddings()(hidden[:, self.prefix_length - 1 :])  # (B, T+1, V)
        else:  # a family whose head does more than a matmul (scaling, soft-capping): its own forward
            logits = self.gpt(inputs_embeds=embeds, use_cache=False).logits[:, self.prefix_length - 1 :]
        if mask is None:
            mask = torch.ones_like(targets, dtype=torch.bool)
        # The logits already start at position K-1, so caption_loss's [K-1 : -1] slice is [0 : -1].
        return logits, caption_loss(logits, targets, mask, prefix_length=1)


def caption_loss(
    logits: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor, prefix_length: int
) -> torch.Tensor:
    """Mean cross-entropy over the real caption tokens.

    Args:
        logits: GPT-2's output over [prefix ; tokens], shape = (B, K + T, V).
        tokens: the caption, shape = (B, T).
        token_mask: True on real tokens, False on padding, shape = (B, T).
        prefix_length: K.

    The logit at position K-1 (the last prefix position) predicts caption token 0, so the
    prefix is left out by slicing [K-1 : -1]. Padding is left out through ``token_mask``,
    not by ignoring token id 0 as the original did, so GPT-2's token 0 ("!") can be learned.
    """
    logits = logits[:, prefix_length - 1 : -1]  # (B, T, V)
    targets = tokens.masked_fill(~token_mask.bool(), -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
