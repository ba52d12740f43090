"""Reading a ClipCap prefix as words, as the paper's prefix-interpretability study does (Mokady
et al., 2021): each of the K prefix embeddings is matched to the GPT-2 vocabulary tokens whose
input embeddings (GPT-2's ``wte`` matrix) are closest to it by cosine similarity.

The paper found that with GPT-2 fine-tuned the nearest tokens read as salient words of the image,
while with GPT-2 frozen they are unreadable: the mapper must then also steer the fixed language
model, and the prefix it learns is not made of word-like embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clipcap_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from clipcap_cli.captioner import Captioner
    from clipcap_cli.decoding.decode import DecodingOptions

TOP = 2  # tokens shown per prefix position: the nearest and the runner-up


@dataclass(frozen=True)
class NearToken:
    """One vocabulary token near a prefix embedding."""

    token: str  # the token's text, as the tokenizer decodes it alone (leading space kept)
    id: int  # its GPT-2 vocabulary id
    cosine: float  # cosine similarity between the prefix embedding and the token's input embedding


@dataclass(frozen=True)
class PrefixReading:
    """An image's caption and, for each prefix position, its nearest tokens (closest first)."""

    caption: str
    positions: tuple[tuple[NearToken, ...], ...]  # K positions x ``top`` tokens

    def to_dict(self) -> dict[str, Any]:
        """``{"caption", "prefix": [{"position", "tokens": [{"token", "id", "cosine"}]}]}``."""
        return {
            "caption": self.caption,
            "prefix": [
                {"position": k, "tokens": [{"token": t.token, "id": t.id, "cosine": t.cosine} for t in tokens]}
                for k, tokens in enumerate(self.positions)
            ],
        }


def nearest_tokens(prefix: torch.Tensor, embeddings: torch.Tensor, top: int = TOP) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` rows of ``embeddings`` closest to each prefix vector by cosine similarity.

    Args:
        prefix: prefix embeddings, shape = (B, K, E).
        embeddings: GPT-2's input-embedding matrix, shape = (V, E).
    Returns:
        (cosines, ids), both shape = (B, K, top), closest first.
    """
    if not 1 <= top <= embeddings.shape[0]:
        raise UsageError(f"top must be between 1 and the vocabulary size {embeddings.shape[0]}, got {top}")
    p = prefix.float()
    p = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, K, E)
    w = embeddings.float()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (V, E)
    return (p @ w.T).topk(top, dim=-1)  # (B, K, V) -> (B, K, top)


def read_prefix(
    captioner: Captioner,
    clip_embedding: torch.Tensor,
    top: int = TOP,
    options: DecodingOptions | None = None,
) -> list[PrefixReading]:
    """Caption CLIP image embeddings (B, D) and read each one's prefix as its nearest GPT-2 tokens.

    ``options`` decode the caption (default: greedy, as ``clipcap caption``).
    """
    import torch

    model = captioner.model
    embedding = clip_embedding.to(captioner.device)
    with torch.inference_mode():
        prefix = model.embed_prefix(embedding)  # (B, K, E)
        cosines, ids = nearest_tokens(prefix, model.gpt.get_input_embeddings().weight, top)
    captions = captioner.decode(embedding, options)
    readings = []
    for result, cos_rows, id_rows in zip(captions, cosines.tolist(), ids.tolist()):
        positions = tuple(
            tuple(NearToken(captioner.tokenizer.decode([i]), int(i), float(c)) for i, c in zip(id_row, cos_row))
            for id_row, cos_row in zip(id_rows, cos_rows)
        )
        readings.append(PrefixReading(result.text, positions))
    return readings
